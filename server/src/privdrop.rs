//! Dropping root, or surplus capabilities, after the sockets are bound.
//!
//! chimed started as root binds its sockets (and loads its XDP program),
//! then calls [`drop_privileges`] to become an ordinary user that keeps only
//! the capabilities it still needs (often none, or `CAP_NET_ADMIN`).
//!
//! chimed started as an ordinary user with ambient capabilities (the systemd
//! unit: `User=chime`, `AmbientCapabilities=CAP_NET_ADMIN CAP_BPF
//! CAP_NET_RAW CAP_NET_BIND_SERVICE`) has no user to switch to;
//! [`drop_privileges`] then only shrinks the calling thread's capability
//! sets to what is still needed.
//!
//! Call it from the main thread: the user and group IDs change for the whole
//! process, but capability sets are per-thread. After a switch from root,
//! threads that already exist end up with no capabilities (the kernel clears
//! them when their user ID changes); not started as root, nothing clears
//! them, so every thread chimed starts calls [`drop_thread_capabilities`]
//! first thing, and [`verify_threads`] checks afterwards that no thread but
//! the caller holds any capability.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use caps::{CapSet, Capability, CapsHashSet};

use crate::sys::users;

/// What [`drop_privileges`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrivDropOutcome {
    /// Not running as root (effective UID `euid`): no user to switch to;
    /// the calling thread's capabilities were reduced to `kept`.
    NotRoot {
        /// The effective user ID.
        euid: u32,
        /// The capabilities kept in the permitted and effective sets (those
        /// asked for that the process had).
        kept: Vec<Capability>,
        /// The capabilities the process had and gave up.
        dropped: Vec<Capability>,
    },
    /// Running as root and configured to stay root (user "" or "root"): the
    /// caller should warn.
    StayedRoot,
    /// Now running as `user`.
    Dropped {
        /// The user name.
        user: String,
        /// Its user ID (real, effective and saved).
        uid: u32,
        /// The group ID (real, effective, saved and the only supplementary
        /// group).
        gid: u32,
        /// The capabilities kept in the permitted and effective sets.
        kept: Vec<Capability>,
    },
}

impl fmt::Display for PrivDropOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRoot { euid, kept, dropped } if kept.is_empty() && dropped.is_empty() => {
                write!(f, "not started as root (uid {euid}), no privileges to drop")
            }
            Self::NotRoot { euid, kept, dropped } => {
                write!(f, "not started as root (uid {euid}): ")?;
                if !dropped.is_empty() {
                    write!(f, "dropped {}; ", cap_names(dropped))?;
                }
                if kept.is_empty() {
                    f.write_str("no capabilities left")
                } else {
                    write!(f, "keeping {}", cap_names(kept))
                }
            }
            Self::StayedRoot => f.write_str("running as root: no user to switch to is configured"),
            Self::Dropped { user, uid, gid, kept } => {
                write!(f, "running as user {user:?} (uid {uid}, gid {gid})")?;
                if kept.is_empty() {
                    f.write_str(" with no capabilities")
                } else {
                    write!(f, " keeping {}", cap_names(kept))
                }
            }
        }
    }
}

