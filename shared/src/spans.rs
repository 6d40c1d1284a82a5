//! Export of finished spans to an OpenTelemetry collector over OTLP/HTTP
//! (`telemetry.otlp_endpoint`; the cargo feature `otlp`). The API records a
//! span per request and the worker one per job attempt, with the ids their
//! W3C `traceparent`s already fixed (see [`crate::trace`]), so the spans in
//! the collector and the trace ids in the logs are the same trace.
//!
//! Spans are queued in memory (at most [`QUEUE`]; beyond that they are
//! dropped and counted in a warning, never waited for) and sent in batches
//! by one task, at most a second after they ended. Without the feature, or
//! with no endpoint, [`Spans`] records nothing and costs nothing.

use std::time::SystemTime;

use crate::trace::TraceParent;

/// What a span was: the server side of an HTTP request, or a consumer's work on a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Consumer,
}

/// A span that has ended, ready to export.
#[derive(Debug, Clone)]
pub struct Finished {
    pub name: String,
    pub kind: Kind,
    /// The span's own place in its trace.
    pub span: TraceParent,
    /// Its parent's, when it has one.
    pub parent: Option<TraceParent>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Attribute)>,
    /// An error description when the span's work failed.
    pub error: Option<String>,
}

/// An attribute's value.
#[derive(Debug, Clone)]
pub enum Attribute {
    Text(String),
    Int(i64),
}

/// Spans queued for export at most; more are dropped.
pub const QUEUE: usize = 8192;

/// Where finished spans go: a collector, or nowhere.
#[derive(Clone, Default)]
pub struct Spans {
    #[cfg(feature = "otlp")]
    sender: Option<tokio::sync::mpsc::Sender<Finished>>,
}

impl Spans {
    /// Nowhere.
    pub fn off() -> Self {
        Self::default()
    }

    /// Whether spans are exported: then the traces this process starts are
    /// sampled, and worth recording.
    pub fn recording(&self) -> bool {
        #[cfg(feature = "otlp")]
        return self.sender.is_some();
        #[cfg(not(feature = "otlp"))]
        false
    }

    /// Queues `span` for export when its trace is sampled (nobody records the
    /// others). Never waits.
    pub fn record(&self, span: Finished) {
        #[cfg(feature = "otlp")]
        if let Some(sender) = &self.sender
            && span.span.sampled()
        {
            otlp::queue(sender, span);
        }
        #[cfg(not(feature = "otlp"))]
        let _ = span;
    }
}

/// Starts exporting to `endpoint` (nothing when it is empty) as `service`,
/// on `tasks`, until `stop`; what is queued then is sent before the task ends.
#[cfg(feature = "otlp")]
pub fn start(
    endpoint: &str,
    service: &'static str,
    tasks: &tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
) -> Spans {
    if endpoint.is_empty() {
        return Spans::off();
    }
    match otlp::spawn(endpoint, service, tasks, stop) {
        Ok(sender) => {
            tracing::info!(%endpoint, "exporting spans over OTLP");
            Spans { sender: Some(sender) }
        }
        Err(e) => {
            tracing::error!(%endpoint, error = %e, "telemetry.otlp_endpoint is not usable; no spans are exported");
            Spans::off()
        }
    }
}

/// Starts exporting spans: this build cannot (no cargo feature `otlp`), so
/// an endpoint is answered with an error line and nothing is exported.
#[cfg(not(feature = "otlp"))]
pub fn start(
    endpoint: &str,
    _service: &'static str,
    _tasks: &tokio_util::task::TaskTracker,
    _stop: tokio_util::sync::CancellationToken,
) -> Spans {
    if !endpoint.is_empty() {
        tracing::error!(
            %endpoint,
            "telemetry.otlp_endpoint is set but this build exports no spans: rebuild with \
             `cargo build --release --features api/otlp,worker/otlp`, or unset the endpoint"
        );
    }
    Spans::off()
}

#[cfg(feature = "otlp")]
mod otlp {
    use std::borrow::Cow;
    use std::time::Duration;

    use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
    use opentelemetry::{InstrumentationScope, KeyValue};
    use opentelemetry_otlp::{Protocol, WithExportConfig as _};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::{Attribute, Finished, Kind, QUEUE};

    /// Spans sent in one request at most.
    const BATCH: usize = 512;
    /// Longest a span waits to be sent.
    const LINGER: Duration = Duration::from_secs(1);
    /// Longest one export may take.
    const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

    pub(super) fn queue(sender: &mpsc::Sender<Finished>, span: Finished) {
        use std::sync::atomic::{AtomicU64, Ordering};
        static DROPPED: AtomicU64 = AtomicU64::new(0);
        if sender.try_send(span).is_err() {
            let dropped = DROPPED.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "the span export queue is full (the collector is slow or down); spans dropped");
            }
        }
    }

    pub(super) fn spawn(
        endpoint: &str,
        service: &'static str,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> anyhow::Result<mpsc::Sender<Finished>> {
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()?;
        exporter.set_resource(&Resource::builder_empty().with_service_name(service).build());
        let scope = InstrumentationScope::builder("conveyor").with_version(env!("CARGO_PKG_VERSION")).build();
        let (sender, mut receiver) = mpsc::channel::<Finished>(QUEUE);
        tasks.spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            loop {
                let first = tokio::select! {
                    span = receiver.recv() => span,
                    () = stop.cancelled() => { receiver.close(); receiver.recv().await }
                };
                let Some(first) = first else { break };
                batch.push(data(first, &scope));
                let deadline = tokio::time::Instant::now() + LINGER;
                while batch.len() < BATCH {
                    match tokio::time::timeout_at(deadline, receiver.recv()).await {
                        Ok(Some(span)) => batch.push(data(span, &scope)),
                        Ok(None) | Err(_) => break,
                    }
                }
                let spans = batch.len();
                if let Err(e) = exporter.export(std::mem::take(&mut batch)).await {
                    tracing::warn!(spans, error = %e, "could not export spans; they are dropped");
                }
            }
            let _ = exporter.shutdown();
        });
        Ok(sender)
    }

    fn data(span: Finished, scope: &InstrumentationScope) -> SpanData {
        let (trace_id, span_id) = span.span.ids();
        let flags = if span.span.sampled() { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let attributes = span
            .attributes
            .into_iter()
            .map(|(key, value)| match value {
                Attribute::Text(text) => KeyValue::new(key, text),
                Attribute::Int(n) => KeyValue::new(key, n),
            })
            .collect();
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(trace_id),
                SpanId::from(span_id),
                flags,
                false,
                TraceState::default(),
            ),
            parent_span_id: span.parent.map_or(SpanId::INVALID, |parent| SpanId::from(parent.ids().1)),
            parent_span_is_remote: span.parent.is_some(),
            span_kind: match span.kind {
                Kind::Server => SpanKind::Server,
                Kind::Consumer => SpanKind::Consumer,
            },
            name: Cow::Owned(span.name),
            start_time: span.start,
            end_time: span.end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: span.error.map_or(Status::Unset, Status::error),
            instrumentation_scope: scope.clone(),
        }
    }
}
