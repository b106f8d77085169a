//! The README, tried as a newcomer would: `switchyard dev`, then its grpcurl lines pasted
//! into a shell.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use crate::harness::{Process, free_address, grpcurl, temp_dir};

/// The README's shell block that follows this marker is run as written, with only the
/// coordinator address replaced.
const MARKER: &str = "<!-- tested: readme-grpcurl -->";
const README_ADDRESS: &str = "127.0.0.1:50051";

fn readme_grpcurl_block() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md at the repository root");
    let after = readme
        .split_once(MARKER)
        .expect("README has the tested grpcurl block")
        .1;
    let block = after
        .split_once("```sh\n")
        .expect("a sh block follows the marker")
        .1;
    block
        .split_once("```")
        .expect("the block ends")
        .0
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_dev_and_the_readme_grpcurl_lines_work() {
    let dir = temp_dir("readme");
    let address = free_address().to_string();
    let mut dev = Process::spawn(
        "dev",
        &["dev", "--listen", &address, "--data-dir", "data"],
        &dir,
    );

    // The banner names every endpoint and a ready-to-paste command, then dev is ready.
    let mut banner = String::new();
    let mut lines = BufReader::new(dev.stdout()).lines();
    for line in lines.by_ref() {
        let line = line.expect("stdout line");
        banner.push_str(&line);
        banner.push('\n');
        if line.contains("Ctrl-C") {
            break;
        }
    }
    assert!(
        banner.contains(&format!("coordinator  {address}")),
        "{banner}"
    );
    assert_eq!(banner.matches("dev-worker-").count(), 3, "{banner}");
    assert!(
        banner.contains(&format!("grpcurl -plaintext {address} list")),
        "{banner}"
    );
    assert!(
        dir.join("data/token.key").exists(),
        "dev keeps its token key in the data dir"
    );

    if let Some(_grpcurl) = grpcurl() {
        let script = readme_grpcurl_block().replace(README_ADDRESS, &address);
        let output = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(&dir)
            .output()
            .expect("bash runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the README's grpcurl lines failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("\"delta\""),
            "SendMessage streamed no delta: {stdout}"
        );
        assert!(stdout.contains("\"done\""), "{stdout}");
        assert!(
            stdout.contains("\"role\": \"assistant\""),
            "GetContext shows no reply: {stdout}"
        );
    }

    dev.signal("TERM");
    let status = dev.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "dev exited with {status}: {}", dev.log());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter()
            .any(|line| line.contains("switchyard dev stopped")),
        "{rest:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
