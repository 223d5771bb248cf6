//! A valid request end to end: what the client gets and what KooDrive sees.

use http::Version;
use koodrive_gateway::emulator::X_DATE_WINDOW;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

use crate::support::{task_ids, TestEnv, USERS};

const JOBS: &str = "/koodrive/ose/v1/jobs";

#[tokio::test]
async fn valid_request_returns_the_users_data_over_http1_and_http2() {
    let env = TestEnv::start().await;
    let jwt = env.token("u-1");
    let auth = format!("Bearer {jwt}");
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let reply = env
            .send(
                version,
                "GET",
                &format!("{JOBS}?offset=0&limit=5"),
                &[("authorization", &auth)],
                None,
            )
            .await;
        assert_eq!(reply.status, 200, "{version:?}");
        assert_eq!(reply.version, version);
        let body = reply.json();
        assert_eq!(body["code"], 0);
        let expected: Vec<String> = koodrive_gateway::emulator::data::jobs_of("u-1")
            .into_iter()
            .take(5)
            .map(|j| j.task_id)
            .collect();
        assert_eq!(task_ids(&body), expected);
        assert_eq!(reply.header("content-type"), "application/json");
        // Responses carry only the gateway's own headers.
        for name in reply.headers.keys() {
            assert!(
                [
                    "content-type",
                    "content-length",
                    "cache-control",
                    "x-traceid",
                    "x-cache",
                    "date"
                ]
                .contains(&name.as_str()),
                "unexpected response header {name}"
            );
        }
    }
    assert_eq!(env.emulator.jobs_requests(), 2);
}

