//! [`RedisJobStore`]: jobs as hashes, written by Lua compare-and-set.
//!
//! Keys (all under the prefix's hash tag):
//! - `job:<id>`: hash with `j` (the job's JSON, as the API would read it), `v` (version),
//!   `t` (fencing token), `o` (owner), `i` (its idempotency key's name, or empty), `f` (whether
//!   it is finished: `1`/`0`). A finished
//!   job's hash expires after the configured retention;
//! - `owner:<owner>:jobs`: sorted set of the owner's job ids scored by creation (µs);
//! - `owner:<owner>:active`: set of the owner's unfinished job ids;
//! - `finished`: sorted set of finished job ids scored by finishing time (µs), for purges;
//! - `idem:<owner length>:<owner>:<key>`: the job id holding an idempotency key, with its TTL.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use longjob_core::batch::Batcher;
use longjob_core::store::{Inserted, OwnerCounts, OwnerQuota, QuotaHit};
use longjob_core::{BackendError, BackendResult, Job, JobId, JobStore};
use redis::Script;

use crate::script::ScriptCall;
use crate::{BACKEND, Redis, micros, millis};

/// Writes the secondary records of a job being stored, given whether it is `terminal` ('1'/'0')
/// now and whether it `was` before ('1', '0', or '' for a new job): only a change of
/// finishedness touches the active set, the finished index and the expiry. The caller writes
/// the hash's `f` field itself, in the same `HSET` as the job.
const INDEX: &str = r"
local function index(base, jobkey, id, owner, terminal, finished, retention, was)
  if terminal == '1' then
    if was ~= '1' then redis.call('SREM', base .. 'owner:' .. owner .. ':active', id) end
    redis.call('ZADD', base .. 'finished', finished, id)
    redis.call('PEXPIRE', jobkey, retention)
  elseif was ~= '0' then
    redis.call('SADD', base .. 'owner:' .. owner .. ':active', id)
    if was == '1' then
      redis.call('ZREM', base .. 'finished', id)
      redis.call('PERSIST', jobkey)
    end
  end
end
";

/// KEYS: job, idem (or any key when none). ARGV: base, json, id, owner, created µs, terminal,
/// finished µs, retention ms, token, has idem ('1'/'0'), idem ttl ms, and the owner's quota:
/// window start µs, most jobs created since then, most unfinished jobs (-1: no limit).
/// Returns {'new'}, {'exists'}, {'existing', json}, or {'over', 'created'|'active'} when the
/// quota refuses the job (checked in the same script as the insert, so racing inserts cannot
/// pass a limit together).
static INSERT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{INDEX}
local base = ARGV[1]
if ARGV[10] == '1' then
  local held = redis.call('GET', KEYS[2])
  if held then
    local json = redis.call('HGET', base .. 'job:' .. held, 'j')
    if json then return {{'existing', json}} end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {{'exists'}} end
local max_created, max_active = tonumber(ARGV[13]), tonumber(ARGV[14])
if max_created >= 0 and redis.call('ZCOUNT', base .. 'owner:' .. ARGV[4] .. ':jobs', ARGV[12], '+inf') >= max_created then
  return {{'over', 'created'}}
end
if max_active >= 0 and redis.call('SCARD', base .. 'owner:' .. ARGV[4] .. ':active') >= max_active then
  return {{'over', 'active'}}
end
local idem = ''
if ARGV[10] == '1' then idem = KEYS[2] end
-- The version as text: a Lua number is printed with '%.17g' on its way to Redis.
redis.call('HSET', KEYS[1], 'j', ARGV[2], 'v', '1', 't', ARGV[9], 'o', ARGV[4], 'i', idem, 'f', ARGV[6])
redis.call('ZADD', base .. 'owner:' .. ARGV[4] .. ':jobs', ARGV[5], ARGV[3])
index(base, KEYS[1], ARGV[3], ARGV[4], ARGV[6], ARGV[7], ARGV[8], '')
if ARGV[10] == '1' and tonumber(ARGV[11]) > 0 then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[11])
end
return {{'new'}}
"
    ))
});

