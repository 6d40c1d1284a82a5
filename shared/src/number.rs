//! Whole numbers in request bodies, however JSON writes them.
//!
//! JSON Schema's `integer` (and so the API's OpenAPI description) admits
//! `9.0` and `9e0` as well as `9`; serde's integer types refuse all but the
//! last. Integer fields of submissions and payloads read through these, so
//! that what the description allows the server accepts.

use serde::de::{Deserialize, Deserializer, Error, Unexpected};

/// A whole number in `T`'s range, written `9`, `9.0` or `9e0`.
pub fn whole<'de, D: Deserializer<'de>, T: TryFrom<i64> + TryFrom<u64>>(deserializer: D) -> Result<T, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    let out_of_range =
        || D::Error::invalid_value(Unexpected::Other("a number out of range"), &"a whole number in range");
    if let Some(n) = number.as_u64() {
        return T::try_from(n).map_err(|_| out_of_range());
    }
    if let Some(n) = number.as_i64() {
        return T::try_from(n).map_err(|_| out_of_range());
    }
    let float = number.as_f64().unwrap_or(f64::NAN);
    if float.fract() != 0.0 || !float.is_finite() {
        return Err(D::Error::invalid_type(Unexpected::Float(float), &"a whole number"));
    }
    // Whole and finite: exact as an i64 or u64 when within their range.
    if (-9.2e18..=9.2e18).contains(&float) {
        #[allow(clippy::cast_possible_truncation)]
        return T::try_from(float as i64).map_err(|_| out_of_range());
    }
    Err(out_of_range())
}

/// Like [`whole`], for an optional field (`null` is absent).
pub fn optional_whole<'de, D: Deserializer<'de>, T: TryFrom<i64> + TryFrom<u64>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    #[derive(serde::Deserialize)]
    struct Whole<T: TryFrom<i64> + TryFrom<u64>>(#[serde(deserialize_with = "whole")] T);
    Ok(Option::<Whole<T>>::deserialize(deserializer)?.map(|Whole(n)| n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Fields {
        #[serde(deserialize_with = "whole")]
        n: u32,
        #[serde(default, deserialize_with = "optional_whole")]
        m: Option<i64>,
    }

    fn read(json: &str) -> Result<(u32, Option<i64>), String> {
        serde_json::from_str::<Fields>(json).map(|f| (f.n, f.m)).map_err(|e| e.to_string())
    }

    #[test]
    fn whole_numbers_are_read_however_written_and_others_refused() {
        assert_eq!(read(r#"{"n": 9}"#), Ok((9, None)));
        assert_eq!(read(r#"{"n": 9.0, "m": -3e0}"#), Ok((9, Some(-3))));
        assert_eq!(read(r#"{"n": 1, "m": null}"#), Ok((1, None)));
        assert!(read(r#"{"n": 9.5}"#).is_err_and(|e| e.contains("whole number")));
        assert!(read(r#"{"n": -1}"#).is_err_and(|e| e.contains("in range")));
        assert!(read(r#"{"n": 5e9}"#).is_err_and(|e| e.contains("in range")));
        assert!(read(r#"{"n": 1e300}"#).is_err_and(|e| e.contains("in range")));
        assert!(read(r#"{"n": "9"}"#).is_err());
    }
}
