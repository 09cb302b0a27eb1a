//! The leap-second file parser over files in the real format, the leap
//! indicator across an event, and the smear's properties.

use chime_proto::NtpTimestamp;
use chime_proto::leap::{
    Leap, LeapFileError, LeapNote, LeapTable, SECS_PER_DAY, SmearPlan, leap_indicator, smear_offset,
};
use chime_proto::packet::LeapIndicator;
use chime_proto::time::NTP_UNIX_OFFSET_SECS;
use sha1::{Digest, Sha1};

/// The IERS file as shipped by Debian's tzdata 2025b.
const REAL: &str = include_str!("data/leap-seconds.list");

/// 2017-01-01 00:00:00 UTC, the last leap second so far (inserted).
const LEAP_2017: i64 = 1_483_228_800;
/// 2027-01-01 00:00:00 UTC, a made-up future leap.
const L: i64 = 1_798_761_600;
/// 2027-06-30 00:00:00 UTC, the start of the last day of a month.
const JUNE_30: i64 = 1_814_313_600;

/// A file in the real format with a correct hash.
fn synthetic(updated_unix: i64, expires_unix: i64, entries: &[(i64, i32)]) -> String {
    let ntp = |u: i64| (u + NTP_UNIX_OFFSET_SECS) as u64;
    let mut digits = format!("{}{}", ntp(updated_unix), ntp(expires_unix));
    let mut text = format!("# a comment\n#\n#$\t{}\n#\n#@\t{}\n#\n", ntp(updated_unix), ntp(expires_unix));
    for &(at, offset) in entries {
        text += &format!("{}\t{offset}\t# comment 1 Jan 2027\n", ntp(at));
        digits += &format!("{}{offset}", ntp(at));
    }
    let hash = Sha1::digest(digits.as_bytes());
    let words: Vec<String> =
        hash.chunks(4).map(|c| format!("{:x}", u32::from_be_bytes(c.try_into().unwrap()))).collect();
    text + "#\n#h\t" + &words.join(" ") + "\n"
}

/// A valid table with a leap second inserted at `L`, expiring a year later.
fn future_table(step: i32) -> LeapTable {
    let text = synthetic(L - 200 * SECS_PER_DAY, L + 365 * SECS_PER_DAY, &[(LEAP_2017, 37), (L, 37 + step)]);
    LeapTable::parse(&text).expect("synthetic file parses")
}

#[test]
fn real_file_parses() {
    let t = LeapTable::parse(REAL).expect("the tzdata file parses and its hash matches");
    assert_eq!(t.entries.len(), 28);
    assert_eq!((t.entries[0].ntp_secs, t.entries[0].tai_offset), (2_272_060_800, 10));
    assert_eq!((t.entries[27].ntp_secs, t.entries[27].tai_offset), (3_692_217_600, 37));
    assert_eq!(t.updated, 3_960_835_200);
    assert_eq!(t.expires, 3_991_593_600);
    assert_eq!(t.expires_unix(), 1_782_604_800); // 2026-06-28
    assert_eq!(t.offset_at(LEAP_2017 - 1), Some(36));
    assert_eq!(t.offset_at(LEAP_2017), Some(37));
    assert_eq!(t.offset_at(63_072_000 - 1), None); // before 1972
    assert_eq!(t.offset_at_ntp(3_692_217_600), Some(37));
    assert_eq!(t.next_leap_after(LEAP_2017 - SECS_PER_DAY), Some(Leap { at: LEAP_2017, step: 1 }));
    assert_eq!(t.next_leap_after(LEAP_2017), None);
    assert_eq!(t.leaps().count(), 27);
    assert!(t.leaps().all(|l| l.step == 1));
    assert!(!t.is_expired(t.expires_unix() - 1));
    assert!(t.is_expired(t.expires_unix()));
}

#[test]
fn one_changed_digit_is_a_hash_error() {
    for (from, to) in [("3692217600      37", "3692217600      38"), ("#@\t3991593600", "#@\t3991593601")] {
        assert!(REAL.contains(from));
        let changed = REAL.replacen(from, to, 1);
        match LeapTable::parse(&changed) {
            Err(e @ LeapFileError::HashMismatch { .. }) => {
                assert!(e.to_string().contains("49db2447571e5e1b2f002a539c8da8e439b8e49e"), "{e}")
            }
            other => panic!("{from} -> {to}: {other:?}"),
        }
    }
    // Comments are not hashed.
    let changed = REAL.replacen("# 1 Jan 2017", "# first of January 2017", 1);
    assert!(LeapTable::parse(&changed).is_ok());
    let changed = REAL.replacen("49db2447", "49db2448", 1);
    assert!(matches!(LeapTable::parse(&changed), Err(LeapFileError::HashMismatch { .. })));
}