#[tokio::test]
async fn upstream_sees_canonical_query_and_stamped_headers_never_the_jwt() {
    let env = TestEnv::start().await;
    let jwt = env.token("u-2");
    let auth = format!("Bearer {jwt}");
    let before = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let reply = env
        .send(
            Version::HTTP_2,
            "GET",
            &format!("{JOBS}?status=2&limit=007&type=3&offset=00"),
            &[
                ("authorization", &auth),
                ("x-traceid", "client-trace-42"),
                // Never trusted: the gateway sets these itself.
                ("x-user-id", "u-1"),
                ("x-date", "20200101T000000Z"),
                ("language", "zh_CN"),
            ],
            None,
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-traceid"), "client-trace-42");

    let seen = env
        .emulator
        .last_request()
        .expect("upstream saw the request");
    assert_eq!(
        seen.query.as_deref(),
        Some("offset=0&limit=7&type=3&status=2")
    );
    let header = |name: &str| {
        seen.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(
        header("authorization").as_deref(),
        Some("Bearer kd-token-for-u-2-9c1d")
    );
    assert_eq!(header("x-user-id").as_deref(), Some("u-2"));
    assert_eq!(header("x-traceid").as_deref(), Some("client-trace-42"));
    assert_eq!(header("language").as_deref(), Some("zh_CN"));
    assert_eq!(seen.headers.get_all("x-user-id").iter().count(), 1);
    assert_eq!(seen.headers.get_all("x-date").iter().count(), 1);

    let x_date = header("x-date").expect("X-Date sent");
    let format = format_description!("[year][month][day]T[hour][minute][second]Z");
    let stamped = PrimitiveDateTime::parse(&x_date, &format)
        .expect("X-Date is yyyyMMdd'T'HHmmss'Z'")
        .assume_utc();
    let after = OffsetDateTime::now_utc();
    assert!(
        stamped >= before && stamped <= after,
        "{x_date} not stamped at send time"
    );
    assert!(after - stamped < X_DATE_WINDOW);

    for (name, value) in seen.headers.iter() {
        assert!(
            !value
                .as_bytes()
                .windows(jwt.len())
                .any(|w| w == jwt.as_bytes()),
            "JWT leaked in {name}"
        );
    }
    // Data is for the token's user, whatever X-User-Id the client sent.
    let body = reply.json();
    assert!(body["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["taskType"] == 3 && j["status"] == 2));
}

#[tokio::test]
async fn language_defaults_to_en_us() {
    let env = TestEnv::start().await;
    assert_eq!(
        env.get_as("u-1", &format!("{JOBS}?offset=0&limit=1"))
            .await
            .status,
        200
    );
    let seen = env.emulator.last_request().unwrap();
    assert_eq!(seen.headers["language"], "en-US");
}

#[tokio::test]
async fn each_user_gets_their_own_jobs() {
    let env = TestEnv::start().await;
    let mut seen = Vec::new();
    for (user, _) in USERS {
        let reply = env.get_as(user, &format!("{JOBS}?offset=0&limit=10")).await;
        assert_eq!(reply.status, 200);
        let ids = task_ids(&reply.json());
        assert_eq!(ids.len(), 10);
        for other in &seen {
            assert_ne!(&ids, other, "two users got the same jobs");
        }
        seen.push(ids);
    }
}

#[tokio::test]
async fn paging_walks_through_the_whole_list() {
    let env = TestEnv::start().await;
    let all = koodrive_gateway::emulator::data::jobs_of("u-3");
    let mut collected = Vec::new();
    let mut offset = 0;
    loop {
        let reply = env
            .get_as("u-3", &format!("{JOBS}?offset={offset}&limit=25"))
            .await;
        assert_eq!(reply.status, 200);
        let ids = task_ids(&reply.json());
        if ids.is_empty() {
            break;
        }
        offset += ids.len();
        collected.extend(ids);
    }
    assert_eq!(
        collected,
        all.into_iter().map(|j| j.task_id).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_cross_the_gateway() {
    let env = TestEnv::start().await;
    let reply = env
        .get_with(
            "u-1",
            &format!("{JOBS}?offset=0&limit=1"),
            &[
                ("connection", "x-secret-hop, keep-alive"),
                ("x-secret-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("upgrade", "websocket"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("cookie", "session=abc"),
                ("x-forwarded-for", "10.9.9.9"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let seen = env.emulator.last_request().unwrap();
    for name in [
        "x-secret-hop",
        "te",
        "proxy-authorization",
        "cookie",
        "x-forwarded-for",
        "upgrade",
        "keep-alive",
    ] {
        assert!(!seen.headers.contains_key(name), "{name} was forwarded");
    }
}

#[tokio::test]
async fn user_without_koodrive_credentials_gets_403() {
    let env = TestEnv::start().await;
    let reply = env
        .get_as("u-unknown", &format!("{JOBS}?offset=0&limit=1"))
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.error().0, "user_not_provisioned");
    assert_eq!(env.emulator.jobs_requests(), 0);
}

#[tokio::test]
async fn the_upstream_gets_a_traceparent_with_the_requests_trace() {
    let env = TestEnv::start().await;
    let path = format!("{JOBS}?offset=0&limit=1");
    // No trace context inbound: the generated trace id is the W3C trace-id.
    let reply = env.get_as("u-1", &path).await;
    let trace_id = reply.header("x-traceid").to_owned();
    let seen = env.emulator.last_request().unwrap();
    let parent = seen.headers["traceparent"].to_str().unwrap().to_owned();
    let parts: Vec<&str> = parent.split('-').collect();
    assert_eq!(parts.len(), 4, "{parent}");
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", trace_id.as_str(), "01")
    );
    assert!(parts[2].len() == 16 && parts[2] != "0000000000000000");

    // An inbound traceparent keeps its trace-id and flags; the span is new.
    let inbound = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    env.get_with("u-1", &path, &[("traceparent", inbound)])
        .await;
    let seen = env.emulator.last_request().unwrap();
    let parent = seen.headers["traceparent"].to_str().unwrap();
    assert!(
        parent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{parent}"
    );
    assert!(parent.ends_with("-00"), "{parent}");
    assert_ne!(parent, inbound);
}