/// ARGV: base, retention ms, then per job 7 values: json, id, owner, created µs, terminal,
/// finished µs, token. Stores none if any id exists; returns that id, or '' when all stored.
/// The owners' indexes of unfinished jobs are written once per owner, not once per job.
static INSERT_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{INDEX}
local base = ARGV[1]
for i = 3, #ARGV, 7 do
  if redis.call('EXISTS', base .. 'job:' .. ARGV[i + 1]) == 1 then return ARGV[i + 1] end
end
local created, active = {{}}, {{}}
for i = 3, #ARGV, 7 do
  local id, owner = ARGV[i + 1], ARGV[i + 2]
  local jobkey = base .. 'job:' .. id
  -- The version as text: a Lua number is printed with '%.17g' on its way to Redis.
  redis.call('HSET', jobkey, 'j', ARGV[i], 'v', '1', 't', ARGV[i + 6], 'o', owner, 'i', '', 'f', ARGV[i + 4])
  if ARGV[i + 4] == '1' then
    redis.call('ZADD', base .. 'owner:' .. owner .. ':jobs', ARGV[i + 3], id)
    index(base, jobkey, id, owner, '1', ARGV[i + 5], ARGV[2], '')
  else
    local c = created[owner] or {{}}
    c[#c + 1] = ARGV[i + 3]
    c[#c + 1] = id
    created[owner] = c
    local a = active[owner] or {{}}
    a[#a + 1] = id
    active[owner] = a
  end
end
for owner, members in pairs(created) do
  redis.call('ZADD', base .. 'owner:' .. owner .. ':jobs', unpack(members))
  redis.call('SADD', base .. 'owner:' .. owner .. ':active', unpack(active[owner]))
end
return ''
"
    ))
});

/// Compare-and-set writes of many jobs. ARGV: base, retention ms, then per write 7 values:
/// id, json, expected version, the version it writes, token, terminal, finished µs. Returns one
/// string of 3 words per write, separated by spaces: 'ok'|'missing'|'conflict'|'fenced', the
/// stored version and the stored token (one reply value for the batch: a client parses each
/// value of a reply apart, at a cost per value well above its bytes').
///
/// Versions are compared as the decimal strings both sides write, and the new one comes from
/// the client: no number is parsed or formatted for them in Lua.
///
/// Jobs finishing in the batch join the finished index in one `ZADD` and leave their owners'
/// active sets in one `SREM` per owner, at the end (Lua's cost is per call, not per member).
static UPDATE_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{INDEX}
local base, retention = ARGV[1], ARGV[2]
local out = {{}}
local finished, leaving = {{}}, {{}}
-- Whether token `a` is below `b`, both decimal as the client writes them (no sign, no leading
-- zero): their lengths decide unless equal, and only tokens of one length that differ are
-- converted (a start's token against the stored '0', or a job's later writes under the same
-- lease, need none; `tonumber` costs two `strtod`s a string).
local function token_below(a, b)
  if a == b then return false end
  if #a ~= #b then return #a < #b end
  return tonumber(a) < tonumber(b)
end
local function flush()
  if #finished > 0 then redis.call('ZADD', base .. 'finished', unpack(finished)) end
  for owner, ids in pairs(leaving) do
    redis.call('SREM', base .. 'owner:' .. owner .. ':active', unpack(ids))
  end
  finished, leaving = {{}}, {{}}
