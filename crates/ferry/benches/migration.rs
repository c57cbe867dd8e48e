//! Live migration, Ferry against QEMU, on the same built-in guest and cases, in one run.
//!
//! `cargo bench -p ferry --bench migration` prints, per case, medians over FERRY_BENCH_RUNS
//! runs (default 3): total time, host-seen pause (largest gap between `HB` lines as received from
//! the source then the destination), bytes sent, and throughput, each with the Ferry/QEMU ratio.
//! QEMU 10 runs as `-M microvm -bios qboot.rom`, unlimited bandwidth, 300 ms downtime limit, over
//! a UNIX socket; Ferry with its defaults (300 ms limit, auto-converge on) over a UNIX socket.
//! The flat-out case runs twice, the second time with QEMU's opt-in `auto-converge` capability
//! on too. The 768 MiB case runs twice too, the second time with both destinations' memory
//! allocated before the migration (Ferry `--prefault`, QEMU `-mem-prealloc`).
//!
//! With FERRY_BENCH_DEBUG set, each Ferry run also prints its summary, the HB gaps over 3.5 ms
//! on both sides and the REPORT lines around the migration (to stderr).
//!
//! Also printed, as the physical limit of the receiving side: the rate at which this host fills
//! fresh memory (768 MiB of new memfd filled with UFFDIO_COPY, one thread, beside a running
//! guest), measured after every run of either VMM. On this host (a microVM with free page
//! reporting, so fresh memory faults in the outer hypervisor) it varies a lot from minute to
//! minute, and it bounds both VMMs' destinations unless their memory is preallocated.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

struct Case {
    name: &'static str,
    cmdline: &'static str,
    ws_mib: u64,
    /// QEMU's auto-converge capability on (Ferry auto-converges by default).
    qemu_auto_converge: bool,
    /// Destination memory allocated before the migration (Ferry --prefault, QEMU -mem-prealloc).
    prealloc: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "idle 1 GiB",
        cmdline: "mib=8 rate=-1 hb_us=1000 report_ms=500",
        ws_mib: 8,
        qemu_auto_converge: false,
        prealloc: false,
    },
    Case {
        name: "768 MiB data, not dirtied",
        cmdline: "mib=768 rate=-1 hb_us=1000 report_ms=500",
        ws_mib: 768,
        qemu_auto_converge: false,
        prealloc: false,
    },
    Case {
        name: "768 MiB, dest. preallocated",
        cmdline: "mib=768 rate=-1 hb_us=1000 report_ms=500",
        ws_mib: 768,
        qemu_auto_converge: false,
        prealloc: true,
    },
    Case {
        name: "256 MiB dirtied at 50 MiB/s",
        cmdline: "mib=256 rate=50 hb_us=1000 report_ms=500",
        ws_mib: 256,
        qemu_auto_converge: false,
        prealloc: false,
    },
    Case {
        name: "256 MiB dirtied flat out",
        cmdline: "mib=256 rate=0 hb_us=1000 report_ms=500",
        ws_mib: 256,
        qemu_auto_converge: false,
        prealloc: false,
    },
    Case {
        name: "flat out, QEMU auto-conv.",
        cmdline: "mib=256 rate=0 hb_us=1000 report_ms=500",
        ws_mib: 256,
        qemu_auto_converge: true,
        prealloc: false,
    },
];

#[derive(Default, Clone, Copy)]
struct Run {
    total_ms: f64,
    pause_ms: f64,
    guest_pause_ms: f64,
    bytes: f64,
    downtime_ms: f64,
    /// Largest HB gap in the second before the migration: what the harness sees with nothing
    /// happening (this host's floor for the host-seen pause).
    floor_ms: f64,
    /// The HB gap across the switch-over (source's last, destination's first).
    switch_ms: f64,
    /// Fresh-memory fill rate (GB/s) beside the running destination guest, after the migration.
    fill_gbs: f64,
    /// Largest time one of this machine's CPUs ran nothing at all during the migration window
    /// (`CpuWatch`): the outer host's stalls.
    cpu_stall_ms: f64,
}

