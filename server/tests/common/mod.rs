//! Test harness shared by chimed's end-to-end tests: starting and stopping
//! chimed, a minimal NTP client built from chime-proto, scraping metrics,
//! and throwaway network namespaces that are removed even when a test fails.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use chime_proto::NtpTimestamp;
use chime_proto::packet::Header;

/// Whether the tests run as root (read from /proc, no `unsafe`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Whether `prog` is on PATH (or at an absolute path).
pub fn have(prog: &str) -> bool {
    which(prog).is_some()
}

pub fn which(prog: &str) -> Option<PathBuf> {
    if prog.starts_with('/') {
        return std::path::Path::new(prog).exists().then(|| PathBuf::from(prog));
    }
    let path = std::env::var("PATH").unwrap_or_default() + ":/usr/sbin:/sbin";
    path.split(':').map(|d| PathBuf::from(d).join(prog)).find(|p| p.exists())
}

/// A UDP port that was free a moment ago on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A client request: version 4, mode 3, poll 6, the given transmit stamp.
pub fn client_request(xmt: u64) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = 0x23;
    b[2] = 6;
    b[40..48].copy_from_slice(&xmt.to_be_bytes());
    b
}

/// Sends `req` from `sock` to `to` and waits up to `wait` for a reply.
pub fn query(sock: &UdpSocket, to: SocketAddr, req: &[u8], wait: Duration) -> Option<Vec<u8>> {
    sock.set_read_timeout(Some(wait)).unwrap();
    sock.send_to(req, to).unwrap();
    let mut buf = [0u8; 2048];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) if from == to => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// The current system time as NTP bits, for transmit timestamps.
pub fn now_bits() -> u64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    NtpTimestamp::from_unix(d.as_secs() as i64, d.subsec_nanos()).to_bits()
}

