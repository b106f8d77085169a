//! Per-call metrics of every server: `switchyard_rpc_requests_total` and
//! `switchyard_rpc_duration_seconds`, by `service`, `method`, `code` and `node`; the
//! call's W3C trace context (kept from the caller's `traceparent`, or started here on the
//! coordinator, and passed on to the worker); and, with `--access-log`, one log line per
//! call (target `switchyard::access`) with its method, code, duration and trace id.
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

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// How a server treats calls beyond counting them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallLog {
    /// Start a trace for a call that comes without one (the entry point: the coordinator).
    pub start_traces: bool,
    /// Write one line per call.
    pub access_log: bool,
}

/// Puts [`RpcMetrics`] in front of a server's routes, naming the node in every sample.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    node: Arc<str>,
    log: CallLog,
    series: Arc<Series>,
}

impl RpcMetricsLayer {
    pub fn new(node: &str, log: CallLog) -> Self {
        RpcMetricsLayer {
            node: node.into(),
            log,
            series: Arc::default(),
        }
    }
}

/// Most distinct (path, code) series kept; past it, calls are counted through the
/// recorder's own lookup (a path is checked against the known services first, so this is
/// only reached by many distinct methods of a known service, all refused).
const MAX_SERIES: usize = 4096;

/// The counter and histogram of each (path, code) this server has seen, so a call costs
/// two increments, not a label set built and looked up per call.
#[derive(Default)]
struct Series {
    handles: std::sync::RwLock<std::collections::HashMap<String, Vec<(Code, Handles)>>>,
}

type Handles = (metrics::Counter, metrics::Histogram);

impl Series {
    fn handles(
        &self,
        path: &str,
        code: Code,
        labels: impl FnOnce() -> [(&'static str, String); 4],
    ) -> Handles {
        if let Some(found) = self
            .handles
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(path)
            .and_then(|codes| codes.iter().find(|(known, _)| *known == code))
        {
            return found.1.clone();
        }
        let labels = labels();
        let made = (
            metrics::counter!("switchyard_rpc_requests_total", &labels),
            metrics::histogram!("switchyard_rpc_duration_seconds", &labels),
        );
        let mut handles = self
            .handles
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if handles.len() < MAX_SERIES || handles.contains_key(path) {
            handles
                .entry(path.to_string())
                .or_default()
                .push((code, made.clone()));
        }
        made
    }
}

/// The trace id of a valid `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |part: &str, len: usize| {
        part.len() == len && part.bytes().all(|byte| byte.is_ascii_hexdigit())
    };
    (hex(version, 2)
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace != "0".repeat(32))
    .then_some(trace)
}

/// The tracer of exported spans, once [`export_spans`] is called.
static EXPORTED_SPANS: std::sync::OnceLock<opentelemetry::global::BoxedTracer> =
    std::sync::OnceLock::new();

/// From now on every call (of every server in the process) opens a span on `tracer`, a
/// child of its caller's span, ended when the call ends. Whether a trace is kept is the
/// tracer's sampler's to say, at the start of the span.
pub fn export_spans(tracer: opentelemetry::global::BoxedTracer) {
    let _ = EXPORTED_SPANS.set(tracer);
}

fn start_exported_span(
    tracer: &opentelemetry::global::BoxedTracer,
    path: &str,
    parent: &opentelemetry::Context,
) -> opentelemetry::global::BoxedSpan {
    use opentelemetry::trace::{SpanKind, Tracer as _};
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("unknown", "unknown"));
    tracer
        .span_builder(path.to_string())
        .with_kind(SpanKind::Server)
        .with_attributes([
            opentelemetry::KeyValue::new("rpc.system", "grpc"),
            opentelemetry::KeyValue::new("rpc.service", service.to_string()),
            opentelemetry::KeyValue::new("rpc.method", method.to_string()),
        ])
        .start_with_context(tracer, parent)
}

/// The codes OpenTelemetry counts as a server's errors.
fn server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// The caller's span of a valid `traceparent`, as an OpenTelemetry parent context.
fn remote_parent(traceparent: &str) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    let trace = trace_id_of(traceparent)?;
    let mut parts = traceparent.split('-').skip(2);
    let span = SpanId::from_hex(parts.next()?).ok()?;
    let flags = u8::from_str_radix(parts.next()?, 16).ok()?;
    let context = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        span,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    Some(opentelemetry::Context::new().with_remote_span_context(context))
}

