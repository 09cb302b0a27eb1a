//! Leap seconds: the `leap-seconds.list` file, the leap indicator a server
//! announces, and (optional) leap smearing.
//!
//! Sans-IO like the rest of this crate: the file's text and the current
//! time come in as arguments.
//!
//! # The file
//!
//! `leap-seconds.list` is published by the IERS (and formerly NIST) and
//! shipped by tzdata (`/usr/share/zoneinfo/leap-seconds.list`). Times are
//! NTP seconds (since 1900-01-01 00:00:00 UTC). Lines:
//!
//! - `#$ 3960835200` — when the file was last updated;
//! - `#@ 3991593600` — when it expires (after that it can no longer say
//!   whether a leap second is coming);
//! - `2272060800 10 # 1 Jan 1972` — a data line: from this instant on,
//!   TAI − UTC is this many seconds. Each data line after the first marks
//!   a leap second inserted (offset + 1) or deleted (offset − 1) just
//!   before that instant, which is 00:00:00 UTC on the 1st of a month;
//! - `#h 49db2447 571e5e1b 2f002a53 9c8da8e4 39b8e49e` — the SHA-1 of the
//!   file's significant content, as five 32-bit hex words;
//! - any other line starting with `#` is a comment.
//!
//! **Hash rule** (checked against the IERS/tzdata file): SHA-1 over the
//! concatenation, in file order, of the decimal digits of the `#$` value,
//! the `#@` value and every data line's fields (the text before its `#`
//! comment), with everything that is not a digit (white space, comments,
//! the `#$`/`#@` markers) removed. The hash words may omit leading zeros.
//!
//! # The leap indicator
//!
//! An NTP server's leap indicator says "the last minute of *today* (UTC) has
//! 61 (or 59) seconds", so it is set only during the last UTC day before the
//! event (RFC 5905 section 7.3; RFC 8633 section 3.7.1 practice) and cleared
//! after it. [`leap_indicator`] combines the file (which wins while valid
//! and unexpired) and the upstream's flag.
//!
//! # Smearing
//!
//! [`SmearPlan`]: instead of a leap second, the served time runs slow (or
//! fast) by 1 s spread linearly over a window centred on the leap. It is
//! **unsuitable for a public pool server**: smeared time differs from UTC by
//! up to 0.5 s, and clients mixing smeared and unsmeared servers see them
//! disagree. See [`smear_offset`] for the formula.

use std::fmt;

use sha1::{Digest, Sha1};

use crate::packet::LeapIndicator;
use crate::time::{NTP_UNIX_OFFSET_SECS, NtpTimestamp};

/// Seconds in a UTC day without a leap second.
pub const SECS_PER_DAY: i64 = 86_400;

/// Default smear window, seconds: 24 h, noon to noon UTC around the leap
/// (the same smear as Google's and Amazon's public NTP services).
pub const DEFAULT_SMEAR_WINDOW: u32 = 86_400;

/// Where tzdata installs the file on Debian and most Linux distributions.
pub const SYSTEM_LEAP_FILE: &str = "/usr/share/zoneinfo/leap-seconds.list";

/// One data line: from `ntp_secs` on, TAI − UTC = `tai_offset` seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeapEntry {
    /// NTP seconds (since 1900) at which the offset takes effect.
    pub ntp_secs: u64,
    /// TAI − UTC from then on, seconds.
    pub tai_offset: i32,
}

impl LeapEntry {
    /// The instant as Unix seconds.
    pub const fn unix_secs(&self) -> i64 {
        ntp_to_unix(self.ntp_secs)
    }
}

/// A leap second: at `at` (Unix seconds, 00:00:00 UTC of the day after the
/// leap) TAI − UTC changes by `step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Leap {
    /// Unix time at which the new offset begins (midnight UTC).
    pub at: i64,
    /// +1: a second inserted (23:59:60); −1: a second deleted.
    pub step: i8,
}

impl Leap {
    /// The leap indicator announcing this leap on its last day.
    pub const fn indicator(self) -> LeapIndicator {
        if self.step > 0 { LeapIndicator::InsertSecond } else { LeapIndicator::DeleteSecond }
    }

