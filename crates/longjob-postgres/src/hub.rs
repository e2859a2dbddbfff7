//! One `LISTEN` connection per backend (so per process), shared by every waiting claimer,
//! event subscriber and cancel stream, fanned out in process.
//!
//! Notifications are hints: whoever relies on them also reads the tables, when told to
//! resynchronize (after the connection was lost and re-established, since notifications sent
//! meanwhile are gone) and, when notifications are off, on a timer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use longjob_core::{JobEvent, JobId};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::db::lock;

/// What a job's subscribers hear from the hub.
#[derive(Debug, Clone)]
pub(crate) enum Live {
    /// An event, as published.
    Event(JobEvent),
    /// An event with this seq was published but too large to travel in a notification.
    Hint(u64),
    /// Notifications may have been lost: read the table.
    Resync,
}

/// What cancel streams hear from the hub.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CancelNotice {
    /// A cancel request (its row id and job).
    Cancel { id: i64, job: JobId },
    /// Notifications may have been lost: read the table.
    Resync,
}

/// Live events buffered per job before a subscriber counts as lagging (it then reads the table).
const LIVE_BUFFER: usize = 1024;

/// The shared listener.
#[derive(Debug)]
pub(crate) struct Hub {
    /// Woken by every queue notification.
    pub(crate) queue_wake: Notify,
    /// Cancel requests.
    pub(crate) cancels: broadcast::Sender<CancelNotice>,
    routes: Mutex<HashMap<JobId, broadcast::Sender<Live>>>,
    channels: Channels,
    shutdown: CancellationToken,
}

#[derive(Debug, Clone)]
pub(crate) struct Channels {
    pub(crate) queue: String,
    pub(crate) events: String,
    pub(crate) cancel: String,
}

impl Channels {
    fn all(&self) -> [&str; 3] {
        [&self.queue, &self.events, &self.cancel]
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Hub {
    /// Connects the listener (failing if it cannot) and starts its task.
    pub(crate) async fn start(
        options: PgConnectOptions,
        channels: Channels,
    ) -> Result<Arc<Self>, sqlx::Error> {
        // A pool of one, used by the listener for its connection and its reconnections.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        let listener = connect(&pool, &channels).await?;
        let hub = Arc::new(Self {
            queue_wake: Notify::new(),
            cancels: broadcast::channel(1024).0,
            routes: Mutex::new(HashMap::new()),
            channels,
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(run(
            Arc::downgrade(&hub),
            hub.shutdown.clone(),
            pool,
            listener,
        ));
        Ok(hub)
    }

    /// A receiver of the live events of `job`.
    pub(crate) fn subscribe_job(&self, job: JobId) -> broadcast::Receiver<Live> {
        let mut routes = lock(&self.routes);
        if routes.len() >= 1024 && routes.len().is_power_of_two() {
            routes.retain(|_, tx| tx.receiver_count() > 0);
        }
        routes
            .entry(job)
            .or_insert_with(|| broadcast::channel(LIVE_BUFFER).0)
            .subscribe()
    }

    fn dispatch(&self, channel: &str, payload: &str) {
        if channel == self.channels.queue {
            self.queue_wake.notify_waiters();
        } else if channel == self.channels.events {
            self.dispatch_event(payload);
        } else if channel == self.channels.cancel {
            let parsed = payload
                .split_once(':')
                .and_then(|(job, id)| Some((job.parse().ok()?, id.parse().ok()?)));
            match parsed {
                Some((job, id)) => {
                    let _ = self.cancels.send(CancelNotice::Cancel { id, job });
                }
                None => tracing::warn!(payload, "malformed cancel notification"),
            }
        }
    }

    /// `<job id>:<seq>:<event JSON, or nothing when too large>`.
    fn dispatch_event(&self, payload: &str) {
        let mut parts = payload.splitn(3, ':');
        let (Some(job), Some(seq), json) = (parts.next(), parts.next(), parts.next()) else {
            tracing::warn!(payload, "malformed event notification");
            return;
        };
        let (Ok(job), Ok(seq)) = (job.parse::<JobId>(), seq.parse::<u64>()) else {
            tracing::warn!(payload, "malformed event notification");
            return;
        };
        let mut routes = lock(&self.routes);
        let Some(tx) = routes.get(&job) else {
            return;
        };
        if tx.receiver_count() == 0 {
            routes.remove(&job);
            return;
        }
        let live = match json.filter(|j| !j.is_empty()).map(serde_json::from_str) {
            Some(Ok(event)) => Live::Event(event),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "undecodable event notification; reading the table");
                Live::Hint(seq)
            }
            None => Live::Hint(seq),
        };
        let _ = tx.send(live);
    }

    fn resync(&self) {
        self.queue_wake.notify_waiters();
        let _ = self.cancels.send(CancelNotice::Resync);
        let mut routes = lock(&self.routes);
        routes.retain(|_, tx| tx.send(Live::Resync).is_ok());
    }
}

async fn connect(pool: &PgPool, channels: &Channels) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all(channels.all()).await?;
    Ok(listener)
}

async fn run(hub: Weak<Hub>, shutdown: CancellationToken, pool: PgPool, listener: PgListener) {
    const MIN_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(3);
    let mut listener = Some(listener);
    let mut backoff = MIN_BACKOFF;
    let Some(channels) = hub.upgrade().map(|h| h.channels.clone()) else {
        return;
    };
    loop {
        let Some(current) = listener.as_mut() else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            match connect(&pool, &channels).await {
                Ok(l) => {
                    tracing::info!("postgres listener reconnected");
                    listener = Some(l);
                    backoff = MIN_BACKOFF;
                    match hub.upgrade() {
                        Some(h) => h.resync(),
                        None => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "postgres listener cannot reconnect yet");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            continue;
        };
        let received = tokio::select! {
            () = shutdown.cancelled() => return,
            r = current.try_recv() => r,
        };
        let Some(h) = hub.upgrade() else {
            return;
        };
        match received {
            Ok(Some(n)) => h.dispatch(n.channel(), n.payload()),
            // The connection was lost and re-established (with its LISTENs): what was notified
            // meanwhile is gone.
            Ok(None) => {
                tracing::info!("postgres listener reconnected");
                h.resync();
            }
            Err(e) => {
                tracing::warn!(error = %e, "postgres listener lost its connection");
                listener = None;
            }
        }
    }
}
