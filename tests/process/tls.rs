//! `switchyard dev --tls`: TLS on the listener (grpcurl with -cacert), mutual TLS between
//! the nodes, plaintext refused cleanly, and certificates re-read when they change.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;
use tonic::Code;

use crate::harness::{free_address, grpcurl, run_grpcurl, start_dev, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_tls_serves_tls_outside_and_mutual_tls_inside() {
    let dir = temp_dir("tls");
    let address = free_address().to_string();
    let dev = start_dev(&dir, &address, &["--tls"]);
    let data = dir.join("data");
    let ca = data.join("tls").join("ca.pem");
    assert!(
        ca.exists(),
        "dev --tls wrote no CA; its log:\n{}",
        dev.log()
    );
    let url = format!("https://{address}");

    // The SDK over TLS, through mutual TLS to the workers.
    let client = SwitchyardClient::connect_tls(url.clone(), &ca)
        .await
        .unwrap();
    let created = client
        .create_session("tls-user", [("k", "v")])
        .await
        .unwrap();
    let session_id = created.session.unwrap().session_id;
    let reply = client
        .send_message_collect(&session_id, "echo", "over tls")
        .await
        .unwrap();
    assert_eq!(reply.text, "echo: over tls");

    if let Some(grpcurl) = grpcurl() {
        let ca = ca.to_str().unwrap();
        let listed = run_grpcurl(grpcurl, &["-cacert", ca, &address, "list"]);
        assert!(listed.contains("switchyard.v1.SessionService"), "{listed}");
        let created = run_grpcurl(
            grpcurl,
            &[
                "-cacert",
                ca,
                "-d",
                r#"{"user_id": "grpcurl-tls"}"#,
                &address,
                "switchyard.v1.SessionService/CreateSession",
            ],
        );
        assert!(created.contains("sessionId"), "{created}");
    }

    // A plaintext client is refused cleanly, and the server says why in one line.
    if let Ok(plaintext) = SwitchyardClient::connect(format!("http://{address}")).await {
        let status = plaintext
            .create_session("plain", [("k", "v")])
            .await
            .expect_err("a plaintext client was served");
        eprintln!(
            "a plaintext client got {:?}: {}",
            status.code(),
            status.message()
        );
    }
    assert!(client.list_sessions("plain").await.unwrap().is_empty());
    let started = Instant::now();
    while !dev.log().contains("TLS handshake failed") {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no log line: {}",
            dev.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A worker asks for the cluster's client certificate: a caller with the CA alone is
    // refused at the handshake.
    let mut admin = AdminServiceClient::new(
        switchyard::tls::lazy_channel(
            &url,
            Some(
                switchyard::tls::ClientTlsFiles {
                    ca: ca.clone(),
                    identity: None,
                }
                .load()
                .unwrap(),
            ),
            |endpoint| endpoint,
        )
        .unwrap(),
    );
    let workers = admin
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 3);
    let direct = SwitchyardClient::connect_tls(format!("https://{}", workers[0].address), &ca)
        .await
        .unwrap();
    let status = direct
        .create_session("direct", [("k", "v")])
        .await
        .unwrap_err();
    assert_transport_refusal(&status);
    assert!(client.list_sessions("direct").await.unwrap().is_empty());

    // New certificates (a new CA, as a rotation that replaces everything would bring):
    // the nodes take them up without a restart, and clients of the new CA are served.
    let old_ca = data.join("old-ca.pem");
    std::fs::copy(&ca, &old_ca).unwrap();
    let rotated = switchyard_cli::tls::load_or_create(&data, IpAddr::from([10, 9, 8, 7])).unwrap();
    assert_ne!(
        std::fs::read(&rotated.ca).unwrap(),
        std::fs::read(&old_ca).unwrap()
    );
    let started = Instant::now();
    loop {
        let renewed = SwitchyardClient::connect_tls(url.clone(), &rotated.ca)
            .await
            .unwrap();
        let served = match renewed.create_session("after-rotation", [("k", "v")]).await {
            Ok(created) => {
                let session_id = created.session.unwrap().session_id;
                renewed
                    .send_message_collect(&session_id, "echo", "rotated")
                    .await
                    .is_ok()
            }
            Err(_) => false,
        };
        if served {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the rotated certificates were never served; log:\n{}",
            dev.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // New connections no longer trust the old CA.
    let stale = SwitchyardClient::connect_tls(url.clone(), &old_ca)
        .await
        .unwrap();
    let status = stale
        .create_session("stale", [("k", "v")])
        .await
        .unwrap_err();
    assert_transport_refusal(&status);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A call refused at the TLS handshake: the client reports a transport failure, whose code
/// depends on when the connection broke (tonic maps it to one of these).
fn assert_transport_refusal(status: &tonic::Status) {
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
        ),
        "not a transport refusal: {status:?}"
    );
}