    /// Whether `now` (Unix seconds) is in the last UTC day before the leap,
    /// the day whose last minute has 61 (or 59) seconds.
    pub const fn announced_at(self, now: i64) -> bool {
        self.at - SECS_PER_DAY <= now && now < self.at
    }
}

/// Why a `leap-seconds.list` file was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeapFileError {
    /// A line that does not parse.
    #[error("line {line}: {reason}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The `#h` hash does not match the content.
    #[error("hash mismatch: the file says {}, its content hashes to {}", Hex(expected), Hex(actual))]
    HashMismatch {
        /// From the `#h` line.
        expected: [u8; 20],
        /// Computed.
        actual: [u8; 20],
    },
    /// A data line not later than the one before it.
    #[error("line {line}: entries must be in strictly increasing time order")]
    NotIncreasing {
        /// 1-based line number.
        line: usize,
    },
    /// A data line whose offset differs from the previous one by other than
    /// one second, or whose instant is not 00:00:00 UTC on the 1st of a
    /// month.
    #[error("line {line}: not a leap second (TAI-UTC must change by 1 s at 00:00:00 UTC on the 1st of a month)")]
    NotALeap {
        /// 1-based line number.
        line: usize,
    },
    /// A required line is absent.
    #[error("no {0} line")]
    Missing(&'static str),
}

struct Hex<'a>(&'a [u8; 20]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A parsed, hash-checked `leap-seconds.list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeapTable {
    /// The data lines, in strictly increasing time order (at least one).
    pub entries: Vec<LeapEntry>,
    /// Expiry, NTP seconds (`#@`).
    pub expires: u64,
    /// Last update, NTP seconds (`#$`).
    pub updated: u64,
}

/// The largest NTP seconds value a file may hold: Unix time of every value
/// up to it fits an `i64` (larger ones overflowed the conversion).
const MAX_NTP_SECS: u64 = i64::MAX as u64;

/// Unix seconds of NTP seconds up to [`MAX_NTP_SECS`] (all that
/// [`LeapTable::parse`] accepts).
const fn ntp_to_unix(ntp_secs: u64) -> i64 {
    ntp_secs as i64 - NTP_UNIX_OFFSET_SECS
}

fn parse_secs(text: &str, line: usize) -> Result<u64, LeapFileError> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LeapFileError::Syntax { line, reason: "expected NTP seconds (decimal digits)" });
    }
    let out_of_range = LeapFileError::Syntax { line, reason: "number out of range" };
    let secs: u64 = text.parse().map_err(|_| out_of_range.clone())?;
    if secs > MAX_NTP_SECS {
        return Err(out_of_range);
    }
    Ok(secs)
}

fn parse_hash(text: &str, line: usize) -> Result<[u8; 20], LeapFileError> {
    let bad = LeapFileError::Syntax { line, reason: "expected five 32-bit hex words after #h" };
    let mut out = [0u8; 20];
    let mut words = text.split_whitespace();
    for chunk in out.chunks_exact_mut(4) {
        let word = words.next().ok_or_else(|| bad.clone())?;
        if word.len() > 8 {
            return Err(bad);
        }
        let value = u32::from_str_radix(word, 16).map_err(|_| bad.clone())?;
        chunk.copy_from_slice(&value.to_be_bytes());
    }
    if words.next().is_some() {
        return Err(bad);
    }
    Ok(out)
}

fn hash_digits(hasher: &mut Sha1, text: &str) {
    for b in text.bytes().filter(u8::is_ascii_digit) {
        hasher.update([b]);
    }
}

