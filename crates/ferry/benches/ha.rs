//! Replication (docs/ha.md): what protecting a guest costs it, against the same guest
//! unreplicated in the same run, and how fast a backup takes over.
//!
//! `cargo bench -p ferry --bench ha` prints, for no replication and for 100, 25 and 10 ms epochs
//! (medians over FERRY_BENCH_RUNS runs, default 1): the guest's memory verify throughput (pages
//! read back and checked per second, its own REPORT figures) and disk IOPS (4 KiB at queue depth
//! 8, uncapped), each as a ratio to the unreplicated guest; epochs per second; the pause per
//! epoch p50/p99 and bytes per epoch (the primary's figures); and the failover time: from
//! `kill -9` of the primary to the backup's first `HB` line, host-seen.
//!
//! Goals (issue 19): at 25 ms (Remus's 40 epochs/s) ≥ 70 % of the unreplicated verify
//! throughput, epoch pause p99 ≤ 3 ms, failover ≤ 300 ms.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The issue's scenario: 20 MiB/s of memory writes, 4 MiB/s of disk I/O.
const STEADY: &str = "mib=64 rate=20 hb_us=1000 report_ms=500 disk=1 disk_qd=8 disk_mib=16 disk_rate=4";
/// Disk I/O as fast as it goes (4 KiB at queue depth 8): the disk's share of each epoch.
const DISK_BOUND: &str = "mib=64 rate=20 hb_us=1000 report_ms=500 disk=1 disk_qd=8 disk_mib=16";

#[derive(Default, Clone, Copy)]
struct Row {
    verify_pages_s: f64,
    iops: f64,
    epochs_s: f64,
    pause_p50: f64,
    pause_p99: f64,
    kib_per_epoch: f64,
    failover_ms: f64,
    disk_pause_ms: f64,
}

fn image(dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(64 << 20).unwrap();
    p.to_str().unwrap().to_string()
}

/// (t_ms, verified, disk iops) of each REPORT so far.
fn reports(p: &Proc) -> Vec<(u64, u64, u64)> {
    p.lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, l)| l.starts_with("REPORT "))
        .filter_map(|(_, l)| {
            let d = &l[l.find(" DISK ")?..];
            Some((field(l, "t_ms")?, field(l, "verified")?, field(d, "iops")?))
        })
        .collect()
}

/// Verify pages/s and median IOPS over the REPORTs of the next `secs` seconds.
fn measure(p: &Proc, secs: u64) -> (f64, f64) {
    let before = reports(p).len();
    std::thread::sleep(Duration::from_secs(secs));
    let r = reports(p);
    let w = &r[before.saturating_sub(1)..];
    let (first, last) = (w.first().unwrap(), w.last().unwrap());
    let rate = (last.1 - first.1) as f64 / ((last.0 - first.0).max(1) as f64 / 1000.0);
    (rate, median(w.iter().skip(1).map(|x| x.2 as f64).collect()))
}

