//! chimed's configuration file.
//!
//! One TOML file, every key optional; `ops/chimed.toml` is the reference and
//! lists every key with its default. Loading happens in two steps:
//!
//! 1. parsing ([`toml`] + serde): syntax errors, unknown keys (every table is
//!    `deny_unknown_fields`, so a typo is an error) and wrong types, reported
//!    by the `toml` crate with the key and line;
//! 2. [`Config::validate`]: value ranges and cross-key rules, reporting *all*
//!    problems at once, each as `key: reason`.
//!
//! [`Config::load`] and [`Config::from_toml_str`] do both. The conversions
//! at the bottom turn the file's view into the types the rest of chimed
//! uses ([`ResponderConfig`], [`Acl`], [`RefId`]).

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chime_ebpf::program::{SRC_LIMIT_ENTRIES, SourceLimit};
use chime_proto::acl::{Acl, AclAction, Cidr};
use chime_proto::nts::KeyRingConfig;
use chime_proto::packet::RefId;
use chime_proto::ratelimit::RateLimitConfig;
use chime_proto::rng::Probability;
use chime_proto::{DenyResponse, ResponderConfig, UnsyncPolicy};
use serde::{Deserialize, Serialize};

/// Largest number of workers (and highest core number) accepted; the size of
/// the kernel's default CPU set (`CPU_SETSIZE`).
pub const MAX_CORES: usize = 1024;
/// Largest `server.batch_size`.
pub const MAX_BATCH_SIZE: usize = 1024;
/// Largest `rate_limit.table_entries`.
pub const MAX_TABLE_ENTRIES: usize = 1 << 30;
/// Largest `rate_limit.average_interval`, seconds.
pub const MAX_AVERAGE_INTERVAL: f64 = 3600.0;
/// Longest network interface name (`IFNAMSIZ` - 1).
const MAX_IFNAME_LEN: usize = 15;
/// Poll exponents a reply may carry: 1/128 s to 36 h.
const POLL_RANGE: (i8, i8) = (-7, 17);
/// Largest `upstream.max_unsync_secs`: one week.
pub const MAX_UNSYNC_SECS: f64 = 7.0 * 86_400.0;

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: sockets, workers, privileges.
    pub server: ServerSection,
    /// `[upstream]`: where the served time comes from.
    pub upstream: UpstreamSection,
    /// `[ntp]`: protocol details of replies.
    pub ntp: NtpSection,
    /// `[rate_limit]`: per-client rate limiting.
    pub rate_limit: RateLimitSection,
    /// `[access]`: access control by prefix.
    pub access: AccessSection,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsSection,
    /// `[log]`: logging.
    pub log: LogSection,
    /// `[xdp]`: the XDP backend.
    pub xdp: XdpSection,
    /// `[nts]`: Network Time Security (NTS-KE server and NTS in the workers).
    pub nts: NtsSection,
    /// `[leap]`: leap seconds (file, smearing).
    pub leap: LeapSection,
}

/// How packets reach the workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Backend {
    /// Per-core `SO_REUSEPORT` UDP sockets; runs anywhere.
    Socket,
    /// AF_XDP sockets fed by the XDP program on `server.interface`.
    Xdp,
    /// XDP if `server.interface` is set and XDP works there, else sockets.
    Auto,
    /// No NTP at all: only the NTS-KE server (and metrics) run, a front end
    /// sending clients to other NTP hosts (`nts.ntp_server`).
    None,
}

impl Backend {
    /// The name used in the configuration file and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Xdp => "xdp",
            Self::Auto => "auto",
            Self::None => "none",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `[server]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Packet path.
    pub backend: Backend,
    /// Addresses NTP is served on (UDP).
    pub listen: Vec<SocketAddr>,
    /// The NIC the XDP backend attaches to; empty for none.
    pub interface: String,
    /// Number of workers; 0 = one per listed core, or per online core.
    pub workers: usize,
    /// Cores to pin workers to, in worker order; empty = no explicit list.
    pub cores: Vec<usize>,
    /// Datagrams per `recvmmsg`/`sendmmsg` or ring batch.
    pub batch_size: usize,
    /// User to switch to after binding when started as root; "" or "root"
    /// keeps root.
    pub user: String,
    /// Group to switch to; "" = the user's primary group.
    pub group: String,
    /// The system-call filter installed once chimed serves.
    pub seccomp: SeccompMode,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            listen: vec![
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 123)),
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 123)),
            ],
            interface: String::new(),
            workers: 0,
            cores: Vec::new(),
            batch_size: 32,
            user: "nobody".to_owned(),
            group: String::new(),
            seccomp: SeccompMode::Enforce,
        }
    }
}

/// What the seccomp filter (see [`crate::seccomp`]) does with a system call
/// chimed does not use once it serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SeccompMode {
    /// Refused: the call fails with `EPERM` (and the kernel logs it).
    #[default]
    Enforce,
    /// Allowed, and logged by the kernel: to find what a setup needs.
    Log,
    /// No filter.
    Off,
}

impl SeccompMode {
    /// The name used in the configuration file and in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Log => "log",
            Self::Off => "off",
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the served time comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum UpstreamSource {
    /// The kernel clock's synchronization state (`adjtimex`), as kept by
    /// whatever disciplines it (chronyd, ntpd, ptp4l + phc2sys, ...).
    #[default]
    Kernel,
    /// The local chronyd's state, from an NTP query to
    /// `upstream.chrony_address`.
    Chrony,
    /// ptp4l's state, from its management socket `upstream.ptp4l_socket`.
    Ptp4l,
}

/// What to do while the upstream clock is unsynchronized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum UnsyncMode {
    /// Reply with leap indicator 3 and stratum 16.
    Announce,
    /// Do not reply.
    Silent,
}

impl From<UnsyncMode> for UnsyncPolicy {
    fn from(mode: UnsyncMode) -> Self {
        match mode {
            UnsyncMode::Announce => Self::Announce,
            UnsyncMode::Silent => Self::Silent,
        }
    }
}

/// `[upstream]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    /// The clock source.
    pub source: UpstreamSource,
    /// Stratum served while synchronized.
    pub stratum: u8,
    /// Reference ID: "" for 127.127.1.1, 1-4 ASCII characters or an IPv4
    /// address.
    pub reference_id: String,
    /// 0 = off; else serve the local clock at this stratum while
    /// unsynchronized.
    pub local_stratum: u8,
    /// Behaviour while unsynchronized (and `local_stratum` is 0).
    pub unsynchronized: UnsyncMode,
    /// Seconds between reads of the clock state.
    pub update_interval: f64,
    // Upstream state and health (issue 5).
    /// chronyd's NTP address (source "chrony").
    pub chrony_address: SocketAddr,
    /// ptp4l's management socket (source "ptp4l").
    pub ptp4l_socket: PathBuf,
    /// ptp4l's PTP domain number (source "ptp4l").
    pub ptp4l_domain: u8,
    /// Seconds a lost upstream's last good state is served before going
    /// unsynchronized.
    pub max_unsync_secs: f64,
    /// Largest root distance (seconds) served as synchronized.
    pub max_root_distance: f64,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            source: UpstreamSource::Kernel,
            stratum: 2,
            reference_id: String::new(),
            local_stratum: 0,
            unsynchronized: UnsyncMode::Announce,
            update_interval: 1.0,
            chrony_address: SocketAddr::from(([127, 0, 0, 1], 123)),
            ptp4l_socket: PathBuf::from("/var/run/ptp4l"),
            ptp4l_domain: 0,
            max_unsync_secs: 900.0,
            max_root_distance: 1.5,
        }
    }
}

/// `[ntp]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NtpSection {
    /// Smallest poll exponent put in replies.
    pub min_poll: i8,
    /// Largest poll exponent put in replies.
    pub max_poll: i8,
    /// Interleaved mode (RFC 9769): replies remembered in total (16 bytes
    /// each, split evenly across workers) so a client in interleaved mode
    /// gets the precise transmit time of its previous reply; 0 = off.
    pub interleaved_capacity: usize,
}

/// Largest `ntp.interleaved_capacity` (256 MiB of table).
pub const MAX_INTERLEAVED_CAPACITY: usize = 1 << 24;

impl Default for NtpSection {
    fn default() -> Self {
        Self { min_poll: 4, max_poll: 17, interleaved_capacity: 1 << 16 }
    }
}

