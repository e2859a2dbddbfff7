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
    let (prefix, redis, mut conn) = common::under_fresh_prefix(common::fresh_config()).await;
    let bus = redis.bus();
    let job = JobId::new();
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

/// A stream of the scheme before the lists (entry ids `0-<seq>`, numbered by `XADD … 0-*`)
/// keeps numbering after its last event, and replays from any seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_the_previous_scheme_keeps_its_numbering() {
    let (prefix, redis, mut conn) = common::under_fresh_prefix(common::fresh_config()).await;
    let bus = redis.bus();
    let job = JobId::new();
    let stream = format!("{{{prefix}}}:ev:{job}");
    for _ in 1..=2u64 {
        let event = JobEvent {
            seq: 0,
            job_id: job,
            at: chrono::Utc::now(),
            payload: status(JobState::Queued),
        };
        let json = serde_json::to_string(&event).unwrap();
        let body = json.strip_prefix("{\"seq\":0").unwrap();
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("0-*")
            .arg("e")
            .arg(body)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    let published = bus.publish(job, status(JobState::Running)).await.unwrap();
    assert_eq!(published.seq, 3);
    let together = bus
        .publish_many(
            job,
            vec![status(JobState::Running), EventPayload::Cancelled {}],
        )
        .await
        .unwrap();
    assert_eq!(together.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(seqs(&bus, job, 0, 5).await, [1, 2, 3, 4, 5]);
    assert_eq!(seqs(&bus, job, 1, 2).await, [2, 3]);
    let list_exists: bool = redis::cmd("EXISTS")
        .arg(format!("{{{prefix}}}:evl:{job}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!list_exists, "the job's events stay in its stream");
    redis.delete_namespace().await.unwrap();
}

/// Events are numbered by their place in the job's list: after the list is trimmed (past twice
/// the retention, at least 64 kept), numbering goes on, a replay after any retained seq is
/// exact, and a replay from the start begins at the oldest kept. The list stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbering_goes_on_past_the_lists_trim() {
    numbering_past_the_trim(1).await;
}

/// The same when events come in groups (one push each) that cross the thresholds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbering_goes_on_past_the_lists_trim_for_events_published_together() {
    numbering_past_the_trim(7).await;
}

async fn numbering_past_the_trim(group: u64) {
    let (prefix, redis, mut conn) =
        common::under_fresh_prefix(common::fresh_config().event_retention(5)).await;
    let bus = redis.bus();
    let job = JobId::new();
    let list = format!("{{{prefix}}}:evl:{job}");
    let mut longest = 0;
    let mut next = 1;
    while next <= 300u64 {
        let payloads = (0..group.min(301 - next))
            .map(|_| EventPayload::Progress {
                progress: Default::default(),
            })
            .collect();
        for event in bus.publish_many(job, payloads).await.unwrap() {
            assert_eq!(event.seq, next);
            next += 1;
        }
        let len: usize = redis::cmd("LLEN")
            .arg(&list)
            .query_async(&mut conn)
            .await
            .unwrap();
        longest = longest.max(len);
    }
    // The header, and at most twice the 64 events kept (a push past that trims at once).
    assert_eq!(longest, 1 + 2 * 64, "trimmed once past 128 events held");
    assert_eq!(seqs(&bus, job, 298, 2).await, [299, 300]);
    assert_eq!(seqs(&bus, job, 250, 3).await, [251, 252, 253]);
    let oldest = seqs(&bus, job, 0, 1).await[0];
    assert!(
        (300 - 128..=300 - 64).contains(&oldest),
        "replay from the start began at {oldest}"
    );
    redis.delete_namespace().await.unwrap();
}

/// Seqs past 10^14 (15 digits) are written whole, live and in replays: Lua's own
/// number-to-string (`%.14g`) would give them an exponent and lose their last digits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_past_ten_to_the_fourteenth_stay_exact() {
    let (prefix, redis, mut conn) = common::under_fresh_prefix(common::fresh_config()).await;
    let bus = redis.bus();
    let job = JobId::new();
    let progress = || EventPayload::Progress {
        progress: Default::default(),
    };
    // Past the list's floor (64 held), its header holds the count of trimmed events: make it
    // as if 99 999 999 999 990 events had been trimmed.
    for _ in 0..70 {
        bus.publish(job, progress()).await.unwrap();
    }
    let () = redis::cmd("LSET")
        .arg(format!("{{{prefix}}}:evl:{job}"))
        .arg(0)
        .arg("99999999999990")
        .query_async(&mut conn)
        .await
        .unwrap();
    let last = 99_999_999_999_990 + 70;
    let mut live = bus.subscribe(job, last).await.unwrap();
    let one = bus.publish(job, progress()).await.unwrap();
    let group = bus
        .publish_many(job, vec![progress(), progress()])
        .await
        .unwrap();
    assert_eq!(one.seq, last + 1);
    assert_eq!(
        group.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [last + 2, last + 3]
    );
    for want in last + 1..=last + 3 {
        let event = tokio::time::timeout(Duration::from_secs(5), live.next())
            .await
            .expect("a live event in time")
            .unwrap()
            .unwrap();
        assert_eq!(event.seq, want, "live");
    }
    assert_eq!(
        seqs(&bus, job, last - 2, 5).await,
        [last - 1, last, last + 1, last + 2, last + 3],
        "replayed"
    );
    redis.delete_namespace().await.unwrap();
}

