//! The system-call filter (seccomp-BPF) chimed serves under.
//!
//! Once everything is set up — sockets bound, XDP program attached, TLS key
//! and key files read, every thread started, privileges dropped — chimed
//! needs only a small set of system calls: the workers' batch I/O
//! (`recvmmsg`/`sendmmsg`, or `poll`/`sendto`/`recvfrom` on AF_XDP
//! sockets), the NTS-KE server's `epoll` loop and TLS sockets, the metrics
//! endpoint's `accept4`/`read`/`write`, clock reads and `adjtimex`, the
//! NTS key file's write-and-rename, a reload's reading of files, memory
//! allocation, sleeping, signals and thread exit. [`rules`] lists them;
//! [`install`] turns the list into a BPF program (with the pure-Rust
//! `seccompiler`) and installs it.
//!
//! **Every thread, at once.** The filter goes in after the last thread has
//! started (nothing starts threads later, and `clone` is not allowed, so
//! nothing can), with `SECCOMP_FILTER_FLAG_TSYNC`: the kernel applies it to
//! every thread of the process in one step, or to none and says which
//! thread could not take it. Installing it in each thread as it starts
//! would need the list before the sockets and key files exist, and would
//! leave the main thread's start-up to the same filter.
//!
//! **Refused, not killed.** With `server.seccomp = "enforce"` (the
//! default) a call outside the list fails with `EPERM`, which chimed
//! reports as any other error: a call this list missed degrades one
//! function (a log line, a counted error) rather than killing a time
//! server that thousands of clients depend on. The filter is installed
//! with `SECCOMP_FILTER_FLAG_LOG`, so the kernel also logs each refusal
//! (an audit record of type 1326 naming the call: `dmesg | grep
//! type=1326`, or the audit log). Under attack the difference that matters
//! is what the call could have done, and that is refused either way.
//! `"log"` allows everything and logs what is outside the list (to find
//! what a new setup needs); `"off"` installs nothing.
//!
//! Arguments are checked where that is cheap and closes a door: new
//! sockets only in the address families chimed uses (no `AF_PACKET`, no
//! new `AF_XDP`), no executable memory (`mmap`/`mprotect` without
//! `PROT_EXEC`), signals only to this process (`tgkill`), and `ioctl` only
//! for the non-blocking flag, close-on-exec and the PTP clock's requests.
//! Not allowed at all, among others: `execve`, `clone`/`fork`, `ptrace`,
//! `kill`, `setuid` and friends, `mount`, `unshare`/`setns`, `bpf` (except
//! map commands with the xdp backend), `listen`; `prctl` only names a
//! thread or reads and clears its ambient capabilities.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

use crate::config::SeccompMode;
use crate::sys;

/// `bpf()` commands on maps, from `enum bpf_cmd` in `<linux/bpf.h>`:
/// `BPF_MAP_LOOKUP_ELEM`, `BPF_MAP_UPDATE_ELEM`, `BPF_MAP_DELETE_ELEM`,
/// `BPF_MAP_GET_NEXT_KEY` and `BPF_OBJ_GET_INFO_BY_FD`.
const BPF_MAP_COMMANDS: [u64; 5] = [1, 2, 3, 4, 15];

/// What the running server needs beyond the common list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// The xdp backend serves: its maps (`bpf`) and, at shutdown, detaching
    /// the program (a netlink socket).
    pub xdp: bool,
}

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeccompError {
    /// `seccompiler` knows no BPF for this CPU architecture.
    #[error("no seccomp filter for the {0} architecture; set server.seccomp = \"off\"")]
    Architecture(&'static str),
    /// The rules did not compile (a bug).
    #[error("building the seccomp filter: {0}")]
    Build(String),
    /// The kernel refused the filter.
    #[error(
        "installing the seccomp filter: {0} (a kernel without seccomp filters? set server.seccomp = \"off\" to \
         run without one)"
    )]
    Install(std::io::Error),
}

