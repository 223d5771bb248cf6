//! The KooDrive emulator: a stand-in for the real upstream that enforces the
//! "List batch tasks" API's rules (Bearer token it issued, `X-User-Id`
//! matching the token, `X-Date` format and 15-minute window, parameter
//! ranges), answers in KooDrive's shapes from a deterministic per-user data
//! set, records what it received, and injects faults on demand. It also
//! runs an RFC 8693 token endpoint issuing expiring tokens bound to a user.

pub mod data;
mod token;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::jobs::JOBS_PATH;

/// How far in the past an `X-Date` may lie (the API's window).
pub const X_DATE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// How many received requests are kept for inspection.
const RECORDED_MAX: usize = 1024;

/// A failure the emulator injects into every jobs request until cleared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Behave like KooDrive.
    #[default]
    None,
    /// Answer normally after this delay.
    Latency(Duration),
    /// Answer with this status and a KooDrive-shaped error body.
    Status(u16),
    /// Answer 500 with an HTML page (as a misconfigured load balancer does).
    HtmlError,
    /// Answer 200 with a body that is not JSON.
    GarbageBody,
    /// Answer with this status and an empty body.
    EmptyBody(u16),
    /// Close the connection without answering.
    DropConnection,
    /// Token endpoint only: answer 200 with this `expires_in`.
    BadExpiry(i64),
    /// Answer with this status (429 or 503) and `Retry-After: seconds`.
    Throttle { status: u16, retry_after_s: u64 },
}

/// The token endpoint's path.
pub const TOKEN_PATH: &str = "/oauth2/token";
/// Default lifetime of issued tokens.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Largest token request body read.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// An access token the emulator accepts.
#[derive(Clone, Debug)]
struct TokenGrant {
    user_id: String,
    /// `None`: never expires (tokens granted by hand).
    expires_at: Option<Instant>,
}

/// What the emulator received, for assertions.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    /// The raw query string as received.
    pub query: Option<String>,
    pub headers: HeaderMap,
}

struct State {
    /// Access token → user and expiry.
    tokens: Mutex<HashMap<String, TokenGrant>>,
    recorded: Mutex<VecDeque<RecordedRequest>>,
    fault: Mutex<Fault>,
    jobs_requests: AtomicU64,
    /// Jobs requests being answered now, and the most there ever were.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    /// (client id, client secret) the token endpoint accepts.
    client: Mutex<Option<(String, String)>>,
    /// Claim of the subject token that names the user.
    user_claim: Mutex<String>,
    token_ttl: Mutex<Duration>,
    token_fault: Mutex<Fault>,
    exchanges: AtomicU64,
    /// `Cache-Control` sent with successful jobs answers, if any.
    cache_control: Mutex<Option<String>>,
}

impl Default for State {
    fn default() -> State {
        State {
            tokens: Mutex::default(),
            recorded: Mutex::default(),
            fault: Mutex::default(),
            jobs_requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            client: Mutex::default(),
            user_claim: Mutex::new("koodrive_uid".into()),
            token_ttl: Mutex::new(DEFAULT_TOKEN_TTL),
            token_fault: Mutex::default(),
            exchanges: AtomicU64::new(0),
            cache_control: Mutex::default(),
        }
    }
}

/// Locks ignoring poisoning: the emulator's state stays usable for the
/// assertions that follow a panicking test thread.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Grants access tokens on a running emulator.
#[derive(Clone)]
pub(crate) struct Granter(Arc<State>);

impl Granter {
    /// Makes `token` valid for `user_id`, without expiry.
    pub(crate) fn grant(&self, token: &str, user_id: &str) {
        lock(&self.0.tokens).insert(
            token.to_owned(),
            TokenGrant {
                user_id: user_id.to_owned(),
                expires_at: None,
            },
        );
    }
}

