//! Write combining for backend authors: concurrent calls of one kind (store updates, event
//! publishes, acks, …) from the many tasks of a process are gathered into one backend call.
//!
//! A worker running 50 jobs makes hundreds of small calls a second; each costs the backend a
//! fixed price (a transaction, a script invocation) beyond its work. A [`Batcher`] sends the
//! first call at once and gathers the calls that arrive while it is in flight into the next
//! batch, so under load the fixed price is paid per batch, and under light load a call costs
//! one channel hop more than a direct one.
//!
//! ```
//! use longjob_core::batch::Batcher;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), longjob_core::BackendError> {
//! // One "backend call" doubles every number of its batch.
//! let doubler = Batcher::new("example", 64, 1, |numbers: Vec<u32>| async move {
//!     Ok(numbers.into_iter().map(|n| Ok(n * 2)).collect())
//! });
//! assert_eq!(doubler.call(21).await?, 42);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{mpsc, oneshot};

use crate::{BackendError, BackendResult};

type Reply<T> = oneshot::Sender<BackendResult<T>>;
type Request<Req, Resp> = (Req, Reply<Resp>);
type Inbox<Req, Resp> = Arc<tokio::sync::Mutex<mpsc::Receiver<Request<Req, Resp>>>>;
/// The inbox and the batch runner, kept until the first call starts the tasks.
type Unstarted<Req, Resp> = (mpsc::Receiver<Request<Req, Resp>>, Exec<Req, Resp>);
type Exec<Req, Resp> = Arc<
    dyn Fn(Vec<Req>) -> futures::future::BoxFuture<'static, BackendResult<Vec<BackendResult<Resp>>>>
        + Send
        + Sync,
>;

/// Gathers concurrent requests into batches and runs each batch with one call of `exec`, with
/// up to `in_flight` batches running at once.
///
/// Its tasks start on the tokio runtime of the first [`call`](Self::call) and stop when the
/// batcher is dropped. Waiting requests are bounded: past `4 × max_batch` of them, callers wait
/// to be queued.
pub struct Batcher<Req, Resp> {
    backend: &'static str,
    tx: mpsc::Sender<Request<Req, Resp>>,
    pending: Mutex<Option<Unstarted<Req, Resp>>>,
    started: OnceLock<()>,
    max_batch: usize,
    in_flight: usize,
}

impl<Req, Resp> std::fmt::Debug for Batcher<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("backend", &self.backend)
            .field("max_batch", &self.max_batch)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// A batcher of at most `max_batch` requests per call, `in_flight` calls at once.
    /// `exec` answers a batch with one result per request, in order, or with one error for all;
    /// errors name `backend`.
    pub fn new<F, Fut>(backend: &'static str, max_batch: usize, in_flight: usize, exec: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = BackendResult<Vec<BackendResult<Resp>>>> + Send + 'static,
    {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch.saturating_mul(4));
        let exec: Exec<Req, Resp> = Arc::new(move |reqs| Box::pin(exec(reqs)));
        Self {
            backend,
            tx,
            pending: Mutex::new(Some((rx, exec))),
            started: OnceLock::new(),
            max_batch,
            in_flight: in_flight.max(1),
        }
    }

    /// Runs `req` in the next batch and returns its own answer.
    pub async fn call(&self, req: Req) -> BackendResult<Resp> {
        self.started.get_or_init(|| self.start());
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((req, reply))
            .await
            .map_err(|_| self.stopped("the batching task has stopped"))?;
        answer
            .await
            .map_err(|_| self.stopped("the batching task dropped a request"))?
    }

    fn start(&self) {
        let taken = match self.pending.lock() {
            Ok(mut pending) => pending.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some((rx, exec)) = taken {
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            for _ in 0..self.in_flight {
                tokio::spawn(run(
                    Arc::clone(&rx),
                    Arc::clone(&exec),
                    self.max_batch,
                    self.backend,
                ));
            }
        }
    }

    fn stopped(&self, message: &str) -> BackendError {
        BackendError::Unavailable {
            backend: self.backend,
            message: message.to_owned(),
            source: None,
        }
    }
}

async fn run<Req, Resp>(
    rx: Inbox<Req, Resp>,
    exec: Exec<Req, Resp>,
    max_batch: usize,
    backend: &'static str,
) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            batch
        };
        let (reqs, replies): (Vec<Req>, Vec<Reply<Resp>>) = batch.into_iter().unzip();
        let n = reqs.len();
        match exec(reqs).await {
            Ok(results) if results.len() == n => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Ok(results) => {
                let e = BackendError::corrupt(
                    backend,
                    format_args!("a batch of {n} got {} answers", results.len()),
                );
                for reply in replies {
                    let _ = reply.send(Err(e.share()));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.share()));
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_batches_and_get_their_own_answers() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let batcher = Arc::new(Batcher::new("test", 64, 1, move |reqs: Vec<u32>| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(reqs.len());
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(reqs.into_iter().map(|r| Ok(r * 2)).collect())
            }
        }));
        let calls = (0..100u32).map(|i| {
            let b = Arc::clone(&batcher);
            tokio::spawn(async move { (i, b.call(i).await.unwrap()) })
        });
        for call in futures::future::join_all(calls).await {
            let (i, doubled) = call.unwrap();
            assert_eq!(doubled, i * 2);
        }
        let sizes = sizes.lock().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 100);
        assert!(sizes.len() < 100, "nothing was batched: {sizes:?}");
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_call() {
        let batcher: Batcher<u32, u32> = Batcher::new("test", 8, 1, |_reqs: Vec<u32>| async {
            Err(BackendError::Timeout {
                backend: "test",
                after: std::time::Duration::from_secs(1),
            })
        });
        assert!(batcher.call(1).await.unwrap_err().is_transient());
    }

    #[tokio::test]
    async fn a_batch_with_the_wrong_number_of_answers_is_corrupt() {
        let batcher: Batcher<u32, u32> =
            Batcher::new("test", 8, 1, |_reqs: Vec<u32>| async { Ok(Vec::new()) });
        let e = batcher.call(1).await.unwrap_err();
        assert!(matches!(e, BackendError::Corrupt { .. }), "{e}");
    }
}
