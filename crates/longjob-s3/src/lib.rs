//! longjob's [`BlobStore`] on Amazon S3 and S3-compatible servers (MinIO, RustFS, Ceph, …).
//!
//! [`S3BlobStore`] streams puts (one `PutObject` up to the part size, a multipart upload above it,
//! aborted on any failure), reads objects whole or by byte range, and hands out SigV4 presigned
//! GET URLs that the S3 server itself verifies, with a `Content-Disposition` naming the download.
//!
//! ```no_run
//! use std::time::Duration;
//! use longjob_core::blob::{BlobStore, PutOptions, byte_stream};
//! use longjob_s3::{S3BlobStore, S3Config};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // S3_BUCKET_NAME, S3_ENDPOINT, S3_REGION, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, …
//! let store = S3BlobStore::new(S3Config::from_env()?).await?;
//! store.health().await?;
//! store
//!     .put("results/job.zip", byte_stream(&b"zip bytes"[..]), PutOptions::default())
//!     .await?;
//! let url = store
//!     .presign_get("results/job.zip", Duration::from_secs(3600), "report.zip")
//!     .await?;
//! println!("download from {} until {}", url.url, url.expires_at);
//! # Ok(()) }
//! ```
//!
//! ## Retention
//! `LongJob::purge_expired` calls [`BlobStore::delete`] on the result of every job it purges.
//! For objects that escaped that (a failed delete, a crash between the two, older versions),
//! [`S3BlobStore::delete_prefix_older_than`] sweeps a prefix; or an S3 lifecycle rule on the
//! results prefix expires them server-side (see `docs/s3.md`).
#![deny(missing_docs)]

mod config;
mod disposition;
mod error;

use std::ops::Range;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use longjob_core::blob::{
    BlobBody, BlobMeta, BlobStore, ByteStream, PresignedUrl, PutOptions, validate_key,
};
use longjob_core::{BackendError, BackendResult};
use tokio::task::JoinSet;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;

pub use config::{
    DEFAULT_PART_SIZE, DEFAULT_REGION, DEFAULT_TIMEOUT, DEFAULT_UPLOAD_CONCURRENCY, MIN_PART_SIZE,
    S3Config, S3ConfigError, S3Credentials,
};
pub use disposition::content_disposition;
use error::{BACKEND, code_and_status, is_missing, map_sdk_error};

/// The most parts one multipart upload may have.
const MAX_PARTS: i32 = 10_000;
/// The most keys one `DeleteObjects` call may name.
const DELETE_BATCH: usize = 1000;
/// The longest time-to-live of a SigV4 presigned URL: 7 days.
pub const MAX_PRESIGN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A [`BlobStore`] on one bucket (and key prefix) of an S3-compatible server.
///
/// Cloning is cheap: clones share the SDK client and its connection pool.
#[derive(Debug, Clone)]
pub struct S3BlobStore {
    client: Client,
    /// Signs presigned URLs (the client itself, or one on the public endpoint).
    presigner: Client,
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
    part_size: usize,
    upload_concurrency: usize,
    timeout: Duration,
}

