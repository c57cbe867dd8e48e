//! The built-in guest is a plain PVH ELF: QEMU boots the same image with `-kernel` and the guest
//! prints the same line formats there.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// QEMU 10 `-M <machine>` with qboot, booting `elf` with `cmdline` on its serial port.
fn start_qemu(elf: &str, machine: &str, smp: &str, cmdline: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities", // PVM refuses QEMU writing IA32_ARCH_CAPABILITIES (MSR 0x10a)
        "-M",
        machine,
        "-bios",
        "/usr/share/qemu/qboot.rom",
        "-m",
        "256M",
        "-smp",
        smp,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit",
        "-kernel",
        elf,
        "-append",
        cmdline,
    ];
    args.extend(extra);
    Proc::spawn_exe("qemu-system-x86_64", &args)
}

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

    let mut q = start_qemu(elf.to_str().unwrap(), "microvm", "2", "mib=32 rate=20 report_ms=300", &[]);
    assert!(q.wait_lanes_verifying(Duration::from_secs(60)), "QEMU guest never verified: {}", q.tail(5));
    let n = q.reports().len();
    let ok = q.wait_reports(n + 4, Duration::from_secs(40));

    assert!(ok, "QEMU guest printed too few REPORT lines: {} {}", q.tail(5), q.stderr_text());
    let boot = q.wait_line("BOOT ferry-guest", Duration::from_secs(1)).expect("BOOT line");
    assert!(boot.contains("lanes=2"), "{boot}");
    let r = &q.reports()[n - 1..];
    assert!(r.iter().all(|x| x.errors == 0 && x.lanes == 2), "{}", r.last().unwrap().line);
    assert!(r.windows(2).all(|w| w[1].verified > w[0].verified));
    for key in ["t_ms=", "written=", "verified=", "errors=", "rate_mib_s=", "max_gap_us=", "lane0=", "lane1="] {
        assert!(r.last().unwrap().line.contains(key), "REPORT lacks {key}");
    }
    assert!(q.heartbeats().len() >= 100);
}

/// The guest's virtio-blk driver against QEMU's virtio-blk-device (modern virtio-mmio on
/// microvm): the same driver Ferry's device serves, checked against an independent device.
#[test]
fn guest_disk_workload_verifies_clean_on_qemus_virtio_blk() {
    if !kvm_available("guest_disk_workload_verifies_clean_on_qemus_virtio_blk") {
        return;
    }
    let dir = tmpdir("qemu-blk");
    let elf = dir.join("ferry-guest.elf");
    assert!(Command::new(FERRY).args(["guest", "export", elf.to_str().unwrap()]).status().unwrap().success());
    let img = dir.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let drive = format!("file={},format=raw,if=none,id=d0", img.display());

    // With ACPI off QEMU announces the device as virtio_mmio.device= on the command line.
    let mut q = start_qemu(
        elf.to_str().unwrap(),
        "microvm,acpi=off",
        "1",
        "mib=16 rate=10 report_ms=300 disk=1 disk_qd=8 disk_mib=32",
        &["-global", "virtio-mmio.force-legacy=false", "-drive", &drive, "-device", "virtio-blk-device,drive=d0"],
    );
    // The disk workload starts after the memory fill: wait for what is asserted, not for time.
    let disk_over =
        |r: &Report, key: &str| r.line.find(" DISK ").and_then(|at| field(&r.line[at..], key)).is_some_and(|n| n > 100);
    let ok = q.wait_report(|r| disk_over(r, "written") && disk_over(r, "verified"), Duration::from_secs(60));

    assert!(ok, "QEMU guest's disk never got past 100 blocks: {} {}", q.tail(5), q.stderr_text());
    let last = q.reports().last().unwrap().line.clone();
    let disk = &last[last.find(" DISK ").unwrap_or_else(|| panic!("no DISK part: {last}"))..];
    assert_eq!(field(disk, "errors"), Some(0), "{last}");
    assert!(field(disk, "written").unwrap() > 100 && field(disk, "verified").unwrap() > 100, "{last}");
    assert!(q.lines_with("DISK-FAIL").is_empty(), "{:?}", q.lines_with("DISK-FAIL"));
    q.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
