//! virtio-blk, Ferry against QEMU, on the same built-in guest and image size, in one run.
//!
//! `cargo bench -p ferry --bench disk` prints medians over FERRY_BENCH_RUNS runs (default 3):
//! - the guest's disk throughput (MiB/s and IOPS, its own REPORT figures, 4 KiB requests at
//!   queue depth 8: write, read back, read another block, a flush every 16 writes), for Ferry with
//!   4 I/O threads and 1 (the default on a 2-CPU host), and for QEMU (virtio-blk-device on `-M microvm,acpi=off`,
//!   modern virtio-mmio, default aio=threads and writeback cache, as Ferry's buffered I/O);
//! - migration (Ferry with its default I/O threads) with the disk idle and with that I/O running: host-seen pause (largest gap
//!   between `HB` lines received from the source then the destination), the guest-seen pause
//!   (its own max_gap_us), total time; Ferry also reports the requests in flight at the stop.
//!
//! Both VMMs use one raw image per run, shared by source and destination (same host).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const IDLE: &str = "mib=64 rate=20 disk=0 hb_us=1000 report_ms=500";
const BUSY: &str = "mib=64 rate=20 disk=1 disk_qd=8 disk_mib=64 hb_us=1000 report_ms=500";

#[derive(Default, Clone, Copy)]
struct Mig {
    total_ms: f64,
    pause_ms: f64,
    guest_pause_ms: f64,
    in_flight: f64,
}

fn image(dir: &Path) -> String {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(256 << 20).unwrap();
    p.to_str().unwrap().to_string()
}

fn disk_field(p: &Proc, key: &str) -> Vec<f64> {
    p.lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, l)| l.starts_with("REPORT "))
        .filter_map(|(_, l)| {
            let d = &l[l.find(" DISK ")?..];
            // mib_s has one decimal.
            let v = d.split_whitespace().find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse::<f64>().ok());
            v
        })
        .collect()
}

/// Waits for `n` REPORT lines after the guest's start and returns the median disk MiB/s and IOPS
/// of the last `n - 2` (the first ones include boot and the fill).
fn throughput(p: &Proc, n: usize) -> (f64, f64) {
    p.wait("disk reports", Duration::from_secs(120), |l| {
        l.iter().filter(|(_, x)| x.starts_with("REPORT ")).count() >= n
    });
    let mib: Vec<f64> = disk_field(p, "mib_s").into_iter().skip(2).collect();
    let iops: Vec<f64> = disk_field(p, "iops").into_iter().skip(2).collect();
    (median(mib), median(iops))
}

fn wait_ready(p: &Proc) {
    p.wait("the guest to fill its working set", Duration::from_secs(120), |l| {
        l.iter().rev().find(|(_, x)| x.starts_with("REPORT ")).and_then(|(_, x)| field(x, "written")).unwrap_or(0)
            >= 64 * 256
    });
    std::thread::sleep(Duration::from_millis(1500));
}

fn ferry_throughput(threads: u32, i: usize) -> (f64, f64) {
    wait_quiet();
    let d = tmpdir(&format!("ferry-tp-{threads}-{i}"));
    let spec = format!("path={},io-threads={threads}", image(&d));
    let p = Proc::spawn(FERRY, &["run", "--memory", "512M", "--cmdline", BUSY, "--disk", &spec]);
    let r = throughput(&p, 12);
    drop(p);
    let _ = std::fs::remove_dir_all(&d);
    r
}

fn qemu_args_disk<'a>(elf: &'a str, cmdline: &'a str, drive: &'a str) -> Vec<&'a str> {
    let mut a = qemu_args(elf, "512M", "1", cmdline);
    for x in a.iter_mut() {
        if *x == "microvm" {
            *x = "microvm,acpi=off";
        }
    }
    a.extend(["-global", "virtio-mmio.force-legacy=false", "-drive", drive, "-device", "virtio-blk-device,drive=d0"]);
    a
}

fn qemu_throughput(elf: &str, i: usize) -> (f64, f64) {
    wait_quiet();
    let d = tmpdir(&format!("qemu-tp-{i}"));
    let drive = format!("file={},format=raw,if=none,id=d0", image(&d));
    let p = Proc::spawn("qemu-system-x86_64", &qemu_args_disk(elf, BUSY, &drive));
    let r = throughput(&p, 12);
    drop(p);
    let _ = std::fs::remove_dir_all(&d);
    r
}

fn ferry_mig(cmdline: &str, i: usize) -> Mig {
    wait_quiet();
    let d = tmpdir(&format!("ferry-mig-{i}"));
    let img = image(&d);
    let api = d.join("api.sock");
    let src = Proc::spawn(
        FERRY,
        &["run", "--memory", "512M", "--cmdline", cmdline, "--api-socket", api.to_str().unwrap(), "--disk", &img],
    );
    wait_ready(&src);
    let (dst, t0, t1, s) = ferry_migrate(&api, &d, &["--disk", &img]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(dst.last_report_field("errors"), Some(0), "destination guest not clean");
    if cmdline.contains("disk=1") {
        assert_eq!(disk_field(&dst, "errors").last().copied(), Some(0.0), "destination disk verifier not clean");
    }
    let m = Mig {
        total_ms: s["total_ms"].as_f64().unwrap(),
        pause_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(2)),
        guest_pause_ms: max_guest_gap(&src, &dst, t0 + Duration::from_millis(50), t1 + Duration::from_secs(2)),
        in_flight: s["disk_in_flight_at_stop"].as_f64().unwrap_or(0.0),
    };
    drop((src, dst));
    let _ = std::fs::remove_dir_all(&d);
    m
}

