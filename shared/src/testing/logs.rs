//! A child process's JSON log lines, kept as they arrive, for tests that
//! assert what a process said (a warning, a trace id, a request's line).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncRead};

/// Lines read from a process's stderr, as JSON objects (a line that is not
/// JSON is kept as a string).
#[derive(Clone, Default)]
pub struct Logs {
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Logs {
    /// Reads `stderr` line by line until it closes.
    pub fn capture(stderr: impl AsyncRead + Unpin + Send + 'static) -> Self {
        let logs = Self::default();
        let lines = logs.lines.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let parsed = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if let Ok(mut lines) = lines.lock() {
                    lines.push(parsed);
                }
            }
        });
        logs
    }

    /// How many lines there are now: a point to look from.
    pub fn mark(&self) -> usize {
        self.lines.lock().map_or(0, |lines| lines.len())
    }

    /// The lines since `mark`.
    pub fn lines_since(&self, mark: usize) -> Vec<Value> {
        self.lines.lock().map(|lines| lines.get(mark..).unwrap_or_default().to_vec()).unwrap_or_default()
    }

    /// The messages of the lines since `mark`.
    pub fn messages_since(&self, mark: usize) -> Vec<String> {
        self.lines_since(mark)
            .iter()
            .map(|line| match line.get("message").and_then(Value::as_str) {
                Some(message) => message.to_owned(),
                None => line.to_string(),
            })
            .collect()
    }

    /// Every line since `mark`, as written.
    pub fn raw_since(&self, mark: usize) -> String {
        self.lines_since(mark).iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
    }

    /// Waits (bounded) until a line's message since `mark` contains `text`.
    pub async fn wait_for(&self, limit: Duration, mark: usize, text: &str) {
        self.wait_for_line(limit, mark, &format!("a message containing {text:?}"), |line| {
            line.get("message").and_then(Value::as_str).unwrap_or_default().contains(text)
                || line.as_str().is_some_and(|line| line.contains(text))
        })
        .await;
    }

    /// Waits (bounded) for the first line since `mark` that `matches`, and returns it.
    pub async fn wait_for_line(
        &self,
        limit: Duration,
        mark: usize,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            if let Some(line) = self.lines_since(mark).into_iter().find(|line| matches(line)) {
                return line;
            }
            assert!(
                start.elapsed() < limit,
                "no log line with {what} within {limit:?}; got:\n{}",
                self.raw_since(mark)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