impl LeapTable {
    /// Parses and checks a `leap-seconds.list` file: syntax, the `#$`,
    /// `#@` and `#h` lines present once each, at least one data line,
    /// the hash, then strictly increasing instants and ±1 s steps at the
    /// start of a month. Expiry is not checked here (see
    /// [`Self::is_expired`]).
    pub fn parse(text: &str) -> Result<Self, LeapFileError> {
        let mut hasher = Sha1::new();
        let mut updated = None;
        let mut expires = None;
        let mut hash = None;
        let mut entries: Vec<(usize, LeapEntry)> = Vec::new();
        let twice = |line| LeapFileError::Syntax { line, reason: "repeated #$, #@ or #h line" };
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            if let Some(rest) = raw.strip_prefix("#$") {
                let value = parse_secs(rest, line)?;
                hash_digits(&mut hasher, rest);
                if updated.replace(value).is_some() {
                    return Err(twice(line));
                }
            } else if let Some(rest) = raw.strip_prefix("#@") {
                let value = parse_secs(rest, line)?;
                hash_digits(&mut hasher, rest);
                if expires.replace(value).is_some() {
                    return Err(twice(line));
                }
            } else if let Some(rest) = raw.strip_prefix("#h") {
                if hash.replace(parse_hash(rest, line)?).is_some() {
                    return Err(twice(line));
                }
            } else if raw.starts_with('#') || raw.trim().is_empty() {
                // A comment or a blank line.
            } else {
                let data = raw.split_once('#').map_or(raw, |(data, _)| data);
                entries.push((line, parse_entry(data, line)?));
                hash_digits(&mut hasher, data);
            }
        }
        let updated = updated.ok_or(LeapFileError::Missing("#$ (last update)"))?;
        let expires = expires.ok_or(LeapFileError::Missing("#@ (expiry)"))?;
        let expected = hash.ok_or(LeapFileError::Missing("#h (hash)"))?;
        if entries.is_empty() {
            return Err(LeapFileError::Missing("data"));
        }
        // The hash first: a corrupted file is reported as such, whatever
        // its content now says.
        let actual: [u8; 20] = hasher.finalize().into();
        if actual != expected {
            return Err(LeapFileError::HashMismatch { expected, actual });
        }
        for pair in entries.windows(2) {
            let ((_, prev), (line, entry)) = (pair[0], pair[1]);
            if entry.ntp_secs <= prev.ntp_secs {
                return Err(LeapFileError::NotIncreasing { line });
            }
            let step = i64::from(entry.tai_offset) - i64::from(prev.tai_offset);
            if step.abs() != 1 || !is_first_of_month(entry.unix_secs()) {
                return Err(LeapFileError::NotALeap { line });
            }
        }
        Ok(Self { entries: entries.into_iter().map(|(_, e)| e).collect(), expires, updated })
    }

    /// Expiry as Unix seconds.
    pub const fn expires_unix(&self) -> i64 {
        ntp_to_unix(self.expires)
    }

    /// Last update as Unix seconds.
    pub const fn updated_unix(&self) -> i64 {
        ntp_to_unix(self.updated)
    }

    /// Whether the file has expired at `now` (Unix seconds): it can no
    /// longer tell whether a leap second is coming.
    pub const fn is_expired(&self, now: i64) -> bool {
        now >= self.expires_unix()
    }

    /// TAI − UTC at `now` (Unix seconds); `None` before the first entry
    /// (1972).
    pub fn offset_at(&self, now: i64) -> Option<i32> {
        self.entries.iter().take_while(|e| e.unix_secs() <= now).last().map(|e| e.tai_offset)
    }

    /// TAI − UTC at NTP second `ntp_secs` (since 1900, era-extended).
    pub fn offset_at_ntp(&self, ntp_secs: u64) -> Option<i32> {
        self.offset_at(ntp_to_unix(ntp_secs))
    }

    /// Every leap second in the file, oldest first.
    pub fn leaps(&self) -> impl Iterator<Item = Leap> + '_ {
        self.entries
            .windows(2)
            .map(|w| Leap { at: w[1].unix_secs(), step: if w[1].tai_offset > w[0].tai_offset { 1 } else { -1 } })
    }

    /// The first leap second strictly after `now` (Unix seconds): its
    /// instant and +1 (inserted) or −1 (deleted).
    pub fn next_leap_after(&self, now: i64) -> Option<Leap> {
        self.leaps().find(|l| l.at > now)
    }
}

fn parse_entry(data: &str, line: usize) -> Result<LeapEntry, LeapFileError> {
    let mut fields = data.split_whitespace();
    let (Some(secs), Some(offset), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(LeapFileError::Syntax { line, reason: "a data line is NTP seconds and TAI-UTC, then # comment" });
    };
    let ntp_secs = parse_secs(secs, line)?;
    let tai_offset = offset.parse().map_err(|_| LeapFileError::Syntax { line, reason: "TAI-UTC is not an integer" })?;
    Ok(LeapEntry { ntp_secs, tai_offset })
}

