//! [`RedisProgressBus`]: per-job capped streams for replay, pub/sub for live delivery.
//!
//! Keys (all under the prefix's hash tag):
//! - `ev:<id>`: a stream capped at about [`RedisConfig::event_retention`](crate::RedisConfig)
//!   entries, whose entry ids are `0-<seq>`: `XADD … 0-*` numbers a job's events (Redis keeps the
//!   last number across trims), and `XRANGE` after a seq is direct. Streams of earlier versions
//!   have ids `<seq>-0` and a counter key `ev:<id>:seq`; they keep that scheme;
//! - channel `ev:<id>:live`: each event as published, for subscribers in every process;
//! - channel `cancel`: cancel requests.
//!
//! After a job's terminal event, its event stream expires with the finished-job retention.

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use chrono::Utc;
use futures::StreamExt;
use longjob_core::batch::Batcher;
use longjob_core::bus::{CancelStream, EventStream};
use longjob_core::{
    BackendError, BackendResult, EventPayload, JobEvent, JobId, JobState, ProgressBus,
};
use redis::Script;
use tokio::sync::broadcast;

use crate::hub::{Live, Membership};
use crate::{BACKEND, Redis, millis};

/// The serialized event starts with this (`seq` is the first field of [`JobEvent`]); the script
/// gets the rest, from the comma on, and puts the real sequence number in front.
const SEQ_PLACEHOLDER: &str = "{\"seq\":0,";

/// Events read per `XRANGE` page.
const PAGE: usize = 500;

/// Publishes many events. ARGV: base, max length, then per event 3 values: job id, event JSON
/// without its `{"seq":0` start (so from the comma on), expiry ms (0: leave as is; -1: keep for
/// good, for a job queued again, whose keys may be expiring after an earlier end). Returns each
/// event's seq.
///
/// The job's stream numbers its events: `XADD` with id `0-*` gives the entry the next sequence
/// number (`0-1`, `0-2`, …, kept by Redis across trims), and the entry holds the event without
/// its seq. Streams written by earlier versions (ids `<seq>-0`, with a counter key
/// `ev:<id>:seq`) refuse `0-*`; their jobs keep the counter scheme.
///
/// Seqs stay strings on the common path (Lua numbers are floats: formatting one into the
/// published message costs a `printf`), and the body is used as sent, not cut out of the JSON.
static PUBLISH_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local base, maxlen = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 3 do
  local key = base .. 'ev:' .. ARGV[i]
  local body = ARGV[i + 1]
  local expiry = ARGV[i + 2]
  local seq
  local added = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, '0-*', 'e', body)
  if type(added) == 'table' and added.err then
    local seqkey = key .. ':seq'
    seq = redis.call('INCR', seqkey)
    local ok = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, seq .. '-0', 'e', '{"seq":' .. seq .. body)
    if type(ok) == 'table' and ok.err then
      -- The counter is behind the stream (it was lost): continue after the stream's last entry.
      local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
      seq = tonumber(string.match(last[1][1], '^(%d+)')) + 1
      redis.call('SET', seqkey, seq)
      redis.call('XADD', key, 'MAXLEN', '~', maxlen, seq .. '-0', 'e', '{"seq":' .. seq .. body)
    end
    if expiry ~= '0' then
      if tonumber(expiry) > 0 then redis.call('PEXPIRE', seqkey, expiry) else redis.call('PERSIST', seqkey) end
    end
  else
    seq = string.sub(added, 3)
  end
  redis.call('PUBLISH', key .. ':live', '{"seq":' .. seq .. body)
  if expiry ~= '0' then
    if tonumber(expiry) > 0 then
      redis.call('PEXPIRE', key, expiry)
    elseif redis.call('PTTL', key) >= 0 then
      -- A manual retry after the job finished: keep its events again.
      redis.call('PERSIST', key)
    end
  end
  out[#out + 1] = seq
end
return out
"#,
    )
});

/// Most events gathered into one script call.
const PUBLISH_BATCH: usize = 64;

