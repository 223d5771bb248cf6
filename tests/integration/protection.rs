//! Upstream protection: a bound on requests in flight to KooDrive with load
//! shedding, and pauses KooDrive asks for with `Retry-After`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use koodrive_gateway::emulator::Fault;
use tokio::task::JoinSet;

use crate::support::{freeze_time, Options, TestEnv};

const PATH: &str = "/koodrive/ose/v1/jobs?offset=0&limit=2";

#[tokio::test]
async fn at_most_max_concurrency_requests_reach_koodrive_and_the_excess_is_shed() {
    let env = Arc::new(
        TestEnv::start_with(Options {
            upstream_extra: "max_concurrency = 4\nqueue_timeout_ms = 100".into(),
            ..Options::default()
        })
        .await,
    );
    env.emulator
        .set_fault(Fault::Latency(Duration::from_millis(1500)));
    let mut requests = JoinSet::new();
    for i in 0..12 {
        let env = env.clone();
        let user = ["u-1", "u-2", "u-3"][i % 3];
        requests.spawn(async move {
            let started = Instant::now();
            let reply = env.get_as(user, PATH).await;
            (reply, started.elapsed())
        });
    }
    let (mut ok, mut shed) = (0, 0);
    while let Some(joined) = requests.join_next().await {
        let (reply, took) = joined.unwrap();
        match reply.status.as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(reply.error().0, "upstream_overloaded");
                assert_eq!(reply.header("retry-after"), "1");
                // Shed after the 100 ms queue timeout, long before KooDrive
                // (1.5 s) would have answered.
                assert!(took < Duration::from_millis(1200), "shed after {took:?}");
                shed += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        env.emulator.peak_in_flight() <= 4,
        "peak {}",
        env.emulator.peak_in_flight()
    );
    // Every request that got a slot reached KooDrive; the rest were shed.
    assert_eq!(ok + shed, 12);
    assert!(ok >= 1 && shed >= 1, "{ok} ok, {shed} shed");
    assert_eq!(env.emulator.jobs_requests(), ok as u64);
}

#[tokio::test]
async fn coalesced_misses_hold_one_slot() {
    let env = Arc::new(
        TestEnv::start_with(Options {
            cache: "ttl_ms = 60000",
            upstream_extra: "max_concurrency = 1\nqueue_timeout_ms = 50".into(),
            ..Options::default()
        })
        .await,
    );
    env.emulator
        .set_fault(Fault::Latency(Duration::from_millis(300)));
    let mut requests = JoinSet::new();
    for _ in 0..10 {
        let env = env.clone();
        requests.spawn(async move { env.get_as("u-1", PATH).await.status });
    }
    while let Some(status) = requests.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(env.emulator.jobs_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_pauses_forwarding_for_that_long() {
    let _frozen = freeze_time();
    let env = TestEnv::start_with(Options {
        timeout_ms: 600_000,
        ..Options::default()
    })
    .await;
    env.emulator.set_fault(Fault::Throttle {
        status: 429,
        retry_after_s: 2,
    });
    let first = env
        .get_with("u-1", PATH, &[("x-traceid", "paused-1")])
        .await;
    assert_eq!(first.status, 503);
    assert_eq!(first.error().0, "upstream_paused");
    assert_eq!(first.header("retry-after"), "2");
    assert_eq!(env.emulator.jobs_requests(), 1);
    let line = env.access_line("paused-1");
    assert_eq!(line["upstream_status"], "429");
    assert_eq!(line["decision"], "forwarded");

    // KooDrive would answer now, but the pause holds: nothing is sent.
    env.emulator.set_fault(Fault::None);
    tokio::time::advance(Duration::from_millis(1500)).await;
    for user in ["u-1", "u-2", "u-3"] {
        let reply = env.get_as(user, PATH).await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.error().0, "upstream_paused");
        assert_eq!(reply.header("retry-after"), "1");
    }
    assert_eq!(
        env.emulator.jobs_requests(),
        1,
        "no request during the pause"
    );

    tokio::time::advance(Duration::from_millis(600)).await;
    assert_eq!(env.get_as("u-1", PATH).await.status, 200);
    assert_eq!(env.emulator.jobs_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn during_a_pause_stale_entries_are_served_where_allowed() {
    let _frozen = freeze_time();
    let env = TestEnv::start_with(Options {
        cache: "ttl_ms = 1000\nstale_if_error_ms = 60000",
        timeout_ms: 600_000,
        ..Options::default()
    })
    .await;
    let first = env.get_as("u-1", PATH).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.header("x-cache"), "MISS");
    tokio::time::advance(Duration::from_secs(2)).await;
    env.emulator.set_fault(Fault::Throttle {
        status: 503,
        retry_after_s: 30,
    });
    // The request that meets the 503 gets the stale entry …
    let stale = env.get_as("u-1", PATH).await;
    assert_eq!(stale.status, 200, "{:?} {}", stale.body, env.log());
    assert_eq!(stale.header("x-cache"), "STALE");
    // … so do later ones, without asking KooDrive; a user with no entry
    // gets 503 with Retry-After.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(env.get_as("u-1", PATH).await.header("x-cache"), "STALE");
    let other = env.get_as("u-2", PATH).await;
    assert_eq!(other.status, 503);
    assert_eq!(other.header("retry-after"), "25");
    assert_eq!(env.emulator.jobs_requests(), 2);
}
