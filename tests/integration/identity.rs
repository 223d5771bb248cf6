//! Identity: JWKS from a URL (rotation, refetch limits, outage) and per-user
//! KooDrive token exchange against the emulator's token endpoint.

use std::sync::Arc;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use koodrive_gateway::devcerts::JWKS;
use koodrive_gateway::emulator::Fault;
use tokio::task::JoinSet;

use std::time::Duration;

use crate::support::{freeze_time, JwksServer, Options, TestEnv, CLIENT_SECRET};

const PATH: &str = "/koodrive/ose/v1/jobs?offset=0&limit=2";

/// A fresh ES256 key with `kid`, and its public JWK.
fn new_key(kid: &str) -> (EncodingKey, Jwk) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some(kid.into());
    (key, jwk)
}

fn sign_with(env: &TestEnv, key: &EncodingKey, kid: &str, user: &str) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &env.claims(user), key).unwrap()
}

/// Starts a gateway whose keys come from `server`, which starts out
/// serving the dev JWKS.
async fn with_jwks_url(server: &Arc<JwksServer>, auth_extra: &'static str) -> TestEnv {
    let serving = server.clone();
    TestEnv::start_with(Options {
        jwks_url: Some(server.url.clone()),
        auth_extra,
        before_start: Some(Box::new(move |certs| {
            serving.set(Some(std::fs::read_to_string(certs.join(JWKS)).unwrap()));
        })),
        ..Options::default()
    })
    .await
}

fn with_extra_key(env: &TestEnv, jwk: Jwk) -> String {
    let mut set: JwkSet =
        serde_json::from_slice(&std::fs::read(env.certs().join(JWKS)).unwrap()).unwrap();
    set.keys.push(jwk);
    serde_json::to_string(&set).unwrap()
}

#[tokio::test]
async fn a_key_rotated_in_after_start_up_is_accepted_without_restart() {
    let server = Arc::new(JwksServer::start(None).await);
    let env = with_jwks_url(&server, "").await;
    assert_eq!(server.fetches(), 1, "fetched once at start-up");
    assert_eq!(env.admin_status("/readyz").await, 200);
    assert_eq!(env.get_bearer(&env.token("u-1"), PATH).await.status, 200);

    let (key, jwk) = new_key("rotated-2");
    server.set(Some(with_extra_key(&env, jwk)));
    let reply = env
        .get_bearer(&sign_with(&env, &key, "rotated-2", "u-1"), PATH)
        .await;
    assert_eq!(
        reply.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(server.fetches(), 2, "one refetch for the unknown kid");
    // Known keys need no further fetches.
    assert_eq!(
        env.get_bearer(&sign_with(&env, &key, "rotated-2", "u-1"), PATH)
            .await
            .status,
        200
    );
    assert_eq!(server.fetches(), 2);
}

#[tokio::test]
async fn a_burst_of_unknown_kids_causes_at_most_one_fetch_per_interval() {
    let server = Arc::new(JwksServer::start(None).await);
    let env = Arc::new(with_jwks_url(&server, "").await);
    let (key, _) = new_key("unused");
    let mut burst = JoinSet::new();
    for i in 0..100 {
        let env = env.clone();
        let jwt = sign_with(
            &env,
            &key,
            &format!("random-kid-{i}-{}", rand::random::<u32>()),
            "u-1",
        );
        burst.spawn(async move { env.get_bearer(&jwt, PATH).await.status });
    }
    while let Some(status) = burst.join_next().await {
        assert_eq!(status.unwrap(), 401);
    }
    assert!(
        server.fetches() <= 2,
        "{} fetches for 100 unknown kids",
        server.fetches()
    );
    assert_eq!(env.emulator.jobs_requests(), 0);
}

#[tokio::test]
async fn jwks_down_at_start_up_is_503_not_401_and_recovers_without_restart() {
    let server = Arc::new(JwksServer::start(None).await);
    let env = TestEnv::start_with(Options {
        jwks_url: Some(server.url.clone()),
        auth_extra: "jwks_min_refetch_s = 0",
        ..Options::default()
    })
    .await;
    let reply = env.get_bearer(&env.token("u-1"), PATH).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error().0, "jwks_unavailable");
    assert!(reply.headers.contains_key("retry-after"));
    assert!(!reply.headers.contains_key("www-authenticate"));

    server.set(Some(
        std::fs::read_to_string(env.certs().join(JWKS)).unwrap(),
    ));
    assert_eq!(env.get_bearer(&env.token("u-1"), PATH).await.status, 200);
}

