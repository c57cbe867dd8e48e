//! The built-in guest is a plain PVH ELF: QEMU boots the same image with `-kernel` and the guest
//! prints the same line formats there.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn exported_guest_boots_under_qemu_and_prints_the_same_line_formats() {
    if !kvm_available("exported_guest_boots_under_qemu_and_prints_the_same_line_formats") {
        return;
    }
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    assert!(
        qemu.as_ref().map(|o| o.status.success()).unwrap_or(false),
        "qemu-system-x86_64 is not installed (`.ci/run` installs it from bookworm-backports)"
    );
    let dir = tmpdir("qemu");
    let elf = dir.join("ferry-guest.elf");
    let export = Command::new(FERRY).args(["guest", "export", elf.to_str().unwrap()]).status().unwrap();
    assert!(export.success());

    let mut q = Proc::spawn_exe(
        "qemu-system-x86_64",
        &[
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities", // PVM refuses QEMU writing IA32_ARCH_CAPABILITIES (MSR 0x10a)
            "-M",
            "microvm",
            "-bios",
            "/usr/share/qemu/qboot.rom",
            "-m",
            "256M",
            "-smp",
            "2",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit",
            "-kernel",
            elf.to_str().unwrap(),
            "-append",
            "mib=32 rate=20 report_ms=300",
        ],
    );
    let ok = q.wait_reports(4, Duration::from_secs(40));

    assert!(ok, "QEMU guest printed too few REPORT lines: {} {}", q.tail(5), q.stderr_text());
    let boot = q.wait_line("BOOT ferry-guest", Duration::from_secs(1)).expect("BOOT line");
    assert!(boot.contains("lanes=2"), "{boot}");
    let r = q.reports();
    assert!(r.iter().all(|x| x.errors == 0 && x.lanes == 2), "{}", r.last().unwrap().line);
    assert!(r.windows(2).all(|w| w[1].verified > w[0].verified));
    for key in ["t_ms=", "written=", "verified=", "errors=", "rate_mib_s=", "max_gap_us=", "lane0=", "lane1="] {
        assert!(r.last().unwrap().line.contains(key), "REPORT lacks {key}");
    }
    assert!(q.heartbeats().len() >= 100);
}