end
for i = 3, #ARGV, 7 do
  local id = ARGV[i]
  local jobkey = base .. 'job:' .. id
  local cur = redis.call('HMGET', jobkey, 'v', 't', 'o', 'f')
  if not cur[1] then
    out[#out + 1] = 'missing'; out[#out + 1] = '0'; out[#out + 1] = '0'
  elseif cur[1] ~= ARGV[i + 2] then
    out[#out + 1] = 'conflict'; out[#out + 1] = cur[1]; out[#out + 1] = cur[2]
  elseif token_below(ARGV[i + 4], cur[2]) then
    out[#out + 1] = 'fenced'; out[#out + 1] = cur[1]; out[#out + 1] = cur[2]
  else
    redis.call('HSET', jobkey, 'j', ARGV[i + 1], 'v', ARGV[i + 3], 't', ARGV[i + 4], 'f', ARGV[i + 5])
    local was = cur[4] or ''
    if ARGV[i + 5] == '1' then
      if was ~= '1' then
        local ids = leaving[cur[3]] or {{}}
        ids[#ids + 1] = id
        leaving[cur[3]] = ids
      end
      finished[#finished + 1] = ARGV[i + 6]
      finished[#finished + 1] = id
      redis.call('PEXPIRE', jobkey, retention)
    elseif was ~= '0' then
      -- Rare (a finished job queued again): write what is pending first, so a job's index
      -- changes stay in the order of its writes.
      flush()
      index(base, jobkey, id, cur[3], '0', ARGV[i + 6], retention, was)
    end
    out[#out + 1] = 'ok'; out[#out + 1] = cur[1]; out[#out + 1] = cur[2]
  end
end
flush()
return table.concat(out, ' ')
"
    ))
});

/// Most writes gathered into one script call.
const UPDATE_BATCH: usize = 64;

/// KEYS: owner jobs index. ARGV: base, limit. The newest jobs' JSON; forgets expired ones.
static LIST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local limit = tonumber(ARGV[2])
local out = {}
local offset = 0
while #out < limit do
  local ids = redis.call('ZREVRANGE', KEYS[1], offset, offset + limit - 1)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local json = redis.call('HGET', ARGV[1] .. 'job:' .. id, 'j')
    if json then
      if #out < limit then out[#out + 1] = json end
    else
      redis.call('ZREM', KEYS[1], id)
      offset = offset - 1
    end
  end
  offset = offset + #ids
end
return out
",
    )
});

/// KEYS: idem key. ARGV: base. The JSON of the job holding the key, or nil.
static FIND_IDEM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local id = redis.call('GET', KEYS[1])
if not id then return false end
return redis.call('HGET', ARGV[1] .. 'job:' .. id, 'j')
",
    )
});

/// KEYS: finished. ARGV: base, before µs (exclusive), limit. Deletes and returns the JSON of up
/// to `limit` jobs finished before the cutoff; forgets ids whose hash has expired.
static PURGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local base = ARGV[1]
local limit = tonumber(ARGV[3])
local out = {}
while #out < limit do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, limit - #out)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local jobkey = base .. 'job:' .. id
    local f = redis.call('HMGET', jobkey, 'j', 'o', 'i')
    redis.call('ZREM', KEYS[1], id)
    if f[1] then
      redis.call('DEL', jobkey)
      redis.call('ZREM', base .. 'owner:' .. f[2] .. ':jobs', id)
      redis.call('SREM', base .. 'owner:' .. f[2] .. ':active', id)
      if f[3] and f[3] ~= '' and redis.call('GET', f[3]) == id then
        redis.call('DEL', f[3])
      end
      out[#out + 1] = f[1]
    end
  end
end
return out
",
    )
});

/// Jobs per script call in [`RedisJobStore::insert_many`].
const INSERT_CHUNK: usize = 500;

