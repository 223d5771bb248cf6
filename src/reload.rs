//! Reloading without a restart (DESIGN.md, "Signals"). SIGHUP — and a
//! change of the files on disk, noticed by a watcher — re-reads the server
//! certificate and key, the client CA, the JWKS file and the static token
//! file; SIGHUP also reopens the audit file. Each file is checked before it
//! replaces what serves: one that fails its checks is refused, logged with
//! the reason and counted, and the previous one keeps serving. Existing
//! connections keep the TLS session they have.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::audit::Auditor;
use crate::auth::KeyStore;
use crate::emulator::Granter;
use crate::server::tls::{Reloaded, ServerTls};
use crate::subscriber::InCurrentSubscriber;
use crate::token::StaticTokens;

/// Quiet time after the last change on disk before reloading: an update
/// that writes several files (a certificate, then its key) is read once,
/// whole.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// `{file, outcome}` of `reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    file: &'static str,
    outcome: &'static str,
}

/// What can be reloaded, and the metrics of reloading.
struct Reloadable {
    tls: Option<Arc<ServerTls>>,
    keys: Arc<KeyStore>,
    jwks_file: Option<PathBuf>,
    tokens: Option<(Arc<StaticTokens>, PathBuf)>,
    /// The embedded emulator, provisioned with reloaded static tokens.
    emulator: Option<Granter>,
    auditor: Option<Arc<Auditor>>,
    /// Held by a reload from its first read to its last swap: SIGHUP and
    /// the watcher at once must not leave an older read serving.
    running: tokio::sync::Mutex<()>,
    /// `reloads_total{file, outcome}`: reloads that replaced a file
    /// (`ok`) or refused one (`error`).
    reloads: Family<ReloadLabels, Counter>,
    /// `server_cert_expiry_timestamp_seconds`: the serving certificate's
    /// `notAfter`.
    cert_expiry: Gauge,
}

/// Reloads what can change without a restart; cheap to clone.
#[derive(Clone)]
pub struct Reloader(Arc<Reloadable>);

/// One file's reload: replaced, unchanged, or refused with the reason.
type FileOutcome = (&'static str, Result<bool, String>);

impl Reloader {
    pub(crate) fn new(
        tls: Option<Arc<ServerTls>>,
        keys: Arc<KeyStore>,
        jwks_file: Option<PathBuf>,
        tokens: Option<(Arc<StaticTokens>, PathBuf)>,
        emulator: Option<Granter>,
        auditor: Option<Arc<Auditor>>,
    ) -> Reloader {
        let reloadable = Reloadable {
            tls,
            keys,
            jwks_file,
            tokens,
            emulator,
            auditor,
            running: tokio::sync::Mutex::new(()),
            reloads: Family::default(),
            cert_expiry: Gauge::default(),
        };
        reloadable.set_cert_expiry();
        Reloader(Arc::new(reloadable))
    }

    /// Registers `reloads_total` and, with TLS, the certificate's expiry.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "reloads",
            "File reloads (SIGHUP or a change on disk) by file and outcome (ok: replaced, error: refused, the previous one kept)",
            self.0.reloads.clone(),
        );
        if self.0.tls.is_some() {
            registry.register(
                "server_cert_expiry_timestamp_seconds",
                "When the serving TLS certificate expires (Unix time)",
                self.0.cert_expiry.clone(),
            );
        }
    }

    /// SIGHUP: re-reads every file and reopens the audit file (for
    /// external rotation: rename, then SIGHUP).
    pub async fn reload(&self) {
        let mut outcomes = self.reload_files().await;
        if let Some(auditor) = &self.0.auditor {
            if let Some(reopened) = auditor.reopen().await {
                let reopened = reopened.map(|()| true).map_err(|e| e.to_string());
                self.0.report("audit_file", &reopened);
                outcomes.push(("audit_file", reopened));
            }
        }
        let refused = outcomes.iter().filter(|(_, r)| r.is_err()).count();
        tracing::info!(files = outcomes.len(), refused, "reload done");
    }

    /// Re-reads the certificate and key, the client CA, the JWKS file and
    /// the static token file; logs and counts what changed or was refused.
    async fn reload_files(&self) -> Vec<FileOutcome> {
        let _running = self.0.running.lock().await;
        let this = Arc::clone(&self.0);
        // Small files, read rarely; still, off the runtime's threads.
        let mut outcomes = match tokio::task::spawn_blocking(move || this.reload_blocking()).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                tracing::error!(%error, "reloading the TLS and token files failed");
                Vec::new()
            }
        };
        if self.0.jwks_file.is_some() {
            let outcome = self.0.keys.reload_file().await.map_err(|e| e.to_string());
            outcomes.push(("jwks_file", outcome));
        }
        for (file, outcome) in &outcomes {
            self.0.report(file, outcome);
        }
        outcomes
    }

    /// The files a watcher should look at.
    fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(tls) = &self.0.tls {
            files.extend(tls.paths());
        }
        files.extend(self.0.jwks_file.clone());
        files.extend(self.0.tokens.as_ref().map(|(_, path)| path.clone()));
        files
    }

    /// Watches the files' directories and reloads, [`DEBOUNCE`] after the
    /// last change, when one of the files — or a Kubernetes secret volume's
    /// `..data` link, swapped on update — changed. `None` when there is
    /// nothing to watch or the watcher cannot start (SIGHUP still works).
    pub fn watch(&self) -> Option<FileWatch> {
        let files = self.watched_files();
        if files.is_empty() {
            return None;
        }
        let (changed, mut changes) = mpsc::channel::<()>(1);
        let watched = Watched::of(&files);
        let filter = watched.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            let concerns = match &event {
                // Events may have been lost (the inotify queue overflowed):
                // look at every file again.
                Err(error) => {
                    tracing::warn!(%error, "file watch error; reloading to be sure");
                    true
                }
                Ok(event) if event.need_rescan() => true,
                Ok(event) if event.kind.is_access() => false,
                Ok(event) => {
                    if event.kind.is_remove() && filter.dirs.iter().any(|d| event.paths.contains(d))
                    {
                        tracing::warn!(paths = ?event.paths, "a watched directory was removed: changes in it are no longer seen (SIGHUP still reloads)");
                    }
                    event.paths.iter().any(|path| filter.concerns(path))
                }
            };
            if concerns {
                // A full channel already holds a wake-up.
                let _ = changed.try_send(());
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(watcher) => watcher,
            Err(error) => {
                tracing::warn!(%error, "cannot watch files for changes; reload with SIGHUP");
                return None;
            }
        };
        for dir in &watched.dirs {
            if let Err(error) =
                notify::Watcher::watch(&mut watcher, dir, notify::RecursiveMode::NonRecursive)
            {
                tracing::warn!(dir = %dir.display(), %error, "cannot watch for changes; reload with SIGHUP");
            }
        }
        let reloader = self.clone();
        let task = tokio::spawn(
            async move {
                // A change between the start's reads and the watch is not
                // lost: look once now.
                reloader.reload_files().await;
                while changes.recv().await.is_some() {
                    // Wait for the writes to settle.
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, changes.recv()).await {}
                    reloader.reload_files().await;
                }
            }
            .in_current_subscriber(),
        );
        Some(FileWatch {
            _watcher: watcher,
            task,
        })
    }
}

