//! In-memory backends: for tests, for the embedded default, and as the reference semantics.
//!
//! They live in one process by nature: nothing they hold is seen by another process.

mod blob;
mod bus;
mod queue;
mod store;

pub use blob::MemoryBlobStore;
pub use bus::MemoryProgressBus;
pub use queue::MemoryQueue;
pub use store::MemoryJobStore;

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical section
/// here leaves the data consistent before anything that could panic.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
