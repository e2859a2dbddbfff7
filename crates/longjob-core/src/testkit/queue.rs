//! Conformance cases for [`Queue`].
//!
//! Lease expiry is real time here (real servers have real clocks): the cases use leases of
//! [`SHORT_LEASE`] and wait a few multiples of it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{JobId, Lease, Queue};

use super::within;

/// The lease time-to-live used where a case lets a lease expire.
pub const SHORT_LEASE: Duration = Duration::from_millis(400);
const LONG_LEASE: Duration = Duration::from_secs(60);
const NO_WAIT: Duration = Duration::ZERO;

/// Expands to one `#[tokio::test]` per [`Queue`](crate::Queue) case, each with a fresh queue from
/// `$make` (an expression giving a future of the queue).
#[macro_export]
macro_rules! queue_conformance {
    ($make:expr) => {
        $crate::__conformance_cases!(queue, $make;
            push_then_claim_delivers_once,
            claim_respects_max_and_due_order,
            delayed_jobs_are_not_delivered_early,
            waiting_claim_is_woken_by_push,
            concurrent_claimers_get_each_job_exactly_once,
            expired_lease_makes_the_job_claimable_again,
            an_expired_lease_is_not_held_before_its_job_is_claimed_again,
            extend_keeps_leases_in_one_call,
            ack_removes_the_job,
            requeue_delays_and_issues_a_newer_token,
            push_of_a_waiting_job_keeps_one_copy,
            push_of_a_leased_job_revokes_the_lease,
            stats_count_ready_delayed_and_leased,
        );
    };
}

async fn claim_all(queue: &impl Queue, max: usize) -> Vec<Lease> {
    queue.claim(max, LONG_LEASE, NO_WAIT).await.unwrap()
}

/// Pushed jobs are claimed once each, with distinct tokens; nothing is left after.
pub async fn push_then_claim_delivers_once(queue: &impl Queue) {
    let ids: Vec<JobId> = (0..3).map(|_| JobId::new()).collect();
    for id in &ids {
        queue.push(*id, Duration::ZERO).await.unwrap();
    }
    let leases = claim_all(queue, 10).await;
    let claimed: HashSet<JobId> = leases.iter().map(|l| l.job_id).collect();
    assert_eq!(claimed, ids.iter().copied().collect());
    let tokens: HashSet<u64> = leases.iter().map(|l| l.token).collect();
    assert_eq!(tokens.len(), 3, "tokens must be distinct");
    assert!(claim_all(queue, 10).await.is_empty());
}

/// Claim returns at most `max`, oldest due first.
pub async fn claim_respects_max_and_due_order(queue: &impl Queue) {
    let ids: Vec<JobId> = (0..5).map(|_| JobId::new()).collect();
    for id in &ids {
        queue.push(*id, Duration::ZERO).await.unwrap();
        // Distinct due times even on a coarse clock.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let first = claim_all(queue, 2).await;
    assert_eq!(first.iter().map(|l| l.job_id).collect::<Vec<_>>(), ids[..2]);
    let rest = claim_all(queue, 10).await;
    assert_eq!(rest.iter().map(|l| l.job_id).collect::<Vec<_>>(), ids[2..]);
}

/// A job pushed with a delay is not delivered before it, and is delivered after it.
pub async fn delayed_jobs_are_not_delivered_early(queue: &impl Queue) {
    let id = JobId::new();
    let pushed = Instant::now();
    queue.push(id, Duration::from_millis(800)).await.unwrap();
    assert!(
        claim_all(queue, 10).await.is_empty(),
        "delivered before its time"
    );
    let leases = within(10, "delayed claim", async {
        loop {
            let leases = queue
                .claim(10, LONG_LEASE, Duration::from_millis(200))
                .await
                .unwrap();
            if !leases.is_empty() {
                break leases;
            }
        }
    })
    .await;
    assert!(
        pushed.elapsed() >= Duration::from_millis(750),
        "delivered after {:?}",
        pushed.elapsed()
    );
    assert_eq!(leases[0].job_id, id);
}

/// A claim waiting on an empty queue returns the job pushed meanwhile, long before its wait ends.
pub async fn waiting_claim_is_woken_by_push(queue: &impl Queue) {
    let id = JobId::new();
    let started = Instant::now();
    let (leases, ()) = tokio::join!(
        async {
            queue
                .claim(1, LONG_LEASE, Duration::from_secs(20))
                .await
                .unwrap()
        },
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            queue.push(id, Duration::ZERO).await.unwrap();
        }
    );
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].job_id, id);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the waiting claim was not woken by the push ({:?})",
        started.elapsed()
    );
}

