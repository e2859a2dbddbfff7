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

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::{Serialize, Serializer};

/// A timestamp that serializes as one RFC 3339 string.
struct Rfc3339<'a>(&'a DateTime<Utc>);

impl Serialize for Rfc3339<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; MAX_LEN];
        match write(self.0, &mut buf).and_then(|len| std::str::from_utf8(&buf[..len]).ok()) {
            Some(text) => s.serialize_str(text),
            None => s.serialize_str(&self.0.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        }
    }
}

/// Appends `at` to `out` as chrono writes it (the text of its JSON string, without quotes), for
/// code that builds JSON by hand.
///
/// ```
/// use chrono::{TimeZone, Utc};
///
/// let mut out = String::from("at ");
/// let at = Utc.with_ymd_and_hms(2026, 12, 7, 14, 30, 5).unwrap();
/// longjob_core::rfc3339::push(&at, &mut out);
/// assert_eq!(out, "at 2026-12-07T14:30:05Z");
/// ```
pub fn push(at: &DateTime<Utc>, out: &mut String) {
    let mut buf = [0u8; MAX_LEN];
    match write(at, &mut buf).and_then(|len| std::str::from_utf8(&buf[..len]).ok()) {
        Some(text) => out.push_str(text),
        None => out.push_str(&at.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
    }
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const MAX_LEN: usize = 30;

/// Writes `at` as `to_rfc3339_opts(SecondsFormat::AutoSi, true)` does into `buf` and returns
/// its length, for the years 0 to 9999 (`None` for others, which chrono writes with a sign):
/// digits put in place, with no formatting machinery nor allocation (chrono's took more
/// instructions than all the rest of a job's JSON).
fn write(at: &DateTime<Utc>, buf: &mut [u8; MAX_LEN]) -> Option<usize> {
    fn digits(buf: &mut [u8; MAX_LEN], from: usize, width: usize, mut n: u32) {
        for i in (from..from + width).rev() {
            // n % 10 < 10: the cast keeps it.
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    let (date, time) = (at.date_naive(), at.time());
    let year = u32::try_from(date.year()).ok().filter(|y| *y <= 9999)?;
    let (mut second, mut nano) = (time.second(), time.nanosecond());
    // A leap second: chrono keeps it as a nanosecond count past 10^9.
    if nano >= 1_000_000_000 {
        second += 1;
        nano -= 1_000_000_000;
    }
    digits(buf, 0, 4, year);
    buf[4] = b'-';
    digits(buf, 5, 2, date.month());
    buf[7] = b'-';
    digits(buf, 8, 2, date.day());
    buf[10] = b'T';
    digits(buf, 11, 2, time.hour());
    buf[13] = b':';
    digits(buf, 14, 2, time.minute());
    buf[16] = b':';
    digits(buf, 17, 2, second);
    let fraction = if nano == 0 {
        None
    } else if nano % 1_000_000 == 0 {
        Some((3, nano / 1_000_000))
    } else if nano % 1_000 == 0 {
        Some((6, nano / 1_000))
    } else {
        Some((9, nano))
    };
    let mut len = 19;
    if let Some((width, n)) = fraction {
        buf[19] = b'.';
        digits(buf, 20, width, n);
        len = 20 + width;
    }
    buf[len] = b'Z';
    Some(len + 1)
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
        // And a spread of times: every fraction width, every field's range.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let spread = (0..20_000).map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = i64::try_from(x % 253_402_300_799).unwrap();
            let nanos = match i % 4 {
                0 => 0,
                1 => (x % 1000) as u32 * 1_000_000,
                2 => (x % 1_000_000) as u32 * 1_000,
                _ => (x % 1_000_000_000) as u32,
            };
            DateTime::from_timestamp(secs, nanos).unwrap()
        });
        for at in times.into_iter().chain(spread) {
            for maybe in [None, Some(at)] {
                let ours = serde_json::to_string(&Ours { at, maybe }).unwrap();
                let chronos = serde_json::to_string(&Chronos { at, maybe }).unwrap();
                assert_eq!(ours, chronos, "{at:?}");
            }
        }
    }
}
