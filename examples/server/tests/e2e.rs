//! End to end: the built `longjob-server` binary as a process, driven over HTTP, SSE and
//! WebSocket.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Server, SseReader, assert_error};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const FIRST: &str = "/v1/download";

#[tokio::test]
async fn a_whole_job_over_http_status_etag_download_and_range() {
    let s = Server::start(&[]).await;
    let res = s
        .post_json(
            "/v1/download/initiate",
            &json!({"file_ids": [70000, 70001, 70007]}),
        )
        .await;
    assert_eq!(res.status(), 202);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = res.json().await.unwrap();
    let id = body["jobId"].as_str().unwrap().to_owned();
    assert_eq!(body["status"], "queued");
    assert_eq!(body["totalFileIds"], 3);
    assert_eq!(location, format!("{FIRST}/job/{id}"));
    assert_eq!(body["statusUrl"], location);
    assert_eq!(body["streamUrl"], format!("{FIRST}/stream/{id}"));
    assert_eq!(body["subscribeUrl"], format!("{FIRST}/subscribe/{id}"));
    assert_eq!(
        body["downloadUrlEndpoint"],
        format!("{FIRST}/job/{id}/download-url")
    );

    // While unfinished: Retry-After: 2, an ETag, and 304 on If-None-Match.
    let res = s.get(&location).await;
    assert_eq!(res.status(), 200);
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();
    let unfinished = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let first: Value = res.json().await.unwrap();
    if !matches!(first["status"].as_str(), Some("completed" | "failed")) {
        assert_eq!(unfinished.as_deref(), Some("2"));
    }
    let res = s
        .http
        .get(s.url(&location))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert!(
        res.status() == 304 || res.headers()["etag"].to_str().unwrap() != etag,
        "an unchanged job answers 304"
    );

    // Download URL before completion: 409 (when still running).
    let early = s.get(&format!("{FIRST}/job/{id}/download-url")).await;
    if early.status() != 200 {
        assert_error(early, 409, "conflict").await;
    }

    let done = s.wait_finished(&id, None).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["progress"]["current"], 3);
    assert_eq!(done["progress"]["total"], 3);
    assert_eq!(done["progress"]["percentage"], 100.0);
    assert_eq!(done["attempt"], 1);
    assert!(done["maxAttempts"].as_u64().unwrap() >= 1);
    for k in ["createdAt", "updatedAt", "startedAt", "finishedAt"] {
        assert!(done[k].is_string(), "{k} in {done}");
    }
    let files = done["files"].as_array().unwrap();
    assert_eq!(files[0]["file_id"], 70000);
    assert_eq!(files[0]["status"], "completed");
    assert!(files[0]["size"].as_u64().unwrap() > 0);
    assert_eq!(files[1]["file_id"], 70001);
    assert_eq!(files[1]["status"], "failed");
    assert!(files[1]["error"].is_string());
    assert_eq!(files[2]["file_id"], 70007);
    // Finished: no polling hint; 304 with the final ETag.
    let res = s.get(&location).await;
    assert!(res.headers().get("retry-after").is_none());
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();
    let res = s
        .http
        .get(s.url(&location))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 304);

    let res = s.get(&format!("{FIRST}/job/{id}/download-url")).await;
    assert_eq!(res.status(), 200);
    let url: Value = res.json().await.unwrap();
    assert_eq!(url["jobId"], id.as_str());
    assert!(url["expiresIn"].as_u64().unwrap() > 0);
    assert!(url["expiresAt"].is_string());
    assert!(url["fileName"].as_str().unwrap().ends_with(".zip"));
    let size = url["fileSize"].as_u64().unwrap();
    let link = url["downloadUrl"].as_str().unwrap().to_owned();

    let res = s.http.get(&link).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment;")
    );
    assert_eq!(res.headers()["accept-ranges"], "bytes");
    let bytes = res.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, size);
    assert_eq!(&bytes[..2], b"PK");
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let names: Vec<String> = archive.file_names().map(str::to_owned).collect();
    assert_eq!(archive.len(), 2, "{names:?}");
    assert!(names.contains(&"70000.zip".to_owned()) && names.contains(&"70007.zip".to_owned()));
    let _ = archive.by_name("70000.zip").unwrap();

    let res = s
        .http
        .get(&link)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 206);
    assert_eq!(
        res.headers()["content-range"].to_str().unwrap(),
        format!("bytes 10-19/{size}")
    );
    assert_eq!(&res.bytes().await.unwrap()[..], &bytes[10..20]);
    let res = s
        .http
        .get(&link)
        .header("range", format!("bytes={size}-"))
        .send()
        .await
        .unwrap();
    assert_error(res, 416, "range_not_satisfiable").await;

    // Tampered and expired signatures: 403.
    let tampered = link.replace("sig=", "sig=00");
    assert_error(
        s.http.get(&tampered).send().await.unwrap(),
        403,
        "forbidden",
    )
    .await;
    let (path, _) = link.split_once('?').unwrap();
    let expired = format!("{path}?expires=1000&name=x.zip&sig=abcd");
    assert_error(s.http.get(&expired).send().await.unwrap(), 403, "forbidden").await;
    let unsigned = path.to_owned();
    assert_error(
        s.http.get(&unsigned).send().await.unwrap(),
        403,
        "forbidden",
    )
    .await;

    // A completed job cannot be cancelled or retried: 409.
    let res = s
        .http
        .post(s.url(&format!("{FIRST}/job/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_error(res, 409, "conflict").await;
    let res = s
        .http
        .post(s.url(&format!("{FIRST}/job/{id}/retry")))
        .send()
        .await
        .unwrap();
    assert_error(res, 409, "conflict").await;
}

#[tokio::test]
async fn every_error_is_the_json_error_of_the_api() {
    let s = Server::start(&[]).await;
    // 404 route, 405 method.
    assert_error(s.get("/nope").await, 404, "not_found").await;
    let res = s.http.delete(s.url("/health")).send().await.unwrap();
    assert_error(res, 405, "method_not_allowed").await;
    let res = s
        .http
        .get(s.url(&format!("{FIRST}/initiate")))
        .send()
        .await
        .unwrap();
    assert_error(res, 405, "method_not_allowed").await;
    // 415 text/plain, 400 malformed JSON, 400 wrong fields.
    let res = s
        .http
        .post(s.url(&format!("{FIRST}/initiate")))
        .header("content-type", "text/plain")
        .body("{\"file_ids\":[70000]}")
        .send()
        .await
        .unwrap();
    assert_error(res, 415, "unsupported_media_type").await;
    let res = s
        .http
        .post(s.url(&format!("{FIRST}/initiate")))
        .header("content-type", "application/json")
        .body("{\"file_ids\": [70000,")
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "validation_error").await;
    for bad in [
        json!({}),
        json!({"file_ids": "70000"}),
        json!({"file_ids": []}),
        json!({"file_ids": [9999]}),
        json!({"file_ids": [100000001]}),
        json!({"file_ids": (0..1001).map(|i| 10000 + i).collect::<Vec<_>>()}),
    ] {
        let res = s.post_json(&format!("{FIRST}/initiate"), &bad).await;
        assert_error(res, 400, "validation_error").await;
    }
    let body = assert_error(
        s.post_json(
            &format!("{FIRST}/initiate"),
            &json!({"file_ids": [70000, 5]}),
        )
        .await,
        400,
        "validation_error",
    )
    .await;
    assert_eq!(body["error"]["details"][0]["field"], "file_ids[1]");
    for bad in [json!({"file_id": 9999}), json!({"file_id": "x"}), json!({})] {
        let res = s.post_json(&format!("{FIRST}/check"), &bad).await;
        assert_error(res, 400, "validation_error").await;
    }
    // 413 over 1 MiB.
    let big = format!("{{\"file_ids\": [{}70000]}}", " ".repeat(1024 * 1024 + 10));
    let res = s
        .http
        .post(s.url(&format!("{FIRST}/initiate")))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_error(res, 413, "payload_too_large").await;
    // 400 malformed job id, 404 unknown job, on every job route.
    let unknown = "0190f0a0-0000-7000-8000-000000000000";
    for (method, path) in [
        ("GET", "/job/{}"),
        ("POST", "/job/{}/retry"),
        ("POST", "/job/{}/cancel"),
        ("GET", "/job/{}/download-url"),
        ("GET", "/stream/{}"),
        ("GET", "/subscribe/{}"),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let res = s
            .http
            .request(
                m.clone(),
                s.url(&format!("{FIRST}{}", path.replace("{}", "not-a-uuid"))),
            )
            .send()
            .await
            .unwrap();
        assert_error(res, 400, "validation_error").await;
        let res = s
            .http
            .request(m, s.url(&format!("{FIRST}{}", path.replace("{}", unknown))))
            .send()
            .await
            .unwrap();
        assert_error(res, 404, "not_found").await;
    }
    // X-Request-ID is echoed; the security headers are there; CORS preflight is 204.
    let res = s
        .http
        .get(s.url("/health"))
        .header("x-request-id", "my-request-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "my-request-1");
    for h in [
        "x-content-type-options",
        "x-frame-options",
        "strict-transport-security",
        "referrer-policy",
    ] {
        assert!(res.headers().contains_key(h), "{h}");
    }
    let res = s
        .http
        .request(
            reqwest::Method::OPTIONS,
            s.url(&format!("{FIRST}/initiate")),
        )
        .header("origin", "http://example.test")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,idempotency-key",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert!(res.headers().contains_key("access-control-max-age"));
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn cors_origins_list_is_enforced() {
    let s = Server::start(&[("CORS_ORIGINS", "http://good.test, http://other.test")]).await;
    let res = s
        .http
        .get(s.url("/health"))
        .header("origin", "http://good.test")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "http://good.test"
    );
    let res = s
        .http
        .get(s.url("/health"))
        .header("origin", "http://evil.test")
        .send()
        .await
        .unwrap();
    assert!(!res.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn api_keys_and_two_owners_who_cannot_see_each_other() {
    let s = Server::start(&[("API_KEYS", "ka:alice,kb:bob")]).await;
    let res = s
        .post_json(&format!("{FIRST}/initiate"), &json!({"file_ids": [70000]}))
        .await;
    assert_error(res, 401, "unauthorized").await;
    let res = s
        .http
        .post(s.url(&format!("{FIRST}/check")))
        .bearer_auth("wrong")
        .json(&json!({"file_id": 70000}))
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "unauthorized").await;
    // Public routes need no key.
    assert_eq!(s.get("/health").await.status(), 200);

    let id = s.initiate(&[70000, 70007], Some("ka")).await;
    let mine = s.wait_finished(&id, Some("ka")).await;
    assert_eq!(mine["status"], "completed");
    for (method, path) in [
        ("GET", format!("/job/{id}")),
        ("POST", format!("/job/{id}/retry")),
        ("POST", format!("/job/{id}/cancel")),
        ("GET", format!("/job/{id}/download-url")),
        ("GET", format!("/stream/{id}")),
        ("GET", format!("/subscribe/{id}")),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let res = s
            .http
            .request(m, s.url(&format!("{FIRST}{path}")))
            .bearer_auth("kb")
            .send()
            .await
            .unwrap();
        assert_error(res, 404, "not_found").await;
    }
    let res = s
        .http
        .get(s.url(&format!("{FIRST}/job/{id}/download-url")))
        .bearer_auth("ka")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Browsers cannot set headers on EventSource and WebSocket: ?access_token= works there.
    let res = s.get(&format!("{FIRST}/stream/{id}?access_token=ka")).await;
    assert_eq!(res.status(), 200);
    let mut sse = SseReader::new(res);
    assert_eq!(sse.next().await.unwrap().data["status"], "completed");
    let res = s.get(&format!("{FIRST}/stream/{id}?access_token=kb")).await;
    assert_error(res, 404, "not_found").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://127.0.0.1:{}{FIRST}/subscribe/{id}?access_token=ka",
        s.port
    ))
    .await
    .unwrap();
    let first = ws.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("\"completed\""));
    // …but not on the other routes.
    let res = s.get(&format!("{FIRST}/job/{id}?access_token=ka")).await;
    assert_error(res, 401, "unauthorized").await;

    // The same idempotency key from another owner is another job.
    let post = |key: &'static str| {
        s.http
            .post(s.url(&format!("{FIRST}/initiate")))
            .bearer_auth(key)
            .header("idempotency-key", "same-key")
            .json(&json!({"file_ids": [70000]}))
            .send()
    };
    let a: Value = post("ka").await.unwrap().json().await.unwrap();
    let b: Value = post("kb").await.unwrap().json().await.unwrap();
    assert_ne!(a["jobId"], b["jobId"]);
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job_with_200() {
    let s = Server::start(&[]).await;
    let post = |key: &'static str| {
        s.http
            .post(s.url(&format!("{FIRST}/initiate")))
            .header("idempotency-key", key)
            .json(&json!({"file_ids": [70000, 70007]}))
            .send()
    };
    let first = post("order-1").await.unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let again = post("order-1").await.unwrap();
    assert_eq!(again.status(), 200);
    assert!(again.headers().contains_key("location"));
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["jobId"], again["jobId"]);
    let other: Value = post("order-2").await.unwrap().json().await.unwrap();
    assert_ne!(first["jobId"], other["jobId"]);
}

