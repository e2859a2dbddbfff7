//! Conformance cases for [`ProgressBus`].

use std::time::Duration;

use futures::StreamExt;

use crate::bus::EventStream;
use crate::{EventPayload, JobEvent, JobId, Progress, ProgressBus};

use super::within;

/// Expands to one `#[tokio::test]` per [`ProgressBus`](crate::ProgressBus) case, each with a
/// fresh bus from `$make` (an expression giving a future of the bus).
#[macro_export]
macro_rules! bus_conformance {
    ($make:expr) => {
        $crate::__conformance_cases!(bus, $make;
            publish_numbers_events_from_one,
            subscribe_replays_after_seq_then_streams_live,
            a_replay_after_any_seq_past_the_last_is_empty,
            a_jobs_end_is_told_once_until_it_is_queued_again,
            replay_to_live_switch_has_no_gap_and_no_duplicate,
            concurrent_publishers_get_distinct_seqs,
            publish_many_keeps_the_order_among_concurrent_publishes,
            events_of_each_job_arrive_in_order,
            many_subscribers_each_see_every_event,
            cancel_signal_reaches_listeners,
            purge_forgets_retained_events,
        );
    };
}

fn progress(n: u64) -> EventPayload {
    EventPayload::Progress {
        progress: Progress {
            current: n,
            total: 1_000_000,
            ..Progress::default()
        },
    }
}

async fn take(stream: &mut EventStream, n: usize) -> Vec<JobEvent> {
    within(30, "events", async {
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            match stream.next().await {
                Some(Ok(event)) => events.push(event),
                Some(Err(e)) => panic!("stream error: {e}"),
                None => panic!("stream ended after {} of {n} events", events.len()),
            }
        }
        events
    })
    .await
}

