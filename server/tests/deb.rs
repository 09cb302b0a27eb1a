//! The Debian package: built with `ops/debian/build-deb.sh` from the
//! binaries of this build, installed with `dpkg -i`, checked (user chime,
//! files, permissions, `chimed --check-config`, the unit), removed, purged,
//! and checked to leave nothing behind.
//!
//! It installs a package on this machine, so it runs only as root and only
//! where nothing of chime is installed already (no package chime, no user or
//! group chime, no /etc/chime or /var/lib/chime): the purge at the end, which
//! also runs when the test fails half-way, must not remove anything it did
//! not make. Otherwise it prints `skipping: ...`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const PACKAGE: &str = "chime";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(prog: &str, args: &[&str]) -> Output {
    run_bounded(Command::new(prog).args(args).env("DEBIAN_FRONTEND", "noninteractive"), Duration::from_secs(120))
}

fn ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn package_installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f=${db:Status-Status}", PACKAGE]);
    out.status.success()
        && !String::from_utf8_lossy(&out.stdout).trim().is_empty()
        && String::from_utf8_lossy(&out.stdout).trim() != "not-installed"
}

fn getent(db: &str, name: &str) -> Option<String> {
    let out = run("getent", &[db, name]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Why this machine is not one the test may install on, if it is not.
fn unsuitable() -> Option<String> {
    if !is_root() {
        return Some("needs root (dpkg -i)".to_owned());
    }
    for prog in ["dpkg", "dpkg-deb", "adduser", "deluser", "strip", "objdump"] {
        if !have(prog) {
            return Some(format!("{prog} is not installed"));
        }
    }
    if package_installed() {
        return Some("the package chime is installed here; the test would purge it".to_owned());
    }
    for db in ["passwd", "group"] {
        if getent(db, "chime").is_some() {
            return Some(format!("a {db} entry chime exists here; the test would remove it"));
        }
    }
    for dir in ["/etc/chime", "/var/lib/chime"] {
        if Path::new(dir).exists() {
            return Some(format!("{dir} exists here; the test would remove it"));
        }
    }
    None
}

/// Purges the package when dropped, so a failing test leaves the machine as
/// it found it (it checked beforehand that none of this existed).
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", PACKAGE]);
        if getent("passwd", "chime").is_some() {
            let _ = run("deluser", &["--system", "--quiet", "chime"]);
        }
        if getent("group", "chime").is_some() {
            let _ = run("delgroup", &["--system", "--quiet", "chime"]);
        }
        for dir in ["/etc/chime", "/var/lib/chime", "/run/chime"] {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn mode_owner(path: &str) -> (u32, String) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let owner = |db: &str, id: u32| {
        getent(db, &id.to_string()).and_then(|e| e.split(':').next().map(str::to_owned)).unwrap_or(id.to_string())
    };
    (meta.permissions().mode() & 0o7777, format!("{}:{}", owner("passwd", meta.uid()), owner("group", meta.gid())))
}

#[test]
fn package_installs_checks_and_purges_cleanly() {
    if let Some(why) = unsuitable() {
        println!("skipping: {why}");
        return;
    }
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_chimed")).parent().unwrap().to_owned();
    for b in ["chime-nts-ke", "chime-load"] {
        if !bin_dir.join(b).exists() {
            println!("skipping: no {b} in {} (build the workspace: scripts/test.sh does)", bin_dir.display());
            return;
        }
    }

    // Build.
    let out_dir = scratch_dir("deb");
    let built = ok(
        "bash",
        &[
            repo().join("ops/debian/build-deb.sh").to_str().unwrap(),
            "--bin-dir",
            bin_dir.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--fast",
        ],
    );
    let deb = built.lines().last().unwrap().to_owned();
    assert!(deb.ends_with(".deb") && Path::new(&deb).exists(), "{built}");
    let info = ok("dpkg-deb", &["--info", &deb]);
    assert!(info.contains("Package: chime") && info.contains("adduser"), "{info}");
    let contents = ok("dpkg-deb", &["--contents", &deb]);
    for path in [
        "./usr/sbin/chimed",
        "./usr/sbin/chime-nts-ke",
        "./usr/sbin/chime-tune-nic",
        "./usr/bin/chime-load",
        "./lib/systemd/system/chimed.service",
        "./lib/systemd/system/chime-tune-nic@.service",
        "./etc/chime/chimed.toml",
        "./usr/share/doc/chime/copyright",
        "./usr/share/doc/chime/README.ops.md",
        "./usr/share/doc/chime/examples/nts-ke-frontend.toml",
    ] {
        assert!(contents.lines().any(|l| l.ends_with(path)), "{path} missing:\n{contents}");
    }
    assert_eq!(ok("dpkg-deb", &["--field", &deb, "Package"]).trim(), PACKAGE);

    // Install.
    let guard = Installed;
    ok("dpkg", &["-i", &deb]);
    let user = getent("passwd", "chime").expect("user chime made by postinst");
    let fields: Vec<&str> = user.split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system user: {user}");
    assert_eq!(fields[5], "/var/lib/chime", "{user}");
    assert!(fields[6].ends_with("nologin") || fields[6].ends_with("false"), "no login shell: {user}");
    assert!(getent("group", "chime").is_some(), "group chime");
    assert_eq!(mode_owner("/etc/chime"), (0o750, "root:chime".to_owned()));
    assert_eq!(mode_owner("/var/lib/chime"), (0o700, "chime:chime".to_owned()));
    assert_eq!(mode_owner("/usr/sbin/chimed"), (0o755, "root:root".to_owned()));
    assert_eq!(
        ok("dpkg-query", &["-W", "-f=${Conffiles}", PACKAGE]).split_whitespace().next(),
        Some("/etc/chime/chimed.toml")
    );
    let checked = ok("/usr/sbin/chimed", &["--check-config", "/etc/chime/chimed.toml"]);
    assert_eq!(checked.trim(), "/etc/chime/chimed.toml: ok");
    for example in std::fs::read_dir("/usr/share/doc/chime/examples").unwrap() {
        let example = example.unwrap().path();
        ok("/usr/sbin/chimed", &["--check-config", example.to_str().unwrap()]);
    }
    ok("/usr/sbin/chime-nts-ke", &["--version"]);
    ok("/usr/bin/chime-load", &["--help"]);
    let verify = run("dpkg", &["--verify", PACKAGE]);
    assert!(verify.status.success() && verify.stdout.is_empty(), "dpkg --verify: {:?}", verify);
    if let Some(analyze) = which("systemd-analyze") {
        let out = run(analyze.to_str().unwrap(), &["verify", "/lib/systemd/system/chimed.service"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.trim().is_empty(), "installed unit: {stderr}");
    } else {
        println!("not verifying the installed unit: systemd-analyze is not installed");
    }
    // The installed chimed under the installed unit, with systemd booted
    // in namespaces (skips where that is not possible).
    let unit_test = run_script_bounded(
        Command::new("bash").arg(repo().join("ops/systemd/test-unit.sh")).args([
            "--chimed",
            "/usr/sbin/chimed",
            "--unit",
            "/lib/systemd/system/chimed.service",
        ]),
        Duration::from_secs(240),
    );
    println!("{}", unit_test.stdout);
    assert!(matches!(unit_test.code, Some(0 | 77)), "{}{}", unit_test.stdout, unit_test.stderr);

    // Remove: binaries go; configuration, state and user stay.
    std::fs::write("/var/lib/chime/nts-keys", b"state").unwrap();
    ok("dpkg", &["-r", PACKAGE]);
    assert!(!Path::new("/usr/sbin/chimed").exists());
    assert!(!Path::new("/lib/systemd/system/chimed.service").exists());
    assert!(Path::new("/etc/chime/chimed.toml").exists(), "remove keeps the conffile");
    assert!(Path::new("/var/lib/chime/nts-keys").exists(), "remove keeps the state");
    assert!(getent("passwd", "chime").is_some(), "remove keeps the user");

    // Purge: everything goes.
    ok("dpkg", &["--purge", PACKAGE]);
    assert!(!package_installed(), "still known to dpkg");
    for path in ["/etc/chime", "/var/lib/chime", "/usr/share/doc/chime", "/usr/sbin/chime-tune-nic"] {
        assert!(!Path::new(path).exists(), "{path} left after purge");
    }
    assert!(getent("passwd", "chime").is_none(), "user chime left after purge");
    assert!(getent("group", "chime").is_none(), "group chime left after purge");
    drop(guard);
    let _ = std::fs::remove_dir_all(out_dir);
}
