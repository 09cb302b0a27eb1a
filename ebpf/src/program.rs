//! The XDP program: the committed object and Rust mirrors of the definitions
//! it shares with userspace (`ebpf/xdp/chime_xdp.h`).
//!
//! The program steers UDP to the configured port (123) for the server's own
//! addresses to the AF_XDP socket of the receiving queue, after writing a
//! [`XdpMeta`] receive stamp just before the packet; it drops, in the kernel,
//! requests that are too short, not mode 3 (when configured), from denied
//! sources or from a source over its per-source rate ([`SourceLimit`]);
//! everything else passes to the kernel. See `ebpf/xdp/chime_xdp.c`.

/// The compiled program (`ebpf/xdp/build.sh`, reproducible, committed).
pub static XDP_OBJECT: &[u8] = include_bytes!("../xdp/chime_xdp.o");

/// Name of the program that stamps with `bpf_ktime_get_tai_ns()`.
pub const PROG_SW: &str = "chime_xdp";
/// Name of the device-bound program that stamps with the NIC's clock.
pub const PROG_HW: &str = "chime_xdp_hw";

/// Map names in the object, each with one purpose (see the C source).
pub mod maps {
    /// XSKMAP: AF_XDP socket per RX queue.
    pub const XSKS: &str = "xsks";
    /// ARRAY\[1\] of `chime_xdp_config`.
    pub const CONFIG: &str = "config";
    /// HASH: IPv4 server addresses (network order) → 1.
    pub const SERVER_V4: &str = "server_v4";
    /// HASH: IPv6 server addresses → 1.
    pub const SERVER_V6: &str = "server_v6";
    /// LPM trie: IPv4 source prefixes to drop.
    pub const DENY_V4: &str = "deny_v4";
    /// LPM trie: IPv6 source prefixes to drop.
    pub const DENY_V6: &str = "deny_v6";
    /// LRU_PERCPU_HASH: source address (IPv4 as `::ffff:a.b.c.d`) → the
    /// time its next request is due (the per-source limit).
    pub const SRC_LIMIT: &str = "src_limit";
    /// PERCPU_ARRAY of u64 indexed by [`XdpCounter`](super::XdpCounter).
    pub const STATS: &str = "stats";
    /// Every map, in declaration order.
    pub const ALL: [&str; 8] = [XSKS, CONFIG, SERVER_V4, SERVER_V6, DENY_V4, DENY_V6, SRC_LIMIT, STATS];
}

/// Maximum entries of the `xsks` map (queue ids 0..256).
pub const XSKS_MAX: u32 = 256;
/// Maximum server addresses per family.
pub const SERVERS_MAX: u32 = 256;
/// Maximum deny prefixes per family.
pub const DENY_MAX: u32 = 65536;
/// Capacity of the `src_limit` map in the object (the loader sets the
/// configured one, [`ProgramOptions::source_entries`](crate::loader::ProgramOptions)).
pub const SRC_LIMIT_ENTRIES: u32 = 65536;

/// Length of the receive header the program prepends to each steered packet.
pub const META_LEN: usize = 16;
/// `chime_xdp_meta.magic`: the receive header is present and has this layout.
pub const META_MAGIC: u32 = 0xC41E_0001;
/// `chime_xdp_meta.flags` bit: `rx_ns` is the NIC's hardware stamp.
pub const META_HW: u32 = 1;

/// The receive stamp the program prepends to each steered frame
/// (`struct chime_xdp_meta`, native byte order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpMeta {
    /// Nanoseconds: the NIC's PHC time when [`XdpMeta::is_hw`], else
    /// `CLOCK_TAI` read by `bpf_ktime_get_tai_ns()` (subtract the kernel's TAI
    /// offset for UTC).
    pub rx_ns: u64,
    /// `CHIME_META_*` bits.
    pub flags: u32,
}

