//! [`PgProgressBus`]: the [`ProgressBus`] on PostgreSQL.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use longjob_core::bus::{CancelStream, EventStream};
use longjob_core::{BackendError, BackendResult, EventPayload, JobEvent, JobId, ProgressBus};
use sqlx::types::Json;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::db::Db;
use crate::error::BACKEND;
use crate::hub::{CancelNotice, Hub, Live};
use longjob_core::batch::Batcher;

/// Most operations gathered in one statement.
const MAX_BATCH: usize = 256;
/// Events read from the table per query.
const PAGE: i64 = 1000;
/// Cancel requests looked at again on a resync, below the highest one seen (commits may land
/// out of id order).
const CANCEL_WINDOW: i64 = 1000;
/// Pause after a failed read in a stream, so a consumer that keeps polling a stream whose
/// database is down does not spin.
const ERROR_PAUSE: Duration = Duration::from_millis(250);

/// The [`ProgressBus`] on PostgreSQL.
///
/// - [`publish`](ProgressBus::publish) is one statement: it bumps the job's counter row in
///   `job_event_heads` (which assigns the next `seq` atomically, whichever process publishes),
///   stores the event in `job_events` for replay, and sends it by `NOTIFY`.
/// - Every subscriber of the process shares the backend's one `LISTEN` connection; events are
///   routed in process to the subscribers of their job. A subscriber that sees a gap, lags, or
///   hears that the listener reconnected reads the missing events from the table; with
///   notifications off it reads the table every [`poll_interval`](crate::PgConfig::poll_interval).
/// - Cancel requests are rows of `cancel_requests`, announced by `NOTIFY`.
///
/// Get one from [`PgBackend::bus`](crate::PgBackend::bus).
#[derive(Debug, Clone)]
pub struct PgProgressBus {
    db: Arc<Db>,
    hub: Option<Arc<Hub>>,
    sql: Arc<Sql>,
    publishes: Arc<Batcher<(JobId, EventPayload), JobEvent>>,
}

#[derive(Debug)]
struct Sql {
    publish: String,
    replay: String,
    purge: String,
    cancel: String,
    cancel_max: String,
    cancels_after: String,
    purge_events_before: String,
    purge_cancels_before: String,
}

