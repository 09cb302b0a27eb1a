//! The ptp4l source: linuxptp's management interface over its Unix socket
//! (`upstream.ptp4l_socket`, default /var/run/ptp4l), the way `pmc -u -b 0`
//! talks to it.
//!
//! Each reading sends two IEEE 1588 management GETs from chimed's own bound
//! socket (`/var/run/chime-pmc.<pid>.<n>`, or in `$RUNTIME_DIRECTORY` when
//! systemd gives chimed one; removed on drop; ptp4l answers
//! to the sender's path): TIME_STATUS_NP (linuxptp's: offset from master,
//! gmPresent, grandmaster identity) and PARENT_DATA_SET (the grandmaster's
//! clockClass and clockAccuracy). boundaryHops is 0, so only the local
//! ptp4l answers; the target is the wildcard port.
//!
//! Degradation rules (stratum, root dispersion):
//! - no grandmaster (gmPresent false) or clockClass ≥ 248 (default,
//!   slave-only, not traceable): unsynchronized; chimed's holdover rules
//!   (`max_unsync_secs`) then apply as for any lost upstream.
//! - clockClass 6 (primary reference, locked) or 7 (holdover within
//!   specification) and |offset| ≤ 100 µs: stratum 1, reference ID "PTP",
//!   root dispersion = the grandmaster's clockAccuracy + |offset|,
//!   reference time now.
//! - any other clockClass below 248 (52, 187: holdover out of
//!   specification; 13/14, 58, 140-193, ...: degraded or application
//!   time scale), or a larger offset: stratum 2 (no longer a primary
//!   server), reference ID "PTP", root dispersion = clockAccuracy +
//!   |offset| + PHI × the time since the grandmaster stopped being
//!   class 6/7 locked, reference time = that moment. The growing
//!   dispersion eventually exceeds `max_root_distance` and chimed goes
//!   unsynchronized.
//!
//! The dispersion covers the PTP side only: phc2sys's error copying the
//! NIC clock to the system clock is not visible to ptp4l.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use chime_proto::NtpTimestamp;
use chime_proto::clock::{FREQUENCY_TOLERANCE, MAX_DISPERSION};
use chime_proto::packet::{LeapIndicator, RefId};

use super::{UpstreamError, UpstreamSource, UpstreamState};

/// PTP messageType of management messages.
pub const MESSAGE_TYPE_MANAGEMENT: u8 = 0x0D;
/// actionField GET.
pub const ACTION_GET: u8 = 0x00;
/// actionField RESPONSE.
pub const ACTION_RESPONSE: u8 = 0x02;
/// tlvType MANAGEMENT.
pub const TLV_MANAGEMENT: u16 = 0x0001;
/// tlvType MANAGEMENT_ERROR_STATUS.
pub const TLV_MANAGEMENT_ERROR_STATUS: u16 = 0x0002;
/// managementId PARENT_DATA_SET.
pub const PARENT_DATA_SET: u16 = 0x2002;
/// managementId TIME_STATUS_NP (linuxptp).
pub const TIME_STATUS_NP: u16 = 0xC000;

/// Common header (34) + targetPortIdentity (10) + hops, action, reserved (4).
const MANAGEMENT_HEADER_LEN: usize = 48;
/// tlvType, lengthField, managementId.
const TLV_HEADER_LEN: usize = 6;
/// How long one GET waits for ptp4l.
pub const QUERY_TIMEOUT: Duration = Duration::from_millis(250);
/// Largest |offset from master| still called locked.
pub const LOCKED_OFFSET_NS: i64 = 100_000;

/// A decoded management message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Management {
    /// sequenceId.
    pub sequence_id: u16,
    /// actionField.
    pub action: u8,
    /// tlvType of the (single) TLV.
    pub tlv_type: u16,
    /// managementId (or, for an error status, the id it refers to).
    pub management_id: u16,
    /// The TLV's dataField (for an error status: the managementErrorId
    /// first).
    pub data: Vec<u8>,
}