#[test]
fn malformed_files() {
    let line_of = |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let cases = [
        ("2272060800      10      # 1 Jan 1972", "2272060800      10  11  # 1 Jan 1972"),
        ("2272060800      10      # 1 Jan 1972", "2272060800      ten     # 1 Jan 1972"),
        ("2272060800      10      # 1 Jan 1972", "22720608x0      10      # 1 Jan 1972"),
        // Found by the leap fuzz target: beyond i64 the Unix conversion overflowed.
        ("2272060800      10      # 1 Jan 1972", "9223372036854775808 10  # 1 Jan 1972"),
        ("#@\t3991593600", "#@\t18446744073709551615"),
        ("#@\t3991593600", "#@\tsoon"),
        ("#h\t49db2447", "#h\t49db2447 zz"),
    ];
    for (from, to) in cases {
        let bad = REAL.replacen(from, to, 1);
        let line = line_of(&bad, to);
        match LeapTable::parse(&bad) {
            Err(LeapFileError::Syntax { line: l, .. }) => assert_eq!(l, line, "{to}"),
            other => panic!("{to}: {other:?}"),
        }
    }
    // Semantic errors in a file whose hash matches.
    let file = |entries: &[(i64, i32)]| LeapTable::parse(&synthetic(L - SECS_PER_DAY, L, entries));
    // The first data line is line 7 of a synthetic file.
    assert_eq!(file(&[(L, 10), (LEAP_2017, 11)]), Err(LeapFileError::NotIncreasing { line: 8 }));
    assert_eq!(file(&[(LEAP_2017, 10), (LEAP_2017, 11)]), Err(LeapFileError::NotIncreasing { line: 8 }));
    assert_eq!(file(&[(LEAP_2017, 36), (L, 38)]), Err(LeapFileError::NotALeap { line: 8 }), "two seconds");
    assert_eq!(file(&[(LEAP_2017, 36), (L, 36)]), Err(LeapFileError::NotALeap { line: 8 }), "no change");
    let mid_month = L + 14 * SECS_PER_DAY;
    assert_eq!(file(&[(LEAP_2017, 36), (mid_month, 37)]), Err(LeapFileError::NotALeap { line: 8 }));
    assert_eq!(file(&[(LEAP_2017, 36), (L + 1, 37)]), Err(LeapFileError::NotALeap { line: 8 }));
    assert!(file(&[(LEAP_2017, 36), (L, 37)]).is_ok());
    // Required lines.
    let no_hash: String = REAL.lines().filter(|l| !l.starts_with("#h")).map(|l| format!("{l}\n")).collect();
    assert!(matches!(LeapTable::parse(&no_hash), Err(LeapFileError::Missing(_))));
    let no_expiry: String = REAL.lines().filter(|l| !l.starts_with("#@")).map(|l| format!("{l}\n")).collect();
    assert!(matches!(LeapTable::parse(&no_expiry), Err(LeapFileError::Missing(_))));
    let twice = REAL.replacen("#@", "#@\t3991593600\n#@", 1);
    assert!(matches!(LeapTable::parse(&twice), Err(LeapFileError::Syntax { .. })));
    assert!(matches!(LeapTable::parse(""), Err(LeapFileError::Missing(_))));
}

#[test]
fn synthetic_files_round_trip() {
    let t = future_table(1);
    assert_eq!(t.next_leap_after(L - 1), Some(Leap { at: L, step: 1 }));
    let t = future_table(-1);
    assert_eq!(t.next_leap_after(L - 1), Some(Leap { at: L, step: -1 }));
    assert_eq!(t.offset_at(L), Some(36));
}

#[test]
fn indicator_timeline_from_the_file() {
    let t = future_table(1);
    let li = |now: i64| leap_indicator(now, Some(&t), LeapIndicator::NoWarning).indicator;
    assert_eq!(li(L - 40 * SECS_PER_DAY), LeapIndicator::NoWarning, "wrong month");
    assert_eq!(li(L - SECS_PER_DAY - 1), LeapIndicator::NoWarning, "the day before the last day");
    assert_eq!(li(L - SECS_PER_DAY), LeapIndicator::InsertSecond, "00:00:00 of the last day");
    assert_eq!(li(L - 43_200), LeapIndicator::InsertSecond);
    assert_eq!(li(L - 1), LeapIndicator::InsertSecond, "the last second (and the leap second, which repeats it)");
    assert_eq!(li(L), LeapIndicator::NoWarning, "after");
    assert_eq!(li(L + 1), LeapIndicator::NoWarning);
    let t = future_table(-1);
    assert_eq!(leap_indicator(L - 1, Some(&t), LeapIndicator::NoWarning).indicator, LeapIndicator::DeleteSecond);
}

