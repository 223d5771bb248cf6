//! OTLP/HTTP trace export (`[telemetry] otlp_endpoint`): one span per
//! request (`request`, with the request's W3C trace-id) and child spans
//! for the token and the KooDrive call, exported in batches through
//! `opentelemetry-otlp` and `tracing-opentelemetry`. Off by default; when
//! off, nothing is built and requests do no extra work.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId as OtelTraceId, TraceState,
    TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};

use crate::config::TelemetryConfig;
use crate::trace_id::TraceId;

/// The exporter pipeline, flushed by [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// Why export could not start.
#[derive(Debug, thiserror::Error)]
#[error("`telemetry.otlp_endpoint`: {0}")]
pub struct TelemetryError(String);

impl Telemetry {
    /// Starts export when the config asks for it.
    pub fn start(config: &TelemetryConfig) -> Result<Option<Telemetry>, TelemetryError> {
        let Some(url) = &config.otlp_traces_url else {
            return Ok(None);
        };
        let exporter = SpanExporter::builder()
            .with_http()
            .with_endpoint(url.clone())
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(env!("CARGO_PKG_NAME"))
                    .build(),
            )
            .build();
        Ok(Some(Telemetry { provider }))
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer(env!("CARGO_PKG_NAME")))
    }

    /// Exports what is buffered and stops.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "flushing spans at exit failed");
        }
    }
}

/// The `traceparent` of the current (exported) span, when there is one.
pub(crate) fn current_traceparent() -> Option<http::HeaderValue> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span = span.span_context();
    if !span.is_valid() {
        return None;
    }
    http::HeaderValue::from_str(&format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        span.trace_flags().to_u8()
    ))
    .ok()
}

/// Makes `span` part of the request's W3C trace: its parent is the
/// caller's span (from `traceparent`) or a root of the request's trace-id.
pub(crate) fn join_trace(span: &tracing::Span, trace_id: &TraceId) {
    let Ok(trace) = OtelTraceId::from_hex(trace_id.w3c_trace_id()) else {
        return;
    };
    let parent = trace_id
        .w3c_parent_span()
        .and_then(|hex| SpanId::from_hex(hex).ok())
        .unwrap_or_else(|| SpanId::from_bytes(rand::random::<u64>().max(1).to_be_bytes()));
    // The caller's sampling decision is kept (flags from `traceparent`).
    let context = SpanContext::new(
        trace,
        parent,
        TraceFlags::new(trace_id.w3c_flags()),
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(Context::new().with_remote_span_context(context));
}