/// Whether Unix second `t` is 00:00:00 UTC on the 1st of a month.
fn is_first_of_month(t: i64) -> bool {
    t.rem_euclid(SECS_PER_DAY) == 0 && civil_day_of_month(t.div_euclid(SECS_PER_DAY)) == 1
}

/// Day of the month (1..=31) of `days` since 1970-01-01 (proleptic
/// Gregorian; H. Hinnant's `civil_from_days`).
fn civil_day_of_month(days: i64) -> u32 {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    (doy - (153 * mp + 2) / 5 + 1) as u32
}

/// Why [`leap_indicator`] did not simply use its inputs; the caller logs
/// each once, when it first appears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeapNote {
    /// The leap file has expired and is ignored; only the upstream's flag
    /// is used.
    FileExpired {
        /// When it expired, Unix seconds.
        expired_at: i64,
    },
    /// The valid file and the upstream disagree today; the file wins.
    UpstreamDisagrees {
        /// What the upstream announces.
        upstream: LeapIndicator,
        /// What the file says (and is served).
        file: LeapIndicator,
    },
    /// The upstream announces a leap, but today is not the last day of a
    /// month, the only days a leap second can end; not announced.
    UpstreamNotMonthEnd {
        /// What the upstream announces.
        upstream: LeapIndicator,
    },
}

impl fmt::Display for LeapNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FileExpired { expired_at } => write!(
                f,
                "the leap-second file expired at Unix time {expired_at} and is ignored; using the upstream's leap \
                 indicator only (install a current tzdata)"
            ),
            Self::UpstreamDisagrees { upstream, file } => {
                write!(
                    f,
                    "the upstream announces {upstream:?} but the leap-second file says {file:?}; serving the file's"
                )
            }
            Self::UpstreamNotMonthEnd { upstream } => {
                write!(f, "the upstream announces {upstream:?} on a day that is not the last of a month; not served")
            }
        }
    }
}

/// What to announce and, if the inputs were not used as given, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeapDecision {
    /// The leap indicator to serve (never `Unsynchronized`).
    pub indicator: LeapIndicator,
    /// Something for the caller to log once.
    pub note: Option<LeapNote>,
}

/// The leap indicator to serve at `now` (Unix seconds).
///
/// - A valid, unexpired `table` decides: a leap is announced only when
///   `now` is in the last UTC day before it ([`Leap::announced_at`]); the
///   upstream's flag is ignored (noted when it disagrees).
/// - Otherwise (no file, or an expired one, noted) the upstream's flag is
///   served, but only during the last day of a month; an announcement on
///   any other day is suppressed (noted). `Unsynchronized` from upstream
///   counts as no warning: synchronization is reported separately.
pub fn leap_indicator(now: i64, table: Option<&LeapTable>, upstream: LeapIndicator) -> LeapDecision {
    let upstream = match upstream {
        LeapIndicator::Unsynchronized => LeapIndicator::NoWarning,
        other => other,
    };
    let mut note = None;
    match table {
        Some(t) if !t.is_expired(now) => {
            let file = t
                .next_leap_after(now)
                .filter(|l| l.announced_at(now))
                .map_or(LeapIndicator::NoWarning, Leap::indicator);
            if upstream != file {
                note = Some(LeapNote::UpstreamDisagrees { upstream, file });
            }
            return LeapDecision { indicator: file, note };
        }
        Some(t) => note = Some(LeapNote::FileExpired { expired_at: t.expires_unix() }),
        None => {}
    }
    if upstream != LeapIndicator::NoWarning && !is_first_of_month(next_midnight(now)) {
        // An expired file is the more important thing to report.
        return LeapDecision {
            indicator: LeapIndicator::NoWarning,
            note: note.or(Some(LeapNote::UpstreamNotMonthEnd { upstream })),
        };
    }
    LeapDecision { indicator: upstream, note }
}

/// The next 00:00:00 UTC strictly after `now` (Unix seconds).
pub const fn next_midnight(now: i64) -> i64 {
    (now.div_euclid(SECS_PER_DAY) + 1) * SECS_PER_DAY
}