/// GB/s at which this host fills 768 MiB of fresh guest RAM the way Ferry's destination does
/// (a new memfd, `UFFDIO_COPY` from a 2 MiB buffer, one thread), measured beside a running guest
/// (the destination's, after the migration) so that it shares the host with a busy vCPU as the
/// receiving side did. Measured after each Ferry and each QEMU run alike, so neither
/// destination gets memory the measurement just freed.
fn fill_rate() -> f64 {
    const SIZE: u64 = 768 << 20;
    const CHUNK: usize = 2 << 20;
    let ram = ferry_vmm::memory::GuestRam::new(SIZE).unwrap();
    let mut uffd = ferry_vmm::uffd::Uffd::new().unwrap();
    for r in ram.regions() {
        uffd.register(r.host_addr, r.size).unwrap();
    }
    let buf = vec![0x5au8; CHUNK];
    let t = Instant::now();
    for r in ram.regions() {
        for off in (0..r.size).step_by(CHUNK) {
            let len = (r.size - off).min(CHUNK as u64);
            // SAFETY: `buf` holds CHUNK >= len bytes; the range lies in a region registered
            // above, which nothing else uses.
            unsafe { uffd.copy(r.host_addr + off, buf.as_ptr(), len) }.unwrap();
        }
    }
    SIZE as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn wait_filled(p: &Proc, ws_mib: u64) {
    p.wait("the guest to fill its working set", Duration::from_secs(180), |l| {
        l.iter().rev().find(|(_, x)| x.starts_with("REPORT ")).and_then(|(_, x)| field(x, "written")).unwrap_or(0)
            >= ws_mib * 256
    });
    std::thread::sleep(Duration::from_millis(1500));
}

fn ferry_run(c: &Case, i: usize) -> Run {
    wait_quiet();
    let d = tmpdir(&format!("ferry-{i}"));
    let api = d.join("api.sock");
    let src =
        Proc::spawn(FERRY, &["run", "--memory", "1G", "--cmdline", c.cmdline, "--api-socket", api.to_str().unwrap()]);
    wait_filled(&src, c.ws_mib);
    let watch = CpuWatch::start();
    let pre: &[&str] = if c.prealloc { &["--memory", "1G", "--prefault"] } else { &[] };
    let (dst, t0, t1, s) = ferry_migrate(&api, &d, pre);
    std::thread::sleep(Duration::from_secs(2));
    let cpu_stall_ms = watch.max_gap(t0 - Duration::from_millis(200), t1 + Duration::from_secs(2));
    drop(watch);
    if std::env::var_os("FERRY_BENCH_DEBUG").is_some() {
        eprintln!("DBG t1=t0+{} summary {}", (t1 - t0).as_millis(), s);
        for (tag, p) in [("src", &src), ("dst", &dst)] {
            let hb: Vec<_> = p.hb_times().into_iter().filter(|t| *t + Duration::from_millis(200) >= t0).collect();
            for w in hb.windows(2) {
                if w[1] - w[0] > Duration::from_micros(3500) {
                    let at = w[0].saturating_duration_since(t0).as_millis();
                    eprintln!(
                        "DBG {tag} HB gap {:.1} ms at t0+{at} (t1 = t0+{})",
                        (w[1] - w[0]).as_secs_f64() * 1e3,
                        (t1 - t0).as_millis()
                    );
                }
            }
        }
        for (tag, p) in [("s", &src), ("d", &dst)] {
            for (t, l) in p.lines.lock().unwrap().iter() {
                if l.starts_with("REPORT") && *t + Duration::from_secs(1) >= t0 {
                    let rel = t.saturating_duration_since(t0).as_millis();
                    eprintln!("DBG {tag} t0+{rel} {}", &l[..l.len().min(120)]);
                }
            }
        }
    }
    assert_eq!(dst.last_report_field("errors"), Some(0), "destination guest not clean");
    let fill_gbs = fill_rate();
    Run {
        total_ms: s["total_ms"].as_f64().unwrap(),
        pause_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(2)),
        // REPORT lines cover the 500 ms before them: from the first after the start.
        guest_pause_ms: max_guest_gap(&src, &dst, t0 + Duration::from_millis(50), t1 + Duration::from_secs(2)),
        bytes: s["bytes"].as_f64().unwrap(),
        downtime_ms: s["downtime_ms"].as_f64().unwrap(),
        floor_ms: max_hb_gap(&src, &src, t0 - Duration::from_millis(1200), t0 - Duration::from_millis(200)),
        switch_ms: switch_gap(&src, &dst),
        fill_gbs,
        cpu_stall_ms,
    }
}

