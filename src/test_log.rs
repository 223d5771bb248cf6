//! Test-only: a tracing subscriber of a test's own whose plain-text lines
//! land in a buffer the test reads.

use std::sync::{Arc, Mutex};

/// The lines written so far.
#[derive(Clone, Default)]
pub(crate) struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl CapturedLog {
    /// A subscriber writing into a new buffer, and the buffer.
    pub(crate) fn start() -> (tracing::Dispatch, CapturedLog) {
        let log = CapturedLog::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // Unit tests run in parallel, and tracing keeps one global notion of
        // which call sites and levels are enabled: with a subscriber of its
        // own coming and going per test, a call site could be judged
        // disabled in between. A global subscriber that enables everything
        // (and writes nowhere) keeps every call site alive.
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let everything = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(std::io::sink)
                .finish();
            let _ = tracing::subscriber::set_global_default(everything);
        });
        (tracing::Dispatch::new(subscriber), log)
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl std::io::Write for CapturedLog {
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