/// The rules: each allowed system call by number, with the conditions on
/// its arguments (any one rule matching allows the call; no rule = any
/// arguments).
pub fn rules(needs: Needs) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut r = BTreeMap::new();
    let mut any = |calls: &[libc::c_long]| {
        for &nr in calls {
            r.insert(nr, Vec::new());
        }
    };

    // Memory: the allocator (mmap, brk, madvise on free), thread exit
    // (munmap of the stack).
    any(&[libc::SYS_munmap, libc::SYS_mremap, libc::SYS_madvise, libc::SYS_brk]);
    // Threads and waiting: futexes (locks, joins), sleeping, thread and
    // process exit, the return from a signal handler, the restart of an
    // interrupted sleep.
    any(&[
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        // What a thread does as it starts (the C library's and Rust's set-up,
        // then chimed's own: clearing its capabilities, see
        // `privdrop::drop_thread_capabilities`, and pinning itself to its
        // core), should one started before the filter not have got that
        // far yet: capset can only lower what a thread holds.
        libc::SYS_rseq,
        libc::SYS_set_robust_list,
        libc::SYS_sched_getaffinity,
        libc::SYS_geteuid,
        libc::SYS_capget,
        libc::SYS_capset,
    ]);
    // Clocks: reads the vDSO cannot serve (CLOCK_TAI on some hosts, the
    // PHC's dynamic clock), the kernel clock state (read-only adjtimex; it
    // cannot set anything without CAP_SYS_TIME).
    any(&[
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
    ]);
    // Files: a reload reads the configuration and certificate again (and
    // checks the key's mode), the control thread writes the NTS key file to
    // a temporary name, fsyncs it and renames it over the old one, the
    // leap-seconds file is read again when it changes, logging writes to
    // stderr, the NTS key material comes from getrandom or /dev/urandom.
    any(&[
        libc::SYS_openat,
        libc::SYS_close,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_lseek,
        libc::SYS_fcntl,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlinkat,
        libc::SYS_getrandom,
    ]);
    // Waiting for sockets: the AF_XDP workers and the metrics endpoint
    // poll, the NTS-KE server's mio loop uses epoll.
    any(&[libc::SYS_ppoll, libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2, libc::SYS_epoll_ctl]);
    // Sockets: batch I/O of the socket backend (with timestamps from the
    // error queue), AF_XDP kicks and wake-ups, accepting and serving
    // NTS-KE and metrics connections, the upstream query sockets (chronyd
    // over UDP, ptp4l over a Unix socket, opened again after a reload),
    // systemd notifications.
    any(&[
        libc::SYS_recvmmsg,
        libc::SYS_sendmmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_accept4,
        libc::SYS_accept,
        libc::SYS_bind,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
    ]);
    #[cfg(target_arch = "x86_64")]
    any(&[
        libc::SYS_open,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_rename,
        libc::SYS_unlink,
        libc::SYS_poll,
        libc::SYS_epoll_wait,
        libc::SYS_time,
    ]);

    let arg = |index: u8, op: SeccompCmpOp, value: u64| {
        // The conditions below are valid by construction (index < 6).
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).expect("argument index below 6")
    };
    let rule = |conditions: Vec<SeccompCondition>| SeccompRule::new(conditions).expect("at least one condition");
    let one_of = |index: u8, values: &[u64]| -> Vec<SeccompRule> {
        values.iter().map(|&v| rule(vec![arg(index, SeccompCmpOp::Eq, v)])).collect()
    };

    // No executable memory: nothing chimed does after start-up loads code.
    let no_exec = || vec![rule(vec![arg(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)])];
    r.insert(libc::SYS_mmap, no_exec());
    r.insert(libc::SYS_mprotect, no_exec());
    // Signals only to this process's own threads (abort, the C library).
    r.insert(libc::SYS_tgkill, vec![rule(vec![arg(0, SeccompCmpOp::Eq, u64::from(std::process::id()))])]);
    // New sockets: UDP (chronyd queries), Unix datagrams (ptp4l); with the
    // xdp backend, netlink to detach the program at shutdown.
    let mut families = vec![libc::AF_UNIX as u64, libc::AF_INET as u64, libc::AF_INET6 as u64];
    if needs.xdp {
        families.push(libc::AF_NETLINK as u64);
    }
    r.insert(libc::SYS_socket, one_of(0, &families));
    // ioctl: FIONBIO (std's set_nonblocking), FIOCLEX/FIONCLEX, and the PTP
    // clock's requests (type '=', read-only on a descriptor opened for
    // reading).
    #[allow(clippy::unnecessary_cast)] // The constants' type differs between C libraries.
    let mut ioctl = one_of(1, &[libc::FIONBIO as u64, libc::FIOCLEX as u64, libc::FIONCLEX as u64]);
    ioctl.push(rule(vec![arg(1, SeccompCmpOp::MaskedEq(0xff00), u64::from(b'=') << 8)]));
    r.insert(libc::SYS_ioctl, ioctl);
    // The late thread's pinning (its own affinity only, pid 0), naming
    // (PR_SET_NAME) and ambient capabilities (PR_CAP_AMBIENT: read, clear).
    r.insert(libc::SYS_sched_setaffinity, one_of(0, &[0]));
    r.insert(libc::SYS_prctl, one_of(0, &[libc::PR_SET_NAME as u64, libc::PR_CAP_AMBIENT as u64]));
    if needs.xdp {
        // The program's maps: per-CPU counters read about once a second,
        // the deny list rewritten on reload, the AF_XDP sockets taken out
        // at shutdown (detaching the program itself goes over netlink). No
        // loading, attaching, pinning or enumerating of programs.
        r.insert(libc::SYS_bpf, one_of(0, &BPF_MAP_COMMANDS));
    }
    r
}

