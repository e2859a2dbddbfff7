//! Conformance cases for [`JobStore`].

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::store::{Inserted, OwnerQuota, QuotaHit};
use crate::{
    BackendError, ItemStatus, Job, JobError, JobId, JobResult, JobState, JobStore, Progress,
};

/// Expands to one `#[tokio::test]` per [`JobStore`](crate::JobStore) case, each with a fresh store
/// from `$make` (an expression giving a future of the store).
#[macro_export]
macro_rules! store_conformance {
    ($make:expr) => {
        $crate::__conformance_cases!(store, $make;
            insert_then_get_round_trips_every_field,
            insert_of_an_existing_id_is_refused,
            update_compares_and_bumps_the_version,
            concurrent_writers_lose_no_update,
            stale_fencing_token_cannot_write,
            update_of_a_missing_job_is_not_found,
            idempotency_key_returns_the_existing_job,
            idempotency_key_expires,
            list_by_owner_is_newest_first_and_private,
            count_by_owner_counts_created_and_active,
            insert_within_keeps_limits_under_concurrent_inserts,
            purge_removes_only_old_finished_jobs,
            insert_many_stores_every_job,
        );
    };
}

fn owner() -> String {
    format!("owner-{}", JobId::new())
}

fn full_job(owner: &str) -> Job {
    let now = Utc::now();
    let mut job = Job::new(
        "download",
        owner,
        serde_json::json!({"fileIds": [70000, 70007], "nested": {"a": [1, 2]}}),
    )
    .with_items(["70000", "70007", "70014"])
    .with_max_attempts(3)
    .with_idempotency_key(format!("key-{}", JobId::new()));
    job.start(41, now).unwrap();
    job.record_item("70000", ItemStatus::Completed, Some(1234), None);
    job.record_item("70007", ItemStatus::Failed, None, Some("not found".into()));
    job.progress.eta_ms = Some(41_000);
    job.schedule_retry(
        JobError::network("connection reset"),
        now + chrono::Duration::seconds(5),
        now,
    )
    .unwrap();
    job.result = Some(JobResult {
        blob_key: "results/x.zip".into(),
        size: 99,
        file_name: "x.zip".into(),
        content_type: Some("application/zip".into()),
    });
    job
}

/// Timestamps may lose sub-microsecond precision in a database; compare at microseconds.
fn normalized(mut job: Job) -> Job {
    fn micros(t: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
        chrono::DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap()
    }
    job.created_at = micros(job.created_at);
    job.updated_at = micros(job.updated_at);
    job.started_at = job.started_at.map(micros);
    job.finished_at = job.finished_at.map(micros);
    job.run_at = job.run_at.map(micros);
    job
}

/// Insert stores version 1; get returns every field as inserted; an unknown id is `None`.
pub async fn insert_then_get_round_trips_every_field(store: &impl JobStore) {
    let job = full_job(&owner());
    let inserted = store.insert(&job, Duration::from_secs(3600)).await.unwrap();
    let Inserted::New(stored) = inserted else {
        panic!("expected a new job")
    };
    assert_eq!(stored.version, 1);
    let got = store.get(job.id).await.unwrap().expect("inserted job");
    let mut expected = job.clone();
    expected.version = 1;
    assert_eq!(normalized(got), normalized(expected));
    assert!(store.get(JobId::new()).await.unwrap().is_none());
}

/// Inserting an id twice is `AlreadyExists`, and the first job stays.
pub async fn insert_of_an_existing_id_is_refused(store: &impl JobStore) {
    let job = Job::new("k", owner(), serde_json::json!(1));
    store.insert(&job, Duration::ZERO).await.unwrap();
    let mut again = job.clone();
    again.payload = serde_json::json!(2);
    let err = store.insert(&again, Duration::ZERO).await.unwrap_err();
    assert!(
        matches!(err, BackendError::AlreadyExists(id) if id == job.id),
        "{err:?}"
    );
    assert_eq!(
        store.get(job.id).await.unwrap().unwrap().payload,
        serde_json::json!(1)
    );
}

/// Update writes only at the stored version, bumps it, and a stale writer gets `Conflict`.
pub async fn update_compares_and_bumps_the_version(store: &impl JobStore) {
    let job = Job::new("k", owner(), serde_json::json!({})).with_max_attempts(2);
    let Inserted::New(mut v1) = store.insert(&job, Duration::ZERO).await.unwrap() else {
        panic!()
    };
    let stale = v1.clone();
    v1.start(1, Utc::now()).unwrap();
    let v2 = store.update(&v1).await.unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.state, JobState::Running);

    let mut late = stale.clone();
    late.cancel(Utc::now()).unwrap();
    let err = store.update(&late).await.unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::Conflict {
                expected: 1,
                actual: 2,
                ..
            }
        ),
        "{err:?}"
    );
    let now = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(now.state, JobState::Running, "a stale write must not land");
    assert_eq!(now.version, 2);
}

