//! Write combining: concurrent calls of one kind (store updates, event publishes, acks, …)
//! from the many tasks of a process are gathered into one statement, so a worker running 50
//! jobs commits a handful of transactions where it would commit hundreds. Under light load a
//! batch is one call and costs one channel hop more than a direct statement.

use std::future::Future;
use std::sync::Arc;

use longjob_core::{BackendError, BackendResult};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::BACKEND;

type Reply<T> = oneshot::Sender<BackendResult<T>>;
type Inbox<Req, Resp> = Arc<Mutex<mpsc::UnboundedReceiver<(Req, Reply<Resp>)>>>;

/// Gathers requests into batches and runs them with `exec`, up to `in_flight` batches at once.
#[derive(Debug)]
pub(crate) struct Batcher<Req, Resp> {
    tx: mpsc::UnboundedSender<(Req, Reply<Resp>)>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Starts `in_flight` tasks on the current runtime. `exec` answers a batch with one result
    /// per request, in order, or with one error for all.
    pub(crate) fn new<F, Fut>(max_batch: usize, in_flight: usize, exec: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = BackendResult<Vec<BackendResult<Resp>>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        let exec = Arc::new(exec);
        for _ in 0..in_flight.max(1) {
            tokio::spawn(run(Arc::clone(&rx), Arc::clone(&exec), max_batch.max(1)));
        }
        Self { tx }
    }

    /// Runs `req` in the next batch.
    pub(crate) async fn call(&self, req: Req) -> BackendResult<Resp> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((req, reply))
            .map_err(|_| stopped("the batching task has stopped"))?;
        answer
            .await
            .map_err(|_| stopped("the batching task dropped a request"))?
    }
}

fn stopped(message: &str) -> BackendError {
    BackendError::Unavailable {
        backend: BACKEND,
        message: message.to_owned(),
        source: None,
    }
}

async fn run<Req, Resp, F, Fut>(rx: Inbox<Req, Resp>, exec: Arc<F>, max_batch: usize)
where
    F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BackendResult<Vec<BackendResult<Resp>>>> + Send + 'static,
{
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
                    BACKEND,
                    format_args!("a batch of {n} got {} answers", results.len()),
                );
                for reply in replies {
                    let _ = reply.send(Err(copy(&e)));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(copy(&e)));
                }
            }
        }
    }
}

/// The same error for another caller of the batch (sources are not clonable: their message is
/// kept).
pub(crate) fn copy(e: &BackendError) -> BackendError {
    match e {
        BackendError::Conflict {
            id,
            expected,
            actual,
        } => BackendError::Conflict {
            id: *id,
            expected: *expected,
            actual: *actual,
        },
        BackendError::Fenced { id, token, current } => BackendError::Fenced {
            id: *id,
            token: *token,
            current: *current,
        },
        BackendError::NotFound(id) => BackendError::NotFound(*id),
        BackendError::AlreadyExists(id) => BackendError::AlreadyExists(*id),
        BackendError::InvalidArgument(m) => BackendError::InvalidArgument(m.clone()),
        BackendError::Unavailable {
            backend, message, ..
        } => BackendError::Unavailable {
            backend,
            message: message.clone(),
            source: None,
        },
        BackendError::Timeout { backend, after } => BackendError::Timeout {
            backend,
            after: *after,
        },
        BackendError::Unauthorized { backend, message } => BackendError::Unauthorized {
            backend,
            message: message.clone(),
        },
        other => BackendError::corrupt(BACKEND, other),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_batches_and_get_their_own_answers() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let batcher = Arc::new(Batcher::new(64, 1, move |reqs: Vec<u32>| {
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
        let batcher: Batcher<u32, u32> = Batcher::new(8, 1, |_reqs: Vec<u32>| async {
            Err(BackendError::Timeout {
                backend: BACKEND,
                after: std::time::Duration::from_secs(1),
            })
        });
        assert!(batcher.call(1).await.unwrap_err().is_transient());
    }
}
