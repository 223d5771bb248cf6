//! Test harness: a TLS emulator and a TLS gateway on ephemeral ports, a real
//! rustls client (HTTP/1.1 or HTTP/2) trusting the dev CA, and JWT minting;
//! the real binary as a child process ([`binary`]).

pub mod binary;
pub mod pki;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use koodrive_gateway::config::{Config, Secrets, TlsFiles};
use koodrive_gateway::devcerts;
use koodrive_gateway::emulator::Emulator;
use koodrive_gateway::server::tls;
use koodrive_gateway::Gateway;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tracing::instrument::WithSubscriber;

pub const ISSUER: &str = "https://idp.test";
pub const AUDIENCE: &str = "koodrive-gateway-test";
/// Users with KooDrive tokens, and their tokens.
pub const USERS: [(&str, &str); 3] = [
    ("u-1", "kd-token-for-u-1-5f3a"),
    ("u-2", "kd-token-for-u-2-9c1d"),
    ("u-3", "kd-token-for-u-3-77ab"),
];

/// The client id and secret of exchange-mode tests.
pub const CLIENT_ID: &str = "gateway-test-client";
pub const CLIENT_SECRET: &str = "client-secret-3b9f0e";
const CLIENT_SECRET_ENV: &str = "KOODRIVE_GATEWAY_TEST_CLIENT_SECRET";

/// Code run with the dev material directory before the gateway starts.
pub type Hook = Box<dyn FnOnce(&Path)>;

/// Knobs a test may turn before start.
pub struct Options {
    pub timeout_ms: u64,
    /// Replace the emulator's URL (e.g. a closed port).
    pub upstream_override: Option<String>,
    /// Exchange KooDrive tokens at the emulator's token endpoint instead of
    /// using the static file.
    pub exchange: bool,
    /// Load keys from this URL instead of the dev JWKS file.
    pub jwks_url: Option<String>,
    /// Extra lines for the `[auth]` section.
    pub auth_extra: &'static str,
    /// The `[cache]` section's lines (default: cache off, so upstream
    /// counters see every request).
    pub cache: &'static str,
    /// Runs with the dev material directory before the gateway starts.
    pub before_start: Option<Hook>,
    /// Rewrites the gateway's TOML before it is parsed (keys the other
    /// knobs do not reach).
    pub edit_config: Option<Box<dyn FnOnce(String) -> String>>,
    /// Extra lines for the `[upstream]` section.
    pub upstream_extra: String,
    /// Extra sections (e.g. `[rate_limit]`) appended to the file.
    pub sections: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout_ms: 5_000,
            upstream_override: None,
            exchange: false,
            jwks_url: None,
            auth_extra: "",
            cache: "ttl_ms = 0",
            before_start: None,
            edit_config: None,
            upstream_extra: String::new(),
            sections: String::new(),
        }
    }
}

/// A running emulator + gateway pair. Both stop when it is dropped.
pub struct TestEnv {
    pub dir: TempDir,
    pub emulator: Emulator,
    pub addr: SocketAddr,
    /// The admin listener (`/healthz`, `/readyz`).
    pub admin: SocketAddr,
    /// The response cache, when the test enabled it.
    pub cache: Option<Arc<koodrive_gateway::cache::ResponseCache>>,
    /// Everything this gateway logged (at debug level), and nothing that
    /// another test's gateway logged.
    log: LogCapture,
    /// SIGHUP's effect, without a signal.
    pub reloader: koodrive_gateway::Reloader,
    /// One pooled client per HTTP version, so a test's requests share
    /// connections instead of paying a handshake each.
    h1: HttpsClient,
    h2: HttpsClient,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
}