fn qemu_run(c: &Case, i: usize, elf: &str) -> Run {
    wait_quiet();
    let d = tmpdir(&format!("qemu-{i}"));
    let qs = d.join("qmp-src.sock");
    let qd = d.join("qmp-dst.sock");
    let mig = format!("unix:{}", d.join("mig.sock").display());
    let qmp_src = format!("unix:{},server=on,wait=off", qs.display());
    let qmp_dst = format!("unix:{},server=on,wait=off", qd.display());
    let mut a = qemu_args(elf, "1G", "1", c.cmdline);
    a.extend(["-qmp", &qmp_src]);
    let src = Proc::spawn("qemu-system-x86_64", &a);
    wait_filled(&src, c.ws_mib);
    let mut b = qemu_args(elf, "1G", "1", c.cmdline);
    b.extend(["-qmp", &qmp_dst, "-incoming", &mig]);
    if c.prealloc {
        b.push("-mem-prealloc");
    }
    let watch = CpuWatch::start();
    let dst = Proc::spawn("qemu-system-x86_64", &b);
    let mut qd_conn = Qmp::connect(&qd);
    let _ = qd_conn.cmd(r#"{"execute":"query-status"}"#);
    let mut q = Qmp::connect(&qs);
    q.cmd(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":107374182400,"downtime-limit":300}}"#);
    if c.qemu_auto_converge {
        q.cmd(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"auto-converge","state":true}]}}"#);
    }
    let t0 = Instant::now();
    q.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"{mig}"}}}}"#));
    let info = q.wait_migrated("QEMU migration", Duration::from_millis(5));
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let cpu_stall_ms = watch.max_gap(t0 - Duration::from_millis(200), t1 + Duration::from_secs(2));
    drop(watch);
    assert_eq!(dst.last_report_field("errors"), Some(0), "QEMU destination guest not clean");
    let fill_gbs = fill_rate();
    Run {
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        pause_ms: max_hb_gap(&src, &dst, t0 - Duration::from_millis(200), t1 + Duration::from_secs(2)),
        // REPORT lines cover the 500 ms before them: from the first after the start.
        guest_pause_ms: max_guest_gap(&src, &dst, t0 + Duration::from_millis(50), t1 + Duration::from_secs(2)),
        bytes: info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN),
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        floor_ms: max_hb_gap(&src, &src, t0 - Duration::from_millis(1200), t0 - Duration::from_millis(200)),
        switch_ms: switch_gap(&src, &dst),
        fill_gbs,
        cpu_stall_ms,
    }
}

