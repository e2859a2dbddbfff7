//! The reference server on `DATABASE_URL` alone (store, queue and bus in PostgreSQL), and on a
//! PostgreSQL store with a Redis queue and bus.
#![allow(clippy::unwrap_used)]

mod common;

use common::Server;
use longjob_core::{JobId, JobState, JobStore};
use longjob_postgres::{PgBackend, PgConfig};

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Runs one job through a server started with `env`, and checks it is stored in `schema`.
async fn run_a_job(env: &[(&str, &str)], schema: &str, expect_line: &str) {
    let server = Server::start(env).await;
    assert!(server.log().contains(expect_line), "{}", server.log());
    let id = server.initiate(&[70000, 70007, 10001], None).await;
    let done = server.wait_finished(&id, None).await;
    assert_eq!(done["status"], "completed", "{done}");
    let url = server
        .get(&format!("/v1/download/job/{id}/download-url"))
        .await;
    assert_eq!(url.status(), 200);
    drop(server);

    let pg = PgBackend::connect(PgConfig::new(database_url()).schema(schema))
        .await
        .unwrap_or_else(|e| panic!("no PostgreSQL ({e}): run `bash scripts/services/postgres.sh`"));
    let stored = pg
        .store()
        .get(id.parse().unwrap())
        .await
        .unwrap()
        .expect("the job in PostgreSQL");
    assert_eq!(stored.state, JobState::Completed);
    assert_eq!(stored.items.len(), 3);
    let drop_schema = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    sqlx::query(&drop_schema).execute(pg.pool()).await.unwrap();
}

fn fresh(name: &str) -> String {
    format!("lj_server_{name}_{}", JobId::new().as_uuid().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_with_every_job_backend_in_postgres() {
    let (url, schema) = (database_url(), fresh("pg"));
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("DATABASE_SCHEMA", schema.as_str()),
        ("DOWNLOAD_DELAY_ENABLED", "false"),
    ];
    run_a_job(&env, &schema, "store=postgres queue=postgres bus=postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_on_a_postgres_store_with_a_redis_queue_and_bus() {
    let (url, schema, redis) = (database_url(), fresh("mixed"), redis_url());
    let prefix = format!("lj-server-mixed-{}", JobId::new());
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("DATABASE_SCHEMA", schema.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("REDIS_PREFIX", prefix.as_str()),
        ("DOWNLOAD_DELAY_ENABLED", "false"),
    ];
    run_a_job(&env, &schema, "queue=redis bus=redis").await;
    let redis =
        longjob_redis::Redis::connect(longjob_redis::RedisConfig::new(redis_url()).prefix(prefix))
            .await
            .unwrap();
    redis.delete_namespace().await.unwrap();
}

/// A stored job the server cannot read (here its progress rewritten behind its back) answers
/// 500 with the API's error, and the message names nothing of the database or the decoder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_store_cannot_read_answers_500_without_internals() {
    let (url, schema) = (database_url(), fresh("bad"));
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("DATABASE_SCHEMA", schema.as_str()),
        ("DOWNLOAD_DELAY_ENABLED", "false"),
    ];
    let server = Server::start(&env).await;
    let id = server.initiate(&[70000], None).await;
    server.wait_finished(&id, None).await;

    let pg = PgBackend::connect(PgConfig::new(database_url()).schema(&schema))
        .await
        .unwrap_or_else(|e| panic!("no PostgreSQL ({e}): run `bash scripts/services/postgres.sh`"));
    let corrupt = format!(
        "UPDATE \"{schema}\".download_jobs SET progress = '\"not progress\"' WHERE id = $1"
    );
    let changed = sqlx::query(&corrupt)
        .bind(id.parse::<uuid::Uuid>().unwrap())
        .execute(pg.pool())
        .await
        .unwrap();
    assert_eq!(changed.rows_affected(), 1);

    let res = server.get(&format!("/v1/download/job/{id}")).await;
    let body = common::assert_error(res, 500, "internal_error").await;
    assert_eq!(body["error"]["message"], "internal server error", "{body}");
    let text = body.to_string();
    for leak in [
        "progress",
        "sqlx",
        "postgres",
        "decode",
        "not progress",
        &schema,
    ] {
        assert!(!text.contains(leak), "the 500 leaks {leak:?}: {text}");
    }
    drop(server);
    let drop_schema = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    sqlx::query(&drop_schema).execute(pg.pool()).await.unwrap();
}