fn cap_names(caps: &[Capability]) -> String {
    caps.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Why the privileges could not be dropped. On any error the process should
/// exit: it may be partly dropped (or, after [`PrivDropError::StillPrivileged`],
/// not at all).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivDropError {
    /// No such user.
    #[error("user {0:?} not found")]
    UserNotFound(String),
    /// No such group.
    #[error("group {0:?} not found")]
    GroupNotFound(String),
    /// The user or group database could not be read.
    #[error("cannot look up {kind} {name:?}: {source}")]
    Lookup {
        /// "user" or "group".
        kind: &'static str,
        /// The name looked up.
        name: String,
        /// The error.
        source: io::Error,
    },
    /// The user or group resolves to ID 0, which would drop nothing.
    #[error("{kind} {name:?} has ID 0: refusing to run as root under another name")]
    IdZero {
        /// "user" or "group".
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// `keep` holds a capability that would allow becoming root again.
    #[error("refusing to keep {0}: it allows regaining root")]
    UnsafeCapability(Capability),
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Syscall {
        /// The call, with arguments.
        call: String,
        /// The error.
        source: io::Error,
    },
    /// Setting or reading capability sets failed.
    #[error("{what}: {source}")]
    Capabilities {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: caps::errors::CapsError,
    },
    /// The final check found the process still more privileged than asked.
    #[error("privileges were not fully dropped: {0}")]
    StillPrivileged(String),
}

/// Capabilities that would let an unprivileged process become root again.
const REGAIN_ROOT: [Capability; 2] = [Capability::CAP_SETUID, Capability::CAP_SETGID];

/// Switches a process started as root to `user` (and `group`, or the user's
/// primary group if `group` is empty), keeping exactly the capabilities in
/// `keep` in the calling thread's permitted and effective sets.
///
/// Not root (effective user ID not 0): `user` and `group` are ignored; the
/// calling thread's permitted and effective sets become `keep` (as far as
/// the process has those capabilities), its inheritable and ambient sets
/// are cleared, and the result is checked.
///
/// Root, with `user` "" or "root": nothing changes (the outcome says so).
/// Otherwise: looks up the user and group,
/// reduces the bounding set to `keep` (best effort: it needs
/// `CAP_SETPCAP`), sets the supplementary groups to just the group, the
/// group ID, then the user ID (with `PR_SET_KEEPCAPS` if `keep` is not
/// empty), sets the capability sets, and finally checks that the IDs are
/// what was asked, that `setuid(0)` fails and that the capability sets are
/// exactly `keep`.
pub fn drop_privileges(user: &str, group: &str, keep: &[Capability]) -> Result<PrivDropOutcome, PrivDropError> {
    let euid = users::geteuid();
    if euid != 0 {
        return drop_surplus_capabilities(euid, keep);
    }
    if user.is_empty() || user == "root" {
        return Ok(PrivDropOutcome::StayedRoot);
    }
    if let Some(&cap) = keep.iter().find(|cap| REGAIN_ROOT.contains(cap)) {
        return Err(PrivDropError::UnsafeCapability(cap));
    }

    // Look everything up before changing anything.
    let entry = users::user_by_name(user)
        .map_err(|source| PrivDropError::Lookup { kind: "user", name: user.to_owned(), source })?
        .ok_or_else(|| PrivDropError::UserNotFound(user.to_owned()))?;
    let gid = if group.is_empty() {
        entry.gid
    } else {
        users::group_by_name(group)
            .map_err(|source| PrivDropError::Lookup { kind: "group", name: group.to_owned(), source })?
            .ok_or_else(|| PrivDropError::GroupNotFound(group.to_owned()))?
            .gid
    };
    if entry.uid == 0 {
        return Err(PrivDropError::IdZero { kind: "user", name: user.to_owned() });
    }
    if gid == 0 {
        let name = if group.is_empty() { format!("{user}'s primary group") } else { group.to_owned() };
        return Err(PrivDropError::IdZero { kind: "group", name });
    }
    let keep_set: CapsHashSet = keep.iter().copied().collect();

    reduce_bounding_set(&keep_set);
    users::setgroups(&[gid]).map_err(|source| syscall(format!("setgroups([{gid}])"), source))?;
    users::setgid(gid).map_err(|source| syscall(format!("setgid({gid})"), source))?;
    if !keep_set.is_empty() {
        caps::securebits::set_keepcaps(true)
            .map_err(|source| PrivDropError::Capabilities { what: "prctl(PR_SET_KEEPCAPS, 1)", source })?;
    }
    users::setuid(entry.uid).map_err(|source| syscall(format!("setuid({})", entry.uid), source))?;
    set_capabilities(&keep_set)?;
    if !keep_set.is_empty() {
        caps::securebits::set_keepcaps(false)
            .map_err(|source| PrivDropError::Capabilities { what: "prctl(PR_SET_KEEPCAPS, 0)", source })?;
    }
    verify(entry.uid, gid, &keep_set)?;

    let mut kept: Vec<Capability> = keep_set.into_iter().collect();
    kept.sort_by_key(|cap| cap.index());
    Ok(PrivDropOutcome::Dropped { user: user.to_owned(), uid: entry.uid, gid, kept })
}

/// The not-root half of [`drop_privileges`].
fn drop_surplus_capabilities(euid: u32, keep: &[Capability]) -> Result<PrivDropOutcome, PrivDropError> {
    let read_err = |source| PrivDropError::Capabilities { what: "reading the capabilities", source };
    let permitted = caps::read(None, CapSet::Permitted).map_err(read_err)?;
    let keep_set: CapsHashSet = keep.iter().copied().filter(|cap| permitted.contains(cap)).collect();
    set_capabilities(&keep_set)?;
    verify_capabilities(&keep_set)?;
    let mut kept: Vec<Capability> = keep_set.iter().copied().collect();
    let mut dropped: Vec<Capability> = permitted.difference(&keep_set).copied().collect();
    kept.sort_by_key(|cap| cap.index());
    dropped.sort_by_key(|cap| cap.index());
    Ok(PrivDropOutcome::NotRoot { euid, kept, dropped })
}

/// Clears every capability set of the calling thread (effective, permitted,
/// inheritable, ambient) when the process is not root. Every thread chimed
/// starts calls it first thing: not started as root, a thread inherits the
/// capabilities of the thread that started it (the unit's ambient ones)
/// and nothing else would take them away. Started as root it does nothing:
/// the switch to the configured user in [`drop_privileges`] clears every
/// thread's capabilities (and needs `CAP_SETUID` in each until then).
/// Failures are logged; [`verify_threads`] catches them.
pub fn drop_thread_capabilities() {
    if users::geteuid() == 0 {
        return;
    }
    if let Err(e) = set_capabilities(&CapsHashSet::new()) {
        tracing::warn!("cannot clear this thread's capabilities: {e}");
    }
}

/// Checks that no thread of this process other than the calling one holds
/// any capability, waiting up to `wait` for threads that have just started
/// and not yet run [`drop_thread_capabilities`].
pub fn verify_threads(wait: Duration) -> Result<(), PrivDropError> {
    verify_threads_except(wait, &[])
}

/// [`verify_threads`], not looking at the threads `ignore` (thread IDs).
fn verify_threads_except(wait: Duration, ignore: &[u32]) -> Result<(), PrivDropError> {
    let deadline = Instant::now() + wait;
    loop {
        match privileged_threads(ignore) {
            Ok(found) if found.is_empty() => return Ok(()),
            Ok(found) if Instant::now() >= deadline => {
                return Err(PrivDropError::StillPrivileged(format!(
                    "other threads still hold capabilities: {}",
                    found.join(", ")
                )));
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(source) => return Err(syscall("reading /proc/self/task".to_owned(), source)),
        }
    }
}

/// Threads other than the calling one with any capability, as
/// `"name (tid N): CapPrm ..."`, from `/proc/self/task/*/status`.
fn privileged_threads(ignore: &[u32]) -> io::Result<Vec<String>> {
    let me = std::fs::read_link("/proc/thread-self")?;
    let my_tid = me.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let entry = entry?;
        let tid = entry.file_name().to_string_lossy().into_owned();
        if tid == my_tid || tid.parse().is_ok_and(|t: u32| ignore.contains(&t)) {
            continue;
        }
        // A thread that exits between readdir and here is no longer a worry.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let held: Vec<&str> = status
            .lines()
            .filter(|l| ["CapPrm:", "CapEff:", "CapAmb:"].iter().any(|k| l.starts_with(k)))
            .filter(|l| l.split_whitespace().nth(1).is_some_and(|v| v.bytes().any(|b| b != b'0')))
            .collect();
        if !held.is_empty() {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("{} (tid {tid}): {}", name.trim(), held.join(" ")));
        }
    }
    Ok(found)
}