/// The BPF program for `mode` (`None` for [`SeccompMode::Off`]).
pub fn program(mode: SeccompMode, needs: Needs) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(None),
    };
    let arch = std::env::consts::ARCH;
    let target = TargetArch::try_from(arch).map_err(|_| SeccompError::Architecture(arch))?;
    let filter = SeccompFilter::new(rules(needs), mismatch, SeccompAction::Allow, target)
        .map_err(|e| SeccompError::Build(e.to_string()))?;
    BpfProgram::try_from(filter).map(Some).map_err(|e| SeccompError::Build(e.to_string()))
}

/// Builds the filter for `mode` and installs it in every thread of the
/// process; returns how many system calls it allows (0 for
/// [`SeccompMode::Off`], which installs nothing).
pub fn install(mode: SeccompMode, needs: Needs) -> Result<usize, SeccompError> {
    let Some(program) = program(mode, needs)? else { return Ok(0) };
    let instructions: Vec<sys::seccomp::Instruction> =
        program.iter().map(|i| sys::seccomp::Instruction { code: i.code, jt: i.jt, jf: i.jf, k: i.k }).collect();
    sys::seccomp::install_all_threads(&instructions, true).map_err(SeccompError::Install)?;
    Ok(rules(needs).len())
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::net::{Ipv4Addr, UdpSocket};
    use std::process::Command;

    use super::*;

    /// Selects the child mode of [`seccomp_child`].
    const CHILD_ENV: &str = "CHIME_SECCOMP_TEST_CHILD";
    /// Printed by a child that got to the end.
    const CHILD_OK: &str = "seccomp child: ok";

    /// Runs [`seccomp_child`] in a new process of this test binary (the
    /// filter cannot be taken off again, and must not reach the harness).
    fn run_child(mode: &str) -> String {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "seccomp::tests::seccomp_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, mode)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child {mode} failed ({}):\n{stdout}\n{stderr}", out.status);
        assert!(stdout.contains(CHILD_OK), "child {mode} did not get to the end:\n{stdout}\n{stderr}");
        stdout
    }

    /// The error of a raw system call's return value, `Ok` if it succeeded.
    fn result(rc: libc::c_long) -> io::Result<libc::c_long> {
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
    }

    /// `kill(parent, 0)`: allowed without a filter (it only checks that the
    /// parent exists and may be signalled), outside the list.
    fn signal_parent(parent: libc::pid_t) -> io::Result<libc::c_long> {
        assert!(parent > 1, "{parent}");
        // SAFETY: signal 0 delivers nothing; no memory is passed.
        result(unsafe { libc::syscall(libc::SYS_kill, parent, 0) })
    }

    /// `socket(AF_PACKET, SOCK_RAW)`, closed again if it was made.
    fn packet_socket() -> io::Result<libc::c_long> {
        // SAFETY: integer arguments only.
        let fd = result(unsafe { libc::syscall(libc::SYS_socket, libc::AF_PACKET, libc::SOCK_RAW, 0) })?;
        // SAFETY: `fd` is the descriptor just made, owned here.
        unsafe { libc::close(fd as libc::c_int) };
        Ok(fd)
    }

    /// An anonymous executable mapping, unmapped again if it was made.
    fn executable_mapping() -> io::Result<()> {
        // SAFETY: a fresh anonymous mapping that nothing else refers to.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `p` is the 4096-byte mapping made above, unused.
        unsafe { libc::munmap(p, 4096) };
        Ok(())
    }

    /// A UDP datagram to itself over loopback: sockets, send, receive.
    fn udp_round_trip() -> io::Result<()> {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        sock.send_to(b"chime", sock.local_addr()?)?;
        let mut buf = [0u8; 16];
        let (n, _) = sock.recv_from(&mut buf)?;
        assert_eq!(&buf[..n], b"chime");
        Ok(())
    }

    fn eperm<T: std::fmt::Debug>(what: &str, r: io::Result<T>) {
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => println!("{what}: refused with EPERM"),
            other => panic!("{what}: expected EPERM, got {other:?}"),
        }
    }

    /// The child side: a no-op unless started by [`run_child`].
    #[test]
    fn seccomp_child() {
        let Ok(mode) = std::env::var(CHILD_ENV) else { return };
        // Before the filter: the forbidden calls work (as root, the packet
        // socket too), so a refusal below is the filter's doing.
        // SAFETY: getppid has no arguments and cannot fail.
        let parent = unsafe { libc::getppid() };
        signal_parent(parent).unwrap();
        executable_mapping().unwrap();
        let root = crate::sys::users::geteuid() == 0;
        if root {
            packet_socket().unwrap();
        }
        // A thread running before the filter, which must get it too.
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let early = std::thread::spawn(move || {
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            (signal_parent(parent).map_err(|e| e.raw_os_error()), udp_round_trip().map_err(|e| e.raw_os_error()))
        });
        ready_rx.recv().unwrap();

        let mode = match mode.as_str() {
            "enforce" => SeccompMode::Enforce,
            "log" => SeccompMode::Log,
            other => panic!("unknown child mode {other:?}"),
        };
        let allowed = install(mode, Needs::default()).unwrap();
        println!("installed {mode}: {allowed} system calls allowed");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"])), "{status}");
        assert!(status.lines().any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])), "{status}");

        // What chimed does keeps working.
        udp_round_trip().unwrap();
        assert!(!std::fs::read_to_string("/proc/self/stat").unwrap().is_empty());
        std::thread::sleep(std::time::Duration::from_millis(1));
        go_tx.send(()).unwrap();
        let (early_signal, early_udp) = early.join().unwrap();
        assert_eq!(early_udp, Ok(()));

        match mode {
            SeccompMode::Enforce => {
                eperm("kill", signal_parent(parent));
                assert_eq!(early_signal, Err(Some(libc::EPERM)), "the thread started before the filter");
                eperm("mmap(PROT_EXEC)", executable_mapping());
                eperm("socket(AF_PACKET)", packet_socket());
                // SAFETY: integer arguments only; refused before it could
                // make this process traceable.
                eperm("ptrace", result(unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) }));
                eperm("a new thread", std::thread::Builder::new().spawn(|| ()));
                eperm("a new process", Command::new("/bin/true").spawn());
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp: [*const libc::c_char; 1] = [std::ptr::null()];
                // SAFETY: NUL-terminated path and argument and environment
                // arrays; refused, or this test process becomes /bin/true
                // and never prints CHILD_OK (which the parent then reports).
                eperm(
                    "execve",
                    result(unsafe { libc::syscall(libc::SYS_execve, path.as_ptr(), argv.as_ptr(), envp.as_ptr()) }),
                );
            }
            _ => {
                // Logged by the kernel, not refused.
                signal_parent(parent).unwrap();
                assert_eq!(early_signal, Ok(0));
                executable_mapping().unwrap();
                if root {
                    packet_socket().unwrap();
                }
            }
        }
        println!("{CHILD_OK}");
    }

    #[test]
    fn enforce_refuses_forbidden_calls_in_every_thread() {
        let out = run_child("enforce");
        for call in ["kill", "mmap(PROT_EXEC)", "socket(AF_PACKET)", "ptrace", "a new thread", "execve"] {
            assert!(out.contains(&format!("{call}: refused with EPERM")), "{call}:\n{out}");
        }
    }

    #[test]
    fn log_mode_allows_everything() {
        run_child("log");
    }

    #[test]
    fn the_list_is_short_and_leaves_out_what_an_intruder_wants() {
        let plain = rules(Needs::default());
        let xdp = rules(Needs { xdp: true });
        println!("{} system calls allowed ({} with the xdp backend)", plain.len(), xdp.len());
        assert!(plain.len() < 100, "{}", plain.len());
        let forbidden = [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_ptrace,
            libc::SYS_kill,
            libc::SYS_setuid,
            libc::SYS_setresuid,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_listen,
            libc::SYS_process_vm_writev,
            libc::SYS_init_module,
            libc::SYS_seccomp,
        ];
        for nr in forbidden {
            assert!(!xdp.contains_key(&nr), "system call {nr} is allowed");
        }
        assert!(!plain.contains_key(&libc::SYS_bpf));
        assert!(xdp.contains_key(&libc::SYS_bpf));
        assert_eq!(xdp.len(), plain.len() + 1);
        // Arguments are checked where it matters.
        for nr in [
            libc::SYS_socket,
            libc::SYS_mmap,
            libc::SYS_mprotect,
            libc::SYS_tgkill,
            libc::SYS_ioctl,
            libc::SYS_prctl,
            libc::SYS_sched_setaffinity,
        ] {
            assert!(!plain[&nr].is_empty(), "{nr} takes any arguments");
        }
        assert_eq!(xdp[&libc::SYS_bpf].len(), BPF_MAP_COMMANDS.len());
        assert_eq!(xdp[&libc::SYS_socket].len(), plain[&libc::SYS_socket].len() + 1, "AF_NETLINK");
    }

    #[test]
    fn off_builds_nothing() {
        assert!(program(SeccompMode::Off, Needs::default()).unwrap().is_none());
        assert_eq!(install(SeccompMode::Off, Needs::default()).unwrap(), 0);
        let enforce = program(SeccompMode::Enforce, Needs::default()).unwrap().unwrap();
        let log = program(SeccompMode::Log, Needs::default()).unwrap().unwrap();
        assert_eq!(enforce.len(), log.len());
        assert_ne!(enforce, log, "only the default action differs");
    }
}
