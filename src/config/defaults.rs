//! Every default value of the configuration file, in one place: the file
//! types name these in `#[serde(default = …)]`, so `check-config` prints
//! them as effective values.

pub(super) fn watch_files() -> bool {
    true
}
pub(super) fn drain_timeout_ms() -> u64 {
    30_000
}
pub(super) const fn max_header_bytes() -> u64 {
    16 * 1024
}
pub(super) const fn max_headers() -> u64 {
    64
}
pub(super) const fn max_request_target_bytes() -> u64 {
    8 * 1024
}
pub(super) const fn max_connections() -> u64 {
    10_000
}
pub(super) const fn handshake_timeout_ms() -> u64 {
    10_000
}
pub(super) const fn header_read_timeout_ms() -> u64 {
    10_000
}
pub(super) const fn idle_timeout_ms() -> u64 {
    60_000
}
pub(super) const fn send_timeout_ms() -> u64 {
    30_000
}
pub(super) const fn h2_max_concurrent_streams() -> u64 {
    100
}
pub(super) const fn h2_keepalive_interval_ms() -> u64 {
    30_000
}
pub(super) const fn h2_keepalive_timeout_ms() -> u64 {
    10_000
}
pub(super) const fn h2_max_resets_per_second() -> u64 {
    100
}

pub(super) fn upstream_timeout_ms() -> u64 {
    10_000
}
pub(super) fn max_response_bytes() -> u64 {
    8 * 1024 * 1024
}
pub(super) fn max_concurrency() -> u64 {
    256
}
pub(super) fn queue_timeout_ms() -> u64 {
    1_000
}

pub(super) fn redis_timeout_ms() -> u64 {
    50
}

pub(super) fn audit_max_file_bytes() -> u64 {
    100 * 1024 * 1024
}
pub(super) fn audit_max_files() -> u64 {
    10
}
pub(super) fn audit_queue_records() -> u64 {
    10_000
}

pub(super) fn principal_claim() -> String {
    "sub".into()
}
pub(super) fn user_id_claim() -> String {
    "koodrive_uid".into()
}
pub(super) fn algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "EdDSA".into()]
}
pub(super) fn leeway_s() -> u64 {
    60
}
pub(super) fn jwks_refresh_s() -> u64 {
    300
}
pub(super) fn jwks_min_refetch_s() -> u64 {
    30
}
pub(super) fn max_token_bytes() -> u64 {
    8 * 1024
}
pub(super) fn verified_cache_bytes() -> u64 {
    16 * 1024 * 1024
}

pub(super) fn grant() -> super::Grant {
    super::Grant::TokenExchange
}
pub(super) fn user_id_param() -> String {
    "user_id".into()
}
pub(super) fn token_timeout_ms() -> u64 {
    5_000
}
pub(super) fn expiry_margin_s() -> u64 {
    60
}
pub(super) fn max_cached_tokens() -> u64 {
    100_000
}

pub(super) fn cache_ttl_ms() -> u64 {
    5_000
}
pub(super) fn cache_ttl_jitter_ms() -> u64 {
    0
}
pub(super) fn cache_max_bytes() -> u64 {
    64 * 1024 * 1024
}
pub(super) fn cache_stale_if_error_ms() -> u64 {
    0
}
pub(super) fn honor_client_no_cache() -> bool {
    true
}
