//! Helpers for the root-only tests: privilege check, frame builder, and a
//! throwaway network namespace with a veth pair.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// True when running as root; otherwise prints the skip reason.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        eprintln!("{test}: skipping: needs root");
    }
    euid == 0
}

pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 5);

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// An NTP request payload of `len` bytes with the given mode (LI 0, VN 4).
pub fn ntp(mode: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    if let Some(b) = p.first_mut() {
        *b = (4 << 3) | (mode & 7);
    }
    p
}

/// A frame under construction, outermost header first.
#[derive(Clone, Debug)]
pub struct Frame {
    pub vlans: Vec<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    /// IPv4: extra option bytes (IHL grows by len/4).
    pub ip_options: Vec<u8>,
    /// IPv4 frag_off field (host order, flags included).
    pub frag_off: u16,
    /// IPv6: a hop-by-hop header before UDP.
    pub hop_by_hop: bool,
}

impl Frame {
    pub fn udp(src: IpAddr, dst: IpAddr, dport: u16, payload: Vec<u8>) -> Self {
        Self {
            vlans: Vec::new(),
            src,
            dst,
            proto: 17,
            sport: 40000,
            dport,
            payload,
            ip_options: Vec::new(),
            frag_off: 0,
            hop_by_hop: false,
        }
    }

    pub fn ntp4(payload: Vec<u8>) -> Self {
        Self::udp(CLIENT_V4.into(), SERVER_V4.into(), 123, payload)
    }

    pub fn ntp6(payload: Vec<u8>) -> Self {
        Self::udp(CLIENT_V6.into(), SERVER_V6.into(), 123, payload)
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == 17 {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        } else {
            // TCP: seq, ack, offset 5, SYN, window, csum, urg.
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        }
        l4.extend_from_slice(&self.payload);

        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
        for &tpid_vid in &self.vlans {
            let (tpid, vid) =
                if tpid_vid & 0x8000 != 0 { (ETH_P_8021AD, tpid_vid & 0xfff) } else { (ETH_P_8021Q, tpid_vid) };
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let hlen = 20 + self.ip_options.len();
                let ihl = (hlen / 4) as u8;
                f.push(0x40 | ihl);
                f.push(0);
                f.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34]);
                f.extend_from_slice(&self.frag_off.to_be_bytes());
                f.push(64);
                f.push(self.proto);
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                f.extend_from_slice(&self.ip_options);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                let ext = if self.hop_by_hop { 8 } else { 0 };
                f.extend_from_slice(&((ext + l4.len()) as u16).to_be_bytes());
                f.push(if self.hop_by_hop { 0 } else { self.proto });
                f.push(64);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                if self.hop_by_hop {
                    // Next header, length 0 (8 bytes), PadN of 4.
                    f.extend_from_slice(&[self.proto, 0, 1, 4, 0, 0, 0, 0]);
                }
            }
            _ => panic!("mixed address families"),
        }
        f.extend_from_slice(&l4);
        f
    }
}

/// Frames to throw at a program: every truncation (from 14 bytes) of each
/// base frame, 100 one-byte corruptions of each, and 200 random frames of
/// 14 to 133 bytes; pseudo-random from a fixed seed.
pub fn garbage_frames(bases: &[Vec<u8>], seed: u64) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut seed = seed | 1;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for base in bases {
        for len in 14..base.len() {
            frames.push(base[..len].to_vec());
        }
        for _ in 0..100 {
            let mut f = base.clone();
            let at = (next() as usize) % f.len();
            f[at] = next() as u8;
            frames.push(f);
        }
    }
    for _ in 0..200 {
        let len = 14 + (next() as usize) % 120;
        frames.push((0..len).map(|_| next() as u8).collect());
    }
    frames
}

/// An ARP request frame.
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 203, 0, 113, 5]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[192, 0, 2, 1]);
    f
}

fn run(cmd: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A network namespace with a veth pair `veth0`/`veth1` (2 RX and 2 TX
/// queues each), both up; deleted on drop, also when the test panics.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!("chime-xdp-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        run(&["ip", "netns", "add", &name]).expect("ip netns add");
        let ns = Self { name };
        for cmd in [
            vec![
                "ip",
                "-n",
                &ns.name,
                "link",
                "add",
                "veth0",
                "numtxqueues",
                "2",
                "numrxqueues",
                "2",
                "type",
                "veth",
                "peer",
                "name",
                "veth1",
                "numtxqueues",
                "2",
                "numrxqueues",
                "2",
            ],
            vec!["ip", "-n", &ns.name, "link", "set", "veth0", "up"],
            vec!["ip", "-n", &ns.name, "link", "set", "veth1", "up"],
        ] {
            run(&cmd).expect("set up veth");
        }
        ns
    }

    /// Moves the calling thread (only) into the namespace.
    pub fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let f = std::fs::File::open(&path).expect("open netns");
        use std::os::fd::AsRawFd;
        // SAFETY: `f` is an open namespace file; setns affects this thread only.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// `ip -j link show dev` output for `dev` in the namespace.
    pub fn link_json(&self, dev: &str) -> String {
        run(&["ip", "-n", &self.name, "-j", "-d", "link", "show", "dev", dev]).expect("ip link show")
    }

    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = vec!["ip", "-n", &self.name];
        cmd.extend_from_slice(args);
        run(&cmd)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run(&["ip", "netns", "del", &self.name]) {
            eprintln!("removing netns {}: {e}", self.name);
        }
    }
}
