//! Following a job live: Server-Sent Events and WebSocket.
//!
//! Both send the same JSON: first a `status` snapshot of the job as it is now (its `seq` is
//! the resume point), then every retained event after the resume point, then live ones, and
//! they end after the terminal event.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::stream::{self, BoxStream, Stream, StreamExt};
use longjob_core::bus::EventStream;
use longjob_core::{EventPayload, Job, JobEvent};
use serde::Deserialize;

use crate::jobs::{JobIdPath, StreamOwner};
use crate::metrics::GaugeGuard;
use crate::{ApiError, AppState};

/// How long a stream of an already finished job waits for retained events before it ends.
const FINISHED_IDLE: Duration = Duration::from_millis(300);

/// One message of a stream.
#[derive(Debug, Clone)]
pub(crate) struct Out {
    pub(crate) seq: u64,
    pub(crate) kind: &'static str,
    pub(crate) json: String,
    pub(crate) terminal: bool,
}

impl Out {
    fn of(event: &JobEvent) -> Self {
        Self {
            seq: event.seq,
            kind: event.payload.type_name(),
            json: event.to_json().unwrap_or_default(),
            terminal: event.is_terminal(),
        }
    }
}

struct Follow {
    events: EventStream,
    last: u64,
    finished: bool,
    done: bool,
}

/// The snapshot, then the events after `after` until the terminal one.
pub(crate) fn follow(job: &Job, events: EventStream, after: u64) -> BoxStream<'static, Out> {
    let snapshot = JobEvent {
        seq: after,
        job_id: job.id,
        at: Utc::now(),
        payload: EventPayload::status_of(job),
    };
    let state = Follow {
        events,
        last: after,
        finished: job.state.is_terminal(),
        done: false,
    };
    let rest = stream::unfold(state, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let next = if st.finished {
                // A finished job: replay what is retained, then end (no live event will come).
                match tokio::time::timeout(FINISHED_IDLE, st.events.next()).await {
                    Ok(next) => next,
                    Err(_) => return None,
                }
            } else {
                st.events.next().await
            };
            match next {
                None => return None,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "event stream broke off");
                    return None;
                }
                Some(Ok(event)) if event.seq <= st.last => continue,
                Some(Ok(event)) => {
                    st.last = event.seq;
                    st.done = event.is_terminal();
                    return Some((Out::of(&event), st));
                }
            }
        }
    });
    stream::once(async move {
        let mut out = Out::of(&snapshot);
        out.terminal = false;
        out
    })
    .chain(rest)
    .boxed()
}

async fn open(
    state: &AppState,
    id: longjob_core::JobId,
    owner: &str,
    after: u64,
) -> Result<BoxStream<'static, Out>, ApiError> {
    let (job, events) = state.lj.subscribe(id, owner, after).await?;
    Ok(follow(&job, events, after))
}

/// Query of the SSE route.
#[derive(Debug, Deserialize)]
pub(crate) struct SseQuery {
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
}

fn parse_seq(raw: &str, what: &str) -> Result<u64, ApiError> {
    raw.trim()
        .parse::<u64>()
        .map_err(|_| ApiError::validation(format!("{what} must be a non-negative integer")))
}

