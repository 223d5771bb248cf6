//! Trace id: accept a valid inbound `X-Traceid`, else bridge the trace-id of
//! a W3C `traceparent`, else generate one. First step of the flow; the id is
//! sent upstream and returned on every response.

use http::header::HeaderValue;
use http::HeaderMap;
use rand::Rng;

/// The `X-Traceid` header name.
pub(crate) const X_TRACEID: &str = "x-traceid";

const MAX_LEN: usize = 64;

/// A validated trace id: 1–64 characters of `[A-Za-z0-9_-]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceId(String);

impl TraceId {
    /// Picks the request's trace id from its headers, per DESIGN.md.
    pub fn from_headers(headers: &HeaderMap) -> TraceId {
        let inbound = headers
            .get(X_TRACEID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| is_valid(v));
        if let Some(id) = inbound {
            return TraceId(id.to_owned());
        }
        headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(trace_id_of_traceparent)
            .map(|id| TraceId(id.to_owned()))
            .unwrap_or_else(TraceId::generate)
    }

    /// A fresh id: 32 lowercase hex digits, usable as a W3C trace-id.
    pub fn generate() -> TraceId {
        let value: u128 = rand::rng().random_range(1..=u128::MAX);
        TraceId(format!("{value:032x}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a header value (always valid: the alphabet is restricted).
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.0).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }
}

fn is_valid(id: &str) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The trace-id field of a `traceparent` (W3C Trace Context §3.2):
/// `version-traceid-parentid-flags`, lowercase hex, trace-id not all zeros,
/// version `ff` forbidden. Later versions may append fields.
fn trace_id_of_traceparent(value: &str) -> Option<&str> {
    let mut parts = value.trim().split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let well_formed = lower_hex(version, 2)
        && version != "ff"
        && lower_hex(trace_id, 32)
        && lower_hex(parent_id, 16)
        && lower_hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && parent_id.bytes().any(|b| b != b'0')
        && (version != "00" || parts.next().is_none());
    well_formed.then_some(trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn valid_inbound_trace_id_is_kept() {
        let id = TraceId::from_headers(&headers(&[("x-traceid", "abc_DEF-123")]));
        assert_eq!(id.as_str(), "abc_DEF-123");
    }

    #[test]
    fn invalid_inbound_trace_id_is_replaced() {
        for bad in ["", "has space", "semi;colon", &"a".repeat(65), "ünï"] {
            let mut map = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(bad) {
                map.insert(X_TRACEID, v);
            }
            let id = TraceId::from_headers(&map);
            assert_ne!(id.as_str(), bad);
            assert_eq!(id.as_str().len(), 32);
        }
    }

    #[test]
    fn traceparent_trace_id_is_bridged() {
        let id = TraceId::from_headers(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]));
        assert_eq!(id.as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn x_traceid_wins_over_traceparent() {
        let id = TraceId::from_headers(&headers(&[
            ("x-traceid", "mine"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ]));
        assert_eq!(id.as_str(), "mine");
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let id = TraceId::from_headers(&headers(&[("traceparent", bad)]));
            assert!(!bad.contains(id.as_str()), "{bad} bridged");
        }
    }

    #[test]
    fn generated_ids_are_32_lowercase_hex_and_differ() {
        let a = TraceId::generate();
        let b = TraceId::generate();
        assert_ne!(a, b);
        assert!(a
            .as_str()
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert_eq!(a.as_str().len(), 32);
    }
}