#[tokio::test]
async fn a_required_typ_is_enforced() {
    let env = TestEnv::start_with(Options {
        auth_extra: "typ = \"at+jwt\"",
        ..Options::default()
    })
    .await;
    // dev tokens carry typ "JWT".
    let reply = env.get_bearer(&env.token("u-1"), PATH).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.error().0, "invalid_token");
    assert_eq!(env.emulator.jobs_requests(), 0);
}

async fn exchange_env() -> Arc<TestEnv> {
    Arc::new(
        TestEnv::start_with(Options {
            exchange: true,
            ..Options::default()
        })
        .await,
    )
}

#[tokio::test]
async fn fifty_concurrent_first_requests_cause_one_exchange() {
    let env = exchange_env().await;
    let mut requests = JoinSet::new();
    for _ in 0..50 {
        let env = env.clone();
        let jwt = env.token("u-7");
        requests.spawn(async move { env.get_bearer(&jwt, PATH).await.status });
    }
    while let Some(status) = requests.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(env.emulator.exchanges(), 1);
    assert_eq!(env.emulator.jobs_requests(), 50);
}

#[tokio::test]
async fn ten_users_cause_ten_exchanges() {
    let env = exchange_env().await;
    let mut requests = JoinSet::new();
    for user in 0..10 {
        for _ in 0..3 {
            let env = env.clone();
            let jwt = env.token(&format!("user-{user}"));
            requests.spawn(async move { env.get_bearer(&jwt, PATH).await.status });
        }
    }
    while let Some(status) = requests.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(env.emulator.exchanges(), 10);
}

#[tokio::test]
async fn a_revoked_token_is_replaced_and_the_request_retried_once() {
    let env = exchange_env().await;
    assert_eq!(env.get_bearer(&env.token("u-1"), PATH).await.status, 200);
    assert_eq!(
        (env.emulator.exchanges(), env.emulator.jobs_requests()),
        (1, 1)
    );
    let first = env.emulator.last_request().unwrap().headers["authorization"].clone();

    env.emulator.revoke_user("u-1");
    let reply = env.get_bearer(&env.token("u-1"), PATH).await;
    assert_eq!(reply.status, 200);
    assert_eq!(env.emulator.exchanges(), 2, "one new exchange");
    assert_eq!(
        env.emulator.jobs_requests(),
        3,
        "the refused request and one retry"
    );
    let recorded = env.emulator.recorded();
    let retry = &recorded[2].headers;
    assert_ne!(
        retry["authorization"], first,
        "the retry carries the new token"
    );
    assert!(retry.contains_key("x-date"));
}

#[tokio::test]
async fn permanently_refused_credentials_are_502_after_one_retry() {
    let env = exchange_env().await;
    env.emulator.set_fault(Fault::Status(401));
    let reply = env.get_bearer(&env.token("u-1"), PATH).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error().0, "upstream_credentials_rejected");
    assert_eq!(env.emulator.jobs_requests(), 2);
    assert_eq!(env.emulator.exchanges(), 2);
}

#[tokio::test]
async fn token_endpoint_failures_are_fast_503s_never_401s() {
    for fault in [
        Fault::Status(500),
        Fault::Status(401),
        Fault::GarbageBody,
        Fault::HtmlError,
        Fault::BadExpiry(0),
        Fault::BadExpiry(-30),
        Fault::BadExpiry(10_i64.pow(12)),
        Fault::DropConnection,
    ] {
        let env = exchange_env().await;
        env.emulator.set_token_fault(fault.clone());
        let reply = env.get_bearer(&env.token("u-1"), PATH).await;
        assert_eq!(reply.status, 503, "{fault:?}");
        assert_eq!(reply.error().0, "upstream_token_unavailable", "{fault:?}");
        let retry_after: u64 = reply.header("retry-after").parse().unwrap();
        assert!((1..=30).contains(&retry_after), "{fault:?}");
        // Within the back-off the next caller fails fast, without a call.
        let exchanges = env.emulator.exchanges();
        assert_eq!(env.get_bearer(&env.token("u-1"), PATH).await.status, 503);
        assert_eq!(env.emulator.exchanges(), exchanges, "{fault:?}");
        assert_eq!(env.emulator.jobs_requests(), 0, "{fault:?}");
        // The exchange's warning names the request that caused it.
        let trace_id = reply.header("x-traceid");
        let log = env.log();
        let warning = log
            .lines()
            .find(|l| l.contains("token exchange failed"))
            .unwrap_or_else(|| panic!("no warning for {fault:?}:\n{log}"));
        assert!(
            warning.contains(&format!("trace_id={trace_id}")),
            "{warning}"
        );
        // And the access line says why the 503 happened.
        let access = env.access_text(trace_id);
        assert!(access.contains("side=\"token_endpoint\""), "{access}");
        assert!(
            access.contains("cause=\"KooDrive token unavailable: token endpoint"),
            "{access}"
        );
    }
}