/// `GET {prefix}/stream/{jobId}`
#[utoipa::path(get, path = "/v1/download/stream/{jobId}", tag = "Streams",
    summary = "Follow a job by Server-Sent Events",
    description = "First a `status` snapshot, then every event (`id: <seq>`, `event: <type>`, `data: <JSON event>`) until the terminal one. Resume with `Last-Event-ID` or `?lastEventId=`. A comment line every 15 s keeps the connection alive.",
    params(("jobId" = String, Path, format = Uuid),
           ("lastEventId" = Option<u64>, Query, description = "Resume after this seq"),
           ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this seq"),
           ("access_token" = Option<String>, Query, description = "The API key, for clients that cannot set headers (EventSource)")),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed id", body = crate::ErrorBody),
        (status = 404, description = "Unknown job", body = crate::ErrorBody),
        (status = 503, description = "A backend is down", body = crate::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn sse(
    State(state): State<AppState>,
    JobIdPath(id): JobIdPath,
    StreamOwner(owner): StreamOwner,
    Query(query): Query<SseQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let header_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty());
    let after = match (header_id, query.last_event_id.as_deref()) {
        (Some(h), _) => parse_seq(h, "Last-Event-ID")?,
        (None, Some(q)) if !q.trim().is_empty() => parse_seq(q, "lastEventId")?,
        _ => 0,
    };
    let outs = open(&state, id, &owner, after).await?;
    let guard = GaugeGuard::sse(&state);
    let metrics = std::sync::Arc::clone(&state.metrics);
    let events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> = outs
        .map(move |out| {
            let _alive = &guard;
            metrics
                .events_sent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Event::default()
                .id(out.seq.to_string())
                .event(out.kind)
                .data(out.json))
        })
        .boxed();
    let mut res = Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(state.config.sse_keep_alive)
                .text("keep-alive"),
        )
        .into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}

/// Query of the WebSocket route.
#[derive(Debug, Deserialize)]
pub(crate) struct WsQuery {
    after: Option<String>,
}

/// `GET {prefix}/subscribe/{jobId}` (WebSocket upgrade)
#[utoipa::path(get, path = "/v1/download/subscribe/{jobId}", tag = "Streams",
    summary = "Follow a job by WebSocket",
    description = "After the upgrade the server sends JSON text messages: first a `status` snapshot, then every event until the terminal one, then closes (code 1000). `?after=<seq>` resumes. The server pings every 30 s.",
    params(("jobId" = String, Path, format = Uuid),
           ("after" = Option<u64>, Query, description = "Resume after this seq"),
           ("access_token" = Option<String>, Query, description = "The API key, for clients that cannot set headers (browsers)")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Malformed id or not a WebSocket request", body = crate::ErrorBody),
        (status = 404, description = "Unknown job", body = crate::ErrorBody),
        (status = 503, description = "A backend is down", body = crate::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn websocket(
    State(state): State<AppState>,
    JobIdPath(id): JobIdPath,
    StreamOwner(owner): StreamOwner,
    Query(query): Query<WsQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let after = match query.after.as_deref() {
        Some(a) if !a.trim().is_empty() => parse_seq(a, "after")?,
        _ => 0,
    };
    let outs = open(&state, id, &owner, after).await?;
    let upgrade = upgrade.map_err(|r| {
        ApiError::new(r.status(), "upgrade_required", r.body_text())
            .with_header(header::UPGRADE, HeaderValue::from_static("websocket"))
    })?;
    let ping = state.config.ws_ping;
    let guard = GaugeGuard::ws(&state);
    Ok(upgrade.on_upgrade(move |socket| async move {
        let _alive = guard;
        pump(socket, outs, ping, &state).await;
    }))
}

/// How long a closing server waits for the client's Close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Sends a Close frame, then reads until the client's Close (or the wait ends). Dropping the
/// socket at once would close it with the client's unread frames (pongs to our pings) in its
/// receive buffer, which makes the kernel reset the connection, and a reset can discard the
/// last event and the Close frame before the client reads them.
async fn close(socket: &mut WebSocket, reason: &'static str) {
    let frame = CloseFrame {
        code: 1000,
        reason: reason.into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

async fn pump(
    mut socket: WebSocket,
    mut outs: BoxStream<'static, Out>,
    ping: Duration,
    state: &AppState,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + ping, ping);
    loop {
        tokio::select! {
            out = outs.next() => {
                let Some(out) = out else {
                    close(&mut socket, "stream ended").await;
                    return;
                };
                if socket.send(Message::text(out.json)).await.is_err() {
                    return;
                }
                state.metrics.events_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if out.terminal {
                    close(&mut socket, "job finished").await;
                    return;
                }
            }
            _ = ticker.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    }
}