/// Encodes a management message with one MANAGEMENT TLV.
pub fn encode(sequence_id: u16, action: u8, management_id: u16, domain: u8, data: &[u8]) -> Vec<u8> {
    encode_tlv(sequence_id, action, TLV_MANAGEMENT, management_id, domain, data)
}

/// Encodes a MANAGEMENT_ERROR_STATUS answer (NOT_SUPPORTED) to a GET.
pub fn encode_error(sequence_id: u16, management_id: u16) -> Vec<u8> {
    // managementErrorId NOT_SUPPORTED (0x0004) is the first field; the
    // managementId follows it, then 4 reserved bytes.
    let mut out = encode_tlv(sequence_id, ACTION_RESPONSE, TLV_MANAGEMENT_ERROR_STATUS, 0x0004, 0, &[0; 4]);
    // lengthField covers errorId + managementId + reserved + displayData.
    let at = MANAGEMENT_HEADER_LEN + TLV_HEADER_LEN;
    out.splice(at..at, management_id.to_be_bytes());
    out.push(0); // empty displayData PTPText, padded
    out.push(0);
    let len = (out.len() - MANAGEMENT_HEADER_LEN - 4) as u16;
    out[MANAGEMENT_HEADER_LEN + 2..MANAGEMENT_HEADER_LEN + 4].copy_from_slice(&len.to_be_bytes());
    let total = out.len() as u16;
    out[2..4].copy_from_slice(&total.to_be_bytes());
    out
}

fn encode_tlv(sequence_id: u16, action: u8, tlv_type: u16, id: u16, domain: u8, data: &[u8]) -> Vec<u8> {
    let total = MANAGEMENT_HEADER_LEN + TLV_HEADER_LEN + data.len();
    let mut b = vec![0u8; total];
    b[0] = MESSAGE_TYPE_MANAGEMENT; // transportSpecific 0
    b[1] = 0x02; // versionPTP 2
    b[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    b[4] = domain;
    // flagField, correctionField, reserved: 0. sourcePortIdentity: clock
    // identity 0, port number = our pid (as pmc does).
    b[28..30].copy_from_slice(&(std::process::id() as u16).to_be_bytes());
    b[30..32].copy_from_slice(&sequence_id.to_be_bytes());
    b[32] = 0x04; // controlField: management
    b[33] = 0x7F; // logMessageInterval
    b[34..44].fill(0xFF); // targetPortIdentity: wildcard
    b[44] = 0; // startingBoundaryHops
    b[45] = 0; // boundaryHops: the local ptp4l only
    b[46] = action & 0x0F;
    let t = MANAGEMENT_HEADER_LEN;
    b[t..t + 2].copy_from_slice(&tlv_type.to_be_bytes());
    b[t + 2..t + 4].copy_from_slice(&((2 + data.len()) as u16).to_be_bytes());
    b[t + 4..t + 6].copy_from_slice(&id.to_be_bytes());
    b[t + 6..].copy_from_slice(data);
    b
}

fn malformed(what: &str) -> UpstreamError {
    UpstreamError::Malformed(what.to_owned())
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Decodes a management message carrying one TLV.
pub fn decode(b: &[u8]) -> Result<Management, UpstreamError> {
    if b.len() < MANAGEMENT_HEADER_LEN + TLV_HEADER_LEN {
        return Err(malformed("shorter than a management message"));
    }
    if b[0] & 0x0F != MESSAGE_TYPE_MANAGEMENT || b[1] & 0x0F != 2 {
        return Err(malformed("not a PTPv2 management message"));
    }
    let total = usize::from(be16(b, 2));
    if total > b.len() || total < MANAGEMENT_HEADER_LEN + TLV_HEADER_LEN {
        return Err(malformed("bad messageLength"));
    }
    let t = MANAGEMENT_HEADER_LEN;
    let tlv_type = be16(b, t);
    let len = usize::from(be16(b, t + 2));
    if len < 2 || t + 4 + len > total {
        return Err(malformed("bad TLV lengthField"));
    }
    let body = &b[t + 4..t + 4 + len];
    let (management_id, data) = if tlv_type == TLV_MANAGEMENT_ERROR_STATUS {
        if body.len() < 4 {
            return Err(malformed("short error status"));
        }
        (be16(body, 2), [&body[..2], &body[4..]].concat())
    } else {
        (be16(body, 0), body[2..].to_vec())
    };
    Ok(Management { sequence_id: be16(b, 30), action: b[46] & 0x0F, tlv_type, management_id, data })
}

/// The fields of TIME_STATUS_NP chimed uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeStatus {
    /// Offset of the PHC from the grandmaster, ns.
    pub master_offset_ns: i64,
    /// Whether a grandmaster other than this clock is selected.
    pub gm_present: bool,
    /// The grandmaster's clock identity.
    pub gm_identity: [u8; 8],
}

/// TIME_STATUS_NP's dataField length: master_offset 8, ingress_time 8,
/// cumulativeScaledRateOffset 4, scaledLastGmPhaseChange 4,
/// gmTimeBaseIndicator 2, lastGmPhaseChange 12, gmPresent 4, gmIdentity 8.
pub const TIME_STATUS_LEN: usize = 50;

impl TimeStatus {
    /// The dataField.
    pub fn encode(&self) -> [u8; TIME_STATUS_LEN] {
        let mut b = [0u8; TIME_STATUS_LEN];
        b[0..8].copy_from_slice(&self.master_offset_ns.to_be_bytes());
        b[38..42].copy_from_slice(&i32::from(self.gm_present).to_be_bytes());
        b[42..50].copy_from_slice(&self.gm_identity);
        b
    }

    /// From the dataField.
    pub fn decode(b: &[u8]) -> Result<Self, UpstreamError> {
        if b.len() < TIME_STATUS_LEN {
            return Err(malformed("TIME_STATUS_NP too short"));
        }
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[0..8]);
        let mut gm = [0u8; 8];
        gm.copy_from_slice(&b[42..50]);
        Ok(Self {
            master_offset_ns: i64::from_be_bytes(off),
            gm_present: i32::from_be_bytes([b[38], b[39], b[40], b[41]]) != 0,
            gm_identity: gm,
        })
    }
}