/// `[rate_limit]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    /// Whether limiting is on.
    pub enabled: bool,
    /// Average interval between requests a client may sustain, seconds.
    pub average_interval: f64,
    /// Requests a quiet client may send back to back.
    pub burst: u32,
    /// IPv6 clients are keyed by this prefix length.
    pub ipv6_prefix: u8,
    /// Chance that a request over the limit gets KoD RATE instead of silence.
    pub kod_probability: f64,
    /// Clients tracked in total, split evenly across workers.
    pub table_entries: usize,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            enabled: true,
            average_interval: 2.0,
            burst: 16,
            ipv6_prefix: 64,
            kod_probability: 0.25,
            table_entries: 1 << 20,
        }
    }
}

/// What the ACL answers for sources no rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum AccessDefault {
    /// Serve everyone not denied.
    #[default]
    Allow,
    /// Serve only the `allow` list.
    Deny,
}

/// How denied sources are answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DenyMode {
    /// KoD DENY.
    #[default]
    Kod,
    /// No reply.
    Silent,
}

impl From<DenyMode> for DenyResponse {
    fn from(mode: DenyMode) -> Self {
        match mode {
            DenyMode::Kod => Self::Kod,
            DenyMode::Silent => Self::Silent,
        }
    }
}

/// `[access]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSection {
    /// Answer for sources matching no rule.
    pub default: AccessDefault,
    /// Prefixes served.
    pub allow: Vec<String>,
    /// Prefixes refused (`deny_response`).
    pub deny: Vec<String>,
    /// Prefixes refused with KoD RSTR.
    pub restrict: Vec<String>,
    /// How `deny` (and `default = "deny"`) sources are answered.
    pub deny_response: DenyMode,
}

/// `[metrics]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Whether the endpoint runs.
    pub enabled: bool,
    /// TCP address of the endpoint.
    pub listen: SocketAddr,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self { enabled: true, listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9123)) }
    }
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum XdpMode {
    /// Driver (native) mode only; fail where the driver has none.
    Native,
    /// Generic (skb) mode: works on any interface, slower, no zero-copy.
    Generic,
    /// Native, falling back to generic with a warning.
    #[default]
    Auto,
}

/// Whether AF_XDP sockets bind in zero-copy mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ZeroCopy {
    /// Zero-copy where the driver supports it, else copy mode (logged).
    #[default]
    Auto,
    /// Zero-copy or fail.
    Required,
    /// Always copy mode.
    Off,
}

/// Largest `xdp.queues`.
pub const MAX_XDP_QUEUES: usize = 1024;
/// `xdp.ring_size` bounds (powers of two).
pub const XDP_RING_SIZE_RANGE: (u32, u32) = (64, 32768);
/// Largest `xdp.frame_count` (per queue).
pub const MAX_XDP_FRAME_COUNT: u32 = 1 << 20;
/// Largest `xdp.source_rate` and `xdp.source_burst`.
pub const MAX_XDP_SOURCE_RATE: u32 = 10_000_000;
/// Largest `xdp.source_table_entries` (kernel memory: see ops/chimed.toml).
pub const MAX_XDP_SOURCE_TABLE_ENTRIES: u32 = 1 << 24;

/// `[xdp]`: the XDP backend (used when `server.backend` is "xdp", or "auto"
/// with `server.interface` set).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XdpSection {
    /// Attach mode of the XDP program.
    pub mode: XdpMode,
    /// NIC queues served (one worker each); 0 = the interface's combined or
    /// RX channel count (ethtool channels).
    pub queues: usize,
    /// Zero-copy AF_XDP binding.
    pub zero_copy: ZeroCopy,
    /// UMEM frames per queue.
    pub frame_count: u32,
    /// Bytes per UMEM frame: 2048 or 4096.
    pub frame_size: u32,
    /// Entries of each AF_XDP ring (fill, completion, RX, TX): a power of
    /// two.
    pub ring_size: u32,
    /// Load the program bound to the device and take RX timestamps from the
    /// NIC (`bpf_xdp_metadata_rx_timestamp`).
    pub hw_timestamps: bool,
    /// Drop NTP packets that are not client requests (mode 3) in the XDP
    /// program already.
    pub drop_non_client: bool,
    /// Requests per second one source address may sustain before the XDP
    /// program drops the rest (a flood guard in front of `[rate_limit]`;
    /// off when `rate_limit.enabled` is false).
    pub source_rate: u32,
    /// Requests a quiet source may send back to back past the XDP program.
    pub source_burst: u32,
    /// Source addresses the XDP program's flood guard tracks (least recently
    /// seen forgotten first).
    pub source_table_entries: u32,
    /// Replace an XDP program of another application on the interface.
    pub replace_foreign: bool,
}

impl Default for XdpSection {
    fn default() -> Self {
        Self {
            mode: XdpMode::Auto,
            queues: 0,
            zero_copy: ZeroCopy::Auto,
            frame_count: 4096,
            frame_size: 2048,
            ring_size: 2048,
            hw_timestamps: false,
            drop_non_client: true,
            source_rate: SourceLimit::DEFAULT.rate,
            source_burst: SourceLimit::DEFAULT.burst,
            source_table_entries: SRC_LIMIT_ENTRIES,
            replace_foreign: false,
        }
    }
}

/// Longest `nts.rotation_interval`, seconds (a year).
pub const MAX_ROTATION_INTERVAL: u64 = 365 * 86_400;
/// Longest `nts.timeout`, seconds.
pub const MAX_NTS_TIMEOUT: u64 = 300;
/// Largest `nts.max_connections`.
pub const MAX_NTS_CONNECTIONS: usize = 1 << 20;

/// `[nts]`: Network Time Security (RFC 8915).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NtsSection {
    /// Whether NTS runs (the NTS-KE server, and NTS requests answered by the
    /// workers); `--tls-cert`/`--tls-key` on the command line set it.
    pub enabled: bool,
    /// PEM certificate chain of the NTS-KE server.
    pub tls_cert: PathBuf,
    /// PEM private key of the NTS-KE server (mode 0600 or stricter).
    pub tls_key: PathBuf,
    /// TCP addresses of the NTS-KE server.
    pub listen: Vec<SocketAddr>,
    /// Where the master keys are persisted; "" keeps them in memory only.
    pub key_file: PathBuf,
    /// File with a fleet's shared secret; when set, keys are derived from
    /// it per epoch instead of drawn at random and persisted.
    pub fleet_secret: PathBuf,
    /// Seconds between master key rotations.
    pub rotation_interval: u64,
    /// Previous master keys kept (cookies live `rotation_interval *
    /// keep_keys` seconds at least).
    pub keep_keys: usize,
    /// NTPv4 Server Negotiation: the NTP host clients should use; "" = this
    /// one.
    pub ntp_server: String,
    /// NTPv4 Port Negotiation: the NTP port clients should use; 0 = 123.
    pub ntp_port: u16,
    /// NTS-KE connections open at once, at most; a new one over the limit
    /// evicts the oldest.
    pub max_connections: usize,
    /// NTS-KE connections open at once from one source address (IPv6:
    /// /64), at most; a new one over the limit evicts that source's oldest.
    pub max_connections_per_source: usize,
    /// NTS-KE handshakes per second per source address (IPv6: /64) on
    /// average; 0 = no limit.
    pub handshake_rate: f64,
    /// NTS-KE handshakes a source may start in a burst.
    pub handshake_burst: u32,
    /// Seconds an NTS-KE connection may take, handshake to response.
    pub timeout: u64,
}

impl NtsSection {
    /// The key ring's rotation settings.
    pub fn key_ring_config(&self) -> KeyRingConfig {
        KeyRingConfig { interval_secs: self.rotation_interval, keep: self.keep_keys }
    }
}

impl Default for NtsSection {
    fn default() -> Self {
        Self {
            enabled: false,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            listen: vec![
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 4460)),
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 4460)),
            ],
            key_file: PathBuf::from("/var/lib/chime/nts-keys"),
            fleet_secret: PathBuf::new(),
            rotation_interval: 86_400,
            keep_keys: 7,
            ntp_server: String::new(),
            ntp_port: 0,
            max_connections: 1024,
            max_connections_per_source: 16,
            handshake_rate: 20.0,
            handshake_burst: 40,
            timeout: 10,
        }
    }
}

/// Shortest `leap.smear_window`, seconds.
pub const MIN_SMEAR_WINDOW: u32 = 3600;
/// Longest `leap.smear_window`, seconds (a week).
pub const MAX_SMEAR_WINDOW: u32 = 7 * 86_400;

