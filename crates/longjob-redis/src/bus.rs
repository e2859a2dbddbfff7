//! [`RedisProgressBus`]: a list of events per job for replay, pub/sub for live delivery.
//!
//! Keys (all under the prefix's hash tag):
//! - `evl:<id>`: the job's events, a list: its first element is the number of events trimmed
//!   from its front (`0` until the list passes twice
//!   [`RedisConfig::event_retention`](crate::RedisConfig), at least 64), then one element per
//!   event, its JSON without `seq`, which the position gives, nor `jobId` (see [`crate::wire`]):
//!   the element at index `i` has seq `trimmed + i`. `RPUSHX`'s answer numbers a new event;
//!   the first element is read only for a list of more than 64 events, since a trimmed list
//!   always holds more.
//! - `ev:<id>`: the stream that held a job's events before the list (a one-entry stream takes
//!   4.7 KB, since Redis allocates a stream node of 4 KB up front, against about 200 bytes for a
//!   list); a job whose events are already in one keeps it: ids `0-<seq>` (`XADD … 0-*`), or
//!   `<seq>-0` with a counter key `ev:<id>:seq` in the oldest scheme;
//! - channel `ev:<id>:live`: the events as published, for subscribers in every process: one
//!   event's JSON without its job id, or, for several events of the job published together, the
//!   first one's seq, then each event's body (as in the list), one per line;
//! - channel `cancel`: cancel requests.
//!
//! After a job's terminal event, its events expire with the finished-job retention.

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
use crate::script::ScriptCall;
use crate::{BACKEND, Redis, millis, wire};

/// Events read per page of a job's list (or old stream).
const PAGE: usize = 500;

/// A list never trimmed holds at most this many events, and a trimmed one always more: the
/// trimmed count is read only past it. Never raise it: lists trimmed under a smaller floor
/// would pass for untrimmed ones.
const LIST_FLOOR: usize = 64;

/// Publishes many events. ARGV: base, events kept after a trim (at least [`LIST_FLOOR`]), the
/// stream cap for jobs still on a stream, then runs of consecutive events of one job, each as:
/// job id, expiry ms of its last event (0: leave as is; -1: keep for good, for a job queued
/// again, whose keys may be expiring after an earlier end; the events before it all leave the
/// expiry as is), its number of events, then each event's body ([`crate::wire::body`]).
/// Returns each run's first seq: a run's events are numbered one after another (one value a
/// run rather than one an event, since a client parses each value of a reply apart).
///
/// A run takes one `RPUSHX` and one `PUBLISH` however many events it holds (Lua's cost is per
/// call): a run of one event is published as the event's JSON, a longer one as
/// `<first seq>\n<body>\n<body>…` (see [`crate::hub`]).
///
/// A terminal event (the last of its run, since it sets the expiry) that is alone in its run
/// and finds the job's last listed event terminal is not added nor published: it answers with
/// that event's seq (jobs still on a stream of an earlier version are not checked).
///
/// A list of more than twice the kept count is trimmed to one more than it (so a trimmed list
/// holds more than the floor), its first element moved on by as many. A job whose events are in
/// a stream of an earlier version (a key the list's first push finds) keeps the stream: `XADD`
/// with id `0-*` numbers its entries, or, for the oldest streams (ids `<seq>-0`, refusing
/// `0-*`), the counter key.
///
/// The bodies are used as sent, not cut out of the JSON, and a stream's seq stays the string
/// `XADD` returned.
static PUBLISH_MANY: LazyLock<Script> = LazyLock::new(|| {
    let terminal = EventPayload::TERMINAL_TYPE_NAMES.map(|name| format!("{name} = true"));
    let terminal = terminal.join(", ");
    Script::new(&format!(
        r#"
local base, keep, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {{}}

-- Appends ARGV[first..last] to the job's list; returns the first one's seq, the key, and
-- whether the list is new (so it has no expiry to look at).
local function list_append(id, first, last)
  local key = base .. 'evl:' .. id
  local n = redis.call('RPUSHX', key, unpack(ARGV, first, last))
  if n == 0 then
    if redis.call('EXISTS', base .. 'ev:' .. id) == 1 then return nil, nil end
    redis.call('RPUSH', key, '0', unpack(ARGV, first, last))
    return 1, key, true
  end
  local held = n - 1
  local seq = held - (last - first)
  if held <= {LIST_FLOOR} then return seq, key end
  local trimmed = tonumber(redis.call('LINDEX', key, 0))
  if held > 2 * keep then
    redis.call('LPOP', key)
    redis.call('LTRIM', key, -(keep + 1), -1)
    redis.call('LPUSH', key, trimmed + held - keep - 1)
  end
  return trimmed + seq, key
end

local function stream_append(id, body, expiry)
  local key = base .. 'ev:' .. id
  local added = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, '0-*', 'e', body)
  if type(added) ~= 'table' or not added.err then return string.sub(added, 3), key end
  local seqkey = key .. ':seq'
  local seq = redis.call('INCR', seqkey)
  local ok = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, seq .. '-0', 'e', '{{"seq":' .. seq .. body)
  if type(ok) == 'table' and ok.err then
    -- The counter is behind the stream (it was lost): continue after the stream's last entry.
    local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
    seq = tonumber(string.match(last[1][1], '^(%d+)')) + 1
    redis.call('SET', seqkey, seq)
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, seq .. '-0', 'e', '{{"seq":' .. seq .. body)
  end
  if expiry ~= '0' then
    if expiry ~= '-1' then redis.call('PEXPIRE', seqkey, expiry) else redis.call('PERSIST', seqkey) end
  end
  return seq, key
end

-- The seq of the job's last listed event when it is terminal (the job's end is told), else nil.
local terminal = {{ {terminal} }}
local function told_end(id)
  local key = base .. 'evl:' .. id
  local last = redis.call('LINDEX', key, -1)
  if not last then return nil end
  -- JobEvent's field order (seq, jobId, at, type), in a body without its jobId or, written by
  -- an earlier version, with it; the kit's told-once case fails if the order moves.
  local kind = string.match(last, '^,"at":"[^"]*","type":"(%a+)"')
    or string.match(last, '^,"jobId":"[^"]*","at":"[^"]*","type":"(%a+)"')
  if not terminal[kind] then return nil end
  local held = redis.call('LLEN', key) - 1
  if held > {LIST_FLOOR} then return tonumber(redis.call('LINDEX', key, 0)) + held end
  return held