fn seqs(events: &[JobEvent]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// The first event of a job has `seq` 1, the next 2, and so on; `publish` returns the event.
pub async fn publish_numbers_events_from_one(bus: &impl ProgressBus) {
    let job = JobId::new();
    for n in 1..=3 {
        let event = bus.publish(job, progress(n)).await.unwrap();
        assert_eq!(event.seq, n);
        assert_eq!(event.job_id, job);
        assert_eq!(event.payload, progress(n));
    }
    bus.health().await.unwrap();
}

/// `subscribe(after)` replays the retained events after `after`, then live ones.
pub async fn subscribe_replays_after_seq_then_streams_live(bus: &impl ProgressBus) {
    let job = JobId::new();
    for n in 1..=10 {
        bus.publish(job, progress(n)).await.unwrap();
    }
    let mut from_four = bus.subscribe(job, 4).await.unwrap();
    let mut from_zero = bus.subscribe(job, 0).await.unwrap();
    assert_eq!(
        seqs(&take(&mut from_four, 6).await),
        (5..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(&take(&mut from_zero, 10).await),
        (1..=10).collect::<Vec<_>>()
    );
    bus.publish(job, EventPayload::Cancelled {}).await.unwrap();
    let live = take(&mut from_four, 1).await;
    assert_eq!(live[0].seq, 11);
    assert_eq!(live[0].payload, EventPayload::Cancelled {});
    assert_eq!(take(&mut from_zero, 1).await[0].seq, 11);
}

/// Subscribers that join while events are being published see every event after their
/// `after_seq`, once, in order: the switch from replay to live loses and repeats nothing.
pub async fn replay_to_live_switch_has_no_gap_and_no_duplicate(bus: &impl ProgressBus) {
    const EVENTS: u64 = 400;
    let job = JobId::new();
    let publisher = async {
        for n in 1..=EVENTS {
            bus.publish(job, progress(n)).await.unwrap();
            if n % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let subscribers = (0..8u64).map(|i| async move {
        tokio::time::sleep(Duration::from_millis(15 * i)).await;
        let after = (i * 37) % 50;
        let mut stream = bus.subscribe(job, after).await.unwrap();
        let events = take(&mut stream, (EVENTS - after) as usize).await;
        assert_eq!(
            seqs(&events),
            (after + 1..=EVENTS).collect::<Vec<_>>(),
            "subscriber {i}"
        );
    });
    within(60, "publish while subscribing", async {
        tokio::join!(publisher, futures::future::join_all(subscribers))
    })
    .await;
}

/// A subscription after a seq past the job's last event (a client's `lastEventId` can be any
/// number) replays nothing and fails nothing.
pub async fn a_replay_after_any_seq_past_the_last_is_empty(bus: &impl ProgressBus) {
    let job = JobId::new();
    bus.publish(job, progress(1)).await.unwrap();
    for after in [1, 1 << 60, u64::MAX] {
        let mut stream = bus.subscribe(job, after).await.unwrap();
        let next = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
        assert!(next.is_err(), "after {after}: {next:?}");
    }
}

/// A terminal event published right after a terminal one (a publish retried after its reply
/// was lost, or any other end) is not added: it answers with the retained one's seq. A
/// non-terminal event (a manual retry's `queued` status) opens the way to another end.
pub async fn a_jobs_end_is_told_once_until_it_is_queued_again(bus: &impl ProgressBus) {
    let job = JobId::new();
    let completed = EventPayload::Completed {
        download_url: None,
        expires_at: None,
        size: Some(3),
    };
    let failed = EventPayload::Failed {
        error: crate::JobError::validation("late"),
        attempt: 1,
    };
    let queued = EventPayload::Status {
        status: crate::JobState::Queued,
        attempt: 1,
        error: None,
        next_run_at: None,
        progress: None,
    };
    bus.publish(job, progress(1)).await.unwrap();
    assert_eq!(bus.publish(job, completed.clone()).await.unwrap().seq, 2);
    for again in [completed.clone(), failed, EventPayload::Cancelled {}] {
        assert_eq!(bus.publish(job, again).await.unwrap().seq, 2);
    }
    let cancelled = EventPayload::Cancelled {};
    let many = bus
        .publish_many(
            job,
            vec![
                cancelled.clone(),
                queued.clone(),
                cancelled.clone(),
                cancelled.clone(),
            ],
        )
        .await
        .unwrap();
    assert_eq!(seqs(&many), [2, 3, 4, 4]);
    assert_eq!(bus.publish(job, progress(2)).await.unwrap().seq, 5);

    let mut stream = bus.subscribe(job, 0).await.unwrap();
    let replayed = take(&mut stream, 5).await;
    assert_eq!(seqs(&replayed), [1, 2, 3, 4, 5]);
    let payloads: Vec<EventPayload> = replayed.into_iter().map(|e| e.payload).collect();
    assert_eq!(
        payloads,
        [progress(1), completed, queued, cancelled, progress(2)]
    );
    let next = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(next.is_err(), "an event past the last: {next:?}");
}

/// Two publishers of the same job (as two processes would be) get distinct, gapless seqs.
pub async fn concurrent_publishers_get_distinct_seqs(bus: &impl ProgressBus) {
    let job = JobId::new();
    let publish = |base: u64| async move {
        let mut seqs = Vec::new();
        for n in 0..100 {
            seqs.push(bus.publish(job, progress(base + n)).await.unwrap().seq);
        }
        seqs
    };
    let (a, b) = tokio::join!(publish(0), publish(1000));
    let mut all: Vec<u64> = a.into_iter().chain(b).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<_>>());
}

/// [`publish_many`](ProgressBus::publish_many) gives a job's events increasing seqs in their
/// order, while single publishes of the same job and of others run at the same time; a
/// subscriber sees every event once, in seq order; an empty call publishes nothing.
pub async fn publish_many_keeps_the_order_among_concurrent_publishes(bus: &impl ProgressBus) {
    let (job, other) = (JobId::new(), JobId::new());
    let mut stream = bus.subscribe(job, 0).await.unwrap();
    let groups = async {
        let mut published = Vec::new();
        for g in 0..10u64 {
            let payloads = (0..20).map(|n| progress(g * 100 + n)).collect();
            let events = bus.publish_many(job, payloads).await.unwrap();
            let currents: Vec<u64> = events.iter().map(current).collect();
            assert_eq!(currents, (0..20).map(|n| g * 100 + n).collect::<Vec<_>>());
            assert!(events.iter().all(|e| e.job_id == job));
            assert!(events.windows(2).all(|w| w[0].seq < w[1].seq), "{events:?}");
            published.extend(events);
        }
        published
    };
    let singles = async {
        for n in 0..50 {
            bus.publish(job, progress(10_000 + n)).await.unwrap();
            bus.publish(other, progress(n)).await.unwrap();
        }
    };
    let (published, ()) = tokio::join!(groups, singles);
    assert!(bus.publish_many(job, Vec::new()).await.unwrap().is_empty());

    let seen = take(&mut stream, 250).await;
    assert_eq!(seqs(&seen), (1..=250).collect::<Vec<_>>());
    for event in &published {
        let delivered = &seen[usize::try_from(event.seq - 1).unwrap()];
        assert_eq!(current(delivered), current(event), "seq {}", event.seq);
    }
}

fn current(event: &JobEvent) -> u64 {
    match &event.payload {
        EventPayload::Progress { progress } => progress.current,
        other => panic!("unexpected {other:?}"),
    }
}

/// Events of jobs published concurrently reach each job's subscribers, in order, and only theirs.
pub async fn events_of_each_job_arrive_in_order(bus: &impl ProgressBus) {
    let jobs: Vec<JobId> = (0..4).map(|_| JobId::new()).collect();
    let mut streams = Vec::new();
    for job in &jobs {
        streams.push(bus.subscribe(*job, 0).await.unwrap());
    }
    let publishers = jobs.iter().map(|job| async move {
        for n in 1..=50 {
            bus.publish(*job, progress(n)).await.unwrap();
        }
    });
    futures::future::join_all(publishers).await;
    for (job, stream) in jobs.iter().zip(&mut streams) {
        let events = take(stream, 50).await;
        assert!(events.iter().all(|e| e.job_id == *job));
        assert_eq!(seqs(&events), (1..=50).collect::<Vec<_>>());
        let currents: Vec<u64> = events.iter().map(current).collect();
        assert_eq!(
            currents,
            (1..=50).collect::<Vec<_>>(),
            "payloads out of order"
        );
    }
}

/// A hundred subscribers of one job each see every event.
pub async fn many_subscribers_each_see_every_event(bus: &impl ProgressBus) {
    let job = JobId::new();
    let mut streams = Vec::new();
    for _ in 0..100 {
        streams.push(bus.subscribe(job, 0).await.unwrap());
    }
    for n in 1..=20 {
        bus.publish(job, progress(n)).await.unwrap();
    }
    for stream in &mut streams {
        assert_eq!(seqs(&take(stream, 20).await), (1..=20).collect::<Vec<_>>());
    }
}

/// A cancel signal reaches every listener.
pub async fn cancel_signal_reaches_listeners(bus: &impl ProgressBus) {
    let mut first = bus.cancel_signals().await.unwrap();
    let mut second = bus.cancel_signals().await.unwrap();
    // Give backends with an asynchronous subscription time to establish it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let job = JobId::new();
    bus.signal_cancel(job).await.unwrap();
    for stream in [&mut first, &mut second] {
        let got = within(10, "cancel signal", stream.next()).await;
        assert_eq!(got.unwrap().unwrap(), job);
    }
}

/// After `purge`, nothing of the job is replayed.
pub async fn purge_forgets_retained_events(bus: &impl ProgressBus) {
    let job = JobId::new();
    let other = JobId::new();
    for n in 1..=5 {
        bus.publish(job, progress(n)).await.unwrap();
        bus.publish(other, progress(n)).await.unwrap();
    }
    bus.purge(job).await.unwrap();
    let mut stream = bus.subscribe(job, 0).await.unwrap();
    let replayed = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(
        !matches!(replayed, Ok(Some(Ok(_)))),
        "purged events were replayed: {replayed:?}"
    );
    let mut kept = bus.subscribe(other, 0).await.unwrap();
    assert_eq!(seqs(&take(&mut kept, 5).await), (1..=5).collect::<Vec<_>>());
}