fn api_json(sock: &Path, req: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let c = std::os::unix::net::UnixStream::connect(sock).unwrap();
    writeln!(&c, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// One run: `workload` unreplicated (`interval_ms` None) or replicated at that interval, the
/// backup at normal priority or (`backup_idle`) in the idle scheduling class, as a stand-in for
/// a backup on another host (on this 2-CPU host it otherwise takes CPU from the guest).
fn run(workload: &str, interval_ms: Option<u64>, backup_idle: bool, dirty_log_only: bool) -> Row {
    wait_quiet();
    let dir = tmpdir("bench-ha");
    let api = dir.join("p.sock");
    let prim = Proc::spawn(
        FERRY,
        &[
            "run",
            "--memory",
            "256M",
            "--cmdline",
            workload,
            "--disk",
            &image(&dir, "p.img"),
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    prim.wait("the guest's reports", Duration::from_secs(60), |l| {
        l.iter().filter(|(_, x)| x.starts_with("REPORT ")).count() >= 4
    });
    let Some(ms) = interval_ms else {
        // Measured at the same guest age as the replicated runs (their set-up takes ~2 s).
        std::thread::sleep(Duration::from_secs(2));
        // The dirty log alone (a dirty-rate measurement over the window): what tracking writes
        // costs the guest on this host, replication or not.
        let monitor = dirty_log_only.then(|| {
            Command::new(FERRY)
                .args(["dirty-rate", "--api-socket", api.to_str().unwrap(), "--window-ms", "6000"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        });
        let (v, iops) = measure(&prim, 5);
        if let Some(mut m) = monitor {
            let _ = m.wait();
        }
        let _ = std::fs::remove_dir_all(&dir);
        return Row { verify_pages_s: v, iops, ..Default::default() };
    };
    let uri = format!("unix:{}", dir.join("ha.sock").display());
    let bimg = image(&dir, "b.img");
    let standby = ["run", "--incoming", &uri, "--standby", "--disk", &bimg];
    let back = if backup_idle {
        let mut args = vec!["--idle", "0", FERRY];
        args.extend_from_slice(&standby);
        Proc::spawn("chrt", &args)
    } else {
        Proc::spawn(FERRY, &standby)
    };
    let sock = dir.join("ha.sock");
    let end = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new(FERRY)
        .args(["replicate", "--api-socket", api.to_str().unwrap(), "--to", &uri, "--interval-ms", &ms.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "replicate: {}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_secs(1));
    let (v, iops) = measure(&prim, 5);
    let r = api_json(&api, r#"{"cmd":"status"}"#)["replication"].clone();
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let mut prim = prim;
    let t_kill = Instant::now();
    let _ = prim.child.kill();
    back.wait("the backup's first HB", Duration::from_secs(10), |l| {
        l.iter().any(|(t, x)| x.starts_with("HB ") && *t > t_kill)
    });
    let first = back.lines.lock().unwrap().iter().find(|(t, x)| x.starts_with("HB ") && *t > t_kill).unwrap().0;
    let _ = std::fs::remove_dir_all(&dir);
    Row {
        verify_pages_s: v,
        iops,
        epochs_s: f("epochs_per_s"),
        pause_p50: f("pause_ms_p50"),
        pause_p99: f("pause_ms_p99"),
        kib_per_epoch: f("bytes_per_epoch") / 1024.0,
        failover_ms: (first - t_kill).as_secs_f64() * 1000.0,
        disk_pause_ms: r["pause_breakdown_ms"]["disk"].as_f64().unwrap_or(f64::NAN),
    }
}

fn main() {
    let Some(runs) = bench_runs("ha", 1) else { return };
    for (name, workload) in [("steady", STEADY), ("disk-bound", DISK_BOUND)] {
        let configs: [(&str, Option<u64>, bool, bool); 6] = [
            ("none", None, false, false),
            ("none, dirty log on", None, false, true),
            ("100 ms", Some(100), false, false),
            ("25 ms", Some(25), false, false),
            ("25 ms, backup idle-class", Some(25), true, false),
            ("10 ms", Some(10), false, false),
        ];
        let mut rows: Vec<Vec<Row>> = vec![Vec::new(); configs.len()];
        for _ in 0..runs {
            for (i, (_, ms, idle, log)) in configs.iter().enumerate() {
                rows[i].push(run(workload, *ms, *idle, *log));
            }
        }
        let med = |i: usize, f: fn(&Row) -> f64| median(rows[i].iter().map(f).collect());
        let base_v = med(0, |r| r.verify_pages_s);
        let base_iops = med(0, |r| r.iops);
        println!("\nReplication, {name} guest ({runs} run(s) each, medians; 256 MiB, {workload})");
        println!(
            "| epochs | verify pages/s | vs none | disk IOPS | vs none | epochs/s | pause p50 ms | pause p99 ms | of which disk ms (mean) | KiB/epoch | failover ms |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for (i, (label, ms, _, _)) in configs.iter().enumerate() {
            let v = med(i, |r| r.verify_pages_s);
            let iops = med(i, |r| r.iops);
            if ms.is_none() {
                println!("| {label} | {v:.0} | {:.2} | {iops:.0} | {:.2} | | | | | | |", v / base_v, iops / base_iops);
                continue;
            }
            println!(
                "| {label} | {v:.0} | {:.2} | {iops:.0} | {:.2} | {:.1} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |",
                v / base_v,
                iops / base_iops,
                med(i, |r| r.epochs_s),
                med(i, |r| r.pause_p50),
                med(i, |r| r.pause_p99),
                med(i, |r| r.disk_pause_ms),
                med(i, |r| r.kib_per_epoch),
                med(i, |r| r.failover_ms),
            );
        }
    }
}