/// A [`JobStore`] on Redis. Build it with [`Redis::store`] or [`RedisJobStore::connect`].
///
/// The latest state of a job is one `HGET` away ([`get`](JobStore::get)), which is what polling
/// clients read.
///
/// ```no_run
/// # async fn demo() -> Result<(), longjob_core::BackendError> {
/// use std::time::Duration;
/// use longjob_core::{Job, JobStore};
/// use longjob_redis::{RedisConfig, RedisJobStore};
///
/// let store = RedisJobStore::connect(RedisConfig::new("redis://127.0.0.1:6379")).await?;
/// let job = Job::new("report", "alice", serde_json::json!({"month": 11}));
/// let stored = store.insert(&job, Duration::from_secs(3600)).await?;
/// assert_eq!(stored.job().version, 1);
/// # Ok(())
/// # }
/// ```
///
/// Concurrent [`update`](JobStore::update)s (a worker's jobs starting and finishing) are
/// gathered into one script call ([`Batcher`]).
#[derive(Debug, Clone)]
pub struct RedisJobStore {
    redis: Redis,
    base: String,
    updates: Arc<Batcher<Job, Job>>,
}

impl RedisJobStore {
    /// The store of `redis`.
    pub fn new(redis: Redis) -> Self {
        let base = redis.shared.keys.base().to_owned();
        let updates = Arc::new(Batcher::new(BACKEND, UPDATE_BATCH, 1, {
            let redis = redis.clone();
            let base = base.clone();
            move |jobs| update_many(redis.clone(), base.clone(), jobs)
        }));
        Self {
            base,
            redis,
            updates,
        }
    }

    /// Connects to Redis and returns its store.
    pub async fn connect(config: crate::RedisConfig) -> BackendResult<Self> {
        Ok(Redis::connect(config).await?.store())
    }

    /// Inserts `job` in one script, checking `quota` in the same step.
    async fn insert_checked(
        &self,
        job: &Job,
        idempotency_ttl: Duration,
        quota: Option<&OwnerQuota>,
    ) -> BackendResult<Result<Inserted, QuotaHit>> {
        let mut stored = job.clone();
        stored.version = 1;
        let json = encode(&stored)?;
        let idem = job.idempotency_key.as_deref();
        let job_key = self.job_key(job.id);
        let limit = |l: Option<u64>| l.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let idem_key = idem.map(|k| self.idem_key(&job.owner, k));
        let mut call = ScriptCall::new(&INSERT, &[&job_key, idem_key.as_ref().unwrap_or(&job_key)]);
        call.arg(&self.base)
            .arg(json)
            .arg(job.id.to_string())
            .arg(&job.owner)
            .arg(micros(job.created_at))
            .arg(terminal(job))
            .arg(finished_micros(job))
            .arg(self.retention_ms())
            .arg(job.lease_token)
            .arg(if idem.is_some() { "1" } else { "0" })
            .arg(millis(idempotency_ttl))
            .arg(quota.map_or(0, |q| micros(q.since)))
            .arg(limit(quota.and_then(|q| q.max_created_since)))
            .arg(limit(quota.and_then(|q| q.max_active)));
        let out: Vec<String> = self
            .redis
            .shared
            .run(|mut c| async move { call.invoke(&mut c).await })
            .await?;
        let answer = out.first().map(String::as_str);
        let over = |what: &str| match (what, quota) {
            (
                "created",
                Some(OwnerQuota {
                    max_created_since: Some(limit),
                    ..
                }),
            ) => Some(QuotaHit::CreatedSince { limit: *limit }),
            (
                "active",
                Some(OwnerQuota {
                    max_active: Some(limit),
                    ..
                }),
            ) => Some(QuotaHit::Active { limit: *limit }),
            _ => None,
        };
        match answer {
            Some("new") => Ok(Ok(Inserted::New(stored))),
            Some("exists") => Err(BackendError::AlreadyExists(job.id)),
            Some("existing") => Ok(Ok(Inserted::Existing(decode(
                out.get(1)
                    .ok_or_else(|| BackendError::corrupt(BACKEND, "insert answered no job"))?,
            )?))),
            Some("over") => match out.get(1).and_then(|what| over(what)) {
                Some(hit) => Ok(Err(hit)),
                None => Err(BackendError::corrupt(
                    BACKEND,
                    format!("insert answered {out:?}"),
                )),
            },
            other => Err(BackendError::corrupt(
                BACKEND,
                format!("insert answered {other:?}"),
            )),
        }
    }

