//! The README's path through the real binary: `serve` on the demo config
//! (embedded emulator, dev certificates created on first start), a token
//! from `dev-token`, and the curl-equivalent request over TLS.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use tokio::process::Command;

use crate::support::binary::{dev_token, run, start_serve, workdir, BIN};

#[tokio::test]
async fn the_readme_demo_works_through_the_binary() {
    let dir = workdir();
    let mut serving = start_serve(dir.path(), &[("RUST_LOG", "debug")]).await;
    let port = serving.port().to_owned();

    let out = run(dir.path(), &["dev-token", "--user", "u-1001"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jwt = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(jwt.split('.').count(), 3);

    // Private keys were created 0600 and the CA is usable by clients.
    let ca = dir.path().join("certs/dev/ca.crt");
    let client = crate::support::client(&ca, Version::HTTP_2);
    let request = Request::get(format!(
        "https://localhost:{port}/koodrive/ose/v1/jobs?offset=0&limit=2"
    ))
    .header("authorization", format!("Bearer {jwt}"))
    .body(Full::default())
    .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["code"], 0);
    assert_eq!(body["data"].as_array().unwrap().len(), 2);

    serving.child.kill().await.unwrap();
    // Let the reader drain what was written before the kill.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = serving.log().join("\n");
    assert!(log.contains("status=200"), "request not logged: {log}");
    // The KooDrive token is exchanged in-process here, so only the JWT can
    // be checked; identity.rs checks the exchanged token against the log.
    assert!(!log.contains(&jwt), "JWT in the log");
}

#[tokio::test]
async fn check_config_accepts_the_shipped_configs_and_names_bad_keys() {
    let dir = workdir();
    for config in [
        "config/gateway.toml",
        "config/production.example.toml",
        "config/sidecar.example.toml",
        "config/container.toml",
    ] {
        // The production example names files of a production machine, the
        // container's demo paths inside the image: values only. The demo
        // and the sidecar example run from a checkout: files too.
        let args: &[&str] = if matches!(
            config,
            "config/gateway.toml" | "config/sidecar.example.toml"
        ) {
            &["check-config", "--config", config]
        } else {
            &["check-config", "--skip-files", "--config", config]
        };
        let out = run(dir.path(), args).await;
        assert!(
            out.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(printed.contains("[upstream]"), "{printed}");
        // Every effective value is printed, defaults included.
        if config == "config/gateway.toml" {
            for line in [
                "leeway_s = 60",
                "grant = \"token-exchange\"",
                "max_cached_tokens = 100000",
                "ttl_jitter_ms = 0",
                "jwks_refresh_s = 300",
                "honor_client_no_cache = true",
            ] {
                assert!(printed.contains(line), "{line} missing:\n{printed}");
            }
        }
    }
    let bad = dir.path().join("config/bad.toml");
    let text = std::fs::read_to_string(dir.path().join("config/gateway.toml")).unwrap();
    std::fs::write(
        &bad,
        text.replace("timeout_ms = 10000", "timeout_ms = 10000\nretries = 3"),
    )
    .unwrap();
    let out = run(dir.path(), &["check-config", "--config", "config/bad.toml"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("retries"));

    // Referenced files are read too: a missing JWKS file fails the check.
    let text = std::fs::read_to_string(dir.path().join("config/sidecar.example.toml")).unwrap();
    std::fs::write(
        dir.path().join("config/sidecar-local.toml"),
        text.replace(
            "jwks_file = \"certs/dev/jwks.json\"",
            "jwks_file = \"config/missing-jwks.json\"",
        ),
    )
    .unwrap();
    let out = run(
        dir.path(),
        &["check-config", "--config", "config/sidecar-local.toml"],
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing-jwks.json"));

    let out = Command::new(BIN)
        .args(["check-config"])
        .env("KOODRIVE_GATEWAY__UPSTREAM__TIMEOUT_MS", "0")
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    assert!(
        !out.status.success(),
        "environment override was not applied"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`upstream.timeout_ms` from KOODRIVE_GATEWAY__UPSTREAM__TIMEOUT_MS"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
}

#[tokio::test]
async fn check_config_skip_files_needs_no_secret_and_writes_nothing() {
    let dir = workdir();
    // The production example's real token endpoint needs the secret at
    // start; a values-only check does not.
    let check = |config: &'static str, skip: bool| {
        let mut command = Command::new(BIN);
        command.args(["check-config", "--config", config]);
        if skip {
            command.arg("--skip-files");
        }
        command
            .env_remove("KOODRIVE_CLIENT_SECRET")
            .current_dir(dir.path())
            .output()
    };
    let out = check("config/production.example.toml", true).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("mode = \"exchange\""));
    let out = check("config/gateway.toml", true).await.unwrap();
    assert!(out.status.success());
    assert!(
        !dir.path().join("certs").exists(),
        "dev_certs_dir was created by a values-only check"
    );

    // The full check predicts the start: a real token endpoint whose
    // secret variable is unset fails it, naming the key and the variable.
    let text = std::fs::read_to_string(dir.path().join("config/gateway.toml")).unwrap();
    std::fs::write(
        dir.path().join("config/real-idp.toml"),
        text.replace(
            "token_url = \"embedded\"",
            "token_url = \"https://idp.example.com/oauth2/token\"",
        ),
    )
    .unwrap();
    let out = check("config/real-idp.toml", false).await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("token.client_secret_env") && stderr.contains("KOODRIVE_CLIENT_SECRET"),
        "{stderr}"
    );
    let out = run(
        dir.path(),
        &["check-config", "--config", "config/real-idp.toml"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn start_errors_name_the_key_and_the_file_or_address() {
    let dir = workdir();
    // Dev material first, so that only the broken value fails.
    let out = run(dir.path(), &["check-config"]).await;
    assert!(out.status.success());
    let text = std::fs::read_to_string(dir.path().join("config/gateway.toml")).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    for (name, from, to, expected) in [
        (
            "busy.toml",
            "listen = \"127.0.0.1:8443\"",
            format!("listen = \"{taken_addr}\""),
            vec!["server.listen".to_owned(), taken_addr.clone()],
        ),
        (
            "mismatch.toml",
            "tls_key = \"certs/dev/server.key\"",
            "tls_key = \"certs/dev/jwt-signing.key\"".to_owned(),
            vec![
                "server.tls_cert".to_owned(),
                "server.tls_key".to_owned(),
                "certs/dev/jwt-signing.key".to_owned(),
            ],
        ),
        (
            "no-jwks.toml",
            "jwks_file = \"certs/dev/jwks.json\"",
            "jwks_file = \"certs/dev/missing.json\"".to_owned(),
            vec![
                "auth.jwks_file".to_owned(),
                "certs/dev/missing.json".to_owned(),
            ],
        ),
        (
            "no-client-ca.toml",
            "tls_key = \"certs/dev/server.key\"",
            "tls_key = \"certs/dev/server.key\"\nclient_ca = \"certs/dev/missing-ca.crt\""
                .to_owned(),
            vec![
                "server.client_ca".to_owned(),
                "certs/dev/missing-ca.crt".to_owned(),
            ],
        ),
        (
            "empty-client-ca.toml",
            "tls_key = \"certs/dev/server.key\"",
            // A JWKS is not a certificate.
            "tls_key = \"certs/dev/server.key\"\nclient_ca = \"certs/dev/jwks.json\"".to_owned(),
            vec![
                "server.client_ca".to_owned(),
                "no certificate found".to_owned(),
            ],
        ),
    ] {
        assert!(text.contains(from), "{from}");
        std::fs::write(
            dir.path().join("config").join(name),
            text.replace(from, &to),
        )
        .unwrap();
        let config = format!("config/{name}");
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            run(dir.path(), &["serve", "--config", &config]),
        )
        .await
        .expect("serve exits on a bad start");
        assert!(!out.status.success(), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for word in expected {
            assert!(stderr.contains(&word), "{name}: `{word}` missing: {stderr}");
        }
        // check-config reads the same files and refuses them alike.
        let checked = run(dir.path(), &["check-config", "--config", &config]).await;
        if name != "busy.toml" {
            assert!(!checked.status.success(), "check-config passed {name}");
        }
    }
    drop(taken);
}

#[tokio::test]
async fn log_format_json_in_the_config_gives_json_lines() {
    let dir = workdir();
    let mut serving = start_serve(dir.path(), &[("KOODRIVE_GATEWAY__LOG__FORMAT", "json")]).await;
    let lines: Vec<serde_json::Value> = serving
        .log()
        .iter()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect();
    let listening = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("listening on https://")
        })
        .expect("the listening line");
    // Fields at the top level, not under `fields`.
    assert_eq!(listening["addr"], serving.addr.as_str());
    serving.child.kill().await.unwrap();
}

/// A minimal OTLP/HTTP receiver: records every body POSTed to it.
async fn otlp_receiver() -> (
    String,
    Arc<Mutex<Vec<(String, Vec<u8>)>>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::new()));
    let store = received.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service =
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let store = store.clone();
            async move {
                let path = request.uri().path().to_owned();
                let body = request.into_body().collect().await.unwrap().to_bytes();
                store.lock().unwrap().push((path, body.to_vec()));
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    bytes::Bytes::new(),
                )))
            }
        });
    tokio::spawn(koodrive_gateway::server::serve(
        listener,
        None,
        service,
        async {
            let _ = stopped.await;
        },
        Duration::from_millis(100),
    ));
    (url, received, stop)
}