/// `[leap]`: leap seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeapSection {
    /// A `leap-seconds.list` file (IERS format, hash checked); "" = none,
    /// leap warnings then come from the upstream only.
    pub file: PathBuf,
    /// Smear leap seconds instead of announcing them. Not for public pool
    /// servers.
    pub smear: bool,
    /// Length of the smear, seconds, centred on the leap.
    pub smear_window: u32,
}

impl Default for LeapSection {
    fn default() -> Self {
        Self { file: PathBuf::new(), smear: false, smear_window: chime_proto::leap::DEFAULT_SMEAR_WINDOW }
    }
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A level name or a `tracing_subscriber::EnvFilter` directive.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self { level: "info".to_owned() }
    }
}

/// One thing wrong with a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key, with an index for list entries (`access.deny[2]`).
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax error, unknown key or wrong type (the text names the key
    /// and line).
    #[error("{}{message}", Origin(path.as_deref()))]
    Parse {
        /// The file, if the text came from one.
        path: Option<PathBuf>,
        /// The `toml` crate's message.
        message: String,
    },
    /// Values out of range or inconsistent.
    #[error("{}{}", Origin(path.as_deref()), Problems(problems))]
    Invalid {
        /// The file, if the configuration came from one.
        path: Option<PathBuf>,
        /// Every problem found (never empty).
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The validation problems (empty for read and parse errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }

    /// Names `path` as the origin of a parse or validation error.
    fn in_file(self, file: &Path) -> Self {
        match self {
            Self::Parse { message, .. } => Self::Parse { path: Some(file.to_owned()), message },
            Self::Invalid { problems, .. } => Self::Invalid { path: Some(file.to_owned()), problems },
            other => other,
        }
    }
}

/// Formats as `path: ` (or nothing).
struct Origin<'a>(Option<&'a Path>);

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(path) => write!(f, "{}: ", path.display()),
            None => Ok(()),
        }
    }
}

/// Formats one problem on one line, several as an indented list.
struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration ({} problems):", many.len())?;
                for problem in many {
                    write!(f, "\n  {problem}")?;
                }
                Ok(())
            }
        }
    }
}

/// Collects problems during validation.
#[derive(Default)]
struct Report(Vec<Problem>);

impl Report {
    fn push(&mut self, key: impl Into<String>, reason: impl fmt::Display) {
        self.0.push(Problem { key: key.into(), reason: reason.to_string() });
    }

    fn range<T: PartialOrd + fmt::Display>(&mut self, key: &str, value: T, lo: T, hi: T) {
        if !(lo <= value && value <= hi) {
            self.push(key, format_args!("must be between {lo} and {hi}, got {value}"));
        }
    }

    fn at_least<T: PartialOrd + fmt::Display>(&mut self, key: &str, value: T, lo: T) {
        if value < lo {
            self.push(key, format_args!("must be at least {lo}, got {value}"));
        }
    }

    /// Only the usual characters of user and group names: no NUL, `:`,
    /// whitespace or control characters.
    fn account_name(&mut self, key: &str, name: &str) {
        if name.chars().any(|c| c == ':' || c.is_whitespace() || c.is_control()) {
            self.push(key, format_args!("{name:?} is not a valid name"));
        }
    }
}

