//! Per-call metrics of every server: `switchyard_rpc_requests_total` and
//! `switchyard_rpc_duration_seconds`, by `service`, `method`, `code` and `node`.
//!
//! The code is the call's `grpc-status`: from the response headers when the call ended at
//! once (a refusal, an error), else from the trailers at the end of its body, so a stream
//! is measured to its end. A body dropped before its trailers (the caller left) counts as
//! CANCELLED. Unknown methods are counted under the method `unknown`, so a caller cannot
//! grow the label set.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::Code;
use tonic::body::Body;
use tower_service::Service;

/// Puts [`RpcMetrics`] in front of a server's routes, naming the node in every sample.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    node: Arc<str>,
}

impl RpcMetricsLayer {
    pub fn new(node: &str) -> Self {
        RpcMetricsLayer { node: node.into() }
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            node: self.node.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    node: Arc<str>,
}

/// What one call is counted under.
struct Call {
    service: String,
    method: String,
    node: Arc<str>,
    started: Instant,
}

impl Call {
    fn of(path: &str, node: Arc<str>) -> Call {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", "unknown"));
        let known = service.starts_with("switchyard.") || service.starts_with("grpc.");
        Call {
            service: if known { service } else { "unknown" }.to_string(),
            method: if known { method } else { "unknown" }.to_string(),
            node,
            started: Instant::now(),
        }
    }

    fn record(self, code: Code) {
        let method = if code == Code::Unimplemented {
            "unknown".to_string()
        } else {
            self.method
        };
        let labels = [
            ("service", self.service),
            ("method", method),
            ("code", format!("{code:?}")),
            ("node", self.node.to_string()),
        ];
        metrics::counter!("switchyard_rpc_requests_total", &labels).increment(1);
        metrics::histogram!("switchyard_rpc_duration_seconds", &labels)
            .record(self.started.elapsed().as_secs_f64());
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<i32>().ok())
        .map(Code::from_i32)
}

type ResponseFuture =
    Pin<Box<dyn std::future::Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> Service<http::Request<Body>> for RpcMetrics<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let call = Call::of(request.uri().path(), self.node.clone());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if let Some(code) = status_of(response.headers()) {
                call.record(code);
                return Ok(response);
            }
            Ok(response.map(|body| {
                Body::new(MeasuredBody {
                    inner: body,
                    call: Some(call),
                })
            }))
        })
    }
}

/// A response body that records its call when its trailers pass (or when it is dropped
/// before them).
struct MeasuredBody {
    inner: Body,
    call: Option<Call>,
}

impl Drop for MeasuredBody {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.record(Code::Cancelled);
        }
    }
}

impl HttpBody for MeasuredBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(context);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = self.call.take()
                {
                    call.record(status_of(trailers).unwrap_or(Code::Unknown));
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = self.call.take() {
                    call.record(Code::Ok);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = self.call.take() {
                    call.record(Code::Internal);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
