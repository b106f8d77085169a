//! `--otlp-endpoint`: every call's span reaches an OpenTelemetry collector over OTLP/gRPC
//! (one started here), in the caller's trace, from the coordinator and the worker alike.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use switchyard::pb;
use switchyard::pb::session_service_client::SessionServiceClient;
use tonic::{Request, Response, Status};

use crate::harness::{free_address, start_dev, temp_dir};

const TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";

/// A span as the collector got it: trace id (hex), name, and its service's name.
#[derive(Debug, Clone)]
struct Received {
    trace_id: String,
    parent_span_id: String,
    name: String,
    service: String,
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| attribute.value.as_ref())
                .map(|value| format!("{:?}", value.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        trace_id: hex(&span.trace_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                        service: service.clone(),
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_in_the_callers_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_address = listener.local_addr().unwrap();
    let serving = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(serving))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let dir = temp_dir("otlp");
    let address = free_address().to_string();
    let endpoint = format!("http://{collector_address}");
    let mut dev = start_dev(&dir, &address, &["--otlp-endpoint", &endpoint]);
    let mut client = SessionServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let mut traced = Request::new(pb::CreateSessionRequest {
        user_id: "exported".into(),
        ..Default::default()
    });
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    client.create_session(traced).await.unwrap();

    // A clean stop exports what is still buffered.
    dev.signal("TERM");
    assert!(
        dev.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        dev.log()
    );
    let spans = collector.spans.lock().unwrap().clone();
    let traced: Vec<&Received> = spans.iter().filter(|span| span.trace_id == TRACE).collect();
    // The coordinator's span and the worker's, both children of the caller's span.
    assert_eq!(traced.len(), 2, "{spans:?}");
    for span in &traced {
        assert_eq!(span.name, "/switchyard.v1.SessionService/CreateSession");
        assert_eq!(span.parent_span_id, "00f067aa0ba902b7");
        assert!(span.service.contains("switchyard-dev"), "{span:?}");
    }
}
