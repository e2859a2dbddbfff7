//! Who is calling: the host application's [`Authenticate`] maps request headers to an owner.

use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use axum::http::{HeaderMap, header};

use crate::ApiError;

/// Maps a request's headers to the owner of the jobs it may see, or refuses it (usually with
/// [`ApiError::unauthorized`], a 401).
///
/// The host application implements it over its own sessions or tokens:
///
/// ```
/// use async_trait::async_trait;
/// use axum::http::HeaderMap;
/// use longjob_axum::{ApiError, Authenticate};
///
/// #[derive(Debug)]
/// struct UserHeader;
///
/// #[async_trait]
/// impl Authenticate for UserHeader {
///     async fn authenticate(&self, headers: &HeaderMap) -> Result<String, ApiError> {
///         headers
///             .get("x-user")
///             .and_then(|v| v.to_str().ok())
///             .map(str::to_owned)
///             .ok_or_else(|| ApiError::unauthorized("missing X-User"))
///     }
/// }
/// ```
#[async_trait]
pub trait Authenticate: fmt::Debug + Send + Sync + 'static {
    /// The owner the request acts for.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<String, ApiError>;
}

/// Every caller is the owner `anonymous` (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct Anonymous;

#[async_trait]
impl Authenticate for Anonymous {
    async fn authenticate(&self, _headers: &HeaderMap) -> Result<String, ApiError> {
        Ok("anonymous".to_owned())
    }
}

/// API keys mapped to owners: `Authorization: Bearer <key>` (or `X-API-Key: <key>`).
///
/// ```
/// use longjob_axum::ApiKeys;
///
/// let keys: ApiKeys = "key1:alice, key2:bob".parse().unwrap();
/// assert_eq!(keys.owner_of("key2"), Some("bob"));
/// assert_eq!(keys.owner_of("nope"), None);
/// assert!("no-colon".parse::<ApiKeys>().is_err());
/// ```
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: HashMap<String, String>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// An `API_KEYS` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid API key entry {0:?}: expected key:owner")]
pub struct InvalidApiKeys(String);

impl std::str::FromStr for ApiKeys {
    type Err = InvalidApiKeys;

    /// Parses `key1:alice,key2:bob`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut keys = HashMap::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (key, owner) = entry
                .split_once(':')
                .ok_or_else(|| InvalidApiKeys(entry.to_owned()))?;
            let (key, owner) = (key.trim(), owner.trim());
            if key.is_empty() || owner.is_empty() {
                return Err(InvalidApiKeys(entry.to_owned()));
            }
            keys.insert(key.to_owned(), owner.to_owned());
        }
        Ok(Self { keys })
    }
}

impl ApiKeys {
    /// Adds a key.
    pub fn insert(&mut self, key: impl Into<String>, owner: impl Into<String>) {
        self.keys.insert(key.into(), owner.into());
    }

    /// The owner of `key`.
    pub fn owner_of(&self, key: &str) -> Option<&str> {
        self.keys.get(key).map(String::as_str)
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The key a request presents: `Authorization: Bearer <key>` or `X-API-Key`.
pub(crate) fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

#[async_trait]
impl Authenticate for ApiKeys {
    async fn authenticate(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        match presented_key(headers) {
            None => Err(ApiError::unauthorized(
                "an API key is required: Authorization: Bearer <key>",
            )),
            Some(key) => self
                .owner_of(key)
                .map(str::to_owned)
                .ok_or_else(|| ApiError::unauthorized("invalid API key")),
        }
    }
}
