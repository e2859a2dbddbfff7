//! Timestamps written as chrono's `Serialize` writes them (RFC 3339 with `Z`, and as many
//! fraction digits as the value needs), but handed to the serializer as one string: chrono's
//! impl goes through `collect_str`, which `serde_json` escapes a character at a time, and every
//! job and event carries timestamps through the backends' JSON on each write (and the HTTP
//! face's bodies on each read). Reading takes the same form apart by hand and leaves any other
//! form to chrono, so it accepts exactly what chrono's `Deserialize` accepts.
//!
//! ```
//! use chrono::{DateTime, TimeZone, Utc};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Body {
//!     #[serde(
//!         serialize_with = "longjob_core::rfc3339::serialize",
//!         deserialize_with = "longjob_core::rfc3339::deserialize"
//!     )]
//!     at: DateTime<Utc>,
//!     #[serde(
//!         serialize_with = "longjob_core::rfc3339::serialize_opt",
//!         deserialize_with = "longjob_core::rfc3339::deserialize_opt"
//!     )]
//!     until: Option<DateTime<Utc>>,
//! }
//!
//! let at = Utc.with_ymd_and_hms(2026, 12, 7, 14, 30, 5).unwrap();
//! let json = serde_json::to_string(&Body { at, until: None }).unwrap();
//! assert_eq!(json, r#"{"at":"2026-12-07T14:30:05Z","until":null}"#);
//! let back: Body = serde_json::from_str(&json).unwrap();
//! assert_eq!((back.at, back.until), (at, None));
//! ```

use std::fmt;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, SecondsFormat, Timelike, Utc};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A timestamp that serializes as one RFC 3339 string.
struct Rfc3339<'a>(&'a DateTime<Utc>);

impl Serialize for Rfc3339<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        with_text(self.0, |text| s.serialize_str(text))
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
    with_text(at, |text| out.push_str(text));
}

/// Hands `at`'s text to `f`: written in place by [`write`] for the years it covers, chrono's
/// own for the others.
fn with_text<R>(at: &DateTime<Utc>, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0u8; MAX_LEN];
    match write(at, &mut buf).and_then(|len| std::str::from_utf8(&buf[..len]).ok()) {
        Some(text) => f(text),
        None => f(&at.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
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

/// A timestamp read from one RFC 3339 string.
struct Parsed(DateTime<Utc>);

impl<'de> Deserialize<'de> for Parsed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Rfc3339Visitor;
        impl Visitor<'_> for Rfc3339Visitor {
            type Value = Parsed;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 formatted date and time string")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Parsed, E> {
                match read(text) {
                    Some(at) => Ok(Parsed(at)),
                    // What chrono's Deserialize does with any string.
                    None => text
                        .parse::<DateTime<FixedOffset>>()
                        .map(|at| Parsed(at.with_timezone(&Utc)))
                        .map_err(E::custom),
                }
            }
        }
        d.deserialize_str(Rfc3339Visitor)
    }
}

/// For `#[serde(deserialize_with = "...")]` on a `DateTime<Utc>`: accepts what chrono's
/// `Deserialize` accepts, reading the form [`serialize`] writes without chrono's parser.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    Parsed::deserialize(d).map(|p| p.0)
}

/// For `#[serde(deserialize_with = "...")]` on an `Option<DateTime<Utc>>` (with `default`, so
/// a missing field is `None`).
pub fn deserialize_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    Option::<Parsed>::deserialize(d).map(|p| p.map(|p| p.0))
}

