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
