//! Page channels and compression, Ferry against QEMU 10, on the same built-in guest in one run.
//!
//! `cargo bench -p ferry --bench compress` migrates a 1 GiB guest whose 256 MiB working set
//! compresses like ordinary memory (`word_bits=16`) while it dirties 50 MiB/s, FERRY_BENCH_RUNS
//! times (default 3), over two links: loopback (UNIX socket; QEMU's multifd needs TCP, so its
//! rows use TCP on loopback) and a real 1 Gbit/s link (two network namespaces joined by a veth
//! pair, `tbf` on both ends; needs root and `ip`/`tc`). Rows: Ferry with one connection and
//! with `--channels 2`, each plain and with `--compress zstd` (level 1); QEMU plain, QEMU
//! multifd (its default two channels) plain and with zstd (level 1). Printed, medians: total
//! time, bytes on the wire, host-seen pause (largest `HB` gap), and the ratios against QEMU's
//! matching row and against Ferry's one-connection row of the same kind. Every destination
//! guest must verify with errors=0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CMDLINE: &str = "mib=256 rate=50 word_bits=16 hb_us=1000 report_ms=200";
const WS_MIB: u64 = 256;
const NS: [&str; 2] = ["ferry-bz-src", "ferry-bz-dst"];
const DST_IP: &str = "10.79.0.2";

#[derive(Default, Clone, Copy)]
struct Run {
    total_ms: f64,
    wire_mib: f64,
    pause_ms: f64,
}

/// Where the two sides run: both on this host's loopback, or in two namespaces over a veth pair
/// with a rate limit.
#[derive(Clone, Copy, PartialEq)]
enum Link {
    Loopback,
    Tbf,
}

/// `exe args`, in namespace `ns` on the tbf link.
fn spawn_in(link: Link, side: usize, exe: &str, args: &[&str]) -> Proc {
    match link {
        Link::Loopback => Proc::spawn(exe, args),
        Link::Tbf => {
            let mut a = vec!["netns", "exec", NS[side], exe];
            a.extend(args);
            Proc::spawn("ip", &a)
        }
    }
}

fn wait_filled(p: &Proc) {
    p.wait("the guest to fill its working set", Duration::from_secs(180), |l| {
        l.iter().rev().find(|(_, x)| x.starts_with("REPORT ")).and_then(|(_, x)| field(x, "written")).unwrap_or(0)
            >= WS_MIB * 256
    });
    std::thread::sleep(Duration::from_millis(1000));
}

fn ferry_run(i: usize, link: Link, channels: u32, zstd: bool) -> Run {
    wait_quiet();
    let d = tmpdir(&format!("bz-ferry-{i}-{channels}-{zstd}"));
    let api = d.join("api.sock");
    let src = spawn_in(
        link,
        0,
        FERRY,
        &["run", "--memory", "1G", "--cmdline", CMDLINE, "--api-socket", api.to_str().unwrap()],
    );
    wait_filled(&src);
    let sock = d.join("mig.sock");
    let uri = match link {
        Link::Loopback => format!("unix:{}", sock.display()),
        Link::Tbf => format!("tcp:{DST_IP}:7801"),
    };
    let dst = spawn_in(link, 1, FERRY, &["run", "--incoming", &uri]);
    std::thread::sleep(Duration::from_millis(500));
    let mut args = vec!["migrate", "--api-socket", api.to_str().unwrap(), "--to", &uri, "--json"];
    if link == Link::Tbf {
        args.push("--insecure");
    }
    if zstd {
        args.extend(["--compress", "zstd"]);
    }
    let n = channels.to_string();
    if channels > 1 {
        args.extend(["--channels", &n]);
    }
    let t0 = Instant::now();
    let out = Command::new(FERRY).args(&args).output().unwrap();
    let t1 = Instant::now();
    assert!(out.status.success(), "ferry migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(dst.last_report_field("errors"), Some(0), "destination guest not clean");
    Run {
        total_ms: s["total_ms"].as_f64().unwrap(),
        wire_mib: s["bytes"].as_f64().unwrap() / (1 << 20) as f64,
        pause_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(2)),
    }
}