impl XdpMeta {
    /// Parses the 16 header bytes; `None` when the magic is missing (the
    /// program could not write the header: stamp in userspace).
    pub fn from_bytes(bytes: &[u8; META_LEN]) -> Option<Self> {
        let rx_ns = u64::from_ne_bytes(bytes[0..8].try_into().ok()?);
        let flags = u32::from_ne_bytes(bytes[8..12].try_into().ok()?);
        let magic = u32::from_ne_bytes(bytes[12..16].try_into().ok()?);
        (magic == META_MAGIC).then_some(Self { rx_ns, flags })
    }

    /// The receive header at the start of an AF_XDP frame the program
    /// steered (prepended with `bpf_xdp_adjust_head`; the Ethernet header
    /// follows it). `None` when the frame does not start with one: the
    /// program had no headroom, and the whole frame is the packet.
    pub fn from_frame(frame: &[u8]) -> Option<Self> {
        if frame.len() <= META_LEN {
            return None;
        }
        Self::from_bytes(frame[..META_LEN].try_into().ok()?)
    }

    /// The layout the program writes (for tests and fixtures).
    pub fn to_bytes(&self) -> [u8; META_LEN] {
        let mut out = [0u8; META_LEN];
        out[0..8].copy_from_slice(&self.rx_ns.to_ne_bytes());
        out[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        out[12..16].copy_from_slice(&META_MAGIC.to_ne_bytes());
        out
    }

    /// True when `rx_ns` comes from the NIC's clock.
    pub fn is_hw(&self) -> bool {
        self.flags & META_HW != 0
    }
}

/// The program's per-source limit: a token bucket of `burst` requests
/// refilled at `rate` per second, per source address (and per CPU, see
/// the `src_limit` map in the C source).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimit {
    /// Requests per second a source may sustain (at least 1).
    pub rate: u32,
    /// Requests a quiet source may send back to back (at least 1).
    pub burst: u32,
}

impl SourceLimit {
    /// 1,000 requests per second, bursts of 2,000: far above any honest
    /// client (or a large NAT of them), far below what fills a worker.
    pub const DEFAULT: Self = Self { rate: 1000, burst: 2000 };

    /// Nanoseconds one request costs (`1e9 / rate`, rounded, at least 1).
    pub fn interval_ns(&self) -> u64 {
        let rate = u64::from(self.rate.max(1));
        (NANOS_PER_SEC.saturating_add(rate / 2) / rate).max(1)
    }

    /// How far ahead of now a source's schedule may run: `(burst - 1)`
    /// intervals.
    pub fn tolerance_ns(&self) -> u64 {
        u64::from(self.burst.saturating_sub(1)).saturating_mul(self.interval_ns())
    }
}

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// The one entry of the `config` map (`struct chime_xdp_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpConfig {
    /// UDP destination port steered to AF_XDP (host order here).
    pub port: u16,
    /// Drop NTP packets whose mode is not 3 (client).
    pub drop_non_client: bool,
    /// Drop requests of a source over this rate (`None`: no limit).
    pub source_limit: Option<SourceLimit>,
}

impl XdpConfig {
    /// Size of `struct chime_xdp_config`.
    pub const LEN: usize = 24;

    /// The map value's bytes.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..2].copy_from_slice(&self.port.to_be_bytes());
        out[2] = u8::from(self.drop_non_client);
        let (interval, tolerance) = self.source_limit.map_or((0, 0), |l| (l.interval_ns(), l.tolerance_ns()));
        out[8..16].copy_from_slice(&interval.to_ne_bytes());
        out[16..24].copy_from_slice(&tolerance.to_ne_bytes());
        out
    }
}

impl Default for XdpConfig {
    fn default() -> Self {
        Self { port: 123, drop_non_client: true, source_limit: Some(SourceLimit::DEFAULT) }
    }
}

