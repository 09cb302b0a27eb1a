//! The chrony source: one NTP client query (mode 3) to the local chronyd
//! per reading, on `upstream.chrony_address` (default 127.0.0.1:123).
//!
//! chronyd disciplines the very clock chimed serves, so its reply header
//! *is* its tracking state: leap, stratum, reference ID, root delay, root
//! dispersion (grown by chronyd to the moment it answered) and reference
//! time. chimed serves:
//!
//! - stratum = chronyd's stratum + 1: chime is one more hop from the
//!   reference in the NTP hierarchy (it reads chronyd's state, it does not
//!   run chronyd's filters), and this keeps chime and chronyd distinct when
//!   both are visible;
//! - reference ID = chronyd's reference ID when chronyd is at stratum 2 or
//!   more (the address of chronyd's own upstream), so RFC 5905 loop
//!   detection keeps working *through* chime: a server chronyd follows sees
//!   its own address and will not follow chime back. When chronyd is a
//!   stratum-1 server, its reference ID is a reference-clock code ("GPS",
//!   "PPS"), which RFC 5905 reserves for stratum 1; chime, at stratum 2,
//!   then serves the IPv4 address it queries (127.0.0.1 by default, or
//!   127.0.0.1 for an IPv6 chronyd address), "my upstream is the local
//!   chronyd";
//! - root delay and root dispersion as chronyd reports them. chime adds
//!   nothing: the two daemons share one clock, and the localhost round
//!   trip measures the query, not the clock. (Workers still grow the
//!   dispersion by PHI from the moment of the reading.)
//! - chronyd's leap indicator; leap 3 or stratum 0/16 means chronyd is
//!   unsynchronized.
//!
//! chronyd's command socket (candm, `REQ_TRACKING`) would add its offset
//! estimate and frequency; the NTP query needs no privileges, no socket
//! permissions and no protocol version coupling, so it is what is used.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use chime_proto::NtpTimestamp;
use chime_proto::clock::STRATUM_UNSYNCHRONIZED;
use chime_proto::packet::{HEADER_LEN, Header, LeapIndicator, Mode, RefId};

use super::{UpstreamError, UpstreamSource, UpstreamState};
use crate::time::now_ntp;

/// How long one query waits for chronyd.
pub const QUERY_TIMEOUT: Duration = Duration::from_millis(250);

/// Queries the local chronyd.
#[derive(Debug)]
pub struct ChronySource {
    address: SocketAddr,
    socket: UdpSocket,
    seq: u64,
}

impl ChronySource {
    /// A socket for querying `address` (bound to an ephemeral port of the
    /// matching family, not yet sending).
    pub fn new(address: SocketAddr) -> Result<Self, UpstreamError> {
        let bind: SocketAddr = match address.ip() {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(bind).map_err(UpstreamError::io("binding the chrony query socket"))?;
        socket.connect(address).map_err(UpstreamError::io("connecting the chrony query socket"))?;
        Ok(Self { address, socket, seq: 0 })
    }

    /// The reference ID served when chronyd is itself stratum 1.
    fn own_refid(&self) -> RefId {
        match self.address.ip() {
            IpAddr::V4(a) => RefId(a.octets()),
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(RefId([127, 0, 0, 1]), |a| RefId(a.octets())),
        }
    }

    fn query(&mut self) -> Result<Header, UpstreamError> {
        // Anything left over from an earlier, timed-out query is stale.
        let mut buf = [0u8; 1024];
        self.socket.set_nonblocking(true).map_err(UpstreamError::io("chrony socket"))?;
        while self.socket.recv(&mut buf).is_ok() {}
        self.socket.set_nonblocking(false).map_err(UpstreamError::io("chrony socket"))?;

        // The transmit timestamp identifies the reply; its low bits carry
        // a counter so two queries in the same nanosecond still differ.
        self.seq = self.seq.wrapping_add(1);
        let xmt = NtpTimestamp::from_bits((now_ntp().to_bits() & !0xFFFF) | (self.seq & 0xFFFF));
        let mut req = [0u8; HEADER_LEN];
        req[0] = (4 << 3) | Mode::Client.to_bits();
        req[40..48].copy_from_slice(&xmt.to_bits().to_be_bytes());
        self.socket.send(&req).map_err(UpstreamError::io("sending to chronyd"))?;

        let deadline = Instant::now() + QUERY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(UpstreamError::Timeout(QUERY_TIMEOUT.as_millis() as u64));
            }
            self.socket.set_read_timeout(Some(left)).map_err(UpstreamError::io("chrony socket"))?;
            let n = match self.socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(UpstreamError::Timeout(QUERY_TIMEOUT.as_millis() as u64));
                }
                Err(e) => return Err(UpstreamError::Io { what: "receiving from chronyd", source: e }),
            };
            let h = Header::parse(&buf[..n]).map_err(|e| UpstreamError::Malformed(e.to_string()))?;
            if h.origin_ts != xmt {
                continue; // not the answer to this query
            }
            if h.mode != Mode::Server {
                return Err(UpstreamError::Malformed(format!("reply in mode {:?}", h.mode)));
            }
            return Ok(h);
        }
    }

    /// The state a reply header describes.
    pub fn state(&self, h: &Header) -> Result<UpstreamState, UpstreamError> {
        if h.stratum == 0 && h.reference_id.0.iter().all(u8::is_ascii_uppercase) {
            // Kiss-o'-death (RATE, DENY, ...): chronyd refuses chime.
            return Err(UpstreamError::Refused(format!(
                "chronyd sent kiss code {}",
                String::from_utf8_lossy(&h.reference_id.0)
            )));
        }
        if h.leap == LeapIndicator::Unsynchronized || h.stratum == 0 || h.stratum >= STRATUM_UNSYNCHRONIZED {
            return Ok(UpstreamState { leap: LeapIndicator::NoWarning, ..UpstreamState::unsynchronized() });
        }
        let reference_id = if h.stratum >= 2 { h.reference_id } else { self.own_refid() };
        Ok(UpstreamState {
            synchronized: true,
            leap: h.leap,
            stratum: (h.stratum + 1).min(STRATUM_UNSYNCHRONIZED - 1),
            reference_id,
            root_delay: h.root_delay.to_secs_f64(),
            root_dispersion: h.root_dispersion.to_secs_f64(),
            reference_time: (!h.reference_ts.is_zero()).then_some(h.reference_ts),
            offset: None,
        })
    }
}