#[tokio::test]
async fn spans_are_exported_over_otlp_with_the_requests_trace_id() {
    let (otlp, received, _stop) = otlp_receiver().await;
    let dir = workdir();
    let mut serving = start_serve(
        dir.path(),
        &[("KOODRIVE_GATEWAY__TELEMETRY__OTLP_ENDPOINT", otlp.as_str())],
    )
    .await;
    let port = serving.port().to_owned();
    let jwt = dev_token(dir.path(), "u-7").await;
    let client = crate::support::client(&dir.path().join("certs/dev/ca.crt"), Version::HTTP_11);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let request = Request::get(format!(
        "https://localhost:{port}/koodrive/ose/v1/jobs?offset=0&limit=2"
    ))
    .header("authorization", format!("Bearer {jwt}"))
    .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
    .body(Full::default())
    .unwrap();
    assert_eq!(client.request(request).await.unwrap().status(), 200);

    // A graceful stop flushes the batch.
    serving.signal("TERM").await;
    let status = tokio::time::timeout(Duration::from_secs(30), serving.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");

    let received = received.lock().unwrap().clone();
    assert!(!received.is_empty(), "no spans arrived");
    assert!(received.iter().all(|(path, _)| path == "/v1/traces"));
    let bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let all: Vec<u8> = received.iter().flat_map(|(_, body)| body.clone()).collect();
    assert!(
        all.windows(16).any(|w| w == bytes.as_slice()),
        "the request's trace id is not in the exported spans"
    );
    for name in [&b"request"[..], b"token", b"upstream"] {
        assert!(
            all.windows(name.len()).any(|w| w == name),
            "no `{}` span",
            String::from_utf8_lossy(name)
        );
    }
    // Nothing secret travels with the spans.
    assert!(!all.windows(jwt.len()).any(|w| w == jwt.as_bytes()));
}

#[tokio::test]
async fn sighup_reopens_the_audit_file_and_does_not_end_the_process() {
    let dir = workdir();
    let audit = dir.path().join("audit.log");
    let audit_path = audit.display().to_string();
    let mut serving = start_serve(
        dir.path(),
        &[("KOODRIVE_GATEWAY__AUDIT__PATH", audit_path.as_str())],
    )
    .await;
    let port = serving.port().to_owned();
    let client = crate::support::client(&dir.path().join("certs/dev/ca.crt"), Version::HTTP_11);
    let get = |trace: &'static str| {
        Request::get(format!(
            "https://localhost:{port}/koodrive/ose/v1/jobs?offset=0&limit=1"
        ))
        .header("x-traceid", trace)
        .body(Full::default())
        .unwrap()
    };
    assert_eq!(
        client.request(get("before-hup")).await.unwrap().status(),
        401
    );
    let wait_for = |path: std::path::PathBuf, trace: &'static str| async move {
        for _ in 0..200 {
            if std::fs::read_to_string(&path)
                .unwrap_or_default()
                .contains(trace)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{trace} not in {}", path.display());
    };
    wait_for(audit.clone(), "before-hup").await;

    // logrotate's `create` mode: rename, then SIGHUP.
    let rotated = dir.path().join("audit.log.rotated");
    std::fs::rename(&audit, &rotated).unwrap();
    serving.signal("HUP").await;
    serving.wait_for_line("reload done").await;
    assert_eq!(
        client.request(get("after-hup")).await.unwrap().status(),
        401
    );
    wait_for(audit.clone(), "after-hup").await;
    assert!(!std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("after-hup"));
    assert!(
        serving.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the process"
    );
}

