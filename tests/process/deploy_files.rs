//! The Grafana dashboard and the Prometheus alert rules in `deploy/`: they parse, and every
//! metric they query is one the code exports (found in the sources' `metrics` macros).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn rust_sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_sources(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

/// The metric names the code records: the first argument of every `counter!`, `gauge!`
/// and `histogram!` in the crates' sources.
fn exported() -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_sources(&Path::new(ROOT).join("crates"), &mut files);
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for macro_name in ["counter!(", "gauge!(", "histogram!("] {
            for (at, _) in text.match_indices(macro_name) {
                let rest = text[at + macro_name.len()..].trim_start();
                if let Some(quoted) = rest.strip_prefix('"')
                    && let Some(end) = quoted.find('"')
                {
                    names.insert(quoted[..end].to_string());
                }
            }
        }
    }
    names
}

/// The `switchyard_…` names in an expression, with a histogram's series suffixes taken off.
fn queried(expr: &str, exported: &BTreeSet<String>) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in expr.match_indices("switchyard_") {
        let name: String = expr[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| exported.contains(*base))
            })
            .unwrap_or(&name)
            .to_string();
        names.push(base);
    }
    names
}

#[test]
fn the_dashboard_queries_only_metrics_the_code_exports() {
    let exported = exported();
    for family in [
        "switchyard_rpc_requests_total",
        "switchyard_rpc_duration_seconds",
        "switchyard_turns_total",
        "switchyard_store_commit_seconds",
    ] {
        assert!(
            exported.contains(family),
            "the scan of the sources missed {family}: {exported:?}"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/switchyard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut used = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("an expr");
            let names = queried(expr, &exported);
            assert!(!names.is_empty(), "{expr} queries no switchyard metric");
            for name in names {
                assert!(
                    exported.contains(&name),
                    "the dashboard queries {name}, which nothing exports"
                );
                used.insert(name);
            }
        }
    }
    assert!(
        used.len() >= 15,
        "the dashboard shows {} families: {used:?}",
        used.len()
    );
}

#[test]
fn the_alert_rules_are_well_formed_and_query_exported_metrics() {
    let exported = exported();
    let rules =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yaml")).unwrap();
    assert!(rules.lines().any(|line| line.trim() == "groups:"));
    let mut alerts = Vec::new();
    let mut current: Option<String> = None;
    for line in rules.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert: ") {
            assert!(current.is_none(), "alert {current:?} has no expr");
            current = Some(name.to_string());
        } else if let Some(expr) = line.strip_prefix("expr: ") {
            let name = current.take().expect("an expr belongs to an alert");
            let names = queried(expr, &exported);
            assert!(!names.is_empty(), "{name} queries no switchyard metric");
            for metric in names {
                assert!(
                    exported.contains(&metric),
                    "{name} queries {metric}, which nothing exports"
                );
            }
            alerts.push(name);
        }
    }
    assert!(current.is_none());
    for wanted in [
        "SwitchyardNoLiveWorker",
        "SwitchyardFailover",
        "SwitchyardHighErrorRate",
        "SwitchyardStoreCommitSlow",
        "SwitchyardAgentPoolExhausted",
    ] {
        assert!(
            alerts.iter().any(|alert| alert == wanted),
            "no {wanted} in {alerts:?}"
        );
    }
}
