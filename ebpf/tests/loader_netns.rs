//! The loader on a veth pair in a throwaway network namespace: attach modes,
//! stale and foreign programs, detach, device-bound load, queue count, and
//! frames injected on the peer reaching the attached program. Root only.
//!
//! Each test moves its own thread into its own namespace (setns affects the
//! calling thread only), so tests run in parallel without seeing each other.

mod common;

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use chime_ebpf::ethtool;
use chime_ebpf::loader::{LoadError, LoadOptions, LoadedXdp, ProgramOptions, XdpMode, XdpProgram};
use chime_ebpf::program::{PROG_HW, PROG_SW, XdpConfig, XdpCounter};
use common::*;
use libbpf_rs::{ObjectBuilder, Xdp, XdpFlags};

static FOREIGN_OBJECT: &[u8] = include_bytes!("../xdp/test_foreign.o");

/// Sets up a namespace, enters it, returns it with veth0's ifindex.
fn setup(test: &str) -> Option<(NetNs, u32)> {
    if !root_or_skip(test) {
        return None;
    }
    let ns = NetNs::new();
    ns.enter();
    let ifindex = ethtool::ifindex("veth0").expect("veth0 in the namespace");
    Some((ns, ifindex))
}

/// (`ip -j -d link show` mentions XDP, attach mode 1 = native, 2 = generic).
fn xdp_state(ns: &NetNs, dev: &str) -> Option<u32> {
    let json = ns.link_json(dev);
    let at = json.find("\"xdp\":")?;
    let rest = &json[at..];
    let m = rest.find("\"mode\":")?;
    rest[m + 7..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
}

fn attached_prog_name(ifindex: u32) -> Option<String> {
    let prog = ObjectBuilder::default().open_memory(FOREIGN_OBJECT).unwrap().load().unwrap();
    let p = prog.progs().next().unwrap();
    let opts = Xdp::new(p.as_fd()).query(ifindex as i32, XdpFlags::NONE).ok()?;
    let id = opts.prog_id;
    (id != 0).then(|| libbpf_rs::ProgramHandle::from_prog_id(id).unwrap().name().to_string_lossy().into_owned())
}

fn opts(ifindex: u32, mode: XdpMode) -> LoadOptions {
    LoadOptions { mode, ..LoadOptions::new(ifindex) }
}

/// Attaches the tiny foreign program natively, as another application would,
/// and lets go of it (a netlink-attached program stays).
fn attach_foreign(ifindex: u32, flags: XdpFlags) {
    let obj = ObjectBuilder::default().open_memory(FOREIGN_OBJECT).unwrap().load().unwrap();
    let prog = obj.progs().next().unwrap();
    Xdp::new(prog.as_fd()).attach(ifindex as i32, flags).expect("attach foreign program");
}

/// Attaches a chime program and lets go of it without detaching: what a
/// crashed chimed leaves behind.
fn attach_stale_chime(ifindex: u32, flags: XdpFlags) {
    let prog = XdpProgram::load(&ProgramOptions::software(XdpConfig::default())).unwrap();
    Xdp::new(prog.prog_fd()).attach(ifindex as i32, flags).expect("attach stale chime program");
}

/// Sends `frame` out of `dev` with an AF_PACKET socket (it arrives on the peer).
fn inject(dev: &str, frame: &[u8]) {
    let ifindex = ethtool::ifindex(dev).unwrap();
    // SAFETY: plain socket(2) call; checked below and closed at the end.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket(AF_PACKET): {}", std::io::Error::last_os_error());
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` and `sll` are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(n, frame.len() as isize, "sendto: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is ours and not used after this.
    unsafe { libc::close(fd) };
}

/// Injects NTP frames on veth1 and waits until the program on veth0 counted
/// them (no socket in xsks: PassNoSocket) with a software stamp.
fn frames_reach_program(xdp: &LoadedXdp) {
    xdp.set_servers(&[SERVER_V4], &[SERVER_V6]).unwrap();
    let before = xdp.stats().unwrap();
    inject("veth1", &Frame::ntp4(ntp(3, 48)).build());
    inject("veth1", &Frame::ntp6(ntp(3, 48)).build());
    inject("veth1", &Frame::ntp4(ntp(6, 48)).build());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let d = xdp.stats().unwrap().since(&before);
        if d.get(XdpCounter::PassNoSocket) >= 2 && d.get(XdpCounter::DropNotClient) >= 1 {
            // veth's rx-timestamp kfunc has no NIC stamp (0): software stamp.
            assert_eq!(d.get(XdpCounter::StampSw), 2, "{d:?}");
            assert_eq!(d.get(XdpCounter::StampHw), 0, "{d:?}");
            return;
        }
        assert!(Instant::now() < deadline, "injected frames not counted: {d:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn native_attach_counts_and_detaches() {
    let Some((ns, ifindex)) = setup("native_attach_counts_and_detaches") else { return };
    let mut xdp = LoadedXdp::load(&opts(ifindex, XdpMode::Native)).expect("native attach on veth");
    assert_eq!(xdp.mode(), XdpMode::Native);
    assert!(!xdp.hw_timestamps());
    assert_eq!(xdp_state(&ns, "veth0"), Some(1), "{}", ns.link_json("veth0"));
    assert_eq!(attached_prog_name(ifindex).as_deref(), Some(PROG_SW));
    frames_reach_program(&xdp);
    assert!(xdp.detach().unwrap());
    assert!(!ns.link_json("veth0").contains("\"xdp\""), "{}", ns.link_json("veth0"));
    assert!(!xdp.detach().unwrap(), "second detach is a no-op");
}

#[test]
fn generic_attach_counts_and_detaches_on_drop() {
    let Some((ns, ifindex)) = setup("generic_attach_counts_and_detaches_on_drop") else { return };
    {
        let xdp = LoadedXdp::load(&opts(ifindex, XdpMode::Generic)).expect("generic attach");
        assert_eq!(xdp.mode(), XdpMode::Generic);
        assert_eq!(xdp_state(&ns, "veth0"), Some(2), "{}", ns.link_json("veth0"));
        frames_reach_program(&xdp);
    }
    assert!(!ns.link_json("veth0").contains("\"xdp\""), "drop detaches: {}", ns.link_json("veth0"));
}

#[test]
fn auto_prefers_native() {
    let Some((ns, ifindex)) = setup("auto_prefers_native") else { return };
    let xdp = LoadedXdp::load(&opts(ifindex, XdpMode::Auto)).unwrap();
    assert_eq!(xdp.mode(), XdpMode::Native);
    drop(xdp);
    assert_eq!(xdp_state(&ns, "veth0"), None);
}

#[test]
fn stale_chime_program_is_replaced() {
    let Some((ns, ifindex)) = setup("stale_chime_program_is_replaced") else { return };
    // Same mode: replaced atomically.
    attach_stale_chime(ifindex, XdpFlags::DRV_MODE);
    let xdp = LoadedXdp::load(&opts(ifindex, XdpMode::Native)).expect("replace stale native");
    let opts_q = Xdp::new(xdp.program().prog_fd()).query(ifindex as i32, XdpFlags::NONE).unwrap();
    assert_eq!(opts_q.drv_prog_id, xdp.program().id(), "ours is attached now");
    drop(xdp);
    assert_eq!(xdp_state(&ns, "veth0"), None);

    // Stale generic, new native: the old one is detached first.
    attach_stale_chime(ifindex, XdpFlags::SKB_MODE);
    assert_eq!(xdp_state(&ns, "veth0"), Some(2));
    let xdp = LoadedXdp::load(&opts(ifindex, XdpMode::Native)).expect("replace stale generic");
    assert_eq!(xdp_state(&ns, "veth0"), Some(1));
    drop(xdp);
    assert_eq!(xdp_state(&ns, "veth0"), None);
}

#[test]
fn foreign_program_is_refused_unless_allowed() {
    let Some((ns, ifindex)) = setup("foreign_program_is_refused_unless_allowed") else { return };
    attach_foreign(ifindex, XdpFlags::DRV_MODE);
    match LoadedXdp::load(&opts(ifindex, XdpMode::Auto)) {
        Err(LoadError::ForeignProgram { name, id }) => {
            assert_eq!(name, "foreign_pass");
            assert!(id > 0);
        }
        other => panic!("expected ForeignProgram, got {other:?}"),
    }
    // Generic would conflict too: still refused, the foreign one untouched.
    assert!(matches!(LoadedXdp::load(&opts(ifindex, XdpMode::Generic)), Err(LoadError::ForeignProgram { .. })));
    assert_eq!(attached_prog_name(ifindex).as_deref(), Some("foreign_pass"));

    let xdp = LoadedXdp::load(&LoadOptions { replace_foreign: true, ..opts(ifindex, XdpMode::Native) })
        .expect("replace_foreign");
    assert_eq!(attached_prog_name(ifindex).as_deref(), Some(PROG_SW));
    drop(xdp);
    assert_eq!(xdp_state(&ns, "veth0"), None);
}

#[test]
fn detach_leaves_a_program_that_replaced_ours() {
    let Some((ns, ifindex)) = setup("detach_leaves_a_program_that_replaced_ours") else { return };
    let mut xdp = LoadedXdp::load(&opts(ifindex, XdpMode::Native)).unwrap();
    // Someone else takes over the interface.
    let obj = ObjectBuilder::default().open_memory(FOREIGN_OBJECT).unwrap().load().unwrap();
    let foreign = obj.progs().next().unwrap();
    Xdp::new(foreign.as_fd()).replace(ifindex as i32, xdp.program().prog_fd()).expect("foreign replaces ours");
    assert!(!xdp.detach().unwrap(), "not ours any more");
    assert_eq!(attached_prog_name(ifindex).as_deref(), Some("foreign_pass"));
    drop(xdp);
    assert_eq!(attached_prog_name(ifindex).as_deref(), Some("foreign_pass"));
    Xdp::new(foreign.as_fd()).detach(ifindex as i32, XdpFlags::DRV_MODE).unwrap();
    assert_eq!(xdp_state(&ns, "veth0"), None);
}

#[test]
fn hw_program_loads_device_bound_on_veth() {
    let Some((ns, ifindex)) = setup("hw_program_loads_device_bound_on_veth") else { return };
    let xdp = LoadedXdp::load(&LoadOptions { hw_timestamps: true, ..opts(ifindex, XdpMode::Native) })
        .unwrap_or_else(|e| panic!("device-bound chime_xdp_hw on veth: {e}"));
    assert!(xdp.hw_timestamps());
    assert_eq!(xdp.mode(), XdpMode::Native);
    assert_eq!(attached_prog_name(ifindex).as_deref(), Some(PROG_HW));
    frames_reach_program(&xdp);
    // BPF_PROG_TEST_RUN and device-bound programs: report what the kernel says.
    match xdp.program().test_run(&Frame::ntp4(ntp(3, 48)).build()) {
        Ok(run) => eprintln!("test run of the device-bound program: action {}", run.action),
        Err(e) => eprintln!("test run of the device-bound program refused: {e}"),
    }
    // Linux 6.18 oopsed (use-after-free in bpf_dev_bound_netdev_unregister)
    // when the namespace's veth went away while this program's deferred free
    // was still in flight, and every rtnl operation hung afterwards. So the
    // order here is fixed: keep the program alive, unregister the device
    // (synchronously, `ip link del`), and only then let the program go.
    let keep = xdp.program().prog_fd().try_clone_to_owned().expect("dup program fd");
    drop(xdp);
    assert_eq!(xdp_state(&ns, "veth0"), None);
    ns.run(&["link", "del", "veth0"]).expect("ip link del veth0");
    assert!(ns.run(&["link", "show", "veth1"]).is_err(), "veth1 went with its peer");
    drop(keep);

    // Generic mode cannot run a device-bound program (refused before loading).
    assert!(matches!(
        LoadedXdp::load(&LoadOptions { hw_timestamps: true, ..opts(ifindex, XdpMode::Generic) }),
        Err(LoadError::HwNeedsNative)
    ));
}

#[test]
fn ethtool_counts_veth_queues() {
    let Some((_ns, _ifindex)) = setup("ethtool_counts_veth_queues") else { return };
    assert_eq!(ethtool::queue_count("veth0").unwrap(), 2);
    assert_eq!(ethtool::queue_count("veth1").unwrap(), 2);
    assert_eq!(ethtool::queue_count("lo").unwrap(), 1);
}

#[test]
fn namespace_guard_removes_namespace_on_panic() {
    if !root_or_skip("namespace_guard_removes_namespace_on_panic") {
        return;
    }
    let name = std::thread::spawn(|| {
        let ns = NetNs::new();
        let name = ns.name.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _ns = ns;
            panic!("test failure inside the namespace");
        }));
        assert!(r.is_err());
        name
    })
    .join()
    .unwrap();
    assert!(!std::path::Path::new(&format!("/run/netns/{name}")).exists());
}
