//! Memory before authentication is bounded: thousands of streams that announce large
//! messages and never send them cost the node little, and it keeps serving meanwhile.

use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;
use tokio::net::TcpStream;

use crate::harness::{free_address, start_dev, temp_dir};

const STREAMS: usize = 10_000;
/// Below the server's limit of 256 streams per connection.
const STREAMS_PER_CONNECTION: usize = 250;
/// What each stream says its message holds.
const ANNOUNCED_BYTES: u32 = 4 * 1024 * 1024;
/// The stated budget: resident memory may grow by at most this much under the attack.
const RSS_BUDGET_BYTES: u64 = 1024 * 1024 * 1024;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kilobytes: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kilobytes * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_streams_announcing_large_messages_cost_little() {
    let dir = temp_dir("half-open");
    let address = free_address().to_string();
    let dev = start_dev(&dir, &address, &[]);
    let url = format!("http://{address}");
    let client = SwitchyardClient::connect(url.clone()).await.unwrap();
    // Warm up, so the baseline holds what a serving node holds.
    let session = client.create_session("warm", [("k", "v")]).await.unwrap();
    let session_id = session.session.unwrap().session_id;
    client
        .send_message_collect(&session_id, "echo", "warm")
        .await
        .unwrap();
    let before = rss_bytes(dev.pid());

    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&ANNOUNCED_BYTES.to_be_bytes());
    let prefix = bytes::Bytes::from(prefix);
    let started = Instant::now();
    let mut held = Vec::with_capacity(STREAMS);
    let mut opened = 0;
    while opened < STREAMS {
        let tcp = TcpStream::connect(&address).await.unwrap();
        let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        for _ in 0..STREAMS_PER_CONNECTION.min(STREAMS - opened) {
            let mut sender = sender.clone().ready().await.unwrap();
            let request = http::Request::builder()
                .method("POST")
                .uri(format!(
                    "http://{address}/switchyard.v1.SessionService/AppendContext"
                ))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut stream) = sender.send_request(request, false).unwrap();
            stream.send_data(prefix.clone(), false).unwrap();
            held.push((response, stream));
            opened += 1;
        }
    }
    assert_eq!(held.len(), STREAMS);
    eprintln!(
        "opened {STREAMS} half-open streams in {:?}",
        started.elapsed()
    );

    // Past a lease (2 s): heartbeats went on, nobody was declared dead.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = AdminServiceClient::connect(url.clone())
        .await
        .unwrap()
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.live_workers, 3, "{status:?}");
    assert_eq!(status.dead_workers, 0, "{status:?}");
    assert!(status.serving);

    // Normal calls are served meanwhile.
    let served = Instant::now();
    let created = client.create_session("during", [("k", "v")]).await.unwrap();
    let during = created.session.unwrap().session_id;
    let reply = client
        .send_message_collect(&during, "echo", "still here")
        .await
        .unwrap();
    assert_eq!(reply.text, "echo: still here");
    assert_eq!(client.get_context(&during, 0, 0).await.unwrap().len(), 2);
    let after = rss_bytes(dev.pid());
    eprintln!(
        "RSS {} MiB before, {} MiB with {STREAMS} streams announcing {} MiB each; a normal session and turn took {:?}",
        before / (1024 * 1024),
        after / (1024 * 1024),
        ANNOUNCED_BYTES / (1024 * 1024),
        served.elapsed()
    );
    assert!(
        after.saturating_sub(before) < RSS_BUDGET_BYTES,
        "RSS grew from {before} to {after} bytes"
    );
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}
