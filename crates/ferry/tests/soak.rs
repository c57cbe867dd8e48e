//! Soak (issue 21 item 3, docs/reliability.md): one guest, with memory and disk I/O running,
//! migrated again and again from Ferry to Ferry, each hop on a random transport (UNIX or TCP)
//! into a destination with a random dirty-tracking backend; half the hops with a 1-vCPU guest,
//! half with a 2-vCPU one. After every hop: the source exited 0, the destination's memory and
//! disk verifiers are clean and still running, and the heartbeat sequence joined across the hop
//! has no gap. Over the run: each generation's descriptor count and RSS, a few reports after
//! its migration, stay flat (nothing that grows per hop).
//!
//! CI runs `FERRY_SOAK_MIGRATIONS` hops (default 8); the full soak is
//! `FERRY_SOAK_MIGRATIONS=500 cargo test --release -p ferry --test soak -- --nocapture`, which
//! prints its table. The seed is printed; `FERRY_SOAK_SEED` replays one.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const WORKLOAD: &str = "mib=16 rate=10 hb_us=2000 report_ms=200 disk=1 disk_qd=4 disk_mib=8 disk_rate=2";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn spawn_source(dir: &Path, img: &Path, cpus: u32, gen: usize) -> (Proc, std::path::PathBuf) {
    let api = dir.join(format!("api-{gen}.sock"));
    let mut p = Proc::spawn(&[
        "run",
        "--memory",
        "128M",
        "--cpus",
        &cpus.to_string(),
        "--cmdline",
        WORKLOAD,
        "--api-socket",
        api.to_str().unwrap(),
        "--disk",
        img.to_str().unwrap(),
    ]);
    assert!(p.wait_reports(3, Duration::from_secs(60)), "the guest never reported: {} {}", p.tail(3), p.stderr_text());
    assert!(p.wait_disk_writing(Duration::from_secs(60)), "no disk I/O: {}", p.tail(2));
    assert!(wait_socket(&api, Duration::from_secs(5)));
    assert!(disk_counts(&p).last().is_some_and(|d| d.0 > 0), "no disk I/O: {}", p.tail(2));
    (p, api)
}

