//! An OTLP/gRPC trace collector that counts the spans it receives and drops them: what the
//! `--otlp-endpoint` benchmark (BENCHMARKS.md, command MB) exports to.
//!
//! `cargo run --release --example otlp_sink -- 127.0.0.1:4317`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|resource| &resource.scope_spans)
            .map(|scope| scope.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".to_string())
        .parse()?;
    let sink = Sink::default();
    let spans = sink.spans.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            eprintln!("{} spans received", spans.load(Ordering::Relaxed));
        }
    });
    eprintln!("OTLP sink on {address}");
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve(address)
        .await?;
    Ok(())
}
