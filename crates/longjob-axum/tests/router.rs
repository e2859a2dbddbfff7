//! The router mounted in a host application, served on a real socket over the in-memory
//! backends: custom prefix and authenticator, host routes untouched, keep-alive and pings.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use futures::StreamExt;
use longjob_axum::{ApiBuilder, ApiError, Authenticate, HttpConfig};
use longjob_core::signing::UrlSigner;
use longjob_core::{JobContext, JobResult, LongJob, SubmitRequest, WorkerHandle};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug)]
struct UserHeader;

#[async_trait]
impl Authenticate for UserHeader {
    async fn authenticate(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        headers
            .get("x-user")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| ApiError::unauthorized("missing X-User"))
    }
}

async fn serve() -> (String, LongJob, WorkerHandle) {
    let lj = LongJob::in_memory(UrlSigner::random("http://127.0.0.1/files"));
    let worker = lj
        .worker()
        .handle("slow", |ctx: JobContext, steps: u64| async move {
            for i in 1..=steps {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(150)) => {}
                    () = ctx.cancellation().cancelled() => return Err(longjob_core::JobError::internal("cancelled")),
                }
                ctx.progress(i, steps).await;
            }
            Ok(None::<JobResult>)
        })
        .start();
    let config = HttpConfig {
        sse_keep_alive: Duration::from_millis(100),
        ws_ping: Duration::from_millis(100),
        ..HttpConfig::default()
    };
    let host = Router::new()
        .route("/mine", get(|| async { "my own route" }))
        .route("/boom", get(boom));
    let app = ApiBuilder::new(lj.clone())
        .config(config)
        .prefix("/api/jobs")
        .authenticate(UserHeader)
        .build_with(host);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("127.0.0.1:{}", addr.port()), lj, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_under_a_prefix_with_the_hosts_own_auth_and_routes() {
    let (addr, lj, _worker) = serve().await;
    let http = reqwest::Client::new();
    let res = http
        .get(format!("http://{addr}/mine"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "my own route");

    // A panic is a JSON 500 that leaks nothing.
    let res = http
        .get(format!("http://{addr}/boom"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "internal_error");
    assert!(!body.to_string().contains("boom"));

    let job = lj
        .submit(SubmitRequest::new("slow", "carol", serde_json::json!(2)))
        .await
        .unwrap()
        .job;
    let url = format!("http://{addr}/api/jobs/job/{}", job.id);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    let res = http
        .get(&url)
        .header("x-user", "dave")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = http
        .get(&url)
        .header("x-user", "carol")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["jobId"], job.id.to_string());
    assert_eq!(body["files"], serde_json::json!([]));
    // The download endpoints are not mounted without a Downloads domain, nor the file route.
    let res = http
        .post(format!("http://{addr}/api/jobs/initiate"))
        .json(&serde_json::json!({"file_ids": [70000]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let doc: Value = http
        .get(format!("http://{addr}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.contains_key("/api/jobs/job/{jobId}"));
    assert!(paths.contains_key("/api/jobs/stream/{jobId}"));
    assert!(!paths.keys().any(|p| p.starts_with("/v1/download")));
    assert!(!paths.contains_key("/api/jobs/initiate"));
    assert!(!paths.contains_key("/api/jobs/files/{key}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_sends_keep_alive_comments_and_websocket_pings() {
    let (addr, lj, _worker) = serve().await;
    let job = lj
        .submit(SubmitRequest::new("slow", "carol", serde_json::json!(4)))
        .await
        .unwrap()
        .job;
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/api/jobs/stream/{}", job.id))
        .header("x-user", "carol")
        .send()
        .await
        .unwrap();
    let mut body = res.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.contains(": keep-alive"), "{text}");
    assert!(text.contains("event: completed"), "{text}");

    let job = lj
        .submit(SubmitRequest::new("slow", "carol", serde_json::json!(4)))
        .await
        .unwrap()
        .job;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{addr}/api/jobs/subscribe/{}", job.id),
    )
    .unwrap();
    req.headers_mut().insert("x-user", "carol".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let (mut pings, mut last) = (0, Value::Null);
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Ping(_) => pings += 1,
            Message::Text(t) => last = serde_json::from_str(&t).unwrap(),
            _ => {}
        }
    }
    assert!(pings >= 1, "pings while the job runs");
    assert_eq!(last["type"], "completed");
}

async fn boom() -> &'static str {
    panic!("boom")
}
