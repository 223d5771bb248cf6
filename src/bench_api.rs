//! Entry points for the micro-benchmarks in `benches/`: each wraps one
//! function the request path runs per request, so that a benchmark times
//! the gateway's own code without widening its API. Not part of the API;
//! nothing here changes what the wrapped functions do.

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use time::OffsetDateTime;

use crate::auth::{KeySet, KeyStore, Principal, Verifier};
use crate::cache::{CacheKey, ResponseCache, Served};
use crate::config::{AuthConfig, UpstreamConfig};
use crate::error::GatewayError;
use crate::jobs::{JobsQuery, QueryError};
use crate::language::Language;
use crate::token::AccessToken;
use crate::trace_id::TraceId;
use crate::upstream::{Forward, Upstream};
use crate::StartError;

/// `JobsQuery::parse` of a raw query string (without `?`): whether it was
/// accepted.
pub fn parse_query(raw: &str) -> bool {
    JobsQuery::parse(Some(raw)).is_ok()
}

/// `JobsQuery::parse`, then the canonical form sent upstream.
pub fn canonical_query(raw: &str) -> Option<String> {
    JobsQuery::parse(Some(raw)).ok().map(|q| q.canonical())
}

/// `X-Date` for now, as the upstream request is stamped with it.
pub fn x_date_now() -> String {
    crate::upstream::x_date(OffsetDateTime::now_utc())
}

/// A JWT verifier as the gateway builds one from `auth`, over a key set
/// given as a JWKS document.
pub struct Verification(Verifier);

impl Verification {
    /// The verifier of `config` over the keys of `jwks`; its verified-token
    /// cache is on unless `config.verified_cache_bytes` is 0.
    pub async fn new(config: &AuthConfig, jwks: &[u8]) -> Result<Verification, StartError> {
        crate::server::tls::install_default_providers();
        let client = crate::http_client::build(crate::server::tls::client_config(None)?);
        let keys = KeyStore::start(config, client, Some(KeySet::from_json(jwks)?)).await?;
        Ok(Verification(Verifier::new(config, keys)))
    }

    /// `Verifier::verify_token`: the caller's user id, or `None` when the
    /// token is refused.
    pub async fn verify_token(&self, token: &str) -> Option<String> {
        self.0.verify_token(token).await.ok().map(|p| p.user_id)
    }
}

/// What a request has once it is authenticated and validated: the inputs of
/// the cache key and of the upstream request.
pub struct Validated {
    principal: Principal,
    query: JobsQuery,
    language: Language,
    trace_id: TraceId,
    token: AccessToken,
}

impl Validated {
    /// A request for `query` by `subject` acting as `user_id`, with the
    /// default language, a fresh trace id and a KooDrive token.
    pub fn new(query: &str, subject: &str, user_id: &str) -> Option<Validated> {
        Some(Validated {
            principal: Principal {
                subject: subject.into(),
                user_id: user_id.into(),
            },
            query: JobsQuery::parse(Some(query)).ok()?,
            language: Language::from_headers(&HeaderMap::new()).ok()?,
            trace_id: TraceId::generate(),
            token: AccessToken::new("koodrive-access-token-for-benchmarks"),
        })
    }

    /// `CacheKey::new` for this request.
    pub fn cache_key(&self) -> CacheKey {
        CacheKey::new(&self.principal, &self.query, &self.language)
    }

    /// The normalized response of an invalid query (400, `msg` naming the
    /// parameter), as `GatewayError::response` renders it.
    pub fn invalid_query_response(&self) -> Response<Full<Bytes>> {
        GatewayError::InvalidQuery(QueryError::Missing("offset")).response(&self.trace_id)
    }
}

/// The upstream request builder over a base URL (no request is sent).
pub struct UpstreamRequest(Upstream);

impl UpstreamRequest {
    /// A builder for `base` (e.g. `https://koodrive.example.test`).
    pub fn new(base: &http::Uri, config: &UpstreamConfig) -> Result<UpstreamRequest, StartError> {
        crate::server::tls::install_default_providers();
        let client = crate::http_client::build(crate::server::tls::client_config(None)?);
        Ok(UpstreamRequest(Upstream::new(base, client, config)))
    }

    /// The request sent to KooDrive for `request`: URI with the canonical
    /// query, allow-listed headers, `X-Date` stamped last.
    pub fn build(&self, request: &Validated) -> Option<Request<Full<Bytes>>> {
        let forward = Forward {
            query: &request.query,
            user_id: &request.principal.user_id,
            token: &request.token,
            trace_id: &request.trace_id,
            language: &request.language,
            traced: false,
        };
        self.0.build_request(&forward).ok()
    }
}

/// `ResponseCache::serve` with a loader that answers `body`: a miss stores
/// it, a later call for the same key is a hit.
pub async fn serve_cached(cache: &ResponseCache, key: CacheKey, body: &Bytes) -> Option<Served> {
    let body = body.clone();
    cache
        .serve(key, false, || async move {
            Ok(crate::upstream::UpstreamReply {
                body,
                storable: true,
            })
        })
        .await
        .ok()
}
