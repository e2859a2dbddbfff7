use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::broadcast;

use super::lock;
use crate::bus::{CancelStream, EventStream};
use crate::id::IdMap;
use crate::{
    BackendResult, EventPayload, JobError, JobEvent, JobId, JobState, Progress, ProgressBus,
};

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
    jobs: IdMap<Channel>,
}

#[derive(Debug, Default)]
struct Channel {
    last_seq: u64,
    /// The retained events, oldest first: the last one has `last_seq`, and each the seq after
    /// its predecessor's.
    retained: VecDeque<Kept>,
    /// Created by the first subscriber and dropped when none is left, so a job nobody follows
    /// costs no channel.
    live: Option<broadcast::Sender<JobEvent>>,
}

/// A retained event without what its place tells (its seq, its job): 72 bytes instead of a
/// [`JobEvent`]'s 136, the bulk of what a job costs in memory.
#[derive(Debug)]
struct Kept {
    at: DateTime<Utc>,
    payload: Compact,
}

/// An [`EventPayload`] in less room: inline the events that make up most of a job's events
/// (status, progress, failed, cancelled), boxed the rarer and larger ones (a retrying status with
/// its error, a completion with its URL).
#[derive(Debug)]
enum Compact {
    /// A `Status` without error and next run time (any status but `retrying`).
    Status {
        status: JobState,
        attempt: u32,
        progress: Option<Progress>,
    },
    Progress(Progress),
    Failed {
        error: JobError,
        attempt: u32,
    },
    Cancelled,
    Other(Box<EventPayload>),
}

impl Compact {
    fn new(payload: EventPayload) -> Self {
        match payload {
            EventPayload::Status {
                status,
                attempt,
                error: None,
                next_run_at: None,
                progress,
            } => Self::Status {
                status,
                attempt,
                progress,
            },
            EventPayload::Progress { progress } => Self::Progress(progress),
            EventPayload::Failed { error, attempt } => Self::Failed { error, attempt },
            EventPayload::Cancelled {} => Self::Cancelled,
            other => Self::Other(Box::new(other)),
        }
    }

    /// [`EventPayload::is_terminal`] without expanding it.
    fn is_terminal(&self) -> bool {
        match self {
            Self::Failed { .. } | Self::Cancelled => true,
            Self::Status { .. } | Self::Progress(_) => false,
            Self::Other(payload) => payload.is_terminal(),
        }
    }

    fn payload(&self) -> EventPayload {
        match self {
            Self::Status {
                status,
                attempt,
                progress,
            } => EventPayload::Status {
                status: *status,
                attempt: *attempt,
                error: None,
                next_run_at: None,
                progress: *progress,
            },
            Self::Progress(progress) => EventPayload::Progress {
                progress: *progress,
            },
            Self::Failed { error, attempt } => EventPayload::Failed {
                error: error.clone(),
                attempt: *attempt,
            },
            Self::Cancelled => EventPayload::Cancelled {},
            Self::Other(payload) => (**payload).clone(),
        }
    }
}

impl Channel {
    /// Retains `event`, dropping the oldest past `max`.
    fn retain(&mut self, event: &JobEvent, max: usize) {
        if self.retained.len() >= max {
            self.retained.pop_front();
        }
        if self.retained.len() == self.retained.capacity() {
            // Most jobs have a handful of events: grow one at a time at first instead of
            // doubling (a deque's first growth makes room for four), and by doubling past that.
            let more = if self.retained.len() < 8 {
                1
            } else {
                self.retained.len()
            };
            self.retained
                .reserve_exact(more.min(max - self.retained.len()).max(1));
        }
        self.retained.push_back(Kept {
            at: event.at,
            payload: Compact::new(event.payload.clone()),
        });
    }

    /// The retained events after `after_seq`, oldest first.
    fn after(&self, job: JobId, after_seq: u64) -> VecDeque<JobEvent> {
        let first = self.last_seq + 1 - self.retained.len() as u64;
        let skip = usize::try_from(after_seq.saturating_sub(first - 1)).unwrap_or(usize::MAX);
        self.retained
            .iter()
            .zip(first..)
            .skip(skip)
            .map(|(kept, seq)| JobEvent {
                seq,
                job_id: job,
                at: kept.at,
                payload: kept.payload.payload(),
            })
            .collect()
    }
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

