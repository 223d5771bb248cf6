//! Reload without restart and the drain, on the real binary: SIGHUP and the
//! file watcher swap the certificate and key (new handshakes only), the
//! JWKS and the static tokens, refusing broken files; SIGTERM drains
//! in-flight requests and exits 0, a second SIGTERM exits at once.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use koodrive_gateway::emulator::{Emulator, Fault};

use crate::support::binary::{self, Serving};
use crate::support::client as tls_client;
use crate::support::pki::{self, Pki};

const JOBS: &str = "/koodrive/ose/v1/jobs?offset=0&limit=1";

/// A gateway process serving `tls/server.crt` of a test PKI, with static
/// tokens from `tokens.json`, forwarding to an emulator in this process.
struct Setup {
    dir: tempfile::TempDir,
    pki: Pki,
    emulator: Emulator,
}

impl Setup {
    async fn new() -> Setup {
        koodrive_gateway::server::tls::install_default_providers();
        let dir = binary::workdir();
        let pki = Pki::new("reload test CA");
        std::fs::create_dir(dir.path().join("tls")).unwrap();
        pki.server(1).write(&dir.path().join("tls"), "server");
        std::fs::write(dir.path().join("ca.crt"), &pki.ca).unwrap();
        let emulator = Emulator::start(([127, 0, 0, 1], 0).into(), None)
            .await
            .unwrap();
        emulator.grant("token-1", "u-1");
        std::fs::write(dir.path().join("tokens.json"), r#"{"u-1": "token-1"}"#).unwrap();
        Setup { dir, pki, emulator }
    }

    /// Writes the config (`server_extra` added to `[server]`) and starts
    /// `serve`.
    async fn serve(&self, tls_cert: &str, tls_key: &str, server_extra: &str) -> Serving {
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
tls_cert = "{tls_cert}"
tls_key = "{tls_key}"
dev_certs_dir = "certs/dev"
{server_extra}

[upstream]
base_url = "http://127.0.0.1:{port}"

[auth]
issuer = "https://idp.dev.koodrive-gateway.local"
audience = "koodrive-gateway"
jwks_file = "certs/dev/jwks.json"

[token]
mode = "static"
static_tokens_file = "tokens.json"
"#,
            port = self.emulator.addr().port()
        );
        std::fs::write(self.dir.path().join("config/gateway.toml"), config).unwrap();
        binary::start_serve(self.dir.path(), &[]).await
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    async fn serial(&self, serving: &Serving) -> u64 {
        pki::presented_serial(&serving.addr, &self.pki.ca).await
    }

    /// Polls new handshakes for up to `within` until they present
    /// `serial`; returns how long that took.
    async fn serial_becomes(&self, serving: &Serving, serial: u64, within: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.serial(serving).await == serial {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "serial {serial} not presented within {within:?}; log: {:?}",
            serving.log()
        );
    }

    /// A GET of the jobs path as `user`, on a new connection.
    async fn get_as(&self, serving: &Serving, user: &str) -> u16 {
        let jwt = binary::dev_token(self.path(), user).await;
        let client = tls_client(&self.path().join("ca.crt"), Version::HTTP_11);
        let request = jobs(serving, JOBS, &jwt);
        client.request(request).await.unwrap().status().as_u16()
    }

    /// Waits (at most 5 s) until the emulator has received `count` jobs
    /// requests: they are in flight, held by its latency.
    async fn in_flight(&self, count: u64) {
        for _ in 0..500 {
            if self.emulator.jobs_requests() == count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(self.emulator.jobs_requests(), count, "requests in flight");
    }
}

/// A GET of `path_and_query` on the gateway with `jwt`.
fn jobs(serving: &Serving, path_and_query: &str, jwt: &str) -> Request<Full<Bytes>> {
    Request::get(format!(
        "https://localhost:{}{path_and_query}",
        serving.port()
    ))
    .header("authorization", format!("Bearer {jwt}"))
    .body(Full::default())
    .unwrap()
}

/// Sends SIGHUP and waits until the reload it started has finished.
async fn sighup(serving: &Serving) {
    let before = count(serving, "reload done");
    serving.signal("HUP").await;
    for _ in 0..500 {
        if count(serving, "reload done") > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("SIGHUP did not reload: {:?}", serving.log());
}

fn count(serving: &Serving, needle: &str) -> usize {
    serving.log().iter().filter(|l| l.contains(needle)).count()
}

/// `reloads_total` for `file` and `outcome`.
async fn reloads(serving: &Serving, file: &str, outcome: &str) -> f64 {
    serving
        .metric_sum(&format!(
            "koodrive_gateway_reloads_total{{file=\"{file}\",outcome=\"{outcome}\"}}"
        ))
        .await
}

/// An HTTP/1.1 connection kept open across reloads.
async fn keep_alive(
    serving: &Serving,
    ca: &str,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = pki::connect(&serving.addr, pki::client_config(ca, None, &[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(pki::serial_of(&stream), 1);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    jwt: &str,
) -> u16 {
    let request = Request::get(JOBS)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {jwt}"))
        .body(Full::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    response.into_body().collect().await.unwrap();
    status
}

#[tokio::test]
async fn sighup_swaps_the_certificate_for_new_handshakes_and_refuses_broken_ones() {
    let setup = Setup::new().await;
    let serving = setup
        .serve("tls/server.crt", "tls/server.key", "watch_files = false")
        .await;
    let jwt = binary::dev_token(setup.path(), "u-1").await;
    let mut existing = keep_alive(&serving, &setup.pki.ca).await;
    assert_eq!(get_on(&mut existing, &jwt).await, 200);
    assert_eq!(setup.serial(&serving).await, 1);

    // A new pair on disk is not used until SIGHUP (the watcher is off).
    let tls = setup.path().join("tls");
    setup.pki.server(2).write(&tls, "server");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(setup.serial(&serving).await, 1, "no reload without SIGHUP");
    sighup(&serving).await;
    assert_eq!(setup.serial(&serving).await, 2, "new handshakes");
    assert_eq!(
        get_on(&mut existing, &jwt).await,
        200,
        "the existing connection keeps working"
    );
    assert_eq!(reloads(&serving, "server_cert", "ok").await, 1.0);

    // A corrupt certificate is refused; the previous one keeps serving.
    pki::write_atomically(
        &tls.join("server.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    sighup(&serving).await;
    assert_eq!(setup.serial(&serving).await, 2);
    assert_eq!(reloads(&serving, "server_cert", "error").await, 1.0);

    // So is a certificate whose key is another's.
    let third = setup.pki.server(3);
    pki::write_atomically(&tls.join("server.crt"), &third.cert);
    pki::write_atomically(&tls.join("server.key"), &setup.pki.server(4).key);
    sighup(&serving).await;
    assert_eq!(setup.serial(&serving).await, 2);
    assert_eq!(reloads(&serving, "server_cert", "error").await, 2.0);
    let refusals: Vec<_> = serving
        .log()
        .into_iter()
        .filter(|l| l.contains("reload refused"))
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(
        refusals[1].contains("do not form a pair"),
        "the reason is logged: {refusals:?}"
    );

    // Made whole again, it is taken.
    pki::write_atomically(&tls.join("server.key"), &third.key);
    sighup(&serving).await;
    assert_eq!(setup.serial(&serving).await, 3);
    assert_eq!(get_on(&mut existing, &jwt).await, 200);
    assert!(serving
        .metrics()
        .await
        .contains("koodrive_gateway_server_cert_expiry_timestamp_seconds"));
}

#[tokio::test]
async fn the_file_watcher_swaps_the_certificate_without_sighup() {
    let setup = Setup::new().await;
    let serving = setup.serve("tls/server.crt", "tls/server.key", "").await;
    assert_eq!(setup.serial(&serving).await, 1);
    setup
        .pki
        .server(2)
        .write(&setup.path().join("tls"), "server");
    let took = setup
        .serial_becomes(&serving, 2, Duration::from_secs(5))
        .await;
    eprintln!("the watcher took {took:?}");
    assert_eq!(reloads(&serving, "server_cert", "ok").await, 1.0);

    // A corrupt certificate is refused by the watcher too.
    pki::write_atomically(
        &setup.path().join("tls/server.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    let start = Instant::now();
    while reloads(&serving, "server_cert", "error").await < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            serving.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(setup.serial(&serving).await, 2);
}

#[tokio::test]
async fn a_kubernetes_secret_volume_update_is_picked_up() {
    // A secret volume: the files are links through `..data`, a link to a
    // timestamped directory; an update writes a new directory and renames
    // a new `..data` link over the old one.
    use std::os::unix::fs::symlink;
    let setup = Setup::new().await;
    let volume = setup.path().join("secret");
    std::fs::create_dir_all(volume.join("..2026_11_30_21_00_00.1")).unwrap();
    setup
        .pki
        .server(1)
        .write(&volume.join("..2026_11_30_21_00_00.1"), "tls");
    symlink("..2026_11_30_21_00_00.1", volume.join("..data")).unwrap();
    symlink("..data/tls.crt", volume.join("tls.crt")).unwrap();
    symlink("..data/tls.key", volume.join("tls.key")).unwrap();
    let serving = setup.serve("secret/tls.crt", "secret/tls.key", "").await;
    assert_eq!(setup.serial(&serving).await, 1);

    let next = volume.join("..2026_11_30_22_00_00.2");
    std::fs::create_dir(&next).unwrap();
    setup.pki.server(2).write(&next, "tls");
    symlink("..2026_11_30_22_00_00.2", volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    std::fs::remove_dir_all(volume.join("..2026_11_30_21_00_00.1")).unwrap();
    setup
        .serial_becomes(&serving, 2, Duration::from_secs(5))
        .await;
}

#[tokio::test]
async fn sighup_reloads_the_jwks_and_the_static_tokens_and_keeps_them_when_broken() {
    let setup = Setup::new().await;
    let serving = setup
        .serve("tls/server.crt", "tls/server.key", "watch_files = false")
        .await;
    assert_eq!(setup.get_as(&serving, "u-1").await, 200);
    assert_eq!(setup.get_as(&serving, "u-2").await, 403, "not provisioned");

    // Tokens: a new user is served after SIGHUP.
    setup.emulator.grant("token-2", "u-2");
    let tokens = setup.path().join("tokens.json");
    pki::write_atomically(&tokens, r#"{"u-1": "token-1", "u-2": "token-2"}"#);
    sighup(&serving).await;
    assert_eq!(setup.get_as(&serving, "u-2").await, 200);
    // A broken file keeps the tokens that serve.
    pki::write_atomically(&tokens, r#"{"u-1": "token-1", "u-2": "#);
    sighup(&serving).await;
    assert_eq!(reloads(&serving, "static_tokens_file", "error").await, 1.0);
    assert_eq!(setup.get_as(&serving, "u-2").await, 200);

    // JWKS: a document without a usable key is refused, the dev key keeps
    // verifying.
    let jwks = setup.path().join("certs/dev/jwks.json");
    let dev_jwks = std::fs::read_to_string(&jwks).unwrap();
    pki::write_atomically(&jwks, r#"{"keys": []}"#);
    sighup(&serving).await;
    assert_eq!(reloads(&serving, "jwks_file", "error").await, 1.0);
    assert_eq!(setup.get_as(&serving, "u-1").await, 200);
    // A key set without the dev key: tokens it signed are refused, even
    // the one verified (and cached) before.
    let other = pki::other_jwks();
    pki::write_atomically(&jwks, &other);
    sighup(&serving).await;
    assert_eq!(reloads(&serving, "jwks_file", "ok").await, 1.0);
    assert_eq!(setup.get_as(&serving, "u-1").await, 401);
    pki::write_atomically(&jwks, &dev_jwks);
    sighup(&serving).await;
    assert_eq!(setup.get_as(&serving, "u-1").await, 200);
}

#[tokio::test]
async fn sigterm_drains_twenty_slow_requests_and_exits_zero() {
    let setup = Setup::new().await;
    // Responses take 5 s, so all 20 are still in flight when the drain
    // starts even on a slow machine; the drain allows 15 s.
    let serving = setup
        .serve(
            "tls/server.crt",
            "tls/server.key",
            "drain_timeout_ms = 15000\n[audit]\npath = \"audit.log\"",
        )
        .await;
    let jwt = binary::dev_token(setup.path(), "u-1").await;
    setup
        .emulator
        .set_fault(Fault::Latency(Duration::from_secs(5)));
    // Ten over HTTP/1.1, each on its own connection, and ten streams of one
    // HTTP/2 connection.
    let h1 = tls_client(&setup.path().join("ca.crt"), Version::HTTP_11);
    let h2 = tls_client(&setup.path().join("ca.crt"), Version::HTTP_2);
    let mut in_flight = Vec::new();
    for i in 0..20 {
        let client = if i % 2 == 0 { h1.clone() } else { h2.clone() };
        // Distinct queries, so the cache cannot fold them into one call.
        let query = format!("/koodrive/ose/v1/jobs?offset={i}&limit=1");
        let request = jobs(&serving, &query, &jwt);
        in_flight.push(tokio::spawn(async move {
            let response = client.request(request).await.unwrap();
            let close = response
                .headers()
                .get("connection")
                .is_some_and(|v| v == "close");
            (response.status().as_u16(), response.version(), close)
        }));
    }
    setup.in_flight(20).await;

    let admin = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let readyz = || admin.get(format!("http://{}/readyz", serving.admin).parse().unwrap());
    assert_eq!(readyz().await.unwrap().status(), 200);
    let signalled = Instant::now();
    serving.signal("TERM").await;
    serving.wait_for_line("draining").await;
    // The drain starts a moment after the line: poll.
    let mut not_ready = false;
    let mut refused = false;
    for _ in 0..100 {
        not_ready = not_ready || readyz().await.unwrap().status() == 503;
        refused = refused || tokio::net::TcpStream::connect(&serving.addr).await.is_err();
        if not_ready && refused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(not_ready, "not ready while draining");
    assert!(refused, "new connections are refused");
    // Nor is a new request served on the HTTP/2 connection (GOAWAY).
    let late = jobs(&serving, JOBS, &jwt);
    assert!(
        h2.request(late).await.is_err(),
        "no new request while draining"
    );
    let mut h1_closing = 0;
    for request in in_flight {
        let (status, version, close) = request.await.unwrap();
        assert_eq!(status, 200);
        if version == Version::HTTP_11 && close {
            h1_closing += 1;
        }
    }
    assert_eq!(h1_closing, 10, "HTTP/1.1 responses close their connections");
    let mut child = serving.child;
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exited within the drain timeout")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(15));
    // Every drained request's record was written before exit.
    let audit = std::fs::read_to_string(setup.path().join("audit.log")).unwrap();
    let drained = audit
        .lines()
        .filter(|l| l.contains("\"status\":200") && l.contains("\"decision\":\"forwarded\""))
        .count();
    assert_eq!(drained, 20, "{audit}");
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once() {
    let setup = Setup::new().await;
    let serving = setup
        .serve(
            "tls/server.crt",
            "tls/server.key",
            "drain_timeout_ms = 60000",
        )
        .await;
    let jwt = binary::dev_token(setup.path(), "u-1").await;
    setup
        .emulator
        .set_fault(Fault::Latency(Duration::from_secs(60)));
    let client = tls_client(&setup.path().join("ca.crt"), Version::HTTP_11);
    let request = jobs(&serving, JOBS, &jwt);
    let _in_flight = tokio::spawn(async move { client.request(request).await });
    setup.in_flight(1).await;
    serving.signal("TERM").await;
    serving.wait_for_line("draining").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut child = serving.child;
    assert!(child.try_wait().unwrap().is_none(), "still draining");
    let pid = child.id().unwrap().to_string();
    let second = Instant::now();
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exited at once")
        .unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(second.elapsed() < Duration::from_secs(5));
}
