//! The audit trail: one JSON line per request whatever its outcome, escaped
//! client text, rotation and reopen, and the delivery guarantee.

use std::path::Path;
use std::time::Duration;

use futures_util::FutureExt;
use http::Version;
use serde_json::Value;
use tempfile::TempDir;

use crate::support::{audit_records, Options, Reply, TestEnv};

const PATH: &str = "/koodrive/ose/v1/jobs?offset=0&limit=2";

/// A gateway auditing into `path`, with `[audit]` lines `audit` and other
/// sections `extra`.
async fn audited_env(path: &Path, audit: &str, extra: &str) -> TestEnv {
    TestEnv::start_with(Options {
        cache: "ttl_ms = 60000",
        sections: format!("{extra}\n[audit]\npath = \"{}\"\n{audit}\n", path.display()),
        ..Options::default()
    })
    .await
}

/// `GET path` as `user` (or without credentials) with trace id `trace`.
async fn get(env: &TestEnv, user: Option<&str>, method: &str, path: &str, trace: &str) -> Reply {
    let auth = user.map(|u| format!("Bearer {}", env.token(u)));
    let mut headers = vec![("x-traceid", trace)];
    if let Some(auth) = &auth {
        headers.push(("authorization", auth));
    }
    env.send(Version::HTTP_11, method, path, &headers, None)
        .await
}

/// Request number `i` of a mix of every kind of outcome.
async fn mixed(env: &TestEnv, i: usize) -> Reply {
    let trace = format!("audit-{i}");
    let paged = format!("/koodrive/ose/v1/jobs?offset={i}&limit=1");
    match i % 8 {
        0 => get(env, Some("u-1"), "GET", PATH, &trace).await,
        1 => get(env, Some("u-2"), "GET", &paged, &trace).await,
        2 => {
            get(
                env,
                Some("u-1"),
                "GET",
                "/koodrive/ose/v1/jobs?offset=0&limit=101",
                &trace,
            )
            .await
        }
        3 => get(env, None, "GET", PATH, &trace).await,
        4 => get(env, Some("u-1"), "GET", "/koodrive/ose/v1/other", &trace).await,
        5 => get(env, Some("u-1"), "DELETE", PATH, &trace).await,
        6 => get(env, Some("u-9"), "GET", PATH, &trace).await,
        _ => get(env, Some("u-3"), "GET", PATH, &trace).await,
    }
}

fn is_string_or_null(value: &Value) -> bool {
    value.is_string() || value.is_null()
}

#[tokio::test]
async fn every_request_gets_exactly_one_record_with_every_field() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("audit.log");
    let env = audited_env(
        &path,
        "",
        "[rate_limit]\nrequests_per_second = 1000\nburst = 1000\n\
         [rate_limit.overrides]\n\"app-u-3\" = { requests_per_second = 1, burst = 5 }",
    )
    .await;
    let mut replies = Vec::new();
    for i in 0..200 {
        replies.push(mixed(&env, i).await);
    }
    let lines = audit_records(&path, 200).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        std::fs::read_to_string(&path).unwrap().lines().count(),
        200,
        "exactly one record per request"
    );
    let mut statuses = std::collections::BTreeSet::new();
    for (record, reply) in lines.iter().zip(&replies) {
        let fields = record.as_object().unwrap();
        assert_eq!(fields.len(), 17, "{record}");
        assert_eq!(record["trace_id"], reply.header("x-traceid"), "{record}");
        assert_eq!(record["status"], reply.status.as_u16(), "{record}");
        statuses.insert(reply.status.as_u16());
        let ts = record["ts"].as_str().unwrap();
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.',
            "{ts}"
        );
        assert!(record["client"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(record["method"].is_string() && record["path"].is_string());
        for key in [
            "principal",
            "user_id",
            "query",
            "code",
            "cache",
            "rate_limit",
        ] {
            assert!(is_string_or_null(&record[key]), "{key}: {record}");
        }
        assert!(record["latency_ms"].as_f64().unwrap() >= 0.0);
        let decision = record["decision"].as_str().unwrap();
        match reply.status.as_u16() {
            200 => {
                assert!(record["code"].is_null());
                assert_eq!(record["cache"], reply.header("x-cache"));
                let expected = match reply.header("x-cache") {
                    "HIT" => "cache_hit",
                    _ => "forwarded",
                };
                assert_eq!(decision, expected, "{record}");
                if decision == "forwarded" && record["upstream_status"].is_number() {
                    assert_eq!(record["upstream_status"], 200);
                    assert!(record["upstream_ms"].as_f64().unwrap() > 0.0);
                }
                assert!(record["principal"].is_string() && record["user_id"].is_string());
            }
            429 => {
                assert_eq!(decision, "rate_limited");
                assert_eq!(record["rate_limit"], "limited");
                assert_eq!(record["code"], "rate_limited");
                assert_eq!(record["principal"], "app-u-3");
            }
            status => {
                assert_eq!(decision, "rejected", "{record}");
                assert_eq!(record["code"], reply.error().0.as_str(), "{record}");
                assert!(record["upstream_status"].is_null() && record["upstream_ms"].is_null());
                if status == 401 {
                    assert!(record["principal"].is_null() && record["user_id"].is_null());
                }
            }
        }
    }
    // Every kind of outcome was among them.
    for status in [200, 400, 401, 403, 404, 405, 429] {
        assert!(statuses.contains(&status), "no {status} in {statuses:?}");
    }
    // Never a credential.
    let text = std::fs::read_to_string(&path).unwrap();
    for user in ["u-1", "u-2", "u-3", "u-9"] {
        assert!(!text.contains(&env.token(user)[..40]));
    }
    for (_, token) in crate::support::USERS {
        assert!(!text.contains(token), "KooDrive token in the audit trail");
    }
    assert!(!text.contains("Bearer"));
}

