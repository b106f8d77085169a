//! The README, tried as a newcomer would: `switchyard dev`, then its grpcurl lines pasted
//! into a shell.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use crate::harness::{BINARY, Process, free_address, grpcurl, start_dev, temp_dir};

/// The README's shell blocks that follow these markers are run as written, with only the
/// coordinator address replaced.
const MARKER: &str = "<!-- tested: readme-grpcurl -->";
const KEY_MARKER: &str = "<!-- tested: readme-api-key-new -->";
const KEYED_MARKER: &str = "<!-- tested: readme-grpcurl-keys -->";
const README_ADDRESS: &str = "127.0.0.1:50051";

fn readme_grpcurl_block() -> String {
    readme_block(MARKER)
}

fn readme_block(marker: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md at the repository root");
    let after = readme
        .split_once(marker)
        .unwrap_or_else(|| panic!("README has the block marked {marker}"))
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

/// Runs `script` with bash in `dir`, with `switchyard` on the PATH and `env` set; returns
/// its stdout, failing the test on a non-zero exit.
fn run_script(script: &str, dir: &std::path::Path, env: &[(&str, &str)]) -> String {
    let binary_dir = std::path::Path::new(BINARY)
        .parent()
        .expect("the binary's folder");
    let path = format!(
        "{}:{}",
        binary_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .envs(env.iter().copied())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the README's lines failed:\n{script}\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_api_key_lines_work() {
    let Some(_grpcurl) = grpcurl() else {
        return;
    };
    let dir = temp_dir("readme-keys");
    run_script(&readme_block(KEY_MARKER), &dir, &[]);
    let printed = std::fs::read_to_string(dir.join("my-service.key")).unwrap();
    let key = printed
        .lines()
        .find(|line| line.starts_with("sy_"))
        .expect("the key is printed")
        .to_string();
    let file = std::fs::read_to_string(dir.join("api-keys.toml")).unwrap();
    assert!(
        file.starts_with("[[keys]]") && !file.contains(&key),
        "{file}"
    );

    let address = free_address().to_string();
    let _dev = start_dev(&dir, &address, &["--api-keys", "api-keys.toml"]);
    let script = readme_block(KEYED_MARKER).replace(README_ADDRESS, &address);
    let stdout = run_script(&script, &dir, &[("KEY", &key)]);
    assert!(stdout.contains("\"done\""), "{stdout}");
    assert!(
        stdout.contains("dev-worker-0"),
        "ListWorkers answered: {stdout}"
    );

    // The same call without the key is refused.
    let refused = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-d",
            r#"{"user_id": "alice"}"#,
            &address,
            "switchyard.v1.SessionService/CreateSession",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"),
        "{refused:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