/// The fields of PARENT_DATA_SET chimed uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParentData {
    /// grandmasterClockQuality.clockClass.
    pub gm_clock_class: u8,
    /// grandmasterClockQuality.clockAccuracy.
    pub gm_clock_accuracy: u8,
    /// grandmasterIdentity.
    pub gm_identity: [u8; 8],
}

/// PARENT_DATA_SET's dataField length: parentPortIdentity 10, PS 1,
/// reserved 1, observedParentOffsetScaledLogVariance 2,
/// observedParentClockPhaseChangeRate 4, grandmasterPriority1 1,
/// grandmasterClockQuality 4, grandmasterPriority2 1, grandmasterIdentity 8.
pub const PARENT_DATA_LEN: usize = 32;

impl ParentData {
    /// The dataField.
    pub fn encode(&self) -> [u8; PARENT_DATA_LEN] {
        let mut b = [0u8; PARENT_DATA_LEN];
        b[0..8].copy_from_slice(&self.gm_identity);
        b[8..10].copy_from_slice(&1u16.to_be_bytes());
        b[18] = 128; // priority1
        b[19] = self.gm_clock_class;
        b[20] = self.gm_clock_accuracy;
        b[21..23].copy_from_slice(&0x4E5Du16.to_be_bytes());
        b[23] = 128; // priority2
        b[24..32].copy_from_slice(&self.gm_identity);
        b
    }

    /// From the dataField.
    pub fn decode(b: &[u8]) -> Result<Self, UpstreamError> {
        if b.len() < PARENT_DATA_LEN {
            return Err(malformed("PARENT_DATA_SET too short"));
        }
        let mut gm = [0u8; 8];
        gm.copy_from_slice(&b[24..32]);
        Ok(Self { gm_clock_class: b[19], gm_clock_accuracy: b[20], gm_identity: gm })
    }
}