/// Indexes of the program's per-CPU `stats` array (`enum chime_stat`).
///
/// Every packet is counted under exactly one verdict counter
/// ([`XdpCounter::is_verdict`]); the last three count the receive headers written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
#[repr(u32)]
pub enum XdpCounter {
    /// Not IPv4/IPv6 (ARP, LLDP, double VLAN tags, ...): passed.
    PassNotIp = 0,
    /// IP but not UDP: passed.
    PassNotUdp = 1,
    /// IPv4 fragment: passed.
    PassFragment = 2,
    /// IPv6 with an extension header: passed.
    PassIpv6Ext = 3,
    /// UDP to another port: passed.
    PassOtherPort = 4,
    /// NTP port, but not one of the server addresses: passed.
    PassOtherDest = 5,
    /// Truncated or invalid headers: passed (the kernel counts and drops).
    PassMalformed = 6,
    /// Steered, but no AF_XDP socket on the queue: passed.
    PassNoSocket = 7,
    /// UDP payload shorter than 48 bytes: dropped.
    DropShort = 8,
    /// NTP mode other than 3 (client): dropped.
    DropNotClient = 9,
    /// Source in the deny list: dropped.
    DropDenied = 10,
    /// Redirected to the queue's AF_XDP socket.
    Redirect = 11,
    /// No headroom for the receive header: steered without a stamp.
    MetaFailed = 12,
    /// Stamped with the NIC's clock.
    StampHw = 13,
    /// Stamped with `bpf_ktime_get_tai_ns()`.
    StampSw = 14,
    /// Source over its per-source rate ([`SourceLimit`]): dropped. A
    /// verdict, numbered after the stamp counters because it came later.
    DropFlood = 15,
}

impl XdpCounter {
    /// Number of counters (`CHIME_STAT_COUNT`, the `stats` map's size).
    pub const COUNT: usize = 16;

    /// Every counter, in index order.
    pub const ALL: [XdpCounter; Self::COUNT] = [
        Self::PassNotIp,
        Self::PassNotUdp,
        Self::PassFragment,
        Self::PassIpv6Ext,
        Self::PassOtherPort,
        Self::PassOtherDest,
        Self::PassMalformed,
        Self::PassNoSocket,
        Self::DropShort,
        Self::DropNotClient,
        Self::DropDenied,
        Self::Redirect,
        Self::MetaFailed,
        Self::StampHw,
        Self::StampSw,
        Self::DropFlood,
    ];

    /// Index in the `stats` map.
    pub fn index(self) -> u32 {
        self as u32
    }

    /// Stable label for metrics (never renamed).
    pub fn name(self) -> &'static str {
        match self {
            Self::PassNotIp => "pass_not_ip",
            Self::PassNotUdp => "pass_not_udp",
            Self::PassFragment => "pass_fragment",
            Self::PassIpv6Ext => "pass_ipv6_ext",
            Self::PassOtherPort => "pass_other_port",
            Self::PassOtherDest => "pass_other_dest",
            Self::PassMalformed => "pass_malformed",
            Self::PassNoSocket => "pass_no_socket",
            Self::DropShort => "drop_short",
            Self::DropNotClient => "drop_not_client",
            Self::DropDenied => "drop_denied",
            Self::Redirect => "redirect",
            Self::MetaFailed => "meta_failed",
            Self::StampHw => "stamp_hw",
            Self::StampSw => "stamp_sw",
            Self::DropFlood => "drop_flood",
        }
    }

    /// True for the counters of which exactly one moves per packet.
    pub fn is_verdict(self) -> bool {
        self.index() <= Self::Redirect.index() || self == Self::DropFlood
    }
}

/// Totals of the program's counters over all CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpStats {
    counts: [u64; XdpCounter::COUNT],
}

impl XdpStats {
    /// Builds from totals indexed by [`XdpCounter::index`].
    pub fn from_counts(counts: [u64; XdpCounter::COUNT]) -> Self {
        Self { counts }
    }

    /// One counter's total.
    pub fn get(&self, counter: XdpCounter) -> u64 {
        self.counts[counter.index() as usize]
    }

