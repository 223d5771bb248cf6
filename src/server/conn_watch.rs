//! Per-connection deadlines that hyper does not keep, kept by one timer per
//! connection:
//! - **first request**: a connection that has not sent a whole request head
//!   within `header_read_timeout` of its handshake is closed, whether it
//!   went silent, stopped inside the HTTP/2 preface or dribbles bytes;
//! - **idle**: with no request in flight for `idle_timeout`, the connection
//!   is shut down gracefully (HTTP/2 GOAWAY);
//! - **send**: a response the client has not taken in full within
//!   `send_timeout` of being ready (its HTTP/2 window stays closed, or its
//!   TCP window) closes the connection, so a reader that never reads holds
//!   no stream, buffer or request record for long;
//! - **resets**: more than `h2_max_resets_per_second` requests cancelled by
//!   the client in one second (HTTP/2 rapid reset) close the connection.
//!
//! The timer sleeps until the earliest deadline that could expire and looks
//! again when it wakes: requests starting and ending touch only a mutex
//! held for a few instructions.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::ClientAddr;
use crate::config::ServerLimits;

/// Why a connection is being closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Closing {
    /// No whole request within `header_read_timeout` of the handshake.
    NoRequest,
    /// Nothing in flight for `idle_timeout`: shut down gracefully.
    Idle,
    /// A response not taken within `send_timeout`.
    SendTimeout,
    /// Too many requests cancelled by the client in one second.
    ResetFlood,
}

impl Closing {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Closing::NoRequest => "no request after the handshake",
            Closing::Idle => "idle",
            Closing::SendTimeout => "response not taken within the send timeout",
            Closing::ResetFlood => "too many cancelled requests",
        }
    }
}

/// The deadlines of one connection.
pub(super) struct ConnectionWatch {
    first_request: Duration,
    idle: Duration,
    send: Duration,
    max_resets: u32,
    state: Mutex<State>,
    /// Wakes the timer when a verdict is reached between its deadlines.
    verdict_reached: Notify,
}

struct State {
    opened: Instant,
    requests: u64,
    /// Requests whose response has not been taken in full.
    in_flight: usize,
    idle_since: Instant,
    /// Responses ready to send but not yet taken, by request, since when.
    sending: HashMap<u64, Instant>,
    resets: u32,
    resets_since: Instant,
    verdict: Option<Closing>,
}

impl ConnectionWatch {
    /// Starts watching a connection whose handshake just completed.
    pub(super) fn new(limits: &ServerLimits) -> Arc<ConnectionWatch> {
        let now = Instant::now();
        Arc::new(ConnectionWatch {
            first_request: limits.header_read_timeout,
            idle: limits.idle_timeout,
            send: limits.send_timeout,
            max_resets: limits.h2_max_resets_per_second,
            state: Mutex::new(State {
                opened: now,
                requests: 0,
                in_flight: 0,
                idle_since: now,
                sending: HashMap::new(),
                resets: 0,
                resets_since: now,
                verdict: None,
            }),
            verdict_reached: Notify::new(),
        })
    }

    /// Resolves once the connection must close, with the reason.
    pub(super) async fn expired(&self) -> Closing {
        loop {
            let wake_at = match self.check(Instant::now()) {
                Ok(wake_at) => wake_at,
                Err(closing) => return closing,
            };
            tokio::select! {
                () = tokio::time::sleep_until(wake_at) => {}
                () = self.verdict_reached.notified() => {}
            }
        }
    }

    /// The reason to close now, or when to look again.
    fn check(&self, now: Instant) -> Result<Instant, Closing> {
        let state = self.lock();
        if let Some(closing) = state.verdict {
            return Err(closing);
        }
        let mut deadlines = Vec::with_capacity(2);
        if state.in_flight == 0 {
            if state.requests == 0 {
                deadlines.push((state.opened + self.first_request, Closing::NoRequest));
            }
            deadlines.push((state.idle_since + self.idle, Closing::Idle));
        }
        if let Some(oldest) = state.sending.values().min() {
            deadlines.push((*oldest + self.send, Closing::SendTimeout));
        }
        let mut wake_at = now + self.first_request.min(self.idle).min(self.send);
        for (deadline, closing) in deadlines {
            if deadline <= now {
                return Err(closing);
            }
            wake_at = wake_at.min(deadline);
        }
        Ok(wake_at)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request head arrived: it is in flight until its response has been
    /// taken in full, or is abandoned.
    fn begin(self: &Arc<Self>) -> InFlight {
        let mut state = self.lock();
        state.requests += 1;
        state.in_flight += 1;
        InFlight {
            watch: Arc::clone(self),
            id: state.requests,
            complete: false,
        }
    }
}

/// One request on a watched connection, from its head to the end of its
/// response.
pub(super) struct InFlight {
    watch: Arc<ConnectionWatch>,
    id: u64,
    complete: bool,
}

impl InFlight {
    fn responding(&self) {
        self.watch.lock().sending.insert(self.id, Instant::now());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut state = self.watch.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = now;
        }
        state.sending.remove(&self.id);
        if self.complete {
            return;
        }
        // Dropped before its response was taken: the client cancelled it
        // (an HTTP/2 reset) or left.
        if now.duration_since(state.resets_since) >= Duration::from_secs(1) {
            state.resets_since = now;
            state.resets = 0;
        }
        state.resets += 1;
        if state.resets > self.watch.max_resets && state.verdict.is_none() {
            state.verdict = Some(Closing::ResetFlood);
            drop(state);
            self.watch.verdict_reached.notify_one();
        }
    }
}

