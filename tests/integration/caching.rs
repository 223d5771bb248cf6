//! The per-user response cache end to end: isolation between users,
//! coalescing, TTL on paused time, stale-if-error, bypass, byte bound.

use std::sync::Arc;
use std::time::Duration;

use http::Version;
use koodrive_gateway::emulator::data::jobs_of;
use koodrive_gateway::emulator::Fault;
use tokio::task::JoinSet;

use crate::support::{freeze_time, task_ids, Options, TestEnv};

const PATH: &str = "/koodrive/ose/v1/jobs?offset=0&limit=5";

async fn cached_env(cache: &'static str) -> Arc<TestEnv> {
    Arc::new(
        TestEnv::start_with(Options {
            cache,
            // Generous, so paused time never fires it by accident.
            timeout_ms: 600_000,
            ..Options::default()
        })
        .await,
    )
}

fn expected_ids(user: &str, offset: usize, limit: usize) -> Vec<String> {
    jobs_of(user)
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|j| j.task_id)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_second_request_within_ttl_is_a_hit_with_age_and_a_miss_after() {
    let _frozen = freeze_time();
    let env = cached_env("ttl_ms = 5000").await;
    let first = env.get_with("u-1", PATH, &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), "MISS");
    assert!(!first.headers.contains_key("age"));

    tokio::time::advance(Duration::from_secs(3)).await;
    let second = env.get_with("u-1", PATH, &[]).await;
    assert_eq!(second.header("x-cache"), "HIT");
    assert_eq!(second.header("age"), "3");
    assert_eq!(second.body, first.body);
    assert_eq!(
        env.emulator.jobs_requests(),
        1,
        "a hit does not reach KooDrive"
    );

    tokio::time::advance(Duration::from_secs(3)).await;
    let third = env.get_with("u-1", PATH, &[]).await;
    assert_eq!(third.header("x-cache"), "MISS");
    assert_eq!(env.emulator.jobs_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn users_never_see_each_others_jobs_from_the_cache() {
    let _frozen = freeze_time();
    let env = cached_env("ttl_ms = 5000").await;
    for round in 0..2 {
        for user in ["u-1", "u-2"] {
            for language in ["en-US", "zh_CN"] {
                let reply = env.get_with(user, PATH, &[("language", language)]).await;
                assert_eq!(reply.status, 200);
                assert_eq!(
                    task_ids(&reply.json()),
                    expected_ids(user, 0, 5),
                    "{user} {language} round {round}"
                );
                let expected = if round == 0 { "MISS" } else { "HIT" };
                assert_eq!(
                    reply.header("x-cache"),
                    expected,
                    "{user} {language} round {round}"
                );
            }
        }
    }
    // After expiry, under concurrency, still each user's own jobs.
    tokio::time::advance(Duration::from_secs(6)).await;
    let mut requests = JoinSet::new();
    for i in 0..40 {
        let env = env.clone();
        let user = if i % 2 == 0 { "u-1" } else { "u-2" };
        requests.spawn(async move { (user, env.get_with(user, PATH, &[]).await) });
    }
    while let Some(result) = requests.join_next().await {
        let (user, reply) = result.unwrap();
        assert_eq!(task_ids(&reply.json()), expected_ids(user, 0, 5), "{user}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_hundred_concurrent_identical_misses_make_one_upstream_call() {
    let _frozen = freeze_time();
    let env = cached_env("ttl_ms = 5000").await;
    assert_eq!(env.get_with("u-1", PATH, &[]).await.status, 200);
    tokio::time::advance(Duration::from_secs(6)).await;
    let mut requests = JoinSet::new();
    for _ in 0..100 {
        let env = env.clone();
        requests.spawn(async move { env.get_with("u-1", PATH, &[]).await });
    }
    while let Some(reply) = requests.join_next().await {
        let reply = reply.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(task_ids(&reply.json()), expected_ids("u-1", 0, 5));
    }
    assert_eq!(
        env.emulator.jobs_requests(),
        2,
        "one fill, one refill for 100 requests"
    );
    let stats = env.cache.as_ref().unwrap().stats().await;
    assert_eq!(stats.misses - stats.coalesced, 2, "{stats:?}");
    assert_eq!(stats.hits + stats.misses, 101, "{stats:?}");
}

#[tokio::test]
async fn a_hundred_requests_over_ten_keys_make_ten_upstream_calls() {
    let env = cached_env("ttl_ms = 600000").await;
    env.emulator
        .set_fault(Fault::Latency(Duration::from_millis(50)));
    let mut requests = JoinSet::new();
    for i in 0..100 {
        let env = env.clone();
        let offset = i % 10;
        requests.spawn(async move {
            let path = format!("/koodrive/ose/v1/jobs?offset={offset}&limit=3");
            (offset, env.get_with("u-3", &path, &[]).await)
        });
    }
    while let Some(result) = requests.join_next().await {
        let (offset, reply) = result.unwrap();
        assert_eq!(task_ids(&reply.json()), expected_ids("u-3", offset, 3));
    }
    assert_eq!(env.emulator.jobs_requests(), 10);
}

#[tokio::test]
async fn failures_are_never_cached() {
    let env = cached_env("ttl_ms = 600000").await;
    for fault in [
        Fault::Status(500),
        Fault::GarbageBody,
        Fault::HtmlError,
        Fault::DropConnection,
    ] {
        env.emulator.set_fault(fault.clone());
        let before = env.emulator.jobs_requests();
        assert_eq!(
            env.get_with("u-1", PATH, &[]).await.status,
            502,
            "{fault:?}"
        );
        assert_eq!(
            env.get_with("u-1", PATH, &[]).await.status,
            502,
            "{fault:?}"
        );
        assert_eq!(
            env.emulator.jobs_requests(),
            before + 2,
            "{fault:?} was cached"
        );
    }
    env.emulator.set_fault(Fault::None);
    let reply = env.get_with("u-1", PATH, &[]).await;
    assert_eq!(reply.header("x-cache"), "MISS");
}

#[tokio::test(start_paused = true)]
async fn a_timeout_is_not_cached() {
    let env = Arc::new(
        TestEnv::start_with(Options {
            cache: "ttl_ms = 600000",
            timeout_ms: 1_000,
            ..Options::default()
        })
        .await,
    );
    env.emulator
        .set_fault(Fault::Latency(Duration::from_secs(30)));
    // Auto-advance jumps to the gateway's 1 s timeout.
    assert_eq!(env.get_with("u-1", PATH, &[]).await.status, 504);
    let _frozen = freeze_time();
    env.emulator.set_fault(Fault::None);
    let reply = env.get_with("u-1", PATH, &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-cache"), "MISS");
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_serves_an_expired_entry_within_its_limit_only() {
    let _frozen = freeze_time();
    let env = cached_env("ttl_ms = 5000\nstale_if_error_ms = 60000").await;
    let fresh = env.get_with("u-1", PATH, &[]).await;
    assert_eq!(fresh.status, 200);
    env.emulator.set_fault(Fault::Status(500));
    tokio::time::advance(Duration::from_secs(30)).await;
    let stale = env.get_with("u-1", PATH, &[]).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.header("x-cache"), "STALE");
    assert_eq!(stale.header("age"), "30");
    assert_eq!(stale.body, fresh.body);
    tokio::time::advance(Duration::from_secs(40)).await;
    let too_old = env.get_with("u-1", PATH, &[]).await;
    assert_eq!(too_old.status, 502);
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_is_off_by_default() {
    let _frozen = freeze_time();
    let env = cached_env("ttl_ms = 5000").await;
    assert_eq!(env.get_with("u-1", PATH, &[]).await.status, 200);
    env.emulator.set_fault(Fault::Status(500));
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(env.get_with("u-1", PATH, &[]).await.status, 502);
}

#[tokio::test]
async fn no_cache_bypasses_and_refreshes_unless_ignored() {
    let env = cached_env("ttl_ms = 600000").await;
    assert_eq!(
        env.get_with("u-1", PATH, &[]).await.header("x-cache"),
        "MISS"
    );
    let bypass = env
        .get_with("u-1", PATH, &[("cache-control", "no-cache")])
        .await;
    assert_eq!(bypass.header("x-cache"), "BYPASS");
    assert_eq!(env.emulator.jobs_requests(), 2);
    assert_eq!(
        env.get_with("u-1", PATH, &[]).await.header("x-cache"),
        "HIT"
    );

    let ignoring = cached_env("ttl_ms = 600000\nhonor_client_no_cache = false").await;
    ignoring.get_with("u-1", PATH, &[]).await;
    let hit = ignoring
        .get_with("u-1", PATH, &[("cache-control", "no-cache")])
        .await;
    assert_eq!(hit.header("x-cache"), "HIT");
    assert_eq!(ignoring.emulator.jobs_requests(), 1);
}

#[tokio::test]
async fn upstream_no_store_and_private_answers_are_not_cached() {
    let env = cached_env("ttl_ms = 600000").await;
    for directive in ["no-store", "private, max-age=60"] {
        env.emulator.set_cache_control(Some(directive));
        let before = env.emulator.jobs_requests();
        assert_eq!(env.get_with("u-1", PATH, &[]).await.status, 200);
        assert_eq!(
            env.get_with("u-1", PATH, &[]).await.header("x-cache"),
            "MISS"
        );
        assert_eq!(env.emulator.jobs_requests(), before + 2, "{directive}");
    }
}

#[tokio::test]
async fn the_byte_bound_holds() {
    let env = cached_env("ttl_ms = 600000\nmax_bytes = 16384").await;
    for offset in 0..40 {
        let path = format!("/koodrive/ose/v1/jobs?offset={offset}&limit=100");
        assert_eq!(env.get_with("u-1", &path, &[]).await.status, 200);
    }
    let stats = env.cache.as_ref().unwrap().stats().await;
    assert!(stats.bytes <= 16384, "{stats:?}");
    assert!(stats.evictions > 0, "{stats:?}");
    assert!(stats.entries > 0, "{stats:?}");
}

#[tokio::test]
async fn a_cached_query_still_needs_a_valid_jwt() {
    let env = cached_env("ttl_ms = 600000").await;
    assert_eq!(env.get_with("u-1", PATH, &[]).await.status, 200);
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = env.claims("u-1");
    claims["exp"] = (now - 3600).into();
    let expired = env.sign(&claims);
    let reply = env.get_bearer(&expired, PATH).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.error().0, "token_expired");
    let anonymous = env.send(Version::HTTP_11, "GET", PATH, &[], None).await;
    assert_eq!(anonymous.status, 401);
}

#[tokio::test]
async fn a_hit_carries_the_new_requests_trace_id() {
    let env = cached_env("ttl_ms = 600000").await;
    let first = env
        .get_with("u-1", PATH, &[("x-traceid", "first-trace")])
        .await;
    assert_eq!(first.header("x-traceid"), "first-trace");
    let hit = env
        .get_with("u-1", PATH, &[("x-traceid", "second-trace")])
        .await;
    assert_eq!(hit.header("x-cache"), "HIT");
    assert_eq!(hit.header("x-traceid"), "second-trace");
}

#[tokio::test]
async fn ttl_zero_turns_the_cache_off() {
    let env = cached_env("ttl_ms = 0").await;
    for _ in 0..3 {
        assert_eq!(
            env.get_with("u-1", PATH, &[]).await.header("x-cache"),
            "BYPASS"
        );
    }
    assert_eq!(env.emulator.jobs_requests(), 3);
    assert!(env.cache.is_none());
}

#[tokio::test]
async fn concurrent_no_cache_requests_share_one_upstream_call() {
    let env = cached_env("ttl_ms = 5000").await;
    // Long enough for ten TLS connections to arrive on a loaded machine
    // while the first call is still out.
    env.emulator
        .set_fault(Fault::Latency(Duration::from_secs(2)));
    let mut requests = JoinSet::new();
    for _ in 0..10 {
        let env = env.clone();
        requests.spawn(async move {
            env.get_with("u-1", PATH, &[("cache-control", "no-cache")])
                .await
        });
    }
    while let Some(reply) = requests.join_next().await {
        let reply = reply.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-cache"), "BYPASS");
    }
    assert_eq!(
        env.emulator.jobs_requests(),
        1,
        "a client's no-cache cannot multiply load on KooDrive"
    );
}
