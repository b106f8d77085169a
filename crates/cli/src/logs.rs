//! Log lines: human text, or one JSON object per line (`--log-format json`) that carries the
//! `trace_id` of the call it was written in.
//!
//! Every node serves each call inside an `rpc` span holding the call's trace id (see
//! `switchyard_server::metrics`); [`TraceIds`] keeps that id with the span, and the JSON
//! lines put it beside the event's own fields.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// The trace id of a span that names one.
struct TraceId(String);

/// Keeps the `trace_id` field of each new span in the span's extensions.
pub struct TraceIds;

struct TraceIdField(Option<String>);

impl Visit for TraceIdField {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "trace_id" && !value.is_empty() {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "trace_id" {
            let text = format!("{value:?}");
            let text = text.trim_matches('"');
            if !text.is_empty() {
                self.0 = Some(text.to_string());
            }
        }
    }
}

impl<S> Layer<S> for TraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, context: Context<'_, S>) {
        let mut field = TraceIdField(None);
        attributes.record(&mut field);
        if let (Some(trace_id), Some(span)) = (field.0, context.span(id)) {
            span.extensions_mut().insert(TraceId(trace_id));
        }
    }
}

/// An event's fields as JSON values.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_string(), value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}").into());
    }
}

/// One JSON object per event: `timestamp`, `level`, `target`, the event's fields (its
/// message as `message`), and the `trace_id` of the call it belongs to, if any.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        event.record(&mut JsonFields(&mut line));
        if !line.contains_key("trace_id")
            && let Some(scope) = context.event_scope()
        {
            for span in scope {
                if let Some(TraceId(trace_id)) = span.extensions().get::<TraceId>() {
                    line.insert("trace_id".into(), trace_id.clone().into());
                    break;
                }
            }
        }
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

/// What [`init`] set up that must be flushed before the process exits.
pub struct Logging {
    spans: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Logging {
    /// Exports the spans still buffered (with `--otlp-endpoint`), waiting for them.
    pub fn shutdown(self) {
        if let Some(spans) = self.spans
            && let Err(error) = spans.shutdown()
        {
            eprintln!("warning: spans not all exported: {error}");
        }
    }
}

/// Logs to stderr at `default_level` unless `RUST_LOG` says otherwise, as text or as JSON
/// lines; with `otlp_endpoint`, also exports the span of every call whose trace is in the
/// `sample_ratio` kept, over OTLP (gRPC), as `service_name`. Call it inside the tokio runtime: the exporter's channel lives there.
pub fn init(
    default_level: &str,
    json: bool,
    otlp_endpoint: Option<&str>,
    sample_ratio: f64,
    service_name: &str,
) -> Result<Logging, String> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let spans = match otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|error| format!("--otlp-endpoint {endpoint}: {error}"))?;
            if !(0.0..=1.0).contains(&sample_ratio) {
                return Err(format!(
                    "--otlp-sample-ratio {sample_ratio}: must be between 0 and 1"
                ));
            }
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                // By trace id: every node keeps, or drops, the same traces.
                .with_sampler(opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(
                    sample_ratio,
                ))
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service_name.to_string())
                        .build(),
                )
                .build();
            switchyard_server::metrics::export_spans(opentelemetry::global::BoxedTracer::new(
                Box::new(provider.tracer("switchyard")),
            ));
            Some(provider)
        }
    };
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(TraceIds)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .event_format(JsonLines),
            )
            .init();
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init();
    }
    Ok(Logging { spans })
}
