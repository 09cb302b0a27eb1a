//! Interface facts the XDP backend needs: index and RX queue count.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `ETHTOOL_GCHANNELS` from `<linux/ethtool.h>`.
const ETHTOOL_GCHANNELS: u32 = 0x0000_003c;
/// `SIOCETHTOOL` from `<linux/sockios.h>`.
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// `struct ethtool_channels`.
#[repr(C)]
#[derive(Debug, Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

/// `struct ifreq` with the `ifr_data` member of its union (40 bytes on LP64).
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// The interface's index (`if_nametoindex`).
pub fn ifindex(ifname: &str) -> io::Result<u32> {
    let name = CString::new(ifname).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 { Err(io::Error::last_os_error()) } else { Ok(idx) }
}

/// Number of RX queues an XDP program sees on `ifname`, from the ethtool
/// channels ioctl: the combined channel count, else the RX count; 1 when the
/// driver does not implement it (`EOPNOTSUPP`) or reports no queues.
pub fn queue_count(ifname: &str) -> io::Result<u32> {
    let ch = channels(ifname)?;
    Ok(match ch {
        Some(ch) if ch.combined_count > 0 => ch.combined_count,
        Some(ch) if ch.rx_count > 0 => ch.rx_count,
        _ => 1,
    })
}

/// `ETHTOOL_GCHANNELS`, or `None` when the driver does not support it.
fn channels(ifname: &str) -> io::Result<Option<EthtoolChannels>> {
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"));
    }
    // SAFETY: plain socket(2) call; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut ch = EthtoolChannels { cmd: ETHTOOL_GCHANNELS, ..Default::default() };
    let mut req =
        IfreqData { name: [0; libc::IFNAMSIZ], data: (&mut ch as *mut EthtoolChannels).cast(), _pad: [0; 16] };
    for (dst, &src) in req.name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `req` is a properly laid out `struct ifreq` whose data pointer
    // refers to `ch`, an `ethtool_channels` that lives across the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(ch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_an_index_and_one_queue() {
        assert!(ifindex("lo").unwrap() > 0);
        // lo has no ethtool channels: the EOPNOTSUPP fallback.
        assert_eq!(queue_count("lo").unwrap(), 1);
    }

    #[test]
    fn unknown_interface_is_an_error() {
        assert!(ifindex("chime-nonexist").is_err());
        assert!(queue_count("chime-nonexist").is_err());
        assert!(queue_count("").is_err());
    }
}