/// A [`ProgressBus`] on Redis. Build it with [`Redis::bus`] or [`RedisProgressBus::connect`].
///
/// However many subscribers a process has, live events reach them through the one subscriber
/// connection of its [`Redis`] handle; each subscriber replays from the job's stream, and
/// repairs gaps (after a reconnection, or when it lags) from the stream too.
///
/// ```no_run
/// # async fn demo() -> Result<(), longjob_core::BackendError> {
/// use futures::StreamExt;
/// use longjob_core::{EventPayload, JobId, ProgressBus};
/// use longjob_redis::{RedisConfig, RedisProgressBus};
///
/// let bus = RedisProgressBus::connect(RedisConfig::new("redis://127.0.0.1:6379")).await?;
/// let job = JobId::new();
/// let mut events = bus.subscribe(job, 0).await?;
/// bus.publish(job, EventPayload::Cancelled {}).await?;
/// let first = events.next().await.transpose()?;
/// assert_eq!(first.map(|e| e.seq), Some(1));
/// # Ok(())
/// # }
/// ```
///
/// Concurrent [`publish`](ProgressBus::publish)es are gathered into one script call
/// ([`Batcher`]), in the order the calls were made (one inbox, one batch in flight).
#[derive(Debug, Clone)]
pub struct RedisProgressBus {
    redis: Redis,
    publishes: Arc<Batcher<JobEvent, JobEvent>>,
}

impl RedisProgressBus {
    /// The bus of `redis`.
    pub fn new(redis: Redis) -> Self {
        let publishes = Arc::new(Batcher::new(BACKEND, PUBLISH_BATCH, 1, {
            let redis = redis.clone();
            move |events| publish_many(redis.clone(), events)
        }));
        Self { redis, publishes }
    }

    /// Connects to Redis and returns its bus.
    pub async fn connect(config: crate::RedisConfig) -> BackendResult<Self> {
        Ok(Redis::connect(config).await?.bus())
    }

    fn key(&self, job: JobId, suffix: &str) -> String {
        self.redis.shared.keys.key(&format!("ev:{job}{suffix}"))
    }

    /// Up to [`PAGE`] retained events after `after`, and whether the page was full.
    async fn fetch(&self, job: JobId, after: u64) -> BackendResult<(VecDeque<JobEvent>, bool)> {
        let mut entries = self
            .range(job, format!("0-{}", after.saturating_add(1)))
            .await?;
        if entries.first().is_some_and(|(id, _)| !id.starts_with("0-")) {
            // A stream of the earlier scheme (ids `<seq>-0`, which sort after every `0-…`).
            entries = self
                .range(job, format!("{}-0", after.saturating_add(1)))
                .await?;
        }
        let full = entries.len() >= PAGE;
        let mut events = VecDeque::with_capacity(entries.len());
        for (id, fields) in entries {
            let body = fields
                .get(1)
                .ok_or_else(|| BackendError::corrupt(BACKEND, "event entry without body"))?;
            // Entries `0-<seq>` hold the event without its seq; earlier ones hold it whole.
            let event: JobEvent = match id.strip_prefix("0-") {
                Some(seq) => serde_json::from_str(&format!("{{\"seq\":{seq}{body}")),
                None => serde_json::from_str(body),
            }
            .map_err(|e| BackendError::corrupt(BACKEND, format!("event {id}: {e}")))?;
            events.push_back(event);
        }
        Ok((events, full))
    }

    /// Up to [`PAGE`] entries of the job's stream from `start` on.
    async fn range(&self, job: JobId, start: String) -> BackendResult<Vec<(String, Vec<String>)>> {
        let key = self.key(job, "");
        self.redis
            .shared
            .run(|mut c| async move {
                redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(PAGE)
                    .query_async(&mut c)
                    .await
            })
            .await
    }
}

/// One subscriber's state.
struct Subscription {
    bus: RedisProgressBus,
    job: JobId,
    last: u64,
    replay: VecDeque<JobEvent>,
    /// Retained events after `last` may exist that are not in `replay`: read the stream.
    more: bool,
    live: broadcast::Receiver<Live>,
    _membership: Membership,
}