/// Eight claimers over 10 000 jobs: each job is claimed exactly once.
pub async fn concurrent_claimers_get_each_job_exactly_once(queue: &impl Queue) {
    const JOBS: usize = 10_000;
    let ids: Vec<JobId> = (0..JOBS).map(|_| JobId::new()).collect();
    for chunk in ids.chunks(1000) {
        queue.push_many(chunk, Duration::ZERO).await.unwrap();
    }
    let seen = Mutex::new(HashMap::<JobId, u32>::new());
    let claimers = (0..8).map(|_| async {
        loop {
            let leases = queue.claim(50, LONG_LEASE, NO_WAIT).await.unwrap();
            if leases.is_empty() {
                break;
            }
            for lease in &leases {
                *seen.lock().unwrap().entry(lease.job_id).or_default() += 1;
                assert!(queue.ack(lease).await.unwrap(), "ack of a fresh lease");
            }
        }
    });
    within(
        300,
        "8 claimers over 10 000 jobs",
        futures::future::join_all(claimers),
    )
    .await;
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), JOBS, "every job claimed");
    assert!(seen.values().all(|n| *n == 1), "some job was claimed twice");
}

/// A lease that is not extended expires: the job is claimable again with a newer token, marked
/// redelivered (that once), and the old lease can no longer ack, extend or requeue.
pub async fn expired_lease_makes_the_job_claimable_again(queue: &impl Queue) {
    let id = JobId::new();
    queue.push(id, Duration::ZERO).await.unwrap();
    let old = queue.claim(1, SHORT_LEASE, NO_WAIT).await.unwrap();
    assert_eq!(old.len(), 1);
    assert!(!old[0].redelivered, "a pushed job is not redelivered");
    assert!(
        claim_all(queue, 1).await.is_empty(),
        "a live lease must not be claimable"
    );
    tokio::time::sleep(SHORT_LEASE * 3).await;
    let new = within(
        10,
        "claim after expiry",
        queue.claim(1, LONG_LEASE, Duration::from_secs(2)),
    )
    .await
    .unwrap();
    assert_eq!(new.len(), 1, "the expired job must be claimable again");
    assert_eq!(new[0].job_id, id);
    assert!(new[0].token > old[0].token, "the new token must be larger");
    assert!(
        new[0].redelivered,
        "a job back from an expired lease is redelivered"
    );
    assert!(!queue.ack(&old[0]).await.unwrap());
    assert_eq!(queue.extend(&old, LONG_LEASE).await.unwrap(), [false]);
    assert!(!queue.requeue(&old[0], Duration::ZERO).await.unwrap());
    assert!(queue.requeue(&new[0], Duration::ZERO).await.unwrap());
    let again = claim_all(queue, 1).await;
    assert_eq!(again.len(), 1);
    assert!(!again[0].redelivered, "a requeued job is not redelivered");
    assert!(queue.ack(&again[0]).await.unwrap());

    // Lost again, and pushed again before it is claimed: its next delivery is a pushed one.
    // Another job, due before the lost one's expiry, takes the claim that finds the expiry.
    queue.push(id, Duration::ZERO).await.unwrap();
    let lost = queue.claim(1, SHORT_LEASE, NO_WAIT).await.unwrap();
    assert_eq!(lost.len(), 1);
    let other = JobId::new();
    queue.push(other, Duration::ZERO).await.unwrap();
    tokio::time::sleep(SHORT_LEASE * 3).await;
    let first = claim_all(queue, 1).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].job_id, other, "the job due first is claimed first");
    queue.push(id, Duration::ZERO).await.unwrap();
    let pushed = claim_all(queue, 1).await;
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0].job_id, id);
    assert!(
        !pushed[0].redelivered,
        "a lost job pushed again is not redelivered"
    );
    assert!(queue.ack(&pushed[0]).await.unwrap());
    assert!(queue.ack(&first[0]).await.unwrap());
}

/// A lease past its time-to-live is not held even while no claim has taken its job since: its
/// `extend` does not revive it, its `ack` and `requeue` answer `false`, and the job is still
/// there to be claimed (redelivered).
pub async fn an_expired_lease_is_not_held_before_its_job_is_claimed_again(queue: &impl Queue) {
    let id = JobId::new();
    queue.push(id, Duration::ZERO).await.unwrap();
    let old = queue.claim(1, SHORT_LEASE, NO_WAIT).await.unwrap();
    assert_eq!(old.len(), 1);
    tokio::time::sleep(SHORT_LEASE * 3).await;
    assert_eq!(queue.extend(&old, LONG_LEASE).await.unwrap(), [false]);
    assert!(!queue.ack(&old[0]).await.unwrap());
    assert!(!queue.requeue(&old[0], Duration::ZERO).await.unwrap());
    let new = claim_all(queue, 1).await;
    assert_eq!(
        new.len(),
        1,
        "the job of an expired lease must stay claimable"
    );
    assert_eq!(new[0].job_id, id);
    assert!(new[0].redelivered);
    assert!(queue.ack(&new[0]).await.unwrap());
}

