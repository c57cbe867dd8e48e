//! Boot time: process start to the built-in guest's first `HB` line, Ferry against QEMU 10
//! (`-M microvm -bios qboot.rom`, the fastest QEMU configuration measured here), medians of
//! FERRY_BENCH_RUNS runs (default 7).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

fn time_to_first_hb(exe: &str, args: &[&str]) -> f64 {
    let p = Proc::spawn(exe, args);
    p.wait("the first heartbeat", Duration::from_secs(60), |l| l.iter().any(|(_, x)| x.starts_with("HB ")));
    (p.first("HB ").unwrap() - p.started).as_secs_f64() * 1000.0
}

fn main() {
    let Some(runs) = bench_runs("boot", 7) else {
        return;
    };
    let d = tmpdir("boot");
    let elf = export_guest(&d);
    let cmd = "mib=8 rate=-1";
    let f: Vec<f64> =
        (0..runs).map(|_| time_to_first_hb(FERRY, &["run", "--memory", "256M", "--cmdline", cmd])).collect();
    let qargs = qemu_args(elf.to_str().unwrap(), "256M", "1", cmd);
    let q: Vec<f64> = (0..runs).map(|_| time_to_first_hb("qemu-system-x86_64", &qargs)).collect();
    let (fm, qm) = (median(f.clone()), median(q.clone()));
    println!("Boot to first HB line (ms), medians of {runs} runs, 256 MiB, 1 vCPU");
    println!("{:<8} {:>10} {:>10} {:>10}", "", "median", "min", "max");
    let mm = |v: &[f64]| (v.iter().cloned().fold(f64::MAX, f64::min), v.iter().cloned().fold(0.0, f64::max));
    let (fa, fb) = mm(&f);
    let (qa, qb) = mm(&q);
    println!("{:<8} {:>10.1} {:>10.1} {:>10.1}", "Ferry", fm, fa, fb);
    println!("{:<8} {:>10.1} {:>10.1} {:>10.1}", "QEMU", qm, qa, qb);
    println!("ratio Ferry/QEMU: {:.2}", fm / qm);
}
