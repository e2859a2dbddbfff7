//! Shared test helpers: a fresh schema per backend, on the PostgreSQL at `DATABASE_URL`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use longjob_postgres::{PgBackend, PgConfig};

/// `DATABASE_URL`, else the local default.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| longjob_postgres::DEFAULT_DATABASE_URL.into())
}

/// A fresh schema name: `lj_test_<unix seconds>_<random>`.
pub fn fresh_schema() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!("lj_test_{now}_{:08x}", rand::random::<u32>())
}

/// A configuration for the test database with a fresh schema and a short poll interval.
pub fn config() -> PgConfig {
    PgConfig::new(database_url())
        .schema(fresh_schema())
        .poll_interval(Duration::from_millis(200))
        .max_connections(8)
}

/// Connects with `config`, failing loudly (never skipping) when the database is missing.
pub async fn connect_with(config: PgConfig) -> PgBackend {
    drop_stale_schemas(&config.url).await;
    match PgBackend::connect(config.clone()).await {
        Ok(pg) => pg,
        Err(e) => panic!(
            "PostgreSQL is required for these tests: cannot use {} ({e}). \
             Start one with `bash scripts/services/postgres.sh` or set DATABASE_URL.",
            config.url
        ),
    }
}

/// A backend on a fresh schema, notifications on.
pub async fn backend() -> PgBackend {
    connect_with(config()).await
}

/// A backend on a fresh schema, notifications off (polling only) and every commit durable.
pub async fn backend_without_notifications() -> PgBackend {
    connect_with(config().notifications(false).relaxed_commit(false)).await
}

/// Drops test schemas older than an hour, so runs do not pile them up.
async fn drop_stale_schemas(url: &str) {
    use sqlx::Connection;
    let Ok(mut conn) = sqlx::PgConnection::connect(url).await else {
        return;
    };
    let cutoff = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .saturating_sub(3600);
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'lj\\_test\\_%' \
         ORDER BY nspname LIMIT 50",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    for name in names {
        let stamp = name
            .strip_prefix("lj_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|s| s.parse::<u64>().ok());
        if stamp.is_some_and(|s| s < cutoff) {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .execute(&mut conn)
                .await;
        }
    }
    let _ = conn.close().await;
}
