//! `leap`: the `leap-seconds.list` parser, on the text as given and with
//! its `#h` hash line recomputed (so the checks after the hash are reached),
//! and the table's queries.

use std::fmt::Write as _;

use chime_proto::leap::{LeapFileError, LeapTable, leap_indicator};
use chime_proto::packet::LeapIndicator;
use sha1::{Digest, Sha1};

/// Parses `data` as a leap-seconds file, then again with a correct hash.
pub fn leap(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(table) = LeapTable::parse(text) {
        check_table(&table);
    }
    let rehashed = with_hash(text);
    match LeapTable::parse(&rehashed) {
        Ok(table) => check_table(&table),
        Err(LeapFileError::HashMismatch { .. }) => panic!("recomputed hash refused:\n{rehashed}"),
        Err(_) => {}
    }
}

/// `text` without its `#h` lines and with one holding the SHA-1 the file
/// format defines: the digits of the `#$` and `#@` values and of the data
/// lines, in file order.
fn with_hash(text: &str) -> String {
    let mut hasher = Sha1::new();
    let mut out = String::with_capacity(text.len() + 64);
    for raw in text.lines() {
        if raw.starts_with("#h") {
            continue;
        }
        let digits = if let Some(rest) = raw.strip_prefix("#$").or_else(|| raw.strip_prefix("#@")) {
            rest
        } else if raw.starts_with('#') {
            ""
        } else {
            raw.split_once('#').map_or(raw, |(data, _)| data)
        };
        hasher.update(digits.bytes().filter(u8::is_ascii_digit).collect::<Vec<u8>>());
        out.push_str(raw);
        out.push('\n');
    }
    out.push_str(&hash_line(hasher));
    out
}

fn hash_line(hasher: Sha1) -> String {
    let digest: [u8; 20] = hasher.finalize().into();
    let mut line = String::from("#h");
    for word in digest.chunks_exact(4) {
        let _ = write!(line, " {:08x}", u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
    }
    line.push('\n');
    line
}

/// A parsed table: ordered one-second steps, consistent queries, and a file
/// written from it parses back to it.
fn check_table(table: &LeapTable) {
    assert!(!table.entries.is_empty());
    for pair in table.entries.windows(2) {
        assert!(pair[1].ntp_secs > pair[0].ntp_secs);
        assert_eq!((i64::from(pair[1].tai_offset) - i64::from(pair[0].tai_offset)).abs(), 1);
    }
    for (i, e) in table.entries.iter().enumerate() {
        let at = e.unix_secs();
        let before = |secs: i64| at.saturating_sub(secs);
        assert_eq!(table.offset_at(at), Some(e.tai_offset), "offset at entry {i}");
        assert_eq!(table.offset_at_ntp(e.ntp_secs), Some(e.tai_offset));
        if i > 0 {
            assert_eq!(table.offset_at(before(1)), Some(table.entries[i - 1].tai_offset));
            let leap = table.next_leap_after(before(1)).unwrap_or_else(|| panic!("no leap at entry {i}"));
            assert_eq!(leap.at, at);
            // The day before the leap announces it (while the file is valid).
            let decision = leap_indicator(before(10), Some(table), LeapIndicator::NoWarning);
            if !table.is_expired(before(10)) {
                assert_eq!(decision.indicator, leap.indicator(), "{decision:?}");
            }
        }
    }
    assert_eq!(table.leaps().count(), table.entries.len() - 1);
    let written = write_file(table);
    match LeapTable::parse(&written) {
        Ok(back) => assert_eq!(&back, table, "written table reads back differently"),
        Err(e) => panic!("a written table does not parse: {e}\n{written}"),
    }
}

fn write_file(table: &LeapTable) -> String {
    let mut hasher = Sha1::new();
    let mut out = String::new();
    let mut line = |out: &mut String, prefix: &str, body: String| {
        hasher.update(body.bytes().filter(u8::is_ascii_digit).collect::<Vec<u8>>());
        let _ = writeln!(out, "{prefix}{body}");
    };
    line(&mut out, "#$\t", table.updated.to_string());
    line(&mut out, "#@\t", table.expires.to_string());
    for e in &table.entries {
        line(&mut out, "", format!("{}\t{}", e.ntp_secs, e.tai_offset));
    }
    out.push_str(&hash_line(hasher));
    out
}
