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
    let run = run_script_bounded(
        Command::new("bash").arg(ops().join("systemd/test-unit.sh")).args(["--chimed", chimed(), "--xdp"]),
        Duration::from_secs(240),
    );
    println!("{}", run.stdout);
    if run.code == Some(SKIPPED) {
        return; // the script printed "skipping: ..."
    }
    assert!(
        run.code == Some(0) && run.stdout.contains("all unit checks passed"),
        "exit {:?}:\n{}\n{}",
        run.code,
        run.stdout,
        run.stderr
    );
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
        // And every thread under the seccomp filter, kept to what is left.
        assert_confined(pid);
        assert!(log.contains("seccomp filter installed in every thread"), "{log}");
        println!("{backend} backend as {user} (uid {uid}) with ambient capabilities: {}", answered.trim());
        assert!(c.terminate().is_some_and(|s| s.success()), "{}", c.stderr());
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn tune_nic() -> String {
    ops().join("tune-nic.sh").to_string_lossy().into_owned()
}

/// The IRQ step reads the interface's queue IRQs from /proc/interrupts and
/// puts queue q on core q of the list; checked on a made-up table in a dry
/// run (no root needed, nothing changed).
#[test]
fn tune_nic_maps_queue_irqs_to_the_worker_cores() {
    if !have("ethtool") {
        println!("skipping: ethtool is not installed");
        return;
    }
    let dir = scratch_dir("tune-nic-irqs");
    let table = dir.join("interrupts");
    std::fs::write(
        &table,
        "           CPU0       CPU1\n\
         \x20 0:   36   0   IO-APIC   2-edge      timer\n\
         \x2045:    0   0   PCI-MSI 524288-edge      lo\n\
         \x2046:  100   0   PCI-MSI 524289-edge      lo-TxRx-1\n\
         \x2047:  100   0   PCI-MSI 524290-edge      lo-TxRx-0\n\
         \x2048:  100   0   PCI-MSI 524291-edge      lo-rx-2\n\
         \x2049:  100   0   PCI-MSI 524292-edge      lo-tx-2\n\
         \x2050:  100   0   PCI-MSI 524293-edge      lo0-TxRx-0\n\
         \x2051:  100   0   PCI-MSI 524294-edge      iavf-lo-TxRx-3\n",
    )
    .unwrap();
    let out = run_bounded(
        Command::new("bash")
            .args([&tune_nic(), "lo", "--cores", "4-5,9", "--dry-run"])
            .env("CHIME_TUNE_NIC_INTERRUPTS", &table),
        Duration::from_secs(30),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let echoes: Vec<&str> = stdout.lines().filter(|l| l.starts_with("+ echo ")).collect();
    assert_eq!(
        echoes,
        [
            "+ echo 4 > /proc/irq/47/smp_affinity_list",
            "+ echo 5 > /proc/irq/46/smp_affinity_list",
            "+ echo 9 > /proc/irq/48/smp_affinity_list",
            "+ echo 9 > /proc/irq/49/smp_affinity_list",
            "+ echo 4 > /proc/irq/51/smp_affinity_list",
        ],
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("+ ethtool -N lo rx-flow-hash udp4 sd"), "{stdout}");
    assert!(stdout.contains("summary (dry run): "), "{stdout}");
    assert!(matches!(out.status.code(), Some(0 | 3)), "{}: {stdout}", out.status);
}

/// ethtool's view of one setting of `dev` in `ns`.
fn ethtool(ns: &NetNs, args: &[&str]) -> String {
    String::from_utf8_lossy(&ns.run("ethtool", args, Duration::from_secs(10)).stdout).into_owned()
}

/// The script on a four-queue veth in a namespace: a dry run changes
/// nothing; the real run sets what veth supports (channels, GRO), reports
/// what it refuses (RSS hashing, rings) and carries on; a second run finds
/// everything already so.
#[test]
fn tune_nic_on_a_veth_reports_what_the_driver_refuses() {
    if !have("ethtool") {
        println!("skipping: ethtool is not installed");
        return;
    }
    let Some(bed) = VethPair::with_queues("tune", 4) else { return };
    let (ns, dev) = (&bed.server, bed.server_dev.as_str());
    ns.run("ethtool", &["-K", dev, "gro", "on"], Duration::from_secs(10));
    let channels = |ns: &NetNs| {
        let l = ethtool(ns, &["-l", dev]);
        l.split("Current hardware settings:").nth(1).unwrap_or_default().to_owned()
    };
    assert!(channels(ns).contains("RX:\t\t4"), "{}", channels(ns));
    let run = |extra: &[&str]| {
        let mut args = vec![tune_nic(), dev.to_owned(), "--cores".to_owned(), "0-1".to_owned()];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ns.run("bash", &args, Duration::from_secs(60));
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };

    let (code, dry) = run(&["--dry-run"]);
    assert!(dry.contains(&format!("+ ethtool -L {dev} rx 2 tx 2")), "{dry}");
    assert!(dry.contains(&format!("+ ethtool -K {dev} gro off")), "{dry}");
    assert!(dry.contains(&format!("+ ethtool -N {dev} rx-flow-hash udp6 sd")), "{dry}");
    assert!(matches!(code, Some(0 | 3)), "{code:?}: {dry}");
    assert!(channels(ns).contains("RX:\t\t4"), "the dry run changed the queues");
    assert!(ethtool(ns, &["-k", dev]).contains("generic-receive-offload: on"), "the dry run changed GRO");

    let (code, real) = run(&[]);
    assert_eq!(code, Some(3), "some settings are refused on veth: {real}");
    assert!(real.contains("ok: queue count: 2 RX and TX channels"), "{real}");
    assert!(real.contains("ok: gro off"), "{real}");
    assert!(real.contains("refused: RSS udp4"), "{real}");
    assert!(real.contains("refused: RSS udp6"), "{real}");
    assert!(real.contains("refused: ring sizes"), "{real}");
    assert!(real.contains("IRQ affinity") && real.contains("no IRQs of its own"), "{real}");
    assert!(real.contains("summary: 2 applied"), "{real}");
    assert!(channels(ns).contains("RX:\t\t2") && channels(ns).contains("TX:\t\t2"), "{}", channels(ns));
    assert!(ethtool(ns, &["-k", dev]).contains("generic-receive-offload: off"));

    let (_, again) = run(&[]);
    assert!(again.contains("skipped: queue count: already 2"), "{again}");
    assert!(again.contains("skipped: gro: already off"), "{again}");
    assert!(again.contains("summary: 0 applied"), "{again}");
}

#[test]
fn tune_nic_refuses_bad_arguments() {
    for (args, says) in [
        (&["lo", "--queues", "two"][..], "--queues takes a number"),
        (&["lo", "--cores", "3-1"][..], "is not a core or a range"),
        (&["chime-no-such-if"][..], "no interface"),
        (&[][..], "Usage: tune-nic.sh IFACE"),
    ] {
        let out = run_bounded(Command::new("bash").arg(tune_nic()).args(args), Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// The boot-time unit that runs the script is a valid template.
#[test]
fn tune_nic_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = which("systemd-analyze") else {
        println!("skipping: systemd-analyze is not installed (Debian package systemd)");
        return;
    };
    let dir = scratch_dir("tune-unit");
    let text = std::fs::read_to_string(ops().join("systemd/chime-tune-nic@.service")).unwrap();
    std::fs::write(dir.join("chime-tune-nic@.service"), text.replace("/usr/sbin/chime-tune-nic", &tune_nic())).unwrap();
    let out = run_bounded(
        Command::new(analyze).arg("verify").arg(dir.join("chime-tune-nic@eth0.service")),
        Duration::from_secs(30),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{}: {stderr}", out.status);
}
