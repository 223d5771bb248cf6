//! The audit writer: a thread of its own that takes records from the
//! queue in batches, appends them to standard output or a file (rotated by
//! size, reopened on request), and acknowledges those whose responses wait.
//!
//! When a write fails (disk full, EIO, read-only), the sink is marked
//! unhealthy — new requests are then refused (failing closed) or their
//! records dropped (failing open) — and the writer retries with a growing
//! delay, reopening the file each time, until a write succeeds again.
//! Failing closed, records whose responses were already released are kept
//! and written once the sink recovers; records whose responses wait are
//! answered "not written" at once (their responses become 503).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::oneshot;

use super::{Job, Shared};
use crate::config::{AuditConfig, AuditSink, Durability, OnAuditError};

/// Records written per batch at most.
const BATCH: usize = 512;
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Where lines go.
enum Output {
    Stdout,
    File {
        path: PathBuf,
        file: Option<File>,
        size: u64,
        max_bytes: Option<u64>,
        max_files: usize,
    },
}

fn open(path: &Path) -> io::Result<(File, u64)> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)?;
    let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
    // A process killed in the middle of a line (SIGKILL, a second SIGTERM)
    // leaves it torn: end it, so the next record starts a line of its own.
    let mut last = [0u8];
    if size > 0 && file.read_at(&mut last, size - 1).is_ok() && last[0] != b'\n' {
        file.write_all(b"\n")?;
        size += 1;
    }
    Ok((file, size))
}

/// `<path>.<n>`.
fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

impl Output {
    fn new(config: &AuditConfig) -> io::Result<Output> {
        Ok(match &config.sink {
            AuditSink::Stdout => Output::Stdout,
            AuditSink::File(path) => {
                let (file, size) = open(path)?;
                Output::File {
                    path: path.clone(),
                    file: Some(file),
                    size,
                    max_bytes: config.max_file_bytes,
                    max_files: config.max_files,
                }
            }
        })
    }

    /// Closes and reopens the file at its path.
    fn reopen(&mut self) -> io::Result<()> {
        if let Output::File {
            path, file, size, ..
        } = self
        {
            *file = None;
            let (opened, length) = open(path)?;
            *file = Some(opened);
            *size = length;
        }
        Ok(())
    }

    /// Appends whole lines; a line never spans two files. On failure,
    /// says how many leading lines were written (and the rest is not in
    /// the file: a torn write is cut back, so a retry cannot duplicate or
    /// half-write a line).
    fn write_lines(&mut self, lines: &[&[u8]], sync: bool) -> Result<(), (usize, io::Error)> {
        match self {
            Output::Stdout => {
                let mut out = io::stdout().lock();
                for line in lines {
                    out.write_all(line).map_err(|e| (0, e))?;
                }
                out.flush().map_err(|e| (0, e))
            }
            Output::File {
                path,
                file,
                size,
                max_bytes,
                max_files,
            } => {
                let mut pending: Vec<u8> = Vec::new();
                let mut first_pending = 0;
                for (index, line) in lines.iter().enumerate() {
                    let len = line.len() as u64;
                    if max_bytes.is_some_and(|max| *size > 0 && *size + len > max) {
                        commit(file, &mut pending, sync, size).map_err(|e| (first_pending, e))?;
                        first_pending = index;
                        rotate(path, *max_files).map_err(|e| (index, e))?;
                        let (opened, length) = open(path).map_err(|e| (index, e))?;
                        *file = Some(opened);
                        *size = length;
                    }
                    pending.extend_from_slice(line);
                    *size += len;
                }
                commit(file, &mut pending, sync, size).map_err(|e| (first_pending, e))
            }
        }
    }
}

