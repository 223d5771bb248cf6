//! Trace id: accept a valid inbound `X-Traceid`, else bridge the trace-id of
//! a W3C `traceparent`, else generate one. First step of the flow; the id is
//! sent upstream and returned on every response.

use http::header::HeaderValue;
use http::HeaderMap;
use rand::Rng;

/// The `X-Traceid` header name.
pub(crate) const X_TRACEID: &str = "x-traceid";

const MAX_LEN: usize = 64;

/// A validated trace id: 1–64 characters of `[A-Za-z0-9_-]`, and the W3C
/// trace context the upstream request carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceId {
    id: String,
    /// The W3C trace-id (32 lowercase hex): an inbound `traceparent`'s, else
    /// the id itself when it has that form, else derived from it.
    w3c: String,
    /// The inbound `traceparent`'s flags (sampled), else `01`.
    flags: String,
    /// The inbound `traceparent`'s parent-id: the caller's span.
    parent: Option<String>,
}

/// `traceparent`, W3C Trace Context §3.2.
pub(crate) const TRACEPARENT: &str = "traceparent";

impl TraceId {
    /// Picks the request's trace id from its headers, per DESIGN.md.
    pub fn from_headers(headers: &HeaderMap) -> TraceId {
        let parent = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        let inbound = headers
            .get(X_TRACEID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| is_valid(v))
            .map(str::to_owned);
        let id = inbound
            .or_else(|| parent.map(|(trace, ..)| trace.to_owned()))
            .unwrap_or_else(|| TraceId::generate().id);
        let (w3c, flags, parent) = match parent {
            Some((trace, flags, span)) => {
                (trace.to_owned(), flags.to_owned(), Some(span.to_owned()))
            }
            None => (w3c_trace_id(&id), "01".to_owned(), None),
        };
        TraceId {
            id,
            w3c,
            flags,
            parent,
        }
    }

    /// A fresh id: 32 lowercase hex digits, usable as a W3C trace-id.
    pub fn generate() -> TraceId {
        let value: u128 = rand::rng().random_range(1..=u128::MAX);
        let id = format!("{value:032x}");
        TraceId {
            w3c: id.clone(),
            id,
            flags: "01".to_owned(),
            parent: None,
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The id as a header value (always valid: the alphabet is restricted).
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }

    /// The W3C trace-id the upstream request carries.
    pub fn w3c_trace_id(&self) -> &str {
        &self.w3c
    }

    /// The trace flags (`01`: sampled) as a byte.
    pub fn w3c_flags(&self) -> u8 {
        u8::from_str_radix(&self.flags, 16).unwrap_or(1)
    }

    /// The caller's span id, from an inbound `traceparent`.
    pub fn w3c_parent_span(&self) -> Option<&str> {
        self.parent.as_deref()
    }

    /// A `traceparent` for a call made on the request's behalf: its trace-id
    /// and a new span id (W3C Trace Context §3.2).
    pub fn child_traceparent(&self) -> HeaderValue {
        let span: u64 = rand::rng().random_range(1..=u64::MAX);
        // Written piece by piece: `format!` cost about 2.4k instructions of
        // the upstream request's 12.7k (bench/RESULTS.md).
        let mut value = String::with_capacity(55);
        value.push_str("00-");
        value.push_str(&self.w3c);
        value.push('-');
        value.extend(
            (0..16).rev().map(|digit| {
                char::from(b"0123456789abcdef"[((span >> (4 * digit)) & 0xf) as usize])
            }),
        );
        value.push('-');
        value.push_str(&self.flags);
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }
}

/// The id itself when it is a valid W3C trace-id, else the first 16 bytes
/// of its SHA-256 in hex: stable, so one request's calls share a trace.
fn w3c_trace_id(id: &str) -> String {
    let lower_hex = id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0');
    if lower_hex {
        return id.to_owned();
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_bytes());
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn is_valid(id: &str) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The trace-id and flags of a `traceparent` (W3C Trace Context §3.2):
/// `version-traceid-parentid-flags`, lowercase hex, trace-id not all zeros,
/// version `ff` forbidden. Later versions may append fields.
fn parse_traceparent(value: &str) -> Option<(&str, &str, &str)> {
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
    well_formed.then_some((trace_id, flags, parent_id))
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
    fn the_upstream_traceparent_keeps_the_trace_and_makes_a_new_span() {
        let inbound = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let id =
            TraceId::from_headers(&headers(&[("x-traceid", "mine"), ("traceparent", inbound)]));
        let child = id.child_traceparent();
        let child = child.to_str().unwrap();
        let (trace, flags, _) = parse_traceparent(child).unwrap();
        assert_eq!((trace, flags), ("4bf92f3577b34da6a3ce929d0e0e4736", "00"));
        assert_eq!(id.w3c_parent_span(), Some("00f067aa0ba902b7"));
        assert_ne!(child, inbound);
        // Without one: the generated id is the trace-id; a custom id is
        // hashed into one, the same every time.
        let generated = TraceId::from_headers(&HeaderMap::new());
        let child = generated.child_traceparent();
        let (trace, flags, _) = parse_traceparent(child.to_str().unwrap()).unwrap();
        assert_eq!((trace, flags), (generated.as_str(), "01"));
        let custom = TraceId::from_headers(&headers(&[("x-traceid", "order-77")]));
        let w3c = custom.w3c_trace_id().to_owned();
        assert_eq!(w3c.len(), 32);
        assert_eq!(
            TraceId::from_headers(&headers(&[("x-traceid", "order-77")])).w3c_trace_id(),
            w3c
        );
        assert!(parse_traceparent(custom.child_traceparent().to_str().unwrap()).is_some());
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

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn headers(x_traceid: &[u8], traceparent: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_bytes(x_traceid) {
            headers.insert(X_TRACEID, value);
        }
        if let Ok(value) = HeaderValue::from_bytes(traceparent) {
            headers.insert(TRACEPARENT, value);
        }
        headers
    }

    fn lower_hex(s: &str, len: usize) -> bool {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    proptest! {
        #[test]
        fn any_inbound_headers_give_a_valid_id_and_a_well_formed_traceparent(
            x_traceid in proptest::collection::vec(any::<u8>(), 0..80),
            traceparent in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..80),
                "[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[a-z0-9]{0,8})?"
                    .prop_map(String::into_bytes),
            ],
        ) {
            let headers = headers(&x_traceid, &traceparent);
            let id = TraceId::from_headers(&headers);
            prop_assert!(is_valid(id.as_str()), "{:?}", id.as_str());
            // A valid inbound X-Traceid is kept as sent.
            if let Some(sent) = headers.get(X_TRACEID).and_then(|v| v.to_str().ok()) {
                if is_valid(sent) {
                    prop_assert_eq!(id.as_str(), sent);
                }
            }
            prop_assert!(lower_hex(id.w3c_trace_id(), 32));
            prop_assert!(id.w3c_trace_id().bytes().any(|b| b != b'0'));
            let child = id.child_traceparent();
            let child = child.to_str().unwrap();
            let parts: Vec<&str> = child.split('-').collect();
            prop_assert_eq!(parts.len(), 4, "{}", child);
            prop_assert_eq!(parts[0], "00");
            prop_assert_eq!(parts[1], id.w3c_trace_id());
            prop_assert!(lower_hex(parts[2], 16) && parts[2] != "0000000000000000");
            prop_assert!(lower_hex(parts[3], 2));
        }
    }
}