/// A running emulator; stops when dropped.
pub struct Emulator {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<State>,
    _shutdown: oneshot::Sender<()>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Emulator {
    /// Binds `listen` (port 0 for an ephemeral port) and serves, over TLS
    /// when `tls` is given.
    pub async fn start(
        listen: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind(listen).await?;
        Ok(Emulator::serve(listener, tls))
    }

    /// Serves on an already bound listener.
    pub fn serve(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> Emulator {
        let addr = listener
            .local_addr()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let state = Arc::new(State::default());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let service_state = state.clone();
        let service = hyper::service::service_fn(move |request| {
            let state = service_state.clone();
            async move { handle(&state, request).await }
        });
        tokio::spawn(crate::server::serve(
            listener,
            tls,
            service,
            async {
                let _ = shutdown_rx.await;
            },
            Duration::from_secs(1),
        ));
        Emulator {
            addr,
            scheme,
            state,
            _shutdown: shutdown_tx,
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure as `upstream.base_url`.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.base_url())
    }

    /// Makes `token` a valid, non-expiring access token for `user_id`.
    pub fn grant(&self, token: &str, user_id: &str) {
        self.granter().grant(token, user_id);
    }

    /// A handle that grants tokens while the emulator runs (a reload of
    /// the gateway's static tokens provisions the embedded emulator too).
    pub(crate) fn granter(&self) -> Granter {
        Granter(Arc::clone(&self.state))
    }

    /// Invalidates `token`.
    pub fn revoke(&self, token: &str) {
        lock(&self.state.tokens).remove(token);
    }

    /// Invalidates every token of `user_id`.
    pub fn revoke_user(&self, user_id: &str) {
        lock(&self.state.tokens).retain(|_, grant| grant.user_id != user_id);
    }

    /// The client credentials the token endpoint accepts.
    pub fn set_client(&self, client_id: &str, client_secret: &str) {
        *lock(&self.state.client) = Some((client_id.to_owned(), client_secret.to_owned()));
    }

    /// The subject-token claim that names the KooDrive user.
    pub fn set_user_claim(&self, claim: &str) {
        *lock(&self.state.user_claim) = claim.to_owned();
    }

    /// Lifetime of tokens issued from now on.
    pub fn set_token_ttl(&self, ttl: Duration) {
        *lock(&self.state.token_ttl) = ttl;
    }

    /// Injects `fault` into every following token request.
    pub fn set_token_fault(&self, fault: Fault) {
        *lock(&self.state.token_fault) = fault;
    }

    /// Sends `Cache-Control: value` with successful jobs answers.
    pub fn set_cache_control(&self, value: Option<&str>) {
        *lock(&self.state.cache_control) = value.map(str::to_owned);
    }

    /// How many token requests reached the token endpoint.
    pub fn exchanges(&self) -> u64 {
        self.state.exchanges.load(Ordering::SeqCst)
    }

    /// How many requests reached the jobs endpoint.
    pub fn jobs_requests(&self) -> u64 {
        self.state.jobs_requests.load(Ordering::SeqCst)
    }

    /// The most recent jobs requests, oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        lock(&self.state.recorded).iter().cloned().collect()
    }

    /// The last jobs request received.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock(&self.state.recorded).back().cloned()
    }

    /// Injects `fault` into every following jobs request.
    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.state.fault) = fault;
    }

    /// The most jobs requests it was ever answering at once.
    pub fn peak_in_flight(&self) -> u64 {
        self.state.peak_in_flight.load(Ordering::SeqCst)
    }
}

/// Counts a jobs request in flight while it lives.
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn enter(state: &'a State) -> InFlight<'a> {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Returning `Err` makes hyper close the connection without a response.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}

impl std::error::Error for Dropped {}

type Reply = Response<Full<Bytes>>;

async fn handle(state: &State, request: Request<Incoming>) -> Result<Reply, Dropped> {
    if request.uri().path() == TOKEN_PATH {
        return token::handle(state, request).await;
    }
    if request.uri().path() != JOBS_PATH {
        return Ok(koodrive_error(
            StatusCode::NOT_FOUND,
            json!(404),
            "Not Found",
        ));
    }
    if request.method() != Method::GET {
        return Ok(koodrive_error(
            StatusCode::METHOD_NOT_ALLOWED,
            json!(405),
            "Method Not Allowed",
        ));
    }
    state.jobs_requests.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight::enter(state);
    {
        let mut recorded = lock(&state.recorded);
        if recorded.len() == RECORDED_MAX {
            recorded.pop_front();
        }
        recorded.push_back(RecordedRequest {
            method: request.method().clone(),
            query: request.uri().query().map(str::to_owned),
            headers: request.headers().clone(),
        });
    }
    let fault = lock(&state.fault).clone();
    match fault {
        Fault::None | Fault::BadExpiry(_) => {}
        Fault::Latency(delay) => tokio::time::sleep(delay).await,
        Fault::Status(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(koodrive_error(status, json!(status.as_u16()), "injected failure"));
        }
        Fault::HtmlError => {
            return Ok(raw(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/html",
                "<html><body><h1>500 Internal Server Error</h1><pre>at com.koodrive.Jobs(Jobs.java:42)</pre></body></html>",
            ))
        }
        Fault::GarbageBody => return Ok(raw(StatusCode::OK, "application/json", "{\"code\":0,\"data\":[tru")),
        Fault::EmptyBody(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            return Ok(raw(status, "application/json", ""));
        }
        Fault::DropConnection => return Err(Dropped),
        Fault::Throttle {
            status,
            retry_after_s,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            let mut reply = koodrive_error(status, json!(status.as_u16()), "slow down");
            reply
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            return Ok(reply);
        }
    }
    Ok(answer_jobs(state, &request))
}

/// The real API's checks, in order: credentials (401), then parameters (400).
fn answer_jobs(state: &State, request: &Request<Incoming>) -> Reply {
    let user_id = match authenticate(state, request.headers()) {
        Ok(user_id) => user_id,
        Err(msg) => return koodrive_error(StatusCode::UNAUTHORIZED, json!("401"), msg),
    };
    let params = match Params::parse(request.uri().query().unwrap_or("")) {
        Ok(params) => params,
        Err(msg) => return koodrive_error(StatusCode::BAD_REQUEST, json!(400), &msg),
    };
    let jobs = data::page(
        &user_id,
        params.offset,
        params.limit,
        params.job_type,
        params.status,
    );
    let body = json!({"code": 0, "msg": "OK", "data": jobs});
    let mut reply = raw(StatusCode::OK, "application/json", &body.to_string());
    if let Some(value) = lock(&state.cache_control)
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        reply
            .headers_mut()
            .insert(http::header::CACHE_CONTROL, value);
    }
    reply
}