/// The leap an upstream's flag announces at `now`: at the coming midnight.
pub fn leap_from_indicator(now: i64, indicator: LeapIndicator) -> Option<Leap> {
    let step = match indicator {
        LeapIndicator::InsertSecond => 1,
        LeapIndicator::DeleteSecond => -1,
        _ => return None,
    };
    Some(Leap { at: next_midnight(now), step })
}

/// A leap smear: the served time is moved by [`smear_offset`] instead of
/// jumping at the leap. Published in the clock snapshot; the responder adds
/// [`Self::offset_at`] to the receive and transmit timestamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmearPlan {
    /// The leap being smeared.
    pub leap: Leap,
    /// Window length, seconds, centred on the leap.
    pub window: u32,
    leap_ntp: NtpTimestamp,
}

impl SmearPlan {
    /// A smear of `leap` over `window` seconds (at least 2) centred on it.
    pub fn new(leap: Leap, window: u32) -> Self {
        Self { leap, window: window.max(2), leap_ntp: NtpTimestamp::from_unix(leap.at, 0) }
    }

    /// When the smear begins and ends, Unix seconds (`[start, end)`).
    pub fn span(&self) -> (f64, f64) {
        let half = f64::from(self.window) / 2.0;
        (self.leap.at as f64 - half, self.leap.at as f64 + half)
    }

    /// The offset to add to a UTC (POSIX clock) time `now`, seconds.
    pub fn offset_at(&self, now: NtpTimestamp) -> f64 {
        smear_offset(now.diff_secs(self.leap_ntp), self.leap.step, self.window)
    }
}

/// The smear offset, seconds, to add to the system's UTC clock reading
/// (POSIX time, which repeats a second at an inserted leap) at
/// `since_leap` seconds after the leap instant `L` (negative before it),
/// for a leap of `step` (+1 inserted, −1 deleted) and a window of `W`
/// seconds centred on `L` (start `S = L − W/2`, end `E = L + W/2`):
///
/// ```text
///   t < S or t ≥ E:  0
///   S ≤ t < L:       −step · (t − S) / (W + step)
///   L ≤ t < E:       +step · (E − t) / (W + step)
/// ```
///
/// The W + step SI seconds of the window become W smeared seconds: the
/// served clock runs at the constant rate W / (W + step) (11.57 ppm slow
/// for an inserted second and W = 86400, i.e. each smeared second is
/// 1/86400 longer, Google's noon-to-noon smear), reaching −0.5 s at the leap
/// and ending exactly on UTC. It depends only on the leap and `W`, so
/// identically configured servers agree.
///
/// Limitation: during an inserted second itself the POSIX clock repeats
/// `[L − 1, L)`, and a reading there is taken as the first occurrence, so
/// that one second is served about 1 s early.
pub fn smear_offset(since_leap: f64, step: i8, window: u32) -> f64 {
    let w = f64::from(window);
    let s = f64::from(step.signum());
    let half = w / 2.0;
    if since_leap < -half || since_leap >= half {
        0.0
    } else if since_leap < 0.0 {
        -s * (since_leap + half) / (w + s)
    } else {
        s * (half - since_leap) / (w + s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_of_month() {
        assert!(is_first_of_month(0)); // 1970-01-01
        assert!(is_first_of_month(1_483_228_800)); // 2017-01-01
        assert!(is_first_of_month(951_868_800)); // 2000-03-01 (leap year)
        assert!(!is_first_of_month(951_782_400)); // 2000-02-29
        assert!(!is_first_of_month(1_483_228_801));
        assert!(!is_first_of_month(-SECS_PER_DAY)); // 1969-12-31
    }

    #[test]
    fn hash_words_may_drop_leading_zeros() {
        let h = parse_hash(" 1 2 3 4 ffffffff", 1).expect("parses");
        assert_eq!(h[..4], [0, 0, 0, 1]);
        assert_eq!(h[16..], [0xff; 4]);
        assert!(parse_hash(" 1 2 3 4", 1).is_err());
        assert!(parse_hash(" 1 2 3 4 5 6", 1).is_err());
        assert!(parse_hash(" 1 2 3 4 123456789", 1).is_err());
    }
}
