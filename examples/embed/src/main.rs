//! Serves the notes service with its job API on 127.0.0.1:3001 (`PORT` to change); results of
//! jobs are kept on local disk under `data/blobs`.
//!
//! ```text
//! curl -X POST localhost:3001/notes -H 'content-type: application/json' -d '{"text":"milk"}'
//! curl -X POST localhost:3001/notes/export                  # -> {"id": "<jobId>", ...}
//! curl localhost:3001/jobs/job/<jobId>                     # or /jobs/stream/<jobId> (SSE)
//! curl localhost:3001/jobs/job/<jobId>/download-url         # -> {"downloadUrl": "/jobs/files/..."}
//! ```

use std::sync::Arc;

use longjob_core::local_disk::LocalDiskBlobStore; // longjob: import
use longjob_core::{LongJob, signing::UrlSigner}; // longjob: import
use longjob_embed_example::{Notes, app};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = std::env::var("PORT").unwrap_or_else(|_| "3001".to_owned());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("notes service on http://{}", listener.local_addr()?);
    let signer = UrlSigner::random("/jobs/files"); // longjob: mount
    let blobs = Arc::new(LocalDiskBlobStore::new("data/blobs", signer.clone()).await?); // longjob: mount
    let lj = LongJob::builder().blobs(blobs).build(); // longjob: mount
    axum::serve(listener, app(Notes::default(), lj, signer)).await?; // longjob: mount (was `app(Notes::default())`)
    Ok(())
}