/// IEEE 1588 clockAccuracy as seconds (the bound of each code; 1 ms for
/// "unknown" 0xFE and anything unlisted, 16 s for "> 10 s").
pub fn clock_accuracy_secs(code: u8) -> f64 {
    match code {
        0x17..=0x1F => {
            // 2019 edition: 1 ps, 2.5 ps, 10 ps, 25 ps, ... 10 ns.
            let i = i32::from(code - 0x17);
            let decade = 10f64.powi(i / 2 - 12);
            if i % 2 == 0 { decade } else { decade * 2.5 }
        }
        0x20 => 25e-9,
        0x21 => 100e-9,
        0x22 => 250e-9,
        0x23 => 1e-6,
        0x24 => 2.5e-6,
        0x25 => 10e-6,
        0x26 => 25e-6,
        0x27 => 100e-6,
        0x28 => 250e-6,
        0x29 => 1e-3,
        0x2A => 2.5e-3,
        0x2B => 10e-3,
        0x2C => 25e-3,
        0x2D => 100e-3,
        0x2E => 250e-3,
        0x2F => 1.0,
        0x30 => 10.0,
        0x31 => MAX_DISPERSION,
        _ => 1e-3,
    }
}

/// Reference ID while following a PTP grandmaster.
pub const REFID_PTP: RefId = RefId(*b"PTP\0");

/// Applies the degradation rules to one pair of answers. `degraded_since`
/// remembers when the grandmaster stopped being locked class 6/7.
pub fn state_from(
    ts: &TimeStatus,
    parent: &ParentData,
    now: NtpTimestamp,
    degraded_since: &mut Option<NtpTimestamp>,
) -> UpstreamState {
    let class = parent.gm_clock_class;
    if !ts.gm_present || class >= 248 {
        *degraded_since = None;
        return UpstreamState { offset: Some(ts.master_offset_ns as f64 * 1e-9), ..UpstreamState::unsynchronized() };
    }
    let offset = ts.master_offset_ns as f64 * 1e-9;
    let base = clock_accuracy_secs(parent.gm_clock_accuracy) + offset.abs();
    let locked = matches!(class, 6 | 7) && ts.master_offset_ns.unsigned_abs() <= LOCKED_OFFSET_NS.unsigned_abs();
    let (stratum, dispersion, reference_time) = if locked {
        *degraded_since = None;
        (1, base, None)
    } else {
        let since = *degraded_since.get_or_insert(now);
        (2, base + FREQUENCY_TOLERANCE * now.diff_secs(since).max(0.0), Some(since))
    };
    UpstreamState {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum,
        reference_id: REFID_PTP,
        root_delay: 0.0,
        root_dispersion: dispersion.min(MAX_DISPERSION),
        reference_time,
        offset: Some(offset),
    }
}

static SOCKETS: AtomicU32 = AtomicU32::new(0);

/// Talks to ptp4l.
#[derive(Debug)]
pub struct Ptp4lSource {
    target: PathBuf,
    local: PathBuf,
    socket: UnixDatagram,
    domain: u8,
    seq: u16,
    degraded_since: Option<NtpTimestamp>,
}

impl Ptp4lSource {
    /// Binds chimed's end in the runtime directory systemd made for chimed
    /// (`$RUNTIME_DIRECTORY`, the first if several; the unit's
    /// `RuntimeDirectory=chime`, writable by user chime), else /var/run, for
    /// ptp4l at `target`.
    pub fn new(target: &Path, domain: u8) -> Result<Self, UpstreamError> {
        let runtime = std::env::var_os("RUNTIME_DIRECTORY");
        Self::with_local_dir(target, domain, &local_dir(runtime.as_deref()))
    }

