//! Rate limits per principal, in process (paused time): budgets, overrides,
//! headers, refill, and that cache hits and bad queries spend budget too.

use std::time::Duration;

use crate::support::{freeze_time, Options, Reply, TestEnv};

const PATH: &str = "/koodrive/ose/v1/jobs?offset=0&limit=2";

/// 10 rps / burst 20 per principal; `app-u-3` has 1 rps / burst 5.
async fn limited_env(cache: &'static str) -> TestEnv {
    TestEnv::start_with(Options {
        cache,
        timeout_ms: 600_000,
        sections: "[rate_limit]\nrequests_per_second = 10\nburst = 20\n\
                   [rate_limit.overrides]\n\"app-u-3\" = { requests_per_second = 1, burst = 5 }\n"
            .into(),
        ..Options::default()
    })
    .await
}

/// Sends `n` requests as `user`; returns the replies.
async fn burst(env: &TestEnv, user: &str, path: &str, n: usize) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(n);
    for _ in 0..n {
        replies.push(env.get_as(user, path).await);
    }
    replies
}

fn admitted(replies: &[Reply]) -> usize {
    replies.iter().filter(|r| r.status != 429).count()
}

#[tokio::test(start_paused = true)]
async fn a_burst_admits_exactly_the_budget_and_refuses_the_rest_with_headers() {
    let _frozen = freeze_time();
    let env = limited_env("ttl_ms = 0").await;
    let replies = burst(&env, "u-1", PATH, 50).await;
    assert_eq!(admitted(&replies), 20);
    assert!(replies[..20].iter().all(|r| r.status == 200));
    assert_eq!(
        env.emulator.jobs_requests(),
        20,
        "refused requests never reach KooDrive"
    );

    // Admitted answers say what is left.
    assert_eq!(
        replies[0].header("ratelimit-policy"),
        "\"per-principal\";q=20;w=2"
    );
    assert_eq!(replies[0].header("ratelimit"), "\"per-principal\";r=19;t=1");
    assert_eq!(replies[19].header("ratelimit"), "\"per-principal\";r=0;t=2");

    for refused in &replies[20..] {
        assert_eq!(refused.status, 429);
        assert_eq!(refused.error().0, "rate_limited");
        assert_eq!(refused.header("retry-after"), "1");
        assert_eq!(
            refused.header("ratelimit-policy"),
            "\"per-principal\";q=20;w=2"
        );
        assert_eq!(refused.header("ratelimit"), "\"per-principal\";r=0;t=2");
    }

    // Another principal is unaffected; the override has its own budget.
    assert_eq!(admitted(&burst(&env, "u-2", PATH, 25).await), 20);
    let vip = burst(&env, "u-3", PATH, 8).await;
    assert_eq!(admitted(&vip), 5);
    assert_eq!(
        vip[0].header("ratelimit-policy"),
        "\"per-principal\";q=5;w=5"
    );

    // 0.5 s later five requests' worth came back; 2 s later all of it.
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(admitted(&burst(&env, "u-1", PATH, 10).await), 5);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(admitted(&burst(&env, "u-1", PATH, 30).await), 20);

    // The decision is in the access line.
    let log = env.log();
    assert!(log.contains("decision=\"rate_limited\""), "{log}");
    assert!(log.contains("rate_limit=\"limited\""), "{log}");
    assert!(log.contains("rate_limit=\"admitted\""), "{log}");
}

#[tokio::test(start_paused = true)]
async fn cache_hits_and_bad_queries_spend_budget_too() {
    let _frozen = freeze_time();
    let env = limited_env("ttl_ms = 60000").await;
    let hits = burst(&env, "u-1", PATH, 21).await;
    assert_eq!(env.emulator.jobs_requests(), 1);
    assert_eq!(hits[19].header("x-cache"), "HIT");
    assert_eq!(hits[20].status, 429, "the 21st cache hit is refused");

    let bad = "/koodrive/ose/v1/jobs?offset=0&limit=101";
    let replies = burst(&env, "u-2", bad, 21).await;
    assert!(replies[..20].iter().all(|r| r.status == 400));
    // Admitted 400s carry the budget too.
    assert_eq!(replies[19].header("ratelimit"), "\"per-principal\";r=0;t=2");
    assert_eq!(replies[20].status, 429);
    assert_eq!(env.get_as("u-2", PATH).await.status, 429);

    // Bypassing the cache spends budget like any request: no-cache cannot
    // turn one caller's budget into more calls to KooDrive.
    let before = env.emulator.jobs_requests();
    let mut bypasses = Vec::new();
    for _ in 0..6 {
        bypasses.push(
            env.get_with("u-3", PATH, &[("cache-control", "no-cache")])
                .await,
        );
    }
    // `app-u-3` has a burst of 5.
    assert!(bypasses[..5]
        .iter()
        .all(|r| r.header("x-cache") == "BYPASS"));
    assert_eq!(bypasses[5].status, 429, "the 6th bypass is refused");
    assert_eq!(env.emulator.jobs_requests() - before, 5);
}

#[tokio::test]
async fn unauthenticated_requests_spend_no_ones_budget() {
    let env = limited_env("ttl_ms = 0").await;
    for _ in 0..30 {
        let reply = env
            .send(http::Version::HTTP_11, "GET", PATH, &[], None)
            .await;
        assert_eq!(reply.status, 401);
        assert!(!reply.headers.contains_key("ratelimit"));
    }
    assert_eq!(env.get_as("u-1", PATH).await.status, 200);
}
