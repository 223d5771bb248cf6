//! `/metrics`: Prometheus text with DESIGN.md's names, counters that move as
//! the traffic predicts, and no principal or user id in any label.

use std::collections::HashMap;
use std::time::Duration;

use tempfile::TempDir;

use crate::support::{audit_records, Options, TestEnv, CLIENT_SECRET};

const PATH: &str = "/koodrive/ose/v1/jobs?offset=0&limit=2";

/// One sample: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Parses the text exposition format (OpenMetrics/Prometheus): comments,
/// `name value` and `name{k="v",…} value` lines, `# EOF` last.
fn parse(text: &str) -> Vec<Sample> {
    assert!(text.trim_end().ends_with("# EOF"), "no # EOF");
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            assert!(
                line.is_empty()
                    || line.starts_with("# TYPE ")
                    || line.starts_with("# HELP ")
                    || line.starts_with("# UNIT ")
                    || line == "# EOF",
                "bad comment: {line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                let mut labels = HashMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                    labels.insert(key.to_owned(), value.trim_end_matches('"').to_owned());
                }
                (name, labels)
            }
            None => (series, HashMap::new()),
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{name}"
        );
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[tokio::test]
async fn metrics_parse_name_everything_and_count_the_traffic() {
    let dir = TempDir::new().unwrap();
    let audit = dir.path().join("audit.log");
    let env = TestEnv::start_with(Options {
        exchange: true,
        cache: "ttl_ms = 60000",
        sections: format!(
            "[rate_limit]\nrequests_per_second = 1000\nburst = 1000\n\
             [rate_limit.overrides]\n\"app-u-3\" = {{ requests_per_second = 1, burst = 5 }}\n\
             [audit]\npath = \"{}\"\n",
            audit.display()
        ),
        ..Options::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(env.get_as("u-1", PATH).await.status, 200);
    }
    let bad = env
        .get_as("u-1", "/koodrive/ose/v1/jobs?offset=0&limit=101")
        .await;
    assert_eq!(bad.status, 400);
    let mut limited = 0;
    for _ in 0..7 {
        if env.get_as("u-3", PATH).await.status == 429 {
            limited += 1;
        }
    }
    assert_eq!(limited, 2);
    // The audit writer is a thread of its own: wait for its 11 records.
    audit_records(&audit, 11).await;

    let text = env.admin_get("/metrics").await;
    let samples = parse(&text);
    for name in [
        "koodrive_gateway_requests_total",
        "koodrive_gateway_request_duration_seconds_bucket",
        "koodrive_gateway_request_duration_seconds_count",
        "koodrive_gateway_cache_requests_total",
        "koodrive_gateway_rate_limited_total",
        "koodrive_gateway_token_exchanges_total",
        "koodrive_gateway_upstream_requests_total",
        "koodrive_gateway_upstream_in_flight",
        "koodrive_gateway_audit_records_total",
        "koodrive_gateway_open_connections",
        "koodrive_gateway_rate_limit_decisions_total",
        "koodrive_gateway_upstream_duration_seconds_count",
        "koodrive_gateway_upstream_clock_skew_seconds",
    ] {
        assert!(
            samples.iter().any(|s| s.name == name),
            "{name} missing:\n{text}"
        );
    }
    for name in [
        "jwks_refreshes",
        "token_refreshes",
        "cache_coalesced",
        "cache_evictions",
    ] {
        assert!(
            text.contains(&format!("# TYPE koodrive_gateway_{name} counter")),
            "{name} missing:\n{text}"
        );
    }

    let requests = "koodrive_gateway_requests_total";
    assert_eq!(value(&samples, requests, &[("status", "200")]), 8.0);
    assert_eq!(
        value(
            &samples,
            requests,
            &[("status", "400"), ("code", "invalid_parameter")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            requests,
            &[("status", "429"), ("code", "rate_limited")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "koodrive_gateway_request_duration_seconds_count",
            &[]
        ),
        11.0
    );
    let cache = "koodrive_gateway_cache_requests_total";
    assert_eq!(value(&samples, cache, &[("result", "miss")]), 2.0);
    assert_eq!(value(&samples, cache, &[("result", "hit")]), 6.0);
    assert_eq!(
        value(&samples, "koodrive_gateway_rate_limited_total", &[]),
        2.0
    );
    let decisions = "koodrive_gateway_rate_limit_decisions_total";
    assert_eq!(value(&samples, decisions, &[("outcome", "admitted")]), 9.0);
    assert_eq!(value(&samples, decisions, &[("outcome", "limited")]), 2.0);
    let exchanges = "koodrive_gateway_token_exchanges_total";
    assert_eq!(value(&samples, exchanges, &[("outcome", "ok")]), 2.0);
    assert_eq!(
        value(
            &samples,
            "koodrive_gateway_upstream_requests_total",
            &[("status", "200")]
        ),
        2.0
    );
    assert_eq!(
        value(&samples, "koodrive_gateway_upstream_in_flight", &[]),
        0.0
    );
    let audit_records = "koodrive_gateway_audit_records_total";
    assert_eq!(
        value(&samples, audit_records, &[("outcome", "written")]),
        11.0
    );
    assert!(value(&samples, "koodrive_gateway_open_connections", &[]) >= 1.0);
    // The emulator stamps Date from the same clock: no skew to speak of.
    assert!(
        value(
            &samples,
            "koodrive_gateway_upstream_clock_skew_seconds",
            &[]
        )
        .abs()
            < 2.0
    );

    // Bounded labels: no principal, user id or secret anywhere.
    for forbidden in ["app-u-1", "app-u-3", "u-1", "u-3", CLIENT_SECRET] {
        for sample in &samples {
            assert!(
                sample.labels.values().all(|v| v != forbidden),
                "{forbidden} in {sample:?}"
            );
        }
    }
    assert!(!text.contains(&env.token("u-1")[..40]));
}

#[tokio::test]
async fn no_secret_appears_in_logs_audit_metrics_or_bodies() {
    let dir = TempDir::new().unwrap();
    let audit = dir.path().join("audit.log");
    let env = TestEnv::start_with(Options {
        exchange: true,
        sections: format!("[audit]\npath = \"{}\"\n", audit.display()),
        ..Options::default()
    })
    .await;
    let jwt = env.token("u-1");
    let mut bodies = Vec::new();
    for path in [PATH, "/koodrive/ose/v1/jobs?offset=0&limit=101", "/nope"] {
        bodies.push(env.get_bearer(&jwt, path).await.body);
    }
    let koodrive_token = env.emulator.last_request().unwrap().headers["authorization"]
        .to_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_owned();
    // A refused token and a failing token endpoint, for the error paths.
    env.emulator.revoke(&koodrive_token);
    bodies.push(env.get_bearer(&jwt, PATH).await.body);
    let audit_text = {
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&audit).unwrap_or_default();
            if text.lines().count() >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        text
    };
    let everything = [
        env.log(),
        audit_text,
        env.admin_get("/metrics").await,
        bodies
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
            .join("\n"),
    ];
    assert!(
        everything[1].lines().count() >= 4,
        "the audit trail was written"
    );
    for (what, text) in ["log", "audit", "metrics", "bodies"]
        .iter()
        .zip(&everything)
    {
        for secret in [jwt.as_str(), koodrive_token.as_str(), CLIENT_SECRET] {
            assert!(!text.contains(secret), "a secret in the {what}");
        }
        // Not even the JWT's signature part.
        let signature = jwt.rsplit('.').next().unwrap();
        assert!(!text.contains(signature), "the JWT signature in the {what}");
    }
}

#[tokio::test]
async fn a_repeated_jwt_is_a_verified_cache_hit() {
    let env = TestEnv::start().await;
    let jwt = env.token("u-1");
    for _ in 0..3 {
        assert_eq!(env.get_bearer(&jwt, PATH).await.status, 200);
    }
    let text = env.admin_get("/metrics").await;
    let samples = parse(&text);
    let lookups = "koodrive_gateway_verified_cache_requests_total";
    // Verified in full once; the two repeats skipped the signature check.
    assert_eq!(value(&samples, lookups, &[("result", "miss")]), 1.0);
    assert_eq!(value(&samples, lookups, &[("result", "hit")]), 2.0);
    let signature = jwt.rsplit('.').next().unwrap();
    assert!(!text.contains(signature));
}
