//! chime-load's XDP program (`ebpf/xdp/chime_load_xdp.c`) on the load
//! generator's interface, and its loader.
//!
//! The generator sends raw frames from addresses of a source prefix that no
//! host owns; the server's replies to them come back to the generator's
//! interface, where this program steers UDP from the server's port to an
//! address inside the prefix to the AF_XDP socket of the receiving queue,
//! stamped with its receive time in [`XdpMeta`](crate::program::XdpMeta)'s
//! layout (`bpf_ktime_get_tai_ns()`, never a hardware stamp). Everything
//! else — ARP, NDP, ICMP, the NTS-KE connection — passes to the kernel.
//!
//! [`LoadXdp::attach`] loads and attaches it (native, falling back to
//! generic in [`XdpMode::Auto`]); a stale `chime_load_xdp` left by a crash
//! is replaced, any other program (chimed's included) is refused. It is
//! detached when the [`LoadXdp`] is dropped, and only if it is still the
//! one attached.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use libbpf_rs::{MapCore, MapFlags, MapHandle, Object};
use tracing::{info, warn};

use crate::loader::{self, LoadError, TestRun, XdpMode};

/// The compiled program (`ebpf/xdp/build.sh`, reproducible, committed).
pub static LOAD_XDP_OBJECT: &[u8] = include_bytes!("../xdp/chime_load_xdp.o");

/// The program's name.
pub const PROG: &str = "chime_load_xdp";

/// Maximum entries of the `xsks` map (queue ids 0..256).
pub const XSKS_MAX: u32 = 256;

/// Map names in the object, each with one purpose (see the C source).
pub mod maps {
    /// XSKMAP: AF_XDP socket per RX queue.
    pub const XSKS: &str = "xsks";
    /// ARRAY\[1\] of `chime_load_config`.
    pub const CONFIG: &str = "config";
    /// PERCPU_ARRAY of u64 indexed by [`LoadCounter`](super::LoadCounter).
    pub const STATS: &str = "stats";
    /// Every map, in declaration order.
    pub const ALL: [&str; 3] = [XSKS, CONFIG, STATS];
}

/// What the program steers: replies from `port` to addresses in `v4`/`v6`
/// (prefix, length); a family without a prefix is never steered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadXdpConfig {
    /// The server's UDP port (the replies' source port).
    pub port: u16,
    /// The IPv4 source prefix of the simulated clients.
    pub v4: Option<(Ipv4Addr, u8)>,
    /// The IPv6 source prefix of the simulated clients.
    pub v6: Option<(Ipv6Addr, u8)>,
}

impl LoadXdpConfig {
    /// Size of `struct chime_load_config`.
    pub const LEN: usize = 48;

    /// The map value's bytes (`struct chime_load_config`); an error for a
    /// prefix length beyond the address width.
    pub fn to_bytes(&self) -> Result<[u8; Self::LEN], LoadError> {
        let mut out = [0u8; Self::LEN];
        out[0..2].copy_from_slice(&self.port.to_be_bytes());
        if let Some((addr, len)) = self.v4 {
            if len > 32 {
                return Err(LoadError::Invalid(format!("prefix {addr}/{len}")));
            }
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            out[2] |= 1;
            out[4..8].copy_from_slice(&(u32::from(addr) & mask).to_be_bytes());
            out[8..12].copy_from_slice(&mask.to_be_bytes());
        }
        if let Some((addr, len)) = self.v6 {
            if len > 128 {
                return Err(LoadError::Invalid(format!("prefix {addr}/{len}")));
            }
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            out[2] |= 2;
            out[16..32].copy_from_slice(&(u128::from(addr) & mask).to_be_bytes());
            out[32..48].copy_from_slice(&mask.to_be_bytes());
        }
        Ok(out)
    }
}

/// Indexes of the program's per-CPU `stats` array (`enum chime_load_stat`);
/// every packet is counted under exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
#[repr(u32)]
pub enum LoadCounter {
    /// Not IPv4/IPv6 (ARP, VLAN-tagged, ...): passed.
    PassNotIp = 0,
    /// IP but not UDP (ICMP, NDP, TCP, IPv6 extension headers): passed.
    PassNotUdp = 1,
    /// IPv4 fragment: passed.
    PassFragment = 2,
    /// UDP, but not from the server's port to the prefix: passed.
    PassOther = 3,
    /// Truncated or invalid headers: passed.
    PassMalformed = 4,
    /// A reply, but no AF_XDP socket on the queue: passed.
    PassNoSocket = 5,
    /// A reply, redirected to the queue's AF_XDP socket.
    Redirect = 6,
}

