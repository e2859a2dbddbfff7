//! The conformance test kit: one public async suite per backend trait, in the manner of
//! `object_store`'s integration suite. Every backend's tests run the same cases against a real
//! server; the in-memory backends run them in this crate's own tests.
//!
//! Each suite is a set of public async functions, one per case, and a macro that turns them
//! into one `#[tokio::test]` each:
//!
//! ```text
//! // in a backend's tests/conformance.rs
//! longjob_core::queue_conformance!(async { MyQueue::connect(fresh_namespace()).await.unwrap() });
//! longjob_core::store_conformance!(async { MyStore::connect(fresh_namespace()).await.unwrap() });
//! longjob_core::bus_conformance!(async { MyBus::connect(fresh_namespace()).await.unwrap() });
//! longjob_core::blob_conformance!(async { BlobFixture::new(my_store, my_fetcher) });
//! ```
//!
//! Each case gets a fresh backend from the expression, so backends that share a server should
//! give each instance its own namespace (key prefix, schema, bucket prefix).
//! The expanding crate needs `tokio` (features `macros`, `rt-multi-thread`) as a dev-dependency.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod blob;
pub mod bus;
pub mod queue;
pub mod store;

use std::future::Future;
use std::time::Duration;

/// Awaits `fut` for at most `secs` seconds, panicking with `what` past that, so a broken backend
/// fails a case instead of hanging the suite.
pub async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs}s: {what}"),
    }
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($suite:ident, $make:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend = $make.await;
                $crate::testkit::$suite::$case(&backend).await;
            }
        )+
    };
}