fn qemu_run(i: usize, link: Link, multifd: bool, zstd: bool, elf: &str) -> Run {
    wait_quiet();
    let d = tmpdir(&format!("bz-qemu-{i}-{multifd}-{zstd}"));
    let (qs, qd) = (d.join("qmp-src.sock"), d.join("qmp-dst.sock"));
    let host = if link == Link::Tbf { DST_IP } else { "127.0.0.1" };
    let uri = format!("tcp:{host}:7802");
    let qmp_src = format!("unix:{},server=on,wait=off", qs.display());
    let qmp_dst = format!("unix:{},server=on,wait=off", qd.display());
    let mut a = qemu_args(elf, "1G", "1", CMDLINE);
    a.extend(["-qmp", &qmp_src]);
    let src = spawn_in(link, 0, "qemu-system-x86_64", &a);
    wait_filled(&src);
    let mut b = qemu_args(elf, "1G", "1", CMDLINE);
    b.extend(["-qmp", &qmp_dst, "-incoming", "defer"]);
    let dst = spawn_in(link, 1, "qemu-system-x86_64", &b);
    let mut qdc = Qmp::connect(&qd);
    let mut q = Qmp::connect(&qs);
    if multifd {
        let caps = r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"multifd","state":true}]}}"#;
        let params =
            r#"{"execute":"migrate-set-parameters","arguments":{"multifd-compression":"zstd","multifd-zstd-level":1}}"#;
        for c in [&mut qdc, &mut q] {
            c.cmd(caps);
            if zstd {
                c.cmd(params);
            }
        }
    }
    qdc.cmd(&format!(r#"{{"execute":"migrate-incoming","arguments":{{"uri":"{uri}"}}}}"#));
    q.cmd(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":107374182400,"downtime-limit":300}}"#);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    q.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"{uri}"}}}}"#));
    let info = q.wait_migrated("QEMU migration", Duration::from_millis(5));
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(dst.last_report_field("errors"), Some(0), "QEMU destination guest not clean");
    Run {
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        wire_mib: info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN) / (1 << 20) as f64,
        pause_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(2)),
    }
}

fn main() {
    let Some(runs) = bench_runs("compress", 3) else {
        return;
    };
    let d = tmpdir("bz-guest");
    let elf = export_guest(&d);
    let elf = elf.to_str().unwrap();
    let ns = TbfNamespaces::create(NS, ["ferry-bz-a", "ferry-bz-b"], "10.79.0", "1gbit", "1mb");
    if ns.is_none() {
        println!(
            "SKIPPED the 1 Gbit/s link: cannot create network namespaces with a tbf veth pair (needs root, ip, tc)"
        );
    }
    let links: Vec<(Link, &str)> = if ns.is_some() {
        vec![(Link::Loopback, "loopback"), (Link::Tbf, "1 Gbit/s tbf")]
    } else {
        vec![(Link::Loopback, "loopback")]
    };
    println!(
        "Migration of a 1 GiB guest, 256 MiB working set compressible ~4x (word_bits=16), dirtying 50 MiB/s; \
         medians of {runs} runs"
    );
    for (link, name) in links {
        // (row, Ferry channels or QEMU multifd, zstd); QEMU rows last.
        let kinds: [(&str, u32, bool); 7] = [
            ("Ferry", 1, false),
            ("Ferry --channels 2", 2, false),
            ("Ferry --compress zstd", 1, true),
            ("Ferry --channels 2 + zstd", 2, true),
            ("QEMU", 0, false),
            ("QEMU multifd (2 ch)", 1, false),
            ("QEMU multifd zstd", 1, true),
        ];
        let mut rows: Vec<Vec<Run>> = vec![Vec::new(); kinds.len()];
        for i in 0..runs {
            for (k, &(row, n, zstd)) in kinds.iter().enumerate() {
                rows[k].push(if row.starts_with("Ferry") {
                    ferry_run(i, link, n, zstd)
                } else {
                    qemu_run(i, link, n > 0, zstd, elf)
                });
            }
        }
        let m = |v: &[Run], g: fn(&Run) -> f64| median(v.iter().map(g).collect());
        println!("{name}:");
        println!(
            "  {:<26} | {:>9} {:>9} {:>9} | {:>13} {:>12}",
            "", "total ms", "wire MiB", "pause ms", "total vs QEMU", "vs 1 channel"
        );
        for (k, (row, n, zstd)) in kinds.iter().enumerate() {
            let v = &rows[k];
            // Against QEMU's row of the same kind: plain, multifd, multifd zstd.
            let q = match (row.starts_with("Ferry"), *n, *zstd) {
                (true, 1, false) => Some(4),
                (true, _, false) => Some(5),
                (true, _, true) => Some(6),
                _ => None,
            };
            let one = if row.starts_with("Ferry") && *n > 1 { Some(if *zstd { 2 } else { 0 }) } else { None };
            let ratio = |o: Option<usize>| {
                o.map_or(String::from("-"), |o| format!("{:.2}", m(v, |r| r.total_ms) / m(&rows[o], |r| r.total_ms)))
            };
            println!(
                "  {:<26} | {:>9.0} {:>9.1} {:>9.1} | {:>13} {:>12}",
                row,
                m(v, |r| r.total_ms),
                m(v, |r| r.wire_mib),
                m(v, |r| r.pause_ms),
                ratio(q),
                ratio(one)
            );
        }
    }
    println!("total vs QEMU: against QEMU's row of the same kind (plain; channels vs multifd; zstd vs multifd zstd);");
    println!(
        "vs 1 channel: against Ferry's one-connection row of the same compression; pause = host-seen (largest HB gap);"
    );
    println!("QEMU's rows use TCP on loopback (multifd needs it); Ferry's loopback rows use a UNIX socket.");
}
