//! Encryption at rest across process lifetimes: `switchyard dev` seals with a KEK of its
//! own; a plaintext store of nodes without a KEK is sealed when they restart with one; and
//! `switchyard keys rotate-kek` moves every data key to a new KEK.

use std::path::Path;
use std::time::Duration;

use switchyard::SwitchyardClient;
use switchyard::pb;

use crate::harness::{
    BINARY, Process, free_address, spawn_coordinator_at, spawn_worker, start_dev, temp_dir,
    wait_for_workers,
};

fn files_hold(dir: &Path, needle: &str) -> bool {
    std::fs::read_dir(dir).unwrap().any(|entry| {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        bytes
            .windows(needle.len())
            .any(|window| window == needle.as_bytes())
    })
}

fn text(content: &str) -> pb::Message {
    pb::Message {
        role: "user".into(),
        content: content.into(),
        name: String::new(),
    }
}

/// A coordinator and one worker on the SQLite file `store`, with `extra` flags each.
async fn nodes(dir: &Path, store: &str, extra: &[&str]) -> (Process, Process, String) {
    let listen = free_address().to_string();
    let url = format!("http://{listen}");
    let mut args = vec!["--store", store];
    args.extend_from_slice(extra);
    let coordinator = spawn_coordinator_at(dir, &listen, &args);
    let worker = spawn_worker(dir, &url, "worker-a", &args);
    wait_for_workers(&url, 1).await;
    (coordinator, worker, url)
}

fn stop(mut process: Process) {
    process.signal("TERM");
    assert!(
        process.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        process.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_seals_with_a_kek_of_its_own() {
    let dir = temp_dir("dev-sealed");
    let address = free_address().to_string();
    let mut dev = start_dev(&dir, &address, &[]);
    let client = SwitchyardClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let session = client
        .create_session("sealed-dev", [("note", "dev-metadata-plaintext")])
        .await
        .unwrap()
        .session
        .unwrap()
        .session_id;
    client
        .append_context(&session, vec![text("dev-content-plaintext")])
        .await
        .unwrap();
    let reply = client
        .send_message_collect(&session, "echo", "dev-turn-plaintext")
        .await
        .unwrap();
    assert_eq!(reply.text, "echo: dev-turn-plaintext");
    dev.signal("TERM");
    assert!(
        dev.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        dev.log()
    );
    let data = dir.join("data");
    assert!(data.join("kek.key").exists());
    for plaintext in [
        "dev-metadata-plaintext",
        "dev-content-plaintext",
        "dev-turn-plaintext",
    ] {
        assert!(
            !files_hold(&data, plaintext),
            "the data dir holds {plaintext:?}"
        );
    }
    assert!(dev.log().contains("session store ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_store_is_sealed_on_restart_and_its_kek_rotates() {
    let dir = temp_dir("upgrade-sealed");
    let store = format!("sqlite://{}?mode=rwc", dir.join("store.db").display());
    // The previous version: no KEK, plaintext on disk.
    let (coordinator, worker, url) = nodes(&dir, &store, &[]).await;
    let client = SwitchyardClient::connect(url).await.unwrap();
    let session = client
        .create_session("upgraded", [("note", "old-metadata-plaintext")])
        .await
        .unwrap()
        .session
        .unwrap()
        .session_id;
    client
        .append_context(&session, vec![text("old-content-plaintext")])
        .await
        .unwrap();
    let token = client.token(&session).unwrap();
    assert!(
        worker.log().contains("stored in plaintext"),
        "{}",
        worker.log()
    );
    stop(worker);
    stop(coordinator);
    assert!(files_hold(&dir, "old-content-plaintext"), "the control");

    // Restarted with a KEK: the store is sealed as it opens, and reads as before.
    let first = dir.join("first.kek");
    std::fs::write(&first, "the first key-encryption key of this cluster!!").unwrap();
    let first = first.to_str().unwrap().to_string();
    let (coordinator, worker, url) = nodes(&dir, &store, &["--kek-file", &first]).await;
    let client = SwitchyardClient::connect(url).await.unwrap();
    client.set_token(session.clone(), token.clone());
    let context = client.get_context(&session, 0, 0).await.unwrap();
    assert_eq!(context[0].content, "old-content-plaintext");
    stop(worker);
    stop(coordinator);
    for plaintext in ["old-metadata-plaintext", "old-content-plaintext"] {
        assert!(
            !files_hold(&dir, plaintext),
            "the files still hold {plaintext:?}"
        );
    }

    // A new KEK: every data key re-wrapped, then the first KEK retired.
    let second = dir.join("second.kek");
    std::fs::write(&second, "the second key-encryption key of this cluster!").unwrap();
    let second = second.to_str().unwrap().to_string();
    let rotated = std::process::Command::new(BINARY)
        .args([
            "keys",
            "rotate-kek",
            "--store",
            &store,
            "--kek-file",
            &second,
            "--kek-file",
            &first,
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&rotated.stdout);
    assert!(
        rotated.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    assert!(said.contains("re-wrapped 1 of 1 data keys"), "{said}");
    let (coordinator, worker, url) = nodes(&dir, &store, &["--kek-file", &second]).await;
    let client = SwitchyardClient::connect(url).await.unwrap();
    client.set_token(session.clone(), token);
    let context = client.get_context(&session, 0, 0).await.unwrap();
    assert_eq!(context[0].content, "old-content-plaintext");
    stop(worker);
    stop(coordinator);
}