#[tokio::test]
async fn rate_limit_answers_429_with_headers() {
    let s = Server::start(&[
        ("RATE_LIMIT_MAX_REQUESTS", "3"),
        ("RATE_LIMIT_WINDOW_MS", "60000"),
    ])
    .await;
    for i in 0..3 {
        let res = s
            .post_json(&format!("{FIRST}/check"), &json!({"file_id": 70000}))
            .await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["ratelimit-limit"], "3");
        assert_eq!(
            res.headers()["ratelimit-remaining"].to_str().unwrap(),
            (2 - i).to_string()
        );
        assert!(res.headers().contains_key("ratelimit-reset"));
    }
    let res = s
        .post_json(&format!("{FIRST}/check"), &json!({"file_id": 70000}))
        .await;
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after));
    assert_eq!(res.headers()["ratelimit-limit"], "3");
    assert_eq!(res.headers()["ratelimit-remaining"], "0");
    assert!(res.headers().contains_key("ratelimit-reset"));
    assert_error(res, 429, "rate_limited").await;
    // Probes are not limited.
    assert_eq!(s.get("/health").await.status(), 200);

    // Behind a proxy, clients are told apart by X-Forwarded-For.
    let s = Server::start(&[
        ("RATE_LIMIT_MAX_REQUESTS", "1"),
        ("RATE_LIMIT_WINDOW_MS", "60000"),
        ("TRUST_PROXY", "true"),
    ])
    .await;
    let check = |ip: &'static str| {
        s.http
            .post(s.url(&format!("{FIRST}/check")))
            .header("x-forwarded-for", ip)
            .json(&json!({"file_id": 70000}))
            .send()
    };
    assert_eq!(check("10.0.0.1").await.unwrap().status(), 200);
    assert_eq!(check("10.0.0.1").await.unwrap().status(), 429);
    assert_eq!(check("10.0.0.2").await.unwrap().status(), 200);
}