fn syscall(call: String, source: io::Error) -> PrivDropError {
    PrivDropError::Syscall { call, source }
}

/// Drops every capability not in `keep` from the bounding set, so nothing
/// outside it can ever be regained (not even through executing a file with
/// capabilities). Needs `CAP_SETPCAP`, which root inside some containers
/// lacks; then the bounding set stays as it is, which only matters if
/// chimed executes other programs, which it does not.
fn reduce_bounding_set(keep: &CapsHashSet) {
    let Ok(bounding) = caps::read(None, CapSet::Bounding) else { return };
    for cap in bounding.difference(keep) {
        if let Err(e) = caps::drop(None, CapSet::Bounding, *cap) {
            tracing::warn!("cannot drop {cap} from the capability bounding set: {e}");
            return;
        }
    }
}

/// Sets the permitted and effective sets to `keep`, and clears the
/// inheritable and ambient sets.
fn set_capabilities(keep: &CapsHashSet) -> Result<(), PrivDropError> {
    let cap_err = |what| move |source| PrivDropError::Capabilities { what, source };
    // The kernel refuses an effective set that is not a subset of the
    // permitted one, so shrink effective first (`keep` is within the
    // current permitted set), then permitted.
    caps::set(None, CapSet::Effective, keep).map_err(cap_err("setting the effective capabilities"))?;
    caps::set(None, CapSet::Permitted, keep).map_err(cap_err("setting the permitted capabilities"))?;
    caps::clear(None, CapSet::Inheritable).map_err(cap_err("clearing the inheritable capabilities"))?;
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).map_err(cap_err("clearing the ambient capabilities"))?;
    }
    Ok(())
}

