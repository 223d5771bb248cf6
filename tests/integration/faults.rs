//! Upstream faults become 502/504 normalized bodies with distinct codes, and
//! nothing of the upstream's own error page reaches the client.

use std::time::Duration;

use koodrive_gateway::emulator::Fault;

use crate::support::{Options, TestEnv, USERS};

const PATH: &str = "/koodrive/ose/v1/jobs?offset=0&limit=3";

#[tokio::test]
async fn upstream_faults_map_to_their_codes() {
    let env = TestEnv::start().await;
    let cases = [
        (Fault::Status(500), 502, "500"),
        (Fault::Status(503), 502, "503"),
        (Fault::HtmlError, 502, "upstream_bad_response"),
        (Fault::GarbageBody, 502, "upstream_bad_response"),
        (Fault::EmptyBody(500), 502, "upstream_bad_response"),
        (Fault::EmptyBody(200), 502, "upstream_bad_response"),
        (Fault::Status(404), 502, "upstream_bad_response"),
        (Fault::DropConnection, 502, "upstream_connection_lost"),
        (Fault::Status(401), 502, "upstream_credentials_rejected"),
        (Fault::Status(403), 502, "upstream_credentials_rejected"),
        (Fault::Status(400), 400, "400"),
    ];
    for (fault, status, code) in cases {
        env.emulator.set_fault(fault.clone());
        let reply = env.get_as("u-1", PATH).await;
        assert_eq!(reply.status, status, "{fault:?}");
        assert_eq!(reply.error().0, code, "{fault:?}");
    }
    env.emulator.set_fault(Fault::None);
    assert_eq!(
        env.get_as("u-1", PATH).await.status,
        200,
        "recovers after the fault"
    );
}

#[tokio::test]
async fn an_upstream_html_500_never_leaks_to_the_client() {
    let env = TestEnv::start().await;
    env.emulator.set_fault(Fault::HtmlError);
    let reply = env.get_as("u-1", PATH).await;
    assert_eq!(reply.status, 502);
    let text = String::from_utf8_lossy(&reply.body).to_lowercase();
    for leaked in [
        "<html",
        "jobs.java",
        "internal server error",
        "localhost",
        "127.0.0.1",
    ] {
        assert!(!text.contains(leaked), "{leaked} leaked: {text}");
    }
    assert_eq!(reply.header("content-type"), "application/json");
}

#[tokio::test]
async fn a_refused_gateway_token_is_not_reported_as_the_callers_401() {
    let env = TestEnv::start().await;
    env.emulator.revoke(USERS[0].1);
    let reply = env.get_as(USERS[0].0, PATH).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error().0, "upstream_credentials_rejected");
    assert!(!reply.headers.contains_key("www-authenticate"));
    assert!(
        !String::from_utf8_lossy(&reply.body).contains(USERS[0].1),
        "token leaked"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_upstream_times_out_with_504() {
    let env = TestEnv::start_with(Options {
        timeout_ms: 500,
        ..Options::default()
    })
    .await;
    env.emulator
        .set_fault(Fault::Latency(Duration::from_secs(60)));
    let started = tokio::time::Instant::now();
    let reply = env.get_as("u-1", PATH).await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.error().0, "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "answered before the upstream did"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let env = TestEnv::start_with(Options {
        upstream_override: Some(format!("https://localhost:{port}")),
        ..Options::default()
    })
    .await;
    let reply = env.get_as("u-1", PATH).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error().0, "upstream_unreachable");
    let text = String::from_utf8_lossy(&reply.body);
    assert!(
        !text.contains(&port.to_string()),
        "upstream address leaked: {text}"
    );
}

#[tokio::test]
async fn an_upstream_with_an_untrusted_certificate_is_refused() {
    // A second emulator whose certificate comes from a CA the gateway does
    // not trust: the TLS handshake must fail, nothing is forwarded.
    let other = tempfile::tempdir().unwrap();
    koodrive_gateway::devcerts::ensure(other.path()).unwrap();
    let tls = koodrive_gateway::server::tls::server_config(&koodrive_gateway::config::TlsFiles {
        cert: other.path().join("server.crt"),
        key: other.path().join("server.key"),
        client_ca: None,
    })
    .unwrap();
    let rogue = koodrive_gateway::emulator::Emulator::start(([127, 0, 0, 1], 0).into(), Some(tls))
        .await
        .unwrap();
    let env = TestEnv::start_with(Options {
        upstream_override: Some(format!("https://localhost:{}", rogue.addr().port())),
        ..Options::default()
    })
    .await;
    let reply = env.get_as("u-1", PATH).await;
    assert_eq!(reply.status, 502);
    assert_eq!(rogue.jobs_requests(), 0);
}
