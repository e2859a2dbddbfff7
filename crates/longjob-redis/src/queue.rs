//! [`RedisQueue`]: leased delivery of job ids, one Lua script per operation (acks of many
//! leases gathered into one).
//!
//! Keys (all under the prefix's hash tag):
//! - `q:waiting`: sorted set of waiting job ids scored by due time (ms, Redis clock);
//! - `q:leased`: sorted set of leased job ids scored by lease expiry (ms);
//! - `q:tokens`: hash job id → fencing token of its current lease, plus one field `~` that
//!   keeps it a hash table (see the claim script);
//! - `q:seq`: the fencing token counter (`INCR`, monotonic for the life of the data);
//! - `q:lost`: set of waiting job ids whose last lease expired, until they are claimed or pushed
//!   (their leases say [`redelivered`](Lease::redelivered));
//! - channel `q:wake`: published on every push, so waiting claimers wake at once.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use longjob_core::batch::Batcher;
use longjob_core::queue::{Lease, QueueStats};
use longjob_core::{BackendError, BackendResult, JobId, Queue};
use redis::Script;
use tokio::time::Instant;

use crate::script::ScriptCall;
use crate::{BACKEND, Redis, millis};

/// The Redis clock in ms, as a Lua prelude.
const NOW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Lua helpers for scripts that touch many members: each Redis call takes up to [`CHUNK`]
/// members at once (one call per chunk rather than one per job: Lua's cost is per call), and
/// `scores` reads many members' scores in one `ZMSCORE` (one `ZSCORE` each on a Redis older
/// than 6.2, which lacks it).
const MANY: &str = r"
local CHUNK = 500
local function slice(list, from, to)
  local out = {}
  for i = from, math.min(to, #list) do out[#out + 1] = list[i] end
  return out
end
local function scores(key, ids)
  local r = redis.pcall('ZMSCORE', key, unpack(ids))
  if type(r) == 'table' and r.err then
    r = {}
    for i, id in ipairs(ids) do r[i] = redis.call('ZSCORE', key, id) end
  end
  return r
end
-- ARGV from `from` on, read as pairs of job id and lease token.
local function leases_from(from)
  local ids, tokens = {}, {}
  for i = from, #ARGV, 2 do
    ids[#ids + 1] = ARGV[i]
    tokens[#tokens + 1] = ARGV[i + 1]
  end
  return ids, tokens
end
-- Of `ids` (with their `tokens`), those leased under that token right now, once each; and
-- per id whether it is one of them ('1' or '0', for one string of them all).
local function held_many(leased, tokens_key, ids, tokens)
  local held, answer, seen = {}, {}, {}
  -- While no lease in the set has expired (the usual case), a current token is a live lease (a
  -- token is kept exactly while its id is leased), so no expiry is read: `ZMSCORE` answers
  -- each one as text (Redis prints it with '%.17g'), which the script converts back.
  local any_expired = #redis.call('ZRANGEBYSCORE', leased, '-inf', now, 'LIMIT', 0, 1) > 0
  for s = 1, #ids, CHUNK do
    local part = slice(ids, s, s + CHUNK - 1)
    local current = redis.call('HMGET', tokens_key, unpack(part))
    local expiries = {}
    if any_expired then expiries = scores(leased, part) end
    for j, id in ipairs(part) do
      local i = s + j - 1
      -- `+ 0` converts the score once; `tonumber` would twice (it tests, then converts).
      local ok = current[j] == tokens[i] and not seen[id]
        and (not any_expired or (expiries[j] and expiries[j] + 0 > now))
      if ok then
        seen[id] = true
        held[#held + 1] = id
      end
      answer[i] = ok and '1' or '0'
    end
  end
  return held, answer
end
";

/// KEYS: waiting, leased, tokens, lost. ARGV: wake channel, delay ms, ids...
/// Pushing an id makes it wait (moving its due time if it waits already), revokes its lease and
/// takes it out of the lost set (its next delivery is a pushed one).
static PUSH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{NOW}{MANY}
-- Formatted once, not once per member.
local due = tostring(now + tonumber(ARGV[2]))
local any_lost = redis.call('SCARD', KEYS[4]) > 0
for s = 3, #ARGV, CHUNK do
  local ids = slice(ARGV, s, s + CHUNK - 1)
  local members = {{}}
  for _, id in ipairs(ids) do
    members[#members + 1] = due
    members[#members + 1] = id
  end
  -- A token is kept exactly while its id is leased.
  if redis.call('ZREM', KEYS[2], unpack(ids)) > 0 then
    redis.call('HDEL', KEYS[3], unpack(ids))
  end
  redis.call('ZADD', KEYS[1], unpack(members))
  if any_lost then redis.call('SREM', KEYS[4], unpack(ids)) end
end
redis.call('PUBLISH', ARGV[1], '')
return #ARGV - 2
"
    ))
});

/// The field that keeps `q:tokens` a hash table (never a job id: ids are UUIDs).
const TOKENS_KEEPER: &str = "~";
/// Its value's length: past Redis's `hash-max-listpack-value` (64 by default) unless a server
/// raises that above 1 KiB.
const TOKENS_KEEPER_LEN: usize = 1025;

/// KEYS: waiting, leased, tokens, seq, lost. ARGV: max, ttl ms.
/// Reaps expired leases (their jobs wait again, due at their expiry, and join the lost set),
/// then leases up to `max` due jobs, oldest due first. Returns {ms until the next due job or
/// lease expiry (-1: none, or not asked because jobs were claimed)}, and when jobs were claimed
/// a second string, `id1 token1 lost1 id2 token2 lost2 ...` separated by spaces, each lost flag
/// '1' or '0' (one reply value for the batch: a client parses each value of a reply apart, at
/// a cost per value well above its bytes').
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{NOW}{MANY}
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1000)
for i = 1, #expired, 2 do
  local id = expired[i]
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZADD', KEYS[1], expired[i + 1], id)
  redis.call('SADD', KEYS[5], id)
end
local out = {{}}
local max = tonumber(ARGV[1])
if max > 0 then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, max)
  if #ids > 0 then
    local last = redis.call('INCRBY', KEYS[4], #ids)
    local first = last - #ids
    local expires = tostring(now + tonumber(ARGV[2]))
    -- The ids are the waiting set's lowest-scored members: one call removes them all.
    redis.call('ZREMRANGEBYRANK', KEYS[1], 0, #ids - 1)
    -- The tokens hash holds only the leases in flight, few enough (up to 128) for Redis to keep
    -- it as a listpack, which every HSET, HMGET and HDEL of a job scans end to end (7 % of
    -- Redis's instructions a job). A field whose value is past hash-max-listpack-value makes
    -- it a real hash table, and keeps it from emptying (and coming back as a listpack).
    if redis.call('HEXISTS', KEYS[3], '{TOKENS_KEEPER}') == 0 then
      redis.call('HSET', KEYS[3], '{TOKENS_KEEPER}', string.rep('~', {TOKENS_KEEPER_LEN}))
    end
    -- Lost jobs are rare: the set is looked into only when it holds any.
    local any_lost = redis.call('SCARD', KEYS[5]) > 0
    for s = 1, #ids, CHUNK do
      local members, tokens = {{}}, {{}}
      local lost = {{}}
      if any_lost then
        for i = s, math.min(s + CHUNK - 1, #ids) do
          lost[i] = redis.call('SREM', KEYS[5], ids[i]) == 1
        end
      end
      for i = s, math.min(s + CHUNK - 1, #ids) do
        -- '%d', not tostring: Lua's number-to-string is a float format, dearer per job.
        local id, token = ids[i], string.format('%d', first + i)
        members[#members + 1] = expires
        members[#members + 1] = id
        tokens[#tokens + 1] = id
        tokens[#tokens + 1] = token
        out[#out + 1] = id
        out[#out + 1] = token
        out[#out + 1] = lost[i] and '1' or '0'
      end
      redis.call('ZADD', KEYS[2], unpack(members))
      redis.call('HSET', KEYS[3], unpack(tokens))
    end
  end
end
if #out > 0 then return {{'-1', table.concat(out, ' ')}} end
-- Nothing claimed: say when something may become due, so the claimer sleeps until then.
local nxt = -1
local w = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #w > 0 then nxt = tonumber(w[2]) end
local l = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #l > 0 and (nxt < 0 or tonumber(l[2]) < nxt) then nxt = tonumber(l[2]) end
if nxt >= 0 then nxt = math.max(0, nxt - now) end
out[1] = tostring(nxt)
return out
"
    ))
});

/// The Lua test of whether `id` is leased under `token` right now.
const HELD: &str = r"
local function held(id, token)
  if redis.call('HGET', KEYS[2], id) ~= token then return false end
  local expires = redis.call('ZSCORE', KEYS[1], id)
  return expires and tonumber(expires) > now
end
";

/// KEYS: leased, tokens. ARGV: ttl ms, id1, token1, id2, token2, ... Returns one string with a
/// character per lease, '1' if held or '0'.
static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{NOW}{MANY}
local expires = tostring(now + tonumber(ARGV[1]))
local ids, tokens = leases_from(2)
local held, answer = held_many(KEYS[1], KEYS[2], ids, tokens)
for s = 1, #held, CHUNK do
  local members = {{}}
  for i = s, math.min(s + CHUNK - 1, #held) do
    members[#members + 1] = expires
    members[#members + 1] = held[i]
  end
  redis.call('ZADD', KEYS[1], unpack(members))
end
return table.concat(answer)
"
    ))
});

/// KEYS: leased, tokens. ARGV: id1, token1, id2, token2, ... Returns one string with a
/// character per lease, '1' if it was held (and the job is gone) or '0'. A lease given twice
/// counts once.
static ACK_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{NOW}{MANY}
local ids, tokens = leases_from(1)
local held, answer = held_many(KEYS[1], KEYS[2], ids, tokens)
for s = 1, #held, CHUNK do
  local part = slice(held, s, s + CHUNK - 1)
  redis.call('ZREM', KEYS[1], unpack(part))
  redis.call('HDEL', KEYS[2], unpack(part))
end
return table.concat(answer)
"
    ))
});

/// Most acks gathered into one script call.
const ACK_BATCH: usize = 64;

/// KEYS: leased, tokens, waiting. ARGV: id, token, delay ms, wake channel.
static REQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{NOW}{HELD}
if not held(ARGV[1], ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PUBLISH', ARGV[4], '')
return 1
"
    ))
});

