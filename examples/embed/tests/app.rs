//! The app on the in-memory backends: its own routes work as before, and an `export` job runs
//! to completion through the job API and downloads. The one expression that differs from
//! `main.rs` is the `LongJob`: `LongJob::in_memory(..)` here.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use longjob_core::LongJob;
use longjob_core::signing::UrlSigner;
use longjob_embed_example::{Notes, app};
use serde_json::{Value, json};
use tower::ServiceExt;

async fn call(app: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Vec<u8>) {
    let request = Request::builder().method(method).uri(uri);
    let request = match body {
        Some(b) => {
            request.header("content-type", "application/json").body(Body::from(b.to_string()))
        }
        None => request.body(Body::empty()),
    };
    let response =
        app.clone().oneshot(request.expect("a valid request")).await.expect("infallible");
    let status = response.status();
    (status, to_bytes(response.into_body(), 1 << 20).await.expect("a body").to_vec())
}

async fn call_json(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (status, bytes) = call(app, method, uri, body).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn own_routes_are_untouched_and_an_export_job_completes_and_downloads() {
    let signer = UrlSigner::random("/jobs/files");
    let app = app(Notes::default(), LongJob::in_memory(signer.clone()), signer);

    // The app's own routes, as they were.
    let (status, body) = call(&app, "GET", "/", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).starts_with("notes service"));
    for text in ["milk", "bread"] {
        let (status, note) = call_json(&app, "POST", "/notes", Some(json!({ "text": text }))).await;
        assert_eq!(status, StatusCode::CREATED, "{note}");
    }
    let (status, notes) = call_json(&app, "GET", "/notes", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(notes, json!([{ "id": 1, "text": "milk" }, { "id": 2, "text": "bread" }]));
    assert_eq!(call(&app, "GET", "/notes/2", None).await.0, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/notes/9", None).await.0, StatusCode::NOT_FOUND);

    // The app's job kind, followed through the job API.
    let (status, job) = call_json(&app, "POST", "/notes/export", None).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let id = job["id"].as_str().expect("a job id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status_body = loop {
        let (status, body) = call_json(&app, "GET", &format!("/jobs/job/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["status"] == "completed" {
            break body;
        }
        assert!(
            !["failed", "cancelled"].contains(&body["status"].as_str().unwrap_or("")),
            "{body}"
        );
        assert!(Instant::now() < deadline, "the export job did not complete: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status_body["progress"]["current"], 2, "{status_body}");
    assert_eq!(status_body["progress"]["percentage"], 100.0, "{status_body}");

    let (status, link) =
        call_json(&app, "GET", &format!("/jobs/job/{id}/download-url"), None).await;
    assert_eq!(status, StatusCode::OK, "{link}");
    assert_eq!(link["fileName"], "notes.tsv");
    let url = link["downloadUrl"].as_str().expect("a download URL");
    assert!(url.starts_with("/jobs/files/"), "{url}");
    let (status, file) = call(&app, "GET", url, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(String::from_utf8_lossy(&file), "1\tmilk\n2\tbread\n");

    // The API's own errors come as its JSON errors.
    let (status, error) = call_json(&app, "GET", "/jobs/job/not-a-uuid", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error["error"]["code"].is_string(), "{error}");
}
