//! Post-copy, Ferry against QEMU 10, on the same built-in guest in one run.
//!
//! `cargo bench -p ferry --bench postcopy` migrates a 1 GiB guest dirtying 256 MiB flat out
//! over a UNIX socket, FERRY_BENCH_RUNS times (default 3), three ways: Ferry pre-copy (its
//! defaults), Ferry `--postcopy` (switch after the first pass), QEMU with `postcopy-ram` and
//! `migrate-start-postcopy` once its first pass is done. Printed, medians: total time, the
//! host-seen pause (largest gap between `HB` lines, source then destination), the VMM's own
//! downtime figure, the post-copy phase's length, the destination's fault latency (Ferry: fault
//! to page in place, p50/p99/max; QEMU: its `postcopy-latency` average where it reports one),
//! and the guest's own write rate during the post-copy phase over its rate before the
//! migration (`rate_mib_s` of its REPORT lines).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CMDLINE: &str = "mib=256 rate=0 hb_us=1000 report_ms=200";
const WS_MIB: u64 = 256;

#[derive(Default, Clone, Copy)]
struct Run {
    total_ms: f64,
    pause_ms: f64,
    down_ms: f64,
    post_ms: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Guest write rate during post-copy over its rate before the migration.
    rate_ratio: f64,
}

fn wait_filled(p: &Proc) {
    p.wait("the guest to fill its working set", Duration::from_secs(180), |l| {
        l.iter().rev().find(|(_, x)| x.starts_with("REPORT ")).and_then(|(_, x)| field(x, "written")).unwrap_or(0)
            >= WS_MIB * 256
    });
    std::thread::sleep(Duration::from_millis(1500));
}

