//! The in-memory backends and the local-disk blob store run the whole conformance kit.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use longjob_core::local_disk::LocalDiskBlobStore;
use longjob_core::memory::{MemoryBlobStore, MemoryJobStore, MemoryProgressBus, MemoryQueue};
use longjob_core::signing::UrlSigner;
use longjob_core::testkit::blob::BlobFixture;

mod memory_store {
    longjob_core::store_conformance!(async { super::MemoryJobStore::new() });
}

mod memory_queue {
    longjob_core::queue_conformance!(async { super::MemoryQueue::new() });
}

mod memory_bus {
    longjob_core::bus_conformance!(async { super::MemoryProgressBus::default() });
}

fn signer() -> UrlSigner {
    UrlSigner::random("http://127.0.0.1:3000/v1/download/files")
}

mod memory_blob {
    longjob_core::blob_conformance!(async {
        let signer = super::signer();
        let store = super::MemoryBlobStore::new(signer.clone());
        super::BlobFixture::signed_by(super::Arc::new(store), signer)
    });
}

mod local_disk_blob {
    longjob_core::blob_conformance!(async {
        let signer = super::signer();
        // Kept for the life of the test process; the OS cleans its temporary directory.
        let dir = tempfile::tempdir().unwrap().keep();
        let store = super::LocalDiskBlobStore::new(dir, signer.clone())
            .await
            .unwrap();
        super::BlobFixture::signed_by(super::Arc::new(store), signer)
    });
}
