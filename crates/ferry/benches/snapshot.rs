//! Snapshots of a 1 GiB guest (512 MiB working set dirtied at 20 MiB/s), Ferry against QEMU 10
//! in the same run: Ferry full, live and incremental snapshots and restore by read and by mmap;
//! QEMU `migrate` to `file:` (plain and with the mapped-ram capability) and `-incoming file:`.
//! Medians of FERRY_BENCH_RUNS runs (default 3). Files go to FERRY_BENCH_DIR (default the
//! system temp dir).
//!
//! `cargo bench -p ferry --bench snapshot`

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CMDLINE: &str = "mib=512 rate=20 hb_us=1000 report_ms=500";
const WS_MIB: u64 = 512;

#[derive(Clone, Copy, Default)]
struct Fig {
    total_ms: f64,
    pause_ms: f64,
    mib_on_disk: f64,
}

fn on_disk(p: &Path) -> f64 {
    std::fs::metadata(p).map(|m| m.blocks() as f64 * 512.0 / (1 << 20) as f64).unwrap_or(f64::NAN)
}

fn wait_filled(p: &Proc) {
    p.wait("the guest to fill its working set", Duration::from_secs(180), |l| {
        l.iter().rev().find(|(_, x)| x.starts_with("REPORT ")).and_then(|(_, x)| field(x, "written")).unwrap_or(0)
            >= WS_MIB * 256
    });
}

