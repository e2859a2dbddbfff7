//! [`S3Config`]: where the store's bucket is and how to talk to it.

use std::fmt;
use std::time::Duration;

use longjob_core::BackendError;

/// The default part size of multipart uploads: 8 MiB.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// The smallest part size S3 accepts for every part but the last: 5 MiB.
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// The default number of parts of one put uploaded at the same time: 2.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 2;
/// The default per-call timeout: 30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The region used when none is given.
pub const DEFAULT_REGION: &str = "us-east-1";

/// An access key and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// A session token, for temporary credentials.
    pub session_token: Option<String>,
}

impl S3Credentials {
    /// Static credentials without a session token.
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
        }
    }
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// How to reach the bucket of an [`S3BlobStore`](crate::S3BlobStore).
///
/// ```
/// use std::time::Duration;
/// use longjob_s3::S3Config;
///
/// let config = S3Config::new("my-bucket")
///     .endpoint("http://127.0.0.1:9000")
///     .force_path_style(true)
///     .credentials("access", "secret")
///     .key_prefix("results/")
///     .part_size(16 * 1024 * 1024)
///     .timeout(Duration::from_secs(10));
/// assert_eq!(config.bucket, "my-bucket");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// A custom endpoint (MinIO, RustFS, Ceph, …), e.g. `http://127.0.0.1:9000`; `None` for AWS S3.
    pub endpoint: Option<String>,
    /// The endpoint put into presigned URLs, when clients reach the server under another address
    /// than this process does (e.g. `http://minio:9000` inside a container network,
    /// `https://files.example.com` outside); `None` for the same as `endpoint`.
    pub public_endpoint: Option<String>,
    /// The region (`us-east-1` by default; S3-compatible servers mostly ignore it).
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// A prefix put before every key (e.g. `results/`); empty by default.
    pub key_prefix: String,
    /// Path-style URLs (`endpoint/bucket/key`) instead of virtual-hosted ones (`bucket.endpoint/key`).
    pub force_path_style: bool,
    /// Static credentials; `None` uses the AWS default chain (`AWS_ACCESS_KEY_ID`, profiles,
    /// web identity, instance metadata).
    pub credentials: Option<S3Credentials>,
    /// Bodies up to this size are sent with one `PutObject`; larger ones as a multipart upload
    /// of parts of this size (at least [`MIN_PART_SIZE`]; 8 MiB by default).
    pub part_size: usize,
    /// How many parts of one multipart put go up at the same time while the next one is read
    /// (2 by default; a put holds up to this many parts plus one in memory).
    pub upload_concurrency: usize,
    /// The deadline of each call to the server (30 s by default); a streamed put gets it per part.
    pub timeout: Duration,
}

