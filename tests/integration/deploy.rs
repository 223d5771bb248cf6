//! The deployment files against the gateway they deploy: the sidecar
//! example served by the real binary, and the Kubernetes manifests checked
//! against the configs they mount (the config loader parses those; ports,
//! probes, grace periods, secrets and the security context must agree).
//! Schema validation of the manifests is `.ci/run`'s (kubernetes-validate).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use koodrive_gateway::config::{AuditSink, Config, JwksSource, TokenConfig};
use yaml_rust2::{Yaml, YamlLoader};

use crate::support::binary::{self, ServeOptions};

const SIDECAR_EXAMPLE: &str = "config/sidecar.example.toml";
/// The margin kept after the drain: the gateway stops within
/// `server.drain_timeout_ms` + 2 s of SIGTERM (README, "Drain").
const EXIT_MARGIN_S: i64 = 5;
/// The time the sidecar manifest budgets for the app's own shutdown, after
/// its preStop delay and before the gateway's SIGTERM.
const APP_SHUTDOWN_BUDGET_S: i64 = 10;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A plain-HTTP GET; the status and the body.
async fn get(url: &str, bearer: Option<&str>) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::get(url);
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(request.body(Full::default()).unwrap()),
    )
    .await
    .expect("no answer within 10 s")
    .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn sidecar_example_serves_plain_http_on_loopback_as_shipped() {
    let shipped = Config::load(&repo(SIDECAR_EXAMPLE)).unwrap().0;
    assert!(
        shipped.server.tls.is_none(),
        "the sidecar serves plain HTTP"
    );
    let admin = shipped.server.admin_listen.expect("an admin listener");
    assert!(shipped.server.listen.ip().is_loopback());
    assert!(admin.ip().is_loopback());
    assert_ne!(shipped.server.listen.port(), admin.port());

    let dir = binary::workdir();
    // The file as shipped, from a copy of config/ with nothing else beside
    // it (no certs/, no client secret). Only its two fixed ports become 0
    // through the environment (the helper sets KOODRIVE_GATEWAY__SERVER__
    // LISTEN and __ADMIN_LISTEN to 127.0.0.1:0, the shipped address with
    // an ephemeral port), so parallel tests and other processes on the
    // machine cannot collide with it.
    let gateway = binary::start_serve_with(
        dir.path(),
        ServeOptions {
            args: &["--config", SIDECAR_EXAMPLE],
            ..ServeOptions::default()
        },
    )
    .await;
    assert!(gateway.addr.starts_with("127.0.0.1:"), "{}", gateway.addr);
    assert!(gateway.admin.starts_with("127.0.0.1:"), "{}", gateway.admin);
    // JSON log lines, as the file says.
    let started = gateway
        .log()
        .into_iter()
        .find(|line| line.contains("listening on http://"))
        .expect("a listening line");
    let line: serde_json::Value = serde_json::from_str(&started).unwrap();
    assert_eq!(line["level"], "INFO", "{started}");

    let token = binary::dev_token_for(dir.path(), SIDECAR_EXAMPLE, "u-1001").await;

    let (status, body) = get(
        &format!(
            "http://{}/koodrive/ose/v1/jobs?offset=0&limit=2",
            gateway.addr
        ),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2), "{body}");

    let (status, body) = get(&format!("http://{}/readyz", gateway.admin), None).await;
    assert_eq!(status, 200, "{body}");
    // The JWT is still required on loopback.
    let (status, _) = get(
        &format!(
            "http://{}/koodrive/ose/v1/jobs?offset=0&limit=2",
            gateway.addr
        ),
        None,
    )
    .await;
    assert_eq!(status, 401);
}

