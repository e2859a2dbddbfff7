//! How the bus numbers and keeps a job's events in Redis, beyond what the conformance kit checks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use futures::StreamExt;
use longjob_core::{EventPayload, JobEvent, JobId, JobState, ProgressBus};

fn status(state: JobState) -> EventPayload {
    EventPayload::Status {
        status: state,
        attempt: 1,
        error: None,
        next_run_at: None,
        progress: None,
    }
}

async fn seqs(bus: &impl ProgressBus, job: JobId, after: u64, n: usize) -> Vec<u64> {
    let mut events = bus.subscribe(job, after).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        seen.push(event.seq);
    }
    seen
}

/// A stream written by an earlier version (entry ids `<seq>-0`, a counter key) keeps numbering
/// after its last event, and replays from any seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_the_earlier_scheme_keeps_its_numbering() {
    let prefix = format!("lj-test-{}", uuid::Uuid::now_v7().simple());
    let redis = common::connect(common::fresh_config().prefix(&prefix)).await;
    let bus = redis.bus();
    let job = JobId::new();
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stream = format!("{{{prefix}}}:ev:{job}");
    for seq in 1..=2u64 {
        let event = JobEvent {
            seq,
            job_id: job,
            at: chrono::Utc::now(),
            payload: status(JobState::Queued),
        };
        let () = redis::cmd("XADD")
            .arg(&stream)
            .arg(format!("{seq}-0"))
            .arg("e")
            .arg(serde_json::to_string(&event).unwrap())
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let () = redis::cmd("SET")
        .arg(format!("{stream}:seq"))
        .arg(2)
        .query_async(&mut conn)
        .await
        .unwrap();

    let published = bus.publish(job, status(JobState::Running)).await.unwrap();
    assert_eq!(published.seq, 3);
    assert_eq!(seqs(&bus, job, 0, 3).await, [1, 2, 3]);
    assert_eq!(seqs(&bus, job, 2, 1).await, [3]);
    redis.delete_namespace().await.unwrap();
}

/// Events are numbered by the stream itself: after the stream is trimmed to its cap, numbering
/// goes on, and a replay after any retained seq is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbering_goes_on_past_the_streams_cap() {
    let redis = common::connect(common::fresh_config().event_retention(5)).await;
    let bus = redis.bus();
    let job = JobId::new();
    for expected in 1..=300u64 {
        let event = bus
            .publish(
                job,
                EventPayload::Progress {
                    progress: Default::default(),
                },
            )
            .await
            .unwrap();
        assert_eq!(event.seq, expected);
    }
    assert_eq!(seqs(&bus, job, 298, 2).await, [299, 300]);
    redis.delete_namespace().await.unwrap();
}

/// A finished job's events expire with the retention, unless the job is queued again (a
/// manual retry): then they are kept for good again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_again_keeps_its_events() {
    let redis =
        common::connect(common::fresh_config().finished_retention(Duration::from_millis(1000)))
            .await;
    let bus = redis.bus();
    let job = JobId::new();
    bus.publish(job, EventPayload::Cancelled {}).await.unwrap();
    bus.publish(job, status(JobState::Queued)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(seqs(&bus, job, 0, 2).await, [1, 2]);
    redis.delete_namespace().await.unwrap();
}
