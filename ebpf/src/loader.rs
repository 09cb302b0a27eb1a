//! Loads chime's XDP program with libbpf-rs, fills its maps and attaches it.
//!
//! [`load`] opens the embedded object ([`XDP_OBJECT`]), picks the software-
//! or hardware-stamping program (the latter device-bound, so the NIC's RX
//! timestamp kfunc resolves to the driver's implementation), loads it, writes
//! the config and attaches it with "update if no program" semantics:
//! a stale chime program left by a crash is replaced (with a warning), a
//! foreign program is refused unless [`LoadOptions::replace_foreign`].
//! The program is detached when the [`LoadedXdp`] is dropped, and only if it
//! is still the one attached.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use libbpf_rs::libbpf_sys;
use libbpf_rs::{MapCore, MapFlags, MapHandle, Object, ObjectBuilder, OpenObject, ProgramHandle, ProgramInput};
use tracing::{info, warn};

use crate::program::{
    PROG_HW, PROG_SW, SRC_LIMIT_ENTRIES, SourceLimit, XDP_OBJECT, XSKS_MAX, XdpConfig, XdpMeta, XdpStats, maps,
};

/// How to attach the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum XdpMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): fast, needs driver support.
    Native,
    /// Generic, after the skb is built (`XDP_FLAGS_SKB_MODE`): works on any
    /// device, slow, copy-mode AF_XDP only.
    Generic,
    /// Native, falling back to generic with a warning.
    #[default]
    Auto,
}

impl XdpMode {
    pub(crate) fn flags(self) -> u32 {
        match self {
            XdpMode::Native => libbpf_sys::XDP_FLAGS_DRV_MODE,
            XdpMode::Generic => libbpf_sys::XDP_FLAGS_SKB_MODE,
            XdpMode::Auto => 0,
        }
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Auto => "auto",
        })
    }
}

/// What [`load`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Interface to attach to (see [`crate::ethtool::ifindex`]).
    pub ifindex: u32,
    /// Attach mode.
    pub mode: XdpMode,
    /// Stamp with the NIC's clock (device-bound `chime_xdp_hw`); frames the
    /// driver gives no stamp for still get the software stamp.
    pub hw_timestamps: bool,
    /// UDP port steered to AF_XDP.
    pub port: u16,
    /// Drop NTP packets whose mode is not 3 (client) in the kernel.
    pub drop_non_client: bool,
    /// Drop requests of a source over this rate in the kernel (`None`:
    /// no per-source limit).
    pub source_limit: Option<SourceLimit>,
    /// Sources the per-source limit tracks (the `src_limit` map's size).
    pub source_entries: u32,
    /// Replace another application's XDP program on the interface.
    pub replace_foreign: bool,
}

impl LoadOptions {
    /// Defaults: auto mode, software stamps, port 123, drop non-client
    /// modes, the default per-source limit over 65,536 sources, refuse to
    /// replace foreign programs.
    pub fn new(ifindex: u32) -> Self {
        Self {
            ifindex,
            mode: XdpMode::Auto,
            hw_timestamps: false,
            port: 123,
            drop_non_client: true,
            source_limit: Some(SourceLimit::DEFAULT),
            source_entries: SRC_LIMIT_ENTRIES,
            replace_foreign: false,
        }
    }
}

