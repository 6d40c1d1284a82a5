//! Keeping passwords out of what Conveyor prints. `DATABASE_URL` and
//! `AMQP_URL` carry credentials, and the libraries underneath sometimes quote
//! the URL they were given in their errors: every log line and every error a
//! binary prints goes through [`secrets`] (see [`crate::telemetry`]).

use std::borrow::Cow;
use std::io::Write;

/// `text` with the password of every URL in it replaced by `***`
/// (`postgres://app:s3cret@db/x` → `postgres://app:***@db/x`).
pub fn secrets(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let (head, tail) = rest.split_at(scheme_end + 3);
        out.push_str(head);
        // The authority (userinfo@host:port) ends where the path, query or
        // fragment starts, or where the URL does.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '`' | '<' | '>' | ')') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@').map(|at| authority.split_at(at)) {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _password)) => {
                    out.push_str(user);
                    out.push_str(":***");
                    out.push_str(host);
                }
                None => out.push_str(authority),
            },
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// A writer that passes everything through [`secrets`]. Log lines are
/// written whole, one `write` per event, so a URL is never split between calls.
pub struct Redacting<W>(pub W);

impl<W: Write> Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => self.0.write_all(secrets(text).as_bytes()),
            Err(_) => self.0.write_all(buf),
        }?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_password_in_a_text_is_hidden_and_nothing_else() {
        assert_eq!(secrets("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(secrets("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            secrets("failed: amqp://guest:guest@127.0.0.1:5672/%2f (and postgres://a:b@c) done"),
            "failed: amqp://guest:***@127.0.0.1:5672/%2f (and postgres://a:***@c) done"
        );
        assert_eq!(secrets(r#"url="redis://:pw@host:6379""#), r#"url="redis://:***@host:6379""#);
        assert_eq!(secrets("no url here: a:b@c"), "no url here: a:b@c");
        assert_eq!(secrets("http://example.com/a?b=c@d"), "http://example.com/a?b=c@d");
    }
}
