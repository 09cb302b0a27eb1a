//! Installing a seccomp-BPF program in every thread of the process:
//! `prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp(SECCOMP_SET_MODE_FILTER)`
//! with `SECCOMP_FILTER_FLAG_TSYNC` (every thread, atomically) and,
//! optionally, `SECCOMP_FILTER_FLAG_LOG` (the kernel logs every action but
//! "allow", so a call refused with an errno shows up as an audit record of
//! type 1326 instead of failing silently).

use std::io;

/// One BPF instruction, as in `<linux/filter.h>`.
pub type Instruction = libc::sock_filter;

/// Installs `program` for every thread of this process. `log`: also
/// `SECCOMP_FILTER_FLAG_LOG`. Fails with the kernel's error (`EINVAL`
/// without seccomp filters, `EFAULT`/`EINVAL` for a bad program), or with
/// an error naming the thread that could not be synchronized.
pub fn install_all_threads(program: &[Instruction], log: bool) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program longer than 65535 instructions"))?;
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty BPF program"));
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes only integer arguments and touches
    // no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let prog = libc::sock_fprog { len, filter: program.as_ptr().cast_mut() };
    let mut flags = libc::SECCOMP_FILTER_FLAG_TSYNC;
    if log {
        flags |= libc::SECCOMP_FILTER_FLAG_LOG;
    }
    // SAFETY: `prog` points to `len` valid instructions that outlive the
    // call; the kernel copies them and never writes through the pointer
    // (the `cast_mut` only satisfies the C type).
    let rc = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &prog as *const libc::sock_fprog)
    };
    match rc {
        0 => Ok(()),
        // With TSYNC, a positive result is the ID of a thread that could not
        // take the filter (it has another one already).
        tid if tid > 0 => Err(io::Error::other(format!("thread {tid} could not be synchronized"))),
        _ => Err(io::Error::last_os_error()),
    }
}