/// Why loading, attaching or updating the program failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The embedded object did not open (corrupt build).
    #[error("opening the XDP object: {0}")]
    Open(#[source] libbpf_rs::Error),
    /// The kernel refused the program (verifier, missing kfunc, device-bound
    /// load on a device that cannot).
    #[error("loading XDP program {program}: {source}")]
    Load {
        /// `chime_xdp` or `chime_xdp_hw`.
        program: &'static str,
        /// What libbpf said (the verifier log goes to libbpf's print callback).
        #[source]
        source: libbpf_rs::Error,
    },
    /// Another application's XDP program is attached.
    #[error("interface has a foreign XDP program {name:?} (id {id}); set replace_foreign to replace it")]
    ForeignProgram {
        /// Its name.
        name: String,
        /// Its kernel id.
        id: u32,
    },
    /// Querying the interface's XDP state failed.
    #[error("querying XDP on ifindex {ifindex}: {source}")]
    Query {
        /// The interface.
        ifindex: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Attaching failed.
    #[error("attaching XDP in {mode} mode to ifindex {ifindex}: {source}")]
    Attach {
        /// The mode tried last.
        mode: XdpMode,
        /// The interface.
        ifindex: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Device-bound programs (hardware timestamps) attach in native mode only.
    #[error("hardware timestamps need native XDP mode (device-bound program)")]
    HwNeedsNative,
    /// A map update failed.
    #[error("updating map {map}: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// The cause.
        #[source]
        source: libbpf_rs::Error,
    },
    /// More entries than the map holds.
    #[error("map {map} holds at most {max} entries, {given} given")]
    TooMany {
        /// The map.
        map: &'static str,
        /// Its capacity.
        max: u32,
        /// Entries asked for.
        given: usize,
    },
    /// A prefix length beyond the address width, or a queue beyond the map.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// `BPF_PROG_TEST_RUN` failed.
    #[error("test run: {0}")]
    TestRun(#[source] libbpf_rs::Error),
}

fn io_err(e: &libbpf_rs::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Settings of a loaded, not necessarily attached, program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramOptions {
    /// Load `chime_xdp_hw` bound to this interface; `None` loads `chime_xdp`.
    pub hw_ifindex: Option<u32>,
    /// The `config` map's contents.
    pub config: XdpConfig,
    /// Capacity of the `src_limit` map (sources tracked by the per-source
    /// limit; at least 1).
    pub source_entries: u32,
}

impl ProgramOptions {
    /// The software-stamping program with `config` and the default
    /// `src_limit` capacity.
    pub fn software(config: XdpConfig) -> Self {
        Self { hw_ifindex: None, config, source_entries: SRC_LIMIT_ENTRIES }
    }
}

/// A loaded program with its maps, not attached: what [`LoadedXdp`] holds,
/// and by itself what `BPF_PROG_TEST_RUN` tests use.
pub struct XdpProgram {
    obj: Object,
    name: &'static str,
    id: u32,
    xsks: MapHandle,
    config: MapHandle,
    server_v4: MapHandle,
    server_v6: MapHandle,
    deny_v4: MapHandle,
    deny_v6: MapHandle,
    src_limit: MapHandle,
    stats: MapHandle,
    config_now: std::cell::Cell<XdpConfig>,
}

impl fmt::Debug for XdpProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpProgram").field("name", &self.name).field("id", &self.id).finish()
    }
}

/// Result of [`XdpProgram::test_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRun {
    /// The XDP action returned (`XDP_PASS` = 2, `XDP_DROP` = 1, `XDP_REDIRECT` = 4).
    pub action: u32,
    /// The receive header the program prepended to the packet, if any.
    pub meta: Option<XdpMeta>,
    /// Length of that header (0 without one).
    pub meta_len: usize,
    /// The packet after the run (without the header).
    pub data: Vec<u8>,
}