/// The user the request may act for: a known Bearer token, `X-User-Id`
/// equal to the token's user, and a fresh `X-Date`.
fn authenticate(state: &State, headers: &HeaderMap) -> Result<String, &'static str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let token = header(AUTHORIZATION.as_str())
        .and_then(bearer)
        .ok_or("missing or malformed Authorization")?;
    let grant = lock(&state.tokens)
        .get(token)
        .cloned()
        .ok_or("invalid access token")?;
    if grant.expires_at.is_some_and(|at| Instant::now() >= at) {
        return Err("access token expired");
    }
    let user_of_token = grant.user_id;
    let user_id = header("x-user-id").ok_or("missing X-User-Id")?;
    if user_id != user_of_token {
        return Err("X-User-Id does not match the access token");
    }
    let x_date = header("x-date").ok_or("missing X-Date")?;
    check_x_date(x_date, OffsetDateTime::now_utc())?;
    Ok(user_of_token)
}

/// The token of `Bearer <t>` or of the doc's literal `Bearer+<t>`.
fn bearer(value: &str) -> Option<&str> {
    let rest = value.strip_prefix("Bearer")?;
    let token = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('+'))?;
    (!token.is_empty()).then_some(token)
}

/// `X-Date`: `yyyyMMdd'T'HHmmss'Z'`, not later than now, not older than 15 minutes.
fn check_x_date(value: &str, now: OffsetDateTime) -> Result<(), &'static str> {
    let format = format_description!("[year][month][day]T[hour][minute][second]Z");
    let at = PrimitiveDateTime::parse(value, &format)
        .map_err(|_| "X-Date must be yyyyMMdd'T'HHmmss'Z'")?
        .assume_utc();
    if at > now {
        return Err("X-Date is in the future");
    }
    if now - at > X_DATE_WINDOW {
        return Err("X-Date is older than 15 minutes");
    }
    Ok(())
}

/// The emulator's own (lenient-grammar, strict-range) view of the query.
struct Params {
    offset: u64,
    limit: u64,
    job_type: Option<u8>,
    status: Option<u8>,
}

impl Params {
    fn parse(query: &str) -> Result<Params, String> {
        let mut values: HashMap<String, String> = HashMap::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            values.insert(name.into_owned(), value.into_owned());
        }
        let number = |name: &str, min: u64, max: u64| -> Result<Option<u64>, String> {
            match values.get(name) {
                None => Ok(None),
                Some(v) => v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (min..=max).contains(n))
                    .map(Some)
                    .ok_or_else(|| format!("invalid parameter: {name}")),
            }
        };
        let small = |n: Option<u64>| n.and_then(|n| u8::try_from(n).ok());
        Ok(Params {
            offset: number("offset", 0, i64::MAX as u64)?.ok_or("missing parameter: offset")?,
            limit: number("limit", 1, 100)?.ok_or("missing parameter: limit")?,
            job_type: small(number("type", 1, 7)?),
            status: small(number("status", 0, 3)?),
        })
    }
}

fn koodrive_error(status: StatusCode, code: serde_json::Value, msg: &str) -> Reply {
    raw(
        status,
        "application/json",
        &json!({"code": code, "msg": msg}).to_string(),
    )
}

fn raw(status: StatusCode, content_type: &'static str, body: &str) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn both_bearer_forms_are_accepted() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("Bearer+abc"), Some("abc"));
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Basic abc"), None);
    }

    #[test]
    fn x_date_window_is_enforced() {
        let now = datetime!(2025-11-03 07:15:00 UTC);
        assert!(check_x_date("20251103T071500Z", now).is_ok());
        assert!(check_x_date("20251103T070000Z", now).is_ok());
        assert!(check_x_date("20251103T065959Z", now).is_err());
        assert!(check_x_date("20251103T071501Z", now).is_err());
        assert!(check_x_date("2025-11-03T07:15:00Z", now).is_err());
    }

    #[test]
    fn parameter_ranges_are_enforced() {
        assert!(Params::parse("offset=0&limit=1").is_ok());
        assert!(Params::parse("offset=0&limit=0").is_err());
        assert!(Params::parse("offset=0&limit=101").is_err());
        assert!(Params::parse("offset=0&limit=1&type=8").is_err());
        assert!(Params::parse("offset=0&limit=1&status=4").is_err());
        assert!(Params::parse("limit=1").is_err());
    }
}
