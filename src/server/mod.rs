//! Serving: the accept loop (TCP → optional rustls handshake → HTTP/1.1 or
//! HTTP/2 by ALPN → the service), the gateway's public and admin listeners
//! run side by side, and the drain on shutdown. The accept loop is shared by
//! the gateway, the emulator and test servers.

pub(crate) mod admin;
mod conn_watch;
mod stack;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::ServerLimits;
use crate::error::BoxError;
use crate::pipeline::Pipeline;
use crate::subscriber::{Dispatched, InCurrentSubscriber};
use admin::Health;
use conn_watch::{Closing, ConnectionWatch, Watched};
pub(crate) use stack::stack;

/// How far hyper's own head limits sit above the gateway's
/// (`server.max_header_bytes`, `server.max_headers`), so that the gateway's
/// checks fire first and answer in the normalized body.
const PARSER_HEADROOM: usize = 64 * 1024;
const HEADER_COUNT_HEADROOM: usize = 64;
/// hyper parses up to this many HTTP/1.1 header fields on the stack; a
/// larger limit costs a heap allocation per request.
const HYPER_STACK_HEADERS: usize = 100;
/// HTTP/2 streams the client reset before the service saw them
/// (CVE-2023-44487); hyper's default, set explicitly.
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// HTTP/2 streams the server may reset for a protocol error by the client
/// before the connection is closed (CVE-2024-27316 class); hyper's default.
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Bytes hyper buffers per HTTP/2 stream ahead of the client's window.
const H2_MAX_SEND_BUFFER: usize = 64 * 1024;

/// The peer address of the connection a request arrived on; the accept loop
/// puts it in every request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Who the client certificate of the connection a request arrived on names
/// (`server.client_ca`; see [`tls::client_identity`]). Present only when a
/// certificate was verified and names someone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity(pub Arc<str>);

/// Serves `service` on `listener` until `shutdown` resolves, then lets
/// in-flight connections finish for at most `grace`.
///
/// Connection and stream tasks log to the subscriber that was current when
/// `serve` was called, so a test can capture one server's log on its own.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    service: S,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    serve_counted(
        listener,
        tls.map(|config| Arc::new(ArcSwap::new(config))),
        service,
        shutdown,
        grace,
        None,
        ServerLimits::DEFAULT,
    )
    .await
}

