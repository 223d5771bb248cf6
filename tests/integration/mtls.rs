//! mTLS (`server.client_ca`): no client certificate, or one from another
//! CA, is refused at the handshake; a verified one is served and its
//! identity lands in the audit record — beside the JWT's user, which still
//! decides whose data is read.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::support::pki::{self, Issued, Pki};
use crate::support::{Options, TestEnv};

const SPIFFE_ID: &str = "spiffe://cluster.local/ns/apps/sa/batch-app";

/// A gateway requiring client certificates from `pki`, auditing to
/// `audit`.
async fn mutual_env(pki: &Pki, dir: &std::path::Path) -> TestEnv {
    let ca = dir.join("client-ca.crt");
    std::fs::write(&ca, &pki.ca).unwrap();
    let audit = dir.join("audit.log");
    TestEnv::start_with(Options {
        edit_config: Some(Box::new(move |toml| {
            toml.replacen(
                "[server]",
                &format!("[server]\nclient_ca = \"{}\"", ca.display()),
                1,
            )
        })),
        sections: format!("[audit]\npath = \"{}\"\n", audit.display()),
        ..Options::default()
    })
    .await
}

/// One HTTP/1.1 GET of the jobs path as `u-1` on a new connection
/// presenting `client` (or no certificate).
async fn get(env: &TestEnv, client: Option<&Issued>, trace_id: &str) -> Result<u16, String> {
    get_bearer(env, client, trace_id, &env.token("u-1")).await
}

async fn get_bearer(
    env: &TestEnv,
    client: Option<&Issued>,
    trace_id: &str,
    jwt: &str,
) -> Result<u16, String> {
    let dev_ca = std::fs::read_to_string(env.certs().join("ca.crt")).unwrap();
    let config = pki::client_config(&dev_ca, client, &[b"http/1.1"]);
    let stream = pki::connect(&env.addr.to_string(), config)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = Request::get("/koodrive/ose/v1/jobs?offset=0&limit=1")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {jwt}"))
        .header("x-traceid", trace_id)
        .body(Full::<Bytes>::default())
        .unwrap();
    // With TLS 1.3 the server's refusal arrives after the client's side
    // of the handshake is done: it shows on the first exchange.
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

/// The audit record with `trace_id`, waiting up to 5 s for it.
async fn audit_record(path: &std::path::Path, trace_id: &str) -> Value {
    for _ in 0..250 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(trace_id)) {
            return serde_json::from_str(line).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no audit record for {trace_id}");
}

#[tokio::test]
async fn a_verified_client_certificate_is_served_and_named_in_the_audit_record() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("mesh CA");
    let env = mutual_env(&pki, dir.path()).await;
    let client = pki.client(SPIFFE_ID);
    assert_eq!(get(&env, Some(&client), "mtls-ok").await, Ok(200));
    let record = audit_record(&dir.path().join("audit.log"), "mtls-ok").await;
    assert_eq!(record["client_identity"], SPIFFE_ID);
    assert_eq!(record["user_id"], "u-1", "the JWT still names the user");
    // A certificate does not stand in for the JWT.
    let forged = format!("{}x", env.token("u-1"));
    assert_eq!(
        get_bearer(&env, Some(&client), "mtls-bad-jwt", &forged).await,
        Ok(401)
    );
}

#[tokio::test]
async fn a_handshake_without_a_client_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("mesh CA");
    let env = mutual_env(&pki, dir.path()).await;
    let refused = get(&env, None, "mtls-none").await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(env.emulator.jobs_requests(), 0);
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("mesh CA");
    let env = mutual_env(&pki, dir.path()).await;
    let stranger = Pki::new("another CA").client(SPIFFE_ID);
    let refused = get(&env, Some(&stranger), "mtls-other").await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(env.emulator.jobs_requests(), 0);
    // The refusal is the handshake's: a valid client is still served.
    assert_eq!(
        get(&env, Some(&pki.client(SPIFFE_ID)), "mtls-then-ok").await,
        Ok(200)
    );
}

#[tokio::test]
async fn without_client_ca_no_certificate_is_asked_for_and_no_identity_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let env = TestEnv::start_with(Options {
        sections: format!("[audit]\npath = \"{}\"\n", audit.display()),
        ..Options::default()
    })
    .await;
    assert_eq!(get(&env, None, "plain-tls").await, Ok(200));
    let record = audit_record(&audit, "plain-tls").await;
    assert_eq!(record["client_identity"], Value::Null);
}

#[tokio::test]
async fn a_reloaded_client_ca_decides_new_handshakes_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let old = Pki::new("old mesh CA");
    let env = mutual_env(&old, dir.path()).await;
    let old_client = old.client(SPIFFE_ID);
    assert_eq!(get(&env, Some(&old_client), "ca-1").await, Ok(200));

    let new = Pki::new("new mesh CA");
    let ca = dir.path().join("client-ca.crt");
    pki::write_atomically(&ca, &new.ca);
    env.reloader.reload().await;
    assert_eq!(
        get(&env, Some(&new.client(SPIFFE_ID)), "ca-2").await,
        Ok(200)
    );
    assert!(get(&env, Some(&old_client), "ca-3").await.is_err());

    // A file without a certificate is refused; the new CA keeps deciding.
    pki::write_atomically(&ca, "no certificate here\n");
    env.reloader.reload().await;
    let metrics = env.admin_get("/metrics").await;
    assert!(
        metrics.contains("koodrive_gateway_reloads_total{file=\"client_ca\",outcome=\"error\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        get(&env, Some(&new.client(SPIFFE_ID)), "ca-4").await,
        Ok(200)
    );
}