impl S3BlobStore {
    /// A store as `config` says. Makes no call to the server: see [`health`](BlobStore::health).
    pub async fn new(config: S3Config) -> BackendResult<Self> {
        config.validate()?;
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(config.timeout)
            .read_timeout(config.timeout)
            .operation_timeout(config.timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .timeout_config(timeouts);
        if let Some(c) = &config.credentials {
            loader = loader.credentials_provider(Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                c.session_token.clone(),
                None,
                "longjob-s3",
            ));
        }
        let shared = loader.load().await;
        // Checksums only where S3 requires them (DeleteObjects): S3-compatible servers differ
        // in their support of the newer flexible checksums (CRC32 trailers in aws-chunked
        // bodies), and ranged reads cannot be validated anyway.
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint.clone());
        }
        let presigner = config
            .public_endpoint
            .as_ref()
            .map(|public| Client::from_conf(builder.clone().endpoint_url(public.clone()).build()));
        let client = Client::from_conf(builder.build());
        let mut store = Self::with_client(client, &config);
        if let Some(presigner) = presigner {
            store.presigner = presigner;
        }
        Ok(store)
    }

    /// A store using an SDK client built elsewhere; `config` gives the bucket, key prefix, part
    /// size and the timeout reported in errors (the client's own endpoint, credentials and
    /// timeouts apply; `config.public_endpoint` does not).
    pub fn with_client(client: Client, config: &S3Config) -> Self {
        Self {
            presigner: client.clone(),
            client,
            bucket: config.bucket.clone(),
            prefix: normalize_prefix(&config.key_prefix),
            part_size: config.part_size.max(MIN_PART_SIZE),
            upload_concurrency: config.upload_concurrency.max(1),
            timeout: config.timeout,
        }
    }

    /// The same server and credentials, on another bucket and key prefix (for instance the
    /// bucket the source files of a download job are read from).
    pub fn for_bucket(
        &self,
        bucket: impl Into<String>,
        key_prefix: impl Into<String>,
    ) -> BackendResult<Self> {
        let config = S3Config::new(bucket)
            .key_prefix(key_prefix)
            .part_size(self.part_size)
            .upload_concurrency(self.upload_concurrency)
            .timeout(self.timeout);
        config.validate()?;
        let mut store = Self::with_client(self.client.clone(), &config);
        store.presigner = self.presigner.clone();
        Ok(store)
    }

    /// The SDK client, for calls this crate does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix: empty, or ending with `/`.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The multipart part size in bytes.
    pub fn part_size(&self) -> usize {
        self.part_size
    }

    /// The object key in the bucket of the store's `key` (the key prefix, then `key`).
    pub fn object_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn err<E>(
        &self,
        op: &'static str,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> BackendError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        map_sdk_error(op, &self.bucket, self.timeout, e)
    }

    /// Deletes every object under `prefix` (relative to the store's key prefix; empty for all of
    /// them) last modified before `cutoff`, and returns how many it deleted.
    ///
    /// For retention sweeps: run it periodically on the results prefix with a cutoff of
    /// now minus the results' time-to-live. Listing and deleting go 1000 keys per call.
    ///
    /// ```no_run
    /// # async fn run(store: longjob_s3::S3BlobStore) -> longjob_core::BackendResult<()> {
    /// let cutoff = chrono::Utc::now() - chrono::Duration::days(7);
    /// let deleted = store.delete_prefix_older_than("results/", cutoff).await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete_prefix_older_than(
        &self,
        prefix: &str,
        cutoff: DateTime<Utc>,
    ) -> BackendResult<u64> {
        let trimmed = prefix.trim_end_matches('/');
        if !trimmed.is_empty() {
            validate_key(trimmed)?;
        }
        let full_prefix = self.object_key(prefix);
        let mut deleted = 0u64;
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.err("ListObjectsV2", e))?;
            let mut batch = Vec::new();
            for object in page.contents() {
                let (Some(key), Some(modified)) = (object.key(), object.last_modified()) else {
                    continue;
                };
                if to_chrono(modified).is_some_and(|m| m < cutoff) {
                    let id = ObjectIdentifier::builder()
                        .key(key)
                        .build()
                        .map_err(|e| BackendError::corrupt(BACKEND, e))?;
                    batch.push(id);
                }
            }
            for chunk in batch.chunks(DELETE_BATCH) {
                deleted += self.delete_batch(chunk.to_vec()).await?;
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        tracing::debug!(bucket = %self.bucket, prefix = %full_prefix, deleted, "s3 retention sweep");
        Ok(deleted)
    }

    async fn delete_batch(&self, ids: Vec<ObjectIdentifier>) -> BackendResult<u64> {
        let count = ids.len() as u64;
        let delete = Delete::builder()
            .set_objects(Some(ids))
            .quiet(true)
            .build()
            .map_err(|e| BackendError::corrupt(BACKEND, e))?;
        let out = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| self.err("DeleteObjects", e))?;
        if let Some(first) = out.errors().first() {
            return Err(BackendError::Unavailable {
                backend: BACKEND,
                message: format!(
                    "DeleteObjects: {} of {count} keys not deleted, first {:?}: {} {}",
                    out.errors().len(),
                    first.key().unwrap_or_default(),
                    first.code().unwrap_or_default(),
                    first.message().unwrap_or_default()
                ),
                source: None,
            });
        }
        Ok(count)
    }

    async fn put_single(
        &self,
        key: &str,
        object_key: &str,
        body: Bytes,
        options: &PutOptions,
    ) -> BackendResult<BlobMeta> {
        let size = body.len() as u64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(object_key)
            .content_length(i64::try_from(size).unwrap_or(i64::MAX))
            .set_content_type(options.content_type.clone())
            .body(body.into())
            .send()
            .await
            .map_err(|e| self.err("PutObject", e))?;
        tracing::debug!(bucket = %self.bucket, key = %object_key, size, "s3 put");
        Ok(BlobMeta {
            key: key.to_owned(),
            size,
            content_type: options.content_type.clone(),
            last_modified: None,
        })
    }

    async fn put_multipart(
        &self,
        key: &str,
        object_key: &str,
        first: BytesMut,
        body: ByteStream,
        options: &PutOptions,
    ) -> BackendResult<BlobMeta> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(object_key)
            .set_content_type(options.content_type.clone())
            .send()
            .await
            .map_err(|e| self.err("CreateMultipartUpload", e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| {
                BackendError::corrupt(BACKEND, "CreateMultipartUpload answered no upload id")
            })?
            .to_owned();
        tracing::debug!(
            bucket = %self.bucket, key = %object_key, upload_id = %upload_id,
            "s3 multipart upload started"
        );
        let mut guard = AbortGuard {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: object_key.to_owned(),
            upload_id: upload_id.clone(),
            armed: true,
        };
        let result = match self.upload_parts(object_key, &upload_id, first, body).await {
            Ok((parts, size)) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(object_key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| size)
                .map_err(|e| self.err("CompleteMultipartUpload", e)),
            Err(e) => Err(e),
        };
        guard.armed = false;
        match result {
            Ok(size) => {
                tracing::debug!(bucket = %self.bucket, key = %object_key, size, "s3 multipart put");
                Ok(BlobMeta {
                    key: key.to_owned(),
                    size,
                    content_type: options.content_type.clone(),
                    last_modified: None,
                })
            }
            Err(e) => {
                guard.abort().await;
                Err(e)
            }
        }
    }

    /// Uploads `first` and the rest of `body` in parts of `part_size` bytes (the last one
    /// smaller), up to `upload_concurrency` parts at a time while the next part is read;
    /// returns the parts in order and the total size. Dropping the future aborts the part
    /// uploads in flight.
    async fn upload_parts(
        &self,
        object_key: &str,
        upload_id: &str,
        mut buf: BytesMut,
        mut body: ByteStream,
    ) -> BackendResult<(Vec<CompletedPart>, u64)> {
        let mut in_flight: JoinSet<BackendResult<CompletedPart>> = JoinSet::new();
        let mut parts = Vec::new();
        let mut size = 0u64;
        let mut ended = false;
        let mut number = 0i32;
        loop {
            if !ended {
                ended = fill(&mut body, &mut buf, self.part_size)
                    .await
                    .map_err(body_error)?;
            }
            if buf.is_empty() {
                break;
            }
            let part = buf.split_to(buf.len().min(self.part_size)).freeze();
            number += 1;
            if number > MAX_PARTS {
                return Err(BackendError::InvalidArgument(format!(
                    "s3 put of {object_key}: more than {MAX_PARTS} parts of {} bytes; raise the part size",
                    self.part_size
                )));
            }
            size += part.len() as u64;
            while in_flight.len() >= self.upload_concurrency {
                if let Some(done) = in_flight.join_next().await {
                    parts.push(joined(done)?);
                }
            }
            let store = self.clone();
            let (key, id) = (object_key.to_owned(), upload_id.to_owned());
            in_flight.spawn(
                async move { store.upload_part(&key, &id, number, part).await }
                    .instrument(tracing::Span::current())
                    .with_current_subscriber(),
            );
        }
        while let Some(done) = in_flight.join_next().await {
            parts.push(joined(done)?);
        }
        parts.sort_by_key(|p| p.part_number());
        Ok((parts, size))
    }

    async fn upload_part(
        &self,
        object_key: &str,
        upload_id: &str,
        number: i32,
        part: Bytes,
    ) -> BackendResult<CompletedPart> {
        let len = part.len();
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(object_key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(i64::try_from(len).unwrap_or(i64::MAX))
            .body(part.into())
            .send()
            .await
            .map_err(|e| self.err("UploadPart", e))?;
        tracing::trace!(key = %object_key, part_number = number, len, "s3 part uploaded");
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .build())
    }

    async fn head_meta(&self, key: &str) -> BackendResult<Option<BlobMeta>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
        {
            Ok(out) => Ok(Some(BlobMeta {
                key: key.to_owned(),
                size: u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0),
                content_type: out.content_type().map(str::to_owned),
                last_modified: out.last_modified().and_then(to_chrono),
            })),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(self.err("HeadObject", e)),
        }
    }

    /// A get whose range cannot be sent to S3 (empty, or past the end of the object).
    async fn get_outside(&self, key: &str, range: Range<u64>) -> BackendResult<Option<BlobBody>> {
        let Some(meta) = self.head_meta(key).await? else {
            return Ok(None);
        };
        let end = range.end.min(meta.size);
        if range.start == 0 && end == 0 && meta.size == 0 {
            return Ok(Some(BlobBody {
                meta,
                range: 0..0,
                body: futures::stream::empty().boxed(),
            }));
        }
        Err(BackendError::InvalidArgument(format!(
            "range {range:?} outside the {} bytes of {key}",
            meta.size
        )))
    }
}