/// A running chimed, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Chimed {
    child: Option<Child>,
    pub ntp: SocketAddr,
    pub metrics: Option<SocketAddr>,
    stderr_path: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "chime-test-{}-{}-{}",
        tag,
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Chimed {
    /// Starts chimed on 127.0.0.1 (a free port) with two workers, metrics
    /// on a free loopback port, and `extra` arguments; waits until it
    /// answers.
    pub fn start(extra: &[&str]) -> Self {
        let port = free_udp_port();
        let mport = free_tcp_port();
        let ntp: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
        let listen = ntp.to_string();
        let mlisten = format!("127.0.0.1:{mport}");
        let mut args = vec!["--listen", &listen, "--metrics-listen", &mlisten, "--workers", "2", "--log-level", "info"];
        args.extend_from_slice(extra);
        let chimed = Self::spawn(None, &args, ntp, Some(mlisten.parse().unwrap()));
        chimed.wait_ready();
        chimed
    }

    /// Starts chimed with exactly `args`, optionally inside network
    /// namespace `netns`; does not wait.
    pub fn spawn(netns: Option<&str>, args: &[&str], ntp: SocketAddr, metrics: Option<SocketAddr>) -> Self {
        Self::spawn_wrapped(netns, &[], args, ntp, metrics)
    }

    /// [`Chimed::spawn`], started through `wrapper` (a program and its
    /// arguments, such as `setpriv ...`) inside the namespace.
    pub fn spawn_wrapped(
        netns: Option<&str>,
        wrapper: &[&str],
        args: &[&str],
        ntp: SocketAddr,
        metrics: Option<SocketAddr>,
    ) -> Self {
        let dir = scratch_dir("chimed");
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let bin = env!("CARGO_BIN_EXE_chimed");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).args(wrapper).arg(bin);
                c
            }
            None if !wrapper.is_empty() => {
                let mut c = Command::new(wrapper[0]);
                c.args(&wrapper[1..]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        let child = cmd.spawn().expect("spawn chimed");
        Self { child: Some(child), ntp, metrics, stderr_path }
    }

    /// Waits (bounded) until chimed answers a plain request on `self.ntp`.
    pub fn wait_ready(&self) {
        let sock = UdpSocket::bind(if self.ntp.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if query(&sock, self.ntp, &client_request(now_bits()), Duration::from_millis(200)).is_some() {
                return;
            }
        }
        panic!("chimed did not answer on {} within 20 s; stderr:\n{}", self.ntp, self.stderr());
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// GET /metrics.
    pub fn scrape(&self) -> String {
        http_get(self.metrics.expect("metrics enabled"), "/metrics")
    }
}

impl Drop for Chimed {
    fn drop(&mut self) {
        self.terminate();
        // The scratch directory holding the stderr log.
        if let Some(dir) = self.stderr_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A bare HTTP/1.0 GET; returns the body.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

/// Sums a metric over all its series (optionally only those whose labels
/// contain `label`).
pub fn metric_sum(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| label.is_none_or(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Parses a reply header.
pub fn header(reply: &[u8]) -> Header {
    Header::parse(reply).unwrap()
}

/// Runs a command with a time bound; returns its output.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "command {cmd:?} did not finish in {limit:?}; stdout: {} stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What [`run_script_bounded`] saw.
#[derive(Debug)]
pub struct ScriptRun {
    /// The exit code; `None` when it was killed (time limit).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a script that starts long-lived helpers of its own (namespaces,
/// daemons) in a process group of its own, with its output in files (a
/// helper that outlives it cannot keep a pipe open). Past `limit` the group
/// gets SIGTERM (the script's cleanup traps run), and 15 s later SIGKILL.
pub fn run_script_bounded(cmd: &mut Command, limit: Duration) -> ScriptRun {
    use std::os::unix::process::CommandExt;
    let dir = scratch_dir("script");
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let group = format!("-{}", child.id());
    let mut deadline = Instant::now() + limit;
    let mut termed = false;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            if termed {
                let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
                let _ = child.wait();
                break None;
            }
            let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
            termed = true;
            deadline = Instant::now() + Duration::from_secs(15);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let run = ScriptRun { code, stdout: read(&out_path), stderr: read(&err_path) };
    let _ = std::fs::remove_dir_all(dir);
    if termed {
        panic!("{cmd:?} did not finish in {limit:?}:\n{}\n{}", run.stdout, run.stderr);
    }
    run
}

pub fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// A network namespace made for one test, deleted on drop (also when the
/// test panics). Its loopback is up.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// `None` (with a printed reason) when not root or `ip` is missing.
    pub fn new(tag: &str) -> Option<Self> {
        if !is_root() {
            eprintln!("skipping: network namespaces need root");
            return None;
        }
        if !have("ip") {
            eprintln!("skipping: iproute2's ip is not installed");
            return None;
        }
        let name = format!("chime-{tag}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// Runs a command inside the namespace.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Processes still inside would keep it alive; kill them first.
        let _ = Command::new("ip").args(["netns", "pids", &self.name]).output().map(|o| {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        });
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Two namespaces joined by a veth pair: `server` holds 198.18.0.1/30 and
/// fdc4:1e::1/64, `client` holds 198.18.0.2/30 and fdc4:1e::2/64 (addresses
/// from the benchmarking and unique-local ranges, reachable only between
/// these two namespaces). The same layout as `ops/testbed/testbed.sh`.
pub struct VethPair {
    pub server: NetNs,
    pub client: NetNs,
    /// The veth end in `server`.
    pub server_dev: String,
    /// The veth end in `client`.
    pub client_dev: String,
    /// RX (and TX) queues on each end.
    pub queues: usize,
}

impl VethPair {
    pub const SERVER_V4: &'static str = "198.18.0.1";
    pub const CLIENT_V4: &'static str = "198.18.0.2";
    pub const SERVER_V6: &'static str = "fdc4:1e::1";
    pub const CLIENT_V6: &'static str = "fdc4:1e::2";

    /// A pair with one queue on each end.
    pub fn new(tag: &str) -> Option<Self> {
        Self::with_queues(tag, 1)
    }

    /// A pair whose ends each have `queues` RX and TX queues (the veth
    /// sender's TX queue, chosen per flow, is the receiver's RX queue, so
    /// many source ports spread over the queues like RSS).
    pub fn with_queues(tag: &str, queues: usize) -> Option<Self> {
        assert!((1..=64).contains(&queues), "1 to 64 queues");
        let server = NetNs::new(&format!("{tag}s"))?;
        let client = NetNs::new(&format!("{tag}c"))?;
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let (a, b) =
            (format!("chs{}x{n}", std::process::id() % 10000), format!("chc{}x{n}", std::process::id() % 10000));
        let q = queues.to_string();
        ip(&[
            "link",
            "add",
            &a,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            &server.name,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            &client.name,
        ]);
        for (ns, dev, v4, v6) in
            [(&server, &a, "198.18.0.1/30", "fdc4:1e::1/64"), (&client, &b, "198.18.0.2/30", "fdc4:1e::2/64")]
        {
            ip(&["-n", &ns.name, "addr", "add", v4, "dev", dev]);
            ip(&["-n", &ns.name, "addr", "add", v6, "dev", dev, "nodad"]);
            ip(&["-n", &ns.name, "link", "set", dev, "up"]);
        }
        Some(Self { server, client, server_dev: a, client_dev: b, queues })
    }

    /// RX queues of the server end, as the kernel shows them.
    pub fn server_rx_queues(&self) -> usize {
        let out = run_bounded(
            self.server.cmd("sh").args(["-c", &format!("ls -d /sys/class/net/{}/queues/rx-*", self.server_dev)]),
            Duration::from_secs(5),
        );
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}

/// The packet path chimed runs with on the test bed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    /// `--backend socket --workers 2`.
    Socket,
    /// `--backend xdp --interface <the server's veth end>` (two queues).
    Xdp,
}

impl VethPair {
    /// chimed's NTP address on the bed: port 123 of the server's IPv4.
    pub fn server_ntp() -> SocketAddr {
        SocketAddr::new(Self::SERVER_V4.parse().unwrap(), 123)
    }

    /// Where chimed on the bed serves metrics (reachable from the client).
    pub fn server_metrics() -> SocketAddr {
        SocketAddr::new(Self::SERVER_V4.parse().unwrap(), 9123)
    }

    /// Starts chimed in the server namespace on the wildcard addresses
    /// (port 123), `--local-stratum 10`, metrics on
    /// [`Self::server_metrics`], with the configuration file `cfg`, the
    /// backend and `extra` arguments; waits until it answers the client
    /// namespace (through the child test `child_test`).
    pub fn start_chimed(&self, backend: Backend, cfg: &Path, extra: &[&str], child_test: &str) -> Chimed {
        let maddr = Self::server_metrics().to_string();
        let mut args = vec!["-c", cfg.to_str().unwrap(), "--local-stratum", "10", "--metrics-listen", &maddr];
        match backend {
            Backend::Socket => args.extend_from_slice(&["--backend", "socket", "--workers", "2"]),
            Backend::Xdp => args.extend_from_slice(&["--backend", "xdp", "--interface", &self.server_dev]),
        }
        args.extend_from_slice(extra);
        let chimed = Chimed::spawn(Some(&self.server.name), &args, Self::server_ntp(), None);
        wait_ready_from(&self.client, child_test, Self::server_ntp(), &chimed);
        chimed
    }
}

impl NetNs {
    /// Runs `prog args` inside the namespace, bounded by `limit`.
    pub fn run(&self, prog: &str, args: &[&str], limit: Duration) -> Output {
        run_bounded(self.cmd(prog).args(args), limit)
    }

    /// The current test binary, re-run inside the namespace with only the
    /// test `test_name` (which must call [`child_main`]); set the child's
    /// job with an environment variable ([`LOAD_ENV`], [`TCP_ENV`]).
    pub fn self_test(&self, test_name: &str) -> Command {
        // Not /proc/self/exe: `ip` would resolve that to itself.
        let exe = std::env::current_exe().expect("test binary path");
        let mut c = self.cmd(exe.to_str().expect("UTF-8 path"));
        c.args([test_name, "--exact", "--nocapture", "--test-threads=1"]);
        c
    }
}

// ---------------------------------------------------------------------------
// NTS test certificates.

/// The name the test server certificate is for.
pub const NTS_NAME: &str = "ntp.chime.test";

/// ca.pem, cert.pem and key.pem (mode 0600) in a scratch directory.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = scratch_dir("nts-pki");
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "chime test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec![NTS_NAME.to_owned()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, NTS_NAME);
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        write_secret(&dir.join("key.pem"), key.serialize_pem().as_bytes());
        Self { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert(&self) -> String {
        self.dir.join("cert.pem").display().to_string()
    }

    pub fn key(&self) -> String {
        self.dir.join("key.pem").display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Checks that every thread of process `pid` runs under a seccomp filter
/// (`Seccomp: 2` in its status) with no_new_privs set, as chimed's default
/// `server.seccomp = "enforce"` leaves it once it serves.
pub fn assert_confined(pid: u32) {
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else { continue };
        let field = |k: &str| status.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1));
        assert_eq!(field("Seccomp:"), Some("2"), "a thread without the filter:\n{status}");
        assert_eq!(field("NoNewPrivs:"), Some("1"), "{status}");
        threads += 1;
    }
    assert!(threads > 1, "{threads} threads");
}

/// Writes a file only its owner may read (mode 0600).
pub fn write_secret(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

// ---------------------------------------------------------------------------
// Children: the test binary re-run inside a namespace.

/// Environment variable that makes [`child_main`] run the load client:
/// `target,count,rate,sockets,window,max_secs` (see [`LoadParams`]).
pub const LOAD_ENV: &str = "CHIME_LOAD_CHILD";
/// Environment variable that makes [`child_main`] run a TCP probe:
/// `listen,ADDR:PORT` (accept one connection, echo a line, exit) or
/// `connect,ADDR:PORT` (connect, send a line, expect it back).
pub const TCP_ENV: &str = "CHIME_TCP_CHILD";
/// Prefix of the load client's result line on stdout.
pub const LOAD_RESULT: &str = "CHIME_LOAD_RESULT ";
const TCP_LISTENING: &str = "CHIME_TCP_LISTENING";
const TCP_OK: &str = "CHIME_TCP_OK";

/// The body of a test that is a no-op in a normal run and does the job an
/// environment variable names when the binary is re-run as a child.
pub fn child_main() {
    if let Ok(spec) = std::env::var(LOAD_ENV) {
        let params = LoadParams::from_env(&spec).unwrap_or_else(|| panic!("bad {LOAD_ENV}={spec:?}"));
        let summary = run_load_here(&params);
        // On a line of its own: libtest has printed "test child ... " already.
        println!("\n{LOAD_RESULT}{}", summary.to_line());
    } else if let Ok(spec) = std::env::var(TCP_ENV) {
        tcp_child(&spec);
    } else if let Ok(addr) = std::env::var(HTTP_ENV) {
        let body = http_get(addr.parse().expect("HTTP child address"), "/metrics");
        println!("\n{HTTP_BEGIN}\n{body}\n{HTTP_END}");
    } else if let Ok(args) = std::env::var(XLOAD_ENV) {
        use clap::Parser;
        let argv = std::iter::once("chime-load").chain(args.split('\x1f'));
        let args = chime_loadgen::run::Args::parse_from(argv);
        match chime_loadgen::run::run(&args) {
            Ok(_) => println!("\n{XLOAD_DONE}"),
            Err(f) => panic!("chime-load failed: {}", f.message),
        }
    }
}

/// Environment variable that makes [`child_main`] run chime-load (the
/// library behind the binary) with these arguments, separated by `\x1f`.
pub const XLOAD_ENV: &str = "CHIME_XLOAD_ARGS";
/// What the chime-load child prints when the run succeeded.
pub const XLOAD_DONE: &str = "CHIME_XLOAD_DONE";

/// Runs chime-load with `args` and `--json JSON --no-progress` inside `ns`
/// (re-running this binary's child test `test_name`), bounded by `limit`;
/// prints its output and returns its JSON report.
pub fn chime_load(ns: &NetNs, test_name: &str, args: &[&str], json: &Path, limit: Duration) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--json", json.to_str().expect("UTF-8 path"), "--no-progress"]);
    let mut cmd = ns.self_test(test_name);
    cmd.env(XLOAD_ENV, all.join("\x1f"));
    let out = run_bounded(&mut cmd, limit);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("chime-load {}:\n{text}", all.join(" "));
    assert!(out.status.success() && text.contains(XLOAD_DONE), "chime-load failed:\n{text}");
    serde_json::from_str(&std::fs::read_to_string(json).expect("chime-load's JSON report")).expect("JSON report")
}

/// Environment variable that makes [`child_main`] fetch `/metrics` from
/// `ADDR:PORT` and print it between [`HTTP_BEGIN`] and [`HTTP_END`].
pub const HTTP_ENV: &str = "CHIME_HTTP_CHILD";
const HTTP_BEGIN: &str = "CHIME_HTTP_BODY_BEGIN";
const HTTP_END: &str = "CHIME_HTTP_BODY_END";

/// Scrapes chimed's metrics at `addr` from inside namespace `ns` (through
/// the child `test_name`).
pub fn scrape_from(ns: &NetNs, test_name: &str, addr: SocketAddr) -> String {
    let out = run_bounded(ns.self_test(test_name).env(HTTP_ENV, addr.to_string()), Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "scrape child failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let body = text.split(HTTP_BEGIN).nth(1).and_then(|r| r.split(HTTP_END).next());
    body.unwrap_or_else(|| panic!("no metrics in child output: {text}")).to_owned()
}

/// The value of one sample, selected by its full label set text, e.g.
/// `chime_xdp_frames{worker="0",state="free"}`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))?.rsplit(' ').next()?.parse().ok()
}

/// What the load client does.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadParams {
    /// The server.
    pub target: SocketAddr,
    /// Requests to send in all.
    pub count: u64,
    /// Requests per second; 0 = as fast as `window` allows.
    pub rate: u64,
    /// Client sockets (source ports) used round-robin.
    pub sockets: usize,
    /// Most requests outstanding at once; 0 = no limit. When the window is
    /// full and no reply came for 20 ms, the outstanding ones count as lost.
    pub window: u64,
    /// Hard limit on the whole run.
    pub max_time: Duration,
}

impl LoadParams {
    /// `count` requests to `target`, unpaced, 32 sockets, 256 outstanding,
    /// at most 60 s.
    pub fn new(target: SocketAddr, count: u64) -> Self {
        Self { target, count, rate: 0, sockets: 32, window: 256, max_time: Duration::from_secs(60) }
    }

    fn to_env(&self) -> String {
        format!(
            "{},{},{},{},{},{}",
            self.target,
            self.count,
            self.rate,
            self.sockets,
            self.window,
            self.max_time.as_secs_f64()
        )
    }

    fn from_env(spec: &str) -> Option<Self> {
        let mut it = spec.split(',');
        let p = Self {
            target: it.next()?.parse().ok()?,
            count: it.next()?.parse().ok()?,
            rate: it.next()?.parse().ok()?,
            sockets: it.next()?.parse().ok()?,
            window: it.next()?.parse().ok()?,
            max_time: Duration::try_from_secs_f64(it.next()?.parse().ok()?).ok()?,
        };
        (it.next().is_none() && p.sockets > 0 && p.count <= 100_000_000).then_some(p)
    }
}

/// The load client's result.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadSummary {
    /// Requests sent.
    pub sent: u64,
    /// Distinct requests answered with a time reply (origin matched).
    pub received: u64,
    /// Distinct requests answered with a KoD.
    pub kod: u64,
    /// Datagrams that were not a reply to an outstanding request.
    pub invalid: u64,
    /// From the first request to the last reply (or the end), seconds.
    pub duration_s: f64,
    /// `received / duration_s`: requests answered per second.
    pub rate: f64,
}

impl LoadSummary {
    /// One JSON object on one line.
    pub fn to_line(self) -> String {
        format!(
            "{{\"sent\":{},\"received\":{},\"kod\":{},\"invalid\":{},\"duration_s\":{:.6},\"rate\":{:.1}}}",
            self.sent, self.received, self.kod, self.invalid, self.duration_s, self.rate
        )
    }

    /// Parses [`Self::to_line`]'s output.
    pub fn from_line(line: &str) -> Option<Self> {
        let body = line.trim().strip_prefix('{')?.strip_suffix('}')?;
        let mut s = Self::default();
        for field in body.split(',') {
            let (k, v) = field.split_once(':')?;
            match k.trim().trim_matches('"') {
                "sent" => s.sent = v.parse().ok()?,
                "received" => s.received = v.parse().ok()?,
                "kod" => s.kod = v.parse().ok()?,
                "invalid" => s.invalid = v.parse().ok()?,
                "duration_s" => s.duration_s = v.parse().ok()?,
                "rate" => s.rate = v.parse().ok()?,
                _ => return None,
            }
        }
        Some(s)
    }

    /// Fraction of the sent requests answered (time or KoD).
    pub fn answered_fraction(&self) -> f64 {
        if self.sent == 0 { 0.0 } else { (self.received + self.kod) as f64 / self.sent as f64 }
    }
}

/// Runs the load client inside `ns` (re-running this test binary's test
/// `test_name`, which must call [`child_main`]) and returns its summary.
pub fn run_load(ns: &NetNs, test_name: &str, params: &LoadParams) -> LoadSummary {
    let mut cmd = ns.self_test(test_name);
    cmd.env(LOAD_ENV, params.to_env());
    let out = run_bounded(&mut cmd, params.max_time + Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "load child failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
        .lines()
        .find_map(|l| l.split_once(LOAD_RESULT).and_then(|(_, json)| LoadSummary::from_line(json)))
        .unwrap_or_else(|| panic!("no result line from the load child:\n{stdout}"))
}

/// The load client itself, in this process: `count` NTP client requests to
/// `target` from `sockets` source ports, each request's transmit timestamp
/// a sequence number the reply must echo as its origin.
pub fn run_load_here(p: &LoadParams) -> LoadSummary {
    use std::io::ErrorKind;

    const BURST: u64 = 64;
    const STALL: Duration = Duration::from_millis(20);
    const DRAIN: Duration = Duration::from_millis(500);

    let any: std::net::IpAddr =
        if p.target.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { std::net::Ipv6Addr::UNSPECIFIED.into() };
    let socks: Vec<UdpSocket> = (0..p.sockets)
        .map(|_| {
            let s = UdpSocket::bind((any, 0)).expect("bind a client socket");
            s.connect(p.target).expect("connect");
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let base = now_bits();
    let mut seen = vec![false; p.count as usize];
    let (mut sent, mut received, mut kod, mut invalid, mut written_off) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut next_sock = 0usize;
    let mut buf = [0u8; 1024];
    let start = Instant::now();
    let deadline = start + p.max_time;
    let mut last_progress = start;
    let mut last_reply = start;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let mut got = 0;
        for s in &socks {
            // Until it would block, or an ICMP error (server not up yet).
            while let Ok(n) = s.recv(&mut buf) {
                got += 1;
                let seq = u64::from_be_bytes(buf[24..32].try_into().unwrap()).wrapping_sub(base);
                if n < 48 || buf[0] & 7 != 4 || seq >= p.count || seen[seq as usize] {
                    invalid += 1;
                    continue;
                }
                seen[seq as usize] = true;
                if buf[1] == 0 { kod += 1 } else { received += 1 }
            }
        }
        if got > 0 {
            last_progress = now;
            last_reply = now;
        }
        let answered = received + kod;
        if sent < p.count {
            let allowed = if p.rate == 0 {
                p.count
            } else {
                p.count.min((p.rate as f64 * now.duration_since(start).as_secs_f64()) as u64 + 1)
            };
            let outstanding = sent.saturating_sub(answered + written_off);
            let mut room = if p.window == 0 { u64::MAX } else { p.window.saturating_sub(outstanding) };
            if room == 0 && now.duration_since(last_progress) > STALL {
                written_off = sent.saturating_sub(answered);
                room = p.window;
                last_progress = now;
            }
            let n = room.min(allowed - sent).min(BURST);
            for _ in 0..n {
                let s = &socks[next_sock % socks.len()];
                next_sock += 1;
                match s.send(&client_request(base.wrapping_add(sent))) {
                    Ok(_) => sent += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // ECONNREFUSED from an earlier ICMP error and the like:
                    // the request is lost, move on.
                    Err(_) => sent += 1,
                }
            }
            if n == 0 && got == 0 {
                std::thread::sleep(Duration::from_micros(20));
            }
        } else {
            if answered >= p.count || now.duration_since(last_progress) > DRAIN {
                break;
            }
            if got == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
    let duration_s = last_reply.duration_since(start).as_secs_f64().max(1e-9);
    LoadSummary { sent, received, kod, invalid, duration_s, rate: received as f64 / duration_s }
}

/// Sends a few requests from `client` to `target` until one is answered
/// (bounded); panics with chimed's log otherwise.
pub fn wait_ready_from(client: &NetNs, test_name: &str, target: SocketAddr, chimed: &Chimed) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut probe = LoadParams::new(target, 3);
    probe.window = 1;
    probe.sockets = 1;
    probe.max_time = Duration::from_secs(2);
    while Instant::now() < deadline {
        if run_load(client, test_name, &probe).received > 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("chimed did not answer on {target} within 20 s; stderr:\n{}", chimed.stderr());
}

/// Checks that a TCP connection from `client` to `addr` (in `server`)
/// works: a listener child in `server` echoes a line a connecting child in
/// `client` sends.
pub fn tcp_works(server: &NetNs, client: &NetNs, test_name: &str, addr: SocketAddr) -> Result<(), String> {
    use std::io::BufRead;

    let mut listener = server
        .self_test(test_name)
        .env(TCP_ENV, format!("listen,{addr}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut lines = std::io::BufReader::new(listener.stdout.take().unwrap()).lines();
    // The child exits (closing stdout) within its own bound, so this ends.
    let listening = lines.by_ref().map_while(Result::ok).any(|l| l.contains(TCP_LISTENING));
    if !listening {
        let _ = listener.kill();
        let _ = listener.wait();
        return Err("the TCP listener child did not start".into());
    }
    let mut cmd = client.self_test(test_name);
    cmd.env(TCP_ENV, format!("connect,{addr}"));
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    let _ = listener.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains(TCP_OK) { Ok(()) } else { Err(format!("TCP probe failed: {text}")) }
}

fn tcp_child(spec: &str) {
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    let (role, addr) = spec.split_once(',').unwrap_or_else(|| panic!("bad {TCP_ENV}={spec:?}"));
    let addr: SocketAddr = addr.parse().unwrap();
    let limit = Duration::from_secs(20);
    match role {
        "listen" => {
            let l = TcpListener::bind(addr).unwrap();
            l.set_nonblocking(true).unwrap();
            println!("\n{TCP_LISTENING}");
            std::io::stdout().flush().unwrap();
            let deadline = Instant::now() + limit;
            let mut conn = loop {
                match l.accept() {
                    Ok((c, _)) => break c,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    Err(e) => panic!("no connection within {limit:?}: {e}"),
                }
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(limit)).unwrap();
            let mut line = String::new();
            BufReader::new(conn.try_clone().unwrap()).read_line(&mut line).unwrap();
            conn.write_all(line.as_bytes()).unwrap();
        }
        "connect" => {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            c.set_read_timeout(Some(limit)).unwrap();
            c.write_all(b"chime tcp probe\n").unwrap();
            let mut line = String::new();
            BufReader::new(c).read_line(&mut line).unwrap();
            assert_eq!(line, "chime tcp probe\n");
            println!("{TCP_OK}");
        }
        other => panic!("unknown TCP child role {other:?}"),
    }
}