impl XdpProgram {
    /// Opens the embedded object and loads one of its programs: the
    /// device-bound hardware-stamping one when `hw_ifindex` is set, else
    /// the software-stamping one.
    pub fn load(opts: &ProgramOptions) -> Result<Self, LoadError> {
        if opts.source_entries == 0 {
            return Err(LoadError::Invalid("src_limit needs at least one entry".into()));
        }
        let wanted = if opts.hw_ifindex.is_some() { PROG_HW } else { PROG_SW };
        let (obj, wanted) = load_program(XDP_OBJECT, wanted, |open, name| {
            for mut map in open.maps_mut() {
                if map.name() == maps::SRC_LIMIT {
                    map.set_max_entries(opts.source_entries)
                        .map_err(|source| LoadError::Map { map: maps::SRC_LIMIT, source })?;
                }
            }
            if let Some(ifindex) = opts.hw_ifindex
                && let Some(mut prog) = open.progs_mut().find(|p| p.name() == name)
            {
                prog.set_ifindex(ifindex);
                prog.set_flags(libbpf_sys::BPF_F_XDP_DEV_BOUND_ONLY);
            }
            Ok(())
        })?;
        let map = |name: &'static str| find_map(&obj, name);
        let id = prog_id(&obj, wanted)?;
        let program = Self {
            xsks: map(maps::XSKS)?,
            config: map(maps::CONFIG)?,
            server_v4: map(maps::SERVER_V4)?,
            server_v6: map(maps::SERVER_V6)?,
            deny_v4: map(maps::DENY_V4)?,
            deny_v6: map(maps::DENY_V6)?,
            src_limit: map(maps::SRC_LIMIT)?,
            stats: map(maps::STATS)?,
            config_now: std::cell::Cell::new(opts.config),
            obj,
            name: wanted,
            id,
        };
        program.set_config(&opts.config)?;
        Ok(program)
    }

    /// The program's name (`chime_xdp` or `chime_xdp_hw`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The program's kernel id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// True when this is the device-bound hardware-stamping program.
    pub fn hw_timestamps(&self) -> bool {
        self.name == PROG_HW
    }

