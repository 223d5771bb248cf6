//! The audit record: DESIGN.md's fields, one JSON object per line.

use serde::Serialize;
use time::macros::format_description;

use crate::record::Finished;

/// One request, as the audit trail keeps it.
#[derive(Debug, Serialize)]
struct AuditRecord<'a> {
    /// RFC 3339, UTC, milliseconds: when the request arrived.
    ts: String,
    trace_id: &'a str,
    principal: Option<&'a str>,
    user_id: Option<&'a str>,
    client: Option<String>,
    /// The identity the client certificate proved (`server.client_ca`; an
    /// extension of DESIGN.md's fields), or null.
    client_identity: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    status: u16,
    code: Option<&'a str>,
    decision: &'static str,
    cache: Option<&'static str>,
    /// How the rate limiter decided (an extension of DESIGN.md's fields):
    /// `admitted`, `limited`, `fallback_admitted`, `fallback_limited`,
    /// `backend_unavailable`, or null without `[rate_limit]`.
    rate_limit: Option<&'static str>,
    upstream_status: Option<u16>,
    upstream_ms: Option<f64>,
    latency_ms: f64,
}

/// The record's line, newline included. Client-supplied text was escaped
/// when the record opened and JSON escapes quotes and control characters;
/// U+2028 and U+2029, valid in JSON but line breaks to some readers, are
/// escaped too, so no value can split or forge a line. Never holds a JWT,
/// a token or a secret: the record has none.
pub(crate) fn audit_line(finished: &Finished<'_>) -> Vec<u8> {
    let r = finished.record;
    let ts = r
        .arrived
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        ))
        .unwrap_or_default();
    let record = AuditRecord {
        ts,
        trace_id: r.trace_id.as_str(),
        principal: r.principal.as_deref(),
        user_id: r.user_id.as_deref(),
        client: r.client.map(|c| c.to_string()),
        client_identity: r.client_identity.as_deref(),
        method: r.method.as_str(),
        path: &r.path,
        query: r.query.as_ref().map(|q| q.as_str()),
        status: finished.status.as_u16(),
        code: finished.code(),
        decision: finished.decision.as_str(),
        cache: r.cache.map(|c| c.as_str()),
        rate_limit: r.rate_limit.map(|o| o.as_str()),
        upstream_status: r.upstream.and_then(|u| u.status).map(|s| s.as_u16()),
        upstream_ms: r.upstream.map(|u| crate::record::millis(u.latency)),
        latency_ms: crate::record::millis(finished.latency),
    };
    let mut line = serde_json::to_string(&record)
        .unwrap_or_else(|_| String::from("{}"))
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
        .into_bytes();
    line.push(b'\n');
    line
}
