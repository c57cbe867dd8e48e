//! What mutual TLS costs a migration (issue 23): the same guest migrated over loopback TCP in
//! plain text and with TLS 1.3 (both sides authenticated; AES-GCM with AES-NI where the CPU has
//! it), in one run. `cargo bench -p ferry --bench tls` prints medians over FERRY_BENCH_RUNS runs
//! (default 3): first-pass bandwidth, total time, and TLS's share of plain. Goal: ≥ 80 %.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// 512 MiB of guest memory filled with data (not zeros: every page crosses the link).
const WORKLOAD: &str = "mib=512 rate=5 hb_us=1000 report_ms=500";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("the openssl tool");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn pki(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut a = vec!["req", "-x509"];
    a.extend_from_slice(&ec);
    a.extend_from_slice(&["-days", "2", "-subj", "/CN=ca", "-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(dir, &a);
    for n in ["src", "dst"] {
        let (subj, key, csr, crt) = (format!("/CN={n}"), format!("{n}.key"), format!("{n}.csr"), format!("{n}.crt"));
        let mut a = vec!["req"];
        a.extend_from_slice(&ec);
        a.extend_from_slice(&["-subj", &subj, "-keyout", &key, "-out", &csr]);
        openssl(dir, &a);
        std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext",
                "-out",
                &crt,
            ],
        );
    }
}

fn tls_args(dir: &Path, who: &str) -> Vec<String> {
    let p = |f: String| dir.join(f).display().to_string();
    vec![
        "--tls-cert".into(),
        p(format!("{who}.crt")),
        "--tls-key".into(),
        p(format!("{who}.key")),
        "--tls-ca".into(),
        p("ca.crt".into()),
    ]
}

/// (first-pass MiB/s, total ms) of one migration.
fn run(dir: &Path, tls: bool) -> (f64, f64) {
    wait_quiet();
    let api = dir.join("src.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let src =
        Proc::spawn(FERRY, &["run", "--memory", "1G", "--cmdline", WORKLOAD, "--api-socket", api.to_str().unwrap()]);
    // Filled: the guest reports once its working set is written.
    src.wait("the guest's fill", Duration::from_secs(120), |l| {
        l.iter().filter(|(_, x)| x.starts_with("REPORT ")).count() >= 4
    });
    let mut dargs: Vec<String> = vec!["run".into(), "--incoming".into(), uri.clone()];
    let mut margs: Vec<String> = vec![
        "migrate".into(),
        "--api-socket".into(),
        api.display().to_string(),
        "--to".into(),
        uri.clone(),
        "--json".into(),
    ];
    if tls {
        dargs.extend(tls_args(dir, "dst"));
        margs.extend(tls_args(dir, "src"));
    } else {
        dargs.push("--insecure".into());
        margs.push("--insecure".into());
    }
    let d: Vec<&str> = dargs.iter().map(String::as_str).collect();
    let dst = Proc::spawn(FERRY, &d);
    // A probe connection would be taken for the migration: give the listener a second.
    std::thread::sleep(Duration::from_secs(1));
    let out = Command::new(FERRY).args(&margs).output().unwrap();
    assert!(out.status.success(), "migration failed: {}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    dst.wait("the destination's reports", Duration::from_secs(20), |l| {
        l.iter().filter(|(_, x)| x.starts_with("REPORT ")).count() >= 2
    });
    assert_eq!(dst.last_report_field("errors"), Some(0), "destination guest not clean");
    drop(src);
    (s["iterations"][0]["bandwidth_mib_s"].as_f64().unwrap_or(f64::NAN), s["total_ms"].as_f64().unwrap_or(f64::NAN))
}

fn main() {
    let Some(runs) = bench_runs("tls", 3) else { return };
    let dir = tmpdir("bench-tls");
    pki(&dir);
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        plain.push(run(&dir, false));
        tls.push(run(&dir, true));
    }
    let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
    let (pb, tb) = (med(&plain, |x| x.0), med(&tls, |x| x.0));
    let (pt, tt) = (med(&plain, |x| x.1), med(&tls, |x| x.1));
    println!("\nMigration over loopback TCP, 1 GiB guest with 512 MiB of data ({runs} runs, medians)");
    println!("| transport | first pass MiB/s | total ms |");
    println!("|---|---|---|");
    println!("| plain TCP | {pb:.0} | {pt:.0} |");
    println!("| mutual TLS 1.3 | {tb:.0} | {tt:.0} |");
    println!("| TLS / plain | {:.2} | {:.2} |", tb / pb, pt / tt);
    let _ = std::fs::remove_dir_all(&dir);
}