/// A finished job's events take a few hundred bytes of Redis's memory, not the 4.7 KB a
/// one-entry stream takes (Redis allocates a stream's first node at 4 KB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_events_take_little_memory() {
    let (prefix, redis, mut conn) = common::under_fresh_prefix(common::fresh_config()).await;
    let bus = redis.bus();
    let job = JobId::new();
    for state in [JobState::Queued, JobState::Running] {
        bus.publish(job, status(state)).await.unwrap();
    }
    bus.publish(job, common::completed()).await.unwrap();
    let bytes: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(format!("{{{prefix}}}:evl:{job}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(bytes < 1024, "three events take {bytes} bytes");
    assert_eq!(seqs(&bus, job, 0, 3).await, [1, 2, 3]);
    redis.delete_namespace().await.unwrap();
}

/// A job's list written by an earlier version, whose events hold their job id, reads on, and
/// its told end is still told once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_events_with_their_job_id_reads_on() {
    let (prefix, redis, mut conn) = common::under_fresh_prefix(common::fresh_config()).await;
    let bus = redis.bus();
    let job = JobId::new();
    let with_id = |seq, payload| {
        let event = JobEvent {
            seq,
            job_id: job,
            at: chrono::Utc::now(),
            payload,
        };
        let json = serde_json::to_string(&event).unwrap();
        let body = json.strip_prefix(&format!("{{\"seq\":{seq}")).unwrap();
        assert!(body.starts_with(",\"jobId\":"), "{body}");
        (event, body.to_owned())
    };
    let (queued, queued_body) = with_id(1, status(JobState::Queued));
    let (cancelled, cancelled_body) = with_id(2, EventPayload::Cancelled {});
    let () = redis::cmd("RPUSH")
        .arg(format!("{{{prefix}}}:evl:{job}"))
        .arg("0")
        .arg(&queued_body)
        .arg(&cancelled_body)
        .query_async(&mut conn)
        .await
        .unwrap();

    let told = bus.publish(job, EventPayload::Cancelled {}).await.unwrap();
    assert_eq!(told.seq, 2, "the end is told once");
    let mut events = bus.subscribe(job, 0).await.unwrap();
    for expected in [queued, cancelled] {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        assert_eq!(event, expected);
    }
    let added = bus.publish(job, status(JobState::Queued)).await.unwrap();
    assert_eq!(added.seq, 3);
    assert_eq!(seqs(&bus, job, 1, 2).await, [2, 3]);
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

/// A job's events published together travel as one message (their first seq, then each body
/// on its own line), which subscribers read as the events themselves, live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_together_are_one_message_read_live() {
    let (prefix, redis, _) = common::under_fresh_prefix(common::fresh_config()).await;
    let bus = redis.bus();
    let job = JobId::new();
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut raw = client.get_async_pubsub().await.unwrap();
    raw.subscribe(format!("{{{prefix}}}:ev:{job}:live"))
        .await
        .unwrap();
    let mut events = bus.subscribe(job, 0).await.unwrap();
    bus.publish(job, status(JobState::Running)).await.unwrap();
    let progress = |current| EventPayload::Progress {
        progress: longjob_core::Progress {
            current,
            total: 3,
            ..Default::default()
        },
    };
    let published = bus
        .publish_many(job, (1..=3).map(progress).collect())
        .await
        .unwrap();
    assert_eq!(
        published.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [2, 3, 4]
    );

    let mut messages = raw.on_message();
    let mut next_message = async || {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("a message in time")
            .unwrap();
        message.get_payload::<String>().unwrap()
    };
    assert!(next_message().await.starts_with("{\"seq\":1,"));
    let together = next_message().await;
    let lines: Vec<&str> = together.split('\n').collect();
    assert_eq!(lines.len(), 4, "{together}");
    assert_eq!(lines[0], "2");
    assert!(lines[1..].iter().all(|body| body.starts_with(",\"at\":")));

    for expected in std::iter::once(status(JobState::Running)).chain((1..=3).map(progress)) {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        assert_eq!(event.payload, expected);
    }
    assert_eq!(seqs(&bus, job, 1, 3).await, [2, 3, 4]);
    redis.delete_namespace().await.unwrap();
}
