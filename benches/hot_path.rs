//! Micro-benchmarks of the functions every request runs, in flow order:
//! validate (query parse, canonical form), authenticate (JWT verification,
//! in full and from the verified-token cache), cache (key, hit), upstream
//! request (`X-Date`, the whole build) and error rendering. They reach the
//! crate's own code through `koodrive_gateway::bench_api`. `cargo bench`.

use std::future::Future;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Bencher, Criterion};
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use koodrive_gateway::bench_api::{self, UpstreamRequest, Validated, Verification};
use koodrive_gateway::cache::ResponseCache;
use koodrive_gateway::config::{
    AuthConfig, CacheConfig, JwksSource, UpstreamConfig, UpstreamTarget,
};
use serde_json::json;
use tokio::runtime::Runtime;

const QUERY: &str = "offset=20&limit=50&type=3&status=1";
const ISS: &str = "https://idp.example.test";
const AUD: &str = "koodrive-gateway";

/// Times `routine` inside one `block_on`, so the runtime's entry costs
/// nothing per call.
fn iter_async<F, Fut>(b: &mut Bencher<'_>, runtime: &Runtime, mut routine: F)
where
    F: FnMut() -> Fut,
    Fut: Future,
{
    b.iter_custom(|iters| {
        runtime.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(routine().await);
            }
            start.elapsed()
        })
    });
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn query(c: &mut Criterion) {
    let mut group = c.benchmark_group("query");
    group.bench_function("parse", |b| {
        b.iter(|| bench_api::parse_query(black_box(QUERY)))
    });
    group.bench_function("parse_canonical", |b| {
        b.iter(|| bench_api::canonical_query(black_box(QUERY)))
    });
    group.finish();
}

/// A signing key generated now, and its public JWK under `kid`.
fn signing_key(alg: Algorithm, kid: &str) -> (EncodingKey, Jwk) {
    let (generate, load): (_, fn(&[u8]) -> _) = match alg {
        Algorithm::ES256 => (&rcgen::PKCS_ECDSA_P256_SHA256, EncodingKey::from_ec_pem),
        Algorithm::RS256 => (&rcgen::PKCS_RSA_SHA256, EncodingKey::from_rsa_pem),
        other => panic!("no key generation for {other:?}"),
    };
    let pem = rcgen::KeyPair::generate_for(generate)
        .expect("key generation")
        .serialize_pem();
    let key = load(pem.as_bytes()).expect("the generated key loads");
    let mut jwk = Jwk::from_encoding_key(&key, alg).expect("a public JWK");
    jwk.common.key_id = Some(kid.into());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    (key, jwk)
}

fn auth_config(verified_cache_bytes: u64) -> AuthConfig {
    AuthConfig {
        issuer: ISS.into(),
        audience: AUD.into(),
        // Never read: the key set is given and every token's `kid` is in it.
        jwks: JwksSource::File("/nonexistent/jwks.json".into()),
        jwks_refresh: Duration::from_secs(300),
        jwks_min_refetch: Duration::from_secs(3600),
        algorithms: vec![Algorithm::ES256, Algorithm::RS256],
        leeway: Duration::from_secs(60),
        principal_claim: "sub".into(),
        user_id_claim: "koodrive_user".into(),
        max_token_bytes: 8192,
        typ: None,
        verified_cache_bytes,
    }
}

fn jwt(c: &mut Criterion) {
    koodrive_gateway::server::tls::install_default_providers();
    let runtime = runtime();
    let (ec, ec_jwk) = signing_key(Algorithm::ES256, "ec-1");
    let (rsa, rsa_jwk) = signing_key(Algorithm::RS256, "rsa-1");
    let jwks = serde_json::to_vec(&JwkSet {
        keys: vec![ec_jwk, rsa_jwk],
    })
    .expect("a JWKS document");
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({
        "iss": ISS,
        "aud": AUD,
        "sub": "svc-reports",
        "koodrive_user": "u-42",
        "iat": now,
        "exp": now + 86_400,
    });
    let sign = |alg, kid: &str, key| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, key).expect("a signed token")
    };
    let tokens = [
        ("es256", sign(Algorithm::ES256, "ec-1", &ec)),
        ("rs256", sign(Algorithm::RS256, "rsa-1", &rsa)),
    ];
    let verifier = |cache_bytes| {
        runtime
            .block_on(Verification::new(&auth_config(cache_bytes), &jwks))
            .expect("a verifier")
    };
    // Cold: the cache off, so every call is the full verification.
    let cold = verifier(0);
    let cached = verifier(1024 * 1024);

    let mut group = c.benchmark_group("jwt");
    for (name, token) in &tokens {
        for verifier in [&cold, &cached] {
            let user = runtime.block_on(verifier.verify_token(token));
            assert_eq!(user.as_deref(), Some("u-42"), "{name} token refused");
        }
        group.bench_function(format!("{name}_cold"), |b| {
            iter_async(b, &runtime, || cold.verify_token(black_box(token)))
        });
        group.bench_function(format!("{name}_cached"), |b| {
            iter_async(b, &runtime, || cached.verify_token(black_box(token)))
        });
    }
    group.finish();
}

fn cache(c: &mut Criterion) {
    let runtime = runtime();
    let request = Validated::new(QUERY, "svc-reports", "u-42").expect("a valid request");
    let cache = ResponseCache::new(&CacheConfig {
        ttl: Duration::from_secs(3600),
        ttl_jitter: Duration::ZERO,
        max_bytes: 16 * 1024 * 1024,
        stale_if_error: Duration::ZERO,
        honor_client_no_cache: true,
    });
    let body = Bytes::from_static(br#"{"code":"0","msg":"success","data":{"total":0,"jobs":[]}}"#);
    // The first call stores the body; every timed call is a hit.
    let first = runtime.block_on(bench_api::serve_cached(&cache, request.cache_key(), &body));
    assert!(first.is_some(), "the first call stores the body");

    let mut group = c.benchmark_group("cache");
    group.bench_function("key_new", |b| b.iter(|| black_box(&request).cache_key()));
    // As the pipeline does it: build the key, then look it up.
    group.bench_function("key_and_hit", |b| {
        iter_async(b, &runtime, || {
            bench_api::serve_cached(&cache, request.cache_key(), &body)
        })
    });
    group.finish();
}

fn upstream(c: &mut Criterion) {
    let request = Validated::new(QUERY, "svc-reports", "u-42").expect("a valid request");
    let config = UpstreamConfig {
        target: UpstreamTarget::Embedded,
        ca_file: None,
        timeout: Duration::from_secs(10),
        max_response_bytes: 1024 * 1024,
        max_concurrency: 64,
        queue_timeout: Duration::from_millis(100),
    };
    let base = "https://koodrive.example.test".parse().expect("a URL");
    let upstream = UpstreamRequest::new(&base, &config).expect("an upstream client");
    assert!(upstream.build(&request).is_some(), "the request builds");

    let mut group = c.benchmark_group("upstream");
    group.bench_function("x_date", |b| b.iter(bench_api::x_date_now));
    group.bench_function("build_request", |b| {
        b.iter(|| upstream.build(black_box(&request)))
    });
    group.finish();
}

fn error(c: &mut Criterion) {
    let request = Validated::new(QUERY, "svc-reports", "u-42").expect("a valid request");
    c.bench_function("error/invalid_query_response", |b| {
        b.iter(|| black_box(&request).invalid_query_response())
    });
}

criterion_group!(hot_path, query, jwt, cache, upstream, error);
criterion_main!(hot_path);
