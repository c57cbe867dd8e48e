//! Live update: the guest's pause against its size, Ferry's two modes, a Ferry migration to a
//! local process, and QEMU 10's cpr-transfer, on the same built-in guest in one run.
//!
//! `cargo bench -p ferry --bench update` runs, for 1, 4 and 16 GiB guests (FERRY_BENCH_SIZES,
//! e.g. `1G,4G`), FERRY_BENCH_RUNS times (default 3):
//! - `ferry update` in exec mode (same PID: the guest parked in a process of the old binary for
//!   the exec, then pulled back, each step prepared ahead), the same in a single step (the exec
//!   inside the pause, as a new binary without parking takes it: FERRY_UPDATE_SINGLE_EXEC=1 in
//!   the running Ferry), and in process mode (a new process prepared first);
//! - `ferry migrate` to a new Ferry on this host over a UNIX socket (pre-copy: page data moves);
//! - QEMU cpr-transfer: guest RAM in a shared memfd (`memory-backend-memfd,share=on`,
//!   `aux-ram-share=on`), a new QEMU started with a `cpr` and a `main` incoming channel, then
//!   `migrate` in mode `cpr-transfer` (RAM stays in place; the new QEMU gets its descriptors).
//!
//! The guest dirties 64 MiB at 50 MiB/s with a heartbeat every millisecond. Printed, medians:
//! the host-seen pause (largest gap between `HB` lines as this harness received them, old
//! process then new, from 200 ms before the command to 1 s after it ended), the VMM's own pause
//! figure (Ferry: `pause_ms` of the update summary or `downtime_ms` of the migration; QEMU:
//! `downtime` of query-migrate), the state that crossed, and the time the command took.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CMDLINE: &str = "mib=64 rate=50 hb_us=1000 report_ms=200";
const WS_MIB: u64 = 64;

#[derive(Clone, Copy)]
struct Run {
    /// Host-seen pause (ms).
    gap_ms: f64,
    /// The VMM's own figure (ms).
    own_ms: f64,
    /// Bytes that crossed between the two processes.
    bytes: f64,
    /// The command, start to end (ms).
    total_ms: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Exec,
    ExecSingle,
    Process,
    Migrate,
    CprTransfer,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Exec => "ferry update (exec)",
            Way::ExecSingle => "ferry update (exec, 1 step)",
            Way::Process => "ferry update (process)",
            Way::Migrate => "ferry migrate, local",
            Way::CprTransfer => "QEMU cpr-transfer",
        }
    }
}

fn wait_filled(p: &Proc) {
    p.wait("the guest to fill its working set", Duration::from_secs(120), |l| {
        l.iter().rev().find(|(_, x)| x.starts_with("REPORT ")).and_then(|(_, x)| field(x, "written")).unwrap_or(0)
            >= WS_MIB * 256
    });
    std::thread::sleep(Duration::from_millis(1000));
}

fn clean(p: &Proc, what: &str) {
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(p.last_report_field("errors"), Some(0), "{what}: the guest is not clean");
}

fn ferry_run(i: usize, mem: &str, way: Way) -> Run {
    wait_quiet();
    let d = tmpdir(&format!("update-{i}-{mem}-{}", way as u8));
    let api = d.join("api.sock");
    // Read by the running Ferry when it updates (the bench is single-threaded here).
    if way == Way::ExecSingle {
        std::env::set_var("FERRY_UPDATE_SINGLE_EXEC", "1");
    }
    let src =
        Proc::spawn(FERRY, &["run", "--memory", mem, "--cmdline", CMDLINE, "--api-socket", api.to_str().unwrap()]);
    std::env::remove_var("FERRY_UPDATE_SINGLE_EXEC");
    wait_filled(&src);
    if way == Way::Migrate {
        let (dst, t0, t1, s) = ferry_migrate(&api, &d, &[]);
        clean(&dst, "ferry migrate");
        return Run {
            gap_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(1)),
            own_ms: s["downtime_ms"].as_f64().unwrap_or(f64::NAN),
            bytes: s["bytes"].as_f64().or_else(|| s["bytes_sent"].as_f64()).unwrap_or(f64::NAN),
            total_ms: (t1 - t0).as_secs_f64() * 1000.0,
        };
    }
    let mode = if way == Way::Process { "process" } else { "exec" };
    let t0 = Instant::now();
    let out = Command::new(FERRY)
        .args(["update", "--api-socket", api.to_str().unwrap(), "--mode", mode, "--json"])
        .output()
        .unwrap();
    let t1 = Instant::now();
    assert!(out.status.success(), "ferry update failed: {}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Both modes keep writing serial output to the same stdout (inherited).
    clean(&src, "ferry update");
    let r = Run {
        gap_ms: max_hb_gap(&src, &src, t0 - Duration::from_millis(200), t1 + Duration::from_secs(1)),
        own_ms: s["pause_ms"].as_f64().unwrap_or(f64::NAN),
        bytes: s["handover_bytes"].as_f64().unwrap_or(f64::NAN),
        total_ms: (t1 - t0).as_secs_f64() * 1000.0,
    };
    if way == Way::Process {
        // The new process is not this harness's child: stop it through its API.
        let _ = Command::new(FERRY).args(["api", "--api-socket", api.to_str().unwrap(), "quit"]).output();
    }
    r
}

