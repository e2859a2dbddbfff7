//! The [`ProgressBus`] trait: events from workers to every API process.

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::{BackendResult, EventPayload, JobEvent, JobId};

/// A stream of a job's events, in `seq` order.
pub type EventStream = BoxStream<'static, BackendResult<JobEvent>>;

/// A stream of cancel requests (job ids), for workers.
pub type CancelStream = BoxStream<'static, BackendResult<JobId>>;

/// Carries [`JobEvent`]s from workers to every API process, and cancel requests to workers.
///
/// Semantics every implementation keeps (the [test kit](crate::testkit) checks them):
/// - [`publish`](Self::publish) gives each event of a job the next `seq` (1, 2, 3, …), whichever
///   process publishes it.
/// - A terminal event (completed, failed, cancelled) published when the job's last retained
///   event is terminal too is not added: `publish` answers with that retained event's seq.
///   Only a non-terminal event (a manual retry's `queued` status) opens the way to another end.
///   So a publish retried after its reply was lost tells the job's end once, not twice.
/// - [`subscribe`](Self::subscribe) first replays the retained events with `seq > after_seq`,
///   then streams live ones: in order, with no gap and no duplicate, even while events are being
///   published during the switch from replay to live.
/// - One process holds a bounded number of backend connections for all its subscribers.
/// - A [`signal_cancel`](Self::signal_cancel) reaches every live
///   [`cancel_signals`](Self::cancel_signals) stream, in every process.
#[async_trait]
pub trait ProgressBus: fmt::Debug + Send + Sync + 'static {
    /// Publishes an event of `job`; returns it with its `seq` and time.
    async fn publish(&self, job: JobId, payload: EventPayload) -> BackendResult<JobEvent>;

    /// Publishes events of `job` in their order, as consecutive calls of
    /// [`publish`](Self::publish) would; returns them with their seqs. Backends that can
    /// publish them in one round trip do (a worker sends a job's queued progress events this
    /// way). On an error, the events before the failing one may have been published.
    async fn publish_many(
        &self,
        job: JobId,
        payloads: Vec<EventPayload>,
    ) -> BackendResult<Vec<JobEvent>> {
        let mut events = Vec::with_capacity(payloads.len());
        for payload in payloads {
            events.push(self.publish(job, payload).await?);
        }
        Ok(events)
    }

    /// The retained events of `job` after `after_seq`, then its live events.
    async fn subscribe(&self, job: JobId, after_seq: u64) -> BackendResult<EventStream>;

    /// Asks whichever worker runs `job` to stop it.
    async fn signal_cancel(&self, job: JobId) -> BackendResult<()>;

    /// Cancel requests from now on, from every process.
    async fn cancel_signals(&self) -> BackendResult<CancelStream>;

    /// Forgets the retained events of `job` (after its retention).
    async fn purge(&self, job: JobId) -> BackendResult<()>;

    /// Deletes up to `limit` retained events published before `before`, of any job, finished
    /// or not, and any other record of the bus older than that (PostgreSQL's cancel requests);
    /// returns how many events went. [`LongJob::purge_expired`](crate::LongJob::purge_expired)
    /// calls it with the retention's cutoff, in batches, until a batch comes back short.
    ///
    /// The default deletes nothing and returns 0: it suits backends whose records expire on
    /// their own (Redis key expiry) or go with their job (the in-memory bus, whose events
    /// [`purge`](Self::purge) forgets). A bus that wraps another forwards it.
    async fn purge_before(&self, before: DateTime<Utc>, limit: u64) -> BackendResult<u64> {
        let _ = (before, limit);
        Ok(0)
    }

    /// Answers when the backend is reachable.
    async fn health(&self) -> BackendResult<()>;
}