impl UpstreamSource for ChronySource {
    fn name(&self) -> &'static str {
        "chrony"
    }

    fn read(&mut self, _now: NtpTimestamp) -> Result<UpstreamState, UpstreamError> {
        let h = self.query()?;
        self.state(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::fake::{FakeChronyd, FakeNtp, Misbehave};

    fn source(fake: &FakeChronyd) -> ChronySource {
        ChronySource::new(fake.addr()).unwrap()
    }

    #[test]
    fn mirrors_a_stratum_2_chronyd() {
        let fake = FakeChronyd::start(FakeNtp {
            leap: LeapIndicator::InsertSecond,
            stratum: 2,
            reference_id: RefId([192, 0, 2, 9]),
            root_delay: 0.0125,
            root_dispersion: 0.0031,
            ..FakeNtp::default()
        });
        let mut src = source(&fake);
        let s = src.read(now_ntp()).unwrap();
        assert!(s.synchronized);
        assert_eq!(s.stratum, 3);
        assert_eq!(s.leap, LeapIndicator::InsertSecond);
        assert_eq!(s.reference_id, RefId([192, 0, 2, 9]));
        assert!((s.root_delay - 0.0125).abs() < 1e-4, "{}", s.root_delay);
        assert!((s.root_dispersion - 0.0031).abs() < 1e-4, "{}", s.root_dispersion);
        assert_eq!(s.reference_time, Some(fake.config().reference_time));
        // Repeated reads work (stale replies are skipped).
        for _ in 0..5 {
            assert!(src.read(now_ntp()).unwrap().synchronized);
        }
    }

    #[test]
    fn stratum_1_chronyd_gets_the_query_address_as_refid() {
        let fake = FakeChronyd::start(FakeNtp { stratum: 1, reference_id: RefId(*b"GPS\0"), ..FakeNtp::default() });
        let s = source(&fake).read(now_ntp()).unwrap();
        assert_eq!((s.stratum, s.reference_id), (2, RefId([127, 0, 0, 1])));
    }

    #[test]
    fn unsynchronized_chronyd() {
        let fake = FakeChronyd::start(FakeNtp {
            leap: LeapIndicator::Unsynchronized,
            stratum: 0,
            reference_id: RefId([0; 4]),
            ..FakeNtp::default()
        });
        let mut src = source(&fake);
        assert!(!src.read(now_ntp()).unwrap().synchronized);
        fake.set(FakeNtp { leap: LeapIndicator::NoWarning, stratum: 16, ..FakeNtp::default() });
        assert!(!src.read(now_ntp()).unwrap().synchronized);
        fake.set(FakeNtp {
            leap: LeapIndicator::Unsynchronized,
            stratum: 0,
            reference_id: RefId::RATE,
            ..FakeNtp::default()
        });
        assert!(matches!(src.read(now_ntp()), Err(UpstreamError::Refused(_))));
    }

    #[test]
    fn silent_garbage_and_wrong_origin_are_errors() {
        let fake = FakeChronyd::start(FakeNtp { misbehave: Some(Misbehave::Silent), ..FakeNtp::default() });
        let mut src = source(&fake);
        let start = Instant::now();
        assert!(matches!(src.read(now_ntp()), Err(UpstreamError::Timeout(_))));
        assert!(start.elapsed() < Duration::from_secs(2));
        fake.set(FakeNtp { misbehave: Some(Misbehave::Garbage), ..FakeNtp::default() });
        assert!(matches!(src.read(now_ntp()), Err(UpstreamError::Malformed(_))));
        fake.set(FakeNtp { misbehave: Some(Misbehave::WrongOrigin), ..FakeNtp::default() });
        assert!(matches!(src.read(now_ntp()), Err(UpstreamError::Timeout(_))));
        fake.set(FakeNtp::default());
        assert!(src.read(now_ntp()).unwrap().synchronized, "recovers");
        drop(fake);
        assert!(src.read(now_ntp()).is_err(), "nobody there");
    }
}