#[tokio::test]
async fn client_text_is_escaped_and_cannot_split_a_line() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("audit.log");
    let env = audited_env(&path, "", "").await;
    // Percent-encoded CR/LF, quotes and control characters; raw quotes and
    // a raw U+2028 (bytes no HTTP client library would send).
    let hostile: [&[u8]; 5] = [
        b"/koodrive/ose/v1/jobs?offset=0&limit=1&q=%0D%0A%7B%22forged%22:1%7D",
        b"/koodrive/ose/v1/jobs?offset=0&limit=1&x=%00%01%1F",
        b"/koodrive/ose/v1/jobs?offset=\"0\"&limit=1&\"forged\":1",
        b"/koodrive/ose/v1/jobs?offset=0&limit=1&z=\xe2\x80\xa8{\"forged\":1}",
        b"/koodrive/ose/v1/\xe2\x80\xa9jobs?offset=0&limit=1",
    ];
    let token = env.token("u-1");
    let mut accepted = Vec::new();
    for (i, target) in hostile.iter().enumerate() {
        let mut head = b"GET ".to_vec();
        head.extend_from_slice(target);
        head.extend_from_slice(
            format!(
                " HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\n\
                 x-traceid: hostile-{i}\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        let response = env.send_raw(&head).await;
        // Refused by the HTTP parser (no record: it never reached the
        // gateway), or a 400/404 from the gateway.
        assert!(
            response.starts_with("HTTP/1.1 400") || response.starts_with("HTTP/1.1 404"),
            "{}: {response}",
            String::from_utf8_lossy(target)
        );
        if response.contains(&format!("hostile-{i}")) {
            accepted.push(*target);
        }
    }
    // A trace id with characters it may not have is replaced, not kept.
    let reply = get(&env, Some("u-1"), "GET", PATH, "bad\ttrace\"id").await;
    assert_ne!(reply.header("x-traceid"), "bad\ttrace\"id");
    let lines = audit_records(&path, accepted.len() + 1).await;
    assert_eq!(
        std::fs::read_to_string(&path).unwrap().lines().count(),
        accepted.len() + 1,
        "one line each"
    );
    assert!(accepted.len() >= 2, "the encoded ones reach the gateway");
    for (record, target) in lines.iter().zip(&accepted) {
        let target = String::from_utf8_lossy(target);
        let (path_part, query) = target.split_once('?').unwrap();
        // Stored as sent, with anything that could break a line escaped.
        let escaped = |s: &str| s.escape_debug().to_string();
        assert_eq!(record["path"], escaped(path_part), "{record}");
        assert_eq!(record["query"], escaped(query), "{record}");
        assert!(record.get("forged").is_none());
    }
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(!raw.contains('\u{2028}') && !raw.contains('\u{2029}') && !raw.contains('\r'));
    assert_eq!(lines[accepted.len()]["trace_id"], reply.header("x-traceid"));
}

#[tokio::test]
async fn rotation_keeps_files_small_and_lines_whole_and_reopen_follows_a_rename() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("audit.log");
    let env = audited_env(&path, "max_file_bytes = 4096\nmax_files = 3", "").await;
    for i in 0..1000 {
        let reply = get(
            &env,
            Some(["u-1", "u-2"][i % 2]),
            "GET",
            PATH,
            &format!("rot-{i}"),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    // The last record reached some file.
    let mut found = false;
    for _ in 0..250 {
        if std::fs::read_to_string(&path)
            .unwrap_or_default()
            .contains("\"rot-999\"")
        {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(found, "the last record was written");
    let mut files = vec![path.clone()];
    for n in 1..=3 {
        files.push(dir.path().join(format!("audit.log.{n}")));
    }
    assert!(
        !dir.path().join("audit.log.4").exists(),
        "more than max_files"
    );
    let mut longest_line = 0;
    let mut sizes = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(text.ends_with('\n'), "{} ends mid-line", file.display());
        for line in text.lines() {
            serde_json::from_str::<Value>(line).unwrap();
            longest_line = longest_line.max(line.len() + 1);
        }
        sizes.push(text.len());
    }
    for size in sizes {
        assert!(size <= 4096 + longest_line, "a file of {size} bytes");
    }

    // logrotate's `create` mode: rename, then SIGHUP.
    std::fs::rename(&path, dir.path().join("audit.log.external")).unwrap();
    env.reloader.reload().await;
    get(&env, Some("u-1"), "GET", PATH, "after-reopen").await;
    let fresh = audit_records(&path, 1).await;
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0]["trace_id"], "after-reopen");
}

/// `audit_records_total{outcome}` from `/metrics`.
async fn audit_count(env: &TestEnv, outcome: &str) -> u64 {
    let text = env.admin_get("/metrics").await;
    let prefix = format!("koodrive_gateway_audit_records_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix}in {text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn failing_closed_nothing_is_served_unaudited_and_writing_resumes_when_space_returns() {
    let dir = TempDir::new().unwrap();
    // The configured path is a link, as a mounted volume would be; it
    // first leads to a device that is always full.
    let path = dir.path().join("audit.log");
    std::os::unix::fs::symlink("/dev/full", &path).unwrap();
    let env = audited_env(&path, "on_error = \"reject\"", "").await;
    // The first record meets the full device; from then on the sink is
    // known to fail and requests are refused before anything happens.
    let first = get(&env, Some("u-1"), "GET", PATH, "full-0").await;
    assert!(first.status == 200 || first.status == 503);
    let mut refused = false;
    for _ in 0..500 {
        if env.admin_status("/readyz").await == 503 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "readiness turns false while the sink cannot write");
    let upstream_before = env.emulator.jobs_requests();
    for i in 1..=10 {
        let reply = get(&env, Some("u-2"), "GET", PATH, &format!("full-{i}")).await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.error().0, "audit_unavailable");
        assert!(reply.headers.contains_key("retry-after"));
    }
    assert_eq!(
        env.emulator.jobs_requests(),
        upstream_before,
        "KooDrive is never asked for an unaudited request"
    );
    assert!(audit_count(&env, "rejected").await >= 10);

    // Space returns: the link leads to a file again. The writer retries on
    // its own and the kept record arrives; requests are served again.
    let file = dir.path().join("audit-data.log");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&file, &path).unwrap();
    let mut served = false;
    for _ in 0..1000 {
        if env.admin_status("/readyz").await == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "no restart needed");
    let reply = get(&env, Some("u-2"), "GET", PATH, "after-space").await;
    assert_eq!(reply.status, 200);
    let lines = audit_records(&file, 2).await;
    assert!(lines.iter().any(|l| l["trace_id"] == "after-space"));
    if first.status == 200 {
        // Its response was released once queued: its record was kept.
        assert!(lines.iter().any(|l| l["trace_id"] == "full-0"));
    }
}

