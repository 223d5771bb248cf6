//! Entry points for the fuzz targets in `fuzz/`: each feeds untrusted bytes
//! to one parser the request path runs and panics when an invariant breaks
//! (the fuzzer reports a panic as a finding). Not part of the API; the
//! same invariants are proptest properties beside each parser.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::jobs::{JobsQuery, QueryError};
use crate::language::{Language, LANGUAGE};
use crate::trace_id::{TraceId, TRACEPARENT, X_TRACEID};

/// Headers holding `value` under `name`, when it is a legal header value.
fn header(name: &'static str, value: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
    headers
}

/// The jobs query parser: accepted queries round-trip through their
/// canonical form; rejections name a parameter.
pub fn query(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    match JobsQuery::parse(Some(&raw)) {
        Ok(query) => {
            let canonical = query.canonical();
            assert_eq!(JobsQuery::parse(Some(&canonical)).as_ref(), Ok(&query));
        }
        Err(error) => {
            let name: &str = match &error {
                QueryError::Missing(name) | QueryError::Repeated(name) => name,
                QueryError::Invalid { name, .. } => name,
                QueryError::Unknown(name) => name,
            };
            assert!(error.to_string().contains(&format!("`{name}`")), "{error}");
            assert!(!name.chars().any(char::is_control), "{error}");
        }
    }
}

/// `X-Traceid` and `traceparent`: always a valid id and a well-formed
/// outgoing `traceparent`. The input is split at its first NUL.
pub fn trace_id(data: &[u8]) {
    let (x_traceid, traceparent) = split(data);
    let mut headers = header(X_TRACEID, x_traceid);
    headers.extend(header(TRACEPARENT, traceparent));
    let id = TraceId::from_headers(&headers);
    assert!(!id.as_str().is_empty() && id.as_str().len() <= 128);
    assert_eq!(id.w3c_trace_id().len(), 32);
    assert_eq!(id.child_traceparent().len(), 55);
}

/// The `language` header: kept only as a short tag of visible ASCII.
pub fn language(data: &[u8]) {
    if let Ok(language) = Language::from_headers(&header(LANGUAGE, data)) {
        assert!(language.as_str().len() <= 35);
        assert!(language.as_str().bytes().all(|b| b.is_ascii_graphic()));
    }
}

/// The bearer pre-checks and the JOSE header decoding that run before any
/// key is looked at.
pub fn bearer(data: &[u8]) {
    crate::auth::fuzz_pre_checks(data);
}

/// KooDrive's answer (the first two bytes pick the status): any bytes
/// become a normalized body or a passed-through success.
pub fn upstream_body(data: &[u8]) {
    let (status, body) = match data {
        [a, b, rest @ ..] => (100 + u16::from_be_bytes([*a, *b]) % 500, rest),
        _ => return,
    };
    let Ok(status) = StatusCode::from_u16(status) else {
        return;
    };
    crate::upstream::fuzz_normalize(status, Bytes::copy_from_slice(body));
}

/// `Cache-Control` directives: names are non-empty, trimmed, lower case.
pub fn cache_control(data: &[u8]) {
    let headers = header("cache-control", data);
    for directive in crate::cache_control::directives(&headers) {
        assert!(!directive.name.is_empty());
        assert_eq!(directive.name.trim(), directive.name);
        assert_eq!(directive.name.to_ascii_lowercase(), directive.name);
    }
}

fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[]),
    }
}
