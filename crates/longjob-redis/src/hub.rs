//! One subscriber connection per [`Redis`](crate::Redis) handle, fanned out in-process.
//!
//! The connection speaks RESP3, so it carries `SUBSCRIBE` and ordinary commands alike, and its
//! push messages are dispatched synchronously to in-process channels: the queue's wake-up
//! ([`Dispatch::wake`]), the cancel signals, and one broadcast channel per job that has local
//! subscribers. A job's channel is subscribed in Redis while it has at least one local
//! subscriber. When the connection drops, a supervisor reconnects with backoff, subscribes again
//! to everything, and tells every job subscriber to resynchronise from the job's retained events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use longjob_core::{BackendError, BackendResult, JobEvent, JobId};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, PushInfo, PushKind, Value};
use tokio::sync::{Notify, broadcast};

use crate::{BACKEND, Keys, RedisConfig, map_err, wire};

/// Live events buffered per job before a slow subscriber counts as lagging (it then refills
/// from the job's retained events).
const LIVE_BUFFER: usize = 1024;

/// What a job subscriber receives.
#[derive(Debug, Clone)]
pub(crate) enum Live {
    /// A live event.
    Event(JobEvent),
    /// Messages may have been lost (reconnection): read the retained events again.
    Resync,
}

struct JobChannel {
    /// The job whose events the channel carries (its messages leave out the job id).
    job: JobId,
    tx: broadcast::Sender<Live>,
    subscribers: usize,
    subscribed: bool,
}

