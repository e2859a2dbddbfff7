//! Bus paths the kit does not reach: events too large for a notification, many jobs'
//! subscribers sharing the one listening connection, and batches holding many events of one job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use futures::StreamExt;
use longjob_core::{EventPayload, JobError, JobId, ProgressBus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_for_a_notification_arrives_live_from_the_table() {
    let bus = common::backend().await.bus();
    let job = JobId::new();
    let mut stream = bus.subscribe(job, 0).await.unwrap();
    let filler = || EventPayload::Progress {
        progress: Default::default(),
    };
    // Over PostgreSQL's 8000-byte notification payload.
    let large = EventPayload::Failed {
        error: JobError::internal("x".repeat(20_000)),
        attempt: 1,
    };
    bus.publish(job, filler()).await.unwrap();
    bus.publish(job, large.clone()).await.unwrap();
    bus.publish(job, filler()).await.unwrap();
    for (seq, expected) in [(1, filler()), (2, large), (3, filler())] {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("event in time")
            .expect("stream open")
            .unwrap();
        assert_eq!((event.seq, event.payload), (seq, expected));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_of_many_jobs_share_one_listening_connection() {
    let pg = common::backend().await;
    let bus = pg.bus();
    let jobs: Vec<JobId> = (0..200).map(|_| JobId::new()).collect();
    let mut streams = Vec::new();
    for job in &jobs {
        streams.push(bus.subscribe(*job, 0).await.unwrap());
    }
    let listening: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%' AND query LIKE $1",
    )
    .bind(format!("%{}__%", pg.schema()))
    .fetch_one(pg.pool())
    .await
    .unwrap();
    assert_eq!(listening, 1, "one LISTEN connection for every subscriber");
    for job in &jobs {
        bus.publish(*job, EventPayload::Cancelled {}).await.unwrap();
    }
    for (job, stream) in jobs.iter().zip(&mut streams) {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("event in time")
            .expect("stream open")
            .unwrap();
        assert_eq!((event.job_id, event.seq), (*job, 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_events_of_one_job_in_a_batch_get_gapless_seqs_as_stored() {
    let bus = common::backend().await.bus();
    let jobs: Vec<JobId> = (0..5).map(|_| JobId::new()).collect();
    // All at once, so batches hold several events of each job.
    let mut calls = Vec::new();
    for n in 0..20u64 {
        for job in &jobs {
            let (bus, job) = (bus.clone(), *job);
            calls.push(async move {
                let payload = EventPayload::Progress {
                    progress: longjob_core::Progress {
                        current: n,
                        total: 20,
                        ..Default::default()
                    },
                };
                bus.publish(job, payload).await.unwrap()
            });
        }
    }
    let published = futures::future::join_all(calls).await;
    for job in &jobs {
        let mut mine: Vec<_> = published.iter().filter(|e| e.job_id == *job).collect();
        mine.sort_by_key(|e| e.seq);
        assert_eq!(
            mine.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>()
        );
        // What each call was told is what is stored.
        let mut stream = bus.subscribe(*job, 0).await.unwrap();
        for expected in mine {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("event in time")
                .expect("stream open")
                .unwrap();
            assert_eq!(
                (event.seq, &event.payload),
                (expected.seq, &expected.payload)
            );
        }
    }
}

/// A notification carries the event itself (`<job>:<seq>:<event JSON>`), so subscribers need
/// not read the table: a notification the hub could not decode would only slow them down,
/// which no delivery test would notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_notification_carries_the_event_as_published() {
    let pg = common::backend().await;
    let mut listener = sqlx::postgres::PgListener::connect(&common::database_url())
        .await
        .unwrap();
    listener
        .listen(&format!("{}__events", pg.schema()))
        .await
        .unwrap();
    let job = JobId::new();
    let payloads = [
        EventPayload::Progress {
            progress: longjob_core::Progress {
                current: 1,
                total: 3,
                bytes_done: 10,
                eta_ms: Some(5),
            },
        },
        EventPayload::Failed {
            error: JobError::internal("a \"quoted\" message, with: colons\nand a line"),
            attempt: 2,
        },
    ];
    let published = pg.bus().publish_many(job, payloads.to_vec()).await.unwrap();
    for expected in published {
        let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("notification in time")
            .unwrap();
        let (head, json) = notification
            .payload()
            .split_at(notification.payload().match_indices(':').nth(1).unwrap().0);
        assert_eq!(head, format!("{job}:{}", expected.seq));
        let event: longjob_core::JobEvent = serde_json::from_str(&json[1..]).unwrap();
        assert_eq!(event, expected);
    }
}
