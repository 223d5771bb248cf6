//! Rate limits shared by replicas through a real `redis-server`: one budget
//! for all, explicit behaviour when Redis dies or stalls, and recovery
//! without a restart.

use std::time::{Duration, Instant};

use crate::support::{Options, RedisServer, Reply, TestEnv};

const PATH: &str = "/koodrive/ose/v1/jobs?offset=0&limit=2";

async fn replica(redis: &RedisServer, limits: &str) -> TestEnv {
    TestEnv::start_with(Options {
        sections: format!("[rate_limit]\n{limits}\nredis_url = \"{}\"\n", redis.url()),
        ..Options::default()
    })
    .await
}

/// `u-1`'s request with trace id `id`.
async fn get(env: &TestEnv, id: &str) -> Reply {
    env.get_with("u-1", PATH, &[("x-traceid", id)]).await
}

/// The `rate_limit` outcome of the access line of the request with `trace_id`.
fn outcome(env: &TestEnv, trace_id: &str) -> String {
    env.access_line(trace_id)["rate_limit"].clone()
}

#[tokio::test]
async fn two_replicas_spend_one_budget() {
    let redis = RedisServer::start().await;
    // Generous timeout and "deny": a slow Redis on a loaded machine must
    // not fall back to the local budgets, which would double the count.
    let limits =
        "requests_per_second = 1\nburst = 10\nredis_timeout_ms = 2000\non_backend_error = \"deny\"";
    let (a, b) = (replica(&redis, limits).await, replica(&redis, limits).await);
    let started = std::time::Instant::now();
    let mut admitted = 0;
    for i in 0..30 {
        let env = if i % 2 == 0 { &a } else { &b };
        let reply = env.get_as("u-1", PATH).await;
        match reply.status.as_u16() {
            200 => admitted += 1,
            429 => {
                assert_eq!(reply.error().0, "rate_limited");
                assert!(reply.headers.contains_key("retry-after"));
                assert!(reply
                    .header("ratelimit")
                    .starts_with("\"per-principal\";r=0;"));
            }
            other => panic!("unexpected {other}"),
        }
    }
    // 10 at once, plus one per second that passed meanwhile.
    let refilled = started.elapsed().as_secs() as usize + 1;
    assert!(
        (10..=10 + refilled).contains(&admitted),
        "{admitted} admitted, not 10 (+{refilled})"
    );
    assert!(a.emulator.jobs_requests() > 0 && b.emulator.jobs_requests() > 0);
    // The budget lives in Redis, keyed by the principal.
    let mut redis_connection = redis.connection().await.unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg("koodrive-gateway:rate:app-u-1")
        .query_async(&mut redis_connection)
        .await
        .unwrap();
    assert!(exists);
}

#[tokio::test]
async fn redis_down_with_allow_falls_back_to_the_local_limiter_and_recovers() {
    let mut redis = RedisServer::start().await;
    let env = replica(&redis, "requests_per_second = 100\nburst = 100").await;
    assert_eq!(get(&env, "before").await.status, 200);
    assert_eq!(outcome(&env, "before"), "admitted");

    redis.stop().await;
    let started = Instant::now();
    let reply = get(&env, "during").await;
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(outcome(&env, "during"), "fallback_admitted");
    assert!(reply.headers.contains_key("ratelimit"));

    // Back on the same port: shared limiting resumes without a restart.
    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut resumed = false;
    for attempt in 0..20 {
        let id = format!("after-{attempt}");
        assert_eq!(get(&env, &id).await.status, 200);
        if outcome(&env, &id) == "admitted" {
            resumed = true;
            break;
        }
        assert!(Instant::now() < deadline, "not resumed within 5 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(resumed, "shared limiting did not resume");
}

#[tokio::test]
async fn redis_down_with_deny_answers_503_with_retry_after() {
    let mut redis = RedisServer::start().await;
    let env = replica(
        &redis,
        "requests_per_second = 100\nburst = 100\non_backend_error = \"deny\"",
    )
    .await;
    assert_eq!(env.get_as("u-1", PATH).await.status, 200);
    redis.stop().await;
    for _ in 0..3 {
        let reply = env.get_as("u-1", PATH).await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.error().0, "rate_limit_unavailable");
        let retry: u64 = reply.header("retry-after").parse().unwrap();
        assert!((1..=2).contains(&retry), "{retry}");
    }
    assert_eq!(env.emulator.jobs_requests(), 1);
    let log = env.log();
    assert!(log.contains("rate_limit=\"backend_unavailable\""), "{log}");
    assert!(log.contains("side=\"rate_limit_backend\""), "{log}");
}

#[tokio::test]
async fn a_paused_redis_never_holds_a_request_longer_than_the_timeout() {
    let redis = RedisServer::start().await;
    let limits = "requests_per_second = 100\nburst = 100\nredis_timeout_ms = 100";
    let allow = replica(&redis, limits).await;
    let deny = replica(&redis, &format!("{limits}\non_backend_error = \"deny\"")).await;
    assert_eq!(allow.get_as("u-1", PATH).await.status, 200);
    assert_eq!(deny.get_as("u-2", PATH).await.status, 200);

    let mut admin = redis.connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .query_async(&mut admin)
        .await
        .unwrap();
    for (env, expected) in [(&allow, 200), (&deny, 503)] {
        for _ in 0..3 {
            let started = Instant::now();
            let reply = env.get_as("u-3", PATH).await;
            let took = started.elapsed();
            assert_eq!(reply.status, expected);
            // The timeout plus a margin for TLS, the emulator and a busy CI;
            // far below the 3 s pause, so nothing waited for Redis.
            assert!(took < Duration::from_millis(100 + 1400), "took {took:?}");
        }
    }
}
