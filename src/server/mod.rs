//! Serving: the accept loop (TCP → optional rustls handshake → HTTP/1.1 or
//! HTTP/2 by ALPN → the service), the gateway's public and admin listeners
//! run side by side, and the drain on shutdown. The accept loop is shared by
//! the gateway, the emulator and test servers.

pub(crate) mod admin;
mod stack;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;
use tracing::instrument::{WithDispatch, WithSubscriber};

use crate::config::ServerLimits;
use crate::error::BoxError;
use crate::pipeline::Pipeline;
use admin::Health;
pub(crate) use stack::stack;

/// HTTP/2 streams per connection.
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// How far hyper's own head limits sit above the gateway's
/// (`server.max_header_bytes`), so that the gateway's check fires first and
/// answers in the normalized body.
const PARSER_HEADROOM: usize = 64 * 1024;
/// Limits of servers that are not the gateway (emulator, test servers).
const DEFAULT_LIMITS: ServerLimits = ServerLimits {
    max_header_bytes: 32 * 1024,
    max_connections: 10_000,
    handshake_timeout: Duration::from_secs(10),
    header_read_timeout: Duration::from_secs(10),
};

/// The peer address of the connection a request arrived on; the accept loop
/// puts it in every request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

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
        tls,
        service,
        shutdown,
        grace,
        None,
        DEFAULT_LIMITS,
    )
    .await
}

/// [`serve`], keeping `connections` at the number of open client
/// connections.
async fn serve_counted<S, B>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
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
    let acceptor = tls.map(TlsAcceptor::from);
    let executor = CurrentSubscriberExecutor::current();
    let builder = http_builder(executor.clone(), &limits);
    // Beyond `max_connections` accepting waits: the kernel's backlog holds
    // the rest, never this process's memory.
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
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
        let service = WithClientAddr {
            inner: service.clone(),
            peer,
        };
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let open = connections.clone().map(OpenConnection::new);
        let mut closed = closed.clone();
        let handshake_timeout = limits.handshake_timeout;
        executor.spawn(async move {
            let _open = open;
            let _slot = slot;
            let serving = async {
                match acceptor {
                    Some(acceptor) => match handshake(&acceptor, stream, handshake_timeout).await {
                        Ok(tls) => {
                            let conn = builder.serve_connection(TokioIo::new(tls), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Err(error) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            Ok(())
                        }
                    },
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                }
            };
            let result = tokio::select! {
                result = serving => result,
                _ = closed.wait_for(|closed| *closed) => return,
            };
            if let Err(error) = result {
                tracing::debug!(%peer, error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    tokio::select! {
        () = &mut drained => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("drain deadline passed; closing remaining connections");
            let _ = closing.send(true);
            // The closed connections let go of their requests now.
            let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
        }
    }
}

/// The gateway's listeners and what they serve.
pub(crate) struct Listeners {
    pub public: TcpListener,
    /// `open_connections` on the public listener.
    pub connections: Gauge,
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
        tokio::spawn(serving.with_current_subscriber())
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

/// Puts the connection's peer address into each request's extensions.
#[derive(Clone)]
struct WithClientAddr<S> {
    inner: S,
    peer: SocketAddr,
}

impl<S, B> hyper::service::Service<Request<B>> for WithClientAddr<S>
where
    S: hyper::service::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: Request<B>) -> Self::Future {
        request.extensions_mut().insert(ClientAddr(self.peer));
        self.inner.call(request)
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

    fn dispatched<F: Future>(&self, future: F) -> WithDispatch<F> {
        future.with_subscriber(self.0.clone())
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
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(parser_limit)
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(u32::try_from(parser_limit).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30));
    builder
}
