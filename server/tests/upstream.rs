//! chimed with `--upstream-source chrony` against a fake chronyd on
//! loopback: mirrors it (stratum + 1, its leap), degrades to leap 3 /
//! stratum 16 after max_unsync_secs once it is gone, and `chimed status`
//! follows (exit 0, 1, then 2 when chimed is gone).

mod common;

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use chime_proto::packet::{LeapIndicator, RefId};
use chime_server::upstream::fake::{FakeChronyd, FakeNtp};
use common::{Chimed, client_request, header, now_bits, query, scratch_dir};

fn status(metrics: std::net::SocketAddr) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chimed"))
        .args(["status", "--metrics", &metrics.to_string()])
        .output()
        .expect("run chimed status");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn chrony_upstream_lost_and_status() {
    let fake = FakeChronyd::start(FakeNtp {
        leap: LeapIndicator::InsertSecond,
        stratum: 2,
        reference_id: RefId([192, 0, 2, 44]),
        ..FakeNtp::default()
    });
    let dir = scratch_dir("upstream");
    let conf = dir.join("chimed.toml");
    std::fs::write(
        &conf,
        format!(
            "[upstream]\nchrony_address = \"{}\"\nmax_unsync_secs = 2.0\nupdate_interval = 0.2\n[rate_limit]\nenabled = false\n",
            fake.addr()
        ),
    )
    .unwrap();
    let conf = conf.to_string_lossy().into_owned();
    let mut chimed = Chimed::start(&["-c", &conf, "--upstream-source", "chrony", "--user", "root"]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let ask = || {
        let reply = query(&sock, chimed.ntp, &client_request(now_bits()), Duration::from_secs(1)).expect("reply");
        header(&reply)
    };
    let h = ask();
    assert_eq!(h.stratum, 3, "fake stratum + 1");
    // The upstream's leap flag is passed on only on the last day of a month
    // (chime_proto::leap::leap_indicator); on any other day it is withheld.
    let unix_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let expected = chime_proto::leap::leap_indicator(unix_now, None, LeapIndicator::InsertSecond).indicator;
    assert_eq!(h.leap, expected);
    assert_eq!(h.reference_id, RefId([192, 0, 2, 44]));
    let metrics = chimed.metrics.unwrap();
    let (code, text) = status(metrics);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("chrony, up"), "{text}");

    drop(fake);
    // Holdover first (still synchronized), then leap 3 / stratum 16.
    let start = Instant::now();
    loop {
        let h = ask();
        if h.leap == LeapIndicator::Unsynchronized {
            assert_eq!(h.stratum, 16);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still synchronized after 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(start.elapsed() >= Duration::from_millis(1500), "holdover too short: {:?}", start.elapsed());
    let (code, text) = status(metrics);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("UNSYNCHRONIZED") && text.contains("LOST"), "{text}");

    chimed.terminate();
    let (code, _) = status(metrics);
    assert_eq!(code, 2);
    let _ = std::fs::remove_dir_all(&dir);
}
