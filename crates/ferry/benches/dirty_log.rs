//! The dirty log's cost, per backend: sync + clear of 1 GiB of guest RAM with every page dirty
//! (bitmap with a whole-slot clear, bitmap with chunked clears of several sizes, ring), and the
//! guest's own dirtying rate with tracking off, bitmap and ring, so the overhead on the guest is
//! visible. Everything runs in one process of this run; ratios are against the whole-slot clear
//! and against tracking off.
//!
//! `cargo bench -p ferry --bench dirty_log` (FERRY_BENCH_RUNS, default 5, measurements per row).
//!
//! How: `ferry dirty-rate` registers a consumer. With the bitmap the first consumer turns
//! logging on with KVM's "initially set", so its first sync + harvest is exactly a sync and clear
//! of all 1 GiB dirty (`start_sync_clear_ms`); each run re-registers from scratch. The ring has
//! no initially-set state: its figure is the cost per collected entry of the window's final
//! collect (entries from a flat-out guest), scaled to 262144 entries (1 GiB).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn dirty_rate(api: &Path, window_ms: u64) -> serde_json::Value {
    let out = Command::new(FERRY)
        .args(["dirty-rate", "--api-socket", api.to_str().unwrap(), "--window-ms", &window_ms.to_string(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "dirty-rate failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn start(d: &Path, cmdline: &str, tracking: &[&str]) -> (Proc, std::path::PathBuf) {
    let api = d.join(format!("api-{}.sock", tracking.join("-").replace('/', "")));
    let mut args = vec!["run", "--memory", "1G", "--cmdline", cmdline, "--api-socket", api.to_str().unwrap()];
    args.extend(tracking);
    let p = Proc::spawn(FERRY, &args);
    p.wait("the guest to report", Duration::from_secs(120), |l| {
        l.iter().filter(|(_, x)| x.starts_with("REPORT ")).count() >= 3
    });
    (p, api)
}

/// The guest's own `rate_mib_s` (a float) from REPORT lines received in `[from, to]`.
fn guest_rate(p: &Proc, from: Instant, to: Instant) -> f64 {
    let l = p.lines.lock().unwrap();
    let v: Vec<f64> = l
        .iter()
        .filter(|(t, x)| *t >= from && *t <= to && x.starts_with("REPORT "))
        .filter_map(|(_, x)| x.split_whitespace().find_map(|t| t.strip_prefix("rate_mib_s=")?.parse().ok()))
        .collect();
    median(v)
}

fn main() {
    let Some(runs) = bench_runs("dirty-log", 5) else {
        return;
    };
    let d = tmpdir("dirty");

    // 1. Sync + clear of 1 GiB, all dirty. An idle guest, so the figure is the log's own work.
    println!("Sync + clear of 1 GiB guest RAM, every page dirty (ms), medians of {runs}");
    println!("{:<34} {:>10} {:>10} {:>12}", "backend", "ms/GiB", "vs whole", "CLEAR calls");
    let mut whole = f64::NAN;
    for (name, chunk) in [
        ("bitmap, whole-slot clear (1G)", "1G"),
        ("bitmap, 256K chunks", "256K"),
        ("bitmap, 2M chunks", "2M"),
        ("bitmap, 64M chunks (default)", "64M"),
        ("bitmap, 256M chunks", "256M"),
    ] {
        let (_p, api) = start(&d, "mib=8 rate=-1 report_ms=500", &["--dirty-clear-chunk", chunk]);
        let mut v = Vec::new();
        for _ in 0..runs {
            let r = dirty_rate(&api, 10);
            assert_eq!(r["start_pages"], 262144, "{r}");
            v.push(r["start_sync_clear_ms"].as_f64().unwrap());
        }
        let m = median(v);
        if whole.is_nan() {
            whole = m;
        }
        let chunk_pages = ferry_size(chunk) / 4096;
        println!("{:<34} {:>10.2} {:>10.2} {:>12}", name, m, m / whole, 262144u64.div_ceil(chunk_pages));
    }
    {
        let (_p, api) = start(&d, "mib=256 rate=0 report_ms=500", &["--dirty-tracking", "ring"]);
        let mut v = Vec::new();
        let mut entries = Vec::new();
        let mut fulls = Vec::new();
        for _ in 0..runs {
            let r = dirty_rate(&api, 1000);
            let n = r["end_fetched"].as_f64().unwrap();
            v.push(r["end_sync_ms"].as_f64().unwrap() / n.max(1.0) * 262144.0);
            entries.push(n);
            fulls.push(r["ring_full_exits"].as_f64().unwrap());
        }
        let m = median(v);
        println!(
            "{:<34} {:>10.2} {:>10.2} {:>12}",
            format!("ring ({:.0} entries/collect, scaled)", median(entries)),
            m,
            m / whole,
            "-"
        );
        println!("  (ring-full exits per 1 s window, each collecting all rings: {:.0})", median(fulls));
    }

    // 2. The guest's dirtying rate: flat out, tracking off vs on (dirty-rate polled back to
    // back, 200 ms windows, so pages are re-protected five times a second, as in a migration).
    println!();
    println!("Guest dirtying rate, 256 MiB flat out (pages/s as the guest reports it), medians");
    println!("{:<34} {:>12} {:>10}", "tracking", "pages/s", "vs off");
    let mut off = f64::NAN;
    for (name, args) in [
        ("off (no consumer)", &["--dirty-tracking", "bitmap"][..]),
        ("bitmap (64M chunks)", &["--dirty-tracking", "bitmap"][..]),
        ("ring (65536 entries)", &["--dirty-tracking", "ring"][..]),
    ] {
        let (p, api) = start(&d, "mib=256 rate=0 report_ms=500", args);
        let t0 = Instant::now();
        if name.starts_with("off") {
            std::thread::sleep(Duration::from_millis(500 * (runs as u64 + 1)));
        } else {
            for _ in 0..(runs * 5 / 2).max(3) {
                dirty_rate(&api, 200);
            }
        }
        let rate = guest_rate(&p, t0 + Duration::from_millis(600), Instant::now()) * 256.0;
        if off.is_nan() {
            off = rate;
        }
        println!("{:<34} {:>12.0} {:>10.3}", name, rate, rate / off);
    }
    println!("(a ring-3 write to a re-protected page costs a write-protect fault on this host: ~37 us)");
}

fn ferry_size(s: &str) -> u64 {
    let (n, m) = s.split_at(s.len() - 1);
    n.parse::<u64>().unwrap()
        * match m {
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            _ => 1,
        }
}