    /// The program's descriptor.
    pub fn prog_fd(&self) -> BorrowedFd<'_> {
        prog_fd(&self.obj, self.name)
    }

    /// The `xsks` map (XSKMAP, queue id → AF_XDP socket) for the AF_XDP layer.
    pub fn xsks_fd(&self) -> BorrowedFd<'_> {
        self.xsks.as_fd()
    }

    /// Writes the `config` map.
    pub fn set_config(&self, config: &XdpConfig) -> Result<(), LoadError> {
        self.config
            .update(&0u32.to_ne_bytes(), &config.to_bytes(), MapFlags::ANY)
            .map_err(|source| LoadError::Map { map: maps::CONFIG, source })?;
        self.config_now.set(*config);
        Ok(())
    }

    /// The `config` map's contents, as last written.
    pub fn config(&self) -> XdpConfig {
        self.config_now.get()
    }

    /// Changes only the per-source limit (live: sources keep their
    /// schedules, which the new rate then moves on).
    pub fn set_source_limit(&self, limit: Option<SourceLimit>) -> Result<(), LoadError> {
        self.set_config(&XdpConfig { source_limit: limit, ..self.config() })
    }

    /// Sources the per-source limit tracks now (an LRU table: at most its
    /// capacity, [`ProgramOptions::source_entries`]).
    pub fn tracked_sources(&self) -> usize {
        self.src_limit.keys().count()
    }

    /// Replaces the set of server addresses steered to AF_XDP.
    pub fn set_servers(&self, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Result<(), LoadError> {
        let max = crate::program::SERVERS_MAX;
        if v4.len() > max as usize {
            return Err(LoadError::TooMany { map: maps::SERVER_V4, max, given: v4.len() });
        }
        if v6.len() > max as usize {
            return Err(LoadError::TooMany { map: maps::SERVER_V6, max, given: v6.len() });
        }
        let keys4: Vec<Vec<u8>> = v4.iter().map(|a| a.octets().to_vec()).collect();
        let keys6: Vec<Vec<u8>> = v6.iter().map(|a| a.octets().to_vec()).collect();
        replace_set(&self.server_v4, maps::SERVER_V4, &keys4)?;
        replace_set(&self.server_v6, maps::SERVER_V6, &keys6)
    }

    /// Replaces the deny list: sources in these prefixes are dropped.
    pub fn set_denied(&self, prefixes: &[(IpAddr, u8)]) -> Result<(), LoadError> {
        let mut keys4 = Vec::new();
        let mut keys6 = Vec::new();
        for &(addr, len) in prefixes {
            match addr {
                IpAddr::V4(a) => {
                    if len > 32 {
                        return Err(LoadError::Invalid(format!("prefix {a}/{len}")));
                    }
                    let masked = if len == 0 { 0 } else { u32::from(a) & (u32::MAX << (32 - len)) };
                    let mut k = Vec::with_capacity(8);
                    k.extend_from_slice(&u32::from(len).to_ne_bytes());
                    k.extend_from_slice(&masked.to_be_bytes());
                    keys4.push(k);
                }
                IpAddr::V6(a) => {
                    if len > 128 {
                        return Err(LoadError::Invalid(format!("prefix {a}/{len}")));
                    }
                    let bits = u128::from(a);
                    let masked = if len == 0 { 0 } else { bits & (u128::MAX << (128 - len)) };
                    let mut k = Vec::with_capacity(20);
                    k.extend_from_slice(&u32::from(len).to_ne_bytes());
                    k.extend_from_slice(&masked.to_be_bytes());
                    keys6.push(k);
                }
            }
        }
        let max = crate::program::DENY_MAX;
        for (map, keys) in [(maps::DENY_V4, &keys4), (maps::DENY_V6, &keys6)] {
            if keys.len() > max as usize {
                return Err(LoadError::TooMany { map, max, given: keys.len() });
            }
        }
        replace_set(&self.deny_v4, maps::DENY_V4, &keys4)?;
        replace_set(&self.deny_v6, maps::DENY_V6, &keys6)
    }

    /// Steers queue `queue` to the AF_XDP socket `xsk_fd`.
    pub fn register_socket(&self, queue: u32, xsk_fd: RawFd) -> Result<(), LoadError> {
        register_xsk(&self.xsks, maps::XSKS, XSKS_MAX, queue, xsk_fd)
    }

    /// Stops steering queue `queue` (its packets pass to the kernel).
    pub fn unregister_socket(&self, queue: u32) -> Result<(), LoadError> {
        unregister_xsk(&self.xsks, maps::XSKS, queue)
    }

    /// The counters summed over all CPUs.
    pub fn stats(&self) -> Result<XdpStats, LoadError> {
        Ok(XdpStats::from_counts(percpu_sums(&self.stats, maps::STATS)?))
    }

    /// Runs the program once over `frame` with `BPF_PROG_TEST_RUN` (root;
    /// not for device-bound programs). Redirects are not carried out.
    pub fn test_run(&self, frame: &[u8]) -> Result<TestRun, LoadError> {
        test_run(&self.obj, self.name, frame)
    }
}

/// Opens `object` and loads its program `name` (only that one);
/// `prepare` adjusts the opened object first.
pub(crate) fn load_program(
    object: &[u8],
    name: &'static str,
    prepare: impl Fn(&mut OpenObject, &str) -> Result<(), LoadError>,
) -> Result<(Object, &'static str), LoadError> {
    let mut open = ObjectBuilder::default().open_memory(object).map_err(LoadError::Open)?;
    for mut prog in open.progs_mut() {
        if prog.name() != name {
            prog.set_autoload(false);
        }
    }
    prepare(&mut open, name)?;
    let obj = open.load().map_err(|source| LoadError::Load { program: name, source })?;
    Ok((obj, name))
}

/// The map `name` of a loaded object.
pub(crate) fn find_map(obj: &Object, name: &'static str) -> Result<MapHandle, LoadError> {
    let m =
        obj.maps().find(|m| m.name() == name).ok_or_else(|| LoadError::Invalid(format!("object has no map {name}")))?;
    MapHandle::try_from(&m).map_err(|source| LoadError::Map { map: name, source })
}