#[tokio::test]
async fn jobs_per_hour_and_active_jobs_quotas_answer_429() {
    let s = Server::start(&[("JOBS_PER_HOUR", "2")]).await;
    s.initiate(&[70000], None).await;
    s.initiate(&[70000], None).await;
    let res = s
        .post_json(&format!("{FIRST}/initiate"), &json!({"file_ids": [70000]}))
        .await;
    assert!(res.headers().contains_key("retry-after"));
    assert_error(res, 429, "quota_exceeded").await;

    let s = Server::start(&[
        ("MAX_ACTIVE_JOBS_PER_OWNER", "1"),
        ("DOWNLOAD_DELAY_MIN_MS", "5000"),
        ("DOWNLOAD_DELAY_MAX_MS", "5000"),
    ])
    .await;
    let id = s.initiate(&[70000], None).await;
    let res = s
        .post_json(&format!("{FIRST}/initiate"), &json!({"file_ids": [70000]}))
        .await;
    assert_error(res, 429, "quota_exceeded").await;
    // Cancelling the active job frees the slot.
    let res = s
        .http
        .post(s.url(&format!("{FIRST}/job/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    s.initiate(&[70000], None).await;
}

#[tokio::test]
async fn a_full_memory_store_evicts_finished_jobs_then_answers_503_store_full() {
    let s = Server::start(&[
        ("MEMORY_MAX_JOBS", "2"),
        ("WORKER_CONCURRENCY", "1"),
        ("DOWNLOAD_DELAY_MIN_MS", "3000"),
        ("DOWNLOAD_DELAY_MAX_MS", "3000"),
    ])
    .await;
    // Its file is unavailable: it fails after the delay, and is the one evicted to make room.
    let finished = s.initiate(&[70001], None).await;
    s.wait_status(&finished, None, Duration::from_secs(10), |b| {
        b["status"] == "failed"
    })
    .await;
    // One runs for 3 s, the other waits for the only worker slot.
    let running = s.initiate(&[70000], None).await;
    let last = s.initiate(&[70000], None).await;
    assert_eq!(
        s.get(&format!("{FIRST}/job/{finished}")).await.status(),
        404
    );
    for id in [&running, &last] {
        assert_eq!(s.get(&format!("{FIRST}/job/{id}")).await.status(), 200);
    }
    // Both kept jobs are unfinished: a new one is refused, saying why.
    let res = s
        .post_json(&format!("{FIRST}/initiate"), &json!({"file_ids": [70000]}))
        .await;
    assert_eq!(res.headers()["retry-after"], "5");
    let body = assert_error(res, 503, "store_full").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 2 jobs"), "{message}");
}

#[tokio::test]
async fn sse_resumes_after_a_dropped_connection_without_loss_or_repeat() {
    let s = Server::start(&[
        ("DOWNLOAD_DELAY_MIN_MS", "1500"),
        ("DOWNLOAD_DELAY_MAX_MS", "1500"),
    ])
    .await;
    let ids: Vec<u64> = (0..8).map(|i| 70_000 + i * 7).collect();
    let id = s.initiate(&ids, None).await;

    let res = s.get(&format!("{FIRST}/stream/{id}")).await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(res.headers()["cache-control"], "no-cache");
    assert_eq!(res.headers()["x-accel-buffering"], "no");
    let mut sse = SseReader::new(res);
    let snapshot = sse.next().await.unwrap();
    assert_eq!(snapshot.event.as_deref(), Some("status"));
    assert_eq!(snapshot.data["type"], "status");
    assert_eq!(snapshot.data["jobId"], id.as_str());
    let mut seen: Vec<u64> = Vec::new();
    let mut last_id = String::new();
    while seen.len() < 4 {
        let e = sse.next().await.expect("events before the drop");
        let seq = e.data["seq"].as_u64().unwrap();
        assert_eq!(e.id.as_deref(), Some(seq.to_string().as_str()));
        assert_eq!(e.event.as_deref(), e.data["type"].as_str());
        last_id = seq.to_string();
        seen.push(seq);
        assert!(!matches!(
            e.data["type"].as_str(),
            Some("completed" | "failed")
        ));
    }
    drop(sse); // the connection drops mid-job

    let res = s
        .http
        .get(s.url(&format!("{FIRST}/stream/{id}")))
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(res);
    let snapshot = sse.next().await.unwrap();
    assert_eq!(snapshot.data["type"], "status");
    let mut terminal = None;
    while let Some(e) = sse.next().await {
        let seq = e.data["seq"].as_u64().unwrap();
        seen.push(seq);
        if e.data["type"] == "completed" {
            assert!(e.data["downloadUrl"].is_string());
            terminal = Some(seq);
        }
    }
    let terminal = terminal.expect("the stream ends after the terminal event");
    assert_eq!(*seen.last().unwrap(), terminal);
    let expected: Vec<u64> = (1..=terminal).collect();
    assert_eq!(
        seen, expected,
        "no event lost or repeated across the reconnect"
    );
    let progress_events = {
        let res = s.get(&format!("{FIRST}/stream/{id}?lastEventId=0")).await;
        let mut sse = SseReader::new(res);
        let mut all = Vec::new();
        while let Some(e) = sse.next().await {
            all.push(e);
        }
        // Snapshot, then every retained event again, then the end.
        assert_eq!(all[0].data["type"], "status");
        let seqs: Vec<u64> = all[1..]
            .iter()
            .map(|e| e.data["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, expected);
        all.iter().filter(|e| e.data["type"] == "progress").count()
    };
    assert!(
        progress_events >= ids.len(),
        "a progress event per file at least"
    );
}

#[tokio::test]
async fn websocket_follows_a_job_resumes_with_after_and_closes_after_the_terminal_event() {
    let s = Server::start(&[
        ("DOWNLOAD_DELAY_MIN_MS", "600"),
        ("DOWNLOAD_DELAY_MAX_MS", "600"),
    ])
    .await;
    let id = s.initiate(&[70000, 70007, 70014], None).await;
    let url = format!("ws://127.0.0.1:{}{FIRST}/subscribe/{id}", s.port);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut msgs: Vec<Value> = Vec::new();
    let mut closed = false;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .unwrap()
    {
        match msg.unwrap() {
            Message::Text(t) => msgs.push(serde_json::from_str(&t).unwrap()),
            Message::Close(frame) => {
                assert_eq!(u16::from(frame.unwrap().code), 1000);
                closed = true;
            }
            _ => {}
        }
    }
    assert!(closed, "the server closes after the terminal event");
    assert_eq!(msgs[0]["type"], "status", "a snapshot first");
    assert_eq!(msgs.last().unwrap()["type"], "completed");
    let seqs: Vec<u64> = msgs[1..]
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    let first = seqs[0];
    assert_eq!(seqs, (first..first + seqs.len() as u64).collect::<Vec<_>>());

    // ?after= resumes: only the events after that seq (the job is finished by now).
    let after = seqs[seqs.len() - 3];
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?after={after}"))
        .await
        .unwrap();
    let mut resumed = Vec::new();
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = msg {
            resumed.push(serde_json::from_str::<Value>(&t).unwrap());
        }
    }
    assert_eq!(resumed[0]["type"], "status");
    assert_eq!(resumed[0]["status"], "completed");
    let resumed: Vec<u64> = resumed[1..]
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(resumed, seqs[seqs.len() - 2..].to_vec());
    let _ = ws.close(None).await;

    // A client message does not disturb the stream; a plain GET is not an upgrade.
    let id2 = s.initiate(&[70000], None).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://127.0.0.1:{}{FIRST}/subscribe/{id2}",
        s.port
    ))
    .await
    .unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    let mut last = Value::Null;
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = msg {
            last = serde_json::from_str(&t).unwrap();
        }
    }
    assert_eq!(last["type"], "completed");
    let res = s.get(&format!("{FIRST}/subscribe/{id2}")).await;
    assert!(res.status().is_client_error());
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
}

#[tokio::test]
async fn cancel_stops_a_running_job_within_a_second_and_retry_requeues_it() {
    // One worker slot: the next job can start only once the cancelled handler has stopped.
    let s = Server::start(&[
        ("DOWNLOAD_DELAY_MIN_MS", "20000"),
        ("DOWNLOAD_DELAY_MAX_MS", "20000"),
        ("WORKER_CONCURRENCY", "1"),
    ])
    .await;
    let id = s.initiate(&[70000, 70007], None).await;
    s.wait_status(&id, None, Duration::from_secs(10), |b| {
        b["status"] == "processing"
    })
    .await;
    let next = s.initiate(&[70014], None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting: Value = s
        .get(&format!("{FIRST}/job/{next}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(waiting["status"], "queued", "the only worker slot is busy");
    let res = s
        .http
        .post(s.url(&format!("{FIRST}/job/{id}/cancel")))
        .send()
        .await
        .unwrap();
    let cancelled_at = Instant::now();
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["jobId"], id.as_str());
    assert_eq!(body["status"], "cancelled");
    let status = s
        .wait_status(&id, None, Duration::from_secs(1), |b| {
            b["status"] == "cancelled"
        })
        .await;
    assert!(
        status["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["status"] != "completed")
    );
    s.wait_status(&next, None, Duration::from_secs(3), |b| {
        b["status"] == "processing"
    })
    .await;
    let freed = cancelled_at.elapsed();
    assert!(
        freed < Duration::from_millis(1500),
        "the cancelled handler stopped and freed its slot in {freed:?}"
    );
    // Cancelled twice: 409. Download URL of a cancelled job: 409.
    let res = s
        .http
        .post(s.url(&format!("{FIRST}/job/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_error(res, 409, "conflict").await;
    let res = s.get(&format!("{FIRST}/job/{id}/download-url")).await;
    assert_error(res, 409, "conflict").await;
    // Retry: 202 queued.
    let res = s
        .http
        .post(s.url(&format!("{FIRST}/job/{id}/retry")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["jobId"], id.as_str());
    assert_eq!(body["status"], "queued");
    assert!(body["attempt"].is_u64());
}

#[tokio::test]
async fn a_job_without_any_available_file_fails_with_validation_after_one_attempt() {
    let s = Server::start(&[]).await;
    let id = s.initiate(&[70001, 70002], None).await;
    let done = s.wait_finished(&id, None).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["kind"], "validation");
    assert_eq!(done["attempt"], 1);
    assert!(
        done["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["status"] == "failed")
    );
    let res = s.get(&format!("{FIRST}/job/{id}/download-url")).await;
    assert_error(res, 409, "conflict").await;
    let res = s
        .http
        .post(s.url(&format!("{FIRST}/job/{id}/retry")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let again = s
        .wait_status(&id, None, Duration::from_secs(20), |b| {
            b["status"] == "failed" && b["attempt"] == 2
        })
        .await;
    assert_eq!(again["error"]["kind"], "validation");
}

#[tokio::test]
async fn the_original_three_endpoints_keep_their_field_names() {
    let s = Server::start(&[
        ("DOWNLOAD_DELAY_MIN_MS", "300"),
        ("DOWNLOAD_DELAY_MAX_MS", "300"),
    ])
    .await;
    let res = s
        .post_json(&format!("{FIRST}/check"), &json!({"file_id": 70000}))
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["file_id"], 70000);
    assert_eq!(body["available"], true);
    assert_eq!(body["s3Key"], "downloads/70000.zip");
    let size = body["size"].as_u64().unwrap();
    let again: Value = s
        .post_json(&format!("{FIRST}/check"), &json!({"file_id": 70000}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["size"], size, "the size is deterministic");
    let body: Value = s
        .post_json(&format!("{FIRST}/check"), &json!({"file_id": 70001}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        body,
        json!({"file_id": 70001, "available": false, "s3Key": null, "size": null})
    );

    let started = Instant::now();
    let res = s
        .post_json(&format!("{FIRST}/start"), &json!({"file_id": 70000}))
        .await;
    assert_eq!(res.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "it waits the delay"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["file_id"], 70000);
    assert_eq!(body["status"], "completed");
    assert_eq!(body["size"], size);
    assert!(body["processingTimeMs"].as_u64().unwrap() >= 300);
    assert!(body["message"].is_string());
    let link = body["downloadUrl"].as_str().unwrap();
    let file = s.http.get(link).send().await.unwrap();
    assert_eq!(file.status(), 200);
    let bytes = file.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, size);
    let mut inner = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    assert_eq!(inner.len(), 1);
    assert!(inner.by_index(0).unwrap().name().contains("70000"));

    let body: Value = s
        .post_json(&format!("{FIRST}/start"), &json!({"file_id": 70001}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "failed");
    assert_eq!(body["downloadUrl"], Value::Null);
    assert_eq!(body["size"], Value::Null);
    assert!(body["processingTimeMs"].is_u64());
    assert!(body["message"].is_string());
}

#[tokio::test]
async fn start_is_bounded_by_the_request_timeout() {
    let s = Server::start(&[
        ("DOWNLOAD_DELAY_MIN_MS", "3000"),
        ("DOWNLOAD_DELAY_MAX_MS", "3000"),
        ("REQUEST_TIMEOUT_MS", "300"),
    ])
    .await;
    let started = Instant::now();
    let res = s
        .post_json(&format!("{FIRST}/start"), &json!({"file_id": 70000}))
        .await;
    assert_error(res, 504, "timeout").await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_disabled_delay_really_is_disabled() {
    for off in ["false", "0"] {
        let s = Server::start(&[
            ("DOWNLOAD_DELAY_ENABLED", off),
            ("DOWNLOAD_DELAY_MIN_MS", "60000"),
            ("DOWNLOAD_DELAY_MAX_MS", "60000"),
        ])
        .await;
        let started = Instant::now();
        let res = s
            .post_json(&format!("{FIRST}/start"), &json!({"file_id": 70000}))
            .await;
        assert_eq!(res.status(), 200);
        let id = s.initiate(&[70000, 70007], None).await;
        let done = s.wait_finished(&id, None).await;
        assert_eq!(done["status"], "completed");
        assert!(started.elapsed() < Duration::from_secs(5), "{off}");
    }
}

#[tokio::test]
async fn health_metrics_openapi_docs_and_demo() {
    let s = Server::start(&[]).await;
    let body: Value = s.get("/health").await.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "healthy", "checks": {"storage": "ok", "store": "ok", "queue": "ok", "bus": "ok"}})
    );
    s.initiate(&[70000], None).await;
    let res = s.get("/metrics").await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    for name in [
        "longjob_http_requests_total{class=\"2xx\"}",
        "longjob_jobs_submitted_total 1",
        "longjob_sse_streams",
        "longjob_websocket_streams",
        "# TYPE longjob_http_requests_total counter",
    ] {
        assert!(text.contains(name), "{name} in\n{text}");
    }
    for path in ["/openapi.json", "/openapi"] {
        let doc: Value = s.get(path).await.json().await.unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/download/initiate",
            "/v1/download/check",
            "/v1/download/start",
            "/v1/download/job/{jobId}",
            "/v1/download/job/{jobId}/retry",
            "/v1/download/job/{jobId}/cancel",
            "/v1/download/job/{jobId}/download-url",
            "/v1/download/stream/{jobId}",
            "/v1/download/subscribe/{jobId}",
            "/v1/download/files/{key}",
            "/health",
            "/metrics",
            "/openapi.json",
            "/docs",
        ] {
            assert!(paths.contains_key(p), "{p} in the OpenAPI document");
        }
        assert_eq!(paths["/v1/download/start"]["post"]["deprecated"], true);
        let initiate = &paths["/v1/download/initiate"]["post"]["responses"];
        for code in ["202", "400", "413", "415", "429"] {
            assert!(initiate.get(code).is_some(), "initiate documents {code}");
        }
        // Every operation documents the errors the layers around it can answer.
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                let mut expected = vec!["500", "504"];
                if path != "/health" && path != "/metrics" {
                    expected.push("429");
                }
                if op.get("requestBody").is_some() {
                    expected.extend(["400", "413", "415"]);
                }
                if path.starts_with("/v1/download") && !path.starts_with("/v1/download/files") {
                    expected.push("401");
                }
                for code in expected {
                    assert!(
                        responses.contains_key(code),
                        "{method} {path} documents {code}"
                    );
                    let body = &responses[code]["content"]["application/json"]["schema"];
                    assert_eq!(
                        body["$ref"], "#/components/schemas/ErrorBody",
                        "{method} {path} {code}"
                    );
                }
            }
        }
        assert!(
            doc["info"]["description"].as_str().unwrap().contains("405"),
            "the document says how unknown paths and methods are answered"
        );
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        // The original's schemas: every field required, the optional ones nullable.
        let required = |name: &str| -> Vec<String> {
            schemas[name]["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        for f in ["file_id", "available", "s3Key", "size"] {
            assert!(required("CheckResponse").contains(&f.to_owned()), "{f}");
        }
        for f in [
            "file_id",
            "status",
            "downloadUrl",
            "size",
            "processingTimeMs",
            "message",
        ] {
            assert!(required("StartResponse").contains(&f.to_owned()), "{f}");
        }
        for name in [
            "ErrorBody",
            "JobStatusBody",
            "InitiateResponse",
            "CheckResponse",
            "StartResponse",
        ] {
            assert!(schemas.contains_key(name), "{name}");
        }
    }
    let res = s.get("/docs").await;
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("openapi.json"));
    let res = s.get("/demo").await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let root: Value = s.get("/").await.json().await.unwrap();
    assert_eq!(root["docs"], "/docs");
}

#[cfg(unix)]
#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    // A job of 1.2 s, running when the signal comes, finishes within the grace period (2 s).
    let mut s = Server::start(&[
        ("DOWNLOAD_DELAY_MIN_MS", "1200"),
        ("DOWNLOAD_DELAY_MAX_MS", "1200"),
    ])
    .await;
    let start_line = s.log();
    assert!(
        start_line.contains("store=memory queue=memory bus=memory")
            && start_line.contains(&format!("docs {}", s.url("/docs")))
            && start_line.contains(&format!("demo {}", s.url("/demo"))),
        "the start line names the backends and the URLs of /docs and /demo:\n{start_line}"
    );
    let id = s.initiate(&[70000], None).await;
    s.wait_status(&id, None, Duration::from_secs(10), |b| {
        b["status"] == "processing"
    })
    .await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = s
        .wait_exit(Duration::from_secs(10))
        .expect("the server exits after SIGTERM");
    assert!(exit.success(), "{exit:?}\n{}", s.log());
    let log = s.log();
    let draining = log.find("shutting down").expect("the drain is logged");
    let completed = log
        .lines()
        .position(|l| l.contains(&id) && l.contains("completed"))
        .map(|n| log.lines().take(n).map(|l| l.len() + 1).sum::<usize>())
        .unwrap_or_else(|| panic!("the running job completed before the exit:\n{log}"));
    assert!(
        completed > draining,
        "the job finished during the drain:\n{log}"
    );
}

#[tokio::test]
async fn a_download_url_of_a_deleted_result_is_410() {
    let s = Server::start(&[]).await;
    let id = s.initiate(&[70000], None).await;
    assert_eq!(s.wait_finished(&id, None).await["status"], "completed");
    let result = common::blob_dir(&s)
        .join("results")
        .join(format!("{id}.zip"));
    std::fs::remove_file(&result).unwrap();
    let res = s.get(&format!("{FIRST}/job/{id}/download-url")).await;
    assert_error(res, 410, "gone").await;
    let _ = BTreeSet::<u64>::new();
}

#[tokio::test]
async fn a_backend_down_gives_503_and_an_unhealthy_health() {
    let s = Server::start(&[("DOWNLOAD_DELAY_ENABLED", "false")]).await;
    let dir = common::blob_dir(&s);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    // Health answers are reused for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = s.get("/health").await;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["checks"]["storage"], "error");
    assert_eq!(body["checks"]["store"], "ok");
    assert!(body["error"]["storage"].is_string());
    let res = s
        .post_json(&format!("{FIRST}/start"), &json!({"file_id": 70000}))
        .await;
    assert!(res.headers().contains_key("retry-after"));
    let body = assert_error(res, 503, "service_unavailable").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("not a directory") && !message.contains("/tmp"),
        "no internals: {message}"
    );
}

#[test]
fn every_variable_of_the_contract_is_also_a_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_longjob-server"))
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for var in [
        "PORT",
        "HOST",
        "REQUEST_TIMEOUT_MS",
        "CORS_ORIGINS",
        "RATE_LIMIT_WINDOW_MS",
        "RATE_LIMIT_MAX_REQUESTS",
        "DOWNLOAD_DELAY_MIN_MS",
        "DOWNLOAD_DELAY_MAX_MS",
        "DOWNLOAD_DELAY_ENABLED",
        "S3_REGION",
        "S3_ACCESS_KEY_ID",
        "S3_SECRET_ACCESS_KEY",
        "S3_ENDPOINT",
        "S3_BUCKET_NAME",
        "S3_FORCE_PATH_STYLE",
        "REDIS_URL",
        "DATABASE_URL",
        "BLOB_DIR",
        "API_KEYS",
        "JOB_TIMEOUT_MS",
        "MAX_ATTEMPTS",
        "WORKER_CONCURRENCY",
        "PRESIGN_TTL_SECS",
        "JOBS_PER_HOUR",
        "MAX_ACTIVE_JOBS_PER_OWNER",
    ] {
        assert!(help.contains(&format!("[env: {var}")), "{var} in --help");
        let flag = format!("--{}", var.to_lowercase().replace('_', "-"));
        assert!(help.contains(&flag), "{flag} in --help");
    }
}

/// `PRESIGN_TTL_SECS` is the lifetime of the download URLs the server signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presign_ttl_sets_the_lifetime_of_download_urls() {
    let s = Server::start(&[
        ("PRESIGN_TTL_SECS", "90"),
        ("DOWNLOAD_DELAY_ENABLED", "false"),
    ])
    .await;
    let id = s.initiate(&[70000], None).await;
    let done = s.wait_finished(&id, None).await;
    assert_eq!(done["status"], "completed", "{done}");
    let res = s.get(&format!("{FIRST}/job/{id}/download-url")).await;
    assert_eq!(res.status(), 200);
    let url: Value = res.json().await.unwrap();
    let expires_in = url["expiresIn"].as_u64().unwrap();
    assert!((80..=90).contains(&expires_in), "expiresIn {expires_in}");
    let expires_at: chrono::DateTime<chrono::Utc> =
        url["expiresAt"].as_str().unwrap().parse().unwrap();
    let left = (expires_at - chrono::Utc::now()).num_seconds();
    assert!((75..=91).contains(&left), "expires in {left} s: {url}");
    let link = url["downloadUrl"].as_str().unwrap();
    assert_eq!(s.http.get(link).send().await.unwrap().status(), 200);
}
