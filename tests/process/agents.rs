//! Agent types from a configuration file, with a real process agent behind one.

use std::time::Duration;

use switchyard::SwitchyardClient;

use crate::harness::{Process, free_address, start_dev, temp_dir};

fn python_available() -> bool {
    let found = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: python3 is not installed; the process agent test did not run"
        );
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_process_agent_answers_through_the_cluster() {
    if !python_available() {
        return;
    }
    let dir = temp_dir("agents");
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/agents/echo_agent.py"
    );
    std::fs::write(
        dir.join("agents.toml"),
        format!(
            "[agents.py-echo]\nrole = \"echo\"\nbackend = \"process\"\n\
             process = {{ program = \"python3\", args = [\"{example}\"] }}\n\
             pool = {{ min = 1, max = 2 }}\n"
        ),
    )
    .unwrap();
    let address = free_address().to_string();
    let mut dev = start_dev(
        &dir,
        &address,
        &["--agents", "agents.toml", "--workers", "1"],
    );
    let client = SwitchyardClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let session = client
        .create_session("pat", [("k", "v")])
        .await
        .unwrap()
        .session
        .unwrap();
    let reply = client
        .send_message_collect(&session.session_id, "py-echo", "from a python process")
        .await
        .unwrap();
    assert_eq!(reply.text, "echo: from a python process");
    // Deltas ready together go out joined; the agent's own streaming is tested in
    // crates/agents/tests/process.rs.
    assert!(reply.delta_count >= 1);
    let again = client
        .send_message_collect(&session.session_id, "py-echo", "twice")
        .await
        .unwrap();
    assert_eq!(again.text, "echo: twice");
    let context = client.get_context(&session.session_id, 0, 0).await.unwrap();
    assert_eq!(
        context[1].name, "py-echo",
        "the reply names the agent type that wrote it"
    );
    let status = client
        .send_message(&session.session_id, "nope", "x")
        .await
        .unwrap_err();
    assert!(
        status.message().contains("py-echo") && status.message().contains("echo"),
        "{}",
        status.message()
    );
    drop(client);
    dev.signal("TERM");
    assert!(
        dev.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        dev.log()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_broken_agents_file_stops_dev_with_the_reason() {
    let dir = temp_dir("agents-bad");
    std::fs::write(
        dir.join("agents.toml"),
        "[agents.x]\nbackend = \"process\"\n",
    )
    .unwrap();
    let address = free_address().to_string();
    let mut dev = Process::spawn(
        "dev",
        &[
            "dev",
            "--listen",
            &address,
            "--data-dir",
            "data",
            "--agents",
            "agents.toml",
        ],
        &dir,
    );
    let status = dev.wait_exit(Duration::from_secs(15));
    assert!(!status.success());
    let log = dev.log();
    assert!(
        log.contains("agents.toml") && log.contains("program"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
