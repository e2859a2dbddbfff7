//! An existing axum app, a small notes service, that gains longjob's job API and a job kind of
//! its own: `POST /notes/export` starts a job that writes every note into one text file, and the
//! client follows it (status, SSE, WebSocket, download URL) under `/jobs`.
//!
//! The embedding is the lines marked `// longjob`; nothing else of the app changed:
//! - `// longjob: mount`: build the `LongJob`, start its worker and mount its router: 10 lines in
//!   all, here and in `main.rs` (the signature of [`app`] counts as one);
//! - `// longjob: handler begin` to `end`: the job kind, its HTTP entry and its work: 14 lines;
//! - `// longjob: import`: the `use` lines (7), and the two dependencies in `Cargo.toml`.
//!
//! `tests/line_budget.rs` counts them. The crate is formatted with `use_small_heuristics = "Max"`
//! (its `rustfmt.toml`): a statement that fits in 100 columns stays on one line.
//!
//! The test (`tests/app.rs`) builds the same app on the in-memory backends by changing the one
//! expression that makes the `LongJob`: `LongJob::in_memory(signer)` instead of `main.rs`'s
//! builder with results on local disk.
#![deny(missing_docs)]

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use longjob_axum::{ApiBuilder, ApiError}; // longjob: import
use longjob_core::blob::{PutOptions, byte_stream}; // longjob: import
use longjob_core::signing::UrlSigner; // longjob: import
use longjob_core::{HandlerResult, Job, JobContext, JobResult, LongJob, SubmitRequest}; // longjob: import
use serde::{Deserialize, Serialize};
use serde_json::json; // longjob: import

/// A note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// Its id.
    pub id: usize,
    /// Its text.
    pub text: String,
}

/// The body of `POST /notes`.
#[derive(Debug, Deserialize)]
pub struct NewNote {
    /// The note's text.
    pub text: String,
}

/// The app's own state: its notes (in memory, for the example).
#[derive(Debug, Clone, Default)]
pub struct Notes(Arc<Mutex<Vec<Note>>>);

impl Notes {
    /// Every note.
    pub fn all(&self) -> Vec<Note> {
        self.0.lock().map(|n| n.clone()).unwrap_or_default()
    }
}

async fn index() -> &'static str {
    "notes service: GET /notes, POST /notes, GET /notes/{id}\n"
}

async fn list(State(notes): State<Notes>) -> Json<Vec<Note>> {
    Json(notes.all())
}

async fn add(
    State(notes): State<Notes>,
    Json(new): Json<NewNote>,
) -> Result<(StatusCode, Json<Note>), StatusCode> {
    let mut all = notes.0.lock().map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let note = Note { id: all.len() + 1, text: new.text };
    all.push(note.clone());
    Ok((StatusCode::CREATED, Json(note)))
}

async fn one(State(notes): State<Notes>, Path(id): Path<usize>) -> Result<Json<Note>, StatusCode> {
    notes.all().into_iter().find(|n| n.id == id).map(Json).ok_or(StatusCode::NOT_FOUND)
}

/// The app: its own routes as they were, plus the job API under `/jobs` (its signed download
/// links served from `/jobs/files`) and a job kind of its own, `export`.
///
/// The worker runs as long as the router lives (a layer holds it).
pub fn app(notes: Notes, lj: LongJob, signer: UrlSigner) -> Router {
    // longjob: mount (this line stands for the signature, which gained `lj` and `signer`)
    let worker = Arc::new(lj.worker().handle("export", export).start()); // longjob: mount
    let api = ApiBuilder::new(lj.clone()).prefix("/jobs"); // longjob: mount
    Router::new()
        .route("/", get(index))
        .route("/notes", get(list).post(add))
        .route("/notes/{id}", get(one))
        .route("/notes/export", post(export_notes).with_state((notes.clone(), lj.clone()))) // longjob: mount
        .with_state(notes)
        .merge(api.signed_files(signer, Arc::clone(lj.blobs())).routes()) // longjob: mount
        .layer(Extension(worker)) // longjob: mount
}

// longjob: handler begin
/// `POST /notes/export`: starts an `export` job of every note and answers with the job.
async fn export_notes(State((notes, lj)): State<(Notes, LongJob)>) -> Result<Json<Job>, ApiError> {
    let request = SubmitRequest::new("export", "anonymous", json!(notes.all()));
    Ok(Json(lj.submit(request).await?.job))
}

/// The work of an `export` job: every note into one text file, a progress event per note.
pub async fn export(ctx: JobContext, notes: Vec<Note>) -> HandlerResult {
    let mut text = String::new();
    for (i, note) in notes.iter().enumerate() {
        text += &format!("{}\t{}\n", note.id, note.text);
        ctx.progress(i as u64 + 1, notes.len() as u64).await;
    }
    let key = format!("exports/{}.tsv", ctx.job_id());
    let size = ctx.blobs().put(&key, byte_stream(text), PutOptions::default()).await?.size;
    Ok(Some(JobResult { blob_key: key, size, file_name: "notes.tsv".into(), content_type: None }))
}
// longjob: handler end
