//! A [`BlobStore`] on the local file system.

use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use crate::blob::{
    BlobBody, BlobMeta, BlobStore, ByteStream, PresignedUrl, PutOptions, clamp_range, validate_key,
};
use crate::signing::UrlSigner;
use crate::{BackendError, BackendResult};

const BACKEND: &str = "local-disk";

/// A [`BlobStore`] that keeps objects as files under a directory, and signs URLs for the HTTP
/// layer's file route with an HMAC ([`UrlSigner`]).
///
/// Writes go to a temporary file that is renamed into place, so a reader never sees half an
/// object. Keys are checked with [`validate_key`], so no key can leave the directory.
#[derive(Debug)]
pub struct LocalDiskBlobStore {
    root: PathBuf,
    signer: UrlSigner,
}

fn io_error(e: std::io::Error) -> BackendError {
    BackendError::unavailable(BACKEND, e)
}

impl LocalDiskBlobStore {
    /// A store under `root` (created when missing).
    pub async fn new(root: impl Into<PathBuf>, signer: UrlSigner) -> BackendResult<Self> {
        let root = root.into();
        tokio::fs::create_dir_all(&root).await.map_err(io_error)?;
        Ok(Self { root, signer })
    }

    /// The signer, for the HTTP layer's file route.
    pub fn signer(&self) -> &UrlSigner {
        &self.signer
    }

    /// The directory holding the objects.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> BackendResult<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    async fn meta(key: &str, path: &Path) -> BackendResult<Option<BlobMeta>> {
        match tokio::fs::metadata(path).await {
            Ok(m) if m.is_file() => Ok(Some(BlobMeta {
                key: key.to_owned(),
                size: m.len(),
                content_type: None,
                last_modified: m.modified().ok().map(DateTime::<Utc>::from),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }
}

#[async_trait]
impl BlobStore for LocalDiskBlobStore {
    async fn put(
        &self,
        key: &str,
        mut body: ByteStream,
        _options: PutOptions,
    ) -> BackendResult<BlobMeta> {
        let path = self.path(key)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io_error)?;
        }
        let tmp = path.with_file_name(format!(".{:016x}.tmp", rand::random::<u64>()));
        let written = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            while let Some(chunk) = body.next().await {
                file.write_all(&chunk?).await?;
            }
            file.flush().await?;
            file.sync_all().await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(io_error(e));
        }
        Self::meta(key, &path).await?.ok_or_else(|| {
            BackendError::corrupt(BACKEND, format!("{key} vanished after it was written"))
        })
    }

    async fn head(&self, key: &str) -> BackendResult<Option<BlobMeta>> {
        let path = self.path(key)?;
        Self::meta(key, &path).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> BackendResult<Option<BlobBody>> {
        let path = self.path(key)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(e)),
        };
        let Some(meta) = Self::meta(key, &path).await? else {
            return Ok(None);
        };
        let range = clamp_range(range, meta.size).ok_or_else(|| {
            BackendError::InvalidArgument(format!("range outside the {} bytes of {key}", meta.size))
        })?;
        file.seek(SeekFrom::Start(range.start))
            .await
            .map_err(io_error)?;
        let body = ReaderStream::new(file.take(range.end - range.start)).boxed();
        Ok(Some(BlobBody { meta, range, body }))
    }

    async fn presign_get(
        &self,
        key: &str,
        ttl: Duration,
        file_name: &str,
    ) -> BackendResult<PresignedUrl> {
        validate_key(key)?;
        Ok(self.signer.sign(key, ttl, file_name))
    }

    async fn delete(&self, key: &str) -> BackendResult<()> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(e)),
        }
    }

    async fn health(&self) -> BackendResult<()> {
        // A name of its own per probe, so concurrent checks do not remove each other's file.
        let probe = self
            .root
            .join(format!(".health-{:016x}", rand::random::<u64>()));
        tokio::fs::write(&probe, b"ok").await.map_err(io_error)?;
        tokio::fs::remove_file(&probe).await.map_err(io_error)
    }
}