/// The service of one connection: puts the peer's address into each
/// request's extensions and tells the watch when requests start, have a
/// response ready, and end.
#[derive(Clone)]
pub(super) struct Watched<S> {
    pub(super) inner: S,
    pub(super) peer: std::net::SocketAddr,
    pub(super) watch: Arc<ConnectionWatch>,
}

impl<S, B, R> hyper::service::Service<Request<B>> for Watched<S>
where
    S: hyper::service::Service<Request<B>, Response = Response<R>>,
    R: Body,
{
    type Response = Response<WatchedBody<R>>;
    type Error = S::Error;
    type Future = WatchedCall<S::Future>;

    fn call(&self, mut request: Request<B>) -> Self::Future {
        let in_flight = self.watch.begin();
        request.extensions_mut().insert(ClientAddr(self.peer));
        WatchedCall {
            inner: self.inner.call(request),
            in_flight: Some(in_flight),
        }
    }
}

pin_project_lite::pin_project! {
    /// The service's future; its response's body carries the request on.
    pub(super) struct WatchedCall<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
    }
}

impl<F, R, E> Future for WatchedCall<F>
where
    F: Future<Output = Result<Response<R>, E>>,
    R: Body,
{
    type Output = Result<Response<WatchedBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let in_flight = this.in_flight.take();
        Poll::Ready(result.map(|response| {
            response.map(|body| {
                let mut in_flight = in_flight;
                if let Some(in_flight) = &mut in_flight {
                    in_flight.responding();
                }
                WatchedBody::new(body, in_flight)
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body; its request ends when the body has been taken in
    /// full (complete) or is dropped before (cancelled).
    pub(super) struct WatchedBody<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
    }
}

impl<B: Body> WatchedBody<B> {
    fn new(inner: B, mut in_flight: Option<InFlight>) -> WatchedBody<B> {
        if inner.is_end_stream() {
            if let Some(in_flight) = &mut in_flight {
                in_flight.complete = true;
            }
        }
        WatchedBody { inner, in_flight }
    }
}

impl<B: Body> Body for WatchedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if frame.is_none() || this.inner.is_end_stream() {
            if let Some(in_flight) = this.in_flight {
                in_flight.complete = true;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ServerLimits {
        ServerLimits {
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(5),
            h2_max_resets_per_second: 3,
            ..ServerLimits::DEFAULT
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_closes_after_the_header_read_timeout() {
        let watch = ConnectionWatch::new(&limits());
        let started = Instant::now();
        assert_eq!(watch.expired().await, Closing::NoRequest);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn after_its_first_request_an_idle_connection_closes_after_the_idle_timeout() {
        let watch = ConnectionWatch::new(&limits());
        let mut request = watch.begin();
        request.complete = true;
        tokio::time::advance(Duration::from_secs(3)).await;
        drop(request);
        let idle_from = Instant::now();
        assert_eq!(watch.expired().await, Closing::Idle);
        assert_eq!(idle_from.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_the_connection_open_until_its_response_waits_too_long() {
        let watch = ConnectionWatch::new(&limits());
        let request = watch.begin();
        // Processing for longer than any timeout closes nothing.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(watch.check(Instant::now()).is_ok());
        request.responding();
        let ready_at = Instant::now();
        assert_eq!(watch.expired().await, Closing::SendTimeout);
        assert_eq!(ready_at.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_requests_beyond_the_rate_close_the_connection_at_once() {
        let watch = ConnectionWatch::new(&limits());
        for _ in 0..3 {
            drop(watch.begin());
        }
        assert!(
            watch.check(Instant::now()).is_ok(),
            "3 per second are allowed"
        );
        // A new second, a new count.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..3 {
            drop(watch.begin());
        }
        assert!(watch.check(Instant::now()).is_ok());
        let watching = tokio::spawn({
            let watch = Arc::clone(&watch);
            async move { watch.expired().await }
        });
        tokio::task::yield_now().await;
        drop(watch.begin());
        assert_eq!(watching.await.unwrap(), Closing::ResetFlood);
    }

    #[tokio::test(start_paused = true)]
    async fn completed_requests_are_not_resets() {
        let watch = ConnectionWatch::new(&limits());
        for _ in 0..10 {
            let mut request = watch.begin();
            request.complete = true;
        }
        assert!(watch.check(Instant::now()).is_ok());
    }
}