/// KEYS: waiting, leased. Returns {ready, delayed, leased}.
static STATS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{NOW}
local ready = redis.call('ZCOUNT', KEYS[1], '-inf', now)
local all = redis.call('ZCARD', KEYS[1])
return {{ready, all - ready, redis.call('ZCARD', KEYS[2])}}
"
    ))
});

/// Ids pushed per script call in [`RedisQueue::push_many`].
const PUSH_CHUNK: usize = 5000;

/// A [`Queue`] on Redis. Build it with [`Redis::queue`] or [`RedisQueue::connect`].
///
/// ```no_run
/// # async fn demo() -> Result<(), longjob_core::BackendError> {
/// use std::time::Duration;
/// use longjob_core::{JobId, Queue};
/// use longjob_redis::{RedisConfig, RedisQueue};
///
/// let queue = RedisQueue::connect(RedisConfig::new("redis://127.0.0.1:6379")).await?;
/// queue.push(JobId::new(), Duration::ZERO).await?;
/// let leases = queue.claim(10, Duration::from_secs(30), Duration::from_secs(1)).await?;
/// for lease in &leases {
///     queue.ack(lease).await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RedisQueue {
    redis: Redis,
    waiting: String,
    leased: String,
    tokens: String,
    seq: String,
    lost: String,
    wake: String,
    acks: Arc<Batcher<Lease, bool>>,
}

