//! IPVS mode on a real IPVS kernel: boots Debian's kernel under qemu (tests/vm/run.sh, built by
//! tests/vm/build.sh from Debian packages and cached under ~/.cache/fleetproxy/vm) with the self-test
//! `node-agent/examples/ipvs_selftest.rs` inside, and checks what it printed on the console:
//! the IPVS table, rr and sh traffic through ClusterIPs (TCP and UDP, IPv4 and IPv6) to pods in
//! network namespaces, 1,000 Services × 10 endpoints, and switches iptables → ipvs → nftables → ipvs leaving nothing behind.
//!
//! The host kernel of the build machine has no IPVS, hence the VM. Skipped (loudly) only where qemu
//! cannot start at all.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Builds the self-test example: the same build as scripts/test.sh's (same packages, so the same
/// feature set), hence a no-op under `make test`.
fn selftest_binary() -> PathBuf {
    let root = workspace();
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "--workspace", "--all-targets"])
        .current_dir(&root)
        .status()
        .expect("cargo build runs");
    assert!(status.success(), "cannot build the ipvs_selftest example");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let binary = target.join("debug/examples/ipvs_selftest");
    assert!(binary.is_file(), "{} is missing", binary.display());
    binary
}

fn qemu_starts() -> Result<(), String> {
    match Command::new("qemu-system-x86_64").arg("-version").output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(String::from_utf8_lossy(&output.stderr).trim().to_owned()),
        Err(error) => Err(error.to_string()),
    }
}

#[test]
fn ipvs_in_a_vm() {
    let vm = workspace().join("tests/vm");
    let binary = selftest_binary();
    if qemu_starts().is_err() {
        // build.sh installs what is missing (qemu-system-x86 among it).
        let _ = Command::new(vm.join("build.sh")).arg(&binary).status();
    }
    if let Err(reason) = qemu_starts() {
        eprintln!("\n==================================================================");
        eprintln!("SKIPPED: qemu cannot start: {reason}");
        eprintln!("IPVS mode was NOT tested (the host kernel has no IPVS; it needs the VM).");
        eprintln!("==================================================================\n");
        return;
    }

    let started = Instant::now();
    let output = Command::new(vm.join("run.sh"))
        .arg(&binary)
        .env("FLEETPROXY_VM_TIMEOUT", "300")
        .output()
        .expect("run.sh runs");
    let console = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}");
    for line in console.lines() {
        if ["PASS", "FAIL", "TIME", "INFO", "VM ", "SELFTEST"].iter().any(|p| line.starts_with(p)) {
            eprintln!("{line}");
        }
    }
    eprintln!("VM run took {:.1} s", started.elapsed().as_secs_f64());

    assert!(console.contains("VM BOOTED"), "the VM did not boot (exit {:?}):\n{console}", output.status);
    let failures: Vec<&str> = console.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(failures.is_empty(), "failed in the VM:\n{}\n\nconsole:\n{console}", failures.join("\n"));
    assert!(console.contains("SELFTEST DONE failures=0"), "the self-test did not finish:\n{console}");
    for check in [
        "ipvsadm-table",
        "rr-spreads-evenly",
        "ipv6-rr-spreads-evenly",
        "udp-rr",
        "sh-pins-pod1",
        "sh-pins-pod2",
        "sh-pins-pod3",
        "partial-sync-drains-removed-endpoint",
        "drained-endpoint-gets-no-new-connections",
        "partial-sync-restores-endpoint",
        "sync-1000x10",
        "resync-unchanged-sends-nothing",
        "no-iptables-left",
        "no-ipvs-left-after-nftables",
        "no-nftables-left",
        "nothing-left",
    ] {
        assert!(console.lines().any(|l| l == format!("PASS {check}")), "no PASS {check}:\n{console}");
    }
}