impl Sql {
    fn new(db: &Db) -> Self {
        let (notify_event, notify_none, notify_cancel) = if db.notifications {
            (
                format!(
                    // The event's JSON is put together as text around the payload's JSON as
                    // the client sent it (an object, never empty: it has its `type`), with no
                    // JSON value built nor printed: that cost 5 µs an event, about as much as
                    // storing it.
                    ", length(pg_notify('{}', n.job_id::text || ':' || n.seq::text || ':' || \
                       CASE WHEN octet_length(n.payload) < 7000 \
                         THEN '{{\"seq\":' || n.seq::text || ',\"jobId\":\"' || n.job_id::text \
                           || '\",\"at\":' || to_json(n.at)::text || ',' || substr(n.payload, 2) \
                         ELSE '' END)::text)",
                    db.events_channel()
                ),
                ", 0",
                format!(
                    ", length(pg_notify('{}', $1::text || ':' || id::text)::text)",
                    db.cancel_channel()
                ),
            )
        } else {
            (String::new(), "", String::new())
        };
        let terminal = EventPayload::TERMINAL_TYPE_NAMES.map(|name| format!("'{name}'"));
        let terminal = terminal.join(", ");
        Self {
            // Many events (of one job or several) in one statement. $1/$2: each job of the
            // batch once, in id order, with its number of events; $3/$4/$5/$6: the events in
            // call order, each with how many events of its job follow it in the batch, and
            // whether it is a terminal event that comes first of its job in the batch. Such an
            // event is not stored when the job's last stored event is terminal too (`told`):
            // it answers with that event's seq. Each job's counter row moves by its number of
            // events stored (an upsert, whose arbiter index is always used whatever the table's
            // size; rows locked in job order, so concurrent batches never deadlock), so the
            // events get consecutive seqs in call order; they are stored, and notified in seq
            // order.
            publish: db.sql(&format!(
                "WITH ev AS (SELECT * FROM unnest($3::uuid[], $4::int8[], $5::text[], $6::bool[]) \
                   WITH ORDINALITY AS e(job_id, after, payload, check_told, ord)), \
                 told AS (SELECT ev.ord, ev.job_id, t.seq, t.at FROM ev CROSS JOIN LATERAL \
                   (SELECT l.seq, l.at, l.payload->>'type' AS kind FROM {{s}}.job_events l \
                     WHERE l.job_id = ev.job_id ORDER BY l.seq DESC LIMIT 1) t \
                   WHERE ev.check_told AND t.kind IN ({terminal})), \
                 head AS (INSERT INTO {{s}}.job_event_heads AS h (job_id, last_seq) \
                   SELECT * FROM (SELECT c.job_id, \
                       c.n - (SELECT count(*) FROM told WHERE told.job_id = c.job_id) AS n \
                     FROM unnest($1::uuid[], $2::int8[]) AS c(job_id, n)) c \
                   WHERE c.n > 0 ORDER BY job_id \
                   ON CONFLICT (job_id) DO UPDATE SET last_seq = h.last_seq + excluded.last_seq \
                   RETURNING job_id, last_seq), \
                 numbered AS (SELECT e.ord, e.job_id, e.payload, now() AS at, \
                   head.last_seq - e.after AS seq \
                   FROM ev e JOIN head USING (job_id) \
                   WHERE NOT EXISTS (SELECT 1 FROM told WHERE told.ord = e.ord)), \
                 ins AS (INSERT INTO {{s}}.job_events (job_id, seq, at, payload) \
                   SELECT job_id, seq, at, payload::jsonb FROM numbered) \
                 SELECT n.ord, n.seq, n.at{notify_event} \
                 FROM (SELECT * FROM numbered ORDER BY job_id, seq) n \
                 UNION ALL SELECT ord, seq, at{notify_none} FROM told"
            )),
            replay: db.sql(
                "SELECT seq, at, payload FROM {s}.job_events \
                 WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            ),
            purge: db.sql(
                "WITH e AS (DELETE FROM {s}.job_events WHERE job_id = $1) \
                 DELETE FROM {s}.job_event_heads WHERE job_id = $1",
            ),
            cancel: db.sql(&format!(
                "WITH c AS (INSERT INTO {{s}}.cancel_requests (job_id) VALUES ($1) RETURNING id) \
                 SELECT id{notify_cancel} FROM c"
            )),
            cancel_max: db.sql("SELECT coalesce(max(id), 0) FROM {s}.cancel_requests"),
            cancels_after: db.sql(
                "SELECT id, job_id FROM {s}.cancel_requests WHERE id > $1 ORDER BY id LIMIT 1000",
            ),
            purge_events_before: db.sql(
                "DELETE FROM {s}.job_events WHERE (job_id, seq) IN \
                 (SELECT job_id, seq FROM {s}.job_events WHERE at < $1 LIMIT $2)",
            ),
            purge_cancels_before: db.sql("DELETE FROM {s}.cancel_requests WHERE at < $1"),
        }
    }
}

impl PgProgressBus {
    pub(crate) fn new(db: Arc<Db>, hub: Option<Arc<Hub>>) -> Self {
        let sql = Arc::new(Sql::new(&db));
        let publishes = Arc::new(Batcher::new(BACKEND, MAX_BATCH, db.batch_in_flight, {
            let (db, sql) = (Arc::clone(&db), Arc::clone(&sql));
            move |events| publish_many(Arc::clone(&db), Arc::clone(&sql), events)
        }));
        Self {
            db,
            hub,
            sql,
            publishes,
        }
    }

