//! One process, 2 000 subscribers on 50 jobs: at most 4 Redis connections, and every
//! subscriber sees every event of its job, in order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use longjob_core::{EventPayload, JobId, Progress, ProgressBus};

const JOBS: usize = 50;
const SUBSCRIBERS: usize = 2000;
const EVENTS: u64 = 30;

/// Connections named `name` in `CLIENT LIST`, asked on a connection of its own.
async fn connections_named(name: &str) -> usize {
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    list.lines()
        .filter(|line| line.split(' ').any(|f| f == format!("name={name}")))
        .count()
}

fn progress(n: u64) -> EventPayload {
    EventPayload::Progress {
        progress: Progress {
            current: n,
            total: EVENTS,
            ..Progress::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_subscribers_share_four_connections() {
    let name = format!("longjob-fanout-{}", uuid::Uuid::now_v7().simple());
    let redis = common::connect(common::fresh_config().client_name(&name).pool_size(3)).await;
    let bus = Arc::new(redis.bus());
    let jobs: Vec<JobId> = (0..JOBS).map(|_| JobId::new()).collect();

    // Half subscribe before anything is published, half while events are being published.
    let mut streams = Vec::with_capacity(SUBSCRIBERS);
    for i in 0..SUBSCRIBERS / 2 {
        let job = jobs[i % JOBS];
        streams.push((job, bus.subscribe(job, 0).await.unwrap()));
    }
    let max_seen = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (name, max_seen) = (name.clone(), Arc::clone(&max_seen));
        tokio::spawn(async move {
            loop {
                let n = connections_named(&name).await;
                max_seen.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let publisher = {
        let (bus, jobs) = (Arc::clone(&bus), jobs.clone());
        tokio::spawn(async move {
            for n in 1..=EVENTS {
                futures::future::join_all(jobs.iter().map(|job| bus.publish(*job, progress(n))))
                    .await
                    .into_iter()
                    .for_each(|r| {
                        r.unwrap();
                    });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    for i in SUBSCRIBERS / 2..SUBSCRIBERS {
        let job = jobs[i % JOBS];
        streams.push((job, bus.subscribe(job, 0).await.unwrap()));
    }
    publisher.await.unwrap();

    let readers = streams
        .into_iter()
        .enumerate()
        .map(|(i, (job, mut stream))| async move {
            let mut expected = 1;
            while expected <= EVENTS {
                let event = tokio::time::timeout(Duration::from_secs(60), stream.next())
                    .await
                    .unwrap_or_else(|_| panic!("subscriber {i} timed out at seq {expected}"))
                    .unwrap_or_else(|| panic!("subscriber {i} ended at seq {expected}"))
                    .unwrap();
                assert_eq!(event.job_id, job, "subscriber {i}");
                assert_eq!(event.seq, expected, "subscriber {i}");
                assert_eq!(event.payload, progress(expected), "subscriber {i}");
                expected += 1;
            }
        });
    futures::future::join_all(readers).await;
    let now = connections_named(&name).await;
    sampler.abort();
    let max = max_seen.load(Ordering::SeqCst).max(now);
    eprintln!("{SUBSCRIBERS} subscribers on {JOBS} jobs: at most {max} connections");
    assert!(max >= 1, "the connections were not found by name");
    assert!(max <= 4, "{max} connections for {SUBSCRIBERS} subscribers");
}
