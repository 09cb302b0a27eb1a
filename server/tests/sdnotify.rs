//! chimed under systemd's notification protocol, without systemd: the test
//! binds the notification socket itself (an abstract one, so the user chimed
//! switches to when started as root can send to it) and passes
//! `NOTIFY_SOCKET`/`WATCHDOG_USEC` to the child only.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A notification socket of the test's own and the messages it received.
struct Manager {
    socket: UnixDatagram,
    name: String,
    seen: Vec<String>,
}

impl Manager {
    fn new(tag: &str) -> Self {
        let name = format!("chime-test-notify-{tag}-{}", std::process::id());
        let socket = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        Self { socket, name: format!("@{name}"), seen: Vec::new() }
    }

    /// Waits (bounded) for a message containing `what`; returns it.
    fn expect(&mut self, what: &str, within: Duration, chimed: &Child, log: &std::path::Path) -> String {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what:?} within {within:?} (pid {}); got {:?}\nstderr:\n{}",
                chimed.id(),
                self.seen,
                std::fs::read_to_string(log).unwrap_or_default()
            );
            self.socket.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.contains(what) {
                    return msg;
                }
            }
        }
    }

    /// Messages containing `what` within `window`.
    fn count(&mut self, what: &str, window: Duration) -> usize {
        let deadline = Instant::now() + window;
        let mut buf = [0u8; 4096];
        let mut n_seen = 0;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            self.socket.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                n_seen += usize::from(msg.contains(what));
                self.seen.push(msg);
            }
        }
        n_seen
    }
}

/// chimed on a free loopback port with the notification environment `env`.
fn spawn(env: &[(&str, &str)]) -> (Child, SocketAddr, std::path::PathBuf) {
    let dir = scratch_dir("sdnotify");
    let log = dir.join("stderr.log");
    let ntp: SocketAddr = (Ipv4Addr::LOCALHOST, free_udp_port()).into();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chimed"));
    cmd.args(["--listen", &ntp.to_string(), "--no-metrics", "--workers", "2", "--local-stratum", "10"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    (cmd.spawn().unwrap(), ntp, log)
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

/// Waits (bounded) for the child to exit; kills it if it does not.
fn wait_exit(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Kills the child if the test fails half-way.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn ready_watchdog_reload_and_stop() {
    let mut m = Manager::new("main");
    let name = m.name.clone();
    // Ping period 250 ms.
    let (child, ntp, log) = spawn(&[("NOTIFY_SOCKET", &name), ("WATCHDOG_USEC", "500000")]);
    let mut child = Reap(child);
    let ready = m.expect("READY=1", Duration::from_secs(20), &child.0, &log);
    assert!(ready.contains("STATUS=serving: socket backend, 2 workers"), "{ready}");
    // READY comes after the workers serve.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(query(&sock, ntp, &client_request(now_bits()), Duration::from_secs(2)).is_some());
    assert!(m.count("WATCHDOG=1", Duration::from_millis(1200)) >= 3, "{:?}", m.seen);

    signal(&child.0, "-HUP");
    let reloading = m.expect("RELOADING=1", Duration::from_secs(5), &child.0, &log);
    let usec: u64 = reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).unwrap().parse().unwrap();
    assert!(usec > 0);
    m.expect("READY=1", Duration::from_secs(5), &child.0, &log);

    signal(&child.0, "-TERM");
    m.expect("STOPPING=1", Duration::from_secs(5), &child.0, &log);
    let status = wait_exit(&mut child.0).expect("chimed exits after SIGTERM");
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(log.parent().unwrap());
}

#[test]
fn watchdog_for_another_process_is_not_pinged() {
    let mut m = Manager::new("otherpid");
    let name = m.name.clone();
    let (child, _, log) = spawn(&[("NOTIFY_SOCKET", &name), ("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "1")]);
    let mut child = Reap(child);
    m.expect("READY=1", Duration::from_secs(20), &child.0, &log);
    assert_eq!(m.count("WATCHDOG=1", Duration::from_millis(600)), 0, "{:?}", m.seen);
    signal(&child.0, "-TERM");
    assert!(wait_exit(&mut child.0).is_some_and(|s| s.success()));
    let _ = std::fs::remove_dir_all(log.parent().unwrap());
}

#[test]
fn a_start_up_failure_is_reported_in_the_status() {
    let mut m = Manager::new("fail");
    let name = m.name.clone();
    let dir = scratch_dir("sdnotify-fail");
    let log = dir.join("stderr.log");
    // Two servers on one port: the second cannot bind.
    let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_chimed"))
        .args(["--listen", &taken, "--no-metrics", "--workers", "1", "--local-stratum", "10"])
        .env("NOTIFY_SOCKET", &name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = Reap(child);
    let msg = m.expect("STATUS=failed: ", Duration::from_secs(20), &child.0, &log);
    assert!(!msg.contains("READY=1"), "{msg}");
    assert!(wait_exit(&mut child.0).is_some_and(|s| !s.success()));
    let _ = std::fs::remove_dir_all(dir);
}