#[test]
fn a_guest_migrated_again_and_again_loses_nothing_and_leaks_nothing() {
    if !kvm_available("a_guest_migrated_again_and_again_loses_nothing_and_leaks_nothing") {
        return;
    }
    let hops: usize = std::env::var("FERRY_SOAK_MIGRATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let seed: u64 = std::env::var("FERRY_SOAK_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("soak: {hops} migrations, seed {seed} (FERRY_SOAK_SEED replays it)");
    let mut rng = Rng(seed);
    let dir = tmpdir("soak");
    let started = Instant::now();
    // Per chain (the 1-vCPU and the 2-vCPU guest differ by a vCPU's descriptors and stacks).
    let mut chains: Vec<(u32, Vec<usize>, Vec<u64>)> = Vec::new();
    let (mut by_unix, mut by_ring) = (0, 0);
    let mut gen = 0;
    for (cpus, chain_hops) in [(1u32, hops / 2), (2, hops - hops / 2)] {
        // Each guest its own image: the guest's disk verifier knows only what it wrote itself.
        let img = dir.join(format!("disk-{cpus}.img"));
        std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
        let (mut src, mut api) = spawn_source(&dir, &img, cpus, gen);
        let (mut fd_seen, mut rss_seen) = (Vec::new(), Vec::new());
        for _ in 0..chain_hops {
            gen += 1;
            let uri = if rng.next() & 1 == 0 {
                by_unix += 1;
                format!("unix:{}", dir.join(format!("mig-{gen}.sock")).display())
            } else {
                let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
                format!("tcp:127.0.0.1:{port}")
            };
            let tracking = if rng.next() & 1 == 0 {
                by_ring += 1;
                "ring"
            } else {
                "bitmap"
            };
            let next_api = dir.join(format!("api-{gen}.sock"));
            let mut a = vec!["run", "--incoming", &uri, "--api-socket", next_api.to_str().unwrap()];
            a.extend(["--disk", img.to_str().unwrap(), "--dirty-tracking", tracking]);
            if uri.starts_with("tcp:") {
                a.push("--insecure");
            }
            let mut dst = Proc::spawn(&a);
            let what = format!("hop {gen} ({cpus} vCPU, {uri}, {tracking})");
            assert!(
                dst.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)),
                "{what}: {}",
                dst.stderr_text()
            );
            let mut m = vec!["migrate", "--api-socket", api.to_str().unwrap(), "--to", &uri, "--json"];
            if uri.starts_with("tcp:") {
                m.push("--insecure");
            }
            let out = Command::new(FERRY).args(&m).output().unwrap();
            assert!(out.status.success(), "{what}: {}\n{}", String::from_utf8_lossy(&out.stderr), dst.stderr_text());
            assert_eq!(src.wait_exit(Duration::from_secs(20)), Some(0), "{what}: the source: {}", src.stderr_text());
            assert!(
                dst.wait_reports(3, Duration::from_secs(30)),
                "{what}: the destination stopped: {} {}",
                dst.tail(3),
                dst.stderr_text()
            );
            assert_guest_clean(&src, &what);
            assert_guest_clean(&dst, &what);
            let hb = joined_heartbeats(&src, &dst);
            if let Some(w) = hb.windows(2).find(|w| w[1] != w[0] + 1) {
                panic!("{what}: heartbeat {} then {}", w[0], w[1]);
            }
            fd_seen.push(fd_count(dst.child.id()));
            rss_seen.push(rss_kib(dst.child.id()));
            if gen % 50 == 0 {
                eprintln!(
                    "soak: hop {gen} at {:.0} s: descriptors {}, RSS {} KiB, errors=0",
                    started.elapsed().as_secs_f64(),
                    fd_seen.last().copied().unwrap_or(0),
                    rss_seen.last().copied().unwrap_or(0)
                );
            }
            src = dst;
            api = next_api;
        }
        // The last one runs on clean.
        let n = src.reports().len();
        assert!(src.wait_reports(n + 5, Duration::from_secs(30)), "the last destination stopped: {}", src.tail(3));
        assert_guest_clean(&src, "the last destination");
        src.kill();
        gen += 1;
        chains.push((cpus, fd_seen, rss_seen));
    }
    let med = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    eprintln!(
        "soak: {hops} migrations in {:.0} s ({by_unix} over UNIX, {} over TCP; {by_ring} into ring, {} into bitmap), errors=0",
        started.elapsed().as_secs_f64(),
        hops - by_unix,
        hops - by_ring,
    );
    for (cpus, fd_seen, rss_seen) in &chains {
        if fd_seen.len() < 2 {
            continue;
        }
        let q = (fd_seen.len() / 4).max(1);
        let (first, last) = (&fd_seen[..q], &fd_seen[fd_seen.len() - q..]);
        let (rss_first, rss_last) = (&rss_seen[..q], &rss_seen[rss_seen.len() - q..]);
        let span = |v: &[usize]| format!("{}..{}", v.iter().min().unwrap_or(&0), v.iter().max().unwrap_or(&0));
        eprintln!(
            "soak: {cpus} vCPU, {} hops: descriptors {} in the first quarter, {} in the last; RSS median {} KiB, then {} KiB",
            fd_seen.len(),
            span(first),
            span(last),
            med(rss_first),
            med(rss_last)
        );
        assert!(
            last.iter().max() <= first.iter().max(),
            "{cpus} vCPU: descriptors grew over the run: first {first:?}, last {last:?}"
        );
        assert!(
            med(rss_last) <= med(rss_first) * 5 / 4 + 8 * 1024,
            "{cpus} vCPU: RSS grew over the run: first {rss_first:?}, last {rss_last:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
