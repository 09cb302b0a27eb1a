//! systemd's service notifications (`sd_notify(3)`), written here: one
//! datagram of `KEY=VALUE` lines to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading
//! `@`). Outside systemd (`$NOTIFY_SOCKET` unset) nothing is sent.
//!
//! chimed sends (see `run.rs`):
//! - `READY=1` once the workers serve and privileges are dropped, with a
//!   `STATUS=` line saying what runs (the unit is `Type=notify`, so
//!   `systemctl start` returns only then, and units ordered after chimed
//!   start only then);
//! - `RELOADING=1` (with `MONOTONIC_USEC`, as `Type=notify-reload` in
//!   systemd 253+ wants) when SIGHUP arrives, then `READY=1` when the reload
//!   is done;
//! - `STOPPING=1` on SIGTERM/SIGINT;
//! - `WATCHDOG=1` every half of `$WATCHDOG_USEC` (the unit's
//!   `WatchdogSec=`), but only while every worker and the control thread keep
//!   making progress (their heartbeats are young, see [`Watchdog`]): a stuck
//!   worker stops the pings, and
//!   systemd kills and restarts chimed when `WatchdogSec` passes without one.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// The environment variable naming systemd's notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The environment variable with the watchdog timeout, microseconds.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The environment variable naming the process the watchdog is for.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// Longest a notification may block the caller (systemd reads its socket
/// promptly; a stuck manager must not stall chimed's main loop).
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A thread counts as stuck when its heartbeat is this old, or as old as
/// the ping period if that is longer. Workers beat at least every 100 ms
/// and the control thread every 100 ms between ticks, so this leaves room
/// for a slow upstream read or key file write.
pub const MIN_STALL: Duration = Duration::from_secs(5);

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    target: OsString,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for; `Ok(None)` when it is unset
    /// or empty (not started by systemd, or `Type=` is not `notify`).
    pub fn from_env() -> io::Result<Option<Self>> {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(target) if !target.is_empty() => Self::connect(&target).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier sending to `target`: an absolute path, or `@name` for the
    /// abstract socket `name`.
    pub fn connect(target: &OsStr) -> io::Result<Self> {
        let bytes = target.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
            Some(b'/') => SocketAddr::from_pathname(target)?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{NOTIFY_SOCKET}={target:?}: neither an absolute path nor an @abstract name"),
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Self { socket, addr, target: target.to_owned() })
    }

    /// Sends `state`: newline-separated `KEY=VALUE` assignments such as
    /// `"READY=1\nSTATUS=serving"`.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        if sent != state.len() {
            return Err(io::Error::other(format!("sent {sent} of {} bytes", state.len())));
        }
        Ok(())
    }

    /// The socket's name as `$NOTIFY_SOCKET` gave it.
    pub fn target(&self) -> &OsStr {
        &self.target
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC` stamp systemd 253+ expects.
pub fn reloading_message() -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={}", crate::sys::clock::monotonic_usec())
}

/// Text for a `STATUS=` line: one line, no control characters.
pub fn status_line(text: &str) -> String {
    let clean: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    format!("STATUS={clean}")
}

/// How often to ping the watchdog, from `$WATCHDOG_USEC` and
/// `$WATCHDOG_PID` as [`sd_watchdog_enabled(3)`] reads them: half the
/// timeout, or `None` when the watchdog is off, the value does not parse,
/// or it is meant for another process than `own_pid`.
///
/// [`sd_watchdog_enabled(3)`]: https://www.freedesktop.org/software/systemd/man/sd_watchdog_enabled.html
pub fn watchdog_period(usec: Option<&OsStr>, pid: Option<&OsStr>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.to_str()?.parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        let pid: u32 = pid.to_str()?.parse().ok()?;
        if pid != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec) / 2)
}

/// [`watchdog_period`] from this process's environment.
pub fn watchdog_period_from_env() -> Option<Duration> {
    watchdog_period(
        std::env::var_os(WATCHDOG_USEC).as_deref(),
        std::env::var_os(WATCHDOG_PID).as_deref(),
        std::process::id(),
    )
}

/// What the main loop should do after [`Watchdog::tick`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchdogAction {
    /// Nothing yet.
    Wait,
    /// Send `WATCHDOG=1`: everything made progress.
    Ping,
    /// Everything made progress again after a stall: send `WATCHDOG=1` and
    /// say so.
    Recovered,
    /// A ping is due but these heartbeats (indices into the slice given to
    /// [`Watchdog::tick`]) are too old: no ping. Returned once per stall,
    /// when the first ping is withheld.
    Withheld(Vec<usize>),
}

/// Decides when a watchdog ping is deserved.
///
/// The caller passes the ages of the heartbeats of every thread that must
/// make progress (each worker, the control thread; see
/// [`crate::stats::Heartbeat`]); one older than [`Watchdog::stall_after`]
/// marks its thread stuck, and no ping is sent while any is.
#[derive(Debug)]
pub struct Watchdog {
    period: Duration,
    stall_after: Duration,
    next_ping: Instant,
    withholding: bool,
}

impl Watchdog {
    /// A watchdog pinging every `period`; the first ping is due at `now`
    /// (right after `READY=1`).
    pub fn new(period: Duration, now: Instant) -> Self {
        Self { period, stall_after: period.max(MIN_STALL), next_ping: now, withholding: false }
    }

    /// How old a heartbeat may be before its thread counts as stuck.
    pub fn stall_after(&self) -> Duration {
        self.stall_after
    }

    /// The ping period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Looks at the heartbeat `ages` at `now` and says whether to ping.
    pub fn tick(&mut self, ages: &[Duration], now: Instant) -> WatchdogAction {
        if now < self.next_ping {
            return WatchdogAction::Wait;
        }
        let stalled: Vec<usize> =
            ages.iter().enumerate().filter(|(_, a)| **a >= self.stall_after).map(|(i, _)| i).collect();
        if stalled.is_empty() {
            self.next_ping = now + self.period;
            if std::mem::replace(&mut self.withholding, false) {
                WatchdogAction::Recovered
            } else {
                WatchdogAction::Ping
            }
        } else if self.withholding {
            // Look again soon: a recovery should ping at once.
            WatchdogAction::Wait
        } else {
            self.withholding = true;
            WatchdogAction::Withheld(stalled)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("chime-sdnotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::connect(path.as_os_str()).unwrap();
        n.notify("READY=1\nSTATUS=serving").unwrap();
        assert_eq!(recv(&server), "READY=1\nSTATUS=serving");
        assert_eq!(n.target(), path.as_os_str());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("chime-sdnotify-test-{}-{:?}", std::process::id(), std::thread::current().id());
        let server = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::connect(OsStr::new(&format!("@{name}"))).unwrap();
        n.notify("WATCHDOG=1").unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
        n.notify(&reloading_message()).unwrap();
        let msg = recv(&server);
        let usec: u64 = msg.strip_prefix("RELOADING=1\nMONOTONIC_USEC=").unwrap().parse().unwrap();
        assert!(usec > 0);
    }

    #[test]
    fn bad_targets() {
        let e = Notifier::connect(OsStr::new("relative/path")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(Notifier::connect(OsStr::new("")).is_err());
        // Nobody listening: sending fails, it does not hang or panic.
        let n = Notifier::connect(OsStr::new("@chime-sdnotify-nobody-listens-here")).unwrap();
        assert!(n.notify("READY=1").is_err());
    }

    #[test]
    fn status_lines_are_one_line() {
        assert_eq!(status_line("a\nb\tc"), "STATUS=a b c");
        assert_eq!(status_line("serving: socket, 2 workers"), "STATUS=serving: socket, 2 workers");
    }

    #[test]
    fn watchdog_period_follows_sd_watchdog_enabled() {
        let os = |s: &'static str| Some(OsStr::new(s));
        assert_eq!(watchdog_period(os("30000000"), None, 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_period(os("30000000"), os("7"), 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_period(os("30000000"), os("8"), 7), None, "meant for another process");
        assert_eq!(watchdog_period(None, os("7"), 7), None);
        assert_eq!(watchdog_period(os("0"), None, 7), None);
        assert_eq!(watchdog_period(os("soon"), None, 7), None);
        assert_eq!(watchdog_period(os("1000"), os("x"), 7), None);
    }

    /// Heartbeat ages at `now` of threads that last beat at `beats`.
    fn ages(beats: &[Instant], now: Instant) -> Vec<Duration> {
        beats.iter().map(|b| now.saturating_duration_since(*b)).collect()
    }

    #[test]
    fn watchdog_pings_while_everything_moves() {
        let t0 = Instant::now();
        let period = Duration::from_secs(10);
        let mut w = Watchdog::new(period, t0);
        assert_eq!(w.stall_after(), period);
        assert_eq!(w.period(), period);
        let fresh = [Duration::from_millis(50); 3];
        assert_eq!(w.tick(&fresh, t0), WatchdogAction::Ping, "first ping right after READY");
        for s in 1..10 {
            assert_eq!(w.tick(&fresh, t0 + Duration::from_secs(s)), WatchdogAction::Wait);
        }
        assert_eq!(w.tick(&fresh, t0 + period), WatchdogAction::Ping);
        assert_eq!(w.tick(&fresh, t0 + period), WatchdogAction::Wait);
    }

    #[test]
    fn a_stuck_worker_stops_the_pings_until_it_moves_again() {
        let t0 = Instant::now();
        let sec = Duration::from_secs;
        let mut w = Watchdog::new(sec(10), t0);
        assert_eq!(w.tick(&ages(&[t0, t0, t0], t0), t0), WatchdogAction::Ping);
        // Worker 1 beats last at t0; the others every second.
        let mut action = Vec::new();
        for s in 1..=30 {
            let now = t0 + sec(s);
            action.push((s, w.tick(&ages(&[now, t0, now], now), now)));
        }
        let pings: Vec<u64> = action.iter().filter(|(_, a)| *a == WatchdogAction::Ping).map(|(s, _)| *s).collect();
        assert!(pings.is_empty(), "pinged at {pings:?} with worker 1 stuck");
        assert_eq!(action[9], (10, WatchdogAction::Withheld(vec![1])), "withheld at the first due ping");
        assert_eq!(action.iter().filter(|(_, a)| matches!(a, WatchdogAction::Withheld(_))).count(), 1);
        // It moves again: a ping at once, then the normal cadence.
        let now = t0 + sec(31);
        assert_eq!(w.tick(&ages(&[now, now, now], now), now), WatchdogAction::Recovered);
        let now = t0 + sec(32);
        assert_eq!(w.tick(&ages(&[now, now, now], now), now), WatchdogAction::Wait);
        let now = t0 + sec(41);
        assert_eq!(w.tick(&ages(&[now, now, now], now), now), WatchdogAction::Ping);
    }

    #[test]
    fn short_periods_still_allow_the_minimum_stall_time() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(Duration::from_millis(100), t0);
        assert_eq!(w.stall_after(), MIN_STALL);
        // A heartbeat younger than MIN_STALL is fine.
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(w.tick(&ages(&[t0], at(1)), at(1)), WatchdogAction::Ping);
        assert_eq!(w.tick(&ages(&[t0], at(2)), at(2)), WatchdogAction::Ping);
        assert_eq!(w.tick(&ages(&[t0], t0 + MIN_STALL), t0 + MIN_STALL), WatchdogAction::Withheld(vec![0]));
    }

    #[test]
    fn no_heartbeats_always_pings() {
        // An NTS-KE-only chimed has no workers; with no control heartbeat
        // either, the watchdog only proves the main loop runs.
        let t0 = Instant::now();
        let mut w = Watchdog::new(Duration::from_secs(1), t0);
        assert_eq!(w.tick(&[], t0), WatchdogAction::Ping);
        assert_eq!(w.tick(&[], t0 + Duration::from_secs(1)), WatchdogAction::Ping);
    }
}
