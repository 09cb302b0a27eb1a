//! User and group database lookups and process credentials: the libc calls
//! behind [`crate::privdrop`].
//!
//! The `set*` calls go through glibc, which applies them to every thread of
//! the process (POSIX semantics), not only the calling one.

use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::ptr;

/// Initial scratch buffer for `getpwnam_r`/`getgrnam_r`; doubled on `ERANGE`.
const LOOKUP_BUF_START: usize = 1024;
/// Give up growing the scratch buffer beyond this (a group with thousands of
/// members needs tens of KiB; nothing sane needs more).
const LOOKUP_BUF_MAX: usize = 1 << 20;

/// A user database entry, as far as chimed needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    /// The user ID.
    pub uid: libc::uid_t,
    /// The user's primary group ID.
    pub gid: libc::gid_t,
}

/// A group database entry, as far as chimed needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    /// The group ID.
    pub gid: libc::gid_t,
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

/// Looks `name` up in the user database (`/etc/passwd`, NSS); `Ok(None)` if
/// there is no such user.
pub fn user_by_name(name: &str) -> io::Result<Option<User>> {
    let name = c_name(name)?;
    let mut buf = vec![0u8; LOOKUP_BUF_START];
    loop {
        let mut entry = MaybeUninit::<libc::passwd>::uninit();
        let mut result: *mut libc::passwd = ptr::null_mut();
        // SAFETY: `name` is a NUL-terminated string; `entry` is writable
        // storage for one `passwd`; `buf` is writable for `buf.len()` bytes;
        // `result` is a valid out-pointer. All outlive the call.
        let rc = unsafe {
            libc::getpwnam_r(name.as_ptr(), entry.as_mut_ptr(), buf.as_mut_ptr().cast(), buf.len(), &mut result)
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => {
                // SAFETY: return code 0 with a non-null result means
                // getpwnam_r filled in `entry` (result points at it).
                let entry = unsafe { entry.assume_init() };
                return Ok(Some(User { uid: entry.pw_uid, gid: entry.pw_gid }));
            }
            libc::ERANGE if buf.len() < LOOKUP_BUF_MAX => buf.resize(buf.len() * 2, 0),
            libc::ENOENT | libc::ESRCH => return Ok(None),
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// Looks `name` up in the group database (`/etc/group`, NSS); `Ok(None)` if
/// there is no such group.
pub fn group_by_name(name: &str) -> io::Result<Option<Group>> {
    let name = c_name(name)?;
    let mut buf = vec![0u8; LOOKUP_BUF_START];
    loop {
        let mut entry = MaybeUninit::<libc::group>::uninit();
        let mut result: *mut libc::group = ptr::null_mut();
        // SAFETY: as in `user_by_name`: every pointer is valid and writable
        // for the size passed, and outlives the call.
        let rc = unsafe {
            libc::getgrnam_r(name.as_ptr(), entry.as_mut_ptr(), buf.as_mut_ptr().cast(), buf.len(), &mut result)
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => {
                // SAFETY: return code 0 with a non-null result means
                // getgrnam_r filled in `entry`.
                let entry = unsafe { entry.assume_init() };
                return Ok(Some(Group { gid: entry.gr_gid }));
            }
            libc::ERANGE if buf.len() < LOOKUP_BUF_MAX => buf.resize(buf.len() * 2, 0),
            libc::ENOENT | libc::ESRCH => return Ok(None),
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// The effective user ID.
pub fn geteuid() -> libc::uid_t {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The real, effective and saved user IDs.
pub fn getresuid() -> io::Result<(libc::uid_t, libc::uid_t, libc::uid_t)> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the three pointers are valid, writable `uid_t`s.
    let rc = unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if rc == 0 { Ok((r, e, s)) } else { Err(io::Error::last_os_error()) }
}

/// The real, effective and saved group IDs.
pub fn getresgid() -> io::Result<(libc::gid_t, libc::gid_t, libc::gid_t)> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the three pointers are valid, writable `gid_t`s.
    let rc = unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    if rc == 0 { Ok((r, e, s)) } else { Err(io::Error::last_os_error()) }
}

/// The supplementary group IDs.
pub fn getgroups() -> io::Result<Vec<libc::gid_t>> {
    loop {
        // SAFETY: with a size of 0 getgroups only returns the count and
        // does not touch the (null) list pointer.
        let n = unsafe { libc::getgroups(0, ptr::null_mut()) };
        let Ok(len) = usize::try_from(n) else { return Err(io::Error::last_os_error()) };
        let mut groups: Vec<libc::gid_t> = vec![0; len];
        // SAFETY: `groups` is writable for `n` entries.
        let got = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
        if let Ok(got) = usize::try_from(got) {
            groups.truncate(got);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        // EINVAL: the list grew between the two calls; ask again.
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
}

/// Replaces the supplementary group list with `groups`.
pub fn setgroups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a valid, readable slice.
    let rc = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Sets the real, effective and saved group IDs (as root) or the effective
/// group ID (otherwise, if allowed).
pub fn setgid(gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: setgid takes a plain integer and has no memory preconditions.
    let rc = unsafe { libc::setgid(gid) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Sets the real, effective and saved user IDs (as root) or the effective
/// user ID (otherwise, if allowed).
pub fn setuid(uid: libc::uid_t) -> io::Result<()> {
    // SAFETY: setuid takes a plain integer and has no memory preconditions.
    let rc = unsafe { libc::setuid(uid) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_uid_zero() {
        assert_eq!(user_by_name("root").unwrap(), Some(User { uid: 0, gid: 0 }));
        assert_eq!(group_by_name("root").unwrap(), Some(Group { gid: 0 }));
    }

    #[test]
    fn unknown_names_are_none() {
        assert_eq!(user_by_name("chime-no-such-user-xyz").unwrap(), None);
        assert_eq!(group_by_name("chime-no-such-group-xyz").unwrap(), None);
    }

    #[test]
    fn nul_in_name_is_invalid_input() {
        assert_eq!(user_by_name("ro\0ot").unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn credentials_are_readable() {
        let (_, euid, _) = getresuid().unwrap();
        assert_eq!(euid, geteuid());
        getresgid().unwrap();
        getgroups().unwrap();
    }
}
