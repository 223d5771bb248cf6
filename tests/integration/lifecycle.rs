//! Shutdown: in-flight requests finish, readiness turns false, new
//! connections are refused.

use std::time::Duration;

use http::{Request, Version};
use http_body_util::Full;
use koodrive_gateway::emulator::Fault;

use crate::support::{client, TestEnv};

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_reports_not_ready() {
    let mut env = TestEnv::start().await;
    env.emulator
        .set_fault(Fault::Latency(Duration::from_millis(500)));
    let request = Request::get(format!(
        "https://localhost:{}/koodrive/ose/v1/jobs?offset=0&limit=1",
        env.addr.port()
    ))
    .header("authorization", format!("Bearer {}", env.token("u-1")))
    .body(Full::default())
    .unwrap();
    let https = client(&env.certs().join("ca.crt"), Version::HTTP_11);
    let in_flight = tokio::spawn(async move { https.request(request).await.map(|r| r.status()) });
    for _ in 0..500 {
        if env.emulator.jobs_requests() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(env.emulator.jobs_requests(), 1, "the request is in flight");
    assert_eq!(env.admin_status("/readyz").await, 200);

    env.shutdown();
    let mut not_ready = false;
    for _ in 0..100 {
        if env.admin_status("/readyz").await == 503 {
            not_ready = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(not_ready, "readiness turns false while draining");
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(env.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "no new connections once shutdown starts");
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "the in-flight request finished"
    );
}