#[tokio::test]
async fn health_asks_the_admin_listener_and_exits_by_its_answer() {
    let dir = workdir();
    let serving = start_serve(dir.path(), &[]).await;
    let ask = |admin: String, probe: &'static [&'static str]| {
        let dir = dir.path().to_path_buf();
        async move {
            let mut args = vec!["health"];
            args.extend_from_slice(probe);
            Command::new(BIN)
                .args(&args)
                .env("KOODRIVE_GATEWAY__SERVER__ADMIN_LISTEN", admin)
                .current_dir(dir)
                .output()
                .await
                .unwrap()
        }
    };
    let alive = ask(serving.admin.clone(), &[]).await;
    assert!(alive.status.success(), "{alive:?}");
    assert!(String::from_utf8_lossy(&alive.stdout).contains("/healthz: 200"));
    let ready = ask(serving.admin.clone(), &["--ready"]).await;
    assert!(ready.status.success(), "{ready:?}");
    // On every address, it asks loopback.
    let port = serving.admin.rsplit(':').next().unwrap();
    assert!(ask(format!("0.0.0.0:{port}"), &[]).await.status.success());
    // Nothing listening: exit 1, and why.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let down = ask(closed, &[]).await;
    assert_eq!(down.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("/healthz"),
        "{down:?}"
    );
}
