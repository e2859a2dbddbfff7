//! # longjob-redis
//!
//! Redis backends for [`longjob_core`]: a leased [`RedisQueue`], a [`RedisProgressBus`] with
//! per-job replay, and a [`RedisJobStore`], on a [`bb8`] pool of multiplexed
//! [`redis`] connections.
//!
//! All keys of one [`RedisConfig::prefix`] carry the hash tag `{prefix}`, so one Redis Cluster
//! slot holds a whole queue, its jobs and their events, and every Lua script touches one slot.
//!
//! - **Queue**: push, claim (a batch, reaping expired leases first), extend (a batch), ack and
//!   requeue are each one Lua script, one round trip however many jobs they touch. Lease times
//!   come from the Redis clock (`TIME`), so workers on different hosts agree. Fencing tokens come
//!   from one `INCR` counter. A waiting claim is woken by a pub/sub message that push publishes,
//!   fanned out in-process; it falls back to sleeping until the next due job or lease expiry.
//! - **Store**: a job is a hash holding its JSON, its version and its fencing token; `update` is
//!   a Lua compare-and-set. Finished jobs' keys expire after [`RedisConfig::finished_retention`].
//! - **Bus**: per job, a list of its events (the position numbers them; trimmed past twice
//!   [`RedisConfig::event_retention`]), written with the live `PUBLISH` in one script;
//!   subscribers replay the list after their `seq` and then take live events from one shared
//!   subscriber connection per process, repairing gaps from the list.
//!
//! The three share one [`Redis`] handle (one pool and one subscriber connection):
//!
//! ```no_run
//! # async fn demo() -> Result<(), longjob_core::BackendError> {
//! use std::sync::Arc;
//! use longjob_redis::{Redis, RedisConfig};
//!
//! let redis = Redis::connect(RedisConfig::new("redis://127.0.0.1:6379").prefix("myapp")).await?;
//! let queue = Arc::new(redis.queue());
//! let store = Arc::new(redis.store());
//! let bus = Arc::new(redis.bus());
//! # let _ = (queue, store, bus);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod bus;
mod conn;
mod hub;
mod queue;
mod script;
mod store;
mod wire;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use longjob_core::{BackendError, BackendResult};

pub use bus::RedisProgressBus;
pub use queue::RedisQueue;
pub use store::RedisJobStore;

/// The backend name used in [`BackendError`]s.
pub(crate) const BACKEND: &str = "redis";

/// How to reach Redis and how to lay out and keep the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// A Redis URL (`redis://[:password@]host:port[/db]`).
    pub url: String,
    /// The namespace of every key (`{prefix}:…`); it is also the Cluster hash tag.
    pub prefix: String,
    /// Pooled connections for commands (the subscriber connection comes on top). Each one is
    /// multiplexed, so a few carry many concurrent calls.
    pub pool_size: u32,
    /// The deadline of each call, connection checkout included.
    pub call_timeout: Duration,
    /// Events retained per job for replay: a job keeps at least its last `event_retention`
    /// events (and at least 64), at most about twice that (a job's list is trimmed when it
    /// passes twice the count). Jobs whose events are in a stream of an earlier version keep it,
    /// capped at about this many (`MAXLEN ~`).
    pub event_retention: usize,
    /// How long a finished job's keys (and its events) live after it finished.
    pub finished_retention: Duration,
    /// The longest a waiting claim sleeps without a wake-up message before it looks again (a
    /// safety net for lost pub/sub messages; wake-ups normally come at once).
    pub max_claim_poll: Duration,
    /// The name set with `CLIENT SETNAME` on every connection, to find them in `CLIENT LIST`.
    pub client_name: String,
}

impl RedisConfig {
    /// Defaults for `url`: prefix `longjob`, 8 pooled connections, 5 s per call, 1 000 events
    /// per job, finished jobs kept 7 days.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "longjob".into(),
            pool_size: 8,
            call_timeout: Duration::from_secs(5),
            event_retention: 1000,
            finished_retention: Duration::from_secs(7 * 24 * 3600),
            max_claim_poll: Duration::from_secs(5),
            client_name: "longjob".into(),
        }
    }

    /// Sets the key prefix (and hash tag).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the number of pooled connections (at least 1).
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// Sets the per-call deadline.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Sets how many events are retained per job (at least 1).
    pub fn event_retention(mut self, events: usize) -> Self {
        self.event_retention = events.max(1);
        self
    }

    /// Sets how long finished jobs' keys live.
    pub fn finished_retention(mut self, retention: Duration) -> Self {
        self.finished_retention = retention;
        self
    }

    /// Sets the client name of the connections.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }
}