fn ferry_snapshot(api: &Path, to: &Path, extra: &[&str]) -> Fig {
    let out = Command::new(FERRY)
        .args(["snapshot", "--api-socket", api.to_str().unwrap(), "--to", to.to_str().unwrap(), "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "ferry snapshot failed: {}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Fig {
        total_ms: s["total_ms"].as_f64().unwrap(),
        pause_ms: s["pause_ms"].as_f64().unwrap(),
        mib_on_disk: s["allocated_bytes"].as_f64().unwrap() / (1 << 20) as f64,
    }
}

/// Process start to the restored guest's first heartbeat (ms); the guest must report clean.
fn time_to_hb(exe: &str, args: &[&str]) -> f64 {
    let p = Proc::spawn(exe, args);
    p.wait("the restored guest's first heartbeat", Duration::from_secs(120), |l| {
        l.iter().any(|(_, x)| x.starts_with("HB "))
    });
    let t = (p.first("HB ").unwrap() - p.started).as_secs_f64() * 1000.0;
    p.wait("a REPORT from the restored guest", Duration::from_secs(60), |l| {
        l.iter().any(|(_, x)| x.starts_with("REPORT "))
    });
    assert_eq!(p.last_report_field("errors"), Some(0), "restored guest not clean");
    t
}

fn ferry_round(d: &Path, i: usize) -> Vec<(&'static str, Fig)> {
    let api = d.join(format!("f{i}.sock"));
    let src =
        Proc::spawn(FERRY, &["run", "--memory", "1G", "--cmdline", CMDLINE, "--api-socket", api.to_str().unwrap()]);
    wait_filled(&src);
    let (full, inc, live) = (d.join(format!("full{i}")), d.join(format!("inc{i}")), d.join(format!("live{i}")));
    let f = ferry_snapshot(&api, &full, &[]);
    std::thread::sleep(Duration::from_secs(1));
    let n = ferry_snapshot(&api, &inc, &["--incremental-from", full.to_str().unwrap()]);
    let l = ferry_snapshot(&api, &live, &["--live"]);
    drop(src);
    let read = time_to_hb(FERRY, &["run", "--restore", full.to_str().unwrap()]);
    let mmap = time_to_hb(FERRY, &["run", "--restore", full.to_str().unwrap(), "--restore-mode", "mmap"]);
    let chain = time_to_hb(FERRY, &["run", "--restore", inc.to_str().unwrap()]);
    for p in [&full, &inc, &live] {
        let _ = std::fs::remove_file(p);
    }
    let r = |ms: f64| Fig { total_ms: ms, pause_ms: f64::NAN, mib_on_disk: f64::NAN };
    vec![
        ("snapshot full (paused)", f),
        ("snapshot live", l),
        ("snapshot incremental (1 s)", n),
        ("restore full, read", r(read)),
        ("restore full, mmap", r(mmap)),
        ("restore full+incremental, read", r(chain)),
    ]
}

fn qemu_round(d: &Path, i: usize, elf: &str) -> Vec<(&'static str, Fig)> {
    let mut out = Vec::new();
    for (name, rname, mapped) in [
        ("snapshot (migrate to file:)", "restore (-incoming file:)", false),
        ("snapshot (file:, mapped-ram)", "restore (file:, mapped-ram)", true),
    ] {
        let qs = d.join(format!("q{i}{mapped}.sock"));
        let file = d.join(format!("q{i}{mapped}.img"));
        let mut a = qemu_args(elf, "1G", "1", CMDLINE);
        let qmp = format!("unix:{},server=on,wait=off", qs.display());
        a.extend(["-qmp", &qmp]);
        let src = Proc::spawn("qemu-system-x86_64", &a);
        wait_filled(&src);
        let mut q = Qmp::connect(&qs);
        if mapped {
            q.cmd(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"mapped-ram","state":true}]}}"#);
        }
        q.cmd(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":107374182400}}"#);
        let t0 = Instant::now();
        q.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"file:{}"}}}}"#, file.display()));
        let info = q.wait_migrated("QEMU migrate to file", Duration::from_millis(5));
        let _ = t0;
        out.push((
            name,
            Fig {
                total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
                pause_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
                mib_on_disk: on_disk(&file),
            },
        ));
        drop(src);
        let incoming = format!("file:{}", file.display());
        let mut b = qemu_args(elf, "1G", "1", CMDLINE);
        let qd = d.join(format!("qd{i}{mapped}.sock"));
        let qmpd = format!("unix:{},server=on,wait=off", qd.display());
        b.extend(["-qmp", &qmpd, "-incoming", if mapped { "defer" } else { &incoming }]);
        let t = if mapped {
            // mapped-ram must be set on the destination too before the incoming migration.
            let p = Proc::spawn("qemu-system-x86_64", &b);
            let mut qd = Qmp::connect(&qd);
            qd.cmd(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"mapped-ram","state":true}]}}"#);
            qd.cmd(&format!(r#"{{"execute":"migrate-incoming","arguments":{{"uri":"{incoming}"}}}}"#));
            loop {
                let v = qd.cmd(r#"{"execute":"query-status"}"#);
                if v["status"] == "paused" || v["status"] == "postmigrate" {
                    let m = qd.cmd(r#"{"execute":"query-migrate"}"#);
                    if m["status"] == "completed" {
                        qd.cmd(r#"{"execute":"cont"}"#);
                    }
                }
                if v["status"] == "running" {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            p.wait("the restored guest's first heartbeat", Duration::from_secs(120), |l| {
                l.iter().any(|(_, x)| x.starts_with("HB "))
            });
            (p.first("HB ").unwrap() - p.started).as_secs_f64() * 1000.0
        } else {
            let p = Proc::spawn("qemu-system-x86_64", &b);
            let mut qd = Qmp::connect(&qd);
            loop {
                let v = qd.cmd(r#"{"execute":"query-status"}"#);
                if v["status"] == "running" {
                    break;
                }
                if v["status"] == "paused" && qd.cmd(r#"{"execute":"query-migrate"}"#)["status"] == "completed" {
                    qd.cmd(r#"{"execute":"cont"}"#);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            p.wait("the restored guest's first heartbeat", Duration::from_secs(120), |l| {
                l.iter().any(|(_, x)| x.starts_with("HB "))
            });
            (p.first("HB ").unwrap() - p.started).as_secs_f64() * 1000.0
        };
        out.push((rname, Fig { total_ms: t, pause_ms: f64::NAN, mib_on_disk: f64::NAN }));
        let _ = std::fs::remove_file(&file);
    }
    out
}

fn main() {
    let Some(runs) = bench_runs("snapshot", 3) else {
        return;
    };
    let base = std::env::var("FERRY_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    let d = base.join(format!("ferry-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let elf = export_guest(&d);
    let mut rows: Vec<(&'static str, Vec<Fig>)> = Vec::new();
    for i in 0..runs {
        // Alternate which VMM goes first: the first to write or allocate a GiB on this host pays
        // for the host's own first touch of that memory.
        let (f, q) = if i % 2 == 0 {
            let f = ferry_round(&d, i);
            (f, qemu_round(&d, i, elf.to_str().unwrap()))
        } else {
            let q = qemu_round(&d, i, elf.to_str().unwrap());
            (ferry_round(&d, i), q)
        };
        for (name, f) in f.into_iter().chain(q) {
            match rows.iter_mut().find(|r| r.0 == name) {
                Some(r) => r.1.push(f),
                None => rows.push((name, vec![f])),
            }
        }
    }
    println!(
        "Snapshots of a 1 GiB guest ({WS_MIB} MiB working set, 20 MiB/s dirtying), medians of {runs}, files in {}",
        base.display()
    );
    println!("{:<34} {:>10} {:>12} {:>12}", "", "total ms", "paused ms", "MiB on disk");
    for (name, v) in &rows {
        let m = |g: fn(&Fig) -> f64| median(v.iter().map(g).filter(|x| !x.is_nan()).collect());
        let fmt = |x: f64, p: usize| if x.is_nan() { "-".to_string() } else { format!("{x:.p$}") };
        println!(
            "{:<34} {:>10} {:>12} {:>12}",
            name,
            fmt(m(|f| f.total_ms), 1),
            fmt(m(|f| f.pause_ms), 1),
            fmt(m(|f| f.mib_on_disk), 1)
        );
    }
    println!("restore rows: process start to the restored guest's first heartbeat (guest then checked clean)");
    println!(
        "QEMU rows: total-time and downtime from query-migrate; QEMU pauses the guest at the end of migrate to file"
    );
    let _ = std::fs::remove_dir_all(&d);
}
