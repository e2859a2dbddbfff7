//! Shared helpers: where Redis is, and a fresh namespace per backend instance.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use longjob_redis::{Redis, RedisConfig};

/// `REDIS_URL`, or Redis's default address on loopback.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A configuration with a fresh, unique key prefix.
pub fn fresh_config() -> RedisConfig {
    RedisConfig::new(redis_url())
        .prefix(format!("lj-test-{}", uuid::Uuid::now_v7().simple()))
        .client_name("longjob-test")
}

/// A `completed` event without a result.
pub fn completed() -> longjob_core::EventPayload {
    longjob_core::EventPayload::Completed {
        download_url: None,
        expires_at: None,
        size: None,
    }
}

/// A connection in a fresh namespace; fails the test with a clear message without Redis.
pub async fn fresh() -> Redis {
    connect(fresh_config()).await
}

/// Connects, failing the test with a clear message when Redis does not answer.
pub async fn connect(config: RedisConfig) -> Redis {
    let url = config.url.clone();
    match Redis::connect(config).await {
        Ok(redis) => redis,
        Err(e) => panic!(
            "Redis at {url} does not answer ({e}); start one with scripts/services/redis.sh or set REDIS_URL"
        ),
    }
}

/// A Redis handle on `config` (a fresh prefix from [`fresh_config`]), its prefix (for
/// key names), and a plain connection to look at its keys.
pub async fn under_fresh_prefix(
    config: longjob_redis::RedisConfig,
) -> (
    String,
    longjob_redis::Redis,
    redis::aio::MultiplexedConnection,
) {
    let prefix = config.prefix.clone();
    let redis = connect(config).await;
    let client = redis::Client::open(redis_url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    (prefix, redis, conn)
}
