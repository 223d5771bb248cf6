//! The access-log line: one per request, with what happened to it.

use std::time::Duration;

use koodrive_gateway::emulator::Fault;

use crate::support::{audit_records, Options, TestEnv};

const PATH: &str = "/koodrive/ose/v1/jobs?offset=0&limit=2";

#[tokio::test]
async fn forwarded_requests_cache_hits_and_rejections_are_logged_with_their_outcome() {
    let env = TestEnv::start_with(Options {
        cache: "ttl_ms = 60000",
        ..Options::default()
    })
    .await;
    let forwarded = env
        .get_with("u-1", PATH, &[("x-traceid", "log-forwarded")])
        .await;
    assert_eq!(forwarded.status, 200);
    let line = env.access_line("log-forwarded");
    assert!(line["client"].starts_with("127.0.0.1:"), "{line:?}");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/koodrive/ose/v1/jobs");
    assert_eq!(line["query"], "offset=0&limit=2");
    assert_eq!(line["principal"], "app-u-1");
    assert_eq!(line["user_id"], "u-1");
    assert_eq!(line["decision"], "forwarded");
    assert_eq!(line["cache"], "MISS");
    assert_eq!(line["upstream_status"], "200");
    let upstream_ms: f64 = line["upstream_ms"].parse().unwrap();
    let latency_ms: f64 = line["latency_ms"].parse().unwrap();
    assert!(upstream_ms > 0.0 && upstream_ms <= latency_ms, "{line:?}");
    assert_eq!(line["status"], "200");
    assert!(!line.contains_key("code"), "{line:?}");

    // Over HTTP/2 too: the client address reaches the record per stream.
    let hit = env
        .send(
            http::Version::HTTP_2,
            "GET",
            PATH,
            &[
                ("authorization", &format!("Bearer {}", env.token("u-1"))),
                ("x-traceid", "log-hit"),
            ],
            None,
        )
        .await;
    assert_eq!(hit.version, http::Version::HTTP_2);
    assert_eq!(hit.header("x-cache"), "HIT");
    let line = env.access_line("log-hit");
    assert_eq!(line["decision"], "cache_hit");
    assert_eq!(line["cache"], "HIT");
    assert!(!line.contains_key("upstream_status"), "{line:?}");
    assert!(!line.contains_key("upstream_ms"), "{line:?}");
    assert!(line["client"].starts_with("127.0.0.1:"), "{line:?}");

    let bad = env
        .get_with(
            "u-1",
            "/koodrive/ose/v1/jobs?offset=0&limit=101",
            &[("x-traceid", "log-bad")],
        )
        .await;
    assert_eq!(bad.status, 400);
    let line = env.access_line("log-bad");
    assert_eq!(line["decision"], "rejected");
    assert_eq!(line["status"], "400");
    assert_eq!(line["code"], "invalid_parameter");
    assert_eq!(line["side"], "client");
    // Not valid, so the raw query is recorded.
    assert_eq!(line["query"], "offset=0&limit=101");
    assert_eq!(line["principal"], "app-u-1");
    assert!(!line.contains_key("cache"), "{line:?}");
    assert!(!line.contains_key("upstream_status"), "{line:?}");
    assert!(line["client"].starts_with("127.0.0.1:"), "{line:?}");
    assert_eq!(env.emulator.jobs_requests(), 1);
}

#[tokio::test]
async fn a_5xx_line_names_its_cause() {
    let env = TestEnv::start_with(Options {
        upstream_override: Some("https://127.0.0.1:1".into()),
        ..Options::default()
    })
    .await;
    let reply = env
        .get_with("u-1", PATH, &[("x-traceid", "log-unreachable")])
        .await;
    assert_eq!(reply.status, 502);
    let line = env.access_line("log-unreachable");
    assert_eq!(line["code"], "upstream_unreachable");
    assert_eq!(line["side"], "upstream");
    assert_eq!(line["decision"], "forwarded");
    assert!(!line.contains_key("upstream_status"), "{line:?}");
    assert!(line.contains_key("upstream_ms"), "{line:?}");
    let log = env.log();
    let full = log
        .lines()
        .find(|l| l.contains("log-unreachable") && l.contains("cause="))
        .unwrap();
    assert!(full.contains("upstream unreachable: "), "{full}");
    assert!(full.to_lowercase().contains("connect"), "{full}");
}

#[tokio::test]
async fn a_request_the_client_abandons_is_still_logged_once() {
    let env = TestEnv::start().await;
    env.emulator
        .set_fault(Fault::Latency(Duration::from_millis(1500)));
    let auth = format!("Bearer {}", env.token("u-1"));
    let headers = [
        ("authorization", auth.as_str()),
        ("x-traceid", "log-abandoned"),
    ];
    // HTTP/2: dropping the request resets its stream.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        env.send(http::Version::HTTP_2, "GET", PATH, &headers, None),
    )
    .await;
    assert!(gave_up.is_err(), "the client gave up first");
    let marker = " request trace_id=log-abandoned ";
    for _ in 0..100 {
        if env.log().contains(marker) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = env.access_line("log-abandoned");
    assert_eq!(line["status"], "499");
    assert_eq!(line["decision"], "abandoned");
    assert_eq!(line["code"], "client_closed_request");
    assert_eq!(line["principal"], "app-u-1");
}

#[tokio::test]
async fn sampled_success_lines_leave_errors_the_audit_trail_and_metrics_whole() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let env = TestEnv::start_with(Options {
        sections: format!(
            "[log]\nsuccess_sample = 5\n[audit]\npath = \"{}\"\n",
            audit.display()
        ),
        ..Options::default()
    })
    .await;
    for i in 0..10 {
        let trace = format!("sampled-{i}");
        let reply = env.get_with("u-1", PATH, &[("x-traceid", &trace)]).await;
        assert_eq!(reply.status, 200);
    }
    let refused = env
        .get_bearer("not-a-jwt", "/koodrive/ose/v1/jobs?offset=0&limit=2")
        .await;
    assert_eq!(refused.status, 401);
    // Requests finish after their responses: wait for the last record.
    audit_records(&audit, 11).await;
    let log = env.log();
    let lines = |needle: &str| {
        log.lines()
            .filter(|l| l.contains("koodrive_gateway::record") && l.contains(needle))
            .count()
    };
    assert_eq!(lines("status=200"), 2, "one success line in 5:\n{log}");
    assert_eq!(lines("status=401"), 1, "every error line:\n{log}");
    assert_eq!(
        audit_records(&audit, 11).await.len(),
        11,
        "every request audited"
    );
    let metrics = env.admin_get("/metrics").await;
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("koodrive_gateway_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, 11.0, "every request counted:\n{metrics}");
}