impl LoadCounter {
    /// Number of counters (`CHIME_LOAD_STAT_COUNT`).
    pub const COUNT: usize = 7;

    /// Every counter, in index order.
    pub const ALL: [Self; Self::COUNT] = [
        Self::PassNotIp,
        Self::PassNotUdp,
        Self::PassFragment,
        Self::PassOther,
        Self::PassMalformed,
        Self::PassNoSocket,
        Self::Redirect,
    ];

    /// Index in the `stats` map.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Stable name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::PassNotIp => "pass_not_ip",
            Self::PassNotUdp => "pass_not_udp",
            Self::PassFragment => "pass_fragment",
            Self::PassOther => "pass_other",
            Self::PassMalformed => "pass_malformed",
            Self::PassNoSocket => "pass_no_socket",
            Self::Redirect => "redirect",
        }
    }
}

/// Totals of the program's counters over all CPUs, indexed by
/// [`LoadCounter::index`].
pub type LoadStats = [u64; LoadCounter::COUNT];

/// The program loaded with its maps, not attached: what [`LoadXdp`] holds,
/// and by itself what `BPF_PROG_TEST_RUN` tests use.
pub struct LoadXdpProgram {
    obj: Object,
    name: &'static str,
    id: u32,
    xsks: MapHandle,
    config: MapHandle,
    stats: MapHandle,
}

impl fmt::Debug for LoadXdpProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadXdpProgram").field("name", &self.name).field("id", &self.id).finish()
    }
}

impl LoadXdpProgram {
    /// Opens the embedded object, loads the program and writes its config.
    pub fn load(cfg: &LoadXdpConfig) -> Result<Self, LoadError> {
        let (obj, name) = loader::load_program(LOAD_XDP_OBJECT, PROG, |_, _| Ok(()))?;
        let program = Self {
            name,
            id: loader::prog_id(&obj, name)?,
            xsks: loader::find_map(&obj, maps::XSKS)?,
            config: loader::find_map(&obj, maps::CONFIG)?,
            stats: loader::find_map(&obj, maps::STATS)?,
            obj,
        };
        program.set_config(cfg)?;
        Ok(program)
    }

    /// The program's kernel id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The program's descriptor.
    pub fn prog_fd(&self) -> BorrowedFd<'_> {
        loader::prog_fd(&self.obj, self.name)
    }

    /// The program's name ([`PROG`]).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Writes the `config` map.
    pub fn set_config(&self, cfg: &LoadXdpConfig) -> Result<(), LoadError> {
        self.config
            .update(&0u32.to_ne_bytes(), &cfg.to_bytes()?, MapFlags::ANY)
            .map_err(|source| LoadError::Map { map: maps::CONFIG, source })
    }

    /// Steers queue `queue`'s replies to the AF_XDP socket `xsk_fd`.
    pub fn register_socket(&self, queue: u32, xsk_fd: RawFd) -> Result<(), LoadError> {
        loader::register_xsk(&self.xsks, maps::XSKS, XSKS_MAX, queue, xsk_fd)
    }

    /// Stops steering queue `queue` (its packets pass to the kernel).
    pub fn unregister_socket(&self, queue: u32) -> Result<(), LoadError> {
        loader::unregister_xsk(&self.xsks, maps::XSKS, queue)
    }

    /// The counters summed over all CPUs.
    pub fn stats(&self) -> Result<LoadStats, LoadError> {
        loader::percpu_sums(&self.stats, maps::STATS)
    }

    /// Runs the program once over `frame` with `BPF_PROG_TEST_RUN` (root).
    /// Redirects are not carried out.
    pub fn test_run(&self, frame: &[u8]) -> Result<TestRun, LoadError> {
        loader::test_run(&self.obj, self.name, frame)
    }
}

/// chime-load's program attached to an interface; detached on drop.
#[derive(Debug)]
pub struct LoadXdp {
    program: LoadXdpProgram,
    ifindex: u32,
    mode: XdpMode,
    attached: bool,
}