impl Subscription {
    async fn next(&mut self) -> Option<BackendResult<JobEvent>> {
        loop {
            if let Some(event) = self.replay.pop_front() {
                if event.seq <= self.last {
                    continue;
                }
                self.last = event.seq;
                return Some(Ok(event));
            }
            if self.more {
                match self.bus.fetch(self.job, self.last).await {
                    Ok((events, full)) => {
                        self.replay = events;
                        self.more = full;
                    }
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            match self.live.recv().await {
                Ok(Live::Event(event)) if event.seq <= self.last => {}
                Ok(Live::Event(event)) if event.seq == self.last + 1 => {
                    self.last = event.seq;
                    return Some(Ok(event));
                }
                Ok(Live::Event(event)) => {
                    // A gap: fill it from the stream; if the stream lost it too, skip it.
                    match self.bus.fetch(self.job, self.last).await {
                        Ok((mut events, full)) => {
                            if events.front().is_none_or(|e| e.seq > event.seq) {
                                events.push_front(event);
                            }
                            self.replay = events;
                            self.more = full;
                        }
                        Err(e) => {
                            self.more = true;
                            return Some(Err(e));
                        }
                    }
                }
                Ok(Live::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.more = true;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Publishes a batch of events (`seq` 0) in one script call; answers them with their `seq`.
async fn publish_many(
    redis: Redis,
    mut events: Vec<JobEvent>,
) -> BackendResult<Vec<BackendResult<JobEvent>>> {
    let config = &redis.shared.config;
    let mut inv = PUBLISH_MANY.prepare_invoke();
    inv.arg(redis.shared.keys.base())
        .arg(config.event_retention.max(1));
    for event in &events {
        let json = serde_json::to_string(event).map_err(|e| BackendError::corrupt(BACKEND, e))?;
        if !json.starts_with(SEQ_PLACEHOLDER) {
            return Err(BackendError::corrupt(
                BACKEND,
                "an event does not serialize with seq first",
            ));
        }
        let expiry = if event.is_terminal() {
            i64::try_from(millis(config.finished_retention))
                .unwrap_or(i64::MAX)
                .max(1)
        } else if matches!(
            event.payload,
            EventPayload::Status {
                status: JobState::Queued,
                ..
            }
        ) {
            -1
        } else {
            0
        };
        let body = &json[SEQ_PLACEHOLDER.len() - 1..];
        inv.arg(event.job_id.to_string()).arg(body).arg(expiry);
    }
    let seqs: Vec<u64> = redis
        .shared
        .run(|mut c| async move { inv.invoke_async(&mut c).await })
        .await?;
    if seqs.len() != events.len() {
        return Err(BackendError::corrupt(
            BACKEND,
            format!("{} publishes answered {} seqs", events.len(), seqs.len()),
        ));
    }
    for (event, seq) in events.iter_mut().zip(seqs) {
        event.seq = seq;
    }
    Ok(events.into_iter().map(Ok).collect())
}

#[async_trait]
impl ProgressBus for RedisProgressBus {
    async fn publish(&self, job: JobId, payload: EventPayload) -> BackendResult<JobEvent> {
        let event = JobEvent {
            seq: 0,
            job_id: job,
            at: Utc::now(),
            payload,
        };
        self.publishes.call(event).await
    }

    async fn publish_many(
        &self,
        job: JobId,
        payloads: Vec<EventPayload>,
    ) -> BackendResult<Vec<JobEvent>> {
        let at = Utc::now();
        let events = payloads
            .into_iter()
            .map(|payload| JobEvent {
                seq: 0,
                job_id: job,
                at,
                payload,
            })
            .collect();
        // One group: one script call numbers them in order.
        self.publishes
            .call_many(events)
            .await?
            .into_iter()
            .collect()
    }

    async fn subscribe(&self, job: JobId, after_seq: u64) -> BackendResult<EventStream> {
        // Join the live channel first, then read the stream: nothing falls in between.
        let (live, membership) = self.redis.shared.hub.join(&self.key(job, ":live")).await?;
        let subscription = Subscription {
            bus: self.clone(),
            job,
            last: after_seq,
            replay: VecDeque::new(),
            more: true,
            live,
            _membership: membership,
        };
        Ok(futures::stream::unfold(subscription, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        })
        .boxed())
    }

    async fn signal_cancel(&self, job: JobId) -> BackendResult<()> {
        let channel = self.redis.shared.hub.cancel_channel().to_owned();
        let id = job.to_string();
        self.redis
            .shared
            .run(|mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(&id)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    async fn cancel_signals(&self) -> BackendResult<CancelStream> {
        let rx = self.redis.shared.hub.dispatch.cancels.subscribe();
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(job) => return Some((Ok(job), rx)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "cancel signals lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed())
    }

    async fn purge(&self, job: JobId) -> BackendResult<()> {
        let keys = [self.key(job, ":seq"), self.key(job, "")];
        self.redis
            .shared
            .run(|mut c| async move {
                redis::cmd("DEL")
                    .arg(&keys[..])
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    async fn health(&self) -> BackendResult<()> {
        self.redis.shared.ping().await
    }
}