/// Production's overrides of the example, from the environment alone: an
/// external KooDrive (the emulator as its own process, as a real KooDrive
/// would be) for `upstream.base_url`, its token endpoint and client.
#[tokio::test]
async fn sidecar_example_serves_with_koodrive_overridden_from_the_environment() {
    let dir = binary::workdir();
    let secret = "sidecar-test-secret";
    let mut emulator = tokio::process::Command::new(binary::BIN)
        .args(["emulator", "--listen", "127.0.0.1:0"])
        .args(["--client-id", "koodrive-gateway-sidecar"])
        .env("KOODRIVE_CLIENT_SECRET", secret)
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        emulator.stderr.take().unwrap(),
    ));
    let koodrive = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("emulator listening on ").nth(1) {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("the emulator exited");
    })
    .await
    .expect("the emulator did not start");
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let token_url = format!("{koodrive}/oauth2/token");
    let gateway = binary::start_serve_with(
        dir.path(),
        ServeOptions {
            args: &["--config", SIDECAR_EXAMPLE],
            env: &[
                ("KOODRIVE_GATEWAY__UPSTREAM__BASE_URL", &koodrive),
                ("KOODRIVE_GATEWAY__TOKEN__TOKEN_URL", &token_url),
                ("KOODRIVE_CLIENT_SECRET", secret),
            ],
            ..ServeOptions::default()
        },
    )
    .await;
    let token = binary::dev_token_for(dir.path(), SIDECAR_EXAMPLE, "u-1001").await;
    let url = format!(
        "http://{}/koodrive/ose/v1/jobs?offset=0&limit=2",
        gateway.addr
    );
    let (status, body) = get(&url, Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    // Served by that KooDrive, not an embedded one.
    assert!(
        !gateway
            .log()
            .iter()
            .any(|l| l.contains("embedded KooDrive emulator running")),
        "{:?}",
        gateway.log()
    );
    assert_eq!(gateway.upstream_requests().await, 1);
}

