//! Timestamps written as chrono's `Serialize` writes them (RFC 3339 with `Z`, and as many
//! fraction digits as the value needs), but handed to the serializer as one string: chrono's
//! impl goes through `collect_str`, which `serde_json` escapes a character at a time, and every
//! job and event carries timestamps through the backends' JSON on each write (and the HTTP
//! face's bodies on each read). Deserializing stays chrono's.
//!
//! ```
//! use chrono::{DateTime, TimeZone, Utc};
//!
//! #[derive(serde::Serialize)]
//! struct Body {
//!     #[serde(serialize_with = "longjob_core::rfc3339::serialize")]
//!     at: DateTime<Utc>,
//!     #[serde(serialize_with = "longjob_core::rfc3339::serialize_opt")]
//!     until: Option<DateTime<Utc>>,
//! }
//!
//! let at = Utc.with_ymd_and_hms(2026, 12, 7, 14, 30, 5).unwrap();
//! let json = serde_json::to_string(&Body { at, until: None }).unwrap();
//! assert_eq!(json, r#"{"at":"2026-12-07T14:30:05Z","until":null}"#);
//! ```

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};

/// A timestamp that serializes as one RFC 3339 string.
struct Rfc3339<'a>(&'a DateTime<Utc>);

impl Serialize for Rfc3339<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

/// For `#[serde(serialize_with = "...")]` on a `DateTime<Utc>`.
pub fn serialize<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    Rfc3339(at).serialize(s)
}

/// For `#[serde(serialize_with = "...")]` on an `Option<DateTime<Utc>>`.
pub fn serialize_opt<S: Serializer>(at: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => s.serialize_some(&Rfc3339(at)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone};
    use serde::Serialize;

    use super::*;

    #[derive(Serialize)]
    struct Ours {
        #[serde(serialize_with = "serialize")]
        at: DateTime<Utc>,
        #[serde(serialize_with = "serialize_opt")]
        maybe: Option<DateTime<Utc>>,
    }

    #[derive(Serialize)]
    struct Chronos {
        at: DateTime<Utc>,
        maybe: Option<DateTime<Utc>>,
    }

    #[test]
    fn writes_what_chrono_writes() {
        let base = Utc
            .with_ymd_and_hms(2026, 12, 7, 14, 30, 5)
            .single()
            .unwrap();
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .unwrap()
            .and_utc();
        let far = Utc
            .with_ymd_and_hms(12_345, 1, 2, 3, 4, 5)
            .single()
            .unwrap();
        let times = [
            base,
            base + chrono::Duration::milliseconds(120),
            base + chrono::Duration::microseconds(123_456),
            base + chrono::Duration::nanoseconds(123_456_789),
            leap,
            far,
            DateTime::<Utc>::MIN_UTC,
            Utc::now(),
        ];
        for at in times {
            for maybe in [None, Some(at)] {
                let ours = serde_json::to_string(&Ours { at, maybe }).unwrap();
                let chronos = serde_json::to_string(&Chronos { at, maybe }).unwrap();
                assert_eq!(ours, chronos, "{at:?}");
            }
        }
    }
}