/// A new trace context: random trace and span ids, sampled.
fn new_traceparent() -> String {
    let trace: u128 = rand::random();
    let span: u64 = rand::random();
    format!("00-{:032x}-{:016x}-01", trace.max(1), span.max(1))
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            node: self.node.clone(),
            log: self.log,
            series: self.series.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    node: Arc<str>,
    log: CallLog,
    series: Arc<Series>,
}

/// What one call is counted under.
struct Call {
    uri: http::Uri,
    node: Arc<str>,
    series: Arc<Series>,
    started: Instant,
    trace_id: Option<String>,
    access_log: bool,
    /// The call's span, when spans are exported and its trace is sampled.
    exported: Option<opentelemetry::global::BoxedSpan>,
}

impl Call {
    /// Its labels: service and method (`unknown` for what is not a known service, or a
    /// method it does not have), code and node.
    fn labels(&self, code: Code) -> [(&'static str, String); 4] {
        let (service, method) = self
            .uri
            .path()
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", "unknown"));
        let known = service.starts_with("switchyard.") || service.starts_with("grpc.");
        let service = if known { service } else { "unknown" };
        let method = if known && code != Code::Unimplemented {
            method
        } else {
            "unknown"
        };
        [
            ("service", service.to_string()),
            ("method", method.to_string()),
            ("code", format!("{code:?}")),
            ("node", self.node.to_string()),
        ]
    }

    fn record(mut self, code: Code) {
        let took = self.started.elapsed();
        if let Some(mut span) = self.exported.take() {
            use opentelemetry::trace::Span as _;
            span.set_attribute(opentelemetry::KeyValue::new(
                "rpc.grpc.status_code",
                code as i64,
            ));
            span.set_attribute(opentelemetry::KeyValue::new(
                "switchyard.node",
                self.node.to_string(),
            ));
            if server_error(code) {
                span.set_status(opentelemetry::trace::Status::error(format!("{code:?}")));
            }
            span.end();
        }
        let (requests, duration) = self
            .series
            .handles(self.uri.path(), code, || self.labels(code));
        requests.increment(1);
        duration.record(took.as_secs_f64());
        if self.access_log {
            let [(_, service), (_, method), (_, code), (_, node)] = self.labels(code);
            tracing::info!(
                target: "switchyard::access",
                service = service.as_str(),
                method = method.as_str(),
                code = code.as_str(),
                node = node.as_str(),
                duration_ms = took.as_secs_f64() * 1000.0,
                trace_id = self.trace_id.as_deref().unwrap_or(""),
                "call"
            );
        }
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

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let mut traceparent = request
            .headers()
            .get(TRACEPARENT)
            .and_then(|value| value.to_str().ok())
            .filter(|value| trace_id_of(value).is_some())
            .map(str::to_string);
        if traceparent.is_none() && self.log.start_traces {
            let started = new_traceparent();
            if let Ok(value) = http::HeaderValue::from_str(&started) {
                request.headers_mut().insert(TRACEPARENT, value);
            }
            traceparent = Some(started);
        }
        let trace_id = traceparent
            .as_deref()
            .and_then(trace_id_of)
            .map(str::to_string);
        // Whatever the call logs, and what it starts, carries its trace id.
        let span = match &trace_id {
            Some(trace_id) => tracing::info_span!("rpc", trace_id = trace_id.as_str()),
            None => tracing::Span::none(),
        };
        // Exported over OTLP (with --otlp-endpoint): a server span, child of the caller's.
        let exported = EXPORTED_SPANS.get().and_then(|tracer| {
            let parent = traceparent.as_deref().and_then(remote_parent)?;
            Some(start_exported_span(tracer, request.uri().path(), &parent))
        });
        let call = Call {
            uri: request.uri().clone(),
            node: self.node.clone(),
            series: self.series.clone(),
            started: Instant::now(),
            trace_id,
            access_log: self.log.access_log,
            exported,
        };
        let response = span.in_scope(|| self.inner.call(request));
        Box::pin(tracing::Instrument::instrument(
            async move {
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
            },
            span,
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_contexts_are_read_and_made_as_w3c_says() {
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad:?}");
        }
        let made = new_traceparent();
        assert!(trace_id_of(&made).is_some(), "{made}");
        assert_ne!(new_traceparent(), made);
    }
}