#[test]
fn the_valid_file_wins_over_the_upstream() {
    let t = future_table(1);
    // The upstream misses the leap.
    let d = leap_indicator(L - 10, Some(&t), LeapIndicator::NoWarning);
    assert_eq!(d.indicator, LeapIndicator::InsertSecond);
    assert_eq!(
        d.note,
        Some(LeapNote::UpstreamDisagrees { upstream: LeapIndicator::NoWarning, file: LeapIndicator::InsertSecond })
    );
    // The upstream announces one the file does not know.
    let d = leap_indicator(JUNE_30, Some(&t), LeapIndicator::InsertSecond);
    assert_eq!(d.indicator, LeapIndicator::NoWarning);
    assert!(matches!(d.note, Some(LeapNote::UpstreamDisagrees { .. })));
    // Agreement, or an unsynchronized upstream: nothing to note.
    assert_eq!(leap_indicator(L - 10, Some(&t), LeapIndicator::InsertSecond).note, None);
    assert_eq!(leap_indicator(L + 10, Some(&t), LeapIndicator::Unsynchronized).note, None);
}

#[test]
fn an_expired_file_is_ignored() {
    let t = LeapTable::parse(REAL).unwrap();
    let after = t.expires_unix() + 1;
    // 2026-06-30 is the last day of June and after the expiry.
    let june_30_2026 = 1_782_777_600;
    assert!(june_30_2026 > after);
    let d = leap_indicator(june_30_2026, Some(&t), LeapIndicator::InsertSecond);
    assert_eq!(d.indicator, LeapIndicator::InsertSecond, "the upstream's flag is used");
    assert_eq!(d.note, Some(LeapNote::FileExpired { expired_at: t.expires_unix() }));
    let d = leap_indicator(after, Some(&t), LeapIndicator::NoWarning);
    assert_eq!(d.indicator, LeapIndicator::NoWarning);
    assert!(matches!(d.note, Some(LeapNote::FileExpired { .. })));
    // Before the expiry the same file is used.
    assert_eq!(leap_indicator(t.expires_unix() - 1, Some(&t), LeapIndicator::NoWarning).note, None);
}

#[test]
fn upstream_only_on_the_last_day_of_a_month() {
    let up = |now: i64| leap_indicator(now, None, LeapIndicator::InsertSecond);
    assert_eq!(up(JUNE_30).indicator, LeapIndicator::InsertSecond);
    assert_eq!(up(JUNE_30 + SECS_PER_DAY - 1).indicator, LeapIndicator::InsertSecond);
    assert_eq!(up(JUNE_30).note, None);
    let early = up(JUNE_30 - 1);
    assert_eq!(early.indicator, LeapIndicator::NoWarning);
    assert_eq!(early.note, Some(LeapNote::UpstreamNotMonthEnd { upstream: LeapIndicator::InsertSecond }));
    assert_eq!(leap_indicator(JUNE_30, None, LeapIndicator::DeleteSecond).indicator, LeapIndicator::DeleteSecond);
    assert_eq!(leap_indicator(JUNE_30, None, LeapIndicator::Unsynchronized).indicator, LeapIndicator::NoWarning);
}

/// The served time of a smeared server, as a function of true elapsed time
/// `tau` (SI seconds) since the smear began, for a POSIX clock that
/// repeats (inserted) or skips (deleted) one second at the leap. `None`
/// during an inserted second, whose POSIX reading is ambiguous.
fn served(plan: &SmearPlan, tau: f64) -> Option<f64> {
    let start = plan.leap.at as f64 - f64::from(plan.window) / 2.0;
    let real = start + tau;
    let leap = plan.leap.at as f64;
    let posix = match plan.leap.step {
        1 if real < leap => real,
        1 if real < leap + 1.0 => return None,
        1 => real - 1.0,
        _ if real < leap - 1.0 => real,
        _ => real + 1.0,
    };
    let secs = posix.floor();
    let t = NtpTimestamp::from_unix(secs as i64, ((posix - secs) * 1e9) as u32);
    Some(posix + plan.offset_at(t))
}