/// The part the push callback reaches.
pub(crate) struct Dispatch {
    jobs: Mutex<HashMap<String, JobChannel>>,
    /// Woken by every queue push (in any process).
    pub(crate) wake: Notify,
    /// Cancel requests from every process.
    pub(crate) cancels: broadcast::Sender<JobId>,
    connected: AtomicBool,
    /// Which connection is current; pushes of older ones (their disconnection) are ignored.
    generation: AtomicU64,
    lost: Notify,
    wake_channel: String,
    cancel_channel: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn text(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The events of `job` in a message of its channel: one event numbered (`{"seq":<n>` then its
/// body, see [`crate::wire`]), or (several events published together) the first one's seq, then
/// each event's body, all on their own line. JSON never holds a raw line break.
fn decode_events(job: JobId, payload: &[u8]) -> Result<Vec<JobEvent>, String> {
    let text = std::str::from_utf8(payload).map_err(|e| e.to_string())?;
    if text.starts_with('{') {
        return wire::decode_numbered(job, text).map(|event| vec![event]);
    }
    let mut lines = text.split('\n');
    let first: u64 = lines
        .next()
        .and_then(|seq| seq.parse().ok())
        .ok_or("a message of several events without a first seq")?;
    (first..)
        .zip(lines)
        .map(|(seq, body)| wire::decode(job, seq, body))
        .collect()
}

impl Dispatch {
    fn on_push(&self, generation: u64, info: PushInfo) {
        if generation != self.generation.load(Ordering::SeqCst) {
            return;
        }
        match info.kind {
            PushKind::Message => {
                let (Some(channel), Some(payload)) = (
                    info.data.first().and_then(text),
                    info.data.get(1).and_then(text),
                ) else {
                    return;
                };
                if channel == self.wake_channel.as_bytes() {
                    self.wake.notify_waiters();
                } else if channel == self.cancel_channel.as_bytes() {
                    if let Some(id) = std::str::from_utf8(payload)
                        .ok()
                        .and_then(|s| s.parse::<JobId>().ok())
                    {
                        let _ = self.cancels.send(id);
                    }
                } else {
                    let Ok(channel) = std::str::from_utf8(channel) else {
                        return;
                    };
                    let jobs = lock(&self.jobs);
                    let Some(job) = jobs.get(channel) else {
                        return;
                    };
                    match decode_events(job.job, payload) {
                        Ok(events) => {
                            for event in events {
                                let _ = job.tx.send(Live::Event(event));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable event on {channel}");
                            let _ = job.tx.send(Live::Resync);
                        }
                    }
                }
            }
            PushKind::Disconnection => {
                self.connected.store(false, Ordering::SeqCst);
                self.lost.notify_one();
                self.wake.notify_waiters();
            }
            _ => {}
        }
    }

    /// Whether the subscriber connection is up (wake-ups can be trusted).
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }
}

/// The subscriber connection and its fan-out.
pub(crate) struct Hub {
    pub(crate) dispatch: Arc<Dispatch>,
    /// The connection; its lock also serialises channel subscription changes.
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    client: Client,
    name: String,
    call_timeout: Duration,
}

impl Hub {
    pub(crate) async fn start(config: &RedisConfig, keys: &Keys) -> BackendResult<Arc<Self>> {
        let client = crate::conn::resp3_client(&config.url)?;
        let dispatch = Arc::new(Dispatch {
            jobs: Mutex::default(),
            wake: Notify::new(),
            cancels: broadcast::channel(1024).0,
            connected: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            lost: Notify::new(),
            wake_channel: keys.key("q:wake"),
            cancel_channel: keys.key("cancel"),
        });
        let hub = Arc::new(Self {
            dispatch,
            conn: tokio::sync::Mutex::new(None),
            client,
            name: config.client_name.clone(),
            call_timeout: config.call_timeout,
        });
        {
            let mut slot = hub.conn.lock().await;
            let conn = tokio::time::timeout(hub.call_timeout, hub.open())
                .await
                .map_err(|_| BackendError::Timeout {
                    backend: BACKEND,
                    after: hub.call_timeout,
                })??;
            *slot = Some(conn);
            hub.dispatch.connected.store(true, Ordering::SeqCst);
        }
        tokio::spawn(supervise(Arc::downgrade(&hub)));
        Ok(hub)
    }

    /// Opens the connection and subscribes to the fixed channels and every job channel that has
    /// local subscribers.
    async fn open(&self) -> BackendResult<MultiplexedConnection> {
        let generation = self.dispatch.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let sink = Arc::clone(&self.dispatch);
        let push = move |info: PushInfo| -> Result<(), std::convert::Infallible> {
            sink.on_push(generation, info);
            Ok(())
        };
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(self.call_timeout))
            .set_push_sender(push);
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(map_err)?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&self.name)
            .query_async::<()>(&mut conn)
            .await
            .map_err(map_err)?;
        let mut channels = vec![
            self.dispatch.wake_channel.clone(),
            self.dispatch.cancel_channel.clone(),
        ];
        channels.extend(
            lock(&self.dispatch.jobs)
                .iter()
                .filter(|(_, c)| c.subscribers > 0)
                .map(|(name, _)| name.clone()),
        );
        for chunk in channels.chunks(500) {
            conn.subscribe(chunk).await.map_err(map_err)?;
        }
        for channel in lock(&self.dispatch.jobs).values_mut() {
            channel.subscribed = channel.subscribers > 0;
        }
        Ok(conn)
    }

    /// Registers a local subscriber of `channel`, subscribing in Redis if it is the first.
    /// Live messages published after this returns are delivered to the receiver.
    pub(crate) async fn join(
        self: &Arc<Self>,
        channel: &str,
        job: JobId,
    ) -> BackendResult<(broadcast::Receiver<Live>, Membership)> {
        let mut slot = self.conn.lock().await;
        let (rx, needs_subscribe) = {
            let mut jobs = lock(&self.dispatch.jobs);
            let entry = jobs
                .entry(channel.to_owned())
                .or_insert_with(|| JobChannel {
                    job,
                    tx: broadcast::channel(LIVE_BUFFER).0,
                    subscribers: 0,
                    subscribed: false,
                });
            entry.subscribers += 1;
            (entry.tx.subscribe(), !entry.subscribed)
        };
        let membership = Membership {
            hub: Arc::downgrade(self),
            channel: channel.to_owned(),
        };
        if needs_subscribe {
            // When disconnected, the supervisor subscribes on reconnection and then resyncs.
            let connected = self.dispatch.connected();
            if let Some(conn) = slot.as_mut().filter(|_| connected) {
                let subscribed = tokio::time::timeout(self.call_timeout, conn.subscribe(channel))
                    .await
                    .map_err(|_| BackendError::Timeout {
                        backend: BACKEND,
                        after: self.call_timeout,
                    })
                    .and_then(|r| r.map_err(map_err));
                match subscribed {
                    Ok(()) => {
                        if let Some(entry) = lock(&self.dispatch.jobs).get_mut(channel) {
                            entry.subscribed = true;
                        }
                    }
                    Err(e) => {
                        *slot = None;
                        self.dispatch.connected.store(false, Ordering::SeqCst);
                        self.dispatch.lost.notify_one();
                        drop(slot);
                        drop(membership);
                        return Err(e);
                    }
                }
            }
        }
        Ok((rx, membership))
    }

    async fn leave(&self, channel: &str) {
        let mut slot = self.conn.lock().await;
        let unsubscribe = {
            let mut jobs = lock(&self.dispatch.jobs);
            match jobs.get(channel) {
                Some(entry) if entry.subscribers == 0 => {
                    let was = entry.subscribed;
                    jobs.remove(channel);
                    was
                }
                _ => false,
            }
        };
        if unsubscribe {
            if let Some(conn) = slot.as_mut() {
                let _ = tokio::time::timeout(self.call_timeout, conn.unsubscribe(channel)).await;
            }
        }
    }

    /// The channel cancel signals travel on.
    pub(crate) fn cancel_channel(&self) -> &str {
        &self.dispatch.cancel_channel
    }
}

/// A local subscriber's membership of a job channel; dropping it leaves the channel.
pub(crate) struct Membership {
    hub: Weak<Hub>,
    channel: String,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        let last = {
            let mut jobs = lock(&hub.dispatch.jobs);
            match jobs.get_mut(&self.channel) {
                Some(entry) => {
                    entry.subscribers = entry.subscribers.saturating_sub(1);
                    entry.subscribers == 0
                }
                None => false,
            }
        };
        if last {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let channel = std::mem::take(&mut self.channel);
                runtime.spawn(async move { hub.leave(&channel).await });
            }
        }
    }
}

