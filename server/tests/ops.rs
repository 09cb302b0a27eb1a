//! The operations files in `ops/`: the example configurations pass
//! `chimed --check-config`, the systemd unit passes `systemd-analyze verify`
//! and runs chimed under a real (namespaced) systemd.
//!
//! Tests that need root or a tool that is missing print `skipping: ...`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

fn chimed() -> &'static str {
    env!("CARGO_BIN_EXE_chimed")
}

/// Exit code of a script that skipped (automake's convention).
const SKIPPED: i32 = 77;

#[test]
fn every_example_configuration_checks() {
    let mut examples: Vec<PathBuf> = std::fs::read_dir(ops().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    examples.sort();
    let names: Vec<_> = examples.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for expected in ["socket-host.toml", "xdp-multiqueue.toml", "fleet-member.toml", "nts-ke-frontend.toml"] {
        assert!(names.iter().any(|n| n == expected), "ops/examples/{expected} is missing: {names:?}");
    }
    for path in &examples {
        // The secret and certificate files they name (/etc/chime/...) do not
        // exist here: --check-config does not open them.
        let out = run_bounded(Command::new(chimed()).arg("--check-config").arg(path), Duration::from_secs(10));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim_end().ends_with(": ok"),
            "{}: {}{}",
            path.display(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A copy of the unit with ExecStart pointing at the chimed just built
/// (`systemd-analyze verify` checks that the executables exist).
fn unit_copy(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(ops().join("systemd/chimed.service")).unwrap();
    assert!(text.contains("ExecStart=/usr/sbin/chimed "), "the unit runs /usr/sbin/chimed");
    let path = dir.join("chimed.service");
    std::fs::write(&path, text.replace("/usr/sbin/chimed", chimed())).unwrap();
    path
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let Some(analyze) = which("systemd-analyze") else {
        println!("skipping: systemd-analyze is not installed (Debian package systemd)");
        return;
    };
    let dir = scratch_dir("unit-verify");
    let unit = unit_copy(&dir);
    let out = run_bounded(Command::new(analyze).arg("verify").arg(&unit), Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on some problems (unknown keys are only warned about):
    // clean means no output at all.
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {}\n{stderr}", out.status);
}

#[test]
fn unit_keeps_to_the_capabilities_chimed_needs() {
    let text = std::fs::read_to_string(ops().join("systemd/chimed.service")).unwrap();
    let value = |key: &str| -> Vec<String> {
        let line = text.lines().find(|l| l.starts_with(&format!("{key}="))).unwrap_or_else(|| panic!("no {key}="));
        let mut caps: Vec<String> = line[key.len() + 1..].split_whitespace().map(str::to_owned).collect();
        caps.sort();
        caps
    };
    let needed = ["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_PERFMON"];
    assert_eq!(value("AmbientCapabilities"), needed);
    assert_eq!(value("CapabilityBoundingSet"), needed);
    for line in ["Type=notify", "User=chime", "NoNewPrivileges=yes", "LimitMEMLOCK=infinity", "StateDirectory=chime"] {
        assert!(text.lines().any(|l| l == line), "{line} missing from the unit");
    }
    assert!(!text.lines().any(|l| l.starts_with("ProtectClock=")), "ProtectClock= refuses chimed's adjtimex reads");
}

#[test]
fn unit_runs_chimed_under_a_namespaced_systemd() {
    if !is_root() {
        println!("skipping: needs root (booting systemd in namespaces)");
        return;
    }
    let out = run_bounded(
        Command::new("bash").arg(ops().join("systemd/test-unit.sh")).args(["--chimed", chimed(), "--xdp"]),
        Duration::from_secs(180),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if out.status.code() == Some(SKIPPED) {
        return; // the script printed "skipping: ..."
    }
    assert!(out.status.success() && stdout.contains("all unit checks passed"), "{}:\n{stdout}\n{stderr}", out.status);
}

/// The unit's capabilities, for setpriv.
const UNIT_CAPS: &str = "+net_bind_service,+net_admin,+net_raw,+bpf,+perfmon";

/// `(name, uid, gid)` of the user to run chimed as: chime where it exists
/// (the Debian package made it), else nobody (chimed does not care who it
/// is, only that it is not root).
fn service_user() -> (String, String, String) {
    let id = |user: &str, flag: &str| {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    for user in ["chime", "nobody"] {
        if let (Some(uid), Some(gid)) = (id(user, "-u"), id(user, "-g")) {
            return (user.to_owned(), uid, gid);
        }
    }
    panic!("neither user chime nor nobody exists");
}

/// chimed started the way the unit starts it, without systemd: as an
/// ordinary user holding the unit's capabilities as ambient ones (setpriv),
/// in a namespace on a two-queue veth, with each backend; ntpdate gets
/// answers, and after start-up no thread holds more than the backend needs.
#[test]
fn chimed_runs_as_an_ordinary_user_with_the_units_capabilities() {
    let Some(setpriv) = which("setpriv") else {
        println!("skipping: setpriv (util-linux) is not installed");
        return;
    };
    if !have("ntpdate") {
        println!("skipping: ntpdate (ntpsec-ntpdate) is not installed");
        return;
    }
    let Some(bed) = VethPair::with_queues("amb", 2) else { return };
    let (user, uid, gid) = service_user();
    let setpriv = setpriv.to_string_lossy().into_owned();
    let wrapper = [
        setpriv.as_str(),
        "--reuid",
        &uid,
        "--regid",
        &gid,
        "--init-groups",
        "--inh-caps",
        UNIT_CAPS,
        "--ambient-caps",
        UNIT_CAPS,
        "--",
    ];
    // A small UMEM: RLIMIT_MEMLOCK stays what it is here (the unit raises it).
    let dir = scratch_dir("ambient");
    let cfg = dir.join("chimed.toml");
    std::fs::write(&cfg, "[xdp]\nframe_count = 1024\nring_size = 512\n").unwrap();
    let cfg = cfg.to_str().unwrap();
    let listen = format!("{}:123", VethPair::SERVER_V4);
    let ntp = listen.parse().unwrap();
    for backend in ["socket", "xdp"] {
        let mut args = vec!["-c", cfg, "--backend", backend, "--listen", &listen, "--local-stratum", "10"];
        args.extend_from_slice(&["--no-metrics", "--workers", "2"]);
        if backend == "xdp" {
            args.extend_from_slice(&["--interface", &bed.server_dev, "--xdp-mode", "native"]);
        }
        let mut c = Chimed::spawn_wrapped(Some(&bed.server.name), &wrapper, &args, ntp, None);
        let mut answered = String::new();
        for _ in 0..20 {
            let out = bed.client.run("ntpdate", &["-q", VethPair::SERVER_V4], Duration::from_secs(15));
            answered = String::from_utf8_lossy(&out.stdout).into_owned();
            if answered.contains(&format!("{} s", VethPair::SERVER_V4)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        // Stratum 10 (local_stratum), or what the kernel clock says if
        // something disciplines it here.
        let answer = format!("{} s", VethPair::SERVER_V4);
        assert!(answered.contains(&answer), "{backend} as {user}: no answer: {answered}\n{}", c.stderr());
        let log = c.stderr();
        assert!(log.contains(&format!("not started as root (uid {uid})")), "{log}");
        let expect_main = if backend == "xdp" {
            assert!(log.contains("keeping CAP_NET_ADMIN"), "{log}");
            "0000000000001000"
        } else {
            assert!(log.contains("no capabilities left"), "{log}");
            "0000000000000000"
        };
        let pid = c.pid();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let task = task.unwrap();
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            let field = |k: &str| status.lines().find(|l| l.starts_with(k)).unwrap().split_whitespace().nth(1).unwrap();
            let main = task.file_name().to_string_lossy() == pid.to_string();
            assert_eq!(field("CapPrm:"), if main { expect_main } else { "0000000000000000" }, "{backend}: {status}");
            assert_eq!(field("CapAmb:"), "0000000000000000", "{backend}: {status}");
        }
        println!("{backend} backend as {user} (uid {uid}) with ambient capabilities: {}", answered.trim());
        assert!(c.terminate().is_some_and(|s| s.success()), "{}", c.stderr());
    }
    let _ = std::fs::remove_dir_all(dir);
}