fn qemu_run(i: usize, mem: &str, elf: &str) -> Run {
    wait_quiet();
    let d = tmpdir(&format!("update-qemu-{i}-{mem}"));
    let qs = d.join("qmp-src.sock");
    let mig = d.join("mig.sock");
    let cpr = d.join("cpr.sock");
    let qmp_src = format!("unix:{},server=on,wait=off", qs.display());
    let backend = format!("memory-backend-memfd,id=ram0,size={mem},share=on");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = qemu_args(elf, mem, "1", CMDLINE).into_iter().map(String::from).collect();
        let m = a.iter().position(|x| x == "-M").unwrap();
        a[m + 1] = "microvm,memory-backend=ram0,aux-ram-share=on".into();
        a.extend(["-object".into(), backend.clone()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let a = args(&["-qmp", &qmp_src]);
    let src = Proc::spawn("qemu-system-x86_64", &a.iter().map(String::as_str).collect::<Vec<_>>());
    wait_filled(&src);
    let ch = |ty: &str, p: &std::path::Path| {
        format!(r#"{{"channel-type":"{ty}","addr":{{"transport":"socket","type":"unix","path":"{}"}}}}"#, p.display())
    };
    let (main_ch, cpr_ch) = (ch("main", &mig), ch("cpr", &cpr));
    // The new QEMU, prepared first: it waits on the cpr channel for the old one's descriptors.
    let b = args(&["-incoming", &main_ch, "-incoming", &cpr_ch]);
    let dst = Proc::spawn("qemu-system-x86_64", &b.iter().map(String::as_str).collect::<Vec<_>>());
    let end = Instant::now() + Duration::from_secs(20);
    while !cpr.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut q = Qmp::connect(&qs);
    q.cmd(r#"{"execute":"migrate-set-parameters","arguments":{"mode":"cpr-transfer"}}"#);
    let t0 = Instant::now();
    q.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"channels":[{main_ch},{cpr_ch}]}}}}"#));
    let info = q.wait_migrated("QEMU cpr-transfer", Duration::from_millis(2));
    let t1 = Instant::now();
    clean(&dst, "QEMU cpr-transfer");
    Run {
        gap_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(1)),
        own_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        bytes: info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN),
        total_ms: (t1 - t0).as_secs_f64() * 1000.0,
    }
}

fn main() {
    let Some(runs) = bench_runs("update", 3) else {
        return;
    };
    let sizes: Vec<String> = std::env::var("FERRY_BENCH_SIZES")
        .unwrap_or_else(|_| "1G,4G,16G".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let d = tmpdir("update-guest");
    let elf = export_guest(&d);
    let elf = elf.to_str().unwrap();
    let ways = [Way::Exec, Way::ExecSingle, Way::Process, Way::Migrate, Way::CprTransfer];
    let mut table: Vec<(String, Way, Vec<Run>)> = Vec::new();
    for mem in &sizes {
        for &w in &ways {
            table.push((mem.clone(), w, Vec::new()));
        }
    }
    for i in 0..runs {
        for (mem, w, v) in table.iter_mut() {
            v.push(match w {
                Way::CprTransfer => qemu_run(i, mem, elf),
                _ => ferry_run(i, mem, *w),
            });
        }
    }
    println!("Live update of a guest dirtying 64 MiB at 50 MiB/s, medians of {runs} runs");
    println!(
        "{:<6} {:<28} | {:>12} {:>12} | {:>12} {:>10} | {:>13}",
        "guest", "", "host pause ms", "own pause ms", "bytes moved", "total ms", "pause / QEMU"
    );
    let m = |v: &[Run], g: fn(&Run) -> f64| median(v.iter().map(g).collect());
    for mem in &sizes {
        let qemu =
            table.iter().find(|(s, w, _)| s == mem && *w == Way::CprTransfer).map(|(_, _, v)| m(v, |r| r.gap_ms));
        for (_, w, v) in table.iter().filter(|(s, _, _)| s == mem) {
            let gap = m(v, |r| r.gap_ms);
            println!(
                "{:<6} {:<28} | {:>12.1} {:>12.1} | {:>12.0} {:>10.0} | {:>13.2}",
                mem,
                w.name(),
                gap,
                m(v, |r| r.own_ms),
                m(v, |r| r.bytes),
                m(v, |r| r.total_ms),
                qemu.map_or(f64::NAN, |q| gap / q)
            );
        }
    }
    println!("host pause = largest gap between HB lines as received (old process, then new); own pause = the");
    println!("VMM's figure (Ferry: update pause_ms / migrate downtime_ms; QEMU: query-migrate downtime);");
    println!("bytes moved = Ferry: handover_bytes / bytes sent; QEMU: ram.transferred (state only).");
}
