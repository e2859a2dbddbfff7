//! The server's configuration: every environment variable of API.md, each also a `--flag`.

use std::time::Duration;

use clap::Parser;

/// A switch's value. An empty one is refused rather than read as `false`: `DOWNLOAD_DELAY_ENABLED=`
/// turning the delay off without a word would be a surprise (unset the variable for the default).
fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        "" => Err("empty: expected true/false/1/0 (unset the variable for the default)".into()),
        other => Err(format!("expected true/false/1/0, got {other:?}")),
    }
}

/// longjob reference server: the download API, its workers and the demo page in one process.
///
/// With nothing set it serves 127.0.0.1:3000 on in-memory store, queue and bus, with results
/// on local disk under BLOB_DIR.
#[derive(Debug, Clone, Parser)]
#[command(name = "longjob-server", version, about, long_about = None)]
pub struct Config {
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// The URL clients reach this server at, for signed download URLs (default: http://HOST:PORT).
    #[arg(long, env = "PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Requests taking longer get 504.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 135_000)]
    pub request_timeout_ms: u64,
    /// Allowed CORS origins: `*` or a comma-separated list.
    #[arg(long, env = "CORS_ORIGINS", default_value = "*")]
    pub cors_origins: String,
    /// The rate limit's window.
    #[arg(long, env = "RATE_LIMIT_WINDOW_MS", default_value_t = 60_000)]
    pub rate_limit_window_ms: u64,
    /// Requests per window per client (0: no limit).
    #[arg(long, env = "RATE_LIMIT_MAX_REQUESTS", default_value_t = 100)]
    pub rate_limit_max_requests: u32,
    /// Behind a reverse proxy: rate-limit clients by X-Forwarded-For rather than by connection.
    #[arg(long, env = "TRUST_PROXY", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub trust_proxy: bool,
    /// The shortest simulated processing time of a download.
    #[arg(long, env = "DOWNLOAD_DELAY_MIN_MS", default_value_t = 10_000)]
    pub download_delay_min_ms: u64,
    /// The longest simulated processing time of a download.
    #[arg(long, env = "DOWNLOAD_DELAY_MAX_MS", default_value_t = 120_000)]
    pub download_delay_max_ms: u64,
    /// Whether downloads take the simulated time at all (`false`/`0` disable it).
    #[arg(long, env = "DOWNLOAD_DELAY_ENABLED", default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub download_delay_enabled: bool,
    /// S3 region of the source bucket and result storage.
    #[arg(long, env = "S3_REGION")]
    pub s3_region: Option<String>,
    /// S3 access key.
    #[arg(long, env = "S3_ACCESS_KEY_ID")]
    pub s3_access_key_id: Option<String>,
    /// S3 secret key.
    #[arg(long, env = "S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
    /// S3 endpoint (MinIO, Ceph, …).
    #[arg(long, env = "S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 bucket: results, and the source of files when set.
    #[arg(long, env = "S3_BUCKET_NAME")]
    pub s3_bucket_name: Option<String>,
    /// Path-style S3 URLs.
    #[arg(long, env = "S3_FORCE_PATH_STYLE", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub s3_force_path_style: Option<bool>,
    /// The bucket the download files (`downloads/<id>.zip`) are read from (default: S3_BUCKET_NAME).
    #[arg(long, env = "S3_SOURCE_BUCKET")]
    pub s3_source_bucket: Option<String>,
    /// With S3: how often result objects older than the retention are swept from `results/`
    /// (catches results no job refers to any more, e.g. after a restart; 0: never).
    #[arg(long, env = "S3_SWEEP_INTERVAL_SECS", default_value_t = 3600)]
    pub s3_sweep_interval_secs: u64,
    /// Redis for queue, bus and store.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// With Redis: the key prefix (also the Cluster hash tag), so several deployments can share
    /// one Redis.
    #[arg(long, env = "REDIS_PREFIX", default_value = "longjob")]
    pub redis_prefix: String,
    /// PostgreSQL for the job store (and for the queue and bus when REDIS_URL is not set).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// With PostgreSQL: the schema of longjob's tables (created and migrated at start).
    #[arg(long, env = "DATABASE_SCHEMA", default_value = "longjob")]
    pub database_schema: String,
    /// Directory of the local-disk blob store (when no S3 bucket is set).
    #[arg(long, env = "BLOB_DIR", default_value = "./.run/blobs")]
    pub blob_dir: String,
    /// API keys mapped to owners: `key1:alice,key2:bob` (none: every caller is `anonymous`).
    #[arg(long, env = "API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// One attempt of a job times out after this.
    #[arg(long, env = "JOB_TIMEOUT_MS", default_value_t = 130_000)]
    pub job_timeout_ms: u64,
    /// Attempts of a job before it fails for good.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Jobs run at once by this process's worker (0: no worker in this process).
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 16)]
    pub worker_concurrency: usize,
    /// How long download URLs work.
    #[arg(long, env = "PRESIGN_TTL_SECS", default_value_t = 3600)]
    pub presign_ttl_secs: u64,
    /// Jobs one owner may create per hour (0: no limit).
    #[arg(long, env = "JOBS_PER_HOUR", default_value_t = 10)]
    pub jobs_per_hour: u32,
    /// Unfinished jobs one owner may have at once (0: no limit).
    #[arg(long, env = "MAX_ACTIVE_JOBS_PER_OWNER", default_value_t = 0)]
    pub max_active_jobs_per_owner: u32,
    /// The secret signing local download URLs (default: random per process).
    #[arg(long, env = "SIGNING_SECRET", hide_env_values = true)]
    pub signing_secret: Option<String>,
    /// How long finished jobs and their results are kept before they are purged.
    #[arg(long, env = "RETENTION_SECS", default_value_t = 86_400)]
    pub retention_secs: u64,
    /// How often the worker purges finished jobs past the retention (0: never).
    #[arg(long, env = "PURGE_INTERVAL_SECS", default_value_t = 60)]
    pub purge_interval_secs: u64,
    /// With the in-memory store: the most jobs it keeps (0: no bound). Past it, finished jobs
    /// are evicted oldest first, before their retention ends; when every kept job is unfinished,
    /// new submissions get 503 `store_full`. About 0.8 KB per job (store and events): the
    /// default bounds the jobs' memory near 800 MB.
    #[arg(long, env = "MEMORY_MAX_JOBS", default_value_t = 1_000_000)]
    pub memory_max_jobs: usize,
    /// On SIGTERM/Ctrl-C, how long running jobs may take to finish.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
}