/// Eight writers incrementing one counter by read-modify-write with retry on conflict lose no
/// increment.
pub async fn concurrent_writers_lose_no_update<S: JobStore>(store: &S) {
    const WRITERS: u64 = 8;
    const EACH: u64 = 15;
    let job = Job::new("k", owner(), serde_json::json!({"n": 0}));
    store.insert(&job, Duration::ZERO).await.unwrap();
    let conflicts = std::sync::atomic::AtomicU64::new(0);
    let writers = (0..WRITERS).map(|_| async {
        for _ in 0..EACH {
            loop {
                let mut current = store.get(job.id).await.unwrap().unwrap();
                let n = current.payload["n"].as_u64().unwrap();
                current.payload = serde_json::json!({"n": n + 1});
                match store.update(&current).await {
                    Ok(_) => break,
                    Err(BackendError::Conflict { .. }) => {
                        conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    });
    super::within(60, "concurrent writers", futures::future::join_all(writers)).await;
    let end = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(end.payload["n"], WRITERS * EACH);
    assert_eq!(end.version, 1 + WRITERS * EACH);
}

/// A write carrying a fencing token older than the stored one is `Fenced`, whatever it does
/// (complete, fail, progress), and even when it read the current version.
pub async fn stale_fencing_token_cannot_write(store: &impl JobStore) {
    let job = Job::new("k", owner(), serde_json::json!({})).with_max_attempts(3);
    let Inserted::New(mut first) = store.insert(&job, Duration::ZERO).await.unwrap() else {
        panic!()
    };
    first.start(10, Utc::now()).unwrap();
    let first = store.update(&first).await.unwrap();
    // A second worker takes over with a newer token.
    let mut second = first.clone();
    second.start(11, Utc::now()).unwrap();
    let second = store.update(&second).await.unwrap();

    // The first worker re-reads (so its version is current) but still carries token 10.
    let attempts: [fn(&mut Job); 3] = [
        |j| j.complete(None, Utc::now()).unwrap(),
        |j| j.fail(JobError::internal("late"), Utc::now()).unwrap(),
        |j| {
            j.progress = Progress {
                current: 1,
                total: 1,
                ..Progress::default()
            }
        },
    ];
    // 9 has fewer digits than 11: a backend comparing tokens as text must not take it as newer.
    for (stale_token, write) in [10, 9].into_iter().flat_map(|t| attempts.map(|w| (t, w))) {
        let mut stale = store.get(job.id).await.unwrap().unwrap();
        stale.lease_token = stale_token;
        write(&mut stale);
        let err = store.update(&stale).await.unwrap_err();
        assert!(
            matches!(
                err,
                BackendError::Fenced {
                    token,
                    current: 11,
                    ..
                } if token == stale_token
            ),
            "{err:?}"
        );
    }
    let now = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(now.state, JobState::Running);
    assert_eq!(now.version, second.version);
    // A takeover with a token of more digits is newer, and fences 99 off.
    let mut third = now.clone();
    third.start(100, Utc::now()).unwrap();
    let third = store.update(&third).await.unwrap();
    let mut stale = third.clone();
    stale.lease_token = 99;
    stale.complete(None, Utc::now()).unwrap();
    let err = store.update(&stale).await.unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::Fenced {
                token: 99,
                current: 100,
                ..
            }
        ),
        "{err:?}"
    );
    // The current holder still writes.
    let mut done = third.clone();
    done.complete(None, Utc::now()).unwrap();
    assert_eq!(
        store.update(&done).await.unwrap().state,
        JobState::Completed
    );
}

/// Updating a job that does not exist is `NotFound`.
pub async fn update_of_a_missing_job_is_not_found(store: &impl JobStore) {
    let mut job = Job::new("k", owner(), serde_json::json!({}));
    job.version = 1;
    let err = store.update(&job).await.unwrap_err();
    assert!(
        matches!(err, BackendError::NotFound(id) if id == job.id),
        "{err:?}"
    );
}

/// A live idempotency key of the same owner returns the existing job; another owner's same key
/// does not.
pub async fn idempotency_key_returns_the_existing_job(store: &impl JobStore) {
    let alice = owner();
    let bob = owner();
    let ttl = Duration::from_secs(3600);
    let first = Job::new("k", &alice, serde_json::json!(1)).with_idempotency_key("same");
    assert!(store.insert(&first, ttl).await.unwrap().is_new());
    let again = Job::new("k", &alice, serde_json::json!(2)).with_idempotency_key("same");
    match store.insert(&again, ttl).await.unwrap() {
        Inserted::Existing(job) => assert_eq!(job.id, first.id),
        Inserted::New(_) => panic!("the same key from the same owner must return the existing job"),
    }
    assert!(store.get(again.id).await.unwrap().is_none());
    let other = Job::new("k", &bob, serde_json::json!(3)).with_idempotency_key("same");
    assert!(store.insert(&other, ttl).await.unwrap().is_new());
    let found = store
        .find_by_idempotency_key(&alice, "same")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, first.id);
    assert!(
        store
            .find_by_idempotency_key(&alice, "other")
            .await
            .unwrap()
            .is_none()
    );
}

/// Once its time-to-live has passed, a key no longer holds: a new job is stored.
pub async fn idempotency_key_expires(store: &impl JobStore) {
    let alice = owner();
    let first = Job::new("k", &alice, serde_json::json!(1)).with_idempotency_key("short");
    assert!(
        store
            .insert(&first, Duration::from_millis(300))
            .await
            .unwrap()
            .is_new()
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = Job::new("k", &alice, serde_json::json!(2)).with_idempotency_key("short");
    let inserted = store.insert(&again, Duration::from_secs(60)).await.unwrap();
    assert!(inserted.is_new(), "an expired key must not hold");
    let found = store
        .find_by_idempotency_key(&alice, "short")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, again.id);
}

/// `list_by_owner` returns the owner's jobs only, newest first, at most `limit`.
pub async fn list_by_owner_is_newest_first_and_private(store: &impl JobStore) {
    let alice = owner();
    let mut ids = Vec::new();
    for i in 0..5 {
        let job = Job::new("k", &alice, serde_json::json!(i));
        ids.push(job.id);
        store.insert(&job, Duration::ZERO).await.unwrap();
    }
    store
        .insert(
            &Job::new("k", owner(), serde_json::json!(9)),
            Duration::ZERO,
        )
        .await
        .unwrap();
    let listed: Vec<JobId> = store
        .list_by_owner(&alice, 3)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    ids.reverse();
    assert_eq!(listed, ids[..3]);
    assert!(store.list_by_owner(&owner(), 10).await.unwrap().is_empty());
}

/// `count_by_owner` counts jobs created since a time, and unfinished jobs.
pub async fn count_by_owner_counts_created_and_active(store: &impl JobStore) {
    let alice = owner();
    let before = Utc::now() - chrono::Duration::seconds(1);
    let mut jobs = Vec::new();
    for i in 0..4 {
        let job = Job::new("k", &alice, serde_json::json!(i));
        let Inserted::New(stored) = store.insert(&job, Duration::ZERO).await.unwrap() else {
            panic!()
        };
        jobs.push(stored);
    }
    let mut done = jobs.pop().unwrap();
    done.cancel(Utc::now()).unwrap();
    store.update(&done).await.unwrap();
    let counts = store.count_by_owner(&alice, before).await.unwrap();
    assert_eq!(counts.created_since, 4);
    assert_eq!(counts.active, 3);
    let later = store
        .count_by_owner(&alice, Utc::now() + chrono::Duration::seconds(5))
        .await
        .unwrap();
    assert_eq!(later.created_since, 0);
}

/// `insert_within` checks an owner's limits and inserts in one step: of 16 racing inserts under
/// a limit of 3 unfinished jobs, exactly 3 are stored. Jobs created in the window count whether
/// finished or not, and a live idempotency key returns its job whatever the quota.
pub async fn insert_within_keeps_limits_under_concurrent_inserts(store: &impl JobStore) {
    let alice = owner();
    let quota = OwnerQuota {
        since: Utc::now() - chrono::Duration::hours(1),
        max_created_since: None,
        max_active: Some(3),
    };
    let jobs: Vec<Job> = (0..16)
        .map(|i| Job::new("k", &alice, serde_json::json!(i)))
        .collect();
    let answers = futures::future::join_all(
        jobs.iter()
            .map(|job| store.insert_within(job, Duration::ZERO, &quota)),
    )
    .await;
    let stored: Vec<Job> = answers
        .iter()
        .filter_map(|a| match a {
            Ok(Ok(Inserted::New(job))) => Some(job.clone()),
            _ => None,
        })
        .collect();
    let refused = answers
        .iter()
        .filter(|a| matches!(a, Ok(Err(QuotaHit::Active { limit: 3 }))))
        .count();
    assert_eq!((stored.len(), refused), (3, 13), "{answers:?}");
    assert_eq!(
        store.count_by_owner(&alice, quota.since).await.unwrap(),
        crate::store::OwnerCounts {
            created_since: 3,
            active: 3
        }
    );

    // A finished job frees an active slot but still counts as created.
    let mut done = stored[0].clone();
    done.cancel(Utc::now()).unwrap();
    store.update(&done).await.unwrap();
    let hourly = OwnerQuota {
        max_created_since: Some(3),
        ..quota
    };
    let extra = Job::new("k", &alice, serde_json::json!("extra"));
    assert_eq!(
        store
            .insert_within(&extra, Duration::ZERO, &hourly)
            .await
            .unwrap(),
        Err(QuotaHit::CreatedSince { limit: 3 })
    );
    let active_only = store
        .insert_within(&extra, Duration::ZERO, &quota)
        .await
        .unwrap();
    assert!(
        matches!(active_only, Ok(Inserted::New(_))),
        "{active_only:?}"
    );

    // At the limit, the job holding a live key is still returned for that key.
    let bob = owner();
    let one = OwnerQuota {
        max_active: Some(1),
        ..quota
    };
    let keyed = Job::new("k", &bob, serde_json::json!(1)).with_idempotency_key("same");
    let first = store
        .insert_within(&keyed, Duration::from_secs(3600), &one)
        .await
        .unwrap();
    let Ok(Inserted::New(first)) = first else {
        panic!("{first:?}")
    };
    let again = Job::new("k", &bob, serde_json::json!(2)).with_idempotency_key("same");
    let existing = store
        .insert_within(&again, Duration::from_secs(3600), &one)
        .await
        .unwrap();
    assert!(
        matches!(&existing, Ok(Inserted::Existing(job)) if job.id == first.id),
        "{existing:?}"
    );
    let other = Job::new("k", &bob, serde_json::json!(3));
    assert_eq!(
        store
            .insert_within(&other, Duration::ZERO, &one)
            .await
            .unwrap(),
        Err(QuotaHit::Active { limit: 1 })
    );
}

/// Purge deletes terminal jobs finished before the cutoff, returns them, and leaves the rest.
pub async fn purge_removes_only_old_finished_jobs(store: &impl JobStore) {
    let alice = owner();
    let old = Utc::now() - chrono::Duration::hours(48);
    let mut finished_old = Job::new("k", &alice, serde_json::json!(1));
    finished_old.cancel(old).unwrap();
    let mut finished_new = Job::new("k", &alice, serde_json::json!(2));
    finished_new.cancel(Utc::now()).unwrap();
    let running = Job::new("k", &alice, serde_json::json!(3));
    for job in [&finished_old, &finished_new, &running] {
        store.insert(job, Duration::ZERO).await.unwrap();
    }
    let cutoff = Utc::now() - chrono::Duration::hours(24);
    let mut purged = Vec::new();
    loop {
        let batch = store.purge_finished(cutoff, 100).await.unwrap();
        if batch.is_empty() {
            break;
        }
        purged.extend(batch);
    }
    assert!(purged.iter().any(|j| j.id == finished_old.id));
    assert!(
        purged
            .iter()
            .all(|j| j.state.is_terminal() && j.finished_at.unwrap() < cutoff)
    );
    assert!(store.get(finished_old.id).await.unwrap().is_none());
    assert!(store.get(finished_new.id).await.unwrap().is_some());
    assert!(store.get(running.id).await.unwrap().is_some());
}

/// `insert_many` stores every job at version 1.
pub async fn insert_many_stores_every_job(store: &impl JobStore) {
    let alice = owner();
    let jobs: Vec<Job> = (0..250)
        .map(|i| Job::new("k", &alice, serde_json::json!(i)))
        .collect();
    store.insert_many(&jobs).await.unwrap();
    for job in jobs.iter().step_by(25) {
        let got = store.get(job.id).await.unwrap().unwrap();
        assert_eq!(got.version, 1);
        assert_eq!(got.payload, job.payload);
    }
    let counts = store
        .count_by_owner(&alice, Utc::now() - chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(counts.created_since, 250);
}

#[allow(dead_code)]
fn assert_object_safe(_: Arc<dyn JobStore>) {}