impl RedisQueue {
    /// The queue of `redis`.
    pub fn new(redis: Redis) -> Self {
        let keys = &redis.shared.keys;
        let (leased, tokens) = (keys.key("q:leased"), keys.key("q:tokens"));
        let acks = Arc::new(Batcher::new(BACKEND, ACK_BATCH, 1, {
            let redis = redis.clone();
            let keys = [leased.clone(), tokens.clone()];
            move |leases| ack_many(redis.clone(), keys.clone(), leases)
        }));
        Self {
            waiting: keys.key("q:waiting"),
            seq: keys.key("q:seq"),
            lost: keys.key("q:lost"),
            wake: keys.key("q:wake"),
            leased,
            tokens,
            acks,
            redis,
        }
    }

    /// Connects to Redis and returns its queue.
    pub async fn connect(config: crate::RedisConfig) -> BackendResult<Self> {
        Ok(Redis::connect(config).await?.queue())
    }

    async fn push_ids(&self, jobs: &[JobId], delay: Duration) -> BackendResult<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut call = ScriptCall::new(
            &PUSH,
            &[&self.waiting, &self.leased, &self.tokens, &self.lost],
        );
        call.arg(&self.wake).arg(millis(delay));
        for job in jobs {
            call.id(*job);
        }
        let _: i64 = self
            .redis
            .shared
            .run(|mut c| async move { call.invoke(&mut c).await })
            .await?;
        Ok(())
    }

    /// One claim attempt: the leases and the time until something may become due.
    async fn try_claim(
        &self,
        max: usize,
        lease_ttl: Duration,
    ) -> BackendResult<(Vec<Lease>, Option<Duration>)> {
        let mut call = ScriptCall::new(
            &CLAIM,
            &[
                &self.waiting,
                &self.leased,
                &self.tokens,
                &self.seq,
                &self.lost,
            ],
        );
        call.arg(max).arg(millis(lease_ttl).max(1));
        let out: Vec<String> = self
            .redis
            .shared
            .run(|mut c| async move { call.invoke(&mut c).await })
            .await?;
        let next: i64 = parse(out.first().map(String::as_str))?;
        let next = u64::try_from(next).ok().map(Duration::from_millis);
        let mut leases = Vec::new();
        let mut claimed = out.get(1).map_or("", String::as_str).split(' ');
        while let Some(id) = claimed.next().filter(|id| !id.is_empty()) {
            let (token, lost) = (claimed.next(), claimed.next());
            leases.push(Lease {
                job_id: id
                    .parse()
                    .map_err(|e| BackendError::corrupt(BACKEND, format!("queued id: {e}")))?,
                token: parse(token)?,
                redelivered: lost == Some("1"),
            });
        }
        Ok((leases, next))
    }
}