/// The kernel id of the loaded program `name`.
pub(crate) fn prog_id(obj: &Object, name: &'static str) -> Result<u32, LoadError> {
    let prog = obj
        .progs()
        .find(|p| p.name() == name)
        .ok_or_else(|| LoadError::Invalid(format!("object has no program {name}")))?;
    libbpf_rs::Program::id_from_fd(prog.as_fd()).map_err(|source| LoadError::Load { program: name, source })
}

/// The descriptor of the loaded program `name` (found by [`prog_id`] at
/// load; the object is immutable since).
pub(crate) fn prog_fd<'o>(obj: &'o Object, name: &str) -> BorrowedFd<'o> {
    let prog = obj.progs().find(|p| p.name() == name).expect("program loaded");
    let raw = prog.as_fd().as_raw_fd();
    // SAFETY: the descriptor is owned by `obj`, which lives as long as the
    // returned borrow.
    unsafe { BorrowedFd::borrow_raw(raw) }
}

/// Puts the AF_XDP socket `xsk_fd` at `queue` of the XSKMAP `map`.
pub(crate) fn register_xsk(
    map: &MapHandle,
    name: &'static str,
    max: u32,
    queue: u32,
    xsk_fd: RawFd,
) -> Result<(), LoadError> {
    if queue >= max {
        return Err(LoadError::Invalid(format!("queue {queue} >= {max}")));
    }
    let fd = u32::try_from(xsk_fd).map_err(|_| LoadError::Invalid(format!("fd {xsk_fd}")))?;
    map.update(&queue.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
        .map_err(|source| LoadError::Map { map: name, source })
}

/// Removes `queue` from the XSKMAP `map` (absent is fine).
pub(crate) fn unregister_xsk(map: &MapHandle, name: &'static str, queue: u32) -> Result<(), LoadError> {
    match map.delete(&queue.to_ne_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LoadError::Map { map: name, source }),
    }
}

/// The `N` u64 counters of a per-CPU array, each summed over all CPUs.
pub(crate) fn percpu_sums<const N: usize>(map: &MapHandle, name: &'static str) -> Result<[u64; N], LoadError> {
    let mut counts = [0u64; N];
    for (i, count) in counts.iter_mut().enumerate() {
        let per_cpu = map
            .lookup_percpu(&(i as u32).to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| LoadError::Map { map: name, source })?
            .unwrap_or_default();
        *count = per_cpu
            .iter()
            .filter_map(|v| v.get(..8).and_then(|b| b.try_into().ok()))
            .map(u64::from_ne_bytes)
            .fold(0u64, u64::wrapping_add);
    }
    Ok(counts)
}

/// Runs the loaded program `name` once over `frame` with
/// `BPF_PROG_TEST_RUN`; see [`XdpProgram::test_run`].
pub(crate) fn test_run(obj: &Object, name: &str, frame: &[u8]) -> Result<TestRun, LoadError> {
    const XDP_MD_LEN: usize = 24; // six u32: data, data_end, data_meta, ...
    let mut ctx_in = [0u8; XDP_MD_LEN];
    let end = u32::try_from(frame.len()).map_err(|_| LoadError::Invalid("frame too long".into()))?;
    ctx_in[4..8].copy_from_slice(&end.to_ne_bytes()); // data_end; data = data_meta = 0
    let mut ctx_out = [0u8; XDP_MD_LEN];
    let mut data_out = vec![0u8; frame.len() + 256];
    let input = ProgramInput {
        context_in: Some(&mut ctx_in),
        context_out: Some(&mut ctx_out),
        data_in: Some(frame),
        data_out: Some(&mut data_out),
        ..Default::default()
    };
    let prog = obj.progs_mut().find(|p| p.name() == name).expect("program loaded");
    let out = prog.test_run(input).map_err(LoadError::TestRun)?;
    let action = out.return_value;
    let data_len = out.data.as_ref().map_or(0, |d| d.len());
    let ctx = out.context.as_deref().unwrap_or(&[]);
    let word = |i: usize| {
        ctx.get(i * 4..i * 4 + 4).and_then(|b| b.try_into().ok()).map_or(0, |b| u32::from_ne_bytes(b) as usize)
    };
    // Offsets relative to data_meta (the program leaves that area empty).
    let start = word(0).min(data_len);
    let out_len = word(1).min(data_len).max(start);
    let out = &data_out[start..out_len];
    let meta = XdpMeta::from_frame(out);
    let meta_len = if meta.is_some() { crate::program::META_LEN } else { 0 };
    Ok(TestRun { action, meta, meta_len, data: out[meta_len..].to_vec() })
}

