//! The jobs schema and routing, end to end: every bad input is a 400 that
//! names the parameter, and none reaches KooDrive.

use http::Version;

use crate::support::TestEnv;

const JOBS: &str = "/koodrive/ose/v1/jobs";

/// (query, parameter the message must name, expected code)
const BAD_QUERIES: &[(&str, &str, &str)] = &[
    ("", "offset", "missing_parameter"),
    ("limit=10", "offset", "missing_parameter"),
    ("offset=0", "limit", "missing_parameter"),
    ("offset=0&limit=1&limit=2", "limit", "repeated_parameter"),
    ("offset=0&offset=0&limit=1", "offset", "repeated_parameter"),
    (
        "offset=0&limit=1&type=1&type=2",
        "type",
        "repeated_parameter",
    ),
    (
        "offset=0&limit=1&status=1&status=1",
        "status",
        "repeated_parameter",
    ),
    ("offset=0&limit=1&page=2", "page", "unknown_parameter"),
    ("offset=0&limit=1&Offset=1", "Offset", "unknown_parameter"),
    ("offset=0&limit=1&=1", "", "unknown_parameter"),
    ("offset=%2B5&limit=1", "offset", "invalid_parameter"),
    ("offset=+5&limit=1", "offset", "invalid_parameter"),
    ("offset=-1&limit=1", "offset", "invalid_parameter"),
    ("offset=1e2&limit=1", "offset", "invalid_parameter"),
    ("offset=0x10&limit=1", "offset", "invalid_parameter"),
    ("offset=%205&limit=1", "offset", "invalid_parameter"),
    ("offset=5%20&limit=1", "offset", "invalid_parameter"),
    (
        "offset=9223372036854775808&limit=1",
        "offset",
        "invalid_parameter",
    ),
    (
        "offset=18446744073709551616&limit=1",
        "offset",
        "invalid_parameter",
    ),
    ("offset=%EF%BC%95&limit=1", "offset", "invalid_parameter"),
    ("offset=%D9%A5&limit=1", "offset", "invalid_parameter"),
    ("offset=&limit=1", "offset", "invalid_parameter"),
    ("offset&limit=1", "offset", "invalid_parameter"),
    ("offset=1.5&limit=1", "offset", "invalid_parameter"),
    ("offset=0&limit=0", "limit", "invalid_parameter"),
    ("offset=0&limit=101", "limit", "invalid_parameter"),
    ("offset=0&limit=", "limit", "invalid_parameter"),
    ("offset=0&limit=-5", "limit", "invalid_parameter"),
    ("offset=0&limit=ten", "limit", "invalid_parameter"),
    ("offset=0&limit=1&type=0", "type", "invalid_parameter"),
    ("offset=0&limit=1&type=8", "type", "invalid_parameter"),
    ("offset=0&limit=1&type=", "type", "invalid_parameter"),
    ("offset=0&limit=1&status=4", "status", "invalid_parameter"),
    ("offset=0&limit=1&status=-0", "status", "invalid_parameter"),
    ("offset=0&limit=1&status=%00", "status", "invalid_parameter"),
    (
        "offset=0&limit=00000000000000000000000000000000001",
        "limit",
        "invalid_parameter",
    ),
];

#[tokio::test]
async fn bad_queries_are_400s_naming_the_parameter_and_never_reach_upstream() {
    let env = TestEnv::start().await;
    let auth = format!("Bearer {}", env.token("u-1"));
    for (query, name, code) in BAD_QUERIES {
        let reply = env
            .send(
                Version::HTTP_11,
                "GET",
                &format!("{JOBS}?{query}"),
                &[("authorization", &auth)],
                None,
            )
            .await;
        assert_eq!(reply.status, 400, "{query}");
        let (got_code, msg) = reply.error();
        assert_eq!(&got_code, code, "{query}: {msg}");
        assert!(msg.contains(&format!("`{name}`")), "{query}: {msg}");
    }
    assert_eq!(
        env.emulator.jobs_requests(),
        0,
        "a bad request reached KooDrive"
    );
}