/// Writes `pending` (already counted in `size`) and syncs if asked. On
/// failure the file is cut back to where `pending` began.
fn commit(
    file: &mut Option<File>,
    pending: &mut Vec<u8>,
    sync: bool,
    size: &mut u64,
) -> io::Result<()> {
    let start = size.saturating_sub(pending.len() as u64);
    let result = match file.as_mut() {
        None => Err(io::Error::other("audit file is not open")),
        Some(file) => {
            file.write_all(pending)
                .and_then(|()| if sync { file.sync_data() } else { Ok(()) })
        }
    };
    pending.clear();
    if result.is_err() {
        if let Some(file) = file.as_mut() {
            // Not possible on every sink (a device); best effort.
            let _ = file.set_len(start);
        }
        *size = start;
    }
    result
}

/// `<path>.N-1` → `<path>.N` … `<path>` → `<path>.1`; the oldest beyond
/// `max_files` is overwritten.
fn rotate(path: &Path, max_files: usize) -> io::Result<()> {
    for n in (1..max_files).rev() {
        match std::fs::rename(rotated(path, n), rotated(path, n + 1)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(path, rotated(path, 1))
}

/// Starts the writer thread.
pub(super) fn spawn(
    config: &AuditConfig,
    receiver: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
) -> io::Result<()> {
    let output = Output::new(config)?;
    let writer = Writer {
        output,
        receiver,
        shared,
        on_error: config.on_error,
        sync: config.durability == Durability::Fsynced,
        dispatch: tracing::dispatcher::get_default(tracing::Dispatch::clone),
    };
    std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || writer.run())?;
    Ok(())
}

struct Writer {
    output: Output,
    receiver: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    on_error: OnAuditError,
    sync: bool,
    /// The gateway's subscriber, for the writer's warnings.
    dispatch: tracing::Dispatch,
}

/// Lines of one batch and who waits for them.
#[derive(Default)]
struct Batch {
    lines: Vec<Vec<u8>>,
    waiting: Vec<(usize, oneshot::Sender<bool>)>,
}

impl Writer {
    fn run(mut self) {
        let dispatch = self.dispatch.clone();
        tracing::dispatcher::with_default(&dispatch, || self.serve());
    }

    fn serve(&mut self) {
        loop {
            let Some(first) = self.receiver.blocking_recv() else {
                return;
            };
            let mut batch = Batch::default();
            let mut close = None;
            self.take(first, &mut batch, &mut close);
            while batch.lines.len() < BATCH && close.is_none() {
                match self.receiver.try_recv() {
                    Ok(job) => self.take(job, &mut batch, &mut close),
                    Err(_) => break,
                }
            }
            self.write(batch, &mut close);
            if let Some(done) = close {
                let _ = done.send(());
                return;
            }
        }
    }

    /// Adds a job to the batch (or does it, for a reopen).
    fn take(&mut self, job: Job, batch: &mut Batch, close: &mut Option<oneshot::Sender<()>>) {
        match job {
            Job::Line { line, written } => {
                if let Some(ack) = written {
                    batch.waiting.push((batch.lines.len(), ack));
                }
                batch.lines.push(line);
            }
            Job::Reopen(done) => {
                let reopened = self.output.reopen();
                if let Err(error) = &reopened {
                    tracing::warn!(%error, "reopening the audit file failed");
                }
                let _ = done.send(reopened);
            }
            Job::Close(done) => *close = Some(done),
        }
    }

    /// Writes a batch. While the sink fails: records whose responses wait
    /// are answered "not written" at once; failing open, the others are
    /// dropped; failing closed, they are kept and retried (the file
    /// reopened each time, the delay growing) until a write succeeds or the
    /// gateway closes the trail.
    fn write(&mut self, mut batch: Batch, close: &mut Option<oneshot::Sender<()>>) {
        let mut delay = RETRY_FIRST;
        while !batch.lines.is_empty() {
            let lines: Vec<&[u8]> = batch.lines.iter().map(Vec::as_slice).collect();
            let error = match self.output.write_lines(&lines, self.sync) {
                Ok(()) => {
                    self.shared.healthy.store(true, Ordering::Release);
                    self.written(&mut batch, usize::MAX);
                    return;
                }
                Err((written, error)) => {
                    // The leading lines that made it are done.
                    self.written(&mut batch, written);
                    error
                }
            };
            if self.shared.healthy.swap(false, Ordering::AcqRel) {
                tracing::error!(%error, on_error = ?self.on_error, "the audit sink cannot write");
                self.shared.schedule_probe();
            }
            batch.refuse_waiting();
            if self.on_error == OnAuditError::Continue {
                self.shared.counts.add("dropped", batch.lines.len() as u64);
                return;
            }
            if close.is_some() {
                tracing::error!(
                    records = batch.lines.len(),
                    "audit records lost at shutdown: the sink cannot write"
                );
                return;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(RETRY_MAX);
            // What arrived meanwhile: waiting records are refused at once,
            // the others join the kept ones.
            while let Ok(job) = self.receiver.try_recv() {
                self.take(job, &mut batch, close);
                batch.refuse_waiting();
            }
            let _ = self.output.reopen();
        }
    }
}

impl Writer {
    /// Counts and acknowledges the first `count` lines of the batch as
    /// written and removes them.
    fn written(&self, batch: &mut Batch, count: usize) {
        let count = count.min(batch.lines.len());
        if count == 0 {
            return;
        }
        self.shared.counts.add("written", count as u64);
        batch.lines.drain(..count);
        let waiting = std::mem::take(&mut batch.waiting);
        for (index, ack) in waiting {
            if index < count {
                let _ = ack.send(true);
            } else {
                batch.waiting.push((index - count, ack));
            }
        }
    }
}

impl Batch {
    /// Answers "not written" to every waiting record and removes it.
    fn refuse_waiting(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let refused: Vec<usize> = self.waiting.iter().map(|(index, _)| *index).collect();
        for (_, ack) in self.waiting.drain(..) {
            let _ = ack.send(false);
        }
        let mut index = 0;
        self.lines.retain(|_| {
            let keep = !refused.contains(&index);
            index += 1;
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_torn_by_a_killed_process_is_ended_before_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "{\"whole\":1}\n{\"torn\":").unwrap();
        let mut output = file_output(&path, 1 << 20, 1);
        output.write_lines(&[b"{\"next\":2}\n"], false).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"whole\":1}\n{\"torn\":\n{\"next\":2}\n");
        // A whole file is left as it is.
        drop(output);
        let _ = open(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    fn file_output(path: &Path, max_bytes: u64, max_files: usize) -> Output {
        let (file, size) = open(path).unwrap();
        Output::File {
            path: path.to_owned(),
            file: Some(file),
            size,
            max_bytes: Some(max_bytes),
            max_files,
        }
    }

    #[test]
    fn rotation_keeps_lines_whole_files_small_and_at_most_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut output = file_output(&path, 100, 3);
        let lines: Vec<Vec<u8>> = (0..50)
            .map(|i| format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(i % 20)).into_bytes())
            .collect();
        for chunk in lines.chunks(7) {
            let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
            output.write_lines(&refs, false).unwrap();
        }
        let mut files = vec![path.clone()];
        files.extend((1..=3).map(|n| rotated(&path, n)));
        assert!(!rotated(&path, 4).exists());
        let mut seen = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            assert!(
                text.len() <= 100 + 40,
                "{} is {} bytes",
                file.display(),
                text.len()
            );
            for line in text.lines() {
                let value: serde_json::Value = serde_json::from_str(line).unwrap();
                seen.push(value["n"].as_u64().unwrap());
            }
        }
        // The newest lines survive, none split or repeated.
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.last(), Some(&49));
        assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    }

    #[test]
    fn reopen_follows_an_external_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut output = file_output(&path, 1 << 20, 2);
        output.write_lines(&[b"one\n"], false).unwrap();
        std::fs::rename(&path, dir.path().join("audit.log.old")).unwrap();
        output.write_lines(&[b"two\n"], false).unwrap();
        output.reopen().unwrap();
        output.write_lines(&[b"three\n"], false).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("audit.log.old")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
    }
}
