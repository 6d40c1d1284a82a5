//! Reading a JSON request body ourselves rather than with `web::Json`, so that
//! every way a body can be wrong gets its own status and a problem+json answer:
//! 415 (not JSON), 413 (too large, refused before it is read), 400 (malformed
//! JSON), 422 (well-formed, wrong shape; with the path of the field).

use actix_web::HttpRequest;
use actix_web::http::header;
use actix_web::web::{BytesMut, Payload};
use futures_lite::StreamExt as _;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, FieldProblem};

/// Reads and parses a JSON body of at most `limit` bytes.
pub async fn read_json<T: DeserializeOwned>(
    req: &HttpRequest,
    mut payload: Payload,
    limit: usize,
) -> Result<T, ApiError> {
    check_content_type(req)?;
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    parse_json(&body)
}

/// Parses JSON, telling malformed (400) from mis-shaped (422, with the field path).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = shared::kinds::field_path(e.path(), e.inner());
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                ApiError::Validation(vec![FieldProblem::new(path, strip_position(&inner.to_string()))])
            }
            serde_json::error::Category::Io
            | serde_json::error::Category::Syntax
            | serde_json::error::Category::Eof => malformed(&inner),
        }
    })?;
    de.end().map_err(|e| malformed(&e))?;
    Ok(value)
}

fn malformed(e: &serde_json::Error) -> ApiError {
    ApiError::BadRequest(format!("malformed JSON: {e}"))
}

/// serde_json appends " at line 1 column 42" to data errors; with a field path
/// given, the position only adds noise.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

fn check_content_type(req: &HttpRequest) -> Result<(), ApiError> {
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        return Err(ApiError::UnsupportedMediaType("send the body as Content-Type: application/json".into()));
    };
    let essence = value.to_str().unwrap_or_default().split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!("Content-Type {essence:?} is not supported; send application/json")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Shape {
        n: u8,
    }

    #[test]
    fn syntax_errors_are_400_and_shape_errors_422_with_the_path() {
        assert!(matches!(parse_json::<Shape>(b"{\"n\": "), Err(ApiError::BadRequest(_))));
        assert!(matches!(parse_json::<Shape>(br#"{"n": 1} trailing"#), Err(ApiError::BadRequest(_))));
        match parse_json::<Shape>(br#"{"n": "x"}"#) {
            Err(ApiError::Validation(errors)) => assert_eq!(errors[0].field, "n"),
            other => panic!("unexpected: {other:?}"),
        }
    }
}