end

-- Appends a run (a job's events ARGV[first..last]), publishes it and adds its first seq to `out`.
local function append_run(id, expiry, first, last)
  local channel = base .. 'ev:' .. id .. ':live'
  local seq, key, fresh = list_append(id, first, last)
  if seq then
    -- Written with '%d': Lua's own number-to-string is a float format (`%.14g`), several
    -- times dearer, and it would print a seq past 10^14 with an exponent.
    if first == last then
      redis.call('PUBLISH', channel, '{{"seq":' .. string.format('%d', seq) .. ARGV[first])
    else
      -- The run's length, read already, gives way to its first seq: one concatenation, so
      -- the message is built (and hashed, as Lua does every string) once.
      ARGV[first - 1] = string.format('%d', seq)
      redis.call('PUBLISH', channel, table.concat(ARGV, '\n', first - 1, last))
    end
    out[#out + 1] = seq
  else
    for j = first, last do
      local exp = '0'
      if j == last then exp = expiry end
      seq, key = stream_append(id, ARGV[j], exp)
      redis.call('PUBLISH', channel, '{{"seq":' .. seq .. ARGV[j])
      if j == first then out[#out + 1] = seq end
    end
  end
  if expiry ~= '0' then
    if expiry ~= '-1' then
      redis.call('PEXPIRE', key, expiry)
    elseif not fresh and redis.call('PTTL', key) >= 0 then
      -- A manual retry after the job finished: keep its events again.
      redis.call('PERSIST', key)
    end
  end
end

local i = 4
while i <= #ARGV do
  local id, expiry = ARGV[i], ARGV[i + 1]
  local first = i + 3
  -- The expiry is tested as the text the client writes ('0', '-1' or a positive count of
  -- ms), and the run's length converted by arithmetic: `tonumber` converts a string twice
  -- (Lua 5.1's tests it, then converts it), a `strtod` each, eight a job in all before.
  local last = i + 2 + ARGV[i + 2]
  -- A terminal event (always its run's last: the only one to expire the job's keys) alone in
  -- its run may repeat the job's told end: then it is not added, and answers with that seq.
  local told = nil
  if first == last and expiry ~= '0' and expiry ~= '-1' then told = told_end(id) end
  if told then out[#out + 1] = told else append_run(id, expiry, first, last) end
  i = last + 1
end
return out
"#
    ))
});

/// KEYS: the job's list. ARGV: after seq, most events. Returns nil when the job has no list,
/// else the seq of the first event returned (as a string), then the events (JSON without seq);
/// just `'0'` when no event follows that seq.
static LIST_RANGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"
local n = redis.call('LLEN', KEYS[1])
if n == 0 then return false end
local trimmed = 0
if n - 1 > {LIST_FLOOR} then trimmed = tonumber(redis.call('LINDEX', KEYS[1], 0)) end
local first = tonumber(ARGV[1]) - trimmed + 1
-- Past the end (any seq a client asks after): nothing, and no index too large for LRANGE.
if first >= n then return {{'0'}} end
if first < 1 then first = 1 end
local out = redis.call('LRANGE', KEYS[1], first, first + tonumber(ARGV[2]) - 1)
table.insert(out, 1, string.format('%d', trimmed + first))
return out
"
    ))
});

/// Most events gathered into one script call. Larger than the other batches: a worker's jobs
/// send their progress events in groups (ten or more a job), and each script call costs about
/// 26 µs of Redis's time beyond its events: a batch of 64 events held only about five jobs.
const PUBLISH_BATCH: usize = 512;