    /// Forgets the job's retained events, as [`purge`](ProgressBus::purge) does, without a
    /// future: for [`MemoryJobStore::on_evict`](super::MemoryJobStore::on_evict).
    pub fn forget(&self, job: JobId) {
        lock(&self.inner).jobs.remove(&job);
    }

    fn retained_after(inner: &Inner, job: JobId, after_seq: u64) -> VecDeque<JobEvent> {
        inner
            .jobs
            .get(&job)
            .map(|c| c.after(job, after_seq))
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
        if let Some(last) = channel.retained.back() {
            if payload.is_terminal() && last.payload.is_terminal() {
                // A repeat (a retried publish): the job's end is already told.
                return Ok(JobEvent {
                    seq: channel.last_seq,
                    job_id: job,
                    at: last.at,
                    payload: last.payload.payload(),
                });
            }
        }
        channel.last_seq += 1;
        let event = JobEvent {
            seq: channel.last_seq,
            job_id: job,
            at: Utc::now(),
            payload,
        };
        channel.retain(&event, self.retained);
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
        self.forget(job);
        Ok(())
    }

    async fn health(&self) -> BackendResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn payloads() -> Vec<EventPayload> {
        let progress = Progress {
            current: 1,
            total: 3,
            bytes_done: 10,
            eta_ms: Some(5),
        };
        vec![
            EventPayload::Status {
                status: JobState::Queued,
                attempt: 0,
                error: None,
                next_run_at: None,
                progress: Some(Progress::default()),
            },
            EventPayload::Status {
                status: JobState::Running,
                attempt: 1,
                error: None,
                next_run_at: None,
                progress: None,
            },
            EventPayload::Progress { progress },
            EventPayload::Status {
                status: JobState::Retrying,
                attempt: 1,
                error: Some(JobError::network("reset")),
                next_run_at: Some(Utc::now()),
                progress: Some(progress),
            },
            EventPayload::Completed {
                download_url: Some("http://x/y".into()),
                expires_at: Some(Utc::now()),
                size: Some(3),
            },
            // Each end after a manual retry: an end right after an end is not kept.
            queued_again(),
            EventPayload::Failed {
                error: JobError::validation("bad"),
                attempt: 2,
            },
            queued_again(),
            EventPayload::Cancelled {},
        ]
    }

    fn queued_again() -> EventPayload {
        EventPayload::Status {
            status: JobState::Queued,
            attempt: 2,
            error: None,
            next_run_at: None,
            progress: None,
        }
    }

    /// Events are kept compactly; the replay must give back exactly what was published.
    #[tokio::test]
    async fn replay_gives_back_every_payload_as_published() {
        let bus = MemoryProgressBus::new(1000);
        let job = JobId::new();
        let mut published = Vec::new();
        for payload in payloads() {
            assert_eq!(
                Compact::new(payload.clone()).is_terminal(),
                payload.is_terminal()
            );
            published.push(bus.publish(job, payload).await.unwrap());
        }
        for after in 0..published.len() {
            let replayed: Vec<JobEvent> = bus
                .subscribe(job, after as u64)
                .await
                .unwrap()
                .take(published.len() - after)
                .map(Result::unwrap)
                .collect()
                .await;
            assert_eq!(replayed, published[after..], "after {after}");
        }
    }

    #[test]
    fn a_kept_event_is_about_half_a_job_event() {
        assert!(
            std::mem::size_of::<Kept>() <= 72,
            "{}",
            std::mem::size_of::<Kept>()
        );
    }

    #[tokio::test]
    async fn replay_past_the_retention_starts_at_the_oldest_kept() {
        let bus = MemoryProgressBus::new(3);
        let job = JobId::new();
        let mut published = Vec::new();
        for payload in payloads() {
            published.push(bus.publish(job, payload).await.unwrap());
        }
        let replayed: Vec<JobEvent> = bus
            .subscribe(job, 1)
            .await
            .unwrap()
            .take(3)
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(replayed, published[published.len() - 3..]);
    }
}