impl S3Config {
    /// A configuration of `bucket` with the defaults: AWS S3 in `us-east-1`, no key prefix,
    /// virtual-hosted URLs, the default credential chain, 8 MiB parts, 30 s per call.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            endpoint: None,
            public_endpoint: None,
            region: DEFAULT_REGION.to_owned(),
            bucket: bucket.into(),
            key_prefix: String::new(),
            force_path_style: false,
            credentials: None,
            part_size: DEFAULT_PART_SIZE,
            upload_concurrency: DEFAULT_UPLOAD_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets the endpoint.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Sets the endpoint put into presigned URLs.
    pub fn public_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.public_endpoint = Some(endpoint.into());
        self
    }

    /// Sets the region.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = region.into();
        self
    }

    /// Sets the key prefix.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets path-style addressing.
    pub fn force_path_style(mut self, yes: bool) -> Self {
        self.force_path_style = yes;
        self
    }

    /// Sets static credentials.
    pub fn credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some(S3Credentials::new(access_key_id, secret_access_key));
        self
    }

    /// Sets the multipart part size.
    pub fn part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes;
        self
    }

    /// Sets how many parts of one put go up at the same time.
    pub fn upload_concurrency(mut self, parts: usize) -> Self {
        self.upload_concurrency = parts;
        self
    }

    /// Sets the per-call timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Reads the configuration from the environment:
    ///
    /// | variable | meaning | default |
    /// |---|---|---|
    /// | `S3_BUCKET_NAME` | the bucket | required |
    /// | `S3_ENDPOINT` | a custom endpoint URL | AWS S3 |
    /// | `S3_PUBLIC_ENDPOINT` | the endpoint in presigned URLs, if clients reach the server elsewhere | `S3_ENDPOINT` |
    /// | `S3_REGION` | the region | `us-east-1` |
    /// | `S3_ACCESS_KEY_ID`, `S3_SECRET_ACCESS_KEY` | static credentials (both or neither) | the AWS default chain |
    /// | `S3_FORCE_PATH_STYLE` | `true`/`false` (also `1`/`0`, `yes`/`no`) | `true` with `S3_ENDPOINT`, else `false` |
    /// | `S3_KEY_PREFIX` | a prefix before every key | none |
    /// | `S3_PART_SIZE` | multipart part size in bytes | 8 MiB |
    /// | `S3_UPLOAD_CONCURRENCY` | parts of one put uploaded at the same time | 2 |
    /// | `S3_TIMEOUT_SECS` | per-call timeout in seconds | 30 |
    ///
    /// Empty variables count as unset.
    pub fn from_env() -> Result<Self, S3ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) with another source of variables.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, S3ConfigError> {
        let var = |name: &'static str| lookup(name).filter(|v| !v.trim().is_empty());
        let bucket = var("S3_BUCKET_NAME").ok_or(S3ConfigError::Missing("S3_BUCKET_NAME"))?;
        let mut config = Self::new(bucket);
        config.endpoint = var("S3_ENDPOINT");
        config.public_endpoint = var("S3_PUBLIC_ENDPOINT");
        if let Some(region) = var("S3_REGION") {
            config.region = region;
        }
        config.credentials = match (var("S3_ACCESS_KEY_ID"), var("S3_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => Some(S3Credentials::new(id, secret)),
            (None, None) => None,
            (Some(_), None) => return Err(S3ConfigError::Missing("S3_SECRET_ACCESS_KEY")),
            (None, Some(_)) => return Err(S3ConfigError::Missing("S3_ACCESS_KEY_ID")),
        };
        config.force_path_style = match var("S3_FORCE_PATH_STYLE") {
            Some(v) => parse_bool("S3_FORCE_PATH_STYLE", &v)?,
            None => config.endpoint.is_some(),
        };
        if let Some(prefix) = var("S3_KEY_PREFIX") {
            config.key_prefix = prefix;
        }
        if let Some(v) = var("S3_PART_SIZE") {
            config.part_size = v.trim().parse().map_err(|_| S3ConfigError::Invalid {
                name: "S3_PART_SIZE",
                value: v.clone(),
                why: "not a number of bytes".into(),
            })?;
        }
        if let Some(v) = var("S3_UPLOAD_CONCURRENCY") {
            config.upload_concurrency = v.trim().parse().map_err(|_| S3ConfigError::Invalid {
                name: "S3_UPLOAD_CONCURRENCY",
                value: v.clone(),
                why: "not a number of parts".into(),
            })?;
        }
        if let Some(v) = var("S3_TIMEOUT_SECS") {
            let secs: f64 = v.trim().parse().map_err(|_| S3ConfigError::Invalid {
                name: "S3_TIMEOUT_SECS",
                value: v.clone(),
                why: "not a number of seconds".into(),
            })?;
            config.timeout =
                Duration::try_from_secs_f64(secs).map_err(|e| S3ConfigError::Invalid {
                    name: "S3_TIMEOUT_SECS",
                    value: v.clone(),
                    why: e.to_string(),
                })?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that the server cannot be asked about.
    pub fn validate(&self) -> Result<(), S3ConfigError> {
        let invalid = |name: &'static str, value: String, why: &str| {
            Err(S3ConfigError::Invalid {
                name,
                value,
                why: why.to_owned(),
            })
        };
        if self.bucket.trim().is_empty() {
            return invalid("bucket", self.bucket.clone(), "must not be empty");
        }
        if self.part_size < MIN_PART_SIZE {
            return invalid(
                "part_size",
                self.part_size.to_string(),
                "S3 needs parts of at least 5 MiB (5242880 bytes)",
            );
        }
        if self.upload_concurrency == 0 {
            return invalid("upload_concurrency", "0".into(), "must be at least 1");
        }
        if self.timeout.is_zero() {
            return invalid("timeout", format!("{:?}", self.timeout), "must be positive");
        }
        for (name, endpoint) in [
            ("endpoint", &self.endpoint),
            ("public_endpoint", &self.public_endpoint),
        ] {
            if let Some(endpoint) = endpoint
                && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            {
                return invalid(
                    name,
                    endpoint.clone(),
                    "must start with http:// or https://",
                );
            }
        }
        let prefix = self.key_prefix.trim_end_matches('/');
        if !prefix.is_empty() && longjob_core::blob::validate_key(prefix).is_err() {
            return invalid(
                "key_prefix",
                self.key_prefix.clone(),
                "letters, digits and -_.=/ only, without empty, '.' or '..' segments",
            );
        }
        Ok(())
    }
}

fn parse_bool(name: &'static str, value: &str) -> Result<bool, S3ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(S3ConfigError::Invalid {
            name,
            value: value.to_owned(),
            why: "expected true or false".into(),
        }),
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3ConfigError {
    /// A required variable is not set.
    #[error("{0} is not set")]
    Missing(&'static str),
    /// A value is not acceptable.
    #[error("{name}={value:?}: {why}")]
    Invalid {
        /// The variable or field.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it does not work.
        why: String,
    },
}

impl From<S3ConfigError> for BackendError {
    fn from(e: S3ConfigError) -> Self {
        BackendError::InvalidArgument(format!("s3 configuration: {e}"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn from_env_reads_every_variable() {
        let c = S3Config::from_lookup(lookup(&[
            ("S3_BUCKET_NAME", "b1"),
            ("S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("S3_PUBLIC_ENDPOINT", "https://files.example.invalid"),
            ("S3_REGION", "eu-west-1"),
            ("S3_ACCESS_KEY_ID", "ak"),
            ("S3_SECRET_ACCESS_KEY", "sk"),
            ("S3_KEY_PREFIX", "results/"),
            ("S3_PART_SIZE", "6291456"),
            ("S3_TIMEOUT_SECS", "2.5"),
            ("S3_UPLOAD_CONCURRENCY", "4"),
        ]))
        .unwrap();
        assert_eq!(c.bucket, "b1");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(
            c.public_endpoint.as_deref(),
            Some("https://files.example.invalid")
        );
        assert_eq!(c.region, "eu-west-1");
        assert_eq!(c.credentials, Some(S3Credentials::new("ak", "sk")));
        assert!(
            c.force_path_style,
            "path style defaults to on with an endpoint"
        );
        assert_eq!(c.key_prefix, "results/");
        assert_eq!(c.part_size, 6 * 1024 * 1024);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.upload_concurrency, 4);
    }

    #[test]
    fn from_env_defaults() {
        let c =
            S3Config::from_lookup(lookup(&[("S3_BUCKET_NAME", "b1"), ("S3_REGION", "")])).unwrap();
        assert_eq!(c, S3Config::new("b1"));
        assert!(!c.force_path_style);
        let c = S3Config::from_lookup(lookup(&[
            ("S3_BUCKET_NAME", "b1"),
            ("S3_ENDPOINT", "https://s3.example.invalid"),
            ("S3_FORCE_PATH_STYLE", "false"),
        ]))
        .unwrap();
        assert!(!c.force_path_style);
    }

    #[test]
    fn from_env_rejects_what_cannot_work() {
        let err = |vars: &[(&str, &str)]| S3Config::from_lookup(lookup(vars)).unwrap_err();
        assert_eq!(err(&[]), S3ConfigError::Missing("S3_BUCKET_NAME"));
        assert_eq!(
            err(&[("S3_BUCKET_NAME", "b"), ("S3_ACCESS_KEY_ID", "ak")]),
            S3ConfigError::Missing("S3_SECRET_ACCESS_KEY")
        );
        assert!(matches!(
            err(&[("S3_BUCKET_NAME", "b"), ("S3_FORCE_PATH_STYLE", "maybe")]),
            S3ConfigError::Invalid {
                name: "S3_FORCE_PATH_STYLE",
                ..
            }
        ));
        assert!(matches!(
            err(&[("S3_BUCKET_NAME", "b"), ("S3_PART_SIZE", "1024")]),
            S3ConfigError::Invalid {
                name: "part_size",
                ..
            }
        ));
        assert!(matches!(
            err(&[("S3_BUCKET_NAME", "b"), ("S3_ENDPOINT", "127.0.0.1:9000")]),
            S3ConfigError::Invalid {
                name: "endpoint",
                ..
            }
        ));
        assert!(matches!(
            err(&[("S3_BUCKET_NAME", "b"), ("S3_KEY_PREFIX", "../x")]),
            S3ConfigError::Invalid {
                name: "key_prefix",
                ..
            }
        ));
    }

    #[test]
    fn debug_redacts_the_secret() {
        let shown = format!("{:?}", S3Config::new("b").credentials("ak", "very-secret"));
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("ak"));
    }
}
