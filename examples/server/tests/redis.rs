//! The reference server on `REDIS_URL` alone: store, queue and bus in Redis.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Server;
use longjob_core::{JobId, JobState, JobStore};
use longjob_redis::{Redis, RedisConfig};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A server on `REDIS_URL` under a fresh prefix, with `env` besides, and a handle on that
/// prefix (to look inside, and to delete it at the end).
async fn server_on_redis(env: &[(&str, &str)]) -> (Server, Redis) {
    let url = redis_url();
    let prefix = format!("lj-server-test-{}", JobId::new());
    let redis = Redis::connect(RedisConfig::new(&url).prefix(prefix.clone()))
        .await
        .unwrap_or_else(|e| {
            panic!("no Redis at {url} ({e}): run `bash scripts/services/redis.sh`")
        });
    let mut all = vec![
        ("REDIS_URL", url.as_str()),
        ("REDIS_PREFIX", prefix.as_str()),
    ];
    all.extend_from_slice(env);
    (Server::start(&all).await, redis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_through_the_server_with_every_job_backend_in_redis() {
    let (server, redis) = server_on_redis(&[("DOWNLOAD_DELAY_ENABLED", "false")]).await;
    assert!(
        server.log().contains("store=redis queue=redis bus=redis"),
        "{}",
        server.log()
    );
    let id = server.initiate(&[70000, 70007, 10001], None).await;
    let done = server.wait_finished(&id, None).await;
    assert_eq!(done["status"], "completed", "{done}");

    // The job lives in Redis, under the server's prefix.
    let stored = redis
        .store()
        .get(id.parse().unwrap())
        .await
        .unwrap()
        .expect("the job in Redis");
    assert_eq!(stored.state, JobState::Completed);
    assert_eq!(stored.items.len(), 3);
    let url = server
        .get(&format!("/v1/download/job/{id}/download-url"))
        .await;
    assert_eq!(url.status(), 200);
    let health: serde_json::Value = server.get("/health").await.json().await.unwrap();
    assert_eq!(health["checks"]["queue"], "ok");
    drop(server);
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.delete_namespace().await.unwrap();
}

/// Twenty initiates at once under `JOBS_PER_HOUR=5`: the quota is checked in the same Redis
/// script as the insert, so exactly five jobs are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_initiates_passes_the_hourly_quota_exactly() {
    let (server, redis) = server_on_redis(&[("JOBS_PER_HOUR", "5")]).await;
    let body = serde_json::json!({ "file_ids": [70000] });
    let answers = futures::future::join_all(
        (0..20).map(|_| server.post_json("/v1/download/initiate", &body)),
    )
    .await;
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [[202; 5].as_slice(), &[429; 15]].concat());
    drop(server);
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.delete_namespace().await.unwrap();
}