/// `YYYY-MM-DDTHH:MM:SS[.f]Z` with 1 to 9 fraction digits, as [`write`] writes it (and the
/// fraction widths it does not write), taken apart by hand; `None` for any other form (an
/// offset, a lowercase `t`, a leap second (`and_hms_nano_opt` refuses second 60), a date that
/// does not exist), which the caller leaves to chrono.
pub(crate) fn read(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    let num = |from: usize, width: usize| -> Option<u32> {
        b.get(from..from + width)?.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let seps = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if b.len() < 20 || seps.iter().any(|&(i, c)| b[i] != c) || b[b.len() - 1] != b'Z' {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let nano = match b.len() - 20 {
        0 => 0,
        n if b[19] == b'.' && (2..=10).contains(&n) => {
            let digits = n - 1;
            num(20, digits)? * 10u32.pow(9 - u32::try_from(digits).ok()?)
        }
        _ => return None,
    };
    let year = i32::try_from(year).ok()?;
    Some(
        NaiveDate::from_ymd_opt(year, month, day)?
            .and_hms_nano_opt(hour, minute, second, nano)?
            .and_utc(),
    )
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

    /// 20 000 times of the years 1970 to 9999 from a xorshift `seed`: a quarter of them each with
    /// no fraction, whole milliseconds, whole microseconds and nanoseconds.
    fn spread(seed: u64) -> impl Iterator<Item = DateTime<Utc>> {
        let mut x = seed;
        (0..20_000u32).map(move |i| {
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
        })
    }

    #[derive(serde::Deserialize)]
    struct Read {
        #[serde(deserialize_with = "deserialize")]
        at: DateTime<Utc>,
        #[serde(default, deserialize_with = "deserialize_opt")]
        maybe: Option<DateTime<Utc>>,
    }

    #[derive(serde::Deserialize)]
    struct ChronoRead {
        at: DateTime<Utc>,
        #[serde(default)]
        maybe: Option<DateTime<Utc>>,
    }

    /// What ours and chrono's read from `json`: equal values, or both an error.
    fn reads_as_chrono(json: &str) {
        let ours = serde_json::from_str::<Read>(json).map(|r| (r.at, r.maybe));
        let chronos = serde_json::from_str::<ChronoRead>(json).map(|r| (r.at, r.maybe));
        match (ours, chronos) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{json}"),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("{json}: ours {a:?}, chrono's {b:?}"),
        }
    }

    #[test]
    fn reads_what_chrono_reads() {
        for text in [
            "2026-12-07T14:30:05Z",
            "2026-12-07T14:30:05.1Z",
            "2026-12-07T14:30:05.12Z",
            "2026-12-07T14:30:05.120Z",
            "2026-12-07T14:30:05.1234Z",
            "2026-12-07T14:30:05.123456Z",
            "2026-12-07T14:30:05.123456789Z",
            "2026-12-07T14:30:05.1234567891Z",
            "2026-12-07T14:30:05.Z",
            "2026-12-07t14:30:05Z",
            "2026-12-07 14:30:05Z",
            "2026-12-07T14:30:05z",
            "2026-12-07T14:30:05+01:00",
            "2026-12-07T14:30:05.5-07:30",
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.5Z",
            "2026-02-30T14:30:05Z",
            "2026-13-07T14:30:05Z",
            "2026-12-07T24:00:00Z",
            "2026-12-07T14:60:05Z",
            "+12345-01-02T03:04:05Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "2026-12-07T14:30:0xZ",
            "2026-12-07T14:30:05",
            "",
            "Z",
        ] {
            reads_as_chrono(&format!(r#"{{"at":"{text}","maybe":"{text}"}}"#));
            reads_as_chrono(&format!(r#"{{"at":"{text}"}}"#));
        }
        reads_as_chrono(r#"{"at":"2026-12-07T14:30:05Z","maybe":null}"#);
        reads_as_chrono(r#"{"at":12}"#);
    }

    #[test]
    fn reads_back_what_it_writes() {
        for at in spread(0x2545_F491_4F6C_DD1D) {
            let json = serde_json::to_string(&Ours {
                at,
                maybe: Some(at),
            })
            .unwrap();
            let read: Read = serde_json::from_str(&json).unwrap();
            assert_eq!((read.at, read.maybe), (at, Some(at)), "{json}");
            reads_as_chrono(&json);
        }
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
        for at in times.into_iter().chain(spread(0x9E37_79B9_7F4A_7C15)) {
            for maybe in [None, Some(at)] {
                let ours = serde_json::to_string(&Ours { at, maybe }).unwrap();
                let chronos = serde_json::to_string(&Chronos { at, maybe }).unwrap();
                assert_eq!(ours, chronos, "{at:?}");
            }
        }
    }
}