/// Checks the result from the kernel's point of view.
fn verify(uid: u32, gid: u32, keep: &CapsHashSet) -> Result<(), PrivDropError> {
    let fail = |what: String| Err(PrivDropError::StillPrivileged(what));
    let uids = users::getresuid().map_err(|source| syscall("getresuid".to_owned(), source))?;
    if uids != (uid, uid, uid) {
        return fail(format!("user IDs (real, effective, saved) are {uids:?}, expected {uid}"));
    }
    let gids = users::getresgid().map_err(|source| syscall("getresgid".to_owned(), source))?;
    if gids != (gid, gid, gid) {
        return fail(format!("group IDs (real, effective, saved) are {gids:?}, expected {gid}"));
    }
    let groups = users::getgroups().map_err(|source| syscall("getgroups".to_owned(), source))?;
    if groups.iter().any(|&g| g != gid) {
        return fail(format!("supplementary groups are {groups:?}, expected [{gid}]"));
    }
    if users::setuid(0).is_ok() {
        return fail("setuid(0) succeeded".to_owned());
    }
    if users::setgid(0).is_ok() {
        return fail("setgid(0) succeeded".to_owned());
    }
    verify_capabilities(keep)
}

/// Checks that the calling thread's permitted and effective sets are exactly
/// `keep`, and its ambient set is empty.
fn verify_capabilities(keep: &CapsHashSet) -> Result<(), PrivDropError> {
    let fail = |what: String| Err(PrivDropError::StillPrivileged(what));
    for (set, name) in [(CapSet::Permitted, "permitted"), (CapSet::Effective, "effective")] {
        let have: HashSet<Capability> = caps::read(None, set)
            .map_err(|source| PrivDropError::Capabilities { what: "reading the capabilities", source })?;
        if have != *keep {
            let mut extra: Vec<_> = have.difference(keep).map(ToString::to_string).collect();
            let mut missing: Vec<_> = keep.difference(&have).map(ToString::to_string).collect();
            extra.sort();
            missing.sort();
            return fail(format!("{name} capabilities: extra {extra:?}, missing {missing:?}"));
        }
    }
    if caps::runtime::ambient_set_supported().is_ok() {
        let ambient = caps::read(None, CapSet::Ambient)
            .map_err(|source| PrivDropError::Capabilities { what: "reading the capabilities", source })?;
        if !ambient.is_empty() {
            let mut names: Vec<_> = ambient.iter().map(ToString::to_string).collect();
            names.sort();
            return fail(format!("ambient capabilities left: {names:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, UdpSocket};
    use std::process::Command;

    use super::*;

    /// Selects the child mode of [`privdrop_child`].
    const CHILD_ENV: &str = "CHIME_PRIVDROP_TEST_CHILD";
    /// Printed by a child that got to the end.
    const CHILD_OK: &str = "privdrop child: ok";

    fn is_root() -> bool {
        users::geteuid() == 0
    }

    /// Runs [`privdrop_child`] in a new process of this test binary with
    /// `mode`, and checks that it passed.
    fn run_child(mode: &str) {
        run_child_under(&[], mode);
    }

    /// [`run_child`] with the child started through `wrapper` (a program
    /// and its arguments, such as `setpriv ...`).
    fn run_child_under(wrapper: &[&str], mode: &str) {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(["--exact", "privdrop::tests::privdrop_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, mode)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child {mode} failed ({}):\n{stdout}\n{stderr}", out.status);
        assert!(stdout.contains(CHILD_OK), "child {mode} did not run:\n{stdout}\n{stderr}");
    }

    /// A port below 1024 (so privileged unless the sysctl says otherwise)
    /// that is free on 127.0.0.1.
    fn privileged_port_bind() -> io::Result<UdpSocket> {
        let mut last = io::Error::other("no port tried");
        for port in (1000..1024).rev() {
            match UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) {
                Ok(socket) => return Ok(socket),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn unprivileged_port_start() -> u16 {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1024)
    }

    /// The child side: a no-op unless started by [`run_child`].
    #[test]
    fn privdrop_child() {
        let Ok(mode) = std::env::var(CHILD_ENV) else { return };
        if mode == "ambient" {
            ambient_child();
            println!("{CHILD_OK}");
            return;
        }
        let nobody = users::user_by_name("nobody").unwrap().expect("user nobody exists");
        let keep: &[Capability] = match mode.as_str() {
            "bind" => &[Capability::CAP_NET_BIND_SERVICE],
            "none" => &[],
            other => panic!("unknown child mode {other:?}"),
        };

        // Without CAP_SETPCAP (some containers) the bounding set stays.
        let can_shrink_bounding = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap();
        let outcome = drop_privileges("nobody", "", keep).unwrap();
        println!("{outcome}");
        assert_eq!(
            outcome,
            PrivDropOutcome::Dropped { user: "nobody".into(), uid: nobody.uid, gid: nobody.gid, kept: keep.to_vec() }
        );
        assert_eq!(users::getresuid().unwrap(), (nobody.uid, nobody.uid, nobody.uid));
        assert_eq!(users::getresgid().unwrap(), (nobody.gid, nobody.gid, nobody.gid));
        assert_eq!(users::getgroups().unwrap(), [nobody.gid]);
        assert!(users::setuid(0).is_err(), "could become root again");
        let expected: CapsHashSet = keep.iter().copied().collect();
        assert_eq!(caps::read(None, CapSet::Permitted).unwrap(), expected);
        assert_eq!(caps::read(None, CapSet::Effective).unwrap(), expected);
        assert_eq!(caps::read(None, CapSet::Inheritable).unwrap(), CapsHashSet::new());
        if can_shrink_bounding {
            assert_eq!(caps::read(None, CapSet::Bounding).unwrap(), expected);
        }
        assert!(!caps::securebits::has_keepcaps().unwrap());

        let privileged = unprivileged_port_start() > 1000;
        match mode.as_str() {
            "bind" => {
                let socket = privileged_port_bind().expect("binding below 1024 with CAP_NET_BIND_SERVICE");
                println!("bound {}", socket.local_addr().unwrap());
                // Without the capability in the effective set, the same bind
                // fails: the capability is what allowed it.
                caps::clear(None, CapSet::Effective).unwrap();
                if privileged {
                    let e = privileged_port_bind().unwrap_err();
                    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                }
                // It is still permitted, so it can be raised again.
                caps::raise(None, CapSet::Effective, Capability::CAP_NET_BIND_SERVICE).unwrap();
                privileged_port_bind().unwrap();
            }
            _ => {
                if privileged {
                    let e = privileged_port_bind().unwrap_err();
                    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                }
                assert!(caps::raise(None, CapSet::Effective, Capability::CAP_NET_BIND_SERVICE).is_err());
            }
        }
        println!("{CHILD_OK}");
    }

    /// The capabilities the systemd unit gives chimed.
    const UNIT_CAPS: [Capability; 4] =
        [Capability::CAP_NET_BIND_SERVICE, Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW, Capability::CAP_BPF];

    /// Started as an ordinary user with the unit's capabilities as ambient
    /// ones: keeps what is asked, clears the rest, and other threads must
    /// drop theirs themselves.
    fn ambient_child() {
        assert_ne!(users::geteuid(), 0, "the ambient child must not run as root");
        let started: CapsHashSet = UNIT_CAPS.into_iter().collect();
        assert_eq!(caps::read(None, CapSet::Permitted).unwrap(), started);
        assert_eq!(caps::read(None, CapSet::Ambient).unwrap(), started);

        // A thread started before the drop, which drops its own.
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let polite = std::thread::Builder::new()
            .name("polite".into())
            .spawn(move || {
                drop_thread_capabilities();
                ready_tx.send(caps::read(None, CapSet::Permitted).unwrap()).unwrap();
                let _ = stop_rx.recv();
            })
            .unwrap();
        assert_eq!(ready_rx.recv().unwrap(), CapsHashSet::new());

        let outcome = drop_privileges("nobody", "", &[Capability::CAP_NET_ADMIN]).unwrap();
        println!("{outcome}");
        let PrivDropOutcome::NotRoot { kept, dropped, .. } = &outcome else { panic!("{outcome:?}") };
        assert_eq!(kept, &[Capability::CAP_NET_ADMIN]);
        let mut expect_dropped = vec![Capability::CAP_NET_BIND_SERVICE, Capability::CAP_NET_RAW, Capability::CAP_BPF];
        expect_dropped.sort_by_key(|c| c.index());
        assert_eq!(dropped, &expect_dropped);
        assert!(outcome.to_string().contains("keeping CAP_NET_ADMIN"), "{outcome}");
        let expected: CapsHashSet = [Capability::CAP_NET_ADMIN].into_iter().collect();
        assert_eq!(caps::read(None, CapSet::Permitted).unwrap(), expected);
        assert_eq!(caps::read(None, CapSet::Effective).unwrap(), expected);
        assert_eq!(caps::read(None, CapSet::Inheritable).unwrap(), CapsHashSet::new());
        assert_eq!(caps::read(None, CapSet::Ambient).unwrap(), CapsHashSet::new());
        // libtest runs this on a thread of its own; its main thread (thread
        // ID = process ID), which started with the capabilities and waits
        // for the test, plays no part here (in chimed, the main thread is
        // the one that drops).
        let harness = [std::process::id()];
        verify_threads_except(Duration::from_secs(2), &harness).unwrap();
        if unprivileged_port_start() > 1000 {
            let e = privileged_port_bind().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        }

        // A thread that keeps what it inherited is caught.
        let (stop2_tx, stop2_rx) = std::sync::mpsc::channel::<()>();
        let rude = std::thread::Builder::new().name("rude".into()).spawn(move || stop2_rx.recv()).unwrap();
        let e = verify_threads_except(Duration::from_millis(100), &harness).unwrap_err();
        assert!(e.to_string().contains("rude (tid "), "{e}");
        assert!(!e.to_string().contains("polite"), "{e}");
        stop_tx.send(()).unwrap();
        stop2_tx.send(()).unwrap();
        polite.join().unwrap();
        let _ = rude.join().unwrap();
    }

    #[test]
    fn ambient_capabilities_without_root() {
        if !is_root() {
            println!("skipping: needs root (to start a child as another user with ambient capabilities)");
            return;
        }
        if !std::path::Path::new("/usr/bin/setpriv").exists() {
            println!("skipping: setpriv (util-linux) is not installed");
            return;
        }
        let caps = "+net_bind_service,+net_admin,+net_raw,+bpf";
        let nobody = users::user_by_name("nobody").unwrap().expect("user nobody exists");
        let (uid, gid) = (nobody.uid.to_string(), nobody.gid.to_string());
        run_child_under(
            &[
                "/usr/bin/setpriv",
                "--reuid",
                &uid,
                "--regid",
                &gid,
                "--clear-groups",
                "--inh-caps",
                caps,
                "--ambient-caps",
                caps,
                "--",
            ],
            "ambient",
        );
    }

    #[test]
    fn drop_thread_capabilities_is_harmless_as_root_or_without_capabilities() {
        // As root it does nothing (the user switch does it later); as an
        // ordinary user it clears what is there, usually nothing.
        let before = caps::read(None, CapSet::Permitted).unwrap();
        let after = std::thread::spawn(|| {
            drop_thread_capabilities();
            caps::read(None, CapSet::Permitted).unwrap()
        })
        .join()
        .unwrap();
        if is_root() {
            assert_eq!(after, before);
        } else {
            assert_eq!(after, CapsHashSet::new());
        }
        assert_eq!(caps::read(None, CapSet::Permitted).unwrap(), before, "the caller's own are untouched");
    }

    #[test]
    fn drops_to_nobody_keeping_net_bind_service() {
        if !is_root() {
            println!("skipping: needs root");
            return;
        }
        run_child("bind");
    }

    #[test]
    fn drops_to_nobody_keeping_nothing() {
        if !is_root() {
            println!("skipping: needs root");
            return;
        }
        run_child("none");
    }

    // The tests below never get as far as changing anything in this process.

    #[test]
    fn unknown_user_or_group() {
        let result = drop_privileges("chime-no-such-user-xyz", "", &[]);
        if is_root() {
            let e = result.unwrap_err();
            assert!(matches!(e, PrivDropError::UserNotFound(_)), "{e:?}");
            assert_eq!(e.to_string(), "user \"chime-no-such-user-xyz\" not found");
            let e = drop_privileges("nobody", "chime-no-such-group-xyz", &[]).unwrap_err();
            assert_eq!(e.to_string(), "group \"chime-no-such-group-xyz\" not found");
        } else {
            assert!(matches!(result.unwrap(), PrivDropOutcome::NotRoot { .. }));
        }
    }

    #[test]
    fn root_or_empty_user_stays() {
        for user in ["", "root"] {
            let outcome = drop_privileges(user, "", &[Capability::CAP_NET_BIND_SERVICE]).unwrap();
            if is_root() {
                assert_eq!(outcome, PrivDropOutcome::StayedRoot);
            } else {
                assert!(matches!(outcome, PrivDropOutcome::NotRoot { .. }));
            }
        }
    }

    #[test]
    fn refuses_root_equivalents() {
        if !is_root() {
            println!("skipping: needs root");
            return;
        }
        let e = drop_privileges("nobody", "", &[Capability::CAP_SETUID]).unwrap_err();
        assert_eq!(e.to_string(), "refusing to keep CAP_SETUID: it allows regaining root");
        let e = drop_privileges("nobody", "root", &[]).unwrap_err();
        assert!(matches!(e, PrivDropError::IdZero { kind: "group", .. }), "{e:?}");
    }

    #[test]
    fn outcome_messages() {
        let dropped = PrivDropOutcome::Dropped {
            user: "chime".into(),
            uid: 120,
            gid: 130,
            kept: vec![Capability::CAP_NET_BIND_SERVICE],
        };
        assert_eq!(dropped.to_string(), "running as user \"chime\" (uid 120, gid 130) keeping CAP_NET_BIND_SERVICE");
        assert_eq!(
            PrivDropOutcome::NotRoot { euid: 1000, kept: vec![], dropped: vec![] }.to_string(),
            "not started as root (uid 1000), no privileges to drop"
        );
        let unit = PrivDropOutcome::NotRoot {
            euid: 998,
            kept: vec![Capability::CAP_NET_ADMIN],
            dropped: vec![Capability::CAP_NET_BIND_SERVICE, Capability::CAP_NET_RAW, Capability::CAP_BPF],
        };
        assert_eq!(
            unit.to_string(),
            "not started as root (uid 998): dropped CAP_NET_BIND_SERVICE, CAP_NET_RAW, CAP_BPF; keeping CAP_NET_ADMIN"
        );
        let none = PrivDropOutcome::NotRoot { euid: 998, kept: vec![], dropped: vec![Capability::CAP_NET_RAW] };
        assert_eq!(none.to_string(), "not started as root (uid 998): dropped CAP_NET_RAW; no capabilities left");
    }
}