/// Aborts a multipart upload that did not complete, also when the put's future is dropped.
struct AbortGuard {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    armed: bool,
}

impl AbortGuard {
    fn request(
        &self,
    ) -> aws_sdk_s3::operation::abort_multipart_upload::builders::AbortMultipartUploadFluentBuilder
    {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
    }

    async fn abort(&self) {
        match self.request().send().await {
            Ok(_) => tracing::debug!(
                bucket = %self.bucket, key = %self.key, upload_id = %self.upload_id,
                "s3 multipart upload aborted"
            ),
            Err(e) => tracing::warn!(
                bucket = %self.bucket, key = %self.key, upload_id = %self.upload_id,
                error = %aws_sdk_s3::error::DisplayErrorContext(&e),
                "s3 multipart upload could not be aborted; a lifecycle rule \
                 (AbortIncompleteMultipartUpload) cleans it up"
            ),
        }
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // The put was cancelled mid-upload: abort in the background.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let request = self.request();
            let (bucket, key) = (self.bucket.clone(), self.key.clone());
            runtime.spawn(async move {
                if let Err(e) = request.send().await {
                    tracing::warn!(
                        %bucket, %key, error = %aws_sdk_s3::error::DisplayErrorContext(&e),
                        "s3 multipart upload of a cancelled put could not be aborted"
                    );
                }
            });
        }
    }
}

