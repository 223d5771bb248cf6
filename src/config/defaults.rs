//! Every default value of the configuration file, in one place: the file
//! types name these in `#[serde(default = …)]`, so `check-config` prints
//! them as effective values.

pub fn shutdown_grace_ms() -> u64 {
    10_000
}

pub fn upstream_timeout_ms() -> u64 {
    10_000
}
pub fn max_response_bytes() -> u64 {
    8 * 1024 * 1024
}

pub fn principal_claim() -> String {
    "sub".into()
}
pub fn user_id_claim() -> String {
    "koodrive_uid".into()
}
pub fn algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "EdDSA".into()]
}
pub fn leeway_s() -> u64 {
    60
}
pub fn jwks_refresh_s() -> u64 {
    300
}
pub fn jwks_min_refetch_s() -> u64 {
    30
}
pub fn max_token_bytes() -> u64 {
    8 * 1024
}

pub fn grant() -> super::Grant {
    super::Grant::TokenExchange
}
pub fn user_id_param() -> String {
    "user_id".into()
}
pub fn token_timeout_ms() -> u64 {
    5_000
}
pub fn expiry_margin_s() -> u64 {
    60
}
pub fn max_cached_tokens() -> u64 {
    100_000
}

pub fn cache_ttl_ms() -> u64 {
    5_000
}
pub fn cache_ttl_jitter_ms() -> u64 {
    0
}
pub fn cache_max_bytes() -> u64 {
    64 * 1024 * 1024
}
pub fn cache_stale_if_error_ms() -> u64 {
    0
}
pub fn honor_client_no_cache() -> bool {
    true
}
