//! Edge limits: request-head size (431 in the normalized body) and the
//! open-connection cap.

use std::time::Duration;

use http::Version;

use crate::support::{Options, TestEnv};

const PATH: &str = "/koodrive/ose/v1/jobs?offset=0&limit=1";

#[tokio::test]
async fn a_head_over_max_header_bytes_is_431_in_the_normalized_body_over_h1_and_h2() {
    let env = TestEnv::start().await;
    let auth = format!("Bearer {}", env.token("u-1"));
    for version in [Version::HTTP_11, Version::HTTP_2] {
        // The default limit is 16 KiB: 12 KiB of headers pass, 20 KiB not.
        for (size, status) in [(12 * 1024, 200), (20 * 1024, 431)] {
            let filler = "a".repeat(size);
            let reply = env
                .send(
                    version,
                    "GET",
                    PATH,
                    &[("authorization", &auth), ("x-filler", &filler)],
                    None,
                )
                .await;
            assert_eq!(reply.status, status, "{version:?} {size}");
            if status == 431 {
                let (code, msg) = reply.error();
                assert_eq!(code, "headers_too_large");
                assert!(msg.contains("16384"), "{msg}");
            }
        }
    }
    assert_eq!(
        env.emulator.jobs_requests(),
        2,
        "only the small heads were forwarded"
    );
}

