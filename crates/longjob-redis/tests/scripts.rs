//! How the backend calls its Lua scripts, and what they write.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use longjob_core::{JobId, Queue};

/// A token past 10^14 (15 digits) reaches the worker whole: Lua's own number-to-string
/// (`%.14g`) would write it with an exponent, which no client could read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_past_ten_to_the_fourteenth_stay_exact() {
    let (prefix, redis, mut conn) = common::under_fresh_prefix(common::fresh_config()).await;
    let counter = format!("{{{prefix}}}:q:seq");
    let () = redis::cmd("SET")
        .arg(&counter)
        .arg("999999999999999")
        .query_async(&mut conn)
        .await
        .unwrap();
    let queue = redis.queue();
    let jobs = [JobId::new(), JobId::new()];
    for job in jobs {
        queue.push(job, Duration::ZERO).await.unwrap();
    }
    let leases = queue
        .claim(2, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    let tokens: Vec<u64> = leases.iter().map(|l| l.token).collect();
    assert_eq!(tokens, [1_000_000_000_000_000, 1_000_000_000_000_001]);
    let held = queue
        .extend(&leases, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(held, [true, true], "the tokens written match the leases'");
    redis.delete_namespace().await.unwrap();
}

/// Scripts that Redis forgot (a restart without persistence, `SCRIPT FLUSH`) are loaded again
/// by the call that finds them missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_cache_is_loaded_again() {
    let (_, redis, mut conn) = common::under_fresh_prefix(common::fresh_config()).await;
    let queue = redis.queue();
    let job = JobId::new();
    queue.push(job, Duration::ZERO).await.unwrap();
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let leases = queue
        .claim(1, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(leases.iter().map(|l| l.job_id).collect::<Vec<_>>(), [job]);
    redis.delete_namespace().await.unwrap();
}

/// The tokens hash is a hash table from the first claim on, even with a few leases in flight
/// and after they are all acked: as a listpack, every access would scan it end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tokens_hash_stays_a_hash_table() {
    let (prefix, redis, mut conn) = common::under_fresh_prefix(common::fresh_config()).await;
    let tokens = format!("{{{prefix}}}:q:tokens");
    let queue = redis.queue();
    let job = JobId::new();
    queue.push(job, Duration::ZERO).await.unwrap();
    let leases = queue
        .claim(1, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        encoding(&mut conn, &tokens).await.as_deref(),
        Some("hashtable")
    );
    assert!(queue.ack(&leases[0]).await.unwrap());
    assert_eq!(
        encoding(&mut conn, &tokens).await.as_deref(),
        Some("hashtable"),
        "still there, and a hash table, with no lease in flight"
    );
    let again = JobId::new();
    queue.push(again, Duration::ZERO).await.unwrap();
    let leases = queue
        .claim(1, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(leases.iter().map(|l| l.job_id).collect::<Vec<_>>(), [again]);
    redis.delete_namespace().await.unwrap();
}

async fn encoding(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}
