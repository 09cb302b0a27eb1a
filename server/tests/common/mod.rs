//! Test harness shared by chimed's end-to-end tests: starting and stopping
//! chimed, a minimal NTP client built from chime-proto, scraping metrics,
//! and throwaway network namespaces that are removed even when a test fails.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
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
        let dir = scratch_dir("chimed");
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let bin = env!("CARGO_BIN_EXE_chimed");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin]);
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

fn ip(args: &[&str]) {
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
/// these two namespaces).
pub struct VethPair {
    pub server: NetNs,
    pub client: NetNs,
}

impl VethPair {
    pub const SERVER_V4: &'static str = "198.18.0.1";
    pub const CLIENT_V4: &'static str = "198.18.0.2";
    pub const SERVER_V6: &'static str = "fdc4:1e::1";

    pub fn new(tag: &str) -> Option<Self> {
        let server = NetNs::new(&format!("{tag}s"))?;
        let client = NetNs::new(&format!("{tag}c"))?;
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let (a, b) =
            (format!("chs{}x{n}", std::process::id() % 10000), format!("chc{}x{n}", std::process::id() % 10000));
        ip(&["link", "add", &a, "netns", &server.name, "type", "veth", "peer", "name", &b, "netns", &client.name]);
        for (ns, dev, v4, v6) in
            [(&server, &a, "198.18.0.1/30", "fdc4:1e::1/64"), (&client, &b, "198.18.0.2/30", "fdc4:1e::2/64")]
        {
            ip(&["-n", &ns.name, "addr", "add", v4, "dev", dev]);
            ip(&["-n", &ns.name, "addr", "add", v6, "dev", dev, "nodad"]);
            ip(&["-n", &ns.name, "link", "set", dev, "up"]);
        }
        Some(Self { server, client })
    }
}
