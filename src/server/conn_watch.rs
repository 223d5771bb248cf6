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
//!   the client in one second (HTTP/2 rapid reset) close the connection;
//! - **shutting down**: once a graceful shutdown began (drain, or idle), a
//!   connection with nothing in flight for `header_read_timeout` is closed
//!   (a client that never acknowledges the GOAWAY), and the send and reset
//!   limits keep applying to streams it still opens.
//!
//! Response bodies are handed to hyper in chunks of at most [`CHUNK`]
//! bytes: hyper takes a body chunk as soon as one byte of flow-control
//! window is open and h2 buffers it whole, so a body handed over at once
//! would count as sent to a client that opened its window by one byte.
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

use bytes::{Buf, Bytes};
use http::{Method, Request, Response, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{ClientAddr, ClientIdentity};
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
    /// Still open, with nothing in flight, after a graceful shutdown.
    Lingering,
}

impl Closing {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Closing::NoRequest => "no request after the handshake",
            Closing::Idle => "idle",
            Closing::SendTimeout => "response not taken within the send timeout",
            Closing::ResetFlood => "too many cancelled requests",
            Closing::Lingering => "still open after shutting down",
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
    /// When a graceful shutdown began.
    shutting_down: Option<Instant>,
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
                shutting_down: None,
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
        if let Some(since) = state.shutting_down {
            if state.in_flight == 0 {
                let quiet_since = since.max(state.idle_since);
                deadlines.push((quiet_since + self.first_request, Closing::Lingering));
            }
        } else if state.in_flight == 0 {
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

    /// A graceful shutdown began: from now on idleness closes outright.
    pub(super) fn shutting_down(&self) {
        let mut state = self.lock();
        state.shutting_down.get_or_insert_with(Instant::now);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request head arrived: it is in flight until its response has been
    /// taken in full, or is abandoned.
    fn begin(self: &Arc<Self>, version: Version) -> InFlight {
        let mut state = self.lock();
        state.requests += 1;
        state.in_flight += 1;
        InFlight {
            watch: Arc::clone(self),
            id: state.requests,
            complete: false,
            // An HTTP/1.1 client that leaves takes its connection with it;
            // only HTTP/2 can cancel requests and stay.
            counts_as_reset: version == Version::HTTP_2,
        }
    }
}

/// One request on a watched connection, from its head to the end of its
/// response.
pub(super) struct InFlight {
    watch: Arc<ConnectionWatch>,
    id: u64,
    complete: bool,
    counts_as_reset: bool,
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
        if self.complete || !self.counts_as_reset {
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

/// The service of one connection: puts the peer's address (and the
/// identity its client certificate proved) into each request's extensions
/// and tells the watch when requests start, have a response ready, and end.
#[derive(Clone)]
pub(super) struct Watched<S> {
    pub(super) inner: S,
    pub(super) peer: std::net::SocketAddr,
    pub(super) identity: Option<ClientIdentity>,
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
        let in_flight = self.watch.begin(request.version());
        // A HEAD response's body is never sent: it ends with its head.
        let head = request.method() == Method::HEAD;
        request.extensions_mut().insert(ClientAddr(self.peer));
        if let Some(identity) = &self.identity {
            request.extensions_mut().insert(identity.clone());
        }
        WatchedCall {
            inner: self.inner.call(request),
            in_flight: Some(in_flight),
            head,
        }
    }
}

pin_project_lite::pin_project! {
    /// The service's future; its response's body carries the request on.
    pub(super) struct WatchedCall<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
        head: bool,
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
        let head = *this.head;
        Poll::Ready(result.map(|response| {
            response.map(|body| {
                let mut in_flight = in_flight;
                if let Some(in_flight) = &mut in_flight {
                    in_flight.responding();
                    in_flight.complete |= head;
                }
                WatchedBody::new(body, in_flight)
            })
        }))
    }
}

/// The most of a response body handed to hyper at once.
pub(super) const CHUNK: usize = 16 * 1024;

pin_project_lite::pin_project! {
    /// A response body, handed over in chunks of at most [`CHUNK`] bytes;
    /// its request ends when the body has been taken in full (complete) or
    /// is dropped before (cancelled).
    pub(super) struct WatchedBody<B> {
        #[pin]
        inner: B,
        // The rest of the inner body's last data frame.
        rest: Bytes,
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
        WatchedBody {
            inner,
            rest: Bytes::new(),
            in_flight,
        }
    }
}

impl<B: Body> Body for WatchedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let frame = if this.rest.is_empty() {
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        *this.rest = data.copy_to_bytes(data.remaining());
                        let chunk = this.rest.split_to(this.rest.len().min(CHUNK));
                        Some(Ok(Frame::data(chunk)))
                    }
                    Err(frame) => Some(Ok(frame.map_data(|mut d| d.copy_to_bytes(d.remaining())))),
                },
                other => {
                    other.map(|r| r.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining()))))
                }
            }
        } else {
            let chunk = this.rest.split_to(this.rest.len().min(CHUNK));
            Some(Ok(Frame::data(chunk)))
        };
        if frame.is_none() || (this.rest.is_empty() && this.inner.is_end_stream()) {
            if let Some(in_flight) = this.in_flight {
                in_flight.complete = true;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.len() as u64;
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
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
        let mut request = watch.begin(Version::HTTP_2);
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
        let request = watch.begin(Version::HTTP_2);
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
            drop(watch.begin(Version::HTTP_2));
        }
        assert!(
            watch.check(Instant::now()).is_ok(),
            "3 per second are allowed"
        );
        // A new second, a new count.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..3 {
            drop(watch.begin(Version::HTTP_2));
        }
        assert!(watch.check(Instant::now()).is_ok());
        let watching = tokio::spawn({
            let watch = Arc::clone(&watch);
            async move { watch.expired().await }
        });
        tokio::task::yield_now().await;
        drop(watch.begin(Version::HTTP_2));
        assert_eq!(watching.await.unwrap(), Closing::ResetFlood);
    }

    #[tokio::test(start_paused = true)]
    async fn completed_requests_are_not_resets() {
        let watch = ConnectionWatch::new(&limits());
        for _ in 0..10 {
            let mut request = watch.begin(Version::HTTP_2);
            request.complete = true;
        }
        assert!(watch.check(Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn http1_requests_dropped_unfinished_are_not_resets() {
        let watch = ConnectionWatch::new(&limits());
        for _ in 0..10 {
            drop(watch.begin(Version::HTTP_11));
        }
        assert!(watch.check(Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_shutdown_a_connection_with_nothing_in_flight_is_closed() {
        let watch = ConnectionWatch::new(&limits());
        let mut request = watch.begin(Version::HTTP_2);
        request.complete = true;
        drop(request);
        watch.shutting_down();
        let since = Instant::now();
        assert_eq!(watch.expired().await, Closing::Lingering);
        assert_eq!(since.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_is_handed_over_in_chunks_and_completes_with_its_last() {
        use http_body_util::{BodyExt, Full};
        let watch = ConnectionWatch::new(&limits());
        let request = watch.begin(Version::HTTP_2);
        request.responding();
        let body = Full::new(Bytes::from(vec![7u8; 2 * CHUNK + 10]));
        let mut body = WatchedBody::new(body, Some(request));
        let mut sizes = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            sizes.push(data.len());
            let done = body.in_flight.as_ref().unwrap().complete;
            assert_eq!(done, sizes.iter().sum::<usize>() == 2 * CHUNK + 10);
        }
        assert_eq!(sizes, [CHUNK, CHUNK, 10]);
        assert!(body.is_end_stream());
        drop(body);
        assert!(
            watch.check(Instant::now()).is_ok(),
            "a complete body is no reset"
        );
    }
}