impl Reloadable {
    /// The file reloads that read from disk synchronously.
    fn reload_blocking(&self) -> Vec<FileOutcome> {
        let mut outcomes = Vec::new();
        if let Some(tls) = &self.tls {
            let cert = tls.reload_cert().map(|r| r == Reloaded::Replaced);
            outcomes.push(("server_cert", cert.map_err(|e| e.to_string())));
            if tls.mutual() {
                let ca = tls.reload_client_ca().map(|r| r == Reloaded::Replaced);
                outcomes.push(("client_ca", ca.map_err(|e| e.to_string())));
            }
            self.set_cert_expiry();
        }
        if let Some((tokens, path)) = &self.tokens {
            let reloaded = tokens.reload(path).map_err(|e| e.to_string());
            if let (Ok(true), Some(emulator)) = (&reloaded, &self.emulator) {
                for (user, token) in tokens.grants() {
                    emulator.grant(token.expose(), &user);
                }
            }
            outcomes.push(("static_tokens_file", reloaded));
        }
        outcomes
    }

    /// Logs and counts one file's reload (an unchanged file: neither).
    fn report(&self, file: &'static str, outcome: &Result<bool, String>) {
        let outcome = match outcome {
            Ok(false) => {
                tracing::debug!(file, "reload: unchanged");
                return;
            }
            Ok(true) => {
                tracing::info!(file, "reloaded: new connections and requests use it");
                "ok"
            }
            Err(reason) => {
                tracing::error!(file, %reason, "reload refused; the previous one keeps serving");
                "error"
            }
        };
        self.reloads
            .get_or_create(&ReloadLabels { file, outcome })
            .inc();
    }

    fn set_cert_expiry(&self) {
        if let Some(not_after) = self.tls.as_ref().and_then(|tls| tls.not_after()) {
            self.cert_expiry.set(not_after);
        }
    }
}

/// The directories watched, and which names in them matter.
#[derive(Clone)]
struct Watched {
    dirs: Vec<PathBuf>,
    names: HashSet<OsString>,
}

impl Watched {
    fn of(files: &[PathBuf]) -> Watched {
        let mut dirs = Vec::new();
        let mut names = HashSet::new();
        for file in files {
            let dir = match file.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
            names.extend(file.file_name().map(OsString::from));
        }
        Watched { dirs, names }
    }

    /// Whether a change at `path` may change one of the files: the file
    /// itself (written, replaced, renamed over), or a name starting with
    /// `..` — Kubernetes updates a secret volume by pointing its `..data`
    /// link at a new `..<timestamp>` directory, and the files are links
    /// through `..data`.
    fn concerns(&self, path: &Path) -> bool {
        path.file_name().is_some_and(|name| {
            self.names.contains(name) || name.to_string_lossy().starts_with("..")
        })
    }
}

/// A running file watcher; stops when dropped.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_their_replacements_and_a_secret_volumes_links_concern_the_watch() {
        let watched = Watched::of(&[
            PathBuf::from("/etc/tls/tls.crt"),
            PathBuf::from("/etc/tls/tls.key"),
            PathBuf::from("jwks.json"),
        ]);
        assert_eq!(
            watched.dirs,
            [PathBuf::from("/etc/tls"), PathBuf::from(".")],
            "each directory once; a bare name is in the working directory"
        );
        assert!(watched.concerns(Path::new("/etc/tls/tls.crt")));
        assert!(watched.concerns(Path::new("./jwks.json")));
        assert!(watched.concerns(Path::new("/etc/tls/..data")));
        assert!(watched.concerns(Path::new("/etc/tls/..2026_11_30_21_00_00.123")));
        assert!(!watched.concerns(Path::new("/etc/tls/audit.log")));
        assert!(!watched.concerns(Path::new("/etc/tls/.tls.crt.swp")));
    }
}