#[tokio::test]
async fn beyond_max_connections_accepting_waits_until_one_closes() {
    let env = TestEnv::start_with(Options {
        edit_config: Some(Box::new(|toml| {
            toml.replace(
                "drain_timeout_ms = 100",
                "drain_timeout_ms = 100\nmax_connections = 2\nhandshake_timeout_ms = 60000",
            )
        })),
        ..Options::default()
    })
    .await;
    // Two clients connect and never start TLS: they hold both slots.
    let first = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let second = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = env.get_as("u-1", PATH);
    tokio::pin!(waiting);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut waiting)
            .await
            .is_err(),
        "a third connection was served while two held every slot"
    );
    drop((first, second));
    let reply = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a slot was free");
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn a_missing_doubled_or_foreign_host_is_a_400_over_http1() {
    let env = TestEnv::start().await;
    let token = env.token("u-1");
    let auth = format!("authorization: Bearer {token}\r\n");
    let port = env.addr.port();
    for (target, hosts) in [
        (PATH.to_owned(), String::new()),
        (
            PATH.to_owned(),
            "host: localhost\r\nhost: other\r\n".to_owned(),
        ),
        (
            format!("https://evil.example{PATH}"),
            format!("host: localhost:{port}\r\n"),
        ),
    ] {
        let head = format!("GET {target} HTTP/1.1\r\n{hosts}{auth}x-traceid: host-check\r\nconnection: close\r\n\r\n");
        let response = env.send_raw(head.as_bytes()).await;
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{target} {hosts:?}: {response}"
        );
        assert!(
            response.contains("\"code\":\"invalid_header\""),
            "{response}"
        );
        assert!(response.contains("x-traceid: host-check"), "{response}");
    }
    // With one matching Host it is served.
    let head =
        format!("GET {PATH} HTTP/1.1\r\nhost: localhost:{port}\r\n{auth}connection: close\r\n\r\n");
    assert!(env
        .send_raw(head.as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
    assert_eq!(env.emulator.jobs_requests(), 1);
}

/// A gateway whose `[server]` section also carries `lines`.
async fn with_server(lines: &str) -> TestEnv {
    let lines = lines.to_owned();
    TestEnv::start_with(Options {
        edit_config: Some(Box::new(move |toml| {
            toml.replace(
                "drain_timeout_ms = 100",
                &format!("drain_timeout_ms = 100\n{lines}"),
            )
        })),
        ..Options::default()
    })
    .await
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to the gateway offering `alpn`.
async fn tls_connect(env: &TestEnv, alpn: &[u8]) -> Tls {
    let tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    tls_handshake(env, tcp, alpn).await
}

/// The TLS handshake over an open connection to the gateway.
async fn tls_handshake(env: &TestEnv, tcp: tokio::net::TcpStream, alpn: &[u8]) -> Tls {
    use koodrive_gateway::devcerts;
    use koodrive_gateway::server::tls;
    let mut config = tls::client_config(Some(&env.certs().join(devcerts::CA_CERT))).unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// Writes `bytes` and reads until the gateway closes the connection (at
/// most 5 s, else the test fails): everything it answered, as text.
async fn exchange(stream: &mut Tls, bytes: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(bytes.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .expect("the connection was left open")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// A whole HTTP/1.1 `GET` of the jobs path as `u-1`, closing after it.
fn get_closing(env: &TestEnv) -> String {
    format!(
        "GET {PATH} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
        env.token("u-1")
    )
}

/// How long until the peer closes `stream` (EOF or reset), reading and
/// discarding whatever it sends; `None` if still open after `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

#[tokio::test]
async fn more_header_fields_than_max_headers_is_431_over_h1_and_h2() {
    let env = with_server("max_headers = 20").await;
    let auth = format!("Bearer {}", env.token("u-1"));
    let names: Vec<String> = (0..30).map(|i| format!("x-extra-{i}")).collect();
    for version in [Version::HTTP_11, Version::HTTP_2] {
        // Authorization, Host (h1) and 12 extras are under 20; 25 are over.
        for (extras, status) in [(12, 200), (25, 431)] {
            let mut headers = vec![("authorization", auth.as_str())];
            headers.extend(names.iter().take(extras).map(|n| (n.as_str(), "v")));
            let reply = env.send(version, "GET", PATH, &headers, None).await;
            assert_eq!(reply.status, status, "{version:?} {extras}");
            if status == 431 {
                let (code, msg) = reply.error();
                assert_eq!(code, "headers_too_large");
                assert!(msg.contains("more than 20 header fields"), "{msg}");
                assert!(!reply.header("x-traceid").is_empty());
            }
        }
    }
    assert_eq!(env.emulator.jobs_requests(), 2);
}

#[tokio::test]
async fn a_request_target_over_max_request_target_bytes_is_414_over_h1_and_h2() {
    let env = with_server("max_request_target_bytes = 512").await;
    let auth = format!("Bearer {}", env.token("u-1"));
    // The jobs path and query with an unknown parameter padding it to a
    // total length of `len`: under the limit the schema names the parameter,
    // over it the target is refused before anything else.
    let target = |len: usize| {
        let padded = format!("{PATH}&pad=");
        format!("{padded}{}", "x".repeat(len - padded.len()))
    };
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let reply = env
            .send(
                version,
                "GET",
                &target(512),
                &[("authorization", &auth)],
                None,
            )
            .await;
        assert_eq!(reply.status, 400, "{version:?}");
        assert_eq!(reply.error().0, "unknown_parameter");
        let reply = env
            .send(
                version,
                "GET",
                &target(513),
                &[("authorization", &auth)],
                None,
            )
            .await;
        assert_eq!(reply.status, 414, "{version:?}");
        let (code, msg) = reply.error();
        assert_eq!(code, "uri_too_long");
        assert!(msg.contains("512 bytes"), "{msg}");
        assert!(!reply.header("x-traceid").is_empty());
    }
    assert_eq!(env.emulator.jobs_requests(), 0);
}

#[tokio::test]
async fn a_tls_handshake_not_finished_within_handshake_timeout_is_dropped() {
    let env = with_server("handshake_timeout_ms = 1000").await;
    // Never starts TLS.
    let mut silent = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let closed = closed_within(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent TCP connection was never closed");
    assert!(closed >= Duration::from_millis(900), "{closed:?}");
    // A client that connects, waits half the limit, then handshakes is
    // served.
    let tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut slow = tls_handshake(&env, tcp, b"http/1.1").await;
    let response = exchange(&mut slow, &get_closing(&env)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test]
async fn a_connection_sending_no_request_within_header_read_timeout_of_its_handshake_is_closed() {
    use tokio::io::AsyncWriteExt;
    let env = with_server("header_read_timeout_ms = 1000").await;
    // Silent after the handshake: over HTTP/1.1, and over HTTP/2 without
    // a byte of the preface or stopping inside it.
    let mut h1 = tls_connect(&env, b"http/1.1").await;
    let mut h2 = tls_connect(&env, b"h2").await;
    let mut half_preface = tls_connect(&env, b"h2").await;
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for (what, stream) in [
        ("h1", &mut h1),
        ("h2", &mut h2),
        ("half preface", &mut half_preface),
    ] {
        let closed = closed_within(stream, Duration::from_secs(5)).await;
        let closed = closed.unwrap_or_else(|| panic!("{what}: never closed"));
        assert!(closed < Duration::from_secs(3), "{what}: {closed:?}");
    }
    // A request sent half a second after the handshake is served.
    let mut late = tls_connect(&env, b"http/1.1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let response = exchange(&mut late, &get_closing(&env)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(env.emulator.jobs_requests(), 1);
}

#[tokio::test]
async fn an_h2_connection_idle_for_idle_timeout_is_shut_down_with_goaway() {
    let env = with_server("idle_timeout_ms = 1000\nh2_max_concurrent_streams = 7").await;
    let tls = tls_connect(&env, b"h2").await;
    let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
    let connection = tokio::spawn(connection);
    let auth = format!("Bearer {}", env.token("u-1"));
    let request = || {
        http::Request::get(format!("https://localhost{PATH}"))
            .header("authorization", auth.as_str())
            .body(())
            .unwrap()
    };
    // Requests half a second apart keep it open for longer than the limit.
    for _ in 0..4 {
        client = client.ready().await.expect("connection still open");
        let (response, _) = client.send_request(request(), true).unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The advertised stream limit is the configured one.
    assert_eq!(client.current_max_send_streams(), 7);
    // Then idle: the gateway sends GOAWAY and the connection ends.
    let idle_from = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("an idle connection was kept open");
    assert!(ended.is_ok());
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_millis(400), "{idle:?}");
    assert_eq!(env.emulator.jobs_requests(), 4);
}

#[tokio::test]
async fn a_body_on_the_get_is_refused_and_the_http1_connection_closed() {
    let env = TestEnv::start().await;
    let token = env.token("u-1");
    let mut stream = tls_connect(&env, b"http/1.1").await;
    // A body, then a second request pipelined behind it: the body is never
    // read as a request, and nothing after the refusal is served.
    let head = format!(
        "GET {PATH} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\ncontent-length: 5\r\n\r\nhello\
         GET {PATH} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\n\r\n"
    );
    let response = exchange(&mut stream, &head).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(
        response.contains("\"code\":\"body_not_allowed\""),
        "{response}"
    );
    assert!(response.contains("connection: close"), "{response}");
    assert_eq!(response.matches("HTTP/1.1 ").count(), 1, "{response}");
    // A body closes the connection whatever else is refused first: a POST
    // with a chunked body is 405, and what follows it is not served.
    let mut stream = tls_connect(&env, b"http/1.1").await;
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
         GET {PATH} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\n\r\n"
    );
    let response = exchange(&mut stream, &head).await;
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert!(response.contains("connection: close"), "{response}");
    assert_eq!(response.matches("HTTP/1.1 ").count(), 1, "{response}");
    // Without the body the same request is served.
    assert_eq!(env.get_as("u-1", PATH).await.status, 200);
    assert_eq!(env.emulator.jobs_requests(), 1);
}

#[tokio::test]
async fn an_upstream_body_over_max_response_bytes_is_502() {
    let env = TestEnv::start_with(Options {
        upstream_extra: "max_response_bytes = 2048".into(),
        ..Options::default()
    })
    .await;
    // One job is a few hundred bytes; twenty are several KiB.
    let small = env.get_as("u-1", PATH).await;
    assert_eq!(small.status, 200);
    assert!(small.body.len() < 2048);
    let large = env
        .get_as("u-1", "/koodrive/ose/v1/jobs?offset=0&limit=20")
        .await;
    assert_eq!(large.status, 502);
    let (code, _) = large.error();
    assert_eq!(code, "upstream_bad_response");
}
