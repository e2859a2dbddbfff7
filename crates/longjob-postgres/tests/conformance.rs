//! The whole conformance kit against the PostgreSQL at `DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), each case on a fresh schema.

mod common;

mod pg_store {
    longjob_core::store_conformance!(async { super::common::backend().await.store() });
}

mod pg_queue {
    longjob_core::queue_conformance!(async { super::common::backend().await.queue() });
}

mod pg_bus {
    longjob_core::bus_conformance!(async { super::common::backend().await.bus() });
}

/// With notifications off (as behind a transaction-mode pooler) everything works by polling.
mod pg_queue_polling {
    longjob_core::queue_conformance!(async {
        super::common::backend_without_notifications().await.queue()
    });
}

mod pg_bus_polling {
    longjob_core::bus_conformance!(async {
        super::common::backend_without_notifications().await.bus()
    });
}

/// With the workers' store writes committed without waiting for the WAL flush: the same
/// semantics (only durability across a database crash differs).
mod pg_store_relaxed_worker_writes {
    longjob_core::store_conformance!(async {
        super::common::connect_with(super::common::config().relaxed_worker_writes(true))
            .await
            .store()
    });
}
