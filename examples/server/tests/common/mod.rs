//! Starts the built `longjob-server` binary on a free port and talks to it.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

/// A running server process, killed when dropped.
pub struct Server {
    child: Option<Child>,
    pub base: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Server {
    /// Starts the server with small delays, a generous rate limit and `env` on top, and waits
    /// until `/health` answers 200.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        Self::start_with(env, true).await
    }

    /// [`start`](Self::start), waiting until `/health` answers at all (200 or 503) when
    /// `healthy` is false.
    pub async fn start_with(env: &[(&str, &str)], healthy: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_longjob-server"));
        cmd.env_clear()
            .env("RUST_LOG", "info,tower_http=warn")
            .env("PORT", port.to_string())
            .env("HOST", "127.0.0.1")
            .env("BLOB_DIR", dir.path().join("blobs"))
            .env("DOWNLOAD_DELAY_MIN_MS", "200")
            .env("DOWNLOAD_DELAY_MAX_MS", "400")
            .env("RATE_LIMIT_MAX_REQUESTS", "100000")
            .env("JOBS_PER_HOUR", "1000")
            .env("SHUTDOWN_GRACE_MS", "2000");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("the longjob-server binary runs");
        let mut server = Self {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            port,
            dir,
            http: reqwest::Client::new(),
        };
        assert!(
            server.wait_ready(healthy).await,
            "longjob-server did not start:\n{}",
            server.log()
        );
        server
    }

    async fn wait_ready(&mut self, healthy: bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                eprintln!("server exited: {status}\n{}", self.log());
                return false;
            }
            if let Ok(r) = self.http.get(self.url("/health")).send().await {
                if r.status().is_success() || !healthy {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Initiates a download job and returns its id.
    pub async fn initiate(&self, ids: &[u64], key: Option<&str>) -> String {
        let mut req = self
            .http
            .post(self.url("/v1/download/initiate"))
            .json(&serde_json::json!({ "file_ids": ids }));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
        let body: Value = res.json().await.unwrap();
        body["jobId"].as_str().unwrap().to_owned()
    }

    /// Polls the job until `pred` holds on its status body.
    pub async fn wait_status(
        &self,
        id: &str,
        key: Option<&str>,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let mut req = self.http.get(self.url(&format!("/v1/download/job/{id}")));
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let body: Value = req.send().await.unwrap().json().await.unwrap();
            if pred(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not reach the expected state: {body}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_finished(&self, id: &str, key: Option<&str>) -> Value {
        self.wait_status(id, key, Duration::from_secs(20), |b| {
            matches!(
                b["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
        .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asserts the API's error shape, and that its requestId is the response's X-Request-ID.
pub async fn assert_error(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status().as_u16(), status);
    let rid = res
        .headers()
        .get("x-request-id")
        .expect("X-Request-ID on every response")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        res.headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["details"].is_array(), "{body}");
    assert_eq!(body["requestId"], rid, "{body}");
    body
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Value,
}

/// Reads SSE frames from a response.
pub struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl SseReader {
    pub fn new(res: reqwest::Response) -> Self {
        Self {
            stream: res.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` when the stream ends.
    pub async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..pos + 2).collect();
                let (mut id, mut event, mut data) = (None, None, String::new());
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                return Some(Sse {
                    id,
                    event,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.stream.next())
                .await
                .expect("an SSE event within 20 s")?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk.ok()?));
        }
    }
}

pub fn blob_dir(server: &Server) -> PathBuf {
    server.dir.path().join("blobs")
}