/// Reads `body` into `buf` until `buf` holds more than `target` bytes or `body` ends; returns
/// whether it ended.
async fn fill(body: &mut ByteStream, buf: &mut BytesMut, target: usize) -> std::io::Result<bool> {
    while buf.len() <= target {
        match body.next().await {
            Some(chunk) => buf.extend_from_slice(&chunk?),
            None => return Ok(true),
        }
    }
    Ok(false)
}

/// The outcome of a part upload task.
fn joined(
    done: Result<BackendResult<CompletedPart>, tokio::task::JoinError>,
) -> BackendResult<CompletedPart> {
    done.map_err(|e| BackendError::Unavailable {
        backend: BACKEND,
        message: format!("a part upload task failed: {e}"),
        source: Some(Box::new(e)),
    })?
}

fn body_error(e: std::io::Error) -> BackendError {
    BackendError::Unavailable {
        backend: BACKEND,
        message: format!("reading the body to upload failed: {e}"),
        source: Some(Box::new(e)),
    }
}

fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

fn to_chrono(t: &aws_sdk_s3::primitives::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// Parses `bytes first-last/total` into the range read and the object's size.
fn parse_content_range(value: &str) -> Option<(Range<u64>, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let last: u64 = last.trim().parse().ok()?;
    if last < first {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((first..last + 1, total))
}

fn into_byte_stream(body: aws_sdk_s3::primitives::ByteStream) -> ByteStream {
    futures::stream::unfold(body, |mut body| async move {
        body.next()
            .await
            .map(|chunk| (chunk.map_err(std::io::Error::other), body))
    })
    .boxed()
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(
        &self,
        key: &str,
        mut body: ByteStream,
        options: PutOptions,
    ) -> BackendResult<BlobMeta> {
        validate_key(key)?;
        let object_key = self.object_key(key);
        let mut buf = BytesMut::new();
        let ended = fill(&mut body, &mut buf, self.part_size)
            .await
            .map_err(body_error)?;
        if ended && buf.len() <= self.part_size {
            self.put_single(key, &object_key, buf.freeze(), &options)
                .await
        } else {
            self.put_multipart(key, &object_key, buf, body, &options)
                .await
        }
    }

    async fn head(&self, key: &str) -> BackendResult<Option<BlobMeta>> {
        validate_key(key)?;
        self.head_meta(key).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> BackendResult<Option<BlobBody>> {
        validate_key(key)?;
        if let Some(r) = &range
            && r.start >= r.end
        {
            return self.get_outside(key, r.clone()).await;
        }
        let mut request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_key(key));
        if let Some(r) = &range {
            request = request.range(format!("bytes={}-{}", r.start, r.end - 1));
        }
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => {
                let (code, status) = code_and_status(&e);
                if let Some(r) = &range
                    && (status == Some(416) || code.as_deref() == Some("InvalidRange"))
                {
                    return self.get_outside(key, r.clone()).await;
                }
                return Err(self.err("GetObject", e));
            }
        };
        let length = u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0);
        let (size, read) = match (&range, out.content_range()) {
            (None, _) => (length, 0..length),
            (Some(_), Some(content_range)) => match parse_content_range(content_range) {
                Some((read, total)) => (total.unwrap_or(read.end), read),
                None => {
                    return Err(BackendError::corrupt(
                        BACKEND,
                        format!("GetObject: unparsable Content-Range {content_range:?}"),
                    ));
                }
            },
            // The server sent the whole object: fine when that is what was asked for.
            (Some(r), None) if r.start == 0 && r.end >= length => (length, 0..length),
            (Some(r), None) => {
                return Err(BackendError::corrupt(
                    BACKEND,
                    format!("GetObject: the server ignored the range {r:?}"),
                ));
            }
        };
        let meta = BlobMeta {
            key: key.to_owned(),
            size,
            content_type: out.content_type().map(str::to_owned),
            last_modified: out.last_modified().and_then(to_chrono),
        };
        Ok(Some(BlobBody {
            meta,
            range: read,
            body: into_byte_stream(out.body),
        }))
    }

    async fn presign_get(
        &self,
        key: &str,
        ttl: Duration,
        file_name: &str,
    ) -> BackendResult<PresignedUrl> {
        validate_key(key)?;
        if ttl.is_zero() || ttl > MAX_PRESIGN_TTL {
            return Err(BackendError::InvalidArgument(format!(
                "presigned URL time-to-live {ttl:?}: must be between 1 s and 7 days"
            )));
        }
        let start = SystemTime::now();
        let presigning = PresigningConfig::builder()
            .start_time(start)
            .expires_in(ttl)
            .build()
            .map_err(|e| BackendError::InvalidArgument(format!("presigning: {e}")))?;
        let request = self
            .presigner
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .response_content_disposition(content_disposition(file_name))
            .presigned(presigning)
            .await
            .map_err(|e| self.err("presign GetObject", e))?;
        let expires_at = DateTime::<Utc>::from(start + ttl);
        Ok(PresignedUrl {
            url: request.uri().to_owned(),
            expires_at,
        })
    }

    async fn delete(&self, key: &str) -> BackendResult<()> {
        validate_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(self.err("DeleteObject", e)),
        }
    }

    async fn health(&self) -> BackendResult<()> {
        // ListObjectsV2 rather than HeadBucket: its error answers carry a code
        // (InvalidAccessKeyId, SignatureDoesNotMatch, NoSuchBucket) that HEAD answers cannot.
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| self.err("ListObjectsV2", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(parse_content_range("bytes 2-5/10"), Some((2..6, Some(10))));
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0..1, None)));
        assert_eq!(parse_content_range("bytes 5-2/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn prefixes_normalize() {
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(normalize_prefix("/"), "");
        assert_eq!(normalize_prefix("results"), "results/");
        assert_eq!(normalize_prefix("a/b/"), "a/b/");
    }

    #[tokio::test]
    async fn fill_stops_past_the_target_or_at_the_end() {
        let chunks = (0..10).map(|_| Ok(Bytes::from(vec![0u8; 3])));
        let mut body: ByteStream = futures::stream::iter(chunks).boxed();
        let mut buf = BytesMut::new();
        assert!(!fill(&mut body, &mut buf, 7).await.unwrap());
        assert_eq!(buf.len(), 9);
        buf.clear();
        assert!(fill(&mut body, &mut buf, 100).await.unwrap());
        assert_eq!(buf.len(), 21);
    }
}
