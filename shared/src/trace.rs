//! W3C Trace Context (`traceparent`, <https://www.w3.org/TR/trace-context/>)
//! across the queue: the API continues the client's trace (or starts one),
//! stores its own span's `traceparent` with the job and carries it in the
//! message's headers; the worker's span for the job is a child of it. So one
//! trace id follows a job from the HTTP request to its outcome, in the logs
//! of every process it passed through.

use std::fmt;

/// One span's place in a trace: `00-<trace id>-<span id>-<flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

/// The AMQP header (and HTTP header) that carries it.
pub const HEADER: &str = "traceparent";

/// `sampled`: the caller may record this trace.
const SAMPLED: u8 = 0x01;

/// Whether a stored `traceparent` is of a sampled trace.
pub fn is_sampled(traceparent: &str) -> bool {
    TraceParent::parse(traceparent).is_some_and(|tp| tp.sampled())
}

impl TraceParent {
    /// A new trace, of which this is the root span. Not sampled: nothing
    /// here records spans, so nobody will have this trace but the logs.
    pub fn root() -> Self {
        Self { trace_id: nonzero(), span_id: nonzero(), flags: 0 }
    }

    /// A new trace that this process records (`sampled`): when it exports spans.
    pub fn sampled_root() -> Self {
        Self { flags: SAMPLED, ..Self::root() }
    }

    /// The trace id and span id as numbers (for exporters).
    pub fn ids(&self) -> (u128, u64) {
        (self.trace_id, self.span_id)
    }

    /// Whether the trace's `sampled` flag is set: someone upstream records it.
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// A span of the same trace whose parent is `self`.
    pub fn child(&self) -> Self {
        Self { span_id: nonzero(), ..*self }
    }

    /// Reads a `traceparent` header value. `None` for anything the
    /// specification says to ignore (then a new trace is started): wrong
    /// length or case, an all-zero id, version `ff`. A later version is read
    /// by its first four fields, as the specification asks.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim_matches([' ', '\t']);
        let bytes = value.as_bytes();
        if bytes.len() < 55 || (bytes.len() > 55 && (value.starts_with("00") || bytes[55] != b'-')) {
            return None;
        }
        let field = |from: usize, to: usize| -> Option<&str> {
            let text = value.get(from..to)?;
            text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)).then_some(text)
        };
        let version = field(0, 2)?;
        if version == "ff" || [bytes[2], bytes[35], bytes[52]] != [b'-'; 3] {
            return None;
        }
        let trace_id = u128::from_str_radix(field(3, 35)?, 16).ok().filter(|&id| id != 0)?;
        let span_id = u64::from_str_radix(field(36, 52)?, 16).ok().filter(|&id| id != 0)?;
        let flags = u8::from_str_radix(field(53, 55)?, 16).ok()?;
        Some(Self { trace_id, span_id, flags })
    }

    /// The client's trace continued by a new span (with the client's span),
    /// or a new trace, sampled when this process records spans.
    pub fn continue_or_start(header: Option<&str>, recording: bool) -> (Self, Option<Self>) {
        match header.and_then(Self::parse) {
            Some(parent) => (parent.child(), Some(parent)),
            None if recording => (Self::sampled_root(), None),
            None => (Self::root(), None),
        }
    }

    /// 32 lower-case hex digits: what log lines carry as `trace_id`.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// 16 lower-case hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

/// A random id that is not zero (zero means "invalid" to every reader).
fn nonzero<T: Default + PartialEq>() -> T
where
    rand::distr::StandardUniform: rand::distr::Distribution<T>,
{
    loop {
        let id: T = rand::random();
        if id != T::default() {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_and_writes_the_specifications_example() {
        let parent = TraceParent::parse(EXAMPLE).expect("the example is valid");
        assert_eq!(parent.to_string(), EXAMPLE);
        assert_eq!(parent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.span_id(), "00f067aa0ba902b7");
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span() {
        let parent = TraceParent::parse(EXAMPLE).expect("valid");
        let child = parent.child();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.span_id(), parent.span_id());
        assert!(child.to_string().ends_with("-01"));
        assert!(child.sampled());
        let root = TraceParent::root();
        assert_ne!(root.trace_id(), parent.trace_id());
        assert!(!root.sampled() && root.to_string().ends_with("-00"), "nobody records a trace started here");
        assert_eq!(TraceParent::parse(&root.to_string()), Some(root));
    }

    #[test]
    fn what_the_specification_says_to_ignore_is_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version is read by its first four fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        assert_eq!(
            TraceParent::parse(later).map(|p| p.trace_id()).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let (started, parent) = TraceParent::continue_or_start(Some("garbage"), false);
        assert!(parent.is_none() && !started.sampled());
        assert!(TraceParent::continue_or_start(None, true).0.sampled(), "recorded here, so sampled");
    }
}