fn qemu_mig(elf: &str, cmdline: &str, i: usize) -> Mig {
    wait_quiet();
    let d = tmpdir(&format!("qemu-mig-{i}"));
    let drive = format!("file={},format=raw,if=none,id=d0", image(&d));
    let qs = d.join("qmp-src.sock");
    let qd = d.join("qmp-dst.sock");
    let mig = format!("unix:{}", d.join("mig.sock").display());
    let qmp_src = format!("unix:{},server=on,wait=off", qs.display());
    let qmp_dst = format!("unix:{},server=on,wait=off", qd.display());
    let mut a = qemu_args_disk(elf, cmdline, &drive);
    a.extend(["-qmp", &qmp_src]);
    let src = Proc::spawn("qemu-system-x86_64", &a);
    wait_ready(&src);
    let mut b = qemu_args_disk(elf, cmdline, &drive);
    b.extend(["-qmp", &qmp_dst, "-incoming", &mig]);
    let dst = Proc::spawn("qemu-system-x86_64", &b);
    let mut qd_conn = Qmp::connect(&qd);
    let _ = qd_conn.cmd(r#"{"execute":"query-status"}"#);
    let mut q = Qmp::connect(&qs);
    q.cmd(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":107374182400,"downtime-limit":300}}"#);
    let t0 = Instant::now();
    q.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"{mig}"}}}}"#));
    let info = q.wait_migrated("QEMU migration", Duration::from_millis(5));
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(dst.last_report_field("errors"), Some(0), "QEMU destination guest not clean");
    if cmdline.contains("disk=1") {
        assert_eq!(disk_field(&dst, "errors").last().copied(), Some(0.0), "QEMU destination disk verifier not clean");
    }
    let m = Mig {
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        pause_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(2)),
        guest_pause_ms: max_guest_gap(&src, &dst, t0 + Duration::from_millis(50), t1 + Duration::from_secs(2)),
        in_flight: f64::NAN,
    };
    drop((src, dst, q, qd_conn));
    let _ = std::fs::remove_dir_all(&d);
    m
}

fn med(v: &[Mig], f: impl Fn(&Mig) -> f64) -> f64 {
    median(v.iter().map(f).collect())
}

fn main() {
    let Some(runs) = bench_runs("disk", 3) else {
        return;
    };
    let d = tmpdir("disk-guest");
    let elf = export_guest(&d);
    let elf = elf.to_str().unwrap();

    let (mut f4, mut f1, mut q) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        // Alternate the order so neither VMM always runs on a warmer machine.
        if i % 2 == 0 {
            f4.push(ferry_throughput(4, i));
            q.push(qemu_throughput(elf, i));
        } else {
            q.push(qemu_throughput(elf, i));
            f4.push(ferry_throughput(4, i));
        }
        f1.push(ferry_throughput(1, i));
    }
    let m = |v: &[(f64, f64)], k: usize| median(v.iter().map(|x| if k == 0 { x.0 } else { x.1 }).collect());
    println!("\nguest disk throughput (4 KiB, QD 8, W+R+R, flush every 16 writes), medians of {runs}:");
    println!("| | MiB/s | IOPS | ratio to QEMU |");
    println!("|---|---|---|---|");
    println!("| Ferry, 4 I/O threads | {:.1} | {:.0} | {:.2} |", m(&f4, 0), m(&f4, 1), m(&f4, 1) / m(&q, 1));
    println!("| Ferry, 1 I/O thread | {:.1} | {:.0} | {:.2} |", m(&f1, 0), m(&f1, 1), m(&f1, 1) / m(&q, 1));
    println!("| QEMU 10 microvm | {:.1} | {:.0} | 1.00 |", m(&q, 0), m(&q, 1));

    println!("\nmigration, 512 MiB guest, 64 MiB dirtied at 20 MiB/s, medians of {runs}:");
    println!(
        "| case | total F/Q ms | ratio | host pause F/Q ms | ratio | guest pause F/Q ms | ratio | in flight at stop |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, cmd) in [("disk idle", IDLE), ("disk I/O at QD 8", BUSY)] {
        let (mut fm, mut qm) = (Vec::new(), Vec::new());
        for i in 0..runs {
            if i % 2 == 0 {
                fm.push(ferry_mig(cmd, i));
                qm.push(qemu_mig(elf, cmd, i));
            } else {
                qm.push(qemu_mig(elf, cmd, i));
                fm.push(ferry_mig(cmd, i));
            }
        }
        let (ft, qt) = (med(&fm, |x| x.total_ms), med(&qm, |x| x.total_ms));
        let (fp, qp) = (med(&fm, |x| x.pause_ms), med(&qm, |x| x.pause_ms));
        let (fg, qg) = (med(&fm, |x| x.guest_pause_ms), med(&qm, |x| x.guest_pause_ms));
        println!(
            "| {name} | {ft:.0}/{qt:.0} | {:.2} | {fp:.1}/{qp:.1} | {:.2} | {fg:.1}/{qg:.1} | {:.2} | {:.0} |",
            ft / qt,
            fp / qp,
            fg / qg,
            med(&fm, |x| x.in_flight)
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