/// Reconnects the subscriber connection whenever it drops, with backoff, then resyncs.
async fn supervise(hub: Weak<Hub>) {
    loop {
        let lost = {
            let Some(hub) = hub.upgrade() else { return };
            let dispatch = Arc::clone(&hub.dispatch);
            drop(hub);
            dispatch
        };
        // Wait for a disconnection, checking now and then that the hub still exists.
        loop {
            if !lost.connected() {
                break;
            }
            if tokio::time::timeout(Duration::from_secs(5), lost.lost.notified())
                .await
                .is_ok()
            {
                break;
            }
            if hub.strong_count() == 0 {
                return;
            }
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(hub) = hub.upgrade() else { return };
            let mut slot = hub.conn.lock().await;
            drop(slot.take());
            match tokio::time::timeout(hub.call_timeout, hub.open()).await {
                Ok(Ok(conn)) => {
                    *slot = Some(conn);
                    hub.dispatch.connected.store(true, Ordering::SeqCst);
                    drop(slot);
                    for channel in lock(&hub.dispatch.jobs).values() {
                        let _ = channel.tx.send(Live::Resync);
                    }
                    hub.dispatch.wake.notify_waiters();
                    tracing::info!("Redis subscriber connection restored");
                    break;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "Redis subscriber reconnection failed"),
                Err(_) => tracing::warn!("Redis subscriber reconnection timed out"),
            }
            *slot = None;
            drop(slot);
            drop(hub);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use longjob_core::{EventPayload, JobEvent, JobId};

    use super::decode_events;
    use crate::wire;

    #[test]
    fn decodes_one_event_or_several_published_together() {
        let (job, at) = (JobId::new(), chrono::Utc::now());
        let event = |seq| JobEvent {
            seq,
            job_id: job,
            at,
            payload: EventPayload::Cancelled {},
        };
        // The bus writes an event's body before it is numbered: the same for every seq.
        let body = wire::body(&event(0)).unwrap_or_default();
        let one = format!("{{\"seq\":7{body}");
        assert_eq!(decode_events(job, one.as_bytes()), Ok(vec![event(7)]));
        let together = format!("7\n{body}\n{body}");
        assert_eq!(
            decode_events(job, together.as_bytes()),
            Ok(vec![event(7), event(8)])
        );

        // As an earlier version published them: with the job id.
        let json = |seq| serde_json::to_string(&event(seq)).unwrap_or_default();
        assert_eq!(decode_events(job, json(7).as_bytes()), Ok(vec![event(7)]));
        let with_id = |seq: u64| json(seq)[format!("{{\"seq\":{seq}").len()..].to_owned();
        let together = format!("7\n{}\n{}", with_id(7), with_id(8));
        assert_eq!(
            decode_events(job, together.as_bytes()),
            Ok(vec![event(7), event(8)])
        );

        for bad in ["", "x\n,\"a\":1}", "7\n{", "{\"seq\":1"] {
            assert!(decode_events(job, bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
