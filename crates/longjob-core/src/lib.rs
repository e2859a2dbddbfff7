//! # longjob-core
//!
//! Turns slow HTTP work (10–120 s downloads, exports, reports) into background jobs with
//! leases, live progress and presigned downloads.
//!
//! This crate holds what every deployment shares:
//! - the model: [`JobId`], [`Job`], [`JobState`] and the one transition function [`next_state`],
//!   [`JobEvent`], [`JobError`] with its [`ErrorKind`];
//! - the four backend traits: [`JobStore`], [`Queue`], [`ProgressBus`], [`BlobStore`];
//! - [`RetryPolicy`] and [`Timeouts`];
//! - the worker runtime ([`worker`]) and the [`LongJob`] facade;
//! - [`batch`]: write combining for backend authors;
//! - in-memory backends ([`memory`]) and a local-disk blob store ([`local_disk`]);
//! - with the `testkit` feature, the conformance suites every backend must pass ([`testkit`]).
//!
//! It knows no backend, no HTTP framework and no download domain.
#![deny(missing_docs)]

pub mod batch;
pub mod blob;
pub mod bus;
mod error;
pub mod event;
mod facade;
mod id;
pub mod job;
pub mod json;
pub mod local_disk;
pub mod memory;
pub mod policy;
pub mod queue;
pub mod rfc3339;
pub mod signing;
pub mod state;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod worker;

pub use blob::BlobStore;
pub use bus::ProgressBus;
pub use error::{BackendError, BackendResult, BoxError, ErrorKind, JobError};
pub use event::{EventPayload, JobEvent};
pub use facade::{
    DownloadUrl, HealthReport, LongJob, LongJobBuilder, LongJobConfig, LongJobError, SubmitRequest,
    Submitted,
};
pub use id::{InvalidJobId, JobId};
pub use job::{ItemRecord, ItemStatus, Job, JobResult, Progress};
pub use policy::{RetryDecision, RetryPolicy, Timeouts};
pub use queue::{Lease, Queue};
pub use state::{InvalidTransition, JobState, Transition, next_state};
pub use store::JobStore;
pub use worker::{HandlerResult, JobContext, WorkerBuilder, WorkerConfig, WorkerHandle};