#[tokio::test]
async fn failing_open_requests_are_served_and_every_lost_record_is_counted() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("audit.log");
    std::os::unix::fs::symlink("/dev/full", &path).unwrap();
    let env = audited_env(&path, "on_error = \"continue\"", "").await;
    for i in 0..20 {
        let reply = get(
            &env,
            Some("u-1"),
            "GET",
            &format!("/koodrive/ose/v1/jobs?offset={i}&limit=1"),
            &format!("open-{i}"),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    let mut dropped = 0;
    for _ in 0..500 {
        dropped = audit_count(&env, "dropped").await;
        if dropped == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(dropped, 20, "every request's record is counted as dropped");
    assert_eq!(audit_count(&env, "written").await, 0);
    assert_eq!(env.emulator.jobs_requests(), 20);
    assert_eq!(
        env.admin_status("/readyz").await,
        200,
        "failing open stays ready"
    );
}

#[tokio::test]
async fn with_written_durability_a_failed_write_turns_the_response_into_503() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("audit.log");
    std::os::unix::fs::symlink("/dev/full", &path).unwrap();
    let env = audited_env(&path, "durability = \"written\"", "").await;
    let reply = get(&env, Some("u-1"), "GET", PATH, "written-0").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error().0, "audit_unavailable");
}

#[tokio::test]
async fn past_the_drain_deadline_open_requests_are_closed_and_still_audited() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("audit.log");
    // The harness drains for 100 ms; KooDrive takes 3 s.
    let env = audited_env(&path, "", "").await;
    env.emulator
        .set_fault(koodrive_gateway::emulator::Fault::Latency(
            Duration::from_secs(3),
        ));
    let slow = get(&env, Some("u-1"), "GET", PATH, "cut-short");
    let stop = async {
        for _ in 0..300 {
            if env.emulator.jobs_requests() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        env.shutdown();
    };
    let outcome = tokio::time::timeout(
        Duration::from_secs(2),
        futures_util::future::join(std::panic::AssertUnwindSafe(slow).catch_unwind(), stop),
    )
    .await;
    // The connection was closed long before KooDrive would have answered.
    assert!(outcome.is_ok(), "the request outlived the drain deadline");
    let lines = audit_records(&path, 1).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["trace_id"], "cut-short");
    assert_eq!(lines[0]["status"], 499);
    assert_eq!(lines[0]["decision"], "abandoned");
    assert_eq!(lines[0]["code"], "client_closed_request");
}