/// A [`ProgressBus`] on Redis. Build it with [`Redis::bus`] or [`RedisProgressBus::connect`].
///
/// However many subscribers a process has, live events reach them through the one subscriber
/// connection of its [`Redis`] handle; each subscriber replays the job's retained events, and
/// repairs gaps (after a reconnection, or when it lags) from them too.
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

    fn list_key(&self, job: JobId) -> String {
        self.redis.shared.keys.key(&format!("evl:{job}"))
    }

    /// Up to [`PAGE`] retained events after `after`, and whether the page was full.
    async fn fetch(&self, job: JobId, after: u64) -> BackendResult<(VecDeque<JobEvent>, bool)> {
        let key = self.list_key(job);
        let listed: Option<Vec<String>> = self
            .redis
            .shared
            .run(|mut c| {
                let mut call = ScriptCall::new(&LIST_RANGE, &[&key]);
                call.arg(after).arg(PAGE);
                async move { call.invoke(&mut c).await }
            })
            .await?;
        match listed {
            Some(listed) => from_list(job, listed),
            None => self.fetch_stream(job, after).await,
        }
    }

    /// [`fetch`](Self::fetch) for a job whose events are in a stream of an earlier version.
    async fn fetch_stream(
        &self,
        job: JobId,
        after: u64,
    ) -> BackendResult<(VecDeque<JobEvent>, bool)> {
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
            // Entries `0-<seq>` hold the event's body; earlier ones hold it numbered.
            let event = match id.strip_prefix("0-").map(str::parse) {
                Some(Ok(seq)) => wire::decode(job, seq, body),
                Some(Err(_)) => Err(format!("an entry id {id} without a seq")),
                None => wire::decode_numbered(job, body),
            }
            .map_err(|e| BackendError::corrupt(BACKEND, e))?;
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

/// The events of a [`LIST_RANGE`] answer (the first one's seq, then the events without theirs),
/// and whether the page was full.
fn from_list(job: JobId, listed: Vec<String>) -> BackendResult<(VecDeque<JobEvent>, bool)> {
    if listed.len() <= 1 {
        // Nothing after the seq asked for (the script then gives no first seq to read).
        return Ok((VecDeque::new(), false));
    }
    let mut listed = listed.into_iter();
    let first: u64 = listed
        .next()
        .and_then(|seq| seq.parse().ok())
        .ok_or_else(|| BackendError::corrupt(BACKEND, "event list without a first seq"))?;
    let mut events = VecDeque::with_capacity(listed.len());
    for (seq, body) in (first..).zip(listed) {
        let event = wire::decode(job, seq, &body).map_err(|e| BackendError::corrupt(BACKEND, e))?;
        events.push_back(event);
    }
    let full = events.len() >= PAGE;
    Ok((events, full))
}

/// One subscriber's state.
struct Subscription {
    bus: RedisProgressBus,
    job: JobId,
    last: u64,
    replay: VecDeque<JobEvent>,
    /// Retained events after `last` may exist that are not in `replay`: read them.
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
                    // A gap: fill it from the retained events; if they lost it too, skip it.
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
    let mut call = ScriptCall::new(&PUBLISH_MANY, &[]);
    call.arg(redis.shared.keys.base())
        .arg(config.event_retention.max(LIST_FLOOR))
        .arg(config.event_retention.max(1));
    // Consecutive events of one job form a run, which ends with the first event that sets the
    // expiry; a run's header (id, expiry, length) is written once its length is known.
    let mut runs: Vec<(JobId, i64, Vec<String>)> = Vec::new();
    for event in &events {
        let body = wire::body(event)?;
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
        match runs.last_mut() {
            Some((job, run_expiry, bodies)) if *job == event.job_id && *run_expiry == 0 => {
                *run_expiry = expiry;
                bodies.push(body);
            }
            _ => runs.push((event.job_id, expiry, vec![body])),
        }
    }
    for (job, expiry, bodies) in &runs {
        call.id(*job).arg(expiry).arg(bodies.len()).arg(bodies);
    }
    let firsts: Vec<u64> = redis
        .shared
        .run(|mut c| async move { call.invoke(&mut c).await })
        .await?;
    if firsts.len() != runs.len() {
        return Err(BackendError::corrupt(
            BACKEND,
            format!(
                "{} runs of events answered {} seqs",
                runs.len(),
                firsts.len()
            ),
        ));
    }
    let mut numbered = events.iter_mut();
    for ((_, _, bodies), first) in runs.iter().zip(firsts) {
        for (event, seq) in numbered.by_ref().zip(first..).take(bodies.len()) {
            event.seq = seq;
        }
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
        // Join the live channel first, then read the retained events: nothing falls in between.
        let (live, membership) = self
            .redis
            .shared
            .hub
            .join(&self.key(job, ":live"), job)
            .await?;
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
        let keys = [self.list_key(job), self.key(job, ":seq"), self.key(job, "")];
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
