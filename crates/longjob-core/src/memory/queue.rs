use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::lock;
use crate::id::IdMap;
use crate::queue::{Lease, QueueStats};
use crate::{BackendResult, JobId, Queue};

/// A [`Queue`] in process memory.
///
/// Times are kept on tokio's clock, so tests can run it under a paused clock.
#[derive(Debug, Default)]
pub struct MemoryQueue {
    inner: Mutex<Inner>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    /// Waiting jobs by (due time, push order).
    waiting: BTreeSet<(Instant, u64, JobId)>,
    /// Leases by (expiry, token).
    leases: BTreeSet<(Instant, u64, JobId)>,
    entries: IdMap<Entry>,
    next_token: u64,
    next_order: u64,
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    /// `lost`: back from an expired lease (see [`Lease::redelivered`]).
    Waiting {
        due: Instant,
        order: u64,
        lost: bool,
    },
    Leased {
        expires: Instant,
        token: u64,
    },
}

impl Inner {
    fn remove(&mut self, job: JobId) -> Option<Entry> {
        let entry = self.entries.remove(&job)?;
        match entry {
            Entry::Waiting { due, order, .. } => self.waiting.remove(&(due, order, job)),
            Entry::Leased { expires, token } => self.leases.remove(&(expires, token, job)),
        };
        Some(entry)
    }

    fn wait(&mut self, job: JobId, due: Instant) {
        self.enter(job, due, false);
    }

    fn enter(&mut self, job: JobId, due: Instant, lost: bool) {
        self.remove(job);
        self.next_order += 1;
        let order = self.next_order;
        self.waiting.insert((due, order, job));
        self.entries
            .insert(job, Entry::Waiting { due, order, lost });
    }

    /// Expired leases become claimable at once.
    fn expire_leases(&mut self, now: Instant) {
        while let Some(&(expires, _, job)) = self.leases.first() {
            if expires > now {
                break;
            }
            self.enter(job, expires, true);
        }
    }

    fn held(&self, lease: &Lease) -> Option<Instant> {
        match self.entries.get(&lease.job_id) {
            Some(Entry::Leased { expires, token }) if *token == lease.token => Some(*expires),
            _ => None,
        }
    }

    fn claim(&mut self, max: usize, ttl: Duration, now: Instant) -> Vec<Lease> {
        self.expire_leases(now);
        let mut leases = Vec::new();
        while leases.len() < max {
            let Some(&(due, order, job)) = self.waiting.first() else {
                break;
            };
            if due > now {
                break;
            }
            self.waiting.remove(&(due, order, job));
            self.next_token += 1;
            let token = self.next_token;
            let expires = now + ttl;
            self.leases.insert((expires, token, job));
            let was = self.entries.insert(job, Entry::Leased { expires, token });
            let redelivered = matches!(was, Some(Entry::Waiting { lost: true, .. }));
            leases.push(Lease {
                job_id: job,
                token,
                redelivered,
            });
        }
        leases
    }

    /// When something may become claimable without a push: the next due job or lease expiry.
    fn next_wakeup(&self) -> Option<Instant> {
        let due = self.waiting.first().map(|w| w.0);
        let expiry = self.leases.first().map(|l| l.0);
        due.into_iter().chain(expiry).min()
    }
}

impl MemoryQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn push(&self, job: JobId, delay: Duration) -> BackendResult<()> {
        lock(&self.inner).wait(job, Instant::now() + delay);
        self.notify.notify_waiters();
        Ok(())
    }

    async fn push_many(&self, jobs: &[JobId], delay: Duration) -> BackendResult<()> {
        {
            let mut inner = lock(&self.inner);
            let due = Instant::now() + delay;
            for job in jobs {
                inner.wait(*job, due);
            }
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn claim(
        &self,
        max: usize,
        lease_ttl: Duration,
        wait: Duration,
    ) -> BackendResult<Vec<Lease>> {
        let deadline = Instant::now() + wait;
        loop {
            // Register interest before looking, so a push between the look and the wait wakes us.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (leases, wakeup) = {
                let mut inner = lock(&self.inner);
                let leases = inner.claim(max, lease_ttl, Instant::now());
                (leases, inner.next_wakeup())
            };
            if !leases.is_empty() || max == 0 || Instant::now() >= deadline {
                return Ok(leases);
            }
            let until = wakeup.map_or(deadline, |w| w.min(deadline));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn extend(&self, leases: &[Lease], ttl: Duration) -> BackendResult<Vec<bool>> {
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        inner.expire_leases(now);
        Ok(leases
            .iter()
            .map(|lease| {
                let Some(old) = inner.held(lease) else {
                    return false;
                };
                let expires = now + ttl;
                inner.leases.remove(&(old, lease.token, lease.job_id));
                inner.leases.insert((expires, lease.token, lease.job_id));
                inner.entries.insert(
                    lease.job_id,
                    Entry::Leased {
                        expires,
                        token: lease.token,
                    },
                );
                true
            })
            .collect())
    }

    async fn ack(&self, lease: &Lease) -> BackendResult<bool> {
        let mut inner = lock(&self.inner);
        inner.expire_leases(Instant::now());
        if inner.held(lease).is_none() {
            return Ok(false);
        }
        inner.remove(lease.job_id);
        Ok(true)
    }

    async fn requeue(&self, lease: &Lease, delay: Duration) -> BackendResult<bool> {
        let held = {
            let mut inner = lock(&self.inner);
            let now = Instant::now();
            inner.expire_leases(now);
            let held = inner.held(lease).is_some();
            if held {
                inner.wait(lease.job_id, now + delay);
            }
            held
        };
        if held {
            self.notify.notify_waiters();
        }
        Ok(held)
    }

    async fn stats(&self) -> BackendResult<QueueStats> {
        let inner = lock(&self.inner);
        let now = Instant::now();
        let ready = inner.waiting.iter().take_while(|w| w.0 <= now).count() as u64;
        Ok(QueueStats {
            ready,
            delayed: inner.waiting.len() as u64 - ready,
            leased: inner.leases.len() as u64,
        })
    }

    async fn health(&self) -> BackendResult<()> {
        Ok(())
    }
}