/// Makes the set of keys in `map` (values: 1) exactly `keys`: inserts first,
/// then removes the rest, so a key in both the old and new set never vanishes.
fn replace_set(map: &MapHandle, name: &'static str, keys: &[Vec<u8>]) -> Result<(), LoadError> {
    let err = |source| LoadError::Map { map: name, source };
    for k in keys {
        map.update(k, &[1u8], MapFlags::ANY).map_err(err)?;
    }
    let wanted: HashSet<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let stale: Vec<Vec<u8>> = map.keys().filter(|k| !wanted.contains(k.as_slice())).collect();
    for k in stale {
        match map.delete(&k) {
            Ok(()) => {}
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
            Err(source) => return Err(err(source)),
        }
    }
    Ok(())
}

/// The XDP program attached to an interface; detached on drop.
#[derive(Debug)]
pub struct LoadedXdp {
    program: XdpProgram,
    ifindex: u32,
    mode: XdpMode,
    attached: bool,
}

/// Loads and attaches chime's XDP program (see the module docs).
pub fn load(opts: &LoadOptions) -> Result<LoadedXdp, LoadError> {
    LoadedXdp::load(opts)
}

impl LoadedXdp {
    /// Loads and attaches chime's XDP program (see the module docs).
    pub fn load(opts: &LoadOptions) -> Result<Self, LoadError> {
        if opts.hw_timestamps && opts.mode == XdpMode::Generic {
            return Err(LoadError::HwNeedsNative);
        }
        let config =
            XdpConfig { port: opts.port, drop_non_client: opts.drop_non_client, source_limit: opts.source_limit };
        let popts = ProgramOptions {
            hw_ifindex: opts.hw_timestamps.then_some(opts.ifindex),
            config,
            source_entries: opts.source_entries,
        };
        let program = XdpProgram::load(&popts)?;

        let first = match opts.mode {
            XdpMode::Generic => XdpMode::Generic,
            XdpMode::Native | XdpMode::Auto => XdpMode::Native,
        };
        match attach(program.prog_fd().as_raw_fd(), opts.ifindex, first, opts.replace_foreign, is_chime) {
            Ok(()) => Ok(Self::attached(program, opts.ifindex, first)),
            Err(LoadError::Attach { source, .. }) if opts.mode == XdpMode::Auto && !is_conflict(&source) => {
                warn!(
                    ifindex = opts.ifindex,
                    error = %source,
                    "native XDP attach failed; falling back to generic mode (slow, copy-mode AF_XDP)"
                );
                let program = if program.hw_timestamps() {
                    warn!("generic XDP cannot run the device-bound program: using software receive stamps");
                    drop(program);
                    XdpProgram::load(&ProgramOptions { hw_ifindex: None, ..popts })?
                } else {
                    program
                };
                attach(program.prog_fd().as_raw_fd(), opts.ifindex, XdpMode::Generic, opts.replace_foreign, is_chime)?;
                Ok(Self::attached(program, opts.ifindex, XdpMode::Generic))
            }
            Err(e) => Err(e),
        }
    }

    fn attached(program: XdpProgram, ifindex: u32, mode: XdpMode) -> Self {
        info!(ifindex, %mode, program = program.name(), id = program.id(), "XDP program attached");
        Self { program, ifindex, mode, attached: true }
    }

    /// The loaded program and its maps.
    pub fn program(&self) -> &XdpProgram {
        &self.program
    }

