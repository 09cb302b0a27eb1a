//! Observability against the real chimed: `chimed status` names the source
//! prefix a burst was rate-limited from; every metric the Grafana dashboard
//! (`ops/grafana/chime.json`) and the Prometheus rules
//! (`ops/prometheus/*.yml`) use is in the endpoint's output, with the label
//! values they select; and the rules pass `promtool check rules` and
//! `promtool test rules` where promtool is installed.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn status(metrics: SocketAddr) -> (i32, String) {
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_chimed")).args(["status", "--metrics", &metrics.to_string()]),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn status_lists_the_rate_limited_prefix_of_a_burst() {
    // Default rate limit: a burst of 16, then one request per 2 s.
    let chimed = Chimed::start(&["--local-stratum", "10"]);
    let metrics = chimed.metrics.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let mut buf = [0u8; 128];
    for i in 0..200 {
        sock.send_to(&client_request(now_bits() + i), chimed.ntp).unwrap();
        // Keep the socket's receive queue short; replies do not matter.
        while sock.recv_from(&mut buf).is_ok() {}
    }
    // Workers publish about once a second: wait (bounded) until it shows.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = http_get(metrics, "/ratelimit");
        if text.contains("\n127.0.0.0/24 ") {
            break;
        }
        assert!(Instant::now() < deadline, "/ratelimit never listed 127.0.0.0/24:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, text) = status(metrics);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("rate-limited prefixes (last "), "{text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("127.0.0.0/24 ")), "{text}");
    assert!(text.contains("backend:    socket, 2 workers"), "{text}");
    assert!(text.contains("rate_limited "), "{text}");
    assert!(text.contains("serving:    yes"), "{text}");
}
