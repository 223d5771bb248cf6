//! Shutdown: in-flight requests finish, readiness turns false, new
//! connections are refused.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Version};
use http_body_util::Full;
use koodrive_gateway::config::{Bound, NUMERIC_KEYS};
use koodrive_gateway::devcerts::JWKS;
use koodrive_gateway::emulator::Fault;

use crate::support::{client, JwksServer, Options, TestEnv};

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_reports_not_ready() {
    // In-flight requests get 5 s to finish (the harness's default is 100 ms).
    let env = TestEnv::start_with(Options {
        edit_config: Some(Box::new(|toml| {
            toml.replace("drain_timeout_ms = 100", "drain_timeout_ms = 5000")
        })),
        ..Options::default()
    })
    .await;
    env.emulator
        .set_fault(Fault::Latency(Duration::from_millis(500)));
    let request = Request::get(format!(
        "https://localhost:{}/koodrive/ose/v1/jobs?offset=0&limit=1",
        env.addr.port()
    ))
    .header("authorization", format!("Bearer {}", env.token("u-1")))
    .body(Full::default())
    .unwrap();
    let https = client(&env.certs().join("ca.crt"), Version::HTTP_11);
    let in_flight = tokio::spawn(async move { https.request(request).await.map(|r| r.status()) });
    for _ in 0..500 {
        if env.emulator.jobs_requests() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(env.emulator.jobs_requests(), 1, "the request is in flight");
    assert_eq!(env.admin_status("/readyz").await, 200);

    env.shutdown();
    let mut not_ready = false;
    for _ in 0..100 {
        if env.admin_status("/readyz").await == 503 {
            not_ready = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(not_ready, "readiness turns false while draining");
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(env.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "no new connections once shutdown starts");
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "the in-flight request finished"
    );
}

/// Sets every key of the bounds table to the value `pick` chooses.
fn every_numeric_key(pick: fn(&Bound) -> u64) -> Box<dyn FnOnce(String) -> String> {
    Box::new(move |text| {
        let mut table: toml::Table = text.parse().unwrap();
        for bound in NUMERIC_KEYS {
            let (section, key) = bound.key.split_once('.').unwrap();
            let value = i64::try_from(pick(bound)).unwrap();
            // Optional sections (`[rate_limit]`, `[audit]`) are added.
            let section = table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap();
            section.insert(key.into(), toml::Value::Integer(value));
            if bound.key.starts_with("audit.") {
                section.insert("path".into(), toml::Value::String("-".into()));
            }
        }
        table.to_string()
    })
}

/// A gateway with keys from a JWKS URL (so the refresh task runs), token
/// exchange and the cache on: every numeric key is in use.
async fn start_with_every_numeric_key(pick: fn(&Bound) -> u64) -> (TestEnv, Arc<JwksServer>) {
    let jwks = Arc::new(JwksServer::start(None).await);
    let serving = jwks.clone();
    let env = TestEnv::start_with(Options {
        exchange: true,
        jwks_url: Some(jwks.url.clone()),
        before_start: Some(Box::new(move |certs| {
            serving.set(Some(std::fs::read_to_string(certs.join(JWKS)).unwrap()));
        })),
        edit_config: Some(every_numeric_key(pick)),
        ..Options::default()
    })
    .await;
    (env, jwks)
}

#[tokio::test]
async fn every_numeric_key_at_its_upper_bound_serves_and_caches() {
    let (env, _jwks) = start_with_every_numeric_key(|b| b.max).await;
    let first = env
        .get_as("u-1", "/koodrive/ose/v1/jobs?offset=0&limit=1")
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let second = env
        .get_as("u-1", "/koodrive/ose/v1/jobs?offset=0&limit=1")
        .await;
    assert_eq!(second.header("x-cache"), "HIT");
    assert_eq!(env.admin_status("/readyz").await, 200);
}

#[tokio::test]
async fn every_numeric_key_at_its_lower_bound_answers_without_panicking() {
    // A 1 ms timeout and a 256-byte token limit refuse the request; what
    // matters is a normalized answer from a gateway that keeps serving.
    let (env, _jwks) = start_with_every_numeric_key(|b| b.min).await;
    for _ in 0..2 {
        let reply = env
            .get_as("u-1", "/koodrive/ose/v1/jobs?offset=0&limit=1")
            .await;
        assert_ne!(reply.status, 500);
        if reply.status != 200 {
            reply.error();
        }
    }
    assert_eq!(env.admin_status("/healthz").await, 200);
}