/// Mean `rate_mib_s` of `p`'s REPORT lines received in `[from, to]`.
fn rate(p: &Proc, from: Instant, to: Instant) -> f64 {
    let l = p.lines.lock().unwrap();
    let v: Vec<f64> = l
        .iter()
        .filter(|(t, x)| *t >= from && *t <= to && x.starts_with("REPORT "))
        .filter_map(|(_, x)| x.split_whitespace().find_map(|kv| kv.strip_prefix("rate_mib_s=")?.parse().ok()))
        .collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn ferry_run(i: usize, postcopy: bool) -> Run {
    wait_quiet();
    let d = tmpdir(&format!("pc-ferry-{i}-{postcopy}"));
    let api = d.join("api.sock");
    let src =
        Proc::spawn(FERRY, &["run", "--memory", "1G", "--cmdline", CMDLINE, "--api-socket", api.to_str().unwrap()]);
    wait_filled(&src);
    let sock = d.join("mig.sock");
    let mig = format!("unix:{}", sock.display());
    let dst = Proc::spawn(FERRY, &["run", "--incoming", &mig]);
    let end = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = Instant::now();
    let mut args = vec!["migrate", "--api-socket", api.to_str().unwrap(), "--to", &mig, "--json"];
    if postcopy {
        args.push("--postcopy");
    }
    let out = Command::new(FERRY).args(&args).output().unwrap();
    let t1 = Instant::now();
    assert!(out.status.success(), "ferry migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(dst.last_report_field("errors"), Some(0), "destination guest not clean");
    let pc = &s["postcopy"];
    let post_ms = pc["duration_ms"].as_f64().unwrap_or(0.0);
    let before = rate(&src, t0 - Duration::from_millis(1500), t0);
    let during = rate(&dst, t1 - Duration::from_secs_f64(post_ms / 1000.0), t1);
    Run {
        total_ms: s["total_ms"].as_f64().unwrap(),
        pause_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(2)),
        down_ms: s["downtime_ms"].as_f64().unwrap(),
        post_ms,
        p50_us: pc["destination"]["fault_p50_us"].as_f64().unwrap_or(f64::NAN),
        p99_us: pc["destination"]["fault_p99_us"].as_f64().unwrap_or(f64::NAN),
        max_us: pc["destination"]["fault_max_us"].as_f64().unwrap_or(f64::NAN),
        rate_ratio: if postcopy { during / before } else { f64::NAN },
    }
}

fn qemu_run(i: usize, elf: &str) -> Run {
    wait_quiet();
    let d = tmpdir(&format!("pc-qemu-{i}"));
    let qs = d.join("qmp-src.sock");
    let qd = d.join("qmp-dst.sock");
    let mig = format!("unix:{}", d.join("mig.sock").display());
    let qmp_src = format!("unix:{},server=on,wait=off", qs.display());
    let qmp_dst = format!("unix:{},server=on,wait=off", qd.display());
    let mut a = qemu_args(elf, "1G", "1", CMDLINE);
    a.extend(["-qmp", &qmp_src]);
    let src = Proc::spawn("qemu-system-x86_64", &a);
    wait_filled(&src);
    let mut b = qemu_args(elf, "1G", "1", CMDLINE);
    b.extend(["-qmp", &qmp_dst, "-incoming", &mig]);
    let dst = Proc::spawn("qemu-system-x86_64", &b);
    let caps = r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-ram","state":true}]}}"#;
    let mut qd_conn = Qmp::connect(&qd);
    qd_conn.cmd(caps);
    let mut q = Qmp::connect(&qs);
    q.cmd(caps);
    q.cmd(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":107374182400,"downtime-limit":300}}"#);
    let t0 = Instant::now();
    q.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"{mig}"}}}}"#));
    // The first pass done (a second dirty sync), then post-copy: as Ferry's --postcopy.
    let mut switched = None;
    let info = loop {
        let v = q.cmd(r#"{"execute":"query-migrate"}"#);
        match v["status"].as_str() {
            Some("completed") => break v,
            Some("failed") | Some("cancelled") => panic!("QEMU migration failed: {v}"),
            Some("active") if switched.is_none() && v["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 => {
                q.cmd(r#"{"execute":"migrate-start-postcopy"}"#);
                switched = Some(Instant::now());
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let t1 = Instant::now();
    let dinfo = qd_conn.cmd(r#"{"execute":"query-migrate"}"#);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(dst.last_report_field("errors"), Some(0), "QEMU destination guest not clean");
    let sw = switched.unwrap_or(t1);
    let before = rate(&src, t0 - Duration::from_millis(1500), t0);
    let during = rate(&dst, sw, t1);
    let lat = dinfo["postcopy-latency"].as_f64().or_else(|| info["postcopy-latency"].as_f64());
    Run {
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        pause_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(2)),
        down_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        post_ms: (t1 - sw).as_secs_f64() * 1000.0,
        // QEMU reports its average page-request latency in ns.
        p50_us: lat.map_or(f64::NAN, |ns| ns / 1000.0),
        p99_us: f64::NAN,
        max_us: f64::NAN,
        rate_ratio: during / before,
    }
}

fn main() {
    let Some(runs) = bench_runs("postcopy", 3) else {
        return;
    };
    let d = tmpdir("pc-guest");
    let elf = export_guest(&d);
    let elf = elf.to_str().unwrap();
    let mut rows: Vec<(&str, Vec<Run>)> =
        vec![("Ferry pre-copy", vec![]), ("Ferry --postcopy", vec![]), ("QEMU postcopy-ram", vec![])];
    for i in 0..runs {
        rows[0].1.push(ferry_run(i, false));
        rows[1].1.push(ferry_run(i, true));
        rows[2].1.push(qemu_run(i, elf));
    }
    println!("Post-copy of a 1 GiB guest dirtying 256 MiB flat out, UNIX socket, medians of {runs} runs");
    println!(
        "{:<20} | {:>9} {:>9} {:>8} {:>9} | {:>9} {:>9} {:>9} | {:>10}",
        "", "total ms", "pause ms", "down ms", "post ms", "fault p50", "p99 us", "max us", "guest rate"
    );
    let m = |v: &[Run], g: fn(&Run) -> f64| median(v.iter().map(g).collect());
    for (name, v) in &rows {
        println!(
            "{:<20} | {:>9.0} {:>9.1} {:>8.1} {:>9.0} | {:>9.0} {:>9.0} {:>9.0} | {:>10.2}",
            name,
            m(v, |r| r.total_ms),
            m(v, |r| r.pause_ms),
            m(v, |r| r.down_ms),
            m(v, |r| r.post_ms),
            m(v, |r| r.p50_us),
            m(v, |r| r.p99_us),
            m(v, |r| r.max_us),
            m(v, |r| r.rate_ratio),
        );
    }
    let (f, q) = (&rows[1].1, &rows[2].1);
    println!(
        "ratios Ferry --postcopy / QEMU: total {:.2}, pause {:.2}, post-copy phase {:.2}",
        m(f, |r| r.total_ms) / m(q, |r| r.total_ms),
        m(f, |r| r.pause_ms) / m(q, |r| r.pause_ms),
        m(f, |r| r.post_ms) / m(q, |r| r.post_ms)
    );
    println!("pause = host-seen (largest HB gap, source then destination); down = the VMM's own downtime figure;");
    println!(
        "post = switch to the last page in place; fault = Ferry: a destination fault on a missing page to the page in"
    );
    println!("place (p50/p99/max); QEMU: its average page-request latency (postcopy-latency) in the p50 column;");
    println!("guest rate = the guest's write rate during post-copy over its rate in the 1.5 s before the migration.");
}
