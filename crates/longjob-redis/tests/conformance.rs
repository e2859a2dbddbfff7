//! The whole conformance kit against a real Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`); each backend instance gets its own key prefix.

mod common;

mod redis_store {
    longjob_core::store_conformance!(async { super::common::fresh().await.store() });
}

mod redis_queue {
    longjob_core::queue_conformance!(async { super::common::fresh().await.queue() });
}

mod redis_bus {
    longjob_core::bus_conformance!(async { super::common::fresh().await.bus() });
}
