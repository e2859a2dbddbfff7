//! The mock file source: a file is available iff `file_id % 7 == 0`; its object is a small zip
//! archive (`downloads/<id>.zip`) holding one text entry whose length and bytes are a
//! deterministic function of the id (at most 256 KiB).

use std::io::{Cursor, Write};

use async_trait::async_trait;
use longjob_axum::{FileInfo, FileSource};
use longjob_core::blob::{ByteStream, byte_stream};
use longjob_core::{BackendError, BackendResult};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// The smallest and largest entry of a mock file.
const MIN_ENTRY: u64 = 1024;
const MAX_ENTRY: u64 = 256 * 1024;

/// The mock rule of the original service.
#[derive(Debug, Clone, Copy, Default)]
pub struct MockSource;

/// Whether the mock has the file.
pub fn available(file_id: u64) -> bool {
    file_id.is_multiple_of(7)
}

fn entry_name(file_id: u64) -> String {
    format!("file-{file_id}.txt")
}

/// The length of the one entry of file `file_id`.
pub fn entry_len(file_id: u64) -> u64 {
    MIN_ENTRY + file_id.wrapping_mul(2_654_435_761) % (MAX_ENTRY - MIN_ENTRY + 1)
}

/// The entry's bytes: numbered lines naming the file, cut to [`entry_len`].
pub fn entry_bytes(file_id: u64) -> Vec<u8> {
    let len = entry_len(file_id) as usize;
    let mut out = Vec::with_capacity(len + 64);
    let mut line = 0u64;
    while out.len() < len {
        let _ = writeln!(
            out,
            "longjob mock file {file_id}, line {line:06}: the quick brown fox jumps over the lazy dog"
        );
        line += 1;
    }
    out.truncate(len);
    out
}

/// The size of the object `downloads/<id>.zip`: a stored zip of one entry without extra
/// fields is 30 + n (local header) + data + 46 + n (central directory) + 22 (end record) bytes.
pub fn object_size(file_id: u64) -> u64 {
    let n = entry_name(file_id).len() as u64;
    98 + 2 * n + entry_len(file_id)
}

/// The object `downloads/<id>.zip`.
pub fn object_bytes(file_id: u64) -> std::io::Result<Vec<u8>> {
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default());
    zip.start_file(entry_name(file_id), options)
        .map_err(std::io::Error::other)?;
    zip.write_all(&entry_bytes(file_id))?;
    Ok(zip.finish().map_err(std::io::Error::other)?.into_inner())
}

#[async_trait]
impl FileSource for MockSource {
    async fn check(&self, file_id: u64) -> BackendResult<Option<FileInfo>> {
        Ok(available(file_id).then(|| FileInfo {
            key: format!("downloads/{file_id}.zip"),
            size: object_size(file_id),
        }))
    }

    async fn read(&self, file_id: u64) -> BackendResult<Option<ByteStream>> {
        if !available(file_id) {
            return Ok(None);
        }
        let bytes = tokio::task::spawn_blocking(move || object_bytes(file_id))
            .await
            .map_err(|e| BackendError::corrupt("mock", e))?
            .map_err(|e| BackendError::corrupt("mock", e))?;
        Ok(Some(byte_stream(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_told_is_the_size_served_and_content_is_deterministic() {
        for id in [10_003u64, 70_000, 99_995, 100_000_000 - 1] {
            let bytes = object_bytes(id).unwrap();
            assert_eq!(bytes.len() as u64, object_size(id), "file {id}");
            assert_eq!(bytes, object_bytes(id).unwrap());
            assert!(entry_len(id) <= 1024 * 1024);
            let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
            let mut entry = archive.by_index(0).unwrap();
            let mut content = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
            assert_eq!(content, entry_bytes(id));
        }
        assert!(available(70_000) && !available(70_001));
    }
}
