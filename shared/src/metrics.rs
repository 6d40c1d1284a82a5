//! What the API's and the workers' Prometheus metrics have in common: a
//! registry per process (or per test app), filled at start-up and rendered in
//! the text exposition format by the process's own `/metrics` route.

use prometheus::core::Collector;
use prometheus::{Encoder as _, Registry, TextEncoder};

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `metric`, registered in `registry`. Definitions are static and their
/// names distinct, so this fails only if the code defining them is wrong,
/// which every test that starts the process would show.
pub fn registered<T: Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<T>) -> T {
    let metric = metric.expect("a valid metric definition");
    registry.register(Box::new(metric.clone())).expect("a metric name registered once");
    metric
}

/// Everything in `registry`, in Prometheus' text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut text = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut text) {
        tracing::warn!(error = %e, "could not render metrics");
    }
    String::from_utf8(text).unwrap_or_default()
}