    /// Binds chimed's end in `dir`.
    pub fn with_local_dir(target: &Path, domain: u8, dir: &Path) -> Result<Self, UpstreamError> {
        let n = SOCKETS.fetch_add(1, Ordering::Relaxed);
        let local = dir.join(format!("chime-pmc.{}.{n}", std::process::id()));
        let _ = std::fs::remove_file(&local);
        let socket = UnixDatagram::bind(&local).map_err(UpstreamError::io("binding the ptp4l management socket"))?;
        Ok(Self { target: target.to_path_buf(), local, socket, domain, seq: 0, degraded_since: None })
    }

    /// chimed's own socket path.
    pub fn local_path(&self) -> &Path {
        &self.local
    }

    /// One GET, answered.
    fn get(&mut self, id: u16) -> Result<Vec<u8>, UpstreamError> {
        let mut buf = [0u8; 1500];
        self.socket.set_nonblocking(true).map_err(UpstreamError::io("ptp4l socket"))?;
        while self.socket.recv(&mut buf).is_ok() {}
        self.socket.set_nonblocking(false).map_err(UpstreamError::io("ptp4l socket"))?;

        self.seq = self.seq.wrapping_add(1);
        let req = encode(self.seq, ACTION_GET, id, self.domain, &[]);
        self.socket.send_to(&req, &self.target).map_err(UpstreamError::io("sending to ptp4l"))?;
        let deadline = Instant::now() + QUERY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(UpstreamError::Timeout(QUERY_TIMEOUT.as_millis() as u64));
            }
            self.socket.set_read_timeout(Some(left)).map_err(UpstreamError::io("ptp4l socket"))?;
            let n = match self.socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(UpstreamError::Timeout(QUERY_TIMEOUT.as_millis() as u64));
                }
                Err(e) => return Err(UpstreamError::Io { what: "receiving from ptp4l", source: e }),
            };
            let m = decode(&buf[..n])?;
            if m.sequence_id != self.seq || m.action != ACTION_RESPONSE || m.management_id != id {
                continue;
            }
            if m.tlv_type == TLV_MANAGEMENT_ERROR_STATUS {
                let code = if m.data.len() >= 2 { be16(&m.data, 0) } else { 0 };
                return Err(UpstreamError::Refused(format!("ptp4l management error {code:#06x} for id {id:#06x}")));
            }
            if m.tlv_type != TLV_MANAGEMENT {
                return Err(malformed("unexpected TLV type"));
            }
            return Ok(m.data);
        }
    }
}

impl UpstreamSource for Ptp4lSource {
    fn name(&self) -> &'static str {
        "ptp4l"
    }

    fn read(&mut self, now: NtpTimestamp) -> Result<UpstreamState, UpstreamError> {
        let ts = TimeStatus::decode(&self.get(TIME_STATUS_NP)?)?;
        let parent = ParentData::decode(&self.get(PARENT_DATA_SET)?)?;
        Ok(state_from(&ts, &parent, now, &mut self.degraded_since))
    }
}

impl Drop for Ptp4lSource {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.local);
    }
}

