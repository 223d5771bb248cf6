//! The real binary as a child process: a scratch working directory with the
//! shipped configs, one-shot commands (`dev-token`, `check-config`), and a
//! `serve` process of a test's own whose log, addresses, memory and metrics
//! the test can read.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

pub const BIN: &str = env!("CARGO_BIN_EXE_koodrive-gateway");

/// A scratch working directory holding a copy of the repository's `config/`.
pub fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    std::fs::create_dir(dir.path().join("config")).unwrap();
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(
            entry.path(),
            dir.path().join("config").join(entry.file_name()),
        )
        .unwrap();
    }
    dir
}

/// Runs the binary to completion; the client secret the example configs
/// name is set, as an operator would.
pub async fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("KOODRIVE_CLIENT_SECRET", "example-secret")
        .current_dir(dir)
        .output()
        .await
        .unwrap()
}

/// A development JWT for `user`, from `dev-token` (the dev key must exist:
/// call it once `serve` has started in `dir`).
pub async fn dev_token(dir: &Path, user: &str) -> String {
    dev_token_for(dir, koodrive_gateway::config::DEFAULT_CONFIG_PATH, user).await
}

/// A development JWT for `user` from the dev key `config` names.
pub async fn dev_token_for(dir: &Path, config: &str, user: &str) -> String {
    let out = run(dir, &["--config", config, "dev-token", "--user", user]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// How to start `serve`, beyond the demo config.
#[derive(Default)]
pub struct ServeOptions<'a> {
    /// Extra environment (config overrides `KOODRIVE_GATEWAY__…`, `RUST_LOG`).
    pub env: &'a [(&'a str, &'a str)],
    /// The process's open-file limit (`ulimit -n`), when set.
    pub nofile: Option<u64>,
    /// Arguments before `serve`'s defaults (e.g. `--config FILE`).
    pub args: &'a [&'a str],
}

/// A `serve` process of a test's own, and everything it has logged.
pub struct Serving {
    pub child: tokio::process::Child,
    /// Its public address (`127.0.0.1:<port>`).
    pub addr: String,
    /// Its admin address (`/healthz`, `/readyz`, `/metrics`).
    pub admin: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Serving {
    pub fn port(&self) -> &str {
        self.addr.rsplit(':').next().unwrap_or_default()
    }

    /// The process id (also when started through `sh`, which `exec`s it).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway is running")
    }

    /// The lines logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) for a line containing `needle`.
    pub async fn wait_for_line(&self, needle: &str) {
        for _ in 0..500 {
            if self.log().iter().any(|l| l.contains(needle)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no `{needle}` in the log: {:?}", self.log());
    }

    /// Sends it a signal by name (`TERM`, `HUP`).
    pub async fn signal(&self, name: &str) {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    }

    /// Its resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// The text of its `/metrics`.
    pub async fn metrics(&self) -> String {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let request = Request::get(format!("http://{}/metrics", self.admin))
            .body(Full::default())
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// The sum of a metric's samples (every label set), 0 when it has none.
    pub async fn metric_sum(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Calls to KooDrive (the embedded emulator) so far, whatever their status.
    pub async fn upstream_requests(&self) -> u64 {
        self.metric_sum("koodrive_gateway_upstream_requests_total")
            .await as u64
    }

    /// Open client connections on the public listener.
    pub async fn open_connections(&self) -> u64 {
        self.metric_sum("koodrive_gateway_open_connections").await as u64
    }
}

/// The resident set size of process `pid` in KiB (`VmRSS` of
/// `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process is running");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

/// Starts `serve` on the demo config in `dir`, on ephemeral ports, with the
/// extra environment `env`; collects its log and waits for its address.
pub async fn start_serve(dir: &Path, env: &[(&str, &str)]) -> Serving {
    start_serve_with(
        dir,
        ServeOptions {
            env,
            ..ServeOptions::default()
        },
    )
    .await
}

/// [`start_serve`] with every option.
pub async fn start_serve_with(dir: &Path, options: ServeOptions<'_>) -> Serving {
    let mut command = match options.nofile {
        // `exec`: the shell becomes the gateway, so the child's pid is its.
        Some(limit) => {
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                .arg(BIN);
            command
        }
        None => Command::new(BIN),
    };
    let mut child = command
        .args(options.args)
        .current_dir(dir)
        .env("KOODRIVE_GATEWAY__SERVER__LISTEN", "127.0.0.1:0")
        .env("KOODRIVE_GATEWAY__SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .envs(options.env.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (found, addrs) = tokio::sync::oneshot::channel::<(String, String)>();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let collected = log.clone();
    tokio::spawn(async move {
        let mut found = Some(found);
        let mut admin = None;
        while let Ok(Some(line)) = lines.next_line().await {
            // The admin line comes first, then the public one.
            if let Some(addr) = address_after(&line, "metrics) on http://") {
                admin = Some(addr);
            }
            // `https://`, or `http://` without TLS (a sidecar).
            if let Some(addr) = address_after(&line, "listening on https://")
                .or_else(|| address_after(&line, "listening on http://"))
            {
                if let Some(found) = found.take() {
                    let _ = found.send((addr, admin.take().unwrap_or_default()));
                }
            }
            collected.lock().unwrap().push(line);
        }
    });
    let (addr, admin) = tokio::time::timeout(Duration::from_secs(60), addrs)
        .await
        .expect("the gateway did not start")
        .unwrap();
    Serving {
        child,
        addr,
        admin,
        log,
    }
}

/// The `address:port` following `marker` in a log line (text or JSON: the
/// address ends where its characters do).
fn address_after(line: &str, marker: &str) -> Option<String> {
    let rest = line.split(marker).nth(1)?;
    Some(
        rest.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':'))
            .collect(),
    )
}