/// A response read to the end.
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }

    /// Asserts the normalized error shape and returns (code, msg).
    pub fn error(&self) -> (String, String) {
        let body = self.json();
        let object = body.as_object().expect("error body is an object");
        assert_eq!(object.len(), 3, "exactly code, msg, traceId: {body}");
        assert_eq!(self.header("content-type"), "application/json");
        assert_eq!(
            body["traceId"],
            self.header("x-traceid"),
            "traceId matches X-Traceid"
        );
        (
            body["code"].as_str().expect("code is a string").to_owned(),
            body["msg"].as_str().expect("msg is a string").to_owned(),
        )
    }
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        TestEnv::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> TestEnv {
        tls::install_default_providers();
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        devcerts::ensure(&certs).unwrap();
        if let Some(hook) = options.before_start {
            hook(&certs);
        }

        let emulator_tls = tls::server_config(&TlsFiles {
            cert: certs.join(devcerts::SERVER_CERT),
            key: certs.join(devcerts::SERVER_KEY),
            client_ca: None,
        })
        .unwrap();
        let emulator = Emulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), Some(emulator_tls))
            .await
            .unwrap();
        let mut tokens = serde_json::Map::new();
        for (user, token) in USERS {
            emulator.grant(token, user);
            tokens.insert(user.into(), token.into());
        }
        let tokens_file = dir.path().join("tokens.json");
        std::fs::write(&tokens_file, Value::Object(tokens).to_string()).unwrap();

        // Through the emulator's certificate name, so the client verifies it.
        let upstream = options
            .upstream_override
            .unwrap_or_else(|| format!("https://localhost:{}", emulator.addr().port()));
        let jwks = match &options.jwks_url {
            Some(url) => format!("jwks_url = \"{url}\""),
            None => format!("jwks_file = \"{}/jwks.json\"", certs.display()),
        };
        let mut secrets = Secrets::default();
        let token = if options.exchange {
            emulator.set_client(CLIENT_ID, CLIENT_SECRET);
            secrets = secrets.with(CLIENT_SECRET_ENV, CLIENT_SECRET);
            format!(
                "mode = \"exchange\"\ntoken_url = \"https://localhost:{}/oauth2/token\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret_env = \"{CLIENT_SECRET_ENV}\"",
                emulator.addr().port()
            )
        } else {
            format!(
                "mode = \"static\"\nstatic_tokens_file = \"{}\"",
                tokens_file.display()
            )
        };
        let toml = format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            admin_listen = "127.0.0.1:0"
            tls_cert = "{certs}/server.crt"
            tls_key = "{certs}/server.key"
            drain_timeout_ms = 100
            [upstream]
            base_url = "{upstream}"
            ca_file = "{certs}/ca.crt"
            timeout_ms = {timeout}
            {upstream_extra}
            [auth]
            issuer = "{ISSUER}"
            audience = "{AUDIENCE}"
            {jwks}
            {auth_extra}
            [token]
            {token}
            [cache]
            {cache}
            {sections}
            "#,
            upstream_extra = options.upstream_extra,
            sections = options.sections,
            certs = certs.display(),
            timeout = options.timeout_ms,
            auth_extra = options.auth_extra,
            cache = options.cache,
        );
        let toml = match options.edit_config {
            Some(edit) => edit(toml),
            None => toml,
        };
        let config = Config::from_toml(&toml).unwrap();
        let log = LogCapture::default();
        let gateway = Gateway::build_with(&config, &secrets)
            .with_subscriber(log.dispatch())
            .await
            .unwrap();
        let addr = gateway.local_addr().unwrap();
        let cache = gateway.cache();
        let admin = gateway.admin_addr().unwrap();
        let reloader = gateway.reloader();
        let (shutdown, stop) = oneshot::channel::<()>();
        let run = gateway.run(async {
            let _ = stop.await;
        });
        tokio::spawn(run.with_subscriber(log.dispatch()));
        TestEnv {
            dir,
            emulator,
            addr,
            admin,
            cache,
            log,
            reloader,
            h1: client(&certs.join(devcerts::CA_CERT), Version::HTTP_11),
            h2: client(&certs.join(devcerts::CA_CERT), Version::HTTP_2),
            shutdown: Mutex::new(Some(shutdown)),
        }
    }

    /// What this gateway has logged so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// The one access-log line of the request with `trace_id`, as text.
    pub fn access_text(&self, trace_id: &str) -> String {
        let log = self.log();
        let marker = format!(" request trace_id={trace_id} ");
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(&marker)).collect();
        assert_eq!(lines.len(), 1, "one access line for {trace_id}:\n{log}");
        lines[0].to_owned()
    }

    /// The fields of that line (text format: `… request key=value
    /// key="text" …`; a quoted value with spaces, such as `cause`, is cut
    /// at its first space: read it from [`Self::access_text`]).
    pub fn access_line(&self, trace_id: &str) -> std::collections::HashMap<String, String> {
        let line = self.access_text(trace_id);
        let start = line.find(" request trace_id=").unwrap_or(0) + " request ".len();
        line[start..]
            .split(' ')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect()
    }

    /// Sends the gateway its shutdown signal (as SIGTERM does).
    pub fn shutdown(&self) {
        if let Some(signal) = self.shutdown.lock().unwrap().take() {
            let _ = signal.send(());
        }
    }

    /// The body of `GET path` on the admin listener (plain HTTP).
    pub async fn admin_get(&self, path: &str) -> String {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let uri = format!("http://{}{path}", self.admin);
        let response = client.get(uri.parse().unwrap()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// The status of `GET path` on the admin listener (plain HTTP).
    pub async fn admin_status(&self, path: &str) -> StatusCode {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let uri = format!("http://{}{path}", self.admin);
        client.get(uri.parse().unwrap()).await.unwrap().status()
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Claims of a valid token for `user`.
    pub fn claims(&self, user: &str) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": format!("app-{user}"),
            "koodrive_uid": user,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
        })
    }

    /// Signs claims with the dev key.
    pub fn sign(&self, claims: &Value) -> String {
        devcerts::sign_dev_token(&self.certs(), claims).unwrap()
    }

    /// A valid token for `user`.
    pub fn token(&self, user: &str) -> String {
        self.sign(&self.claims(user))
    }

    /// `GET path_and_query` over HTTP/1.1 with `user`'s valid token.
    pub async fn get_as(&self, user: &str, path_and_query: &str) -> Reply {
        self.get_with(user, path_and_query, &[]).await
    }

    /// `GET path_and_query` over HTTP/1.1 with `user`'s valid token and
    /// `extra` headers.
    pub async fn get_with(
        &self,
        user: &str,
        path_and_query: &str,
        extra: &[(&str, &str)],
    ) -> Reply {
        self.get_bearer_with(&self.token(user), path_and_query, extra)
            .await
    }

    /// `GET path_and_query` over HTTP/1.1 presenting `jwt` as the bearer.
    pub async fn get_bearer(&self, jwt: &str, path_and_query: &str) -> Reply {
        self.get_bearer_with(jwt, path_and_query, &[]).await
    }

    async fn get_bearer_with(
        &self,
        jwt: &str,
        path_and_query: &str,
        extra: &[(&str, &str)],
    ) -> Reply {
        let auth = format!("Bearer {jwt}");
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        self.send(Version::HTTP_11, "GET", path_and_query, &headers, None)
            .await
    }

    /// Sends one request over real TLS with the given HTTP version.
    pub async fn send(
        &self,
        version: Version,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Reply {
        let client = if version == Version::HTTP_2 {
            &self.h2
        } else {
            &self.h1
        };
        let mut request = Request::builder().method(method).uri(format!(
            "https://localhost:{}{path_and_query}",
            self.addr.port()
        ));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = body
            .map(|b| Full::new(Bytes::from(b.to_owned())))
            .unwrap_or_default();
        let response = client.request(request.body(body).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }
}

/// The tests' HTTPS client.
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A rustls client trusting `ca`, speaking only `version` (ALPN-negotiated).
pub fn client(ca: &Path, version: Version) -> HttpsClient {
    let tls = tls::client_config(Some(ca)).unwrap();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let mut client = Client::builder(TokioExecutor::new());
    // Connections idle longer than this are not reused: the gateway closes
    // idle HTTP/1.1 connections after its 10 s header-read timeout, and
    // tests that advance paused time would otherwise race that close.
    client
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(std::time::Duration::from_secs(5));
    let connector = if version == Version::HTTP_2 {
        client.http2_only(true);
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    client.build(connector)
}

/// The emulator's job ids for `user` in a 200 body.
pub fn task_ids(body: &Value) -> Vec<String> {
    body["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|j| j["taskId"].as_str().unwrap().to_owned())
        .collect()
}

/// One gateway's log: a subscriber of its own (debug level, plain text)
/// whose lines land in a buffer the test reads.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    fn dispatch(&self) -> tracing::Dispatch {
        // Tests run in parallel, each gateway with a subscriber of its own,
        // and tracing keeps one global notion of which call sites and levels
        // are enabled: a global subscriber that enables everything (and
        // writes nowhere) keeps every call site alive in between.
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let everything = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(std::io::sink)
                .finish();
            let _ = tracing::subscriber::set_global_default(everything);
        });
        let buffer = self.clone();
        tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_env_filter("debug")
                .with_ansi(false)
                .with_writer(move || buffer.clone())
                .finish(),
        )
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A JWKS endpoint for tests: serves a settable document (or 503 while
/// none is set) over plain HTTP on loopback, counting fetches.
pub struct JwksServer {
    pub url: String,
    fetches: Arc<AtomicU64>,
    body: Arc<Mutex<Option<String>>>,
    max_age: Arc<Mutex<Option<u64>>>,
    _shutdown: oneshot::Sender<()>,
}

impl JwksServer {
    pub async fn start(body: Option<String>) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let fetches = Arc::new(AtomicU64::new(0));
        let body = Arc::new(Mutex::new(body));
        let max_age = Arc::new(Mutex::new(None::<u64>));
        let (shutdown, stop) = oneshot::channel::<()>();
        let (count, document, lifetime) = (fetches.clone(), body.clone(), max_age.clone());
        let service =
            hyper::service::service_fn(move |_request: Request<hyper::body::Incoming>| {
                count.fetch_add(1, Ordering::SeqCst);
                let document = document.lock().unwrap().clone();
                let lifetime = *lifetime.lock().unwrap();
                async move {
                    let mut response = match document {
                        Some(json) => http::Response::new(Full::new(Bytes::from(json))),
                        None => http::Response::builder()
                            .status(503)
                            .body(Full::new(Bytes::from_static(b"down")))
                            .unwrap(),
                    };
                    if let Some(seconds) = lifetime {
                        let value = format!("max-age={seconds}").parse().unwrap();
                        response.headers_mut().insert("cache-control", value);
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
        tokio::spawn(koodrive_gateway::server::serve(
            listener,
            None,
            service,
            async {
                let _ = stop.await;
            },
            std::time::Duration::from_millis(100),
        ));
        JwksServer {
            url,
            fetches,
            body,
            max_age,
            _shutdown: shutdown,
        }
    }

    /// Serves `body` from now on (`None`: answer 503).
    pub fn set(&self, body: Option<String>) {
        *self.body.lock().unwrap() = body;
    }

    /// Sends `Cache-Control: max-age=seconds` from now on.
    pub fn set_max_age(&self, seconds: Option<u64>) {
        *self.max_age.lock().unwrap() = seconds;
    }

    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// Stops paused time from auto-advancing while the guard lives, so only
/// `tokio::time::advance` moves the clock. (Auto-advance would otherwise
/// jump to the next timer whenever the runtime waits on loopback I/O.)
/// Tokio inhibits auto-advance while a blocking task runs; the guard keeps
/// one running. Call inside a `start_paused` test.
pub fn freeze_time() -> FrozenTime {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = wait.recv();
    });
    FrozenTime(release)
}

/// Guard of [`freeze_time`].
pub struct FrozenTime(std::sync::mpsc::Sender<()>);

impl Drop for FrozenTime {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// A `redis-server` of the test's own on a free loopback port, without
/// persistence; killed (by its PID) when dropped. `redis-server` must be
/// installed (`.ci/run` installs it from Debian's packages).
pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    child: Option<tokio::process::Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        // `--port 0` is not supported: take a free port from the kernel.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        self.child = Some(child);
        for _ in 0..200 {
            if self.connection().await.is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await?;
        Ok(connection)
    }

    /// Kills the server (the port stays this server's for a restart).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }
}

impl TestEnv {
    /// Writes `head` (a whole HTTP/1.1 request head, as bytes) over TLS and
    /// returns the response as text: for bytes no HTTP client would send.
    pub async fn send_raw(&self, head: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = tls::client_config(Some(&self.certs().join(devcerts::CA_CERT))).unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut stream = connector.connect(name, tcp).await.unwrap();
        stream.write_all(head).await.unwrap();
        let mut response = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stream.read_to_end(&mut response),
        )
        .await;
        String::from_utf8_lossy(&response).into_owned()
    }
}

/// The records in `path`, once there are `count` of them (the writer is a
/// thread of its own).
pub async fn audit_records(path: &Path, count: usize) -> Vec<Value> {
    for _ in 0..250 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= count {
            return text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{} holds fewer than {count} lines", path.display());
}