fn main() {
    let Some(runs) = bench_runs("migration", 3) else {
        return;
    };
    let only = std::env::var("FERRY_BENCH_CASE").ok();
    let d = tmpdir("guest");
    let elf = export_guest(&d);
    let elf = elf.to_str().unwrap();
    println!("Live migration, Ferry vs QEMU 10 (same guest, same run), medians of {runs} runs; ratio = Ferry/QEMU");
    println!(
        "{:<28} | {:>9} {:>9} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} | {:>7} {:>7} | {:>6} {:>6} {:>6} | {:>7} {:>7}",
        "case",
        "total F",
        "total Q",
        "ratio",
        "pause F",
        "pause Q",
        "ratio",
        "switch F",
        "switch Q",
        "ratio",
        "gpause F",
        "gpause Q",
        "ratio",
        "MiB F",
        "MiB Q",
        "ratio",
        "MB/s F",
        "MB/s Q",
        "ratio",
        "down F",
        "down Q",
        "floor F",
        "floor Q",
        "fill",
        "F/fill",
        "Q/fill",
        "stall F",
        "stall Q"
    );
    for c in CASES {
        if only.as_deref().is_some_and(|o| !c.name.contains(o)) {
            continue;
        }
        let mut f = Vec::new();
        let mut q = Vec::new();
        for i in 0..runs {
            f.push(ferry_run(c, i));
            q.push(qemu_run(c, i, elf));
        }
        let m = |v: &[Run], g: fn(&Run) -> f64| median(v.iter().map(g).collect());
        let (ft, qt) = (m(&f, |r| r.total_ms), m(&q, |r| r.total_ms));
        let (fp, qp) = (m(&f, |r| r.pause_ms), m(&q, |r| r.pause_ms));
        let (fg, qg) = (m(&f, |r| r.guest_pause_ms), m(&q, |r| r.guest_pause_ms));
        let (fb, qb) = (m(&f, |r| r.bytes), m(&q, |r| r.bytes));
        let (fr, qr) = (m(&f, |r| r.bytes / r.total_ms / 1000.0), m(&q, |r| r.bytes / r.total_ms / 1000.0));
        let (fd, qd) = (m(&f, |r| r.downtime_ms), m(&q, |r| r.downtime_ms));
        let (ff, qf) = (m(&f, |r| r.floor_ms), m(&q, |r| r.floor_ms));
        let (fs, qs) = (m(&f, |r| r.switch_ms), m(&q, |r| r.switch_ms));
        let fill = median(f.iter().chain(&q).map(|r| r.fill_gbs).collect());
        let (fc, qc) = (m(&f, |r| r.cpu_stall_ms), m(&q, |r| r.cpu_stall_ms));
        println!(
            "{:<28} | {:>9.0} {:>9.0} {:>6.2} | {:>8.1} {:>8.1} {:>6.2} | {:>8.1} {:>8.1} {:>6.2} | {:>8.1} {:>8.1} {:>6.2} | {:>8.1} {:>8.1} {:>6.2} | {:>8.0} {:>8.0} {:>6.2} | {:>8.1} {:>8.1} | {:>7.1} {:>7.1} | {:>6.2} {:>6.2} {:>6.2} | {:>7.1} {:>7.1}",
            c.name,
            ft,
            qt,
            ft / qt,
            fp,
            qp,
            fp / qp,
            fs,
            qs,
            fs / qs,
            fg,
            qg,
            fg / qg,
            fb / 1048576.0,
            qb / 1048576.0,
            fb / qb,
            fr,
            qr,
            fr / qr,
            fd,
            qd,
            ff,
            qf,
            fill,
            fr / 1000.0 / fill,
            qr / 1000.0 / fill,
            fc,
            qc
        );
    }
    println!(
        "total/pause/down in ms; pause = host-seen (largest HB gap, source then destination); gpause = guest-seen"
    );
    println!("(largest gap between the guest's own workload iterations, its max_gap_us); down = each VMM's own downtime figure;");
    println!(
        "floor = largest HB gap the harness saw in the second before the migration started (no migration running);"
    );
    println!("switch = the HB gap across the switch-over alone (source's last HB to the destination's first);");
    println!("fill = GB/s at which this host filled 768 MiB of fresh memory with UFFDIO_COPY beside a running guest, after each run (median");
    println!("of both VMMs' runs): the receiving side's physical limit unless memory is preallocated; F/fill, Q/fill = each VMM's MB/s over it;");
    println!("stall = largest time one of this machine's CPUs ran nothing at all in the migration window (a real-time thread pinned to each");
    println!("CPU, waking every ms, did not run): the outer host stopping this machine; a pause that matches it is the host's, not the VMM's");
}