#[tokio::test]
async fn no_secret_reaches_the_log_or_an_error_body() {
    let env = exchange_env().await;
    let jwt = env.token("u-9");
    let ok = env.get_bearer(&jwt, PATH).await;
    assert_eq!(ok.status, 200);
    let koodrive_token = env.emulator.last_request().unwrap().headers["authorization"]
        .to_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_owned();
    env.emulator.set_fault(Fault::Status(401));
    let refused = env.get_bearer(&jwt, PATH).await;
    env.emulator.set_token_fault(Fault::Status(500));
    let failing = env.get_bearer(&jwt, PATH).await;
    let log = env.log();
    assert!(log.contains("status=502"), "the log captured the requests");
    for secret in [jwt.as_str(), koodrive_token.as_str(), CLIENT_SECRET] {
        assert!(!log.contains(secret), "secret in the log");
        for reply in [&ok, &refused, &failing] {
            assert!(
                !String::from_utf8_lossy(&reply.body).contains(secret),
                "secret in a body"
            );
        }
    }
}

/// Lets spawned work that needs only I/O (not time) finish.
async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..200_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition not reached");
}

#[tokio::test(start_paused = true)]
async fn tokens_are_refreshed_ahead_and_served_until_expiry_when_the_endpoint_is_down() {
    let _frozen = freeze_time();
    let env = exchange_env().await;
    // 600 s tokens, 60 s margin: usable 540 s, refreshed from 405 s on.
    env.emulator.set_token_ttl(Duration::from_secs(600));
    let token_of =
        |env: &TestEnv| env.emulator.last_request().unwrap().headers["authorization"].clone();

    assert_eq!(env.get_bearer(&env.token("u-1"), PATH).await.status, 200);
    let first = token_of(&env);
    tokio::time::advance(Duration::from_secs(410)).await;
    assert_eq!(
        env.get_bearer(&env.token("u-1"), PATH).await.status,
        200,
        "served while refreshing"
    );
    assert_eq!(token_of(&env), first, "the cached token is still used");
    until(|| env.emulator.exchanges() == 2).await;
    assert_eq!(env.get_bearer(&env.token("u-1"), PATH).await.status, 200);
    assert_ne!(token_of(&env), first, "the refreshed token is used");

    // The endpoint goes down; the second token (received at 410 s, usable
    // until 950 s) keeps being served, past failed background refreshes.
    env.emulator.set_token_fault(Fault::Status(500));
    tokio::time::advance(Duration::from_secs(490)).await; // 900 s
    assert_eq!(env.get_bearer(&env.token("u-1"), PATH).await.status, 200);
    until(|| env.emulator.exchanges() == 3).await;
    tokio::time::advance(Duration::from_secs(49)).await; // 949 s
    assert_eq!(env.get_bearer(&env.token("u-1"), PATH).await.status, 200);
    tokio::time::advance(Duration::from_secs(2)).await; // 951 s: expired
    let reply = env.get_bearer(&env.token("u-1"), PATH).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error().0, "upstream_token_unavailable");
    assert!(reply.headers.contains_key("retry-after"));
}

#[tokio::test(start_paused = true)]
async fn the_key_set_is_refreshed_ahead_of_its_max_age() {
    let _frozen = freeze_time();
    let server = Arc::new(JwksServer::start(None).await);
    server.set_max_age(Some(40));
    let env = with_jwks_url(&server, "").await;
    assert_eq!(server.fetches(), 1);
    // Three quarters of 40 s: no refresh at 29 s, one by 31 s.
    tokio::time::advance(Duration::from_secs(29)).await;
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(server.fetches(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    until(|| server.fetches() == 2).await;
    // Let the refresh finish reading its answer before time moves on.
    for _ in 0..10_000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(env.get_bearer(&env.token("u-1"), PATH).await.status, 200);
    // A refresh that fails keeps the last good key set. (The first attempt
    // may fail on a pooled connection the server closed while time jumped;
    // the 1 s retry then reaches it.)
    server.set(None);
    tokio::time::advance(Duration::from_secs(31)).await;
    for _ in 0..5 {
        for _ in 0..10_000 {
            tokio::task::yield_now().await;
        }
        if server.fetches() >= 3 {
            break;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert!(server.fetches() >= 3, "the refresh was attempted");
    assert_eq!(env.get_bearer(&env.token("u-1"), PATH).await.status, 200);
    assert_eq!(env.admin_status("/readyz").await, 200);
}
