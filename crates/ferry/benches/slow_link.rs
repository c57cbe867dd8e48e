//! A guest that dirties faster than its link carries, Ferry against QEMU 10, in one run.
//!
//! `cargo bench -p ferry --bench slow_link` migrates a 1 GiB guest dirtying 256 MiB flat out
//! over a real 32 MiB/s link (two network namespaces joined by a veth pair, `tbf rate 256mbit`
//! on each side), FERRY_BENCH_RUNS times (default 1: QEMU's auto-converge alone takes over a
//! minute here), five ways:
//! - Ferry with its defaults (auto-converge: the whole machine throttled once pre-copy stalls);
//! - Ferry `--dirty-limit 4` (the machine on the dirty ring; each vCPU held to 4 MiB/s once
//!   pre-copy stalls);
//! - Ferry `--postcopy auto` (post-copy once pre-copy is seen not to converge);
//! - QEMU with the auto-converge capability;
//! - QEMU with the dirty-limit capability (`vcpu-dirty-limit` 4, its dirty ring 65536 entries).
//!
//! Printed, medians: whether and in how long it converged (QEMU's rows give up after
//! [`QEMU_LIMIT`]), the passes (QEMU: its dirty syncs), the largest gap the guest's heartbeat
//! showed (between `HB` lines as received, source then destination, from the start to 2 s after
//! the end: what the throttle, the holds and the pause cost the guest at worst), and the
//! destination guest's verifier errors. Needs root and iproute2; says SKIPPED otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CMDLINE: &str = "mib=256 rate=0 hb_us=1000 report_ms=200";
const WS_MIB: u64 = 256;
const NS: [&str; 2] = ["ferry-bsl-src", "ferry-bsl-dst"];
const DEV: [&str; 2] = ["ferry-bsl-a", "ferry-bsl-b"];
const NET: &str = "10.75.0";
const DST_IP: &str = "10.75.0.2";
/// Per-vCPU dirty limit of the dirty-limit rows, MiB/s.
const LIMIT: &str = "4";
/// How long a QEMU migration may take before this bench cancels it.
const QEMU_LIMIT: Duration = Duration::from_secs(150);

#[derive(Clone, Copy)]
struct Run {
    converged: bool,
    total_s: f64,
    passes: f64,
    pause_ms: f64,
    errors: f64,
}

fn wait_filled(p: &Proc) {
    p.wait("the guest to fill its working set", Duration::from_secs(180), |l| {
        l.iter().rev().find(|(_, x)| x.starts_with("REPORT ")).and_then(|(_, x)| field(x, "written")).unwrap_or(0)
            >= WS_MIB * 256
    });
    std::thread::sleep(Duration::from_millis(1000));
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    FerryAutoConverge,
    FerryDirtyLimit,
    FerryPostcopyAuto,
    QemuAutoConverge,
    QemuDirtyLimit,
}

impl Way {
    fn name(self) -> String {
        match self {
            Way::FerryAutoConverge => "Ferry (auto-converge)".into(),
            Way::FerryDirtyLimit => format!("Ferry --dirty-limit {LIMIT}"),
            Way::FerryPostcopyAuto => "Ferry --postcopy auto".into(),
            Way::QemuAutoConverge => "QEMU auto-converge".into(),
            Way::QemuDirtyLimit => format!("QEMU dirty-limit {LIMIT}"),
        }
    }
}