    /// The mode it is attached in ([`XdpMode::Native`] or [`XdpMode::Generic`]).
    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// The interface.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// True when frames carry the NIC's stamp where the driver gives one.
    pub fn hw_timestamps(&self) -> bool {
        self.program.hw_timestamps()
    }

    /// See [`XdpProgram::set_servers`].
    pub fn set_servers(&self, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Result<(), LoadError> {
        self.program.set_servers(v4, v6)
    }

    /// See [`XdpProgram::set_denied`].
    pub fn set_denied(&self, prefixes: &[(IpAddr, u8)]) -> Result<(), LoadError> {
        self.program.set_denied(prefixes)
    }

    /// See [`XdpProgram::set_source_limit`].
    pub fn set_source_limit(&self, limit: Option<SourceLimit>) -> Result<(), LoadError> {
        self.program.set_source_limit(limit)
    }

    /// See [`XdpProgram::register_socket`].
    pub fn register_socket(&self, queue: u32, xsk_fd: RawFd) -> Result<(), LoadError> {
        self.program.register_socket(queue, xsk_fd)
    }

    /// See [`XdpProgram::unregister_socket`].
    pub fn unregister_socket(&self, queue: u32) -> Result<(), LoadError> {
        self.program.unregister_socket(queue)
    }

    /// See [`XdpProgram::stats`].
    pub fn stats(&self) -> Result<XdpStats, LoadError> {
        self.program.stats()
    }

    /// See [`XdpProgram::xsks_fd`].
    pub fn xsks_fd(&self) -> BorrowedFd<'_> {
        self.program.xsks_fd()
    }

    /// Detaches the program if it is still the one attached in our mode
    /// (atomically: `XDP_FLAGS_REPLACE` with our descriptor). Returns whether
    /// it was detached; `false` when something else replaced it meanwhile.
    pub fn detach(&mut self) -> Result<bool, LoadError> {
        if !self.attached {
            return Ok(false);
        }
        self.attached = false;
        detach_if_current(self.ifindex, self.mode, self.program.prog_fd().as_raw_fd())
    }
}

impl Drop for LoadedXdp {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            warn!(error = %e, "detaching XDP program");
        }
    }
}

/// Detaches the program `prog_fd` from `ifindex` if it is still the one
/// attached in `mode` (atomically: `XDP_FLAGS_REPLACE`). Returns whether it
/// was detached; `false` when something else replaced it meanwhile or the
/// interface is gone.
pub(crate) fn detach_if_current(ifindex: u32, mode: XdpMode, prog_fd: RawFd) -> Result<bool, LoadError> {
    match xdp_attach(ifindex, -1, mode.flags() | libbpf_sys::XDP_FLAGS_REPLACE, prog_fd) {
        Ok(()) => {
            info!(ifindex, "XDP program detached");
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            warn!(ifindex, "XDP program was replaced by another; left attached");
            Ok(false)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
        Err(source) => Err(LoadError::Attach { mode, ifindex, source }),
    }
}

/// Errors that mean "a program is there", not "this mode is unsupported".
fn is_conflict(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EEXIST | libc::EBUSY))
}

/// Names of chime's programs: a program by one of these names is ours.
fn is_chime(name: &str) -> bool {
    name == PROG_SW || name == PROG_HW
}

/// `bpf_xdp_attach` with an expected old program (`old_fd` >= 0 with
/// `XDP_FLAGS_REPLACE`).
fn xdp_attach(ifindex: u32, prog_fd: RawFd, flags: u32, old_fd: RawFd) -> std::io::Result<()> {
    let ifindex = i32::try_from(ifindex).map_err(|_| std::io::Error::from_raw_os_error(libc::ENODEV))?;
    let mut opts = libbpf_sys::bpf_xdp_attach_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_xdp_attach_opts>() as _,
        old_prog_fd: old_fd,
        ..Default::default()
    };
    if flags & libbpf_sys::XDP_FLAGS_REPLACE == 0 {
        opts.old_prog_fd = 0;
    }
    // SAFETY: `opts` is a valid, sized options struct living across the call;
    // the descriptors are either -1 or owned by the caller for its duration.
    let rc = unsafe { libbpf_sys::bpf_xdp_attach(ifindex, prog_fd, flags, &opts) };
    if rc < 0 { Err(std::io::Error::from_raw_os_error(-rc)) } else { Ok(()) }
}