/// Extending a batch keeps every held lease alive past its first time-to-live, answering per
/// lease; a lease no longer held answers `false`.
pub async fn extend_keeps_leases_in_one_call(queue: &impl Queue) {
    let ids: Vec<JobId> = (0..3).map(|_| JobId::new()).collect();
    queue.push_many(&ids, Duration::ZERO).await.unwrap();
    let leases = queue.claim(3, SHORT_LEASE, NO_WAIT).await.unwrap();
    assert_eq!(leases.len(), 3);
    assert!(queue.ack(&leases[2]).await.unwrap());
    for _ in 0..6 {
        tokio::time::sleep(SHORT_LEASE / 3).await;
        assert_eq!(
            queue.extend(&leases, SHORT_LEASE).await.unwrap(),
            [true, true, false]
        );
    }
    assert!(
        claim_all(queue, 10).await.is_empty(),
        "extended leases must not expire"
    );
    assert_eq!(
        queue.extend(&[], SHORT_LEASE).await.unwrap(),
        Vec::<bool>::new()
    );
}

/// Ack removes the job for good; a second ack answers `false`.
pub async fn ack_removes_the_job(queue: &impl Queue) {
    let id = JobId::new();
    queue.push(id, Duration::ZERO).await.unwrap();
    let lease = queue.claim(1, SHORT_LEASE, NO_WAIT).await.unwrap()[0];
    assert!(queue.ack(&lease).await.unwrap());
    assert!(!queue.ack(&lease).await.unwrap());
    tokio::time::sleep(SHORT_LEASE * 2).await;
    assert!(
        claim_all(queue, 10).await.is_empty(),
        "an acked job came back"
    );
}

/// Requeue with a delay: not claimable before it, claimable after with a newer token.
pub async fn requeue_delays_and_issues_a_newer_token(queue: &impl Queue) {
    let id = JobId::new();
    queue.push(id, Duration::ZERO).await.unwrap();
    let first = claim_all(queue, 1).await[0];
    assert!(
        queue
            .requeue(&first, Duration::from_millis(600))
            .await
            .unwrap()
    );
    assert!(
        claim_all(queue, 1).await.is_empty(),
        "requeued job delivered before its delay"
    );
    let second = within(10, "claim after requeue", async {
        loop {
            let leases = queue
                .claim(1, LONG_LEASE, Duration::from_millis(200))
                .await
                .unwrap();
            if let Some(lease) = leases.first() {
                break *lease;
            }
        }
    })
    .await;
    assert_eq!(second.job_id, id);
    assert!(second.token > first.token);
    assert!(!second.redelivered);
    assert!(!queue.ack(&first).await.unwrap());
}

/// Pushing an id that already waits keeps one copy of it.
pub async fn push_of_a_waiting_job_keeps_one_copy(queue: &impl Queue) {
    let id = JobId::new();
    queue.push(id, Duration::ZERO).await.unwrap();
    queue.push(id, Duration::ZERO).await.unwrap();
    queue.push_many(&[id, id], Duration::ZERO).await.unwrap();
    let leases = claim_all(queue, 10).await;
    assert_eq!(leases.len(), 1);
}

/// Pushing an id that is leased revokes the lease; the job waits again.
pub async fn push_of_a_leased_job_revokes_the_lease(queue: &impl Queue) {
    let id = JobId::new();
    queue.push(id, Duration::ZERO).await.unwrap();
    let old = claim_all(queue, 1).await[0];
    queue.push(id, Duration::ZERO).await.unwrap();
    let new = claim_all(queue, 1).await;
    assert_eq!(new.len(), 1);
    assert!(new[0].token > old.token);
    assert!(
        !new[0].redelivered,
        "a revoked lease's job is pushed, not redelivered"
    );
    assert!(!queue.ack(&old).await.unwrap());
    assert!(queue.ack(&new[0]).await.unwrap());
}

/// Stats count ready, delayed and leased jobs.
pub async fn stats_count_ready_delayed_and_leased(queue: &impl Queue) {
    let ids: Vec<JobId> = (0..4).map(|_| JobId::new()).collect();
    queue.push_many(&ids[..3], Duration::ZERO).await.unwrap();
    queue.push(ids[3], Duration::from_secs(600)).await.unwrap();
    let _lease = claim_all(queue, 1).await;
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.ready, stats.delayed, stats.leased),
        (2, 1, 1),
        "{stats:?}"
    );
    queue.health().await.unwrap();
}