fn ferry_run(link: &TbfNamespaces, i: usize, way: Way) -> Run {
    wait_quiet();
    let d = tmpdir(&format!("bsl-ferry-{i}-{}", way as u8));
    let api = d.join("api.sock");
    let tracking = if way == Way::FerryDirtyLimit { "ring" } else { "bitmap" };
    let src = link.spawn(
        0,
        FERRY,
        &[
            "run",
            "--memory",
            "1G",
            "--dirty-tracking",
            tracking,
            "--cmdline",
            CMDLINE,
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    wait_filled(&src);
    let uri = format!("tcp:{DST_IP}:7811");
    let dst = link.spawn(1, FERRY, &["run", "--memory", "1G", "--dirty-tracking", tracking, "--incoming", &uri]);
    std::thread::sleep(Duration::from_millis(500));
    let mut args = vec!["migrate", "--api-socket", api.to_str().unwrap(), "--to", &uri, "--json", "--insecure"];
    match way {
        Way::FerryDirtyLimit => args.extend(["--dirty-limit", LIMIT]),
        Way::FerryPostcopyAuto => args.extend(["--postcopy", "auto"]),
        _ => {}
    }
    let t0 = Instant::now();
    let out = Command::new(FERRY).args(&args).output().unwrap();
    let t1 = Instant::now();
    assert!(out.status.success(), "ferry migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    Run {
        converged: true,
        total_s: (t1 - t0).as_secs_f64(),
        passes: s["iterations"].as_array().map_or(f64::NAN, |a| a.len() as f64),
        pause_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(2)),
        errors: dst.last_report_field("errors").map_or(f64::NAN, |e| e as f64),
    }
}

fn qemu_run(link: &TbfNamespaces, i: usize, way: Way, elf: &str) -> Run {
    wait_quiet();
    let d = tmpdir(&format!("bsl-qemu-{i}-{}", way as u8));
    let (qs, qd) = (d.join("qmp-src.sock"), d.join("qmp-dst.sock"));
    let uri = format!("tcp:{DST_IP}:7812");
    let qmp_src = format!("unix:{},server=on,wait=off", qs.display());
    let qmp_dst = format!("unix:{},server=on,wait=off", qd.display());
    let ring = way == Way::QemuDirtyLimit;
    let with_accel = |mut a: Vec<&'static str>| -> Vec<String> {
        if ring {
            let k = a.iter().position(|x| *x == "kvm").unwrap();
            a[k] = "kvm,dirty-ring-size=65536";
        }
        a.into_iter().map(String::from).collect()
    };
    let elf: &'static str = Box::leak(elf.to_string().into_boxed_str());
    let mut a = with_accel(qemu_args(elf, "1G", "1", CMDLINE));
    a.extend(["-qmp".into(), qmp_src]);
    let src = link.spawn(0, "qemu-system-x86_64", &a.iter().map(String::as_str).collect::<Vec<_>>());
    wait_filled(&src);
    let mut b = with_accel(qemu_args(elf, "1G", "1", CMDLINE));
    b.extend(["-qmp".into(), qmp_dst, "-incoming".into(), "defer".into()]);
    let dst = link.spawn(1, "qemu-system-x86_64", &b.iter().map(String::as_str).collect::<Vec<_>>());
    let mut qdc = Qmp::connect(&qd);
    let mut q = Qmp::connect(&qs);
    qdc.cmd(&format!(r#"{{"execute":"migrate-incoming","arguments":{{"uri":"{uri}"}}}}"#));
    let cap = if ring { "dirty-limit" } else { "auto-converge" };
    q.cmd(&format!(
        r#"{{"execute":"migrate-set-capabilities","arguments":{{"capabilities":[{{"capability":"{cap}","state":true}}]}}}}"#
    ));
    q.cmd(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":107374182400,"downtime-limit":300}}"#);
    if ring {
        q.cmd(&format!(r#"{{"execute":"migrate-set-parameters","arguments":{{"vcpu-dirty-limit":{LIMIT}}}}}"#));
    }
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    q.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"{uri}"}}}}"#));
    let (mut info, mut done) = (serde_json::Value::Null, false);
    while t0.elapsed() < QEMU_LIMIT {
        info = q.cmd(r#"{"execute":"query-migrate"}"#);
        match info["status"].as_str() {
            Some("completed") => {
                done = true;
                break;
            }
            Some("failed") | Some("cancelled") => break,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let t1 = Instant::now();
    if !done {
        println!("({} {i}: not converged after {:.0} s: {})", way.name(), t0.elapsed().as_secs_f64(), info["status"]);
        q.cmd(r#"{"execute":"migrate_cancel"}"#);
        return Run {
            converged: false,
            total_s: t0.elapsed().as_secs_f64(),
            passes: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
            pause_ms: f64::NAN,
            errors: f64::NAN,
        };
    }
    std::thread::sleep(Duration::from_secs(3));
    Run {
        converged: true,
        total_s: (t1 - t0).as_secs_f64(),
        passes: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
        pause_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(2)),
        errors: dst.last_report_field("errors").map_or(f64::NAN, |e| e as f64),
    }
}

fn main() {
    let Some(runs) = bench_runs("slow_link", 1) else {
        return;
    };
    let Some(link) = TbfNamespaces::create(NS, DEV, NET, "256mbit", "64kb") else {
        println!("SKIPPED slow_link: cannot create network namespaces with a tbf veth pair (needs root, ip, tc)");
        return;
    };
    let d = tmpdir("bsl-guest");
    let elf = export_guest(&d);
    let elf = elf.to_str().unwrap();
    let ways = [
        Way::FerryAutoConverge,
        Way::FerryDirtyLimit,
        Way::FerryPostcopyAuto,
        Way::QemuAutoConverge,
        Way::QemuDirtyLimit,
    ];
    let mut rows: Vec<Vec<Run>> = vec![Vec::new(); ways.len()];
    for i in 0..runs {
        for (k, &w) in ways.iter().enumerate() {
            rows[k].push(match w {
                Way::QemuAutoConverge | Way::QemuDirtyLimit => qemu_run(&link, i, w, elf),
                _ => ferry_run(&link, i, w),
            });
        }
    }
    println!("A 1 GiB guest dirtying 256 MiB flat out over a real 32 MiB/s link (tbf); medians of {runs} runs");
    println!(
        "  {:<24} | {:>9} {:>8} {:>7} | {:>10} {:>7} | {:>12}",
        "", "converged", "total s", "passes", "max gap ms", "errors", "total / QEMU"
    );
    let m = |v: &[Run], g: fn(&Run) -> f64| median(v.iter().map(g).collect());
    // Against QEMU's auto-converge (its way for such a guest without a dirty ring).
    let qemu = m(&rows[3], |r| r.total_s);
    for (k, w) in ways.iter().enumerate() {
        let v = &rows[k];
        let conv = v.iter().filter(|r| r.converged).count();
        println!(
            "  {:<24} | {:>9} {:>8.1} {:>7.0} | {:>10.1} {:>7.0} | {:>12.2}",
            w.name(),
            format!("{conv}/{}", v.len()),
            m(v, |r| r.total_s),
            m(v, |r| r.passes),
            m(v, |r| r.pause_ms),
            m(v, |r| r.errors),
            m(v, |r| r.total_s) / qemu
        );
    }
    println!(
        "total / QEMU: against QEMU auto-converge's total (a row that did not converge counts the time it was given);"
    );
    println!("passes: Ferry's pre-copy passes, QEMU's dirty syncs; max gap: the largest gap between HB lines as");
    println!("received, from the migration's start to 2 s after its end (throttling, holds and the pause).");
}
