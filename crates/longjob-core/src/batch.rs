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
type Inbox<Req, Resp> = Arc<tokio::sync::Mutex<mpsc::Receiver<Entry<Req, Resp>>>>;
/// The inbox and the batch runner, kept until the first call starts the tasks.
type Unstarted<Req, Resp> = (mpsc::Receiver<Entry<Req, Resp>>, Exec<Req, Resp>);
type Exec<Req, Resp> = Arc<
    dyn Fn(Vec<Req>) -> futures::future::BoxFuture<'static, BackendResult<Vec<BackendResult<Resp>>>>
        + Send
        + Sync,
>;

/// What the inbox holds: one request, or a group that must share a batch.
enum Entry<Req, Resp> {
    One(Request<Req, Resp>),
    Group(Vec<Request<Req, Resp>>),
}

impl<Req, Resp> Entry<Req, Resp> {
    fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Group(requests) => requests.len(),
        }
    }
}

/// Gathers concurrent requests into batches and runs each batch with one call of `exec`, with
/// up to `in_flight` batches running at once.
///
/// Its tasks start on the tokio runtime of the first call and stop when the batcher is dropped.
/// Waiting calls are bounded: past `4 × max_batch` of them, callers wait to be queued.
///
/// [`call_many`](Self::call_many) sends requests that must stay together and in order (a job's
/// events, say): they run in one batch, whatever `in_flight` is.
pub struct Batcher<Req, Resp> {
    backend: &'static str,
    tx: mpsc::Sender<Entry<Req, Resp>>,
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
            .send(Entry::One((req, reply)))
            .await
            .map_err(|_| self.stopped("the batching task has stopped"))?;
        answer
            .await
            .map_err(|_| self.stopped("the batching task dropped a request"))?
    }

    /// Runs `reqs` together, in their order, in one batch (which may exceed `max_batch` to hold
    /// them), and returns each one's answer in that order.
    ///
    /// ```
    /// use longjob_core::batch::Batcher;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), longjob_core::BackendError> {
    /// // A "backend call" that numbers what it is given, from 1 in each batch.
    /// let numbering = Batcher::new("example", 2, 4, |names: Vec<&str>| async move {
    ///     Ok((1..).zip(names).map(|(n, name)| Ok(format!("{n}:{name}"))).collect())
    /// });
    /// let answers = numbering.call_many(vec!["a", "b", "c"]).await?;
    /// let answers: Vec<String> = answers.into_iter().collect::<Result<_, _>>()?;
    /// assert_eq!(answers, ["1:a", "2:b", "3:c"]);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn call_many(&self, reqs: Vec<Req>) -> BackendResult<Vec<BackendResult<Resp>>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        self.started.get_or_init(|| self.start());
        let (group, answers): (Vec<_>, Vec<_>) = reqs
            .into_iter()
            .map(|req| {
                let (reply, answer) = oneshot::channel();
                ((req, reply), answer)
            })
            .unzip();
        self.tx
            .send(Entry::Group(group))
            .await
            .map_err(|_| self.stopped("the batching task has stopped"))?;
        let mut out = Vec::with_capacity(answers.len());
        for answer in answers {
            out.push(
                answer
                    .await
                    .map_err(|_| self.stopped("the batching task dropped a request"))?,
            );
        }
        Ok(out)
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
        let (batch, n) = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut size = first.len();
            let mut batch = vec![first];
            while size < max_batch {
                match rx.try_recv() {
                    Ok(next) => {
                        size += next.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            (batch, size)
        };
        let (mut reqs, mut replies): (Vec<Req>, Vec<Reply<Resp>>) =
            (Vec::with_capacity(n), Vec::with_capacity(n));
        for entry in batch {
            match entry {
                Entry::One((req, reply)) => {
                    reqs.push(req);
                    replies.push(reply);
                }
                Entry::Group(requests) => {
                    for (req, reply) in requests {
                        reqs.push(req);
                        replies.push(reply);
                    }
                }
            }
        }
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_runs_in_one_batch_in_order_among_concurrent_calls() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&batches);
        // Several batches in flight at once, small batches: only grouping keeps a group whole.
        let batcher = Arc::new(Batcher::new("test", 4, 4, move |reqs: Vec<u32>| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(reqs.clone());
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Ok(reqs.into_iter().map(|r| Ok(r + 1)).collect())
            }
        }));
        let singles = (0..50u32).map(|i| {
            let b = Arc::clone(&batcher);
            tokio::spawn(async move { b.call(i).await.unwrap() })
        });
        let groups = (0..10u32).map(|g| {
            let b = Arc::clone(&batcher);
            tokio::spawn(async move {
                let group: Vec<u32> = (0..10).map(|i| 1000 * (g + 1) + i).collect();
                let answers = b.call_many(group.clone()).await.unwrap();
                let answers: Vec<u32> = answers.into_iter().map(Result::unwrap).collect();
                assert_eq!(answers, group.iter().map(|r| r + 1).collect::<Vec<_>>());
                group
            })
        });
        let (singles, groups) = futures::future::join(
            futures::future::join_all(singles),
            futures::future::join_all(groups),
        )
        .await;
        assert_eq!(singles.len(), 50);
        let batches = batches.lock().unwrap().clone();
        for group in groups {
            let group = group.unwrap();
            let whole = batches
                .iter()
                .any(|batch| batch.windows(group.len()).any(|w| w == group.as_slice()));
            assert!(whole, "{group:?} was split or reordered: {batches:?}");
        }
        assert!(batcher.call_many(Vec::new()).await.unwrap().is_empty());
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
