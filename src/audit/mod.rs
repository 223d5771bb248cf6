//! The audit trail: one JSON line per request that reached the HTTP layer,
//! whatever its outcome, with a delivery guarantee.
//!
//! A request reserves its place in the writer's bounded queue when it
//! arrives ([`Auditor::admit`]); its record takes that place at the exit, so
//! a record that was admitted can always be queued. With `on_error =
//! "reject"` a request that cannot reserve a place — the queue is full, or
//! the sink is failing — is refused with 503 `audit_unavailable` before
//! anything else happens (KooDrive is never asked for it), and with
//! `durability = "written"`/`"fsynced"` its response waits for the write.
//! With `"continue"` it is served and counted as dropped. The writer is a
//! thread of its own ([`writer`]), so the request path never waits on disk
//! beyond what `durability` asks for.

mod record;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc::{self, OwnedPermit};
use tokio::sync::oneshot;

use crate::metrics::Outcome;

use crate::config::{AuditConfig, Durability, OnAuditError};
pub(crate) use record::audit_line;

/// How long a refused caller is told to wait.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One line for the writer, and who waits for it to be written.
/// How long a reopen may wait behind queued records.
const REOPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

enum Job {
    Line {
        line: Vec<u8>,
        written: Option<oneshot::Sender<bool>>,
    },
    /// Reopen the file (SIGHUP: external rotation), saying how it went.
    Reopen(oneshot::Sender<std::io::Result<()>>),
    /// Write what is queued, then stop.
    Close(oneshot::Sender<()>),
}

/// `audit_records_total{outcome}`: written, dropped (failing open),
/// rejected (failing closed: the request was refused).
#[derive(Debug)]
struct AuditCounts(Family<Outcome, Counter>);

impl Default for AuditCounts {
    fn default() -> Self {
        AuditCounts(crate::metrics::outcomes(&[
            "written", "dropped", "rejected",
        ]))
    }
}

impl AuditCounts {
    fn add(&self, outcome: &'static str, records: u64) {
        self.0.get_or_create(&Outcome { outcome }).inc_by(records);
    }
}

/// State shared by the request path and the writer.
#[derive(Debug)]
struct Shared {
    /// False while the sink fails; true again once a write succeeds.
    healthy: AtomicBool,
    counts: AuditCounts,
    /// When a failing sink may next be probed with a request's record.
    next_probe: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Shared {
    /// Whether a probe is due now (and, if so, schedules the next one).
    fn probe_due(&self) -> bool {
        let now = std::time::Instant::now();
        let mut next = self.next_probe.lock().unwrap_or_else(|p| p.into_inner());
        if next.is_some_and(|at| now < at) {
            return false;
        }
        *next = Some(now + PROBE_EVERY);
        true
    }

    /// The sink just failed: the first probe waits a full interval.
    fn schedule_probe(&self) {
        *self.next_probe.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now() + PROBE_EVERY);
    }
}

/// How often a failing, fail-closed, waiting sink is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The longest a response waits for its record to be written (a hung
/// sink — a stalled pipe, a hung network file system — must not hold
/// requests for ever); past it the record counts as not written.
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// The gateway's audit trail.
pub(crate) struct Auditor {
    sender: mpsc::Sender<Job>,
    /// Whether the sink is a file (standard output has nothing to reopen).
    file: bool,
    shared: Arc<Shared>,
    on_error: OnAuditError,
    durability: Durability,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("on_error", &self.on_error)
            .field("durability", &self.durability)
            .finish()
    }
}

/// A request's reserved place in the queue (or, failing open, the lack of
/// one).
pub(crate) struct Ticket {
    permit: Option<OwnedPermit<Job>>,
    shared: Arc<Shared>,
    durability: Durability,
    on_error: OnAuditError,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("reserved", &self.permit.is_some())
            .finish()
    }
}

/// What became of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// As far as `durability` asks.
    Accepted,
    /// Failing open: not kept, counted.
    Dropped,
    /// Failing closed: not kept; the response must become 503.
    Refused,
}

