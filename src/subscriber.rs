//! Spawned tasks keep the tracing subscriber of the code that spawned them,
//! for polling and for dropping: a gateway may log to a subscriber of its
//! own (tests capture one server's log so).
//!
//! `WithSubscriber` sets the subscriber only while a task is polled. A task
//! dropped afterwards — finished, or cancelled by an HTTP/2 reset or a
//! closed connection — would close its spans where another subscriber is
//! the default, and tracing-subscriber's registry closes a span's parent in
//! the default subscriber, which never saw it, and panics.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// Futures that can carry the current subscriber into a task.
pub(crate) trait InCurrentSubscriber: Future + Sized {
    /// This future, polled and dropped under the current default subscriber.
    fn in_current_subscriber(self) -> Dispatched<Self> {
        Dispatched::new(self, tracing::dispatcher::get_default(|d| d.clone()))
    }
}

impl<F: Future> InCurrentSubscriber for F {}

pin_project_lite::pin_project! {
    /// A future polled and dropped with `dispatch` as the default subscriber.
    pub(crate) struct Dispatched<F> {
        dispatch: tracing::Dispatch,
        #[pin]
        future: Option<F>,
    }

    impl<F> PinnedDrop for Dispatched<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let _default = tracing::dispatcher::set_default(this.dispatch);
            let mut future = this.future;
            future.set(None);
        }
    }
}

impl<F> Dispatched<F> {
    pub(crate) fn new(future: F, dispatch: tracing::Dispatch) -> Dispatched<F> {
        Dispatched {
            dispatch,
            future: Some(future),
        }
    }
}

impl<F: Future> Future for Dispatched<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        let _default = tracing::dispatcher::set_default(this.dispatch);
        let Some(future) = this.future.as_mut().as_pin_mut() else {
            // Polled after completion: tokio never does.
            return Poll::Pending;
        };
        let output = ready!(future.poll(cx));
        // Finished: its state goes now, under its subscriber, not later
        // wherever the executor drops the task.
        this.future.set(None);
        Poll::Ready(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Instrument;

    /// Spawns `work` inside a step span whose parent is a request span, as
    /// the pipeline and the token refresh do, from code logging to
    /// `dispatch`.
    fn spawn_in_step(
        dispatch: &tracing::Dispatch,
        work: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let _default = tracing::dispatcher::set_default(dispatch);
        let request = tracing::info_span!("request");
        let step = tracing::info_span!(parent: &request, "step");
        tokio::spawn(work.instrument(step).in_current_subscriber())
    }

    #[tokio::test]
    async fn a_task_closes_its_spans_in_its_own_subscriber_when_it_ends_or_is_cancelled() {
        // The test's thread has another subscriber (the global one) as its
        // default, where tokio polls and drops the tasks.
        let (dispatch, _log) = crate::test_log::CapturedLog::start();
        let finished = spawn_in_step(&dispatch, async {});
        assert!(finished.await.is_ok(), "the finished task panicked");

        let (_keep, never) = tokio::sync::oneshot::channel::<()>();
        let cancelled = spawn_in_step(&dispatch, async move {
            let _ = never.await;
        });
        tokio::task::yield_now().await;
        cancelled.abort();
        let error = cancelled.await.unwrap_err();
        assert!(error.is_cancelled(), "the cancelled task panicked: {error}");
    }
}