/// The answer of a script that says '1' or '0' per lease, for `n` leases.
fn flags(answer: &str, n: usize, what: &str) -> BackendResult<Vec<bool>> {
    if answer.len() != n || !answer.bytes().all(|b| b == b'0' || b == b'1') {
        return Err(BackendError::corrupt(
            BACKEND,
            format!("{what} of {n} leases answered {answer:?}"),
        ));
    }
    Ok(answer.bytes().map(|b| b == b'1').collect())
}

fn parse<T: std::str::FromStr>(s: Option<&str>) -> BackendResult<T> {
    s.and_then(|s| s.parse().ok())
        .ok_or_else(|| BackendError::corrupt(BACKEND, format!("unexpected script answer {s:?}")))
}

/// Acks a batch of leases in one script call (keys: leased, tokens).
async fn ack_many(
    redis: Redis,
    keys: [String; 2],
    leases: Vec<Lease>,
) -> BackendResult<Vec<BackendResult<bool>>> {
    let mut call = ScriptCall::new(&ACK_MANY, &[&keys[0], &keys[1]]);
    for lease in &leases {
        call.id(lease.job_id).arg(lease.token);
    }
    let done: String = redis
        .shared
        .run(|mut c| async move { call.invoke(&mut c).await })
        .await?;
    Ok(flags(&done, leases.len(), "ack")?
        .into_iter()
        .map(Ok)
        .collect())
}

#[async_trait]
impl Queue for RedisQueue {
    async fn push(&self, job: JobId, delay: Duration) -> BackendResult<()> {
        self.push_ids(&[job], delay).await
    }

    async fn push_many(&self, jobs: &[JobId], delay: Duration) -> BackendResult<()> {
        for chunk in jobs.chunks(PUSH_CHUNK) {
            self.push_ids(chunk, delay).await?;
        }
        Ok(())
    }

    async fn claim(
        &self,
        max: usize,
        lease_ttl: Duration,
        wait: Duration,
    ) -> BackendResult<Vec<Lease>> {
        let deadline = Instant::now() + wait;
        let dispatch = &self.redis.shared.hub.dispatch;
        loop {
            // Listen before looking, so a push between the look and the wait wakes us.
            let notified = dispatch.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (leases, next) = self.try_claim(max, lease_ttl).await?;
            let now = Instant::now();
            if !leases.is_empty() || max == 0 || now >= deadline {
                return Ok(leases);
            }
            // Without a trustworthy wake-up channel, look again soon.
            let cap = if dispatch.connected() {
                self.redis.shared.config.max_claim_poll
            } else {
                Duration::from_millis(250)
            };
            let mut until = deadline.min(now + cap);
            if let Some(next) = next {
                // A little after the due time, so the Redis clock has passed it too.
                until = until.min(now + next + Duration::from_millis(2));
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn extend(&self, leases: &[Lease], ttl: Duration) -> BackendResult<Vec<bool>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = ScriptCall::new(&EXTEND, &[&self.leased, &self.tokens]);
        call.arg(millis(ttl).max(1));
        for lease in leases {
            call.id(lease.job_id).arg(lease.token);
        }
        let held: String = self
            .redis
            .shared
            .run(|mut c| async move { call.invoke(&mut c).await })
            .await?;
        flags(&held, leases.len(), "extend")
    }

    async fn ack(&self, lease: &Lease) -> BackendResult<bool> {
        self.acks.call(*lease).await
    }

    async fn requeue(&self, lease: &Lease, delay: Duration) -> BackendResult<bool> {
        let mut call = ScriptCall::new(&REQUEUE, &[&self.leased, &self.tokens, &self.waiting]);
        call.id(lease.job_id)
            .arg(lease.token)
            .arg(millis(delay))
            .arg(&self.wake);
        let done: i64 = self
            .redis
            .shared
            .run(|mut c| async move { call.invoke(&mut c).await })
            .await?;
        Ok(done == 1)
    }

    async fn stats(&self) -> BackendResult<QueueStats> {
        let call = ScriptCall::new(&STATS, &[&self.waiting, &self.leased]);
        let (ready, delayed, leased): (u64, u64, u64) = self
            .redis
            .shared
            .run(|mut c| async move { call.invoke(&mut c).await })
            .await?;
        Ok(QueueStats {
            ready,
            delayed,
            leased,
        })
    }

    async fn health(&self) -> BackendResult<()> {
        self.redis.shared.ping().await
    }
}