    /// Deletes up to `limit` retained events published before `before` (and every cancel
    /// request older than that); returns how many events went. It is this bus's
    /// [`ProgressBus::purge_before`], which `LongJob::purge_expired` calls with the retention's
    /// cutoff (the worker's purge loop runs it); [`purge`](ProgressBus::purge) forgets one job's
    /// events at once.
    pub async fn purge_events_before(
        &self,
        before: DateTime<Utc>,
        limit: u64,
    ) -> BackendResult<u64> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let done = self
            .db
            .run(
                sqlx::query(&self.sql.purge_events_before)
                    .bind(before)
                    .bind(limit)
                    .execute(&self.db.pool),
            )
            .await?;
        self.db
            .run(
                sqlx::query(&self.sql.purge_cancels_before)
                    .bind(before)
                    .execute(&self.db.pool),
            )
            .await?;
        Ok(done.rows_affected())
    }

    async fn replay(&self, job: JobId, after: u64) -> BackendResult<Vec<JobEvent>> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows: Vec<(i64, DateTime<Utc>, Json<EventPayload>)> = self
            .db
            .run(
                sqlx::query_as(&self.sql.replay)
                    .bind(job.as_uuid())
                    .bind(after)
                    .bind(PAGE)
                    .fetch_all(&self.db.pool),
            )
            .await?;
        rows.into_iter()
            .map(|(seq, at, payload)| {
                Ok(JobEvent {
                    seq: u64::try_from(seq)
                        .map_err(|_| BackendError::corrupt(BACKEND, "negative seq"))?,
                    job_id: job,
                    at,
                    payload: payload.0,
                })
            })
            .collect()
    }

    async fn cancels_after(&self, after: i64) -> BackendResult<Vec<(i64, JobId)>> {
        let rows: Vec<(i64, Uuid)> = self
            .db
            .run(
                sqlx::query_as(&self.sql.cancels_after)
                    .bind(after)
                    .fetch_all(&self.db.pool),
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, job)| (id, JobId::from_uuid(job)))
            .collect())
    }
}

/// One subscriber's state.
struct Subscription {
    bus: PgProgressBus,
    job: JobId,
    last: u64,
    replay: VecDeque<JobEvent>,
    /// Read the table before waiting (a full page came, a gap was seen, or a read failed).
    refill: bool,
    live: Option<broadcast::Receiver<Live>>,
}

impl Subscription {
    async fn fill(&mut self) -> BackendResult<()> {
        let events = self.bus.replay(self.job, self.last).await?;
        self.refill = events.len() as i64 >= PAGE;
        self.replay = events.into();
        Ok(())
    }