impl Auditor {
    /// Opens the sink (a file that cannot be opened fails the start) and
    /// starts the writer thread.
    pub(crate) fn start(config: &AuditConfig) -> std::io::Result<Auditor> {
        let (sender, receiver) = mpsc::channel(config.queue_records);
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            counts: AuditCounts::default(),
            next_probe: std::sync::Mutex::new(None),
        });
        writer::spawn(config, receiver, shared.clone())?;
        Ok(Auditor {
            sender,
            file: matches!(config.sink, crate::config::AuditSink::File(_)),
            shared,
            on_error: config.on_error,
            durability: config.durability,
        })
    }

    /// Reserves a place for a new request's record. `None`: refuse the
    /// request (failing closed while the queue is full or the sink fails).
    pub(crate) fn admit(&self) -> Option<Ticket> {
        let healthy = self.shared.healthy.load(Ordering::Acquire);
        // While the sink fails, which records still go to the writer: all
        // of them failing open (a success is how the sink is seen to be
        // back); failing closed with a waiting durability, one a second as
        // a probe (its response waits for the write, so nothing is served
        // unaudited); failing closed with `queued`, none — the writer
        // retries the records it kept and recovers by itself.
        let try_writer = healthy
            || match (self.on_error, self.durability) {
                (OnAuditError::Continue, _) => true,
                (OnAuditError::Reject, Durability::Queued) => false,
                (OnAuditError::Reject, _) => self.shared.probe_due(),
            };
        let permit = if try_writer {
            self.sender.clone().try_reserve_owned().ok()
        } else {
            None
        };
        if permit.is_none() && self.on_error == OnAuditError::Reject {
            self.shared.counts.add("rejected", 1);
            return None;
        }
        Some(Ticket {
            permit,
            shared: self.shared.clone(),
            durability: self.durability,
            on_error: self.on_error,
        })
    }

    /// Whether requests are being refused: failing closed while the sink
    /// cannot write (readiness).
    pub(crate) fn refuses_requests(&self) -> bool {
        self.on_error == OnAuditError::Reject && !self.shared.healthy.load(Ordering::Acquire)
    }

    /// Registers `audit_records_total{outcome}`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "audit_records",
            "Audit records by outcome (written, dropped, rejected)",
            self.shared.counts.0.clone(),
        );
    }

    /// Reopens the file at the configured path (after an external rename),
    /// after the records queued before it. `None` for standard output.
    /// Gives up after `REOPEN_TIMEOUT` (a writer stuck on a full disk must
    /// not hold up the reload of other files).
    pub(crate) async fn reopen(&self) -> Option<std::io::Result<()>> {
        if !self.file {
            return None;
        }
        let (done, reopened) = oneshot::channel();
        let reopen = async {
            self.sender
                .send(Job::Reopen(done))
                .await
                .map_err(|_| std::io::Error::other("the audit writer has stopped"))?;
            reopened
                .await
                .map_err(|_| std::io::Error::other("the audit writer has stopped"))?
        };
        Some(
            tokio::time::timeout(REOPEN_TIMEOUT, reopen)
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::other(
                        "the audit writer did not get to it within 5 s (the sink is stuck)",
                    ))
                }),
        )
    }

    /// Writes what is queued and stops the writer (graceful shutdown).
    pub(crate) async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.sender.send(Job::Close(done)).await.is_ok() {
            let _ = finished.await;
        }
    }
}

impl Ticket {
    /// Hands the record to the writer and, if `durability` asks, waits for
    /// it to be written.
    pub(crate) async fn deliver(self, line: Vec<u8>) -> Delivery {
        let wait = self.durability != Durability::Queued;
        let (written, receipt) = match wait {
            true => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let (shared, on_error) = (self.shared.clone(), self.on_error);
        match self.send(line, written) {
            Delivery::Accepted => {}
            other => return other,
        }
        let Some(receipt) = receipt else {
            return Delivery::Accepted;
        };
        match tokio::time::timeout(WRITE_WAIT, receipt).await {
            Ok(Ok(true)) => Delivery::Accepted,
            // The writer could not write this record (and did not keep it).
            _ => match on_error {
                OnAuditError::Continue => {
                    shared.counts.add("dropped", 1);
                    Delivery::Dropped
                }
                OnAuditError::Reject => {
                    shared.counts.add("rejected", 1);
                    Delivery::Refused
                }
            },
        }
    }

    /// Hands the record over without waiting (a request whose client left:
    /// nobody awaits its response).
    pub(crate) fn deliver_now(self, line: Vec<u8>) {
        let _ = self.send(line, None);
    }

    fn send(self, line: Vec<u8>, written: Option<oneshot::Sender<bool>>) -> Delivery {
        match self.permit {
            Some(permit) => {
                permit.send(Job::Line { line, written });
                Delivery::Accepted
            }
            None => {
                self.shared.counts.add("dropped", 1);
                Delivery::Dropped
            }
        }
    }
}