/// One manifest file's documents.
fn manifest(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn named<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

fn list(value: &Yaml) -> &[Yaml] {
    value.as_vec().map(Vec::as_slice).unwrap_or_default()
}

fn int(value: &Yaml, what: &str) -> i64 {
    value
        .as_i64()
        .unwrap_or_else(|| panic!("{what}: {value:?}"))
}

/// The gateway's container in a pod template (a regular container or a
/// native sidecar), and every container of the pod.
fn gateway_container(pod: &Yaml) -> (&Yaml, Vec<&Yaml>) {
    let all: Vec<&Yaml> = list(&pod["initContainers"])
        .iter()
        .chain(list(&pod["containers"]))
        .collect();
    let gateway = all
        .iter()
        .copied()
        .find(|c| c["name"].as_str() == Some("koodrive-gateway"))
        .expect("a container named koodrive-gateway");
    (gateway, all)
}

/// The container port named or numbered `port`.
fn resolve_port(container: &Yaml, port: &Yaml) -> i64 {
    if let Some(number) = port.as_i64() {
        return number;
    }
    let name = port.as_str().expect("a port name or number");
    list(&container["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .map(|p| int(&p["containerPort"], name))
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// The Dockerfile's exec-form instruction `name` (e.g. `CMD`).
fn dockerfile_exec(name: &str) -> Vec<String> {
    let text = read("Dockerfile");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in the Dockerfile"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{name} {line}: {e}"))
}

/// What one pod template must say about the gateway it runs; returns the
/// config it mounts.
fn check_pod(file: &str, docs: &[Yaml], pod: &Yaml) -> Config {
    let (gateway, all) = gateway_container(pod);

    // The config: the ConfigMap mounted where the container's --config
    // points, parsed by the gateway's own loader, and nothing overriding it
    // from the environment.
    let args: Vec<&str> = list(&gateway["args"])
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(
        args,
        dockerfile_exec("CMD"),
        "{file}: the image's own command (and config path)"
    );
    let config_path = Path::new(args[2]);
    let mounts = list(&gateway["volumeMounts"]);
    let volumes = list(&pod["volumes"]);
    let mount_of = |path: &Path| {
        mounts
            .iter()
            .find(|m| path.parent() == Some(Path::new(m["mountPath"].as_str().unwrap_or("-"))))
            .unwrap_or_else(|| panic!("{file}: nothing mounted at {}", path.display()))
    };
    let volume_of = |mount: &Yaml| {
        volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{file}: no volume {:?}", mount["name"]))
    };
    let config_mount = mount_of(config_path);
    assert_eq!(config_mount["readOnly"].as_bool(), Some(true), "{file}");
    let config_map = volume_of(config_mount)["configMap"]["name"]
        .as_str()
        .expect("the config comes from a ConfigMap");
    let key = config_path.file_name().unwrap().to_str().unwrap();
    let toml = named(docs, "ConfigMap", config_map)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{file}: ConfigMap {config_map} has no {key}"));
    let config = Config::from_toml(toml).unwrap_or_else(|e| panic!("{file}: {e}"));
    let env = list(&gateway["env"]);
    for var in env {
        let name = var["name"].as_str().unwrap_or_default();
        assert!(
            !name.starts_with("KOODRIVE_GATEWAY__"),
            "{file}: {name} overrides the ConfigMap's config"
        );
    }

    // Every file the config names is in a read-only mount, under the
    // name the volume gives it (secret items, or the key itself).
    let mut files: Vec<&Path> = Vec::new();
    if let Some(tls) = &config.server.tls {
        files.extend([tls.cert.as_path(), tls.key.as_path()]);
    }
    files.extend(config.upstream.ca_file.as_deref());
    if let JwksSource::File(path) = &config.auth.jwks {
        files.push(path);
    }
    if let TokenConfig::Static { tokens_file } = &config.token {
        files.push(tokens_file);
    }
    assert!(
        config.server.dev_certs_dir.is_none(),
        "{file}: dev material"
    );
    for path in files {
        let mount = mount_of(path);
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{file}: {path:?}");
        let volume = volume_of(mount);
        let secret = &volume["secret"];
        assert!(
            secret["secretName"].as_str().is_some(),
            "{file}: {path:?} comes from a Secret"
        );
        let name = path.file_name().unwrap().to_str().unwrap();
        let items = list(&secret["items"]);
        assert!(
            items.is_empty() || items.iter().any(|i| i["path"].as_str() == Some(name)),
            "{file}: the Secret's items give no {name}"
        );
        assert!(
            matches!(name, "tls.crt" | "tls.key" | "ca.crt"),
            "{file}: {name} is not a cert-manager Secret key"
        );
        // Readable by the gateway's user: by everyone, or by its group
        // through fsGroup. The manifests write modes in octal with a
        // leading 0, as Kubernetes's YAML 1.1 reads them; yaml-rust2 (YAML
        // 1.2) reads the digits as decimal, so they are read back as octal.
        let mode = secret["defaultMode"]
            .as_i64()
            .map_or(0o644, |m| i64::from_str_radix(&m.to_string(), 8).unwrap());
        let group = gateway["securityContext"]["runAsGroup"].as_i64();
        let fs_group = pod["securityContext"]["fsGroup"].as_i64();
        assert!(
            mode & 0o004 != 0 || (mode & 0o040 != 0 && group.is_some() && fs_group == group),
            "{file}: {name} (mode {mode:o}) is not readable by the gateway's user"
        );
    }

    // The client secret: from a Secret, under the variable the config names.
    if let TokenConfig::Exchange(exchange) = &config.token {
        let var = env
            .iter()
            .find(|v| v["name"].as_str() == Some(exchange.client_secret_env.as_str()))
            .unwrap_or_else(|| panic!("{file}: no {}", exchange.client_secret_env));
        assert!(
            var["valueFrom"]["secretKeyRef"]["name"].as_str().is_some(),
            "{file}: the client secret comes from a Secret"
        );
    }

    // Probes on the admin listener, which must be reachable from the
    // kubelet (the pod IP, not loopback).
    let admin = config.server.admin_listen.expect("an admin listener");
    assert!(
        admin.ip().is_unspecified(),
        "{file}: admin_listen {admin}: httpGet probes come to the pod IP"
    );
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &gateway[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{file}: {probe}");
        assert_eq!(
            resolve_port(gateway, &get["port"]),
            i64::from(admin.port()),
            "{file}: {probe} is not on admin_listen"
        );
    }
    let declared: BTreeSet<i64> = list(&gateway["ports"])
        .iter()
        .map(|p| int(&p["containerPort"], "containerPort"))
        .collect();
    let expected: BTreeSet<i64> = [config.server.listen.port(), admin.port()]
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(declared, expected, "{file}: container ports");

    // Grace: every preStop delay on the way (the app's, then the
    // gateway's, for a sidecar), then the drain, then the exit margin.
    let pre_stop: i64 = all
        .iter()
        .map(|c| {
            let sleep = &c["lifecycle"]["preStop"]["sleep"]["seconds"];
            sleep.as_i64().unwrap_or(0)
        })
        .sum();
    assert!(
        pre_stop > 0,
        "{file}: no preStop delay for endpoint removal"
    );
    let drain_ms = config.server.drain_timeout.as_millis() as i64;
    let drain_s = (drain_ms + 999) / 1000;
    // A sidecar's SIGTERM waits for the app beside it to exit.
    let sidecar = list(&pod["initContainers"]).contains(gateway);
    let app_budget = if sidecar { APP_SHUTDOWN_BUDGET_S } else { 0 };
    let grace = int(
        &pod["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    assert!(
        grace >= pre_stop + app_budget + drain_s + EXIT_MARGIN_S,
        "{file}: terminationGracePeriodSeconds {grace} < preStop {pre_stop} s \
         + the app's shutdown {app_budget} s + drain {drain_s} s + margin {EXIT_MARGIN_S} s"
    );
    // The arithmetic written in the file's header is the file's.
    let text = read(file);
    // Comment markers dropped, so that a sum reads across its lines.
    let squeezed = text
        .split_whitespace()
        .filter(|w| *w != "#")
        .collect::<Vec<_>>()
        .join(" ");
    let mut needles = vec![
        format!("server.drain_timeout_ms = {drain_ms} {drain_s} s"),
        format!("{EXIT_MARGIN_S} s = terminationGracePeriodSeconds {grace} s"),
    ];
    if sidecar {
        needles.push(format!("budget) {app_budget} s"));
    }
    for needle in needles {
        assert!(
            squeezed.contains(&needle),
            "{file}: its comment does not say `{needle}`"
        );
    }

    // Non-root, as the image's USER, nothing to escalate to, and a
    // read-only root filesystem; requests and limits set.
    let user = dockerfile_user();
    let context = &gateway["securityContext"];
    assert_eq!(context["runAsNonRoot"].as_bool(), Some(true), "{file}");
    assert_eq!(context["runAsUser"].as_i64(), Some(user), "{file}");
    assert_eq!(
        context["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{file}"
    );
    assert_eq!(
        context["readOnlyRootFilesystem"].as_bool(),
        Some(true),
        "{file}"
    );
    assert_eq!(
        list(&context["capabilities"]["drop"]),
        &[Yaml::String("ALL".into())],
        "{file}"
    );
    assert_eq!(
        context["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault"),
        "{file}"
    );
    for kind in ["requests", "limits"] {
        assert!(
            gateway["resources"][kind]["memory"].as_str().is_some(),
            "{file}: resources.{kind}.memory"
        );
    }
    assert!(gateway["resources"]["requests"]["cpu"].as_str().is_some());
    config
}

/// The uid of the Dockerfile's last `USER`.
fn dockerfile_user() -> i64 {
    let text = read("Dockerfile");
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER in the Dockerfile");
    user.split(':').next().unwrap().trim().parse().unwrap()
}

fn pod_of(deployment: &Yaml) -> &Yaml {
    &deployment["spec"]["template"]["spec"]
}

#[test]
fn sidecar_manifest_matches_the_config_it_mounts() {
    let file = "deploy/kubernetes/sidecar.yaml";
    let docs = manifest(file);
    let deployments = of_kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 1);
    let pod = pod_of(deployments[0]);
    let config = check_pod(file, &docs, pod);
    let (gateway, _) = gateway_container(pod);
    // A native sidecar: started before the app, stopped after it.
    assert!(list(&pod["initContainers"]).contains(gateway));
    assert_eq!(gateway["restartPolicy"].as_str(), Some("Always"));
    // Plain HTTP for the app beside it, on loopback only.
    assert!(config.server.tls.is_none());
    assert!(config.server.listen.ip().is_loopback());

    // The same shape as the example a developer runs.
    let example = Config::from_toml(&read(SIDECAR_EXAMPLE)).unwrap();
    assert_eq!(config.server.listen, example.server.listen);
    let port = |a: Option<SocketAddr>| a.map(|a| a.port());
    assert_eq!(
        port(config.server.admin_listen),
        port(example.server.admin_listen)
    );
    assert_eq!(config.server.drain_timeout, example.server.drain_timeout);
    assert_eq!(config.log.format, example.log.format);
}

#[test]
fn standalone_manifest_matches_the_config_it_mounts() {
    let file = "deploy/kubernetes/standalone.yaml";
    let docs = manifest(file);
    let deployment = named(&docs, "Deployment", "koodrive-gateway");
    let pod = pod_of(deployment);
    let config = check_pod(file, &docs, pod);
    let (gateway, _) = gateway_container(pod);
    let labels = &deployment["spec"]["selector"]["matchLabels"];
    assert_eq!(
        &deployment["spec"]["template"]["metadata"]["labels"],
        labels
    );

    // TLS from the cert-manager Secret.
    let tls = config.server.tls.as_ref().expect("TLS");
    assert!(tls.cert.ends_with("tls.crt") && tls.key.ends_with("tls.key"));
    // Its own preStop delay: the Service sends it traffic until the
    // endpoint removal has spread.
    let pre_stop = &gateway["lifecycle"]["preStop"]["sleep"]["seconds"];
    assert!(int(pre_stop, "the gateway's preStop sleep") >= 1);

    // The Service sends its traffic to server.listen.
    let service = named(&docs, "Service", "koodrive-gateway");
    assert_eq!(&service["spec"]["selector"], labels);
    let ports = list(&service["spec"]["ports"]);
    assert_eq!(ports.len(), 1, "only the gateway's port is a Service port");
    assert_eq!(
        resolve_port(gateway, &ports[0]["targetPort"]),
        i64::from(config.server.listen.port())
    );

    // The disruption budget and the autoscaler cover this Deployment.
    let pdb = named(&docs, "PodDisruptionBudget", "koodrive-gateway");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    let hpa = named(&docs, "HorizontalPodAutoscaler", "koodrive-gateway");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["kind"].as_str(),
        Some("Deployment")
    );
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("koodrive-gateway")
    );
    assert!(int(&hpa["spec"]["minReplicas"], "minReplicas") >= 2);
    assert_eq!(
        int(&pdb["spec"]["maxUnavailable"], "maxUnavailable"),
        1,
        "one pod at a time however far it has scaled"
    );
    assert!(
        deployment["spec"]["replicas"].is_badvalue(),
        "the autoscaler owns the replica count"
    );

    // rate_limit.redis_url names the Redis Service and its port.
    let shared = config
        .rate_limit
        .as_ref()
        .and_then(|r| r.shared.as_ref())
        .expect("rate_limit.redis_url");
    let url = shared.url.as_str();
    let (host, port) = url
        .strip_prefix("redis://")
        .and_then(|rest| rest.split_once(':'))
        .expect("redis://host:port");
    let redis = named(&docs, "Service", host);
    let redis_port = list(&redis["spec"]["ports"])
        .iter()
        .map(|p| int(&p["port"], "port"))
        .collect::<Vec<_>>();
    assert_eq!(
        redis_port,
        [port.trim_end_matches('/').parse::<i64>().unwrap()]
    );
    let redis_pods = named(&docs, "Deployment", host);
    assert_eq!(
        &redis_pods["spec"]["selector"]["matchLabels"],
        &redis["spec"]["selector"]
    );
    // The audit trail cannot be a file on a read-only root filesystem.
    if let Some(audit) = &config.audit {
        assert_eq!(audit.sink, AuditSink::Stdout);
    }
}
