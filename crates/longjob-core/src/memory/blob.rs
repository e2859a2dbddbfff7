use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::lock;
use crate::blob::{
    BlobBody, BlobMeta, BlobStore, ByteStream, PresignedUrl, PutOptions, byte_stream, clamp_range,
    collect_bytes, validate_key,
};
use crate::signing::UrlSigner;
use crate::{BackendError, BackendResult};

/// A [`BlobStore`] in process memory, whose presigned URLs point at the HTTP layer's file route
/// and carry an HMAC ([`UrlSigner`]).
#[derive(Debug)]
pub struct MemoryBlobStore {
    objects: Mutex<HashMap<String, Object>>,
    signer: UrlSigner,
}

#[derive(Debug, Clone)]
struct Object {
    bytes: Bytes,
    content_type: Option<String>,
    modified: DateTime<Utc>,
}

impl MemoryBlobStore {
    /// An empty store signing URLs with `signer`.
    pub fn new(signer: UrlSigner) -> Self {
        Self {
            objects: Mutex::default(),
            signer,
        }
    }

    /// The signer, for the HTTP layer's file route.
    pub fn signer(&self) -> &UrlSigner {
        &self.signer
    }
}

fn meta(key: &str, object: &Object) -> BlobMeta {
    BlobMeta {
        key: key.to_owned(),
        size: object.bytes.len() as u64,
        content_type: object.content_type.clone(),
        last_modified: Some(object.modified),
    }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    async fn put(
        &self,
        key: &str,
        body: ByteStream,
        options: PutOptions,
    ) -> BackendResult<BlobMeta> {
        validate_key(key)?;
        let bytes = collect_bytes(body)
            .await
            .map_err(|e| BackendError::unavailable("memory", e))?;
        let object = Object {
            bytes,
            content_type: options.content_type,
            modified: Utc::now(),
        };
        let meta = meta(key, &object);
        lock(&self.objects).insert(key.to_owned(), object);
        Ok(meta)
    }

    async fn head(&self, key: &str) -> BackendResult<Option<BlobMeta>> {
        validate_key(key)?;
        Ok(lock(&self.objects).get(key).map(|o| meta(key, o)))
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> BackendResult<Option<BlobBody>> {
        validate_key(key)?;
        let Some(object) = lock(&self.objects).get(key).cloned() else {
            return Ok(None);
        };
        let meta = meta(key, &object);
        let range = clamp_range(range, meta.size).ok_or_else(|| {
            BackendError::InvalidArgument(format!("range outside the {} bytes of {key}", meta.size))
        })?;
        // Ranges are clamped to the object, and objects in memory are smaller than usize::MAX.
        let slice = object.bytes.slice(
            usize::try_from(range.start).unwrap_or(usize::MAX)
                ..usize::try_from(range.end).unwrap_or(usize::MAX),
        );
        Ok(Some(BlobBody {
            meta,
            range,
            body: byte_stream(slice),
        }))
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
        validate_key(key)?;
        lock(&self.objects).remove(key);
        Ok(())
    }

    async fn health(&self) -> BackendResult<()> {
        Ok(())
    }
}
