//! `switchyard bench` runs end to end and reports what it measured.

use std::process::Command;

use crate::harness::BINARY;

#[test]
fn bench_measures_every_scenario_against_the_echo_baseline() {
    let output = Command::new(BINARY)
        .args([
            "bench",
            "--scenario",
            "create,append,get-context,send-message,mixed",
            "--count",
            "200",
            "--concurrency",
            "8",
            "--users",
            "10",
            "--workers",
            "2",
            "--store",
            "memory",
            "--json",
        ])
        .output()
        .expect("switchyard bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let baseline = &report["baseline"];
    assert_eq!(baseline["calls"], 200, "{report}");
    let results = report["results"].as_array().expect("results");
    assert_eq!(results.len(), 5);
    for result in results {
        assert_eq!(result["calls"], 200, "{result}");
        assert_eq!(result["errors"], serde_json::json!({}), "{result}");
        let p50 = result["latency_us"]["p50"].as_f64().expect("p50");
        let p99 = result["latency_us"]["p99"].as_f64().expect("p99");
        assert!(p50 > 0.0 && p99 >= p50, "{result}");
        assert!(
            result["ratio_to_baseline"]["throughput"]
                .as_f64()
                .expect("ratio")
                > 0.0
        );
    }
}

#[test]
fn bench_refuses_an_unknown_scenario() {
    let output = Command::new(BINARY)
        .args(["bench", "--scenario", "teleport"])
        .output()
        .expect("switchyard bench runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("teleport") && stderr.contains("get-context"),
        "{stderr}"
    );
}

/// A first-delta run times turns to their first delta, through the cluster and with the
/// same agent run alone (here an OpenAI-compatible model that waits 30 ms, whose own time
/// is left out), and reports every interval with the watched process's memory and the
/// watched files' size.
#[test]
fn bench_times_first_deltas_against_the_agent_alone_and_reports_intervals() {
    let watched = crate::harness::temp_dir("bench-watch").join("watched");
    std::fs::write(&watched, vec![b'x'; 4096]).unwrap();
    let pid = std::process::id().to_string();
    let output = Command::new(BINARY)
        .args([
            "bench",
            "--scenario",
            "first-delta",
            "--llm-delay",
            "30ms",
            "--agent-type",
            "fixed-delay-llm",
            "--count",
            "120",
            "--concurrency",
            "4",
            "--users",
            "4",
            "--workers",
            "2",
            "--store",
            "memory",
            "--no-baseline",
            "--json",
            "--report-every",
            "300ms",
            "--watch-pid",
            &pid,
            "--watch-file",
        ])
        .arg(&watched)
        .output()
        .expect("switchyard bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON lines"))
        .collect();
    let (report, intervals) = lines.split_last().expect("a report");
    // Both runs (the agent alone, then through the cluster) last about 1 s: 3 intervals.
    assert!(intervals.len() >= 4, "{intervals:?}");
    let mut calls = 0.0;
    for interval in intervals {
        assert!(
            interval["rss_bytes"].as_u64().expect("rss") > 0,
            "{interval}"
        );
        assert!(
            interval["anon_bytes"].as_u64().expect("anon") > 0,
            "{interval}"
        );
        assert_eq!(interval["file_bytes"], 4096, "{interval}");
        assert_eq!(interval["errors"], 0, "{interval}");
        calls += interval["calls_per_second"].as_f64().expect("calls/s");
    }
    assert!(calls > 0.0);

    assert_first_delta_report(report, 120);
    let _ = std::fs::remove_dir_all(watched.parent().unwrap());
}

/// Against a `switchyard dev` of its own (as an operator runs it), a first-delta run serves
/// its fixed-delay model on the address the target's agent type points at: every turn
/// reaches that model, whose held time is left out as in a run of bench's own cluster.
/// Without that address, --llm-delay with --target is refused before anything runs.
#[test]
fn bench_times_first_deltas_of_a_target_whose_agent_calls_its_model() {
    let dir = crate::harness::temp_dir("bench-target-model");
    let model = crate::harness::free_address().to_string();
    let address = crate::harness::free_address().to_string();
    std::fs::write(
        dir.join("agents.toml"),
        format!(
            "[agents.fixed-delay-llm]\nbackend = \"openai\"\n\
             openai = {{ base_url = \"http://{model}/v1\", model = \"fixed-delay\" }}\n\
             pool = {{ max = 8 }}\n"
        ),
    )
    .unwrap();
    let mut dev = crate::harness::start_dev(
        &dir,
        &address,
        &["--store", "memory", "--agents", "agents.toml"],
    );
    let target = format!("http://{address}");
    let run = |extra: &[&str]| {
        Command::new(BINARY)
            .args(["bench", "--target", &target, "--scenario", "first-delta"])
            .args(["--agent-type", "fixed-delay-llm", "--llm-delay", "30ms"])
            .args(extra)
            .args(["--count", "60", "--concurrency", "4", "--users", "4"])
            .args(["--no-baseline", "--json"])
            .output()
            .expect("switchyard bench runs")
    };

    let refused = run(&[]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--llm-listen"), "{stderr}");

    let output = run(&["--llm-listen", &model]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        dev.log()
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_first_delta_report(&report, 60);
    dev.kill();
    let _ = std::fs::remove_dir_all(dir);
}

/// A first-delta report: the agent alone, then through the cluster, each `calls` calls
/// without an error. The time the model held each request (30 ms, and however late its
/// timer fired), which its first delta states, is left out of both: what remains is the
/// agent's own work and, through the cluster, the hops; some, and well under the delay
/// (a first delta from another model would not state it).
fn assert_first_delta_report(report: &serde_json::Value, calls: u64) {
    let results = report["results"].as_array().expect("results");
    let labels: Vec<&str> = results
        .iter()
        .map(|result| result["scenario"].as_str().expect("label"))
        .collect();
    assert_eq!(labels, ["fixed-delay-llm alone", "first-delta"]);
    for result in results {
        assert_eq!(result["calls"], calls, "{result}");
        assert_eq!(result["errors"], serde_json::json!({}), "{result}");
        let p50 = result["latency_us"]["p50"].as_f64().expect("p50");
        assert!((1.0..30_000.0).contains(&p50), "{result}");
    }
    let added = report["added_to_first_delta_us"]["p50"]
        .as_f64()
        .expect("added");
    assert!(added.is_finite(), "{report}");
}