#[tokio::test]
async fn leading_zeros_are_accepted_and_dropped_upstream() {
    let env = TestEnv::start().await;
    let reply = env
        .get_as("u-1", &format!("{JOBS}?offset=0&limit=007"))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["data"].as_array().unwrap().len(), 7);
    assert_eq!(
        env.emulator.last_request().unwrap().query.as_deref(),
        Some("offset=0&limit=7")
    );
}

#[tokio::test]
async fn boundaries_are_accepted() {
    let env = TestEnv::start().await;
    for query in [
        "offset=0&limit=1",
        "offset=0&limit=100",
        "offset=9223372036854775807&limit=1&type=1&status=0",
        "offset=0&limit=1&type=7&status=3",
    ] {
        let reply = env.get_as("u-1", &format!("{JOBS}?{query}")).await;
        assert_eq!(reply.status, 200, "{query}");
    }
}

#[tokio::test]
async fn other_paths_are_404_and_other_methods_405_with_allow() {
    let env = TestEnv::start().await;
    let auth = format!("Bearer {}", env.token("u-1"));
    for path in [
        "/",
        "/koodrive/ose/v1/jobs/",
        "/koodrive/ose/v1/tasks",
        "/healthz",
    ] {
        let reply = env
            .send(
                Version::HTTP_2,
                "GET",
                path,
                &[("authorization", &auth)],
                None,
            )
            .await;
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(reply.error().0, "not_found");
    }
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let reply = env
            .send(
                Version::HTTP_11,
                method,
                &format!("{JOBS}?offset=0&limit=1"),
                &[("authorization", &auth)],
                None,
            )
            .await;
        assert_eq!(reply.status, 405, "{method}");
        assert_eq!(reply.header("allow"), "GET");
        assert_eq!(reply.error().0, "method_not_allowed");
    }
    assert_eq!(env.emulator.jobs_requests(), 0);
}

#[tokio::test]
async fn a_body_on_the_get_is_rejected() {
    let env = TestEnv::start().await;
    let auth = format!("Bearer {}", env.token("u-1"));
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let reply = env
            .send(
                version,
                "GET",
                &format!("{JOBS}?offset=0&limit=1"),
                &[("authorization", &auth)],
                Some("{}"),
            )
            .await;
        assert_eq!(reply.status, 400, "{version:?}");
        assert_eq!(reply.error().0, "body_not_allowed");
    }
    assert_eq!(env.emulator.jobs_requests(), 0);
}

#[tokio::test]
async fn a_bad_language_header_is_a_400_naming_it() {
    let env = TestEnv::start().await;
    let reply = env
        .get_with(
            "u-1",
            &format!("{JOBS}?offset=0&limit=1"),
            &[("language", "en-US;q=0.9")],
        )
        .await;
    assert_eq!(reply.status, 400);
    let (code, msg) = reply.error();
    assert_eq!(code, "invalid_header");
    assert!(msg.contains("`language`"));
    assert_eq!(env.emulator.jobs_requests(), 0);
}

#[tokio::test]
async fn trace_ids_are_kept_bridged_or_generated() {
    let env = TestEnv::start().await;
    let auth = format!("Bearer {}", env.token("u-1"));
    let path = format!("{JOBS}?offset=0&limit=1");
    let kept = env
        .send(
            Version::HTTP_11,
            "GET",
            &path,
            &[("authorization", &auth), ("x-traceid", "abc-123_X")],
            None,
        )
        .await;
    assert_eq!(kept.header("x-traceid"), "abc-123_X");
    let bridged = env
        .send(
            Version::HTTP_11,
            "GET",
            &path,
            &[
                ("authorization", &auth),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            ],
            None,
        )
        .await;
    assert_eq!(
        bridged.header("x-traceid"),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        env.emulator.last_request().unwrap().headers["x-traceid"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    // An invalid one is replaced, on errors too.
    let generated = env
        .send(
            Version::HTTP_11,
            "GET",
            "/nope",
            &[("x-traceid", "bad id!")],
            None,
        )
        .await;
    let id = generated.header("x-traceid");
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(generated.json()["traceId"], id);
}
