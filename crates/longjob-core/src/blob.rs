//! The [`BlobStore`] trait: where results live, and how they are downloaded.

use std::fmt;
use std::io;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream, StreamExt};

use crate::{BackendError, BackendResult};

/// A streamed body.
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// Wraps bytes in memory as a [`ByteStream`].
pub fn byte_stream(bytes: impl Into<Bytes>) -> ByteStream {
    stream::once(futures::future::ready(Ok(bytes.into()))).boxed()
}

/// Reads a whole [`ByteStream`] into memory.
pub async fn collect_bytes(mut body: ByteStream) -> io::Result<Bytes> {
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
    }
    Ok(buf.freeze())
}

/// What a blob store knows of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobMeta {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type, when recorded.
    pub content_type: Option<String>,
    /// When it was last written, when known.
    pub last_modified: Option<DateTime<Utc>>,
}

/// Options of [`BlobStore::put`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// The media type to record.
    pub content_type: Option<String>,
}

/// A URL that downloads an object without further credentials until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresignedUrl {
    /// The URL.
    pub url: String,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
}

/// A part of an object read by [`BlobStore::get`].
pub struct BlobBody {
    /// The object's metadata (its whole size, not the range's).
    pub meta: BlobMeta,
    /// The bytes read (the range asked for, clamped to the object).
    pub range: Range<u64>,
    /// The bytes.
    pub body: ByteStream,
}

impl fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobBody")
            .field("meta", &self.meta)
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for dyn BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn BlobStore")
    }
}

/// Stores results and hands out presigned download URLs.
///
/// Semantics every implementation keeps (the [test kit](crate::testkit) checks them): keys are
/// checked with [`validate_key`]; a missing key is `Ok(None)` from [`head`](Self::head) and
/// [`get`](Self::get), and `Ok(())` from [`delete`](Self::delete); a presigned URL serves
/// exactly the bytes put, with the given file name, until its time-to-live passes.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `body` under `key`, streaming it (multipart for large bodies where the backend
    /// has it). Replaces any object of that key.
    async fn put(
        &self,
        key: &str,
        body: ByteStream,
        options: PutOptions,
    ) -> BackendResult<BlobMeta>;

    /// The object's metadata, or `None` when there is none.
    async fn head(&self, key: &str) -> BackendResult<Option<BlobMeta>>;

    /// Streams the object (or the byte `range` of it), or `None` when there is none.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> BackendResult<Option<BlobBody>>;

    /// A URL that downloads the object as `file_name` for `ttl`.
    async fn presign_get(
        &self,
        key: &str,
        ttl: Duration,
        file_name: &str,
    ) -> BackendResult<PresignedUrl>;

    /// Deletes the object; deleting a missing object succeeds.
    async fn delete(&self, key: &str) -> BackendResult<()>;

    /// Answers when the backend is reachable.
    async fn health(&self) -> BackendResult<()>;
}

/// Checks that `key` is acceptable to every store: 1 to 1024 bytes of letters, digits and
/// `-_.=/`, no empty, `.` or `..` segment, not starting with `/`.
///
/// ```
/// use longjob_core::blob::validate_key;
/// assert!(validate_key("results/2026/job.zip").is_ok());
/// assert!(validate_key("../etc/passwd").is_err());
/// assert!(validate_key("a//b").is_err());
/// ```
pub fn validate_key(key: &str) -> BackendResult<()> {
    let invalid = |why: &str| {
        Err(BackendError::InvalidArgument(format!(
            "blob key {key:?}: {why}"
        )))
    };
    if key.is_empty() || key.len() > 1024 {
        return invalid("must be 1 to 1024 bytes long");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'=' | b'/'))
    {
        return invalid("only letters, digits and -_.=/ are allowed");
    }
    if key
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return invalid("empty, '.' and '..' path segments are not allowed");
    }
    Ok(())
}

/// Clamps a requested byte range to an object of `size` bytes; `None` when it does not overlap.
/// Every store answers ranges this way.
pub fn clamp_range(range: Option<Range<u64>>, size: u64) -> Option<Range<u64>> {
    let range = range.unwrap_or(0..size);
    let end = range.end.min(size);
    if range.start >= end && !(size == 0 && range.start == 0) {
        return None;
    }
    Some(range.start..end)
}
