//! PTP hardware clocks (`/dev/ptpN`): which one belongs to an interface
//! (`ETHTOOL_GET_TS_INFO`), and reading it against the system clock with
//! `PTP_SYS_OFFSET_PRECISE` (cross-timestamping in hardware, where the
//! driver has it) or `PTP_SYS_OFFSET_EXTENDED` (system time read just
//! before and after each PHC read).

use std::fs::File;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

/// `SIOCETHTOOL` from `<linux/sockios.h>`.
const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// `ETHTOOL_GET_TS_INFO` from `<linux/ethtool.h>`.
const ETHTOOL_GET_TS_INFO: u32 = 0x41;
/// Samples per `PTP_SYS_OFFSET_EXTENDED` (the kernel allows up to 25).
pub const EXTENDED_SAMPLES: u32 = 9;

/// `struct ethtool_ts_info`.
#[repr(C)]
#[derive(Default)]
struct EthtoolTsInfo {
    cmd: u32,
    so_timestamping: u32,
    phc_index: i32,
    tx_types: u32,
    tx_reserved: [u32; 3],
    rx_filters: u32,
    rx_reserved: [u32; 3],
}

/// `struct ifreq` with `ifr_data`.
#[repr(C)]
struct IfReqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// Timestamping capabilities of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TsInfo {
    /// `SOF_TIMESTAMPING_*` the device supports.
    pub so_timestamping: u32,
    /// Index of its PHC (`/dev/ptpN`), if it has one.
    pub phc_index: Option<u32>,
}

/// `ETHTOOL_GET_TS_INFO` for `ifname`.
pub fn ts_info(ifname: &str) -> io::Result<TsInfo> {
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: socket(2) takes no pointers; it returns a new descriptor or -1.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a freshly created descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut info = EthtoolTsInfo { cmd: ETHTOOL_GET_TS_INFO, ..EthtoolTsInfo::default() };
    let mut req = IfReqData { name: [0; libc::IFNAMSIZ], data: (&raw mut info).cast(), _pad: [0; 16] };
    for (d, s) in req.name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: `req` names the interface and points at `info`, both alive and
    // writable for the call; the kernel writes at most `sizeof(info)`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &raw mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TsInfo { so_timestamping: info.so_timestamping, phc_index: u32::try_from(info.phc_index).ok() })
}

/// The device path of PHC `index`.
pub fn phc_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ptp{index}"))
}

/// One reading of the PHC against the system clock (CLOCK_REALTIME), in
/// nanoseconds since the Unix epoch on each clock's own scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrossStamp {
    /// The PHC's time.
    pub phc_ns: i128,
    /// The system time at the same instant (midpoint of the window).
    pub sys_ns: i128,
    /// Width of the window the PHC read happened in (0 for hardware
    /// cross-timestamps).
    pub window_ns: i64,
}

fn clock_time_ns(t: &libc::ptp_clock_time) -> i128 {
    i128::from(t.sec) * 1_000_000_000 + i128::from(t.nsec)
}

/// An open `/dev/ptpN`.
#[derive(Debug)]
pub struct PtpDevice {
    file: File,
    precise: bool,
}

impl PtpDevice {
    /// Opens PHC `index` read-only, and probes whether it supports
    /// `PTP_SYS_OFFSET_PRECISE`.
    pub fn open(index: u32) -> io::Result<Self> {
        let file = File::open(phc_path(index))?;
        let mut dev = Self { file, precise: true };
        if dev.read_precise().is_err() {
            dev.precise = false;
        }
        Ok(dev)
    }

    /// Whether readings are hardware cross-timestamps.
    pub fn is_precise(&self) -> bool {
        self.precise
    }

    /// One reading: a hardware cross-timestamp where supported, else the
    /// narrowest of [`EXTENDED_SAMPLES`] extended samples.
    pub fn read(&mut self) -> io::Result<CrossStamp> {
        if self.precise { self.read_precise() } else { self.read_extended() }
    }

    fn read_precise(&mut self) -> io::Result<CrossStamp> {
        // SAFETY: an all-zero `ptp_sys_offset_precise` is valid (integers).
        let mut p: libc::ptp_sys_offset_precise = unsafe { mem::zeroed() };
        // SAFETY: `p` is a valid, writable struct of the size the ioctl
        // number encodes, alive across the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::PTP_SYS_OFFSET_PRECISE as _, &raw mut p) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(CrossStamp { phc_ns: clock_time_ns(&p.device), sys_ns: clock_time_ns(&p.sys_realtime), window_ns: 0 })
    }

    fn read_extended(&mut self) -> io::Result<CrossStamp> {
        // SAFETY: an all-zero `ptp_sys_offset_extended` is valid (integers).
        let mut e: libc::ptp_sys_offset_extended = unsafe { mem::zeroed() };
        e.n_samples = EXTENDED_SAMPLES;
        // clockid 0 = CLOCK_REALTIME (also what kernels before 6.12 use).
        // SAFETY: `e` is a valid, writable struct of the size the ioctl
        // number encodes, alive across the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::PTP_SYS_OFFSET_EXTENDED as _, &raw mut e) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (e.n_samples as usize).min(e.ts.len());
        let samples: Vec<[i128; 3]> =
            e.ts[..n].iter().map(|s| [clock_time_ns(&s[0]), clock_time_ns(&s[1]), clock_time_ns(&s[2])]).collect();
        narrowest(&samples).ok_or_else(|| io::Error::other("PTP_SYS_OFFSET_EXTENDED gave no usable sample"))
    }
}

/// The sample `[sys_before, phc, sys_after]` with the narrowest window, as
/// a cross stamp at the window's midpoint; `None` if none is ordered.
pub fn narrowest(samples: &[[i128; 3]]) -> Option<CrossStamp> {
    samples.iter().filter(|[before, _, after]| after >= before).min_by_key(|[before, _, after]| after - before).map(
        |[before, phc, after]| CrossStamp {
            phc_ns: *phc,
            sys_ns: before + (after - before) / 2,
            window_ns: (after - before).min(i128::from(i64::MAX)) as i64,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowest_window_wins() {
        let s = [[100, 5_000_150, 400], [1000, 5_001_040, 1060], [2000, 0, 1000]];
        let c = narrowest(&s).unwrap();
        assert_eq!(c, CrossStamp { phc_ns: 5_001_040, sys_ns: 1030, window_ns: 60 });
        assert_eq!(narrowest(&[[5, 1, 4]]), None);
        assert_eq!(narrowest(&[]), None);
    }

    #[test]
    fn loopback_has_no_phc_and_bad_names_fail() {
        // Loopback: no PHC (ethtool may refuse or report -1).
        if let Ok(info) = ts_info("lo") {
            assert_eq!(info.phc_index, None);
        }
        assert!(ts_info("").is_err());
        assert!(ts_info("no-such-if0").is_err());
        assert!(PtpDevice::open(999).is_err());
    }
}
