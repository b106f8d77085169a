//! The Prometheus endpoint: the `metrics` crate's recorder and its exporter, one per
//! process (`switchyard dev`'s nodes share it, each sample naming its node).

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Histogram buckets of every `*_seconds` family: 0.5 ms to 60 s.
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Buckets of `switchyard_store_batch_size`.
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Installs the recorder and serves GET /metrics on `address`.
pub fn serve(address: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Full("switchyard_store_batch_size".into()), BATCH)?
        .install()
}
