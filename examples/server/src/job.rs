//! The download job: gathers the available files of `file_ids` into one zip archive.
//!
//! Its processing time is drawn from the configured delay and spread over the files still to
//! do, with a progress event per file. Files the source does not have are recorded as failed
//! items and left out. No file at all: the job fails with a `validation` error (not retried).

use std::collections::HashSet;
use std::io::{Seek, Write};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use longjob_axum::{Delay, FileSource};
use longjob_core::blob::PutOptions;
use longjob_core::{HandlerResult, JobContext, JobError, JobResult};
use serde::Deserialize;
use tokio_util::io::ReaderStream;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// The job kind.
pub const KIND: &str = "download";

/// The job's input, as `/initiate` submits it.
#[derive(Debug, Deserialize)]
pub struct DownloadInput {
    /// The files to gather.
    pub file_ids: Vec<u64>,
}

/// What the handler needs.
#[derive(Debug, Clone)]
pub struct DownloadEnv {
    /// Where files come from.
    pub source: Arc<dyn FileSource>,
    /// The simulated processing time of a whole job.
    pub delay: Delay,
    /// Where archives are assembled before they are uploaded.
    pub scratch: std::path::PathBuf,
}

/// Sleeps `d`, or returns an error as soon as the job is cancelled.
async fn wait(ctx: &JobContext, d: Duration) -> Result<(), JobError> {
    if d.is_zero() {
        return if ctx.is_cancelled() {
            Err(JobError::internal("cancelled"))
        } else {
            Ok(())
        };
    }
    tokio::select! {
        () = tokio::time::sleep(d) => Ok(()),
        () = ctx.cancellation().cancelled() => Err(JobError::internal("cancelled")),
    }
}

fn storage(e: impl std::fmt::Display) -> JobError {
    JobError::storage(e.to_string())
}

/// The handler of `download` jobs.
pub async fn run(env: Arc<DownloadEnv>, ctx: JobContext, input: DownloadInput) -> HandlerResult {
    let mut seen = HashSet::new();
    let ids: Vec<u64> = input
        .file_ids
        .into_iter()
        .filter(|id| seen.insert(*id))
        .collect();
    if ids.is_empty() {
        return Err(JobError::validation("no file ids"));
    }
    let pending: HashSet<String> = ctx.pending_items().into_iter().collect();
    let todo: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|id| pending.contains(&id.to_string()))
        .collect();
    let per_file = if todo.is_empty() {
        Duration::ZERO
    } else {
        env.delay.draw() / todo.len() as u32
    };
    for id in &todo {
        wait(&ctx, per_file).await?;
        let key = id.to_string();
        match env.source.check(*id).await {
            Ok(Some(info)) => {
                // Recounts progress (bytes included) and publishes one progress event.
                ctx.item_completed(&key, info.size).await;
            }
            Ok(None) => ctx.item_failed(&key, "not found").await,
            Err(e) if e.is_transient() => return Err(JobError::network(e.to_string())),
            Err(e) => return Err(JobError::internal(e.to_string())),
        }
    }
    // Every file completed in this attempt or an earlier one goes into the archive.
    let done: Vec<u64> = ctx
        .items()
        .iter()
        .filter(|i| i.status == longjob_core::ItemStatus::Completed)
        .filter_map(|i| i.id.parse().ok())
        .collect();
    if done.is_empty() {
        return Err(JobError::validation(
            "none of the requested files is available",
        ));
    }
    let path = env.scratch.join(format!("{}.zip.part", ctx.job_id()));
    let result = assemble(&env, &ctx, &done, &path).await;
    let _ = tokio::fs::remove_file(&path).await;
    result
}

async fn assemble(
    env: &DownloadEnv,
    ctx: &JobContext,
    done: &[u64],
    path: &std::path::Path,
) -> HandlerResult {
    tokio::fs::create_dir_all(&env.scratch)
        .await
        .map_err(storage)?;
    let file = std::fs::File::create(path).map_err(storage)?;
    let mut zip = ZipWriter::new(std::io::BufWriter::new(file));
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .large_file(false);
    for id in done {
        if ctx.is_cancelled() {
            return Err(JobError::internal("cancelled"));
        }
        let Some(mut body) = env.source.read(*id).await.map_err(storage)? else {
            return Err(JobError::network(format!("file {id} disappeared")));
        };
        zip.start_file(format!("{id}.zip"), options)
            .map_err(storage)?;
        while let Some(chunk) = body.next().await {
            zip.write_all(&chunk.map_err(storage)?).map_err(storage)?;
        }
    }
    let mut writer = zip.finish().map_err(storage)?;
    writer.flush().map_err(storage)?;
    let size = writer.stream_position().map_err(storage)?;
    drop(writer);
    let file = tokio::fs::File::open(path).await.map_err(storage)?;
    let key = format!("results/{}.zip", ctx.job_id());
    let body = ReaderStream::new(file).boxed();
    ctx.blobs()
        .put(
            &key,
            body,
            PutOptions {
                content_type: Some("application/zip".into()),
            },
        )
        .await
        .map_err(storage)?;
    Ok(Some(JobResult {
        blob_key: key,
        size,
        file_name: format!("download-{}.zip", ctx.job_id()),
        content_type: Some("application/zip".into()),
    }))
}