fn is_load_program(name: &str) -> bool {
    name == PROG
}

impl LoadXdp {
    /// Loads the program with `cfg` and attaches it to `ifindex` in `mode`
    /// ([`XdpMode::Auto`]: native, else generic with a warning).
    pub fn attach(ifindex: u32, mode: XdpMode, cfg: &LoadXdpConfig) -> Result<Self, LoadError> {
        let program = LoadXdpProgram::load(cfg)?;
        let fd = program.prog_fd().as_raw_fd();
        let first = if mode == XdpMode::Generic { XdpMode::Generic } else { XdpMode::Native };
        let used = match loader::attach(fd, ifindex, first, false, is_load_program) {
            Ok(()) => first,
            Err(LoadError::Attach { source, .. })
                if mode == XdpMode::Auto && !matches!(source.raw_os_error(), Some(libc::EEXIST | libc::EBUSY)) =>
            {
                warn!(ifindex, error = %source, "native XDP attach failed; falling back to generic mode");
                loader::attach(fd, ifindex, XdpMode::Generic, false, is_load_program)?;
                XdpMode::Generic
            }
            Err(e) => return Err(e),
        };
        info!(ifindex, mode = %used, id = program.id(), "chime-load XDP program attached");
        Ok(Self { program, ifindex, mode: used, attached: true })
    }

    /// The loaded program and its maps.
    pub fn program(&self) -> &LoadXdpProgram {
        &self.program
    }

    /// The mode it is attached in.
    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// The interface.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Detaches the program if it is still the one attached in our mode.
    /// Returns whether it was detached.
    pub fn detach(&mut self) -> Result<bool, LoadError> {
        if !self.attached {
            return Ok(false);
        }
        self.attached = false;
        loader::detach_if_current(self.ifindex, self.mode, self.program.prog_fd().as_raw_fd())
    }
}

impl Drop for LoadXdp {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            warn!(error = %e, "detaching chime-load's XDP program");
        }
    }
}

#[cfg(test)]
mod tests {
    use libbpf_rs::MapType;

    use super::*;

    #[test]
    fn config_bytes() {
        let c = LoadXdpConfig {
            port: 123,
            v4: Some(("198.19.7.9".parse().unwrap(), 16)),
            v6: Some(("fdc4:1e:1::5".parse().unwrap(), 64)),
        };
        let b = c.to_bytes().unwrap();
        assert_eq!(b[..4], [0x00, 0x7b, 3, 0]);
        assert_eq!(b[4..12], [198, 19, 0, 0, 0xff, 0xff, 0, 0], "prefix masked, mask");
        assert_eq!(b[16..32], [0xfd, 0xc4, 0, 0x1e, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[32..48], [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        let none = LoadXdpConfig { port: 4123, v4: None, v6: None }.to_bytes().unwrap();
        assert_eq!(none[..4], [0x10, 0x1b, 0, 0]);
        assert!(none[4..].iter().all(|&b| b == 0));
        let all = LoadXdpConfig { port: 1, v4: Some((Ipv4Addr::BROADCAST, 0)), v6: None }.to_bytes().unwrap();
        assert_eq!(all[4..12], [0; 8], "/0: everything");
        assert!(LoadXdpConfig { port: 1, v4: Some((Ipv4Addr::LOCALHOST, 33)), v6: None }.to_bytes().is_err());
        assert!(LoadXdpConfig { port: 1, v4: None, v6: Some((Ipv6Addr::LOCALHOST, 129)) }.to_bytes().is_err());
    }

    #[test]
    fn counters_are_dense_and_named_uniquely() {
        for (i, c) in LoadCounter::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        let mut names: Vec<_> = LoadCounter::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), LoadCounter::COUNT);
    }

    /// Unprivileged: the committed object declares what the loader expects.
    #[test]
    fn committed_object_declares_program_and_maps() {
        crate::program::object_checks::assert_object_declares(
            LOAD_XDP_OBJECT,
            &[PROG],
            &[
                (maps::XSKS, MapType::Xskmap, 4, 4, XSKS_MAX),
                (maps::CONFIG, MapType::Array, 4, LoadXdpConfig::LEN as u32, 1),
                (maps::STATS, MapType::PercpuArray, 4, 8, LoadCounter::COUNT as u32),
            ],
        );
    }
}