    /// Every counter with its total, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (XdpCounter, u64)> + '_ {
        XdpCounter::ALL.iter().map(|&c| (c, self.get(c)))
    }

    /// Packets seen (the sum of the verdict counters).
    pub fn packets(&self) -> u64 {
        self.iter().filter(|(c, _)| c.is_verdict()).map(|(_, v)| v).sum()
    }

    /// Counter-wise difference `self - earlier` (saturating).
    pub fn since(&self, earlier: &XdpStats) -> XdpStats {
        let mut counts = [0u64; XdpCounter::COUNT];
        for (i, c) in counts.iter_mut().enumerate() {
            *c = self.counts[i].saturating_sub(earlier.counts[i]);
        }
        XdpStats { counts }
    }
}

#[cfg(test)]
mod tests {
    use libbpf_rs::MapType;

    use super::object_checks::assert_object_declares;
    use super::*;

    #[test]
    fn meta_round_trip_and_magic() {
        let m = XdpMeta { rx_ns: 0x1122_3344_5566_7788, flags: META_HW };
        assert_eq!(XdpMeta::from_bytes(&m.to_bytes()), Some(m));
        assert!(m.is_hw());
        let mut b = m.to_bytes();
        b[15] ^= 0xff;
        assert_eq!(XdpMeta::from_bytes(&b), None);
        assert_eq!(XdpMeta::from_bytes(&[0; META_LEN]), None);
    }