impl Config {
    /// Parses and validates a configuration file's text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: None, message: e.to_string().trim_end().to_owned() })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates the file at `path`; every error names it.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml_str(&text).map_err(|e| e.in_file(path))
    }

    /// The configuration as TOML, every key present (for `--print-config`).
    pub fn to_toml_string(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }

    /// Checks value ranges and cross-key rules, reporting every problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut report = Report::default();
        self.validate_server(&mut report);
        self.validate_upstream(&mut report);
        self.validate_ntp(&mut report);
        self.validate_rate_limit(&mut report);
        self.validate_access(&mut report);
        self.validate_metrics(&mut report);
        self.validate_log(&mut report);
        self.validate_xdp(&mut report);
        self.validate_nts(&mut report);
        self.validate_leap(&mut report);
        if report.0.is_empty() { Ok(()) } else { Err(ConfigError::Invalid { path: None, problems: report.0 }) }
    }

    fn validate_server(&self, report: &mut Report) {
        let s = &self.server;
        if s.listen.is_empty() {
            report.push("server.listen", "must list at least one address");
        }
        let mut seen = HashMap::new();
        for (i, addr) in s.listen.iter().enumerate() {
            if addr.port() == 0 {
                report.push(format!("server.listen[{i}]"), format_args!("{addr}: port 0 is not allowed"));
            }
            if let Some(first) = seen.insert(*addr, i) {
                report.push(format!("server.listen[{i}]"), format_args!("{addr} is already server.listen[{first}]"));
                seen.insert(*addr, first);
            }
        }
        if s.backend == Backend::Xdp && s.interface.is_empty() {
            report.push("server.interface", "must name a network interface when server.backend = \"xdp\"");
        }
        if !s.interface.is_empty() && !is_interface_name(&s.interface) {
            report.push(
                "server.interface",
                format_args!(
                    "{:?} is not an interface name (at most {MAX_IFNAME_LEN} bytes, no '/' or whitespace)",
                    s.interface
                ),
            );
        }
        report.range("server.workers", s.workers, 0, MAX_CORES);
        let mut seen = HashMap::new();
        for (i, &core) in s.cores.iter().enumerate() {
            if core >= MAX_CORES {
                report.push(format!("server.cores[{i}]"), format_args!("must be below {MAX_CORES}, got {core}"));
            }
            if let Some(first) = seen.insert(core, i) {
                report.push(format!("server.cores[{i}]"), format_args!("core {core} is already server.cores[{first}]"));
                seen.insert(core, first);
            }
        }
        if s.workers != 0 && !s.cores.is_empty() && s.cores.len() != s.workers {
            report.push(
                "server.cores",
                format_args!(
                    "lists {} cores but server.workers is {} (they must match; workers = 0 runs one worker per \
                     listed core)",
                    s.cores.len(),
                    s.workers
                ),
            );
        }
        report.range("server.batch_size", s.batch_size, 1, MAX_BATCH_SIZE);
        report.account_name("server.user", &s.user);
        report.account_name("server.group", &s.group);
        if !s.group.is_empty() && (s.user.is_empty() || s.user == "root") {
            report.push(
                "server.group",
                format_args!("is set but server.user is {:?}, so no privilege drop happens", s.user),
            );
        }
    }

    fn validate_upstream(&self, report: &mut Report) {
        let u = &self.upstream;
        report.range("upstream.stratum", u.stratum, 1, 15);
        if parse_reference_id(&u.reference_id).is_none() {
            report.push(
                "upstream.reference_id",
                format_args!(
                    "must be empty, 1-4 printable ASCII characters (like \"GPS\") or an IPv4 address, got {:?}",
                    u.reference_id
                ),
            );
        }
        if u.local_stratum > 15 {
            report.push(
                "upstream.local_stratum",
                format_args!("must be 0 (off) or between 1 and 15, got {}", u.local_stratum),
            );
        }
        if !(0.1..=60.0).contains(&u.update_interval) {
            report.push(
                "upstream.update_interval",
                format_args!("must be between 0.1 and 60 seconds, got {}", u.update_interval),
            );
        }
        if !(0.0..=MAX_UNSYNC_SECS).contains(&u.max_unsync_secs) {
            report.push(
                "upstream.max_unsync_secs",
                format_args!("must be between 0 and {MAX_UNSYNC_SECS} seconds, got {}", u.max_unsync_secs),
            );
        }
        if !(u.max_root_distance > 0.0 && u.max_root_distance <= 16.0) {
            report.push(
                "upstream.max_root_distance",
                format_args!("must be above 0 and at most 16 seconds, got {}", u.max_root_distance),
            );
        }
        if u.chrony_address.port() == 0 {
            report.push("upstream.chrony_address", "must not use port 0");
        }
        if u.source == UpstreamSource::Ptp4l && u.ptp4l_socket.as_os_str().is_empty() {
            report.push("upstream.ptp4l_socket", "must be set when upstream.source is \"ptp4l\"");
        }
    }

    /// The upstream source the control thread reads.
    pub fn source_config(&self) -> crate::upstream::SourceConfig {
        use crate::upstream::SourceConfig;
        let u = &self.upstream;
        match u.source {
            UpstreamSource::Kernel => SourceConfig::Kernel { stratum: u.stratum, reference_id: self.reference_id() },
            UpstreamSource::Chrony => SourceConfig::Chrony { address: u.chrony_address },
            UpstreamSource::Ptp4l => SourceConfig::Ptp4l { socket: u.ptp4l_socket.clone(), domain: u.ptp4l_domain },
        }
    }

    fn validate_ntp(&self, report: &mut Report) {
        let n = &self.ntp;
        let (lo, hi) = POLL_RANGE;
        report.range("ntp.min_poll", n.min_poll, lo, hi);
        report.range("ntp.max_poll", n.max_poll, lo, hi);
        if n.min_poll > n.max_poll {
            report.push("ntp.min_poll", format_args!("must not exceed ntp.max_poll ({} > {})", n.min_poll, n.max_poll));
        }
    }

    fn validate_rate_limit(&self, report: &mut Report) {
        let r = &self.rate_limit;
        if !(r.average_interval > 0.0 && r.average_interval <= MAX_AVERAGE_INTERVAL) {
            report.push(
                "rate_limit.average_interval",
                format_args!("must be above 0 and at most {MAX_AVERAGE_INTERVAL} seconds, got {}", r.average_interval),
            );
        }
        report.at_least("rate_limit.burst", r.burst, 1);
        report.range("rate_limit.ipv6_prefix", r.ipv6_prefix, 1, 128);
        if Probability::new(r.kod_probability).is_none() {
            report
                .push("rate_limit.kod_probability", format_args!("must be between 0 and 1, got {}", r.kod_probability));
        }
        report.range("rate_limit.table_entries", r.table_entries, 1, MAX_TABLE_ENTRIES);
        report.range("ntp.interleaved_capacity", self.ntp.interleaved_capacity, 0, MAX_INTERLEAVED_CAPACITY);
    }

    fn validate_access(&self, report: &mut Report) {
        let mut seen: HashMap<Cidr, String> = HashMap::new();
        for (list, entries, _) in self.access_lists() {
            for (i, text) in entries.iter().enumerate() {
                let key = format!("access.{list}[{i}]");
                match text.parse::<Cidr>() {
                    Err(e) => report.push(key, e),
                    Ok(cidr) => match seen.get(&cidr) {
                        Some(first) if !first.starts_with(&format!("access.{list}[")) => {
                            report.push(key, format_args!("{text:?} is also listed as {first}"));
                        }
                        Some(_) => {}
                        None => {
                            seen.insert(cidr, key);
                        }
                    },
                }
            }
        }
    }

    fn validate_metrics(&self, report: &mut Report) {
        if self.metrics.listen.port() == 0 {
            report.push("metrics.listen", format_args!("{}: port 0 is not allowed", self.metrics.listen));
        }
    }

    fn validate_log(&self, report: &mut Report) {
        if let Err(reason) = check_log_level(&self.log.level) {
            report.push("log.level", reason);
        }
    }

    fn validate_nts(&self, report: &mut Report) {
        let n = &self.nts;
        if !self.serves_ntp() {
            // An NTS-KE front end: its cookies must open on the NTP hosts it
            // names, which only a shared fleet secret makes possible (a
            // key_file of random keys would be this host's alone).
            let why = "must be set when server.backend = \"none\" (an NTS-KE front end for other NTP hosts)";
            if !n.enabled {
                report.push(
                    "nts.enabled",
                    format_args!("must be true when server.backend = \"none\" (it serves only NTS-KE)"),
                );
            }
            if n.ntp_server.is_empty() {
                report.push("nts.ntp_server", why);
            }
            if n.fleet_secret.as_os_str().is_empty() {
                report.push(
                    "nts.fleet_secret",
                    format_args!("{why}, so the NTP hosts can open the cookies it hands out"),
                );
            }
        }
        if n.enabled {
            if n.tls_cert.as_os_str().is_empty() {
                report.push("nts.tls_cert", "must be set when nts.enabled is true");
            }
            if n.tls_key.as_os_str().is_empty() {
                report.push("nts.tls_key", "must be set when nts.enabled is true");
            }
            if n.listen.is_empty() {
                report.push("nts.listen", "must list at least one address when nts.enabled is true");
            }
        }
        let mut seen = HashMap::new();
        for (i, addr) in n.listen.iter().enumerate() {
            if addr.port() == 0 {
                report.push(format!("nts.listen[{i}]"), format_args!("{addr}: port 0 is not allowed"));
            }
            if let Some(first) = seen.insert(*addr, i) {
                report.push(format!("nts.listen[{i}]"), format_args!("{addr} is already nts.listen[{first}]"));
                seen.insert(*addr, first);
            }
        }
        report.range("nts.rotation_interval", n.rotation_interval, 1, MAX_ROTATION_INTERVAL);
        report.range("nts.keep_keys", n.keep_keys, 1, chime_proto::nts::keyring::MAX_KEEP);
        if n.ntp_server.len() > chime_proto::nts::ke::MAX_SERVER_NAME
            || !n.ntp_server.bytes().all(|b| b.is_ascii_graphic())
        {
            report.push("nts.ntp_server", "must be a host name or address of at most 255 ASCII characters");
        }
        report.range("nts.max_connections", n.max_connections, 1, MAX_NTS_CONNECTIONS);
        report.range("nts.max_connections_per_source", n.max_connections_per_source, 1, MAX_NTS_CONNECTIONS);
        if !n.handshake_rate.is_finite() || n.handshake_rate < 0.0 {
            report.push("nts.handshake_rate", format_args!("must be a number >= 0, got {}", n.handshake_rate));
        }
        report.at_least("nts.handshake_burst", n.handshake_burst, 1);
        report.range("nts.timeout", n.timeout, 1, MAX_NTS_TIMEOUT);
    }

    fn validate_leap(&self, report: &mut Report) {
        if self.leap.smear {
            report.range("leap.smear_window", self.leap.smear_window, MIN_SMEAR_WINDOW, MAX_SMEAR_WINDOW);
        }
    }

    fn validate_xdp(&self, report: &mut Report) {
        let x = &self.xdp;
        report.range("xdp.queues", x.queues, 0, MAX_XDP_QUEUES);
        if x.frame_size != 2048 && x.frame_size != 4096 {
            report.push("xdp.frame_size", format_args!("must be 2048 or 4096, got {}", x.frame_size));
        }
        let (lo, hi) = XDP_RING_SIZE_RANGE;
        if !x.ring_size.is_power_of_two() || !(lo..=hi).contains(&x.ring_size) {
            report.push("xdp.ring_size", format_args!("must be a power of two from {lo} to {hi}, got {}", x.ring_size));
        }
        // The fill ring must be fillable and as many frames again be free
        // for the RX, TX and completion rings, or load starves the fill ring.
        let min_frames = x.ring_size.saturating_mul(2);
        if x.frame_count > MAX_XDP_FRAME_COUNT {
            report
                .push("xdp.frame_count", format_args!("must be at most {MAX_XDP_FRAME_COUNT}, got {}", x.frame_count));
        } else if x.frame_count < min_frames {
            report.push(
                "xdp.frame_count",
                format_args!(
                    "must be at least twice xdp.ring_size ({min_frames}), got {} (the fill ring must fit with \
                     as many frames in flight)",
                    x.frame_count
                ),
            );
        }
        report.range("xdp.source_rate", x.source_rate, 1, MAX_XDP_SOURCE_RATE);
        report.range("xdp.source_burst", x.source_burst, 1, MAX_XDP_SOURCE_RATE);
        report.range("xdp.source_table_entries", x.source_table_entries, 1, MAX_XDP_SOURCE_TABLE_ENTRIES);
        if x.mode == XdpMode::Generic && x.hw_timestamps {
            report.push(
                "xdp.hw_timestamps",
                "needs the driver's XDP (xdp.mode = \"native\" or \"auto\"), not \"generic\"",
            );
        }
        if x.mode == XdpMode::Generic && x.zero_copy == ZeroCopy::Required {
            report.push("xdp.zero_copy", "\"required\" needs the driver's XDP; generic mode always copies");
        }
        if self.uses_xdp() {
            if self.server.batch_size > x.ring_size as usize {
                report.push(
                    "server.batch_size",
                    format_args!(
                        "must not exceed xdp.ring_size ({}) with the xdp backend, got {}",
                        x.ring_size, self.server.batch_size
                    ),
                );
            }
            if let Some(first) = self.server.listen.first() {
                for (i, addr) in self.server.listen.iter().enumerate().skip(1) {
                    if addr.port() != first.port() {
                        report.push(
                            format!("server.listen[{i}]"),
                            format_args!(
                                "{addr}: the xdp backend serves one port, and server.listen[0] has {}",
                                first.port()
                            ),
                        );
                    }
                }
            }
        }
    }

    /// Whether chimed tries the XDP backend: `server.backend = "xdp"`, or
    /// "auto" with `server.interface` set.
    pub fn uses_xdp(&self) -> bool {
        match self.server.backend {
            Backend::Xdp => true,
            Backend::Auto => !self.server.interface.is_empty(),
            Backend::Socket | Backend::None => false,
        }
    }

    /// Whether chimed serves NTP (every backend but "none").
    pub fn serves_ntp(&self) -> bool {
        self.server.backend != Backend::None
    }

    /// The three ACL lists with their names and actions, in insertion order.
    fn access_lists(&self) -> [(&'static str, &[String], AclAction); 3] {
        [
            ("allow", &self.access.allow, AclAction::Allow),
            ("deny", &self.access.deny, AclAction::Deny),
            ("restrict", &self.access.restrict, AclAction::Restrict),
        ]
    }

    /// The number of workers to start: `server.workers`, else one per
    /// `server.cores` entry, else one per core this process may run on.
    pub fn worker_count(&self) -> usize {
        if self.server.workers > 0 {
            self.server.workers
        } else if !self.server.cores.is_empty() {
            self.server.cores.len()
        } else {
            std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
        }
    }

    /// The XDP program's per-source flood guard: `xdp.source_rate` and
    /// `xdp.source_burst`, off (`None`) when `rate_limit.enabled` is false.
    pub fn xdp_source_limit(&self) -> Option<SourceLimit> {
        self.rate_limit.enabled.then_some(SourceLimit { rate: self.xdp.source_rate, burst: self.xdp.source_burst })
    }

    /// The responder settings of one of `workers` workers; the rate-limit
    /// table is split evenly between them (rounded up).
    pub fn responder_config(&self, workers: usize) -> ResponderConfig {
        let r = &self.rate_limit;
        let kod_probability = if r.kod_probability.is_nan() {
            Probability::NEVER
        } else {
            Probability::new(r.kod_probability.clamp(0.0, 1.0)).unwrap_or(Probability::NEVER)
        };
        ResponderConfig {
            min_poll: self.ntp.min_poll,
            max_poll: self.ntp.max_poll,
            unsynchronized: self.upstream.unsynchronized.into(),
            deny: self.access.deny_response.into(),
            kod_probability,
            rate_limit: RateLimitConfig {
                enabled: r.enabled,
                average_interval: r.average_interval,
                burst: r.burst,
                ipv6_prefix_len: r.ipv6_prefix,
                capacity: r.table_entries.div_ceil(workers.max(1)),
            },
            interleaved_capacity: self.ntp.interleaved_capacity.div_ceil(workers.max(1)),
        }
    }

    /// The access-control rules. The lists are inserted allow, deny,
    /// restrict; the most specific prefix wins, and validation rejects a
    /// prefix listed twice with different actions.
    pub fn acl(&self) -> Result<Acl, ConfigError> {
        let mut acl = Acl::new(match self.access.default {
            AccessDefault::Allow => AclAction::Allow,
            AccessDefault::Deny => AclAction::Deny,
        });
        let mut report = Report::default();
        for (list, entries, action) in self.access_lists() {
            for (i, text) in entries.iter().enumerate() {
                match text.parse::<Cidr>() {
                    Ok(cidr) => acl.insert(cidr, action),
                    Err(e) => report.push(format!("access.{list}[{i}]"), e),
                }
            }
        }
        if report.0.is_empty() { Ok(acl) } else { Err(ConfigError::Invalid { path: None, problems: report.0 }) }
    }

    /// The reference ID served while synchronized (127.127.1.1 if unset or
    /// invalid).
    pub fn reference_id(&self) -> RefId {
        parse_reference_id(&self.upstream.reference_id).unwrap_or(RefId::LOCAL)
    }

    /// The stratum to serve the local clock at while unsynchronized, if any.
    pub fn local_stratum(&self) -> Option<u8> {
        (self.upstream.local_stratum != 0).then_some(self.upstream.local_stratum)
    }

    /// Time between reads of the upstream clock state.
    pub fn update_interval(&self) -> Duration {
        Duration::try_from_secs_f64(self.upstream.update_interval).unwrap_or(Duration::from_secs(1))
    }

    /// The user to drop privileges to, or `None` to stay root.
    pub fn run_as_user(&self) -> Option<&str> {
        match self.server.user.as_str() {
            "" | "root" => None,
            user => Some(user),
        }
    }
}

