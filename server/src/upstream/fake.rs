//! Fake peers for tests: a chronyd that answers NTP queries with a chosen
//! state, and a ptp4l that answers management GETs with crafted TLVs. Each
//! runs on one thread, stopped and joined on drop. Not for production use.

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use chime_proto::packet::{HEADER_LEN, Header, LeapIndicator, Mode, RefId};
use chime_proto::{NtpShort, NtpTimestamp};

use super::ptp4l::{self, ACTION_GET, ACTION_RESPONSE, ParentData, TimeStatus};
use crate::time::now_ntp;

/// How a fake peer misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    /// Never answers.
    Silent,
    /// Answers a few bytes of garbage.
    Garbage,
    /// Answers well-formed packets that do not match the request.
    WrongOrigin,
    /// (ptp4l) Answers with a MANAGEMENT_ERROR_STATUS TLV.
    ErrorStatus,
}

/// What the fake chronyd answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FakeNtp {
    /// Leap indicator.
    pub leap: LeapIndicator,
    /// Stratum.
    pub stratum: u8,
    /// Reference ID.
    pub reference_id: RefId,
    /// Root delay, seconds.
    pub root_delay: f64,
    /// Root dispersion, seconds.
    pub root_dispersion: f64,
    /// Reference timestamp.
    pub reference_time: NtpTimestamp,
    /// Misbehaviour, if any.
    pub misbehave: Option<Misbehave>,
}

impl Default for FakeNtp {
    fn default() -> Self {
        Self {
            leap: LeapIndicator::NoWarning,
            stratum: 2,
            reference_id: RefId([192, 0, 2, 1]),
            root_delay: 0.002,
            root_dispersion: 0.001,
            reference_time: NtpTimestamp::from_unix(1_700_000_000, 0),
            misbehave: None,
        }
    }
}

#[derive(Debug)]
struct Runner<T> {
    state: Arc<Mutex<T>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<T> Runner<T> {
    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A fake chronyd on 127.0.0.1.
#[derive(Debug)]
pub struct FakeChronyd {
    addr: SocketAddr,
    runner: Runner<FakeNtp>,
}

impl FakeChronyd {
    /// Starts answering on a free loopback port.
    pub fn start(cfg: FakeNtp) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))), cfg)
            .unwrap_or_else(|e| panic!("fake chronyd: {e}"))
    }

    /// Starts answering on `addr`.
    pub fn start_on(addr: SocketAddr, cfg: FakeNtp) -> std::io::Result<Self> {
        let sock = UdpSocket::bind(addr)?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        let addr = sock.local_addr()?;
        let state = Arc::new(Mutex::new(cfg));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                    let cfg = *state.lock().unwrap_or_else(PoisonError::into_inner);
                    let Ok(req) = Header::parse(&buf[..n]) else { continue };
                    let now = now_ntp();
                    let reply = Header {
                        leap: cfg.leap,
                        version: req.version,
                        mode: Mode::Server,
                        stratum: cfg.stratum,
                        poll: req.poll,
                        precision: -20,
                        root_delay: NtpShort::from_secs_f64(cfg.root_delay),
                        root_dispersion: NtpShort::from_secs_f64(cfg.root_dispersion),
                        reference_id: cfg.reference_id,
                        reference_ts: cfg.reference_time,
                        origin_ts: req.transmit_ts,
                        receive_ts: now,
                        transmit_ts: now,
                    };
                    let mut out = [0u8; HEADER_LEN];
                    match cfg.misbehave {
                        Some(Misbehave::Silent) => continue,
                        Some(Misbehave::Garbage | Misbehave::ErrorStatus) => {
                            let _ = sock.send_to(b"\x17garbage", from);
                            continue;
                        }
                        Some(Misbehave::WrongOrigin) => Header { origin_ts: now, ..reply }.write(&mut out),
                        None => reply.write(&mut out),
                    }
                    let _ = sock.send_to(&out, from);
                }
            })
        };
        Ok(Self { addr, runner: Runner { state, stop, thread: Some(thread) } })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it answers now.
    pub fn config(&self) -> FakeNtp {
        *self.runner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes what it answers.
    pub fn set(&self, cfg: FakeNtp) {
        *self.runner.state.lock().unwrap_or_else(PoisonError::into_inner) = cfg;
    }
}

impl Drop for FakeChronyd {
    fn drop(&mut self) {
        self.runner.finish();
    }
}

/// What the fake ptp4l answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FakePtp {
    /// TIME_STATUS_NP.
    pub time_status: TimeStatus,
    /// PARENT_DATA_SET.
    pub parent: ParentData,
    /// Misbehaviour, if any.
    pub misbehave: Option<Misbehave>,
}

impl Default for FakePtp {
    fn default() -> Self {
        Self {
            time_status: TimeStatus { master_offset_ns: 25, gm_present: true, gm_identity: [0xAA; 8] },
            parent: ParentData { gm_clock_class: 6, gm_clock_accuracy: 0x21, gm_identity: [0xAA; 8] },
            misbehave: None,
        }
    }
}

/// A fake ptp4l management socket.
#[derive(Debug)]
pub struct FakePtp4l {
    path: PathBuf,
    runner: Runner<FakePtp>,
}

impl FakePtp4l {
    /// Binds `path` and answers GETs of TIME_STATUS_NP and PARENT_DATA_SET.
    pub fn start(path: &Path, cfg: FakePtp) -> Self {
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path).unwrap_or_else(|e| panic!("fake ptp4l on {}: {e}", path.display()));
        sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap_or_else(|e| panic!("{e}"));
        let state = Arc::new(Mutex::new(cfg));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                    let Some(from) = from.as_pathname().map(Path::to_path_buf) else { continue };
                    let cfg = *state.lock().unwrap_or_else(PoisonError::into_inner);
                    let Ok(req) = ptp4l::decode(&buf[..n]) else { continue };
                    if req.action != ACTION_GET {
                        continue;
                    }
                    let data = match req.management_id {
                        ptp4l::TIME_STATUS_NP => cfg.time_status.encode().to_vec(),
                        ptp4l::PARENT_DATA_SET => cfg.parent.encode().to_vec(),
                        _ => continue,
                    };
                    let out = match cfg.misbehave {
                        Some(Misbehave::Silent) => continue,
                        Some(Misbehave::Garbage) => b"\x0d\x02garbage".to_vec(),
                        Some(Misbehave::WrongOrigin) => {
                            ptp4l::encode(req.sequence_id.wrapping_add(7), ACTION_RESPONSE, req.management_id, 0, &data)
                        }
                        Some(Misbehave::ErrorStatus) => ptp4l::encode_error(req.sequence_id, req.management_id),
                        None => ptp4l::encode(req.sequence_id, ACTION_RESPONSE, req.management_id, 0, &data),
                    };
                    let _ = sock.send_to(&out, &from);
                }
            })
        };
        Self { path: path.to_path_buf(), runner: Runner { state, stop, thread: Some(thread) } }
    }

    /// Changes what it answers.
    pub fn set(&self, cfg: FakePtp) {
        *self.runner.state.lock().unwrap_or_else(PoisonError::into_inner) = cfg;
    }
}

impl Drop for FakePtp4l {
    fn drop(&mut self) {
        self.runner.finish();
        let _ = std::fs::remove_file(&self.path);
    }
}
