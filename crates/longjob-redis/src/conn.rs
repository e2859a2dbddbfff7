//! The command connection pool.
//!
//! A [`bb8`] pool of multiplexed connections. Its manager is ours rather than
//! `bb8_redis::RedisConnectionManager` for two reasons that matter to a job queue: that manager
//! opens connections with redis's default 500 ms response timeout (a claim of a large batch on a
//! busy machine can take longer, and a timed-out claim strands its leases until they expire), and
//! it never reports a connection as broken, so after a Redis restart dead connections would stay
//! in the pool. Here the per-call deadline is [`RedisConfig::call_timeout`], and a connection
//! that saw an I/O error, or whose socket the server closed, is dropped from the pool. The
//! connections speak RESP3 only so that redis tells us of a closed socket (a `Disconnection`
//! push) before we send a command down it: after a Redis restart no call fails on a stale
//! connection.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use longjob_core::{BackendError, BackendResult};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ProtocolVersion, PushInfo, PushKind};

use crate::{BACKEND, RedisConfig, Shared, map_err};

/// One pooled connection and whether it was seen broken.
pub(crate) struct Conn {
    conn: MultiplexedConnection,
    broken: bool,
    /// Set when the server closed the socket, or a call on it failed for I/O.
    closed: Arc<AtomicBool>,
}

pub(crate) struct Manager {
    client: Client,
    timeout: std::time::Duration,
    name: String,
}

/// A client for `url` speaking RESP3.
pub(crate) fn resp3_client(url: &str) -> BackendResult<Client> {
    let invalid =
        |e: redis::RedisError| BackendError::InvalidArgument(format!("invalid Redis URL: {e}"));
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(invalid)?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Client::open(info.set_redis_settings(settings)).map_err(invalid)
}

impl Manager {
    pub(crate) fn new(config: &RedisConfig) -> BackendResult<Self> {
        Ok(Self {
            client: resp3_client(&config.url)?,
            timeout: config.call_timeout,
            name: config.client_name.clone(),
        })
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = Conn;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Conn, redis::RedisError> {
        let closed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&closed);
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(self.timeout))
            .set_push_sender(
                move |info: PushInfo| -> Result<(), std::convert::Infallible> {
                    if info.kind == PushKind::Disconnection {
                        flag.store(true, Ordering::SeqCst);
                    }
                    Ok(())
                },
            );
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&self.name)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(Conn {
            conn,
            broken: false,
            closed,
        })
    }

    async fn is_valid(&self, conn: &mut Conn) -> Result<(), redis::RedisError> {
        redis::cmd("PING").query_async::<()>(&mut conn.conn).await
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.broken || conn.closed.load(Ordering::SeqCst)
    }
}

/// The pool.
pub(crate) struct Pool {
    inner: bb8::Pool<Manager>,
}

impl Pool {
    pub(crate) async fn open(config: &RedisConfig) -> BackendResult<Self> {
        let manager = Manager::new(config)?;
        let inner = bb8::Pool::builder()
            .max_size(config.pool_size.max(1))
            .min_idle(None)
            .test_on_check_out(false)
            .connection_timeout(config.call_timeout)
            .build_unchecked(manager);
        Ok(Self { inner })
    }
}

/// Whether an error means the connection itself is gone.
fn breaks_connection(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

impl Shared {
    /// Runs `f` on a pooled connection within the call deadline, mapping errors.
    pub(crate) async fn run<T, F, Fut>(&self, f: F) -> BackendResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let deadline = self.config.call_timeout;
        let call = async {
            // The connection goes back to the pool at once: it is multiplexed, so concurrent
            // calls share it and their commands are pipelined (fewer writes and reads on both
            // sides); the pool only bounds how many connections exist.
            let (conn, closed) = loop {
                let mut pooled = self.pool.inner.get().await.map_err(|e| match e {
                    bb8::RunError::User(e) => map_err(e),
                    bb8::RunError::TimedOut => BackendError::Timeout {
                        backend: BACKEND,
                        after: deadline,
                    },
                })?;
                if !pooled.closed.load(Ordering::SeqCst) {
                    break (pooled.conn.clone(), Arc::clone(&pooled.closed));
                }
                // The server closed it (a restart, a timeout): drop it and take another.
                pooled.broken = true;
            };
            let result = f(conn).await;
            if let Err(e) = &result {
                if breaks_connection(e) {
                    tracing::debug!(error = %e, "dropping a broken Redis connection");
                    // Dropped from the pool at its next checkout.
                    closed.store(true, Ordering::SeqCst);
                }
            }
            result.map_err(map_err)
        };
        match tokio::time::timeout(deadline, call).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Timeout {
                backend: BACKEND,
                after: deadline,
            }),
        }
    }
}
