//! Finished jobs and their events expire after the configured retention; unfinished ones never.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use chrono::Utc;
use longjob_core::store::Inserted;
use longjob_core::{EventPayload, Job, JobStore, ProgressBus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_and_their_events_expire() {
    let redis =
        common::connect(common::fresh_config().finished_retention(Duration::from_millis(1200)))
            .await;
    let (store, bus) = (redis.store(), redis.bus());
    let Inserted::New(mut done) = store
        .insert(
            &Job::new("k", "alice", serde_json::json!(1)),
            Duration::ZERO,
        )
        .await
        .unwrap()
    else {
        panic!()
    };
    let running = store
        .insert(
            &Job::new("k", "alice", serde_json::json!(2)),
            Duration::ZERO,
        )
        .await
        .unwrap()
        .job()
        .clone();
    bus.publish(done.id, EventPayload::status_of(&done))
        .await
        .unwrap();
    bus.publish(running.id, EventPayload::status_of(&running))
        .await
        .unwrap();
    done.start(1, Utc::now()).unwrap();
    let mut done = store.update(&done).await.unwrap();
    done.complete(None, Utc::now()).unwrap();
    store.update(&done).await.unwrap();
    bus.publish(done.id, common::completed()).await.unwrap();
    assert_eq!(
        store
            .count_by_owner("alice", Utc::now() - chrono::Duration::hours(1))
            .await
            .unwrap()
            .active,
        1
    );

    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(
        store.get(done.id).await.unwrap().is_none(),
        "the finished job expired"
    );
    assert!(
        store.get(running.id).await.unwrap().is_some(),
        "an unfinished job stays"
    );
    let mut replay = bus.subscribe(done.id, 0).await.unwrap();
    let replayed = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut replay),
    )
    .await;
    assert!(
        replayed.is_err(),
        "the finished job's events expired: {replayed:?}"
    );
    let mut kept = bus.subscribe(running.id, 0).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut kept))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.seq, 1, "an unfinished job's events stay");
    // Listing forgets the expired job.
    let listed = store.list_by_owner("alice", 10).await.unwrap();
    assert_eq!(
        listed.iter().map(|j| j.id).collect::<Vec<_>>(),
        [running.id]
    );
    redis.delete_namespace().await.unwrap();
}