    async fn next(&mut self) -> Option<BackendResult<JobEvent>> {
        loop {
            if let Some(event) = self.replay.pop_front() {
                if event.seq <= self.last {
                    continue;
                }
                self.last = event.seq;
                return Some(Ok(event));
            }
            if self.refill {
                if let Err(e) = self.fill().await {
                    tokio::time::sleep(ERROR_PAUSE).await;
                    return Some(Err(e));
                }
                continue;
            }
            let Some(live) = self.live.as_mut() else {
                tokio::time::sleep(self.bus.db.poll_interval).await;
                self.refill = true;
                continue;
            };
            match live.recv().await {
                Ok(Live::Event(event)) if event.seq <= self.last => {}
                Ok(Live::Event(event)) if event.seq == self.last + 1 => {
                    self.last = event.seq;
                    return Some(Ok(event));
                }
                Ok(Live::Hint(seq)) if seq <= self.last => {}
                // A gap, an event too large for a notification, a lag or a reconnection: the
                // table has everything committed.
                Ok(Live::Event(_) | Live::Hint(_) | Live::Resync)
                | Err(broadcast::error::RecvError::Lagged(_)) => self.refill = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// One cancel stream's state.
struct CancelSubscription {
    bus: PgProgressBus,
    /// Requests at or below this id were made before the stream started.
    floor: i64,
    seen: BTreeSet<i64>,
    pending: VecDeque<JobId>,
    resync: bool,
    live: Option<broadcast::Receiver<CancelNotice>>,
}

impl CancelSubscription {
    fn accept(&mut self, id: i64) -> bool {
        if id <= self.floor || !self.seen.insert(id) {
            return false;
        }
        while self.seen.len() > 4 * CANCEL_WINDOW as usize {
            self.seen.pop_first();
        }
        true
    }

    async fn next(&mut self) -> Option<BackendResult<JobId>> {
        loop {
            if let Some(job) = self.pending.pop_front() {
                return Some(Ok(job));
            }
            if self.resync {
                let max_seen = self.seen.last().copied().unwrap_or(self.floor);
                let from = self.floor.max(max_seen - CANCEL_WINDOW);
                match self.bus.cancels_after(from).await {
                    Ok(rows) => {
                        for (id, job) in rows {
                            if self.accept(id) {
                                self.pending.push_back(job);
                            }
                        }
                        self.resync = false;
                    }
                    Err(e) => {
                        tokio::time::sleep(ERROR_PAUSE).await;
                        return Some(Err(e));
                    }
                }
                continue;
            }
            let Some(live) = self.live.as_mut() else {
                tokio::time::sleep(self.bus.db.poll_interval).await;
                self.resync = true;
                continue;
            };
            match live.recv().await {
                Ok(CancelNotice::Cancel { id, job }) => {
                    if self.accept(id) {
                        return Some(Ok(job));
                    }
                }
                Ok(CancelNotice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.resync = true;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[async_trait]
impl ProgressBus for PgProgressBus {
    async fn publish(&self, job: JobId, payload: EventPayload) -> BackendResult<JobEvent> {
        self.publishes.call((job, payload)).await
    }

    async fn publish_many(
        &self,
        job: JobId,
        payloads: Vec<EventPayload>,
    ) -> BackendResult<Vec<JobEvent>> {
        // One group: one statement numbers them in order, even with batches in flight at once.
        let group = payloads.into_iter().map(|payload| (job, payload)).collect();
        self.publishes.call_many(group).await?.into_iter().collect()
    }

    async fn subscribe(&self, job: JobId, after_seq: u64) -> BackendResult<EventStream> {
        // Listen first, then read the table: an event published in between is seen twice
        // (and dropped by seq), never missed.
        let live = self.hub.as_ref().map(|h| h.subscribe_job(job));
        let mut subscription = Subscription {
            bus: self.clone(),
            job,
            last: after_seq,
            replay: VecDeque::new(),
            refill: false,
            live,
        };
        subscription.fill().await?;
        Ok(futures::stream::unfold(subscription, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        })
        .boxed())
    }

    async fn signal_cancel(&self, job: JobId) -> BackendResult<()> {
        self.db
            .run(
                sqlx::query(&self.sql.cancel)
                    .bind(job.as_uuid())
                    .execute(&self.db.pool),
            )
            .await
            .map(|_| ())
    }

    async fn cancel_signals(&self) -> BackendResult<CancelStream> {
        let live = self.hub.as_ref().map(|h| h.cancels.subscribe());
        let floor: i64 = self
            .db
            .run(sqlx::query_scalar(&self.sql.cancel_max).fetch_one(&self.db.pool))
            .await?;
        let subscription = CancelSubscription {
            bus: self.clone(),
            floor,
            seen: BTreeSet::new(),
            pending: VecDeque::new(),
            resync: false,
            live,
        };
        Ok(futures::stream::unfold(subscription, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        })
        .boxed())
    }

    async fn purge(&self, job: JobId) -> BackendResult<()> {
        self.db
            .run(
                sqlx::query(&self.sql.purge)
                    .bind(job.as_uuid())
                    .execute(&self.db.pool),
            )
            .await
            .map(|_| ())
    }

    /// [`purge_events_before`](PgProgressBus::purge_events_before): up to `limit` events
    /// older than `before`, and every cancel request older than that.
    async fn purge_before(&self, before: DateTime<Utc>, limit: u64) -> BackendResult<u64> {
        self.purge_events_before(before, limit).await
    }

    async fn health(&self) -> BackendResult<()> {
        self.db
            .run(sqlx::query("SELECT 1").execute(&self.db.pool))
            .await
            .map(|_| ())
    }
}

/// Publishes a batch of events in one statement.
///
/// A terminal event right after a terminal event of its job in the batch is not sent: it
/// answers as that one does. The first event of each job in the batch, when terminal, is
/// checked against the job's last stored event in the statement.
async fn publish_many(
    db: Arc<Db>,
    sql: Arc<Sql>,
    events: Vec<(JobId, EventPayload)>,
) -> BackendResult<Vec<BackendResult<JobEvent>>> {
    // For each event, the earlier event of the batch it repeats (if any); for each job, its last
    // event sent and whether that one is terminal.
    let mut last_sent: HashMap<JobId, (usize, bool)> = HashMap::new();
    let mut repeats: Vec<Option<usize>> = Vec::with_capacity(events.len());
    let mut sent: Vec<usize> = Vec::with_capacity(events.len());
    let mut check_told: Vec<bool> = Vec::with_capacity(events.len());
    for (i, (job, payload)) in events.iter().enumerate() {
        let terminal = payload.is_terminal();
        match last_sent.get(job) {
            Some(&(prev, true)) if terminal => repeats.push(Some(prev)),
            seen => {
                repeats.push(None);
                check_told.push(terminal && seen.is_none());
                sent.push(i);
                last_sent.insert(*job, (i, terminal));
            }
        }
    }
    let jobs: Vec<Uuid> = sent.iter().map(|&i| *events[i].0.as_uuid()).collect();
    // Grouped here rather than in SQL: each job's number of events, and for each event how
    // many of its job's follow it (its seq is then the job's new last seq minus that).
    let mut counts: BTreeMap<Uuid, i64> = BTreeMap::new();
    for job in &jobs {
        *counts.entry(*job).or_default() += 1;
    }
    let mut left = counts.clone();
    let after: Vec<i64> = jobs
        .iter()
        .map(|job| {
            let n = left.entry(*job).or_default();
            *n -= 1;
            *n
        })
        .collect();
    let (heads, head_counts): (Vec<Uuid>, Vec<i64>) = counts.into_iter().unzip();
    let payloads = sent
        .iter()
        .map(|&i| serde_json::to_string(&events[i].1))
        .collect::<Result<Vec<String>, _>>()
        .map_err(|e| BackendError::corrupt(BACKEND, e))?;
    let rows: Vec<(i64, i64, DateTime<Utc>)> = db
        .run(
            sqlx::query_as(&sql.publish)
                .bind(heads)
                .bind(head_counts)
                .bind(jobs)
                .bind(after)
                .bind(payloads)
                .bind(check_told)
                .fetch_all(&db.relaxed),
        )
        .await?;
    let mut stamped: Vec<Option<(u64, DateTime<Utc>)>> = vec![None; events.len()];
    for (ord, seq, at) in rows {
        let index = usize::try_from(ord - 1).ok().and_then(|k| sent.get(k));
        if let (Some(&index), Ok(seq)) = (index, u64::try_from(seq)) {
            stamped[index] = Some((seq, at));
        }
    }
    for (i, repeat) in repeats.iter().enumerate() {
        if let Some(prev) = *repeat {
            stamped[i] = stamped[prev];
        }
    }
    Ok(events
        .into_iter()
        .zip(stamped)
        .map(|((job_id, payload), stamp)| match stamp {
            Some((seq, at)) => Ok(JobEvent {
                seq,
                job_id,
                at,
                payload,
            }),
            None => Err(BackendError::corrupt(BACKEND, "an event was not stored")),
        })
        .collect())
}
