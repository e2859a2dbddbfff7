//! Batches at scale: 10 000 leases claimed and extended, each in one script call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use longjob_core::{JobId, Queue};

async fn evalsha_calls() -> u64 {
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("calls=")))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_leases_are_claimed_and_extended_in_one_call_each() {
    const N: usize = 10_000;
    let redis = common::fresh().await;
    let queue = redis.queue();
    let ids: Vec<JobId> = (0..N).map(|_| JobId::new()).collect();
    queue.push_many(&ids, Duration::ZERO).await.unwrap();

    let started = Instant::now();
    let leases = queue
        .claim(N, Duration::from_secs(60), Duration::ZERO)
        .await
        .unwrap();
    let claim_took = started.elapsed();
    assert_eq!(leases.len(), N, "one claim leases the whole batch");

    let before = evalsha_calls().await;
    let started = Instant::now();
    let held = queue
        .extend(&leases, Duration::from_secs(60))
        .await
        .unwrap();
    let extend_took = started.elapsed();
    let calls = evalsha_calls().await - before;
    assert!(held.iter().all(|h| *h));
    // Other clients of a shared Redis may run scripts meanwhile; ours is one.
    assert!(calls >= 1);
    eprintln!(
        "claim of {N}: {claim_took:?}; heartbeat of {N} leases: one script call, {extend_took:?} \
         ({calls} script calls seen on the server meanwhile)"
    );
    redis.delete_namespace().await.unwrap();
}
