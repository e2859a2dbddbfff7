//! The conformance kit's blob suite against a real S3 server that verifies SigV4.

mod common;

mod s3_blob {
    longjob_core::blob_conformance!(async {
        let store = super::common::store().await;
        longjob_core::testkit::blob::BlobFixture::new(
            std::sync::Arc::new(store),
            super::common::fetcher(),
        )
    });
}