    fn job_key(&self, id: JobId) -> String {
        format!("{}job:{id}", self.base)
    }

    fn idem_key(&self, owner: &str, key: &str) -> String {
        format!("{}idem:{}:{owner}:{key}", self.base, owner.len())
    }

    fn owner_key(&self, owner: &str, what: &str) -> String {
        format!("{}owner:{owner}:{what}", self.base)
    }

    fn retention_ms(&self) -> u64 {
        millis(self.redis.shared.config.finished_retention).max(1)
    }
}

fn encode(job: &Job) -> BackendResult<String> {
    job.to_json().map_err(|e| BackendError::corrupt(BACKEND, e))
}

fn decode(json: &str) -> BackendResult<Job> {
    Job::from_json(json).map_err(|e| BackendError::corrupt(BACKEND, format!("job: {e}")))
}

fn terminal(job: &Job) -> &'static str {
    if job.state.is_terminal() { "1" } else { "0" }
}

fn finished_micros(job: &Job) -> i64 {
    micros(job.finished_at.unwrap_or(job.updated_at))
}

fn num(s: Option<&str>) -> u64 {
    s.and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Writes a batch of jobs in one script call; each answer is the job as stored, or why not.
async fn update_many(
    redis: Redis,
    base: String,
    jobs: Vec<Job>,
) -> BackendResult<Vec<BackendResult<Job>>> {
    let retention = millis(redis.shared.config.finished_retention).max(1);
    // About 450 bytes of JSON a job and its six other arguments.
    let mut call =
        ScriptCall::with_capacity(&UPDATE_MANY, &[], 2 + 7 * jobs.len(), 640 * jobs.len());
    call.arg(&base).arg(retention);
    // Each write's id, expected version and token; the jobs themselves become the answers.
    let mut sent = Vec::with_capacity(jobs.len());
    let mut nexts = Vec::with_capacity(jobs.len());
    for mut job in jobs {
        let (version, token) = (job.version, job.lease_token);
        job.version = version.saturating_add(1);
        call.id(job.id)
            .arg(encode(&job)?)
            .arg(version)
            .arg(job.version)
            .arg(token)
            .arg(terminal(&job))
            .arg(finished_micros(&job));
        sent.push((job.id, version, token));
        nexts.push(job);
    }
    let out: String = redis
        .shared
        .run(|mut c| async move { call.invoke(&mut c).await })
        .await?;
    let out: Vec<&str> = out.split(' ').filter(|w| !w.is_empty()).collect();
    if out.len() != sent.len() * 3 {
        return Err(BackendError::corrupt(
            BACKEND,
            format!("{} updates answered {} values", sent.len(), out.len()),
        ));
    }
    Ok(sent
        .into_iter()
        .zip(nexts)
        .zip(out.chunks(3))
        .map(|(((id, version, token), next), answer)| match answer[0] {
            "ok" => Ok(next),
            "missing" => Err(BackendError::NotFound(id)),
            "conflict" => Err(BackendError::Conflict {
                id,
                expected: version,
                actual: num(answer.get(1).copied()),
            }),
            "fenced" => Err(BackendError::Fenced {
                id,
                token,
                current: num(answer.get(2).copied()),
            }),
            other => Err(BackendError::corrupt(
                BACKEND,
                format!("update answered {other:?}"),
            )),
        })
        .collect())
}

#[async_trait]
impl JobStore for RedisJobStore {
    async fn insert(&self, job: &Job, idempotency_ttl: Duration) -> BackendResult<Inserted> {
        match self.insert_checked(job, idempotency_ttl, None).await? {
            Ok(inserted) => Ok(inserted),
            Err(hit) => Err(BackendError::corrupt(
                BACKEND,
                format!("insert without a quota answered {hit:?}"),
            )),
        }
    }

    async fn insert_within(
        &self,
        job: &Job,
        idempotency_ttl: Duration,
        quota: &OwnerQuota,
    ) -> BackendResult<Result<Inserted, QuotaHit>> {
        self.insert_checked(job, idempotency_ttl, Some(quota)).await
    }

    async fn insert_many(&self, jobs: &[Job]) -> BackendResult<()> {
        for chunk in jobs.chunks(INSERT_CHUNK) {
            let mut call = ScriptCall::new(&INSERT_MANY, &[]);
            call.arg(&self.base).arg(self.retention_ms());
            for job in chunk {
                let mut stored = job.clone();
                stored.version = 1;
                call.arg(encode(&stored)?)
                    .id(job.id)
                    .arg(&job.owner)
                    .arg(micros(job.created_at))
                    .arg(terminal(job))
                    .arg(finished_micros(job))
                    .arg(job.lease_token);
            }
            let existing: String = self
                .redis
                .shared
                .run(|mut c| async move { call.invoke(&mut c).await })
                .await?;
            if !existing.is_empty() {
                let id = existing.parse().map_err(|e| {
                    BackendError::corrupt(BACKEND, format!("insert_many answered {existing}: {e}"))
                })?;
                return Err(BackendError::AlreadyExists(id));
            }
        }
        Ok(())
    }

    async fn get(&self, id: JobId) -> BackendResult<Option<Job>> {
        let key = self.job_key(id);
        let json: Option<String> = self
            .redis
            .shared
            .run(|mut c| async move {
                redis::cmd("HGET")
                    .arg(&key)
                    .arg("j")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        json.as_deref().map(decode).transpose()
    }

    async fn update(&self, job: &Job) -> BackendResult<Job> {
        self.updates.call(job.clone()).await
    }

    async fn list_by_owner(&self, owner: &str, limit: usize) -> BackendResult<Vec<Job>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let owner_jobs = self.owner_key(owner, "jobs");
        let mut call = ScriptCall::new(&LIST, &[&owner_jobs]);
        call.arg(&self.base).arg(limit);
        let out: Vec<String> = self
            .redis
            .shared
            .run(|mut c| async move { call.invoke(&mut c).await })
            .await?;
        out.iter().map(|j| decode(j)).collect()
    }

    async fn find_by_idempotency_key(&self, owner: &str, key: &str) -> BackendResult<Option<Job>> {
        let idem_key = self.idem_key(owner, key);
        let mut call = ScriptCall::new(&FIND_IDEM, &[&idem_key]);
        call.arg(&self.base);
        let json: Option<String> = self
            .redis
            .shared
            .run(|mut c| async move { call.invoke(&mut c).await })
            .await?;
        json.as_deref().map(decode).transpose()
    }

    async fn count_by_owner(
        &self,
        owner: &str,
        since: DateTime<Utc>,
    ) -> BackendResult<OwnerCounts> {
        let jobs = self.owner_key(owner, "jobs");
        let active = self.owner_key(owner, "active");
        let (created_since, active): (u64, u64) = self
            .redis
            .shared
            .run(|mut c| async move {
                redis::pipe()
                    .cmd("ZCOUNT")
                    .arg(&jobs)
                    .arg(micros(since))
                    .arg("+inf")
                    .cmd("SCARD")
                    .arg(&active)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(OwnerCounts {
            created_since,
            active,
        })
    }

    async fn purge_finished(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> BackendResult<Vec<Job>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let finished = format!("{}finished", self.base);
        let mut call = ScriptCall::new(&PURGE, &[&finished]);
        call.arg(&self.base).arg(micros(finished_before)).arg(limit);
        let out: Vec<String> = self
            .redis
            .shared
            .run(|mut c| async move { call.invoke(&mut c).await })
            .await?;
        out.iter().map(|j| decode(j)).collect()
    }

    async fn health(&self) -> BackendResult<()> {
        self.redis.shared.ping().await
    }
}
