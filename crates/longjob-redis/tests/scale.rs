//! Batches at scale: 10 000 leases claimed and extended, each in one script call with a
//! handful of Redis commands; acks gathered into one call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use longjob_core::{JobId, Queue};

/// Per command, the server's count of calls (`INFO commandstats`).
async fn command_stats() -> Vec<(String, u64)> {
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_")?.split_once(':'))
        .filter_map(|(name, fields)| {
            let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().unwrap()))
        })
        .collect()
}

async fn evalsha_calls() -> u64 {
    command_stats()
        .await
        .into_iter()
        .find_map(|(name, calls)| (name == "evalsha").then_some(calls))
        .unwrap_or(0)
}

/// Redis commands the server ran (scripts' nested commands included), leaving out scripts
/// themselves and `INFO`.
async fn command_calls() -> u64 {
    command_stats()
        .await
        .into_iter()
        .filter(|(name, _)| !matches!(name.as_str(), "evalsha" | "eval" | "info"))
        .map(|(_, calls)| calls)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_leases_are_claimed_and_extended_in_one_call_each() {
    const N: usize = 10_000;
    let redis = common::fresh().await;
    let queue = redis.queue();
    let ids: Vec<JobId> = (0..N).map(|_| JobId::new()).collect();
    queue.push_many(&ids, Duration::ZERO).await.unwrap();

    let commands = command_calls().await;
    let started = Instant::now();
    let leases = queue
        .claim(N, Duration::from_secs(60), Duration::ZERO)
        .await
        .unwrap();
    let claim_took = started.elapsed();
    let claim_commands = command_calls().await - commands;
    assert_eq!(leases.len(), N, "one claim leases the whole batch");
    // Commands go per chunk of 500 jobs, not per job (that would be 30 000 here).
    assert!(
        claim_commands < 200,
        "{claim_commands} commands for one claim"
    );

    let before = evalsha_calls().await;
    let commands = command_calls().await;
    let started = Instant::now();
    let held = queue
        .extend(&leases, Duration::from_secs(60))
        .await
        .unwrap();
    let extend_took = started.elapsed();
    let calls = evalsha_calls().await - before;
    let extend_commands = command_calls().await - commands;
    assert!(held.iter().all(|h| *h));
    assert!(
        extend_commands < 200,
        "{extend_commands} commands for one extend"
    );
    // Other clients of a shared Redis may run scripts meanwhile; ours is one.
    assert!(calls >= 1);
    eprintln!(
        "claim of {N}: {claim_took:?}; heartbeat of {N} leases: one script call, {extend_took:?} \
         ({calls} script calls seen on the server meanwhile)"
    );
    redis.delete_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_acked_twice_at_once_is_acked_once() {
    let redis = common::fresh().await;
    let queue = redis.queue();
    let ids: Vec<JobId> = (0..3).map(|_| JobId::new()).collect();
    queue.push_many(&ids, Duration::ZERO).await.unwrap();
    let leases = queue
        .claim(3, Duration::from_secs(60), Duration::ZERO)
        .await
        .unwrap();
    let lease = leases[0];
    // Gathered into one script call, or not: either way one ack wins.
    let (a, b, c) = tokio::join!(queue.ack(&lease), queue.ack(&lease), queue.ack(&leases[1]));
    assert_eq!(
        [a.unwrap(), b.unwrap()]
            .iter()
            .filter(|acked| **acked)
            .count(),
        1
    );
    assert!(c.unwrap());
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.leased, stats.ready), (1, 0));
    redis.delete_namespace().await.unwrap();
}
