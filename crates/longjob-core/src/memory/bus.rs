use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::Utc;
use futures::StreamExt;
use tokio::sync::broadcast;

use super::lock;
use crate::bus::{CancelStream, EventStream};
use crate::{BackendResult, EventPayload, JobEvent, JobId, ProgressBus};

/// Live events buffered per subscriber before it counts as lagging (and refills from retention).
const LIVE_BUFFER: usize = 256;

/// A [`ProgressBus`] in process memory: per job, the last `retained` events for replay and a
/// broadcast channel for live ones.
#[derive(Debug, Clone)]
pub struct MemoryProgressBus {
    inner: Arc<Mutex<Inner>>,
    cancels: broadcast::Sender<JobId>,
    retained: usize,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<JobId, Channel>,
}

#[derive(Debug, Default)]
struct Channel {
    last_seq: u64,
    retained: VecDeque<JobEvent>,
    /// Created by the first subscriber and dropped when none is left, so a job nobody follows
    /// costs no channel.
    live: Option<broadcast::Sender<JobEvent>>,
}

impl Default for MemoryProgressBus {
    fn default() -> Self {
        Self::new(1000)
    }
}

impl MemoryProgressBus {
    /// A bus that retains the last `retained` events of each job for replay (at least 1).
    pub fn new(retained: usize) -> Self {
        Self {
            inner: Arc::default(),
            cancels: broadcast::channel(1024).0,
            retained: retained.max(1),
        }
    }

    fn retained_after(inner: &Inner, job: JobId, after_seq: u64) -> VecDeque<JobEvent> {
        inner
            .jobs
            .get(&job)
            .map(|c| {
                c.retained
                    .iter()
                    .filter(|e| e.seq > after_seq)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct Subscription {
    inner: Arc<Mutex<Inner>>,
    job: JobId,
    last_seq: u64,
    replay: VecDeque<JobEvent>,
    live: broadcast::Receiver<JobEvent>,
}

impl Subscription {
    async fn next(&mut self) -> Option<JobEvent> {
        loop {
            if let Some(event) = self.replay.pop_front() {
                if event.seq <= self.last_seq {
                    continue;
                }
                self.last_seq = event.seq;
                return Some(event);
            }
            match self.live.recv().await {
                Ok(event) if event.seq <= self.last_seq => {}
                Ok(event) if event.seq == self.last_seq + 1 => {
                    self.last_seq = event.seq;
                    return Some(event);
                }
                Ok(event) => {
                    // A gap: fill it from the retained events, or skip it if they are gone too.
                    self.replay = MemoryProgressBus::retained_after(
                        &lock(&self.inner),
                        self.job,
                        self.last_seq,
                    );
                    if self.replay.front().is_none_or(|e| e.seq > event.seq) {
                        self.replay.push_front(event);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.replay = MemoryProgressBus::retained_after(
                        &lock(&self.inner),
                        self.job,
                        self.last_seq,
                    );
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[async_trait]
impl ProgressBus for MemoryProgressBus {
    async fn publish(&self, job: JobId, payload: EventPayload) -> BackendResult<JobEvent> {
        let mut inner = lock(&self.inner);
        let channel = inner.jobs.entry(job).or_default();
        channel.last_seq += 1;
        let event = JobEvent {
            seq: channel.last_seq,
            job_id: job,
            at: Utc::now(),
            payload,
        };
        if channel.retained.len() >= self.retained {
            channel.retained.pop_front();
        }
        channel.retained.push_back(event.clone());
        // Sent under the lock, so live events leave in seq order.
        if let Some(live) = &channel.live {
            if live.send(event.clone()).is_err() {
                channel.live = None;
            }
        }
        Ok(event)
    }

    async fn subscribe(&self, job: JobId, after_seq: u64) -> BackendResult<EventStream> {
        let mut inner = lock(&self.inner);
        let replay = Self::retained_after(&inner, job, after_seq);
        let channel = inner.jobs.entry(job).or_default();
        let live = channel
            .live
            .get_or_insert_with(|| broadcast::channel(LIVE_BUFFER).0)
            .subscribe();
        let subscription = Subscription {
            inner: Arc::clone(&self.inner),
            job,
            last_seq: after_seq,
            replay,
            live,
        };
        drop(inner);
        Ok(futures::stream::unfold(subscription, |mut s| async move {
            let event = s.next().await?;
            Some((Ok(event), s))
        })
        .boxed())
    }

    async fn signal_cancel(&self, job: JobId) -> BackendResult<()> {
        let _ = self.cancels.send(job);
        Ok(())
    }

    async fn cancel_signals(&self) -> BackendResult<CancelStream> {
        let rx = self.cancels.subscribe();
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(job) => return Some((Ok(job), rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed())
    }

    async fn purge(&self, job: JobId) -> BackendResult<()> {
        lock(&self.inner).jobs.remove(&job);
        Ok(())
    }

    async fn health(&self) -> BackendResult<()> {
        Ok(())
    }
}
