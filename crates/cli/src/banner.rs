//! What `switchyard dev` prints once it serves.

use std::io::Write;
use std::net::SocketAddr;

use switchyard_cli::DevCluster;

use super::StoreArgs;

pub(crate) fn print_banner(
    cluster: &DevCluster,
    store: &StoreArgs,
    keys_in_use: bool,
    metrics: Option<SocketAddr>,
) {
    let address = cluster.coordinator_address();
    let mut banner = format!(
        "switchyard dev is running\n  coordinator  {address}  (SessionService, AdminService, health, reflection)\n"
    );
    banner += if keys_in_use {
        "  callers      need an API key (authorization: Bearer <key>)\n"
    } else if address.ip().is_loopback() {
        "  callers      need no API key: this cluster listens on loopback only\n"
    } else {
        "  callers      need no API key (--insecure-no-auth): anyone who reaches it is every user\n"
    };
    for worker in cluster.live_workers() {
        banner += &format!("  worker       {}  {}\n", worker.address, worker.worker_id);
    }
    // The grpcurl flags that reach this listener: its CA for TLS, or plaintext.
    let transport = match cluster.tls_files() {
        Some(tls) => format!("-cacert {}", tls.ca.display()),
        None => "-plaintext".to_string(),
    };
    if let Some(tls) = cluster.tls_files() {
        banner += &format!(
            "  tls          on the listener, and mutual TLS between nodes; CA {}\n",
            tls.ca.display()
        );
    }
    if let Some(metrics) = metrics {
        banner +=
            &format!("  metrics      http://{metrics}/metrics  (every node, by its node label)\n");
    }
    banner += &format!(
        "  data dir     {}\n  store        {}\n\ntry:\n  grpcurl {transport} {address} list\n  \
         grpcurl {transport} -d '{{\"user_id\": \"alice\"}}' {address} switchyard.v1.SessionService/CreateSession\n\n\
         Ctrl-C stops it.\n",
        store.data_dir.display(),
        switchyard_cli::store::describe(store.store.as_deref(), &store.data_dir)
    );
    // A closed stdout must not stop the cluster.
    let _ = std::io::stdout().write_all(banner.as_bytes());
    let _ = std::io::stdout().flush();
}