/// [`serve`], keeping `connections` at the number of open client
/// connections.
async fn serve_counted<S, B>(
    listener: TcpListener,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    service: S,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    connections: Option<Gauge>,
    limits: ServerLimits,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let executor = CurrentSubscriberExecutor::current();
    let builder = http_builder(executor.clone(), &limits);
    // Beyond `max_connections` accepting waits: the kernel's backlog holds
    // the rest, never this process's memory. Each connection holds a slot
    // until it ends, so all slots back means drained.
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // On shutdown every connection finishes its requests and closes.
    let (drain, draining) = watch::channel(false);
    // Past the drain deadline every connection still open is closed: its
    // in-flight requests end as abandoned (and are recorded as such).
    let (closing, closed) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Running out of file descriptors must not end the loop;
                    // back off so the error does not spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let builder = builder.clone();
        // Each handshake takes the configuration current when it starts: a
        // reload changes new connections only.
        let acceptor = tls.as_ref().map(|tls| TlsAcceptor::from(tls.load_full()));
        let open = connections.clone().map(OpenConnection::new);
        let (draining, mut closed) = (draining.clone(), closed.clone());
        executor.spawn(async move {
            let _open = open;
            let _slot = slot;
            let serving = async {
                let stream = match acceptor {
                    Some(acceptor) => {
                        match handshake(&acceptor, stream, limits.handshake_timeout).await {
                            Ok(tls) => Accepted::Tls(Box::new(tls)),
                            Err(error) => {
                                tracing::debug!(%peer, %error, "TLS handshake failed");
                                return Ok(());
                            }
                        }
                    }
                    None => Accepted::Plain(stream),
                };
                let watch = ConnectionWatch::new(&limits);
                let identity = match &stream {
                    Accepted::Tls(tls) => tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(<[_]>::first)
                        .and_then(tls::client_identity)
                        .map(|id| ClientIdentity(id.into())),
                    Accepted::Plain(_) => None,
                };
                let service = Watched {
                    inner: service,
                    peer,
                    identity,
                    watch: Arc::clone(&watch),
                };
                match stream {
                    Accepted::Plain(plain) => {
                        let conn = builder.serve_connection(TokioIo::new(plain), service);
                        drive(conn, &watch, draining, peer).await
                    }
                    Accepted::Tls(tls) => {
                        let conn = builder.serve_connection(TokioIo::new(tls), service);
                        drive(conn, &watch, draining, peer).await
                    }
                }
            };
            let result = tokio::select! {
                result = serving => result,
                _ = closed.wait_for(|closed| *closed) => return,
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = drain.send(true);
    let all_slots = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let drained = slots.acquire_many(all_slots);
    tokio::pin!(drained);
    tokio::select! {
        _ = &mut drained => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("drain deadline passed; closing remaining connections");
            let _ = closing.send(true);
            // The closed connections let go of their requests now.
            let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
        }
    }
}

/// A connection ready for HTTP.
enum Accepted {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Serves one connection until it ends, its watch closes it, or the server
/// drains (then it finishes its requests and closes gracefully).
async fn drive<C>(
    conn: C,
    watch: &ConnectionWatch,
    mut draining: watch::Receiver<bool>,
    peer: SocketAddr,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => return result,
        _ = draining.wait_for(|draining| *draining) => {}
        closing = watch.expired() => {
            tracing::debug!(%peer, reason = closing.as_str(), "closing connection");
            if closing != Closing::Idle {
                return Ok(());
            }
        }
    }
    // Draining, or idle: finish what is in flight, then close — and close
    // outright a client that lingers or stalls meanwhile.
    watch.shutting_down();
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        result = conn => result,
        closing = watch.expired() => {
            tracing::debug!(%peer, reason = closing.as_str(), "closing connection");
            Ok(())
        }
    }
}

/// The gateway's listeners and what they serve.
pub(crate) struct Listeners {
    pub public: TcpListener,
    /// `open_connections` on the public listener.
    pub connections: Gauge,
    /// The TLS configuration new connections use, swapped by reloads.
    pub tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    /// The admin listener and what readiness looks at.
    pub admin: Option<(TcpListener, admin::Readiness)>,
    pub grace: Duration,
    pub limits: ServerLimits,
}

/// Runs the public listener (through [`stack`]) and the admin listener until
/// `shutdown` resolves, then drains.
///
/// On the shutdown signal readiness turns false and the public listener
/// stops accepting and drains; the admin listener keeps answering
/// (`/readyz` 503) until the drain is over, so probes see the gateway leave.
pub(crate) async fn run(
    listeners: Listeners,
    pipeline: Arc<Pipeline>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (draining_tx, mut draining) = watch::channel(false);
    let (admin_stop, admin_stopped) = oneshot::channel::<()>();
    let admin = listeners.admin.map(|(listener, readiness)| {
        let health = Health::new(readiness, draining.clone());
        let service = hyper::service::service_fn(move |request| {
            let health = health.clone();
            async move { health.handle(request).await }
        });
        let stopped = async {
            let _ = admin_stopped.await;
        };
        let serving = serve(listener, None, service, stopped, listeners.grace);
        tokio::spawn(serving.in_current_subscriber())
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = draining_tx.send(true);
    });
    let drain = async move {
        let _ = draining.wait_for(|draining| *draining).await;
    };
    let service = hyper_util::service::TowerToHyperService::new(stack(pipeline));
    serve_counted(
        listeners.public,
        listeners.tls,
        service,
        drain,
        listeners.grace,
        Some(listeners.connections),
        listeners.limits,
    )
    .await;
    let _ = admin_stop.send(());
    if let Some(admin) = admin {
        let _ = admin.await;
    }
}

/// Counts one open connection while it lives.
struct OpenConnection(Gauge);

impl OpenConnection {
    fn new(gauge: Gauge) -> OpenConnection {
        gauge.inc();
        OpenConnection(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Spawns connection and HTTP/2 stream tasks on tokio, each carrying the
/// subscriber that was current when the server started.
#[derive(Clone)]
struct CurrentSubscriberExecutor(tracing::Dispatch);

impl CurrentSubscriberExecutor {
    fn current() -> Self {
        CurrentSubscriberExecutor(tracing::dispatcher::get_default(|d| d.clone()))
    }

    fn spawn<F>(&self, future: F)
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        tokio::spawn(self.dispatched(future));
    }

    /// Polled and dropped under the server's subscriber (see
    /// [`crate::subscriber`]).
    fn dispatched<F: Future>(&self, future: F) -> Dispatched<F> {
        Dispatched::new(future, self.0.clone())
    }
}

impl<F> hyper::rt::Executor<F> for CurrentSubscriberExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.spawn(future);
    }
}

async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    tokio::time::timeout(timeout, acceptor.accept(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

fn http_builder(
    executor: CurrentSubscriberExecutor,
    limits: &ServerLimits,
) -> auto::Builder<CurrentSubscriberExecutor> {
    let parser_limit = limits.max_header_bytes + PARSER_HEADROOM;
    let mut builder = auto::Builder::new(executor);
    let mut http1 = builder.http1();
    http1
        .timer(TokioTimer::new())
        .max_buf_size(parser_limit)
        .header_read_timeout(limits.header_read_timeout);
    let header_count = limits.max_headers + HEADER_COUNT_HEADROOM;
    if header_count > HYPER_STACK_HEADERS {
        http1.max_headers(header_count);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(parser_limit).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
        .max_send_buf_size(H2_MAX_SEND_BUFFER)
        .keep_alive_interval(limits.h2_keepalive_interval)
        .keep_alive_timeout(limits.h2_keepalive_timeout);
    builder
}