#[test]
fn smear_is_continuous_monotonic_and_totals_one_second() {
    for step in [1i8, -1] {
        for window in [86_400u32, 7200] {
            let plan = SmearPlan::new(Leap { at: L, step }, window);
            let w = f64::from(window);
            let real_len = w + f64::from(step);
            let rate = w / real_len;
            let dt = 0.25;
            let mut prev: Option<(f64, f64)> = None;
            let mut tau = -100.0;
            while tau < real_len + 100.0 {
                if let Some(s) = served(&plan, tau) {
                    if let Some((ptau, ps)) = prev {
                        let expect = if (0.0..real_len).contains(&tau) && (0.0..real_len).contains(&ptau) {
                            rate * (tau - ptau)
                        } else {
                            tau - ptau
                        };
                        assert!(s > ps, "monotonic: step {step} window {window} tau {tau}");
                        // Continuity: no jump beyond the rate change at the edges.
                        assert!(
                            (s - ps - expect).abs() < 2e-4,
                            "step {step} window {window} tau {tau}: {} vs {expect}",
                            s - ps
                        );
                    }
                    prev = Some((tau, s));
                }
                tau += dt;
            }
            // Total: the window's W + step SI seconds are served as W seconds.
            let start = L as f64 - w / 2.0;
            let begin = served(&plan, 0.0).unwrap();
            let end = served(&plan, real_len).unwrap();
            assert!((begin - start).abs() < 1e-6);
            assert!((end - (start + w)).abs() < 1e-5, "ends on UTC");
            assert!(((real_len - (end - begin)) - f64::from(step)).abs() < 1e-5, "total smear is one second");
        }
    }
}

#[test]
fn smear_offset_values() {
    let w = 86_400;
    assert_eq!(smear_offset(-43_200.5, 1, w), 0.0);
    assert_eq!(smear_offset(-43_200.0, 1, w), 0.0);
    assert!((smear_offset(-1e-9, 1, w) + 0.5).abs() < 1e-5, "half a second behind just before the leap");
    assert!((smear_offset(0.0, 1, w) - 0.5).abs() < 1e-5, "half a second ahead once the clock stepped back");
    assert_eq!(smear_offset(43_200.0, 1, w), 0.0);
    assert!(smear_offset(-21_600.0, 1, w) < 0.0 && smear_offset(-21_600.0, -1, w) > 0.0);
    // Same inputs, same output: identically configured servers agree.
    let a = SmearPlan::new(Leap { at: L, step: 1 }, w);
    let b = SmearPlan::new(Leap { at: L, step: 1 }, w);
    let t = NtpTimestamp::from_unix(L - 1000, 123_456_789);
    assert_eq!(a.offset_at(t).to_bits(), b.offset_at(t).to_bits());
    assert_eq!(a.span(), ((L - 43_200) as f64, (L + 43_200) as f64));
}

#[test]
fn responder_serves_smeared_receive_and_transmit_times() {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use chime_proto::acl::Acl;
    use chime_proto::packet::{Header, RefId};
    use chime_proto::ratelimit::RateLimitConfig;
    use chime_proto::{
        Action, ClockSnapshot, Context, RequestMeta, Responder, ResponderConfig, RxTimestamp, StampKind,
    };

    let plan = SmearPlan::new(Leap { at: L, step: 1 }, 86_400);
    let rx = NtpTimestamp::from_unix(L - 21_600, 0); // 18:00, a quarter into the smear
    let tx = rx.add_secs(0.000_01);
    let mut clock = ClockSnapshot {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 1,
        reference_id: RefId(*b"GPS\0"),
        reference_time: rx,
        root_delay: 0.0,
        root_dispersion: 0.001,
        precision: -23,
        updated_at: rx,
        smear: None,
    };
    let rate_limit = RateLimitConfig { enabled: false, ..RateLimitConfig::default() };
    let mut responder = Responder::new(ResponderConfig { rate_limit, ..ResponderConfig::default() }, 1);
    let acl = Acl::default();
    let mut req = [0u8; 48];
    req[0] = (4 << 3) | 3;
    let meta = RequestMeta {
        source: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 40123),
        rx: RxTimestamp { time: rx, kind: StampKind::KernelSoftware },
    };
    let mut reply = |clock: &ClockSnapshot| {
        let ctx = Context { clock, acl: &acl, nts: None };
        let mut out = [0u8; 48];
        match responder.handle(&req, &meta, &ctx, &mut || tx, &mut out) {
            Action::Reply(b) => Header::parse(b).expect("reply parses"),
            Action::Drop(r) => panic!("dropped: {r:?}"),
        }
    };
    let plain = reply(&clock);
    assert_eq!((plain.receive_ts, plain.transmit_ts), (rx, tx));
    clock.smear = Some(plan);
    let smeared = reply(&clock);
    let expect = -21_600.0 / 86_401.0;
    assert!((smeared.receive_ts.diff_secs(rx) - expect).abs() < 1e-6);
    assert!((smeared.transmit_ts.diff_secs(tx) - expect).abs() < 1e-6);
    assert_eq!(smeared.origin_ts, plain.origin_ts);
}