/// The directory of chimed's end of the management socket, from the value
/// of `$RUNTIME_DIRECTORY` (colon-separated when the unit lists several).
fn local_dir(runtime_directory: Option<&std::ffi::OsStr>) -> PathBuf {
    runtime_directory
        .and_then(|v| v.to_str())
        .and_then(|v| v.split(':').next())
        .filter(|d| d.starts_with('/'))
        .map_or_else(|| PathBuf::from("/var/run"), PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::now_ntp;
    use crate::upstream::fake::{FakePtp, FakePtp4l, Misbehave};

    fn t(s: f64) -> NtpTimestamp {
        NtpTimestamp::from_unix(1_700_000_000, 0).add_secs(s)
    }

    #[test]
    fn local_socket_goes_to_the_runtime_directory() {
        use std::ffi::OsStr;
        assert_eq!(local_dir(None), Path::new("/var/run"));
        assert_eq!(local_dir(Some(OsStr::new("/run/chime"))), Path::new("/run/chime"));
        assert_eq!(local_dir(Some(OsStr::new("/run/chime:/run/other"))), Path::new("/run/chime"));
        assert_eq!(local_dir(Some(OsStr::new(""))), Path::new("/var/run"));
        assert_eq!(local_dir(Some(OsStr::new("relative"))), Path::new("/var/run"));
    }

    #[test]
    fn get_matches_the_standard_layout() {
        let b = encode(0x0102, ACTION_GET, TIME_STATUS_NP, 0, &[]);
        assert_eq!(b.len(), 54);
        assert_eq!(&b[0..6], &[0x0D, 0x02, 0x00, 54, 0x00, 0x00]);
        assert_eq!(&b[30..34], &[0x01, 0x02, 0x04, 0x7F]);
        assert_eq!(&b[34..44], &[0xFF; 10]);
        assert_eq!(&b[44..48], &[0, 0, ACTION_GET, 0]);
        assert_eq!(&b[48..54], &[0x00, 0x01, 0x00, 0x02, 0xC0, 0x00]);
        let m = decode(&b).unwrap();
        assert_eq!((m.sequence_id, m.action, m.tlv_type, m.management_id), (0x0102, 0, TLV_MANAGEMENT, TIME_STATUS_NP));
        assert!(m.data.is_empty());
    }

    #[test]
    fn time_status_fixture() {
        // master_offset -1234 ns, gmPresent 1, gmIdentity 00:11:..:77.
        let mut data = [0u8; TIME_STATUS_LEN];
        data[0..8].copy_from_slice(&(-1234i64).to_be_bytes());
        data[41] = 1;
        data[42..50].copy_from_slice(&[0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]);
        let ts = TimeStatus::decode(&data).unwrap();
        assert_eq!(ts.master_offset_ns, -1234);
        assert!(ts.gm_present);
        assert_eq!(ts.gm_identity, [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]);
        assert_eq!(TimeStatus::decode(&ts.encode()).unwrap(), ts);
        let p = ParentData { gm_clock_class: 7, gm_clock_accuracy: 0x22, gm_identity: [9; 8] };
        assert_eq!(ParentData::decode(&p.encode()).unwrap(), p);
        assert!(TimeStatus::decode(&data[..49]).is_err());
        assert!(ParentData::decode(&[0; 31]).is_err());
    }

    #[test]
    fn decode_rejects_garbage() {
        assert!(decode(b"").is_err());
        assert!(decode(&[0u8; 60]).is_err());
        let mut b = encode(1, ACTION_RESPONSE, TIME_STATUS_NP, 0, &[0; 50]);
        b[50] = 0xFF; // TLV length beyond the message
        assert!(decode(&b).is_err());
        let e = decode(&encode_error(3, PARENT_DATA_SET)).unwrap();
        assert_eq!((e.tlv_type, e.management_id, e.sequence_id), (TLV_MANAGEMENT_ERROR_STATUS, PARENT_DATA_SET, 3));
    }

    #[test]
    fn accuracy_codes() {
        assert_eq!(clock_accuracy_secs(0x21), 100e-9);
        assert_eq!(clock_accuracy_secs(0x2F), 1.0);
        assert_eq!(clock_accuracy_secs(0xFE), 1e-3);
        assert!((clock_accuracy_secs(0x17) - 1e-12).abs() < 1e-20);
        assert!((clock_accuracy_secs(0x1F) - 10e-9).abs() < 1e-18);
        assert!((clock_accuracy_secs(0x1E) - 2.5e-9).abs() < 1e-18);
    }

    #[test]
    fn degradation_rules() {
        let ts = |off, present| TimeStatus { master_offset_ns: off, gm_present: present, gm_identity: [1; 8] };
        let gm = |class, acc| ParentData { gm_clock_class: class, gm_clock_accuracy: acc, gm_identity: [1; 8] };
        let mut since = None;
        let s = state_from(&ts(-40, true), &gm(6, 0x21), t(0.0), &mut since);
        assert!(s.synchronized);
        assert_eq!((s.stratum, s.reference_id, s.reference_time), (1, REFID_PTP, None));
        assert!((s.root_dispersion - 140e-9).abs() < 1e-15);
        assert_eq!(s.offset, Some(-40e-9));
        // Holdover within spec: still stratum 1.
        let s = state_from(&ts(50, true), &gm(7, 0x21), t(1.0), &mut since);
        assert_eq!(s.stratum, 1);
        // Holdover out of spec: stratum 2, dispersion grows from the start.
        let s = state_from(&ts(50, true), &gm(187, 0x21), t(10.0), &mut since);
        assert_eq!((s.stratum, s.reference_time), (2, Some(t(10.0))));
        assert!((s.root_dispersion - 150e-9).abs() < 1e-15);
        let s = state_from(&ts(50, true), &gm(52, 0x21), t(110.0), &mut since);
        assert_eq!((s.stratum, s.reference_time), (2, Some(t(10.0))));
        assert!((s.root_dispersion - (150e-9 + 15e-6 * 100.0)).abs() < 1e-12);
        // Locked again.
        let s = state_from(&ts(50, true), &gm(6, 0x21), t(120.0), &mut since);
        assert_eq!(s.stratum, 1);
        assert_eq!(since, None);
        // Large offset: not locked.
        let s = state_from(&ts(500_000, true), &gm(6, 0x21), t(130.0), &mut since);
        assert_eq!(s.stratum, 2);
        // No grandmaster, or an untraceable one: unsynchronized.
        assert!(!state_from(&ts(0, false), &gm(6, 0x21), t(140.0), &mut since).synchronized);
        assert!(!state_from(&ts(0, true), &gm(248, 0xFE), t(140.0), &mut since).synchronized);
        assert!(!state_from(&ts(0, true), &gm(255, 0xFE), t(140.0), &mut since).synchronized);
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "chime-ptp-test-{}-{}",
            std::process::id(),
            SOCKETS.load(Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn against_a_fake_ptp4l() {
        let d = dir().join("a");
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("ptp4l");
        let fake = FakePtp4l::start(&path, FakePtp::default());
        let mut src = Ptp4lSource::with_local_dir(&path, 0, &d).unwrap();
        let local = src.local_path().to_path_buf();
        assert!(local.exists());
        let s = src.read(now_ntp()).unwrap();
        assert!(s.synchronized);
        assert_eq!((s.stratum, s.reference_id), (1, REFID_PTP));
        assert!((s.root_dispersion - 125e-9).abs() < 1e-12, "{}", s.root_dispersion);

        fake.set(FakePtp {
            parent: ParentData { gm_clock_class: 248, ..FakePtp::default().parent },
            ..FakePtp::default()
        });
        assert!(!src.read(now_ntp()).unwrap().synchronized);
        fake.set(FakePtp { misbehave: Some(Misbehave::ErrorStatus), ..FakePtp::default() });
        assert!(matches!(src.read(now_ntp()), Err(UpstreamError::Refused(_))));
        fake.set(FakePtp { misbehave: Some(Misbehave::Garbage), ..FakePtp::default() });
        assert!(matches!(src.read(now_ntp()), Err(UpstreamError::Malformed(_))));
        fake.set(FakePtp { misbehave: Some(Misbehave::WrongOrigin), ..FakePtp::default() });
        assert!(matches!(src.read(now_ntp()), Err(UpstreamError::Timeout(_))));
        fake.set(FakePtp { misbehave: Some(Misbehave::Silent), ..FakePtp::default() });
        assert!(matches!(src.read(now_ntp()), Err(UpstreamError::Timeout(_))));
        fake.set(FakePtp::default());
        assert!(src.read(now_ntp()).unwrap().synchronized, "recovers");
        drop(fake);
        assert!(src.read(now_ntp()).is_err(), "ptp4l gone");
        drop(src);
        assert!(!local.exists(), "own socket removed on drop");
        let _ = std::fs::remove_dir_all(&d);
    }
}