/// Key names, all under one hash tag.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    base: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            base: format!("{{{prefix}}}:"),
        }
    }

    pub(crate) fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.base)
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }
}

/// A connection to Redis shared by the queue, the store and the bus: one pool of command
/// connections and one subscriber connection.
///
/// Cheap to clone. See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct Redis {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) pool: conn::Pool,
    pub(crate) config: RedisConfig,
    pub(crate) keys: Keys,
    pub(crate) hub: Arc<hub::Hub>,
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.shared.config.prefix)
            .field("pool_size", &self.shared.config.pool_size)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Opens the pool and the subscriber connection, and checks that Redis answers.
    pub async fn connect(config: RedisConfig) -> BackendResult<Self> {
        let keys = Keys::new(&config.prefix);
        let pool = conn::Pool::open(&config).await?;
        let hub = hub::Hub::start(&config, &keys).await?;
        let redis = Self {
            shared: Arc::new(Shared {
                pool,
                config,
                keys,
                hub,
            }),
        };
        redis.shared.ping().await?;
        Ok(redis)
    }

    /// The queue on this connection.
    pub fn queue(&self) -> RedisQueue {
        RedisQueue::new(self.clone())
    }

    /// The job store on this connection.
    pub fn store(&self) -> RedisJobStore {
        RedisJobStore::new(self.clone())
    }

    /// The progress bus on this connection.
    pub fn bus(&self) -> RedisProgressBus {
        RedisProgressBus::new(self.clone())
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    /// Deletes every key under this prefix (`SCAN` + `UNLINK`) and returns how many: for tests
    /// and benchmarks that use a namespace of their own. Never on a namespace in use.
    pub async fn delete_namespace(&self) -> BackendResult<u64> {
        let pattern = format!("{}*", glob_escape(self.shared.keys.base()));
        let mut cursor = 0u64;
        let mut deleted = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = {
                let pattern = pattern.clone();
                self.shared
                    .run(|mut c| async move {
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(1000)
                            .query_async(&mut c)
                            .await
                    })
                    .await?
            };
            if !keys.is_empty() {
                let n: u64 = self
                    .shared
                    .run(|mut c| async move {
                        redis::cmd("UNLINK").arg(&keys).query_async(&mut c).await
                    })
                    .await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

/// Escapes the glob characters of `SCAN MATCH` (`{` and `}` are not among them).
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Shared {
    pub(crate) async fn ping(&self) -> BackendResult<()> {
        let pong: String = self
            .run(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(BackendError::corrupt(
                BACKEND,
                format!("PING answered {pong}"),
            ))
        }
    }
}

/// Maps a Redis error to the core's classified error.
pub(crate) fn map_err(e: redis::RedisError) -> BackendError {
    use redis::{ErrorKind, ServerErrorKind};
    match e.kind() {
        ErrorKind::AuthenticationFailed => BackendError::Unauthorized {
            backend: BACKEND,
            message: e.to_string(),
        },
        ErrorKind::Server(ServerErrorKind::NoPerm) => BackendError::Unauthorized {
            backend: BACKEND,
            message: e.to_string(),
        },
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            BackendError::corrupt(BACKEND, e.to_string())
        }
        // A script or command error (`ERR …`): not transient.
        ErrorKind::Server(ServerErrorKind::ResponseError) => {
            BackendError::corrupt(BACKEND, e.to_string())
        }
        _ => BackendError::unavailable(BACKEND, e),
    }
}

/// Time-ordered microseconds of a timestamp, as stored in sorted-set scores.
pub(crate) fn micros(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_micros()
}

/// Milliseconds of a duration, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let keys = Keys::new("lj-test");
        assert_eq!(keys.key("q:ready"), "{lj-test}:q:ready");
        assert_eq!(keys.base(), "{lj-test}:");
    }

    #[test]
    fn classifies_errors() {
        let io: redis::RedisError =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into();
        assert!(map_err(io).is_transient());
        let parse: redis::RedisError = (redis::ErrorKind::UnexpectedReturnType, "x").into();
        assert!(!map_err(parse).is_transient());
    }
}
