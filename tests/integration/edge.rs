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
                "shutdown_grace_ms = 100",
                "shutdown_grace_ms = 100\nmax_connections = 2\nhandshake_timeout_ms = 60000",
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