/// An optional setting, with the empty string meaning unset.
pub fn set(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl Config {
    /// The URL clients reach this server at.
    pub fn public_url(&self) -> String {
        if let Some(url) = set(&self.public_url) {
            return url.trim_end_matches('/').to_owned();
        }
        let host = match self.host.as_str() {
            "0.0.0.0" | "::" | "[::]" => "127.0.0.1",
            h => h,
        };
        if host.contains(':') && !host.starts_with('[') {
            format!("http://[{host}]:{}", self.port)
        } else {
            format!("http://{host}:{}", self.port)
        }
    }

    /// Milliseconds as a duration.
    pub fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_enabled_accepts_false_and_zero() {
        for (v, want) in [("false", false), ("0", false), ("true", true), ("1", true)] {
            let c = Config::try_parse_from(["x", "--download-delay-enabled", v]).unwrap();
            assert_eq!(c.download_delay_enabled, want, "{v}");
        }
        let c = Config::try_parse_from(["x"]).unwrap();
        assert!(c.download_delay_enabled);
        assert_eq!(c.port, 3000);
        assert_eq!(c.public_url(), "http://127.0.0.1:3000");
        assert_eq!(c.memory_max_jobs, 1_000_000);
    }

    #[test]
    fn an_empty_switch_is_refused_not_read_as_false() {
        for flag in [
            "--download-delay-enabled",
            "--trust-proxy",
            "--s3-force-path-style",
        ] {
            let e = Config::try_parse_from(["x", flag, ""]).unwrap_err();
            assert!(e.to_string().contains("empty"), "{flag}: {e}");
        }
    }
}