/// `""` is 127.127.1.1; an IPv4 address is its four bytes; else 1-4
/// printable ASCII characters, NUL-padded.
fn parse_reference_id(text: &str) -> Option<RefId> {
    if text.is_empty() {
        return Some(RefId::LOCAL);
    }
    if let Ok(ip) = text.parse::<Ipv4Addr>() {
        return Some(RefId(ip.octets()));
    }
    if text.bytes().all(|b| b.is_ascii_graphic()) { RefId::from_ascii(text) } else { None }
}

fn is_interface_name(name: &str) -> bool {
    name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// A bare word must be a level (so `infoo` is a typo, not a target name);
/// anything with `=` or `,` is an `EnvFilter` directive list.
fn check_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if level.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    if !level.contains(['=', ',', '[']) {
        return if LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            Ok(())
        } else {
            Err(format!(
                "{level:?} is not a level (trace, debug, info, warn, error, off) or an EnvFilter directive like \
                 \"info,chime_server=debug\""
            ))
        };
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| format!("{level:?} is not a valid EnvFilter directive: {e}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const REFERENCE: &str = include_str!("../../ops/chimed.toml");

    fn problems(text: &str) -> Vec<String> {
        match Config::from_toml_str(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems.iter().map(ToString::to_string).collect(),
            other => panic!("expected validation problems for {text:?}, got {other:?}"),
        }
    }

    /// Asserts that `text` fails validation with exactly one problem, for
    /// `key`, whose message contains `fragment`.
    #[track_caller]
    fn rejects(text: &str, key: &str, fragment: &str) {
        let found = problems(text);
        assert_eq!(found.len(), 1, "{text:?}: {found:?}");
        assert!(found[0].starts_with(&format!("{key}: ")), "{text:?}: {found:?} should name {key}");
        assert!(found[0].contains(fragment), "{text:?}: {found:?} should contain {fragment:?}");
    }

    fn parse_error(text: &str) -> String {
        match Config::from_toml_str(text) {
            Err(e @ ConfigError::Parse { .. }) => e.to_string(),
            other => panic!("expected a parse error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn default_validates() {
        Config::default().validate().unwrap();
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    }

    #[test]
    fn default_values_match_the_schema() {
        let c = Config::default();
        assert_eq!(c.server.backend, Backend::Auto);
        assert_eq!(c.server.listen, ["0.0.0.0:123".parse().unwrap(), "[::]:123".parse().unwrap()]);
        assert_eq!(c.server.user, "nobody");
        assert_eq!(c.server.batch_size, 32);
        assert_eq!(c.server.seccomp, SeccompMode::Enforce);
        assert_eq!(c.upstream.stratum, 2);
        assert_eq!(c.reference_id(), RefId::LOCAL);
        assert_eq!(c.local_stratum(), None);
        assert_eq!(c.update_interval(), Duration::from_secs(1));
        assert_eq!(c.rate_limit.table_entries, 1_048_576);
        assert_eq!(c.metrics.listen, "127.0.0.1:9123".parse().unwrap());
        assert_eq!(c.run_as_user(), Some("nobody"));
    }

    #[test]
    fn seccomp_modes() {
        for mode in [SeccompMode::Enforce, SeccompMode::Log, SeccompMode::Off] {
            let c = Config::from_toml_str(&format!("[server]\nseccomp = \"{mode}\"")).unwrap();
            assert_eq!(c.server.seccomp, mode);
        }
        let e = parse_error("[server]\nseccomp = \"strict\"");
        assert!(e.contains("line 2") && e.contains("unknown variant `strict`"), "{e}");
        assert!(e.contains("`enforce`, `log`, `off`"), "{e}");
        let e = parse_error("[server]\nseccomp = true");
        assert!(e.contains("seccomp") || e.contains("line 2"), "{e}");
    }

    #[test]
    fn server_rules() {
        rejects("[server]\nlisten = []", "server.listen", "at least one");
        rejects("[server]\nlisten = [\"127.0.0.1:0\"]", "server.listen[0]", "port 0");
        rejects("[server]\nlisten = [\"127.0.0.1:123\", \"127.0.0.1:123\"]", "server.listen[1]", "server.listen[0]");
        rejects("[server]\nbackend = \"xdp\"", "server.interface", "xdp");
        rejects("[server]\ninterface = \"a-very-long-interface-name\"", "server.interface", "interface name");
        rejects("[server]\ninterface = \"eth/0\"", "server.interface", "interface name");
        rejects("[server]\nworkers = 5000", "server.workers", "got 5000");
        rejects("[server]\ncores = [1, 2, 1]", "server.cores[2]", "server.cores[0]");
        rejects("[server]\ncores = [4096]", "server.cores[0]", "below 1024");
        rejects("[server]\nworkers = 3\ncores = [0, 1]", "server.cores", "lists 2 cores but server.workers is 3");
        rejects("[server]\nbatch_size = 0", "server.batch_size", "between 1 and 1024, got 0");
        rejects("[server]\nbatch_size = 2000", "server.batch_size", "got 2000");
        rejects("[server]\nuser = \"chi me\"", "server.user", "not a valid name");
        rejects("[server]\ngroup = \"a:b\"", "server.group", "not a valid name");
        rejects("[server]\nuser = \"root\"\ngroup = \"ntp\"", "server.group", "no privilege drop");
        Config::from_toml_str("[server]\nbackend = \"xdp\"\ninterface = \"eth0\"").unwrap();
        Config::from_toml_str("[server]\nworkers = 2\ncores = [2, 3]").unwrap();
    }

    #[test]
    fn upstream_rules() {
        rejects("[upstream]\nstratum = 0", "upstream.stratum", "between 1 and 15, got 0");
        rejects("[upstream]\nstratum = 16", "upstream.stratum", "got 16");
        rejects("[upstream]\nreference_id = \"TOOLONG\"", "upstream.reference_id", "\"TOOLONG\"");
        rejects("[upstream]\nreference_id = \"G S\"", "upstream.reference_id", "ASCII");
        rejects("[upstream]\nreference_id = \"GPSé\"", "upstream.reference_id", "ASCII");
        rejects("[upstream]\nlocal_stratum = 16", "upstream.local_stratum", "got 16");
        rejects("[upstream]\nupdate_interval = 0.05", "upstream.update_interval", "got 0.05");
        rejects("[upstream]\nupdate_interval = 61.0", "upstream.update_interval", "got 61");
        rejects("[upstream]\nupdate_interval = nan", "upstream.update_interval", "got NaN");
    }

    #[test]
    fn upstream_sources_and_holdover_keys() {
        let c = Config::from_toml_str(
            "[upstream]\nsource = \"chrony\"\nchrony_address = \"127.0.0.1:1123\"\nmax_unsync_secs = 2.0\n\
             max_root_distance = 0.5",
        )
        .unwrap();
        assert_eq!(c.upstream.source, UpstreamSource::Chrony);
        assert_eq!(
            c.source_config(),
            crate::upstream::SourceConfig::Chrony { address: "127.0.0.1:1123".parse().unwrap() }
        );
        assert_eq!((c.upstream.max_unsync_secs, c.upstream.max_root_distance), (2.0, 0.5));
        let c = Config::from_toml_str("[upstream]\nsource = \"ptp4l\"\nptp4l_socket = \"/run/p\"\nptp4l_domain = 24")
            .unwrap();
        assert_eq!(
            c.source_config(),
            crate::upstream::SourceConfig::Ptp4l { socket: PathBuf::from("/run/p"), domain: 24 }
        );
        let e = parse_error("[upstream]\nsource = \"gps\"");
        assert!(e.contains("unknown variant `gps`") && e.contains("`chrony`"), "{e}");
        rejects("[upstream]\nmax_unsync_secs = -1.0", "upstream.max_unsync_secs", "got -1");
        rejects("[upstream]\nmax_root_distance = 0.0", "upstream.max_root_distance", "got 0");
        rejects("[upstream]\nmax_root_distance = 17.0", "upstream.max_root_distance", "got 17");
        rejects("[upstream]\nchrony_address = \"127.0.0.1:0\"", "upstream.chrony_address", "port 0");
        rejects("[upstream]\nsource = \"ptp4l\"\nptp4l_socket = \"\"", "upstream.ptp4l_socket", "must be set");
    }

    #[test]
    fn reference_id_forms() {
        let with = |id: &str| Config::from_toml_str(&format!("[upstream]\nreference_id = {id:?}")).unwrap();
        assert_eq!(with("GPS").reference_id(), RefId(*b"GPS\0"));
        assert_eq!(with("PPS1").reference_id(), RefId(*b"PPS1"));
        assert_eq!(with("192.0.2.7").reference_id(), RefId([192, 0, 2, 7]));
        assert_eq!(with("").reference_id(), RefId::LOCAL);
    }

    #[test]
    fn ntp_rules() {
        rejects("[ntp]\nmin_poll = -8", "ntp.min_poll", "between -7 and 17, got -8");
        rejects("[ntp]\nmax_poll = 18", "ntp.max_poll", "got 18");
        rejects("[ntp]\nmin_poll = 6\nmax_poll = 4", "ntp.min_poll", "must not exceed ntp.max_poll (6 > 4)");
        // Out of the type's range: the toml crate reports it with the key.
        assert!(parse_error("[ntp]\nmin_poll = 300").contains("min_poll"));
    }

    #[test]
    fn rate_limit_rules() {
        rejects("[rate_limit]\nburst = 0", "rate_limit.burst", "must be at least 1, got 0");
        rejects("[rate_limit]\naverage_interval = 0.0", "rate_limit.average_interval", "got 0");
        rejects("[rate_limit]\naverage_interval = -1.0", "rate_limit.average_interval", "got -1");
        rejects("[rate_limit]\naverage_interval = inf", "rate_limit.average_interval", "got inf");
        rejects("[rate_limit]\nipv6_prefix = 0", "rate_limit.ipv6_prefix", "between 1 and 128, got 0");
        rejects("[rate_limit]\nipv6_prefix = 129", "rate_limit.ipv6_prefix", "got 129");
        rejects("[rate_limit]\nkod_probability = 1.5", "rate_limit.kod_probability", "between 0 and 1, got 1.5");
        rejects("[rate_limit]\nkod_probability = nan", "rate_limit.kod_probability", "got NaN");
        rejects("[rate_limit]\ntable_entries = 0", "rate_limit.table_entries", "got 0");
        rejects("[rate_limit]\ntable_entries = 2000000000", "rate_limit.table_entries", "got 2000000000");
    }

    #[test]
    fn access_rules() {
        rejects(
            "[access]\ndeny = [\"192.0.2.1\", \"198.51.100.1\", \"10.0.0.0/33\"]",
            "access.deny[2]",
            "invalid prefix \"10.0.0.0/33\"",
        );
        rejects("[access]\nallow = [\"bogus\"]", "access.allow[0]", "invalid prefix \"bogus\"");
        rejects(
            "[access]\nallow = [\"192.0.2.1\"]\nrestrict = [\"192.0.2.1\"]",
            "access.restrict[0]",
            "also listed as access.allow[0]",
        );
        // The same prefix twice in one list is harmless.
        Config::from_toml_str("[access]\ndeny = [\"192.0.2.1\", \"192.0.2.1\"]").unwrap();
        let bad = Config {
            access: AccessSection { restrict: vec!["nope".into()], ..AccessSection::default() },
            ..Config::default()
        };
        assert_eq!(bad.acl().unwrap_err().problems()[0].key, "access.restrict[0]");
    }

    #[test]
    fn acl_follows_the_lists() {
        let c = Config::from_toml_str(
            "[access]\ndefault = \"deny\"\nallow = [\"192.0.2.1\"]\ndeny = [\"2001:db8::1\"]\nrestrict = \
             [\"198.51.100.1\"]\ndeny_response = \"silent\"",
        )
        .unwrap();
        let acl = c.acl().unwrap();
        // The placeholder ACL only knows its default; the rules are checked
        // by the real ACL's own tests.
        assert_eq!(acl.lookup("203.0.113.1".parse().unwrap()), AclAction::Deny);
        assert_eq!(c.responder_config(1).deny, DenyResponse::Silent);
        assert_eq!(Config::default().acl().unwrap().lookup("203.0.113.1".parse().unwrap()), AclAction::Allow);
    }

    #[test]
    fn metrics_and_log_rules() {
        rejects("[metrics]\nlisten = \"127.0.0.1:0\"", "metrics.listen", "port 0");
        rejects("[log]\nlevel = \"infoo\"", "log.level", "not a level");
        rejects("[log]\nlevel = \"\"", "log.level", "must not be empty");
        rejects("[log]\nlevel = \"info,chime_server=loud\"", "log.level", "EnvFilter");
        for ok in ["trace", "DEBUG", "warn", "error", "off", "info,chime_server=debug", "chime_proto=trace"] {
            Config::from_toml_str(&format!("[log]\nlevel = {ok:?}")).unwrap();
        }
    }

    #[test]
    fn xdp_rules() {
        rejects("[xdp]\nqueues = 2000", "xdp.queues", "between 0 and 1024, got 2000");
        rejects("[xdp]\nframe_size = 3000", "xdp.frame_size", "2048 or 4096, got 3000");
        rejects("[xdp]\nring_size = 1000", "xdp.ring_size", "power of two from 64 to 32768, got 1000");
        rejects("[xdp]\nring_size = 32", "xdp.ring_size", "got 32");
        rejects("[xdp]\nring_size = 65536\nframe_count = 131072", "xdp.ring_size", "got 65536");
        rejects("[xdp]\nframe_count = 4095", "xdp.frame_count", "at least twice xdp.ring_size (4096), got 4095");
        rejects("[xdp]\nframe_count = 2000000", "xdp.frame_count", "at most 1048576");
        rejects("[xdp]\nmode = \"generic\"\nhw_timestamps = true", "xdp.hw_timestamps", "generic");
        rejects("[xdp]\nmode = \"generic\"\nzero_copy = \"required\"", "xdp.zero_copy", "generic");
        rejects("[xdp]\nsource_rate = 0", "xdp.source_rate", "between 1 and 10000000, got 0");
        rejects("[xdp]\nsource_rate = 20000000", "xdp.source_rate", "got 20000000");
        rejects("[xdp]\nsource_burst = 0", "xdp.source_burst", "between 1 and 10000000, got 0");
        rejects("[xdp]\nsource_table_entries = 0", "xdp.source_table_entries", "between 1 and 16777216, got 0");
        rejects("[xdp]\nsource_table_entries = 20000000", "xdp.source_table_entries", "got 20000000");
        assert!(parse_error("[xdp]\nsource_rate = -1").contains("source_rate"));
        let c = Config::from_toml_str("[xdp]\nsource_rate = 1\nsource_burst = 1").unwrap();
        assert_eq!(c.xdp_source_limit(), Some(SourceLimit { rate: 1, burst: 1 }));
        assert_eq!(Config::default().xdp_source_limit(), Some(SourceLimit::DEFAULT));
        let e = parse_error("[xdp]\nmode = \"skb\"");
        assert!(e.contains("unknown variant `skb`") && e.contains("`native`"), "{e}");
        let e = parse_error("[xdp]\nport = 123");
        assert!(e.contains("unknown field `port`"), "{e}");

        // One port for every listen entry, but only when XDP is used.
        let mixed = "listen = [\"0.0.0.0:123\", \"[::]:1123\"]";
        rejects(
            &format!("[server]\nbackend = \"xdp\"\ninterface = \"eth0\"\n{mixed}"),
            "server.listen[1]",
            "the xdp backend serves one port, and server.listen[0] has 123",
        );
        rejects(&format!("[server]\ninterface = \"eth0\"\n{mixed}"), "server.listen[1]", "one port");
        Config::from_toml_str(&format!("[server]\n{mixed}")).unwrap();
        Config::from_toml_str(&format!("[server]\nbackend = \"socket\"\ninterface = \"eth0\"\n{mixed}")).unwrap();
        rejects(
            "[server]\nbackend = \"xdp\"\ninterface = \"eth0\"\nbatch_size = 128\n[xdp]\nring_size = 64\nframe_count = 128",
            "server.batch_size",
            "must not exceed xdp.ring_size (64)",
        );
        Config::from_toml_str("[xdp]\nring_size = 64\nframe_count = 128\nframe_size = 4096\nqueues = 8").unwrap();
        Config::from_toml_str("[xdp]\nmode = \"native\"\nhw_timestamps = true\nzero_copy = \"required\"").unwrap();
    }

    #[test]
    fn nts_rules() {
        rejects("[nts]\nenabled = true\ntls_key = \"/k\"", "nts.tls_cert", "must be set when nts.enabled is true");
        rejects("[nts]\nenabled = true\ntls_cert = \"/c\"", "nts.tls_key", "must be set");
        rejects(
            "[nts]\nenabled = true\ntls_cert = \"/c\"\ntls_key = \"/k\"\nlisten = []",
            "nts.listen",
            "at least one",
        );
        rejects("[nts]\nlisten = [\"127.0.0.1:0\"]", "nts.listen[0]", "port 0");
        rejects("[nts]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:1\"]", "nts.listen[1]", "already nts.listen[0]");
        rejects("[nts]\nrotation_interval = 0", "nts.rotation_interval", "between 1 and 31536000, got 0");
        rejects("[nts]\nkeep_keys = 0", "nts.keep_keys", "between 1 and 1024");
        rejects("[nts]\nntp_server = \"a b\"", "nts.ntp_server", "ASCII");
        rejects("[nts]\nmax_connections = 0", "nts.max_connections", "between 1");
        rejects("[nts]\nmax_connections_per_source = 0", "nts.max_connections_per_source", "between 1");
        rejects("[nts]\nhandshake_rate = -1.0", "nts.handshake_rate", ">= 0");
        rejects("[nts]\nhandshake_burst = 0", "nts.handshake_burst", "at least 1");
        rejects("[nts]\ntimeout = 0", "nts.timeout", "between 1 and 300");
        let c = Config::from_toml_str("[nts]\nenabled = true\ntls_cert = \"/c\"\ntls_key = \"/k\"\nntp_port = 1123")
            .unwrap();
        assert!(c.nts.enabled);
        assert_eq!(c.nts.ntp_port, 1123);
    }

    #[test]
    fn backend_none_is_an_nts_ke_front_end() {
        let e = Config::from_toml_str("[server]\nbackend = \"none\"").unwrap_err();
        let keys: Vec<_> = e.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["nts.enabled", "nts.ntp_server", "nts.fleet_secret"], "{e}");
        assert!(e.to_string().contains("so the NTP hosts can open the cookies"), "{e}");
        let front = "[server]\nbackend = \"none\"\n[nts]\nenabled = true\ntls_cert = \"/c\"\ntls_key = \"/k\"\n\
                     fleet_secret = \"/etc/chime/fleet-secret\"\nntp_server = \"ntp1.example.net\"";
        let c = Config::from_toml_str(front).unwrap();
        assert!(!c.serves_ntp());
        assert!(!c.uses_xdp());
        assert!(Config::default().serves_ntp());
        // The NTP settings are ignored, not checked against XDP rules.
        Config::from_toml_str(&format!("{front}\n[xdp]\nqueues = 4")).unwrap();
        let e = parse_error("[server]\nbackend = \"off\"");
        assert!(e.contains("`none`"), "{e}");
    }

    #[test]
    fn xdp_is_used_when_asked_or_auto_with_an_interface() {
        let with = |text: &str| Config::from_toml_str(text).unwrap().uses_xdp();
        assert!(!with(""), "auto without an interface: sockets");
        assert!(with("[server]\ninterface = \"eth0\""), "auto with an interface: xdp");
        assert!(with("[server]\nbackend = \"xdp\"\ninterface = \"eth0\""));
        assert!(!with("[server]\nbackend = \"socket\"\ninterface = \"eth0\""));
    }

    #[test]
    fn all_problems_are_reported_together() {
        let e = Config::from_toml_str(
            "[server]\nbatch_size = 0\n[rate_limit]\nburst = 0\n[ntp]\nmin_poll = 20\nmax_poll = 18",
        )
        .unwrap_err();
        let keys: Vec<_> = e.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["server.batch_size", "ntp.min_poll", "ntp.max_poll", "ntp.min_poll", "rate_limit.burst"]);
        let text = e.to_string();
        assert!(text.starts_with("invalid configuration (5 problems):\n  server.batch_size: "), "{text}");
        assert_eq!(text.lines().count(), 6, "{text}");
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let e = parse_error("[rate_limit]\nbrust = 3");
        assert!(e.contains("unknown field `brust`") && e.contains("line 2"), "{e}");
        let e = parse_error("[sever]\nworkers = 3");
        assert!(e.contains("unknown field `sever`"), "{e}");
        let e = parse_error("verbose = true");
        assert!(e.contains("unknown field `verbose`"), "{e}");
    }

    #[test]
    fn type_and_syntax_errors_keep_the_toml_message() {
        let e = parse_error("[server]\nworkers = \"four\"");
        assert!(e.contains("line 2") && e.contains("workers"), "{e}");
        let e = parse_error("[server]\nbackend = \"dpdk\"");
        assert!(e.contains("unknown variant `dpdk`") && e.contains("`socket`"), "{e}");
        let e = parse_error("[server\n");
        assert!(e.contains("line 1"), "{e}");
        let e = parse_error("[server]\nlisten = [\"localhost:123\"]");
        assert!(e.contains("listen") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn full_example_parses() {
        let c = Config::from_toml_str(
            r#"
            [server]
            backend = "xdp"
            listen = ["192.0.2.10:123", "[2001:db8::10]:123"]
            interface = "enp1s0f0"
            workers = 4
            cores = [2, 3, 4, 5]
            batch_size = 64
            user = "chime"
            group = "chime"

            [upstream]
            source = "kernel"
            stratum = 1
            reference_id = "GPS"
            local_stratum = 10
            unsynchronized = "silent"
            update_interval = 0.5

            [ntp]
            min_poll = 3
            max_poll = 10

            [rate_limit]
            enabled = false
            average_interval = 8.0
            burst = 4
            ipv6_prefix = 56
            kod_probability = 0.0
            table_entries = 1000

            [access]
            default = "deny"
            allow = ["192.0.2.1", "2001:db8::1"]
            deny = ["198.51.100.1"]
            restrict = ["203.0.113.1"]
            deny_response = "silent"

            [metrics]
            enabled = false
            listen = "[::1]:9100"

            [log]
            level = "info,chime_server=debug"

            [xdp]
            mode = "native"
            queues = 4
            zero_copy = "required"
            frame_count = 8192
            frame_size = 4096
            ring_size = 4096
            hw_timestamps = true
            drop_non_client = false
            source_rate = 50
            source_burst = 100
            source_table_entries = 4096
            replace_foreign = true
            "#,
        )
        .unwrap();
        assert_eq!(c.server.backend, Backend::Xdp);
        assert_eq!(c.worker_count(), 4);
        assert_eq!(c.reference_id(), RefId(*b"GPS\0"));
        assert_eq!(c.local_stratum(), Some(10));
        assert_eq!(c.update_interval(), Duration::from_millis(500));
        assert_eq!(c.access.allow.len(), 2);
        assert!(!c.metrics.enabled);
        assert_eq!(
            c.xdp,
            XdpSection {
                mode: XdpMode::Native,
                queues: 4,
                zero_copy: ZeroCopy::Required,
                frame_count: 8192,
                frame_size: 4096,
                ring_size: 4096,
                hw_timestamps: true,
                drop_non_client: false,
                source_rate: 50,
                source_burst: 100,
                source_table_entries: 4096,
                replace_foreign: true,
            }
        );
        assert_eq!(c.xdp_source_limit(), None, "rate_limit.enabled = false turns the XDP guard off too");
        assert!(c.uses_xdp());
        let r = c.responder_config(3);
        assert_eq!((r.min_poll, r.max_poll), (3, 10));
        assert_eq!(r.unsynchronized, UnsyncPolicy::Silent);
        assert_eq!(r.kod_probability, Probability::NEVER);
        assert_eq!(
            r.rate_limit,
            RateLimitConfig { enabled: false, average_interval: 8.0, burst: 4, ipv6_prefix_len: 56, capacity: 334 }
        );
        c.acl().unwrap();
    }

    #[test]
    fn responder_config_splits_the_table() {
        let c = Config::default();
        assert_eq!(c.responder_config(1).rate_limit.capacity, 1 << 20);
        assert_eq!(c.responder_config(3).rate_limit.capacity, 349_526);
        assert_eq!(c.responder_config(0).rate_limit.capacity, 1 << 20);
        let r = c.responder_config(4);
        assert_eq!(r.rate_limit.capacity, 1 << 18);
        assert_eq!(r.kod_probability, Probability::new(0.25).unwrap());
        assert_eq!(r.interleaved_capacity, 1 << 14);
        assert_eq!(
            r,
            ResponderConfig {
                rate_limit: r.rate_limit.clone(),
                interleaved_capacity: 1 << 14,
                ..ResponderConfig::default()
            }
        );
    }

    #[test]
    fn worker_count_resolution() {
        let mut c = Config::default();
        assert_eq!(c.worker_count(), std::thread::available_parallelism().unwrap().get());
        c.server.cores = vec![0, 1, 2];
        assert_eq!(c.worker_count(), 3);
        c.server.workers = 7;
        assert_eq!(c.worker_count(), 7);
    }

    #[test]
    fn errors_name_the_file() {
        let missing = Path::new("/nonexistent/chimed.toml");
        let e = Config::load(missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().starts_with("cannot read /nonexistent/chimed.toml: "), "{e}");

        let dir = std::env::temp_dir().join(format!("chime-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.toml");
        std::fs::write(&file, "[rate_limit]\nburst = 0\n").unwrap();
        let e = Config::load(&file).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: invalid configuration: rate_limit.burst: must be at least 1, got 0", file.display())
        );
        std::fs::write(&file, "[rate_limit]\nbrust = 1\n").unwrap();
        let e = Config::load(&file).unwrap_err();
        assert!(e.to_string().starts_with(&format!("{}: TOML parse error", file.display())), "{e}");
        std::fs::write(&file, "[server]\nworkers = 2\n").unwrap();
        assert_eq!(Config::load(&file).unwrap().server.workers, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn printed_config_reparses_to_itself() {
        let mut c = Config::default();
        c.server.cores = vec![1, 2];
        c.access.deny = vec!["192.0.2.1".into()];
        c.upstream.update_interval = 0.25;
        let text = c.to_toml_string().unwrap();
        assert_eq!(Config::from_toml_str(&text).unwrap(), c);
    }

    #[test]
    fn reference_file_describes_every_backend() {
        let server = REFERENCE.split("[server]").nth(1).unwrap().split("# backend = ").next().unwrap();
        for backend in [Backend::Socket, Backend::Xdp, Backend::Auto, Backend::None] {
            assert!(server.contains(&format!("\"{backend}\"")), "ops/chimed.toml does not describe backend {backend}");
        }
    }

    #[test]
    fn reference_file_validates_and_is_all_defaults() {
        let parsed = Config::from_toml_str(REFERENCE).unwrap();
        assert_eq!(parsed, Config::default(), "ops/chimed.toml must only set defaults");
    }

    /// Every key `Config::default()` has is documented in ops/chimed.toml,
    /// in its table, as a commented-out `# key = default` line whose value is
    /// the real default; and every such line names a real key.
    #[test]
    fn reference_file_documents_every_key_with_its_default() {
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let mut documented: BTreeMap<String, BTreeMap<String, toml::Value>> = BTreeMap::new();
        let mut section = String::new();
        for line in REFERENCE.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            // `# key = value`; `#   key = value` (indented) is an example.
            let Some(body) = line.strip_prefix("# ").filter(|b| !b.starts_with(char::is_whitespace)) else { continue };
            let Some((key, _)) = body.split_once('=') else { continue };
            let key = key.trim();
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
                continue; // prose
            }
            let Ok(table) = body.parse::<toml::Table>() else { continue };
            let (key, value) = table.into_iter().next().unwrap();
            let previous = documented.entry(section.clone()).or_default().insert(key.clone(), value);
            assert!(previous.is_none(), "[{section}] {key} is documented twice");
        }

        for (name, table) in &defaults {
            let table = table.as_table().unwrap();
            let docs = documented.get(name).unwrap_or_else(|| panic!("[{name}] is missing from ops/chimed.toml"));
            for (key, default) in table {
                let doc = docs.get(key).unwrap_or_else(|| panic!("[{name}] {key} is missing from ops/chimed.toml"));
                assert_eq!(doc, default, "[{name}] {key}: ops/chimed.toml shows a value that is not the default");
            }
            for key in docs.keys() {
                assert!(table.contains_key(key), "ops/chimed.toml documents [{name}] {key}, which does not exist");
            }
        }
        for name in documented.keys() {
            assert!(defaults.contains_key(name), "ops/chimed.toml documents [{name}], which does not exist");
        }
    }
}