    #[test]
    fn config_bytes() {
        let c = XdpConfig { port: 123, drop_non_client: true, source_limit: None };
        assert_eq!(c.to_bytes(), [0x00, 0x7b, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let c = XdpConfig { source_limit: Some(SourceLimit { rate: 1000, burst: 3 }), ..c };
        let b = c.to_bytes();
        assert_eq!(b[..8], [0x00, 0x7b, 1, 0, 0, 0, 0, 0]);
        assert_eq!(u64::from_ne_bytes(b[8..16].try_into().unwrap()), 1_000_000);
        assert_eq!(u64::from_ne_bytes(b[16..24].try_into().unwrap()), 2_000_000);
    }

    #[test]
    fn source_limit_arithmetic() {
        let l = SourceLimit::DEFAULT;
        assert_eq!((l.interval_ns(), l.tolerance_ns()), (1_000_000, 1_999_000_000));
        assert_eq!(SourceLimit { rate: 3, burst: 1 }.interval_ns(), 333_333_333);
        assert_eq!(SourceLimit { rate: 3, burst: 1 }.tolerance_ns(), 0, "burst 1: no request ahead of time");
        assert_eq!(SourceLimit { rate: 2_000_000_000, burst: 2 }.interval_ns(), 1, "never 0 (0 means off)");
        assert_eq!(SourceLimit { rate: 0, burst: 0 }.interval_ns(), NANOS_PER_SEC);
        let huge = SourceLimit { rate: 1, burst: u32::MAX };
        assert_eq!(huge.tolerance_ns(), u64::from(u32::MAX - 1) * NANOS_PER_SEC);
    }

    #[test]
    fn counters_are_dense_and_named_uniquely() {
        for (i, c) in XdpCounter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i);
        }
        let mut names: Vec<_> = XdpCounter::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), XdpCounter::COUNT);
        assert_eq!(XdpCounter::ALL.iter().filter(|c| c.is_verdict()).count(), 13);
        assert!(XdpCounter::DropFlood.is_verdict() && !XdpCounter::StampSw.is_verdict());
    }

    /// Unprivileged: the committed object parses and declares what the loader
    /// expects (programs, map types, key/value sizes, capacities).
    #[test]
    fn committed_object_declares_programs_and_maps() {
        assert_object_declares(
            XDP_OBJECT,
            &[PROG_SW, PROG_HW],
            &[
                (maps::XSKS, MapType::Xskmap, 4, 4, XSKS_MAX),
                (maps::CONFIG, MapType::Array, 4, XdpConfig::LEN as u32, 1),
                (maps::SERVER_V4, MapType::Hash, 4, 1, SERVERS_MAX),
                (maps::SERVER_V6, MapType::Hash, 16, 1, SERVERS_MAX),
                (maps::DENY_V4, MapType::LpmTrie, 8, 1, DENY_MAX),
                (maps::DENY_V6, MapType::LpmTrie, 20, 1, DENY_MAX),
                (maps::SRC_LIMIT, MapType::LruPercpuHash, 16, 8, SRC_LIMIT_ENTRIES),
                (maps::STATS, MapType::PercpuArray, 4, 8, XdpCounter::COUNT as u32),
            ],
        );
    }

    /// Where clang-14 is installed (CI installs it) `ebpf/xdp/build.sh`
    /// rebuilds the objects into a temporary directory; they must equal the
    /// committed ones byte for byte.
    #[test]
    fn committed_object_is_reproducible() {
        let have = |tool: &str| {
            std::process::Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
        };
        if !have("clang-14") || !have("llvm-strip-14") {
            eprintln!("skipping: clang-14/llvm-strip-14 not installed, cannot rebuild the XDP object");
            return;
        }
        if !std::path::Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
            eprintln!("skipping: libbpf-dev not installed (bpf/bpf_helpers.h), cannot rebuild the XDP object");
            return;
        }
        let xdp_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("xdp");
        let out = std::env::temp_dir().join(format!("chime-xdp-rebuild-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let status =
            std::process::Command::new("sh").arg(xdp_dir.join("build.sh")).arg(&out).status().expect("run build.sh");
        assert!(status.success(), "build.sh failed: {status}");
        for obj in ["chime_xdp.o", "chime_load_xdp.o", "test_foreign.o"] {
            let rebuilt = std::fs::read(out.join(obj)).expect("read rebuilt object");
            let committed = std::fs::read(xdp_dir.join(obj)).expect("read committed object");
            assert!(
                rebuilt == committed,
                "{obj}: rebuilt object differs from the committed one; run ebpf/xdp/build.sh and commit"
            );
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// Checks of the committed objects shared by their unit tests.
#[cfg(test)]
pub(crate) mod object_checks {
    use libbpf_rs::{MapType, ObjectBuilder, ProgramType};

    /// Asserts that `object` opens (unprivileged) and declares exactly the
    /// XDP programs `progs` (sorted by name) and the maps `maps` (name,
    /// type, key size, value size, capacity); LPM tries must be
    /// `BPF_F_NO_PREALLOC`.
    pub(crate) fn assert_object_declares(object: &[u8], progs: &[&str], maps: &[(&str, MapType, u32, u32, u32)]) {
        let obj = ObjectBuilder::default().open_memory(object).expect("open object");
        let mut found: Vec<_> = obj.progs().map(|p| (p.name().to_string_lossy().into_owned(), p.prog_type())).collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let want: Vec<_> = progs.iter().map(|p| ((*p).to_owned(), ProgramType::Xdp)).collect();
        assert_eq!(found, want);
        let found: Vec<_> = obj
            .maps()
            .map(|m| {
                (
                    m.name().to_string_lossy().into_owned(),
                    m.map_type(),
                    m.key_size(),
                    m.value_size(),
                    m.max_entries(),
                    m.map_flags(),
                )
            })
            .filter(|m| !m.0.starts_with('.'))
            .collect();
        assert_eq!(found.len(), maps.len(), "maps: {found:?}");
        for &(name, ty, ks, vs, max) in maps {
            let m = found.iter().find(|m| m.0 == name).unwrap_or_else(|| panic!("no map {name}"));
            assert_eq!((m.1, m.2, m.3, m.4), (ty, ks, vs, max), "map {name}");
            if ty == MapType::LpmTrie {
                assert_eq!(m.5 & libbpf_rs::libbpf_sys::BPF_F_NO_PREALLOC, libbpf_rs::libbpf_sys::BPF_F_NO_PREALLOC);
            }
        }
    }
}