/// The interface's attached XDP programs: (id, mode) for native and generic.
fn query(ifindex: u32) -> Result<Vec<(u32, XdpMode)>, LoadError> {
    let qerr = |source| LoadError::Query { ifindex, source };
    let idx = i32::try_from(ifindex).map_err(|_| qerr(std::io::Error::from_raw_os_error(libc::ENODEV)))?;
    let mut opts = libbpf_sys::bpf_xdp_query_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_xdp_query_opts>() as _,
        ..Default::default()
    };
    // SAFETY: `opts` is a valid, sized options struct the call fills in.
    let rc = unsafe { libbpf_sys::bpf_xdp_query(idx, 0, &mut opts) };
    if rc < 0 {
        return Err(qerr(std::io::Error::from_raw_os_error(-rc)));
    }
    let mut out = Vec::new();
    if opts.drv_prog_id != 0 {
        out.push((opts.drv_prog_id, XdpMode::Native));
    }
    if opts.skb_prog_id != 0 {
        out.push((opts.skb_prog_id, XdpMode::Generic));
    }
    if opts.hw_prog_id != 0 {
        // Offloaded programs are never chime's; report as foreign below.
        out.push((opts.hw_prog_id, XdpMode::Auto));
    }
    Ok(out)
}

/// Attaches the program `prog_fd` in `mode`, replacing a stale program of
/// ours (`ours(name)`; or a foreign one when allowed) and refusing a
/// foreign one otherwise.
pub(crate) fn attach(
    prog_fd: RawFd,
    ifindex: u32,
    mode: XdpMode,
    replace_foreign: bool,
    ours: fn(&str) -> bool,
) -> Result<(), LoadError> {
    let attach_err = |source| LoadError::Attach { mode, ifindex, source };
    let mut same_mode_old: Option<ProgramHandle> = None;
    for (id, cur_mode) in query(ifindex)? {
        let handle = ProgramHandle::from_prog_id(id).map_err(|e| LoadError::Query { ifindex, source: io_err(&e) })?;
        let name = handle.name().to_string_lossy().into_owned();
        if ours(&name) && cur_mode != XdpMode::Auto {
            warn!(ifindex, id, %name, mode = %cur_mode, "replacing a stale chime XDP program");
        } else if replace_foreign {
            warn!(ifindex, id, %name, mode = %cur_mode, "replacing a foreign XDP program (replace_foreign)");
        } else {
            return Err(LoadError::ForeignProgram { name, id });
        }
        if cur_mode == mode {
            same_mode_old = Some(handle);
        } else {
            // Native and generic programs cannot coexist: detach the old one
            // first, only if it is still the one we looked at.
            let flags = if cur_mode == XdpMode::Auto { libbpf_sys::XDP_FLAGS_HW_MODE } else { cur_mode.flags() };
            xdp_attach(ifindex, -1, flags | libbpf_sys::XDP_FLAGS_REPLACE, handle.as_fd().as_raw_fd())
                .map_err(attach_err)?;
        }
    }
    match same_mode_old {
        Some(old) => {
            xdp_attach(ifindex, prog_fd, mode.flags() | libbpf_sys::XDP_FLAGS_REPLACE, old.as_fd().as_raw_fd())
        }
        None => xdp_attach(ifindex, prog_fd, mode.flags() | libbpf_sys::XDP_FLAGS_UPDATE_IF_NOEXIST, -1),
    }
    .map_err(attach_err)
}
