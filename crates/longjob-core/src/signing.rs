//! HMAC-signed download URLs for the built-in blob stores (memory and local disk).
//!
//! The URL is `{base_url}/{key}?expires={unix seconds}&name={file name}&sig={hex HMAC-SHA256}`,
//! the HMAC taken over key, expiry and file name. The HTTP layer serves such URLs after
//! [`UrlSigner::verify`].

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::blob::PresignedUrl;

type HmacSha256 = Hmac<Sha256>;

/// Why a signed URL was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature does not match.
    #[error("invalid signature")]
    Invalid,
    /// The URL's time-to-live has passed.
    #[error("the URL has expired")]
    Expired,
}

/// Signs and verifies download URLs with a secret key.
///
/// ```
/// use std::time::Duration;
/// use longjob_core::signing::{SignatureError, UrlSigner};
///
/// let signer = UrlSigner::new(b"secret", "http://127.0.0.1:3000/v1/download/files");
/// let url = signer.sign("results/a.zip", Duration::from_secs(60), "a.zip");
/// assert!(url.url.starts_with("http://127.0.0.1:3000/v1/download/files/results/a.zip?expires="));
///
/// let expires = url.expires_at.timestamp();
/// let sig = url.url.rsplit("sig=").next().unwrap();
/// assert_eq!(signer.verify("results/a.zip", expires, "a.zip", sig), Ok(()));
/// assert_eq!(signer.verify("results/b.zip", expires, "a.zip", sig), Err(SignatureError::Invalid));
/// ```
#[derive(Clone)]
pub struct UrlSigner {
    secret: Vec<u8>,
    base_url: String,
}

impl fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UrlSigner")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl UrlSigner {
    /// A signer with `secret`, producing URLs under `base_url` (the file route's public URL).
    pub fn new(secret: impl AsRef<[u8]>, base_url: impl Into<String>) -> Self {
        Self {
            secret: secret.as_ref().to_vec(),
            base_url: base_url.into().trim_end_matches('/').to_owned(),
        }
    }

    /// A signer with a random secret: URLs it signs die with the process.
    pub fn random(base_url: impl Into<String>) -> Self {
        let secret: [u8; 32] = rand::random();
        Self::new(secret, base_url)
    }

    /// The URL prefix.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn mac(&self, key: &str, expires: i64, file_name: &str) -> HmacSha256 {
        // An HMAC accepts a key of any length, so this cannot fail.
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(&self.secret).unwrap_or_else(|_| unreachable!());
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac.update(b"\n");
        mac.update(file_name.as_bytes());
        mac
    }

    /// Signs a URL for `key`, valid for `ttl`, downloading as `file_name`.
    pub fn sign(&self, key: &str, ttl: Duration, file_name: &str) -> PresignedUrl {
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(365));
        let expires_at = Utc::now() + ttl;
        let expires = expires_at.timestamp();
        let sig = hex::encode(self.mac(key, expires, file_name).finalize().into_bytes());
        let url = format!(
            "{}/{}?expires={}&name={}&sig={}",
            self.base_url,
            key,
            expires,
            percent_encode(file_name),
            sig
        );
        PresignedUrl {
            url,
            expires_at: Utc.timestamp_opt(expires, 0).single().unwrap_or(expires_at),
        }
    }

    /// Checks a signature at the current time.
    pub fn verify(
        &self,
        key: &str,
        expires: i64,
        file_name: &str,
        sig: &str,
    ) -> Result<(), SignatureError> {
        self.verify_at(key, expires, file_name, sig, Utc::now())
    }

    /// Checks a signature at `now`.
    pub fn verify_at(
        &self,
        key: &str,
        expires: i64,
        file_name: &str,
        sig: &str,
        now: DateTime<Utc>,
    ) -> Result<(), SignatureError> {
        let sig = hex::decode(sig).map_err(|_| SignatureError::Invalid)?;
        self.mac(key, expires, file_name)
            .verify_slice(&sig)
            .map_err(|_| SignatureError::Invalid)?;
        if now.timestamp() > expires {
            return Err(SignatureError::Expired);
        }
        Ok(())
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_and_tampered_urls_are_refused() {
        let signer = UrlSigner::new(b"k", "http://h/files");
        let url = signer.sign("a.zip", Duration::from_secs(10), "my file.zip");
        assert!(url.url.contains("name=my%20file.zip"));
        let expires = url.expires_at.timestamp();
        let sig = url.url.rsplit("sig=").next().unwrap().to_owned();
        assert_eq!(signer.verify("a.zip", expires, "my file.zip", &sig), Ok(()));
        let later = url.expires_at + chrono::Duration::seconds(1);
        assert_eq!(
            signer.verify_at("a.zip", expires, "my file.zip", &sig, later),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            signer.verify("a.zip", expires + 100, "my file.zip", &sig),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            signer.verify("a.zip", expires, "other.zip", &sig),
            Err(SignatureError::Invalid)
        );
        let mut bad = sig.clone();
        bad.replace_range(0..1, if &sig[0..1] == "0" { "1" } else { "0" });
        assert_eq!(
            signer.verify("a.zip", expires, "my file.zip", &bad),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            signer.verify("a.zip", expires, "my file.zip", "zz"),
            Err(SignatureError::Invalid)
        );
        let other = UrlSigner::new(b"other", "http://h/files");
        assert_eq!(
            other.verify("a.zip", expires, "my file.zip", &sig),
            Err(SignatureError::Invalid)
        );
    }
}
