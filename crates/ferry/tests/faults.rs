//! Fault injection at every protocol step (issue 21 item 2, docs/reliability.md).
//!
//! A Ferry built with the `fault-injection` feature (built here, into
//! `target/fault-injection`) takes `FERRY_FAULT=<point>=<action>` and does the action at that
//! point. This test walks every point of the migration source and destination with a guest
//! whose memory and disk verifiers run, over a shared disk image whose lock passes at the
//! switch-over, and checks after each fault:
//!
//! - the point was reached (the process said so);
//! - never both sides run the guest; exactly one does, unless the process that owned the guest
//!   at that moment was killed (then neither may: the other never runs a guest it was not
//!   handed, and the guest is gone with its process, as with any VMM's death);
//! - the side that does not run the guest has exited (so it holds no image lock);
//! - the guest that runs has clean memory and disk verifiers and a heartbeat sequence with no
//!   gap, and a retry of the migration (to a new destination, with no fault) succeeds, clean;
//! - where no one runs the guest, the image is free: a new guest boots on it.
//!
//! CI walks every point once, the actions taken in turn (kill, drop, stall, eio, enospc);
//! `FERRY_FAULT_WALK=full` walks every point with every action and prints the table that
//! docs/reliability.md carries. `FERRY_FAULT_ONLY=<point>[,<point>…]` walks those points.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const WORKLOAD: &str = "mib=16 rate=10 hb_us=2000 report_ms=200 disk=1 disk_qd=4 disk_mib=8 disk_rate=2";
const NO_DISK: &str = "mib=16 rate=10 hb_us=2000 report_ms=200";
const ACTIONS: [&str; 5] = ["kill", "drop", "stall", "eio", "enospc"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Source,
    Destination,
}

/// Every point a pre-copy migration of this guest reaches, in the order it reaches them, with
/// its side. (BROKEN_PAGES is written only for a guest with broken pages, and the stream of a
/// guest with a disk on a shared image carries no DISK_CONFIG or DISK_BLOCKS.)
const POINTS: &[(Side, &str)] = &[
    (Side::Source, "source.connected"),
    (Side::Source, "write.MACHINE_CONFIG.before"),
    (Side::Source, "write.MACHINE_CONFIG.after"),
    (Side::Source, "write.CPU_MODEL.before"),
    (Side::Source, "write.CPU_MODEL.after"),
    (Side::Source, "write.PAGE_BATCH.before"),
    (Side::Source, "write.PAGE_BATCH.after"),
    (Side::Source, "source.final-pass.paused"),
    (Side::Source, "write.FINAL_PASS.before"),
    (Side::Source, "write.FINAL_PASS.after"),
    (Side::Source, "source.final-pass.pages-sent"),
    (Side::Source, "write.VCPU_STATE.before"),
    (Side::Source, "write.VCPU_STATE.after"),
    (Side::Source, "write.VM_STATE.before"),
    (Side::Source, "write.VM_STATE.after"),
    (Side::Source, "write.DEVICE_STATE.before"),
    (Side::Source, "write.DEVICE_STATE.after"),
    (Side::Source, "write.END.before"),
    (Side::Source, "write.END.after"),
    (Side::Source, "source.end-sent"),
    (Side::Source, "source.ack-received"),
    (Side::Source, "source.disk-locks-released"),
    (Side::Source, "source.commit-sent"),
    (Side::Source, "source.committed-received"),
    (Side::Destination, "destination.connected"),
    (Side::Destination, "read.MACHINE_CONFIG.before"),
    (Side::Destination, "read.MACHINE_CONFIG.after"),
    (Side::Destination, "read.CPU_MODEL.before"),
    (Side::Destination, "read.CPU_MODEL.after"),
    (Side::Destination, "read.PAGE_BATCH.before"),
    (Side::Destination, "read.PAGE_BATCH.after"),
    (Side::Destination, "read.FINAL_PASS.before"),
    (Side::Destination, "read.FINAL_PASS.after"),
    (Side::Destination, "read.VCPU_STATE.before"),
    (Side::Destination, "read.VCPU_STATE.after"),
    (Side::Destination, "read.VM_STATE.before"),
    (Side::Destination, "read.VM_STATE.after"),
    (Side::Destination, "read.DEVICE_STATE.before"),
    (Side::Destination, "read.DEVICE_STATE.after"),
    (Side::Destination, "read.END.before"),
    (Side::Destination, "destination.restored"),
    (Side::Destination, "destination.ack-sent"),
    (Side::Destination, "destination.commit-received"),
    (Side::Destination, "destination.disk-locks-taken"),
    (Side::Destination, "destination.committed-sent"),
    (Side::Destination, "destination.resumed"),
];

/// Which side runs the guest when the faulted side is killed at `point` (docs/migration.md,
/// "After COMMIT"): before COMMIT the source owns it and a killed source takes it along; between
/// COMMIT and COMMITTED the survivor gets it (the destination takes the disk lock of a dead
/// source; the source takes back the lock of a dead destination); once COMMITTED is sent the
/// destination owns it and a killed destination takes it along.
fn runs_after_kill(side: Side, point: &str) -> Option<Side> {
    match (side, point) {
        (Side::Source, "source.commit-sent" | "source.committed-received") => Some(Side::Destination),
        (Side::Source, _) => None,
        (Side::Destination, "destination.committed-sent" | "destination.resumed") => None,
        (Side::Destination, _) => Some(Side::Source),
    }
}

/// The fault-injection build of this source tree (rebuilt when the tree changed).
fn fault_ferry() -> PathBuf {
    if let Ok(p) = std::env::var("FERRY_FAULT_EXE") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = root.join("target/fault-injection");
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.args(["build", "--release", "-p", "ferry", "--features", "fault-injection"]).current_dir(&root);
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME" {
            build.env_remove(k);
        }
    }
    build.env("CARGO_TARGET_DIR", &target);
    let t = Instant::now();
    let out = build.output().unwrap();
    assert!(out.status.success(), "the fault-injection build failed: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("faults: fault-injection build ready in {:.0} s", t.elapsed().as_secs_f64());
    target.join("release/ferry")
}

/// Whether `p` runs the guest: alive and printing heartbeats.
fn runs_guest(p: &mut Proc) -> bool {
    if p.child.try_wait().ok().flatten().is_some() {
        return false;
    }
    let n = p.heartbeats().len();
    wait_until(Duration::from_secs(3), || p.heartbeats().len() > n + 20)
}

struct Walk {
    exe: PathBuf,
    dir: PathBuf,
    gen: usize,
    /// Over TCP (loopback) rather than a UNIX socket.
    tcp: bool,
}

impl Walk {
    fn spawn(&mut self, args: &[&str], fault: Option<&str>) -> (Proc, PathBuf) {
        self.gen += 1;
        let api = self.dir.join(format!("api-{}.sock", self.gen));
        let mut a = args.to_vec();
        a.extend(["--api-socket", api.to_str().unwrap()]);
        let env: Vec<(&str, &str)> = fault.map(|f| ("FERRY_FAULT", f)).into_iter().collect();
        (Proc::spawn_exe_env(self.exe.to_str().unwrap(), &a, &env), api)
    }

    fn boot(&mut self, img: Option<&Path>, fault: Option<&str>) -> (Proc, PathBuf) {
        let mut a = vec!["run", "--memory", "128M", "--cmdline", if img.is_some() { WORKLOAD } else { NO_DISK }];
        if let Some(img) = img {
            a.extend(["--disk", img.to_str().unwrap()]);
        }
        let (mut p, api) = self.spawn(&a, fault);
        assert!(
            p.wait_reports(3, Duration::from_secs(60)),
            "the guest never reported: {} {}",
            p.tail(3),
            p.stderr_text()
        );
        assert!(wait_socket(&api, Duration::from_secs(5)));
        (p, api)
    }

    fn incoming(&mut self, img: Option<&Path>, fault: Option<&str>) -> (Proc, PathBuf, String) {
        let uri = if self.tcp {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            format!("tcp:127.0.0.1:{port}")
        } else {
            format!("unix:{}", self.dir.join(format!("mig-{}.sock", self.gen + 1)).display())
        };
        let mut a = vec!["run", "--incoming", &uri, "--insecure"];
        if let Some(img) = img {
            a.extend(["--disk", img.to_str().unwrap()]);
        }
        let (d, api) = self.spawn(&a, fault);
        assert!(d.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)), "{}", d.stderr_text());
        (d, api, uri)
    }
}

fn migrate(api: &Path, uri: &str) -> (i32, String) {
    let out = Command::new(FERRY)
        .args(["migrate", "--api-socket", api.to_str().unwrap(), "--to", uri, "--json", "--insecure"])
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn assert_no_gap(hb: &[u64], what: &str) {
    if let Some(w) = hb.windows(2).find(|w| w[1] != w[0] + 1) {
        panic!("{what}: heartbeat {} then {}", w[0], w[1]);
    }
}

#[test]
fn every_fault_at_every_migration_step_leaves_exactly_one_clean_guest() {
    if !kvm_available("every_fault_at_every_migration_step_leaves_exactly_one_clean_guest") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let full = std::env::var("FERRY_FAULT_WALK").is_ok_and(|v| v == "full");
    let only = std::env::var("FERRY_FAULT_ONLY").ok();
    let mut cases: Vec<(Side, &str, &str)> = Vec::new();
    for (i, &(side, point)) in POINTS.iter().enumerate() {
        if only.as_deref().is_some_and(|o| !o.split(',').any(|x| x == point)) {
            continue;
        }
        if full || only.is_some() {
            cases.extend(ACTIONS.iter().map(|&a| (side, point, a)));
        } else {
            cases.push((side, point, ACTIONS[i % ACTIONS.len()]));
        }
    }
    let exe = fault_ferry();
    let dir = tmpdir("faults");
    // Over UNIX sockets and TCP by turns (FERRY_FAULT_TRANSPORT=unix or tcp: one of them).
    let transport = std::env::var("FERRY_FAULT_TRANSPORT").unwrap_or_else(|_| "mixed".into());
    let mut w = Walk { exe, dir: dir.clone(), gen: 0, tcp: false };
    let started = Instant::now();
    let mut img_n = 0;
    let mut new_image = |dir: &Path| {
        img_n += 1;
        let img = dir.join(format!("disk-{img_n}.img"));
        std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
        img
    };
    let mut img = new_image(&dir);
    let mut runner: Option<(Proc, PathBuf)> = None;
    let mut table = Vec::new();
    for (k, &(side, point, action)) in cases.iter().enumerate() {
        let spec = format!("{point}={action}");
        w.tcp = transport == "tcp" || (transport == "mixed" && k % 2 == 1);
        let what = format!("case {}/{}: {spec} ({side:?}, {})", k + 1, cases.len(), if w.tcp { "tcp" } else { "unix" });
        let src_fault = (side == Side::Source).then_some(spec.as_str());
        let (mut src, src_api) = match runner.take() {
            Some(r) => r,
            None => w.boot(Some(&img), src_fault),
        };
        let dst_fault = (side == Side::Destination).then_some(spec.as_str());
        let (mut dst, dst_api, uri) = w.incoming(Some(&img), dst_fault);
        let (code, err) = migrate(&src_api, &uri);
        let faulted = if side == Side::Source { &src } else { &dst };
        let fired_line = format!("fault injected at {point}");
        assert!(
            wait_until(Duration::from_secs(5), || faulted.stderr_text().contains(&fired_line)),
            "{what}: the point was never reached; migrate said {code}: {err}\nsource: {}\ndestination: {}",
            src.stderr_text(),
            dst.stderr_text()
        );
        let killed = action == "kill";
        // The side that does not run the guest ends (a destination that was not handed the
        // guest, a source whose guest left).
        let src_runs = runs_guest(&mut src);
        let dst_runs = runs_guest(&mut dst);
        assert!(!(src_runs && dst_runs), "{what}: both sides run the guest");
        let outcome = match (src_runs, dst_runs) {
            (true, false) => "source runs on",
            (false, true) => "destination runs",
            _ => "guest gone with its killed owner",
        };
        if killed {
            let expect = runs_after_kill(side, point);
            let got = match (src_runs, dst_runs) {
                (true, _) => Some(Side::Source),
                (_, true) => Some(Side::Destination),
                _ => None,
            };
            assert_eq!(
                got,
                expect,
                "{what}: migrate said {code}: {err}\nsource: {}\ndestination: {}",
                src.stderr_text(),
                dst.stderr_text()
            );
        } else {
            assert!(
                src_runs || dst_runs,
                "{what}: no side runs the guest; migrate said {code}: {err}\nsource: {}\ndestination: {}",
                src.stderr_text(),
                dst.stderr_text()
            );
        }
        if src_runs {
            assert_ne!(code, 0, "{what}: migrate succeeded but the source runs: {err}");
        }
        // The side without the guest ends, so it holds no image lock.
        let next_src_fault = cases.get(k + 1).filter(|c| c.0 == Side::Source).map(|c| format!("{}={}", c.1, c.2));
        let (mut r, r_api, gone) = match (src_runs, dst_runs) {
            (true, _) => (src, src_api, dst),
            (_, true) => (dst, dst_api, src),
            _ => {
                // Neither runs it: both end, the destination never having run a guest it was
                // not handed, and the image is free: a new guest boots on it.
                for (p, name) in [(&mut src, "source"), (&mut dst, "destination")] {
                    assert!(p.wait_exit_seen(Duration::from_secs(20)).is_some(), "{what}: the {name} is left running");
                    assert_guest_clean(p, &what);
                }
                assert!(
                    dst.heartbeats().is_empty() || side == Side::Destination,
                    "{what}: the destination ran a guest it was not handed"
                );
                let (p, _) = w.boot(Some(&img), None);
                assert!(disk_counts(&p).last().is_some_and(|d| d.0 > 0), "{what}: no disk I/O on the freed image");
                drop(p);
                // Each guest its own image: its disk verifier knows only what it wrote.
                img = new_image(&dir);
                eprintln!("faults: {what}: {outcome} ({:.0} s)", started.elapsed().as_secs_f64());
                table.push(format!(
                    "| `{point}` | {action} | {} | {outcome}; neither side runs it; the image is free |",
                    if w.tcp { "tcp" } else { "unix" }
                ));
                continue;
            }
        };
        let mut gone = gone;
        assert!(
            gone.wait_exit_seen(Duration::from_secs(20)).is_some(),
            "{what}: the side without the guest still runs"
        );
        let n = r.reports().len();
        assert!(r.wait_reports(n + 3, Duration::from_secs(30)), "{what}: stopped: {}", r.tail(3));
        assert_guest_clean(&r, &what);
        assert_guest_clean(&gone, &what);
        let hb: Vec<u64> = if gone.heartbeats().is_empty() {
            r.heartbeats().iter().map(|h| h.1).collect()
        } else {
            joined_heartbeats(&gone, &r)
        };
        assert_no_gap(&hb, &what);
        // The retry: the guest moves on to a new destination, which carries the next
        // source-side case's fault.
        let (mut next, next_api, uri) = w.incoming(Some(&img), next_src_fault.as_deref());
        let (code, err) = migrate(&r_api, &uri);
        assert_eq!(code, 0, "{what}: the retry failed: {err}\n{}", next.stderr_text());
        assert_eq!(r.wait_exit(Duration::from_secs(20)), Some(0), "{what}: after the retry: {}", r.stderr_text());
        assert!(next.wait_reports(3, Duration::from_secs(30)), "{what}: after the retry: {}", next.tail(3));
        assert_guest_clean(&next, &what);
        assert_no_gap(&joined_heartbeats(&r, &next), &format!("{what}, the retry"));
        runner = Some((next, next_api));
        eprintln!("faults: {what}: {outcome}, errors=0 ({:.0} s)", started.elapsed().as_secs_f64());
        table.push(format!(
            "| `{point}` | {action} | {} | {outcome}; errors=0; the retry succeeds |",
            if w.tcp { "tcp" } else { "unix" }
        ));
    }
    if let Some((mut r, _)) = runner.take() {
        assert_guest_clean(&r, "the last guest");
        r.kill();
    }
    eprintln!("faults: {} cases in {:.0} s, nothing lost", cases.len(), started.elapsed().as_secs_f64());
    for row in &table {
        eprintln!("{row}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tests here share the two CPUs' worth of guests: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// COMMIT sent, no COMMITTED back, and the destination's process gone (killed right after it
/// read COMMIT), for a guest with no disk, so no image lock tells who holds it. Over a UNIX
/// socket the source sees its peer's process is gone and resumes the guest. Over TCP it cannot
/// know whether the destination runs the guest: it keeps it paused (neither lost nor run twice),
/// says so, and resumes it when the operator says so.
#[test]
fn a_destination_lost_between_commit_and_its_confirmation_leaves_one_guest_or_a_paused_one() {
    if !kvm_available("a_destination_lost_between_commit_and_its_confirmation_leaves_one_guest_or_a_paused_one") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let exe = fault_ferry();
    let dir = tmpdir("faults-nodisk");
    for tcp in [false, true] {
        let mut w = Walk { exe: exe.clone(), dir: dir.clone(), gen: if tcp { 100 } else { 0 }, tcp };
        let (mut src, api_path) = w.boot(None, None);
        let (mut dst, _, uri) = w.incoming(None, Some("destination.commit-received=kill"));
        let (code, err) = migrate(&api_path, &uri);
        let what = if tcp { "over TCP" } else { "over a UNIX socket" };
        assert_ne!(code, 0, "{what}: {err}");
        assert!(dst.wait_exit_seen(Duration::from_secs(20)).is_some(), "{what}: the destination lives");
        assert!(dst.heartbeats().is_empty(), "{what}: the destination ran the guest");
        if tcp {
            assert!(err.contains("may be running the guest: the guest stays paused here"), "{what}: {err}");
            assert!(!runs_guest(&mut src), "{what}: the source resumed a guest the destination may run");
            assert!(src.child.try_wait().unwrap().is_none(), "{what}: the source exited: {}", src.stderr_text());
            let st = api(&api_path, r#"{"cmd":"status"}"#);
            assert_eq!(st["state"], "paused", "{what}: {st}");
            // Nothing but an explicit resume runs it: another migration is refused.
            let (code, err) = migrate(&api_path, "unix:/nonexistent/x.sock");
            assert!(code != 0 && err.contains("paused"), "{what}: {err}");
            let r = api(&api_path, r#"{"cmd":"resume"}"#);
            assert_eq!(r["ok"], true, "{what}: {r}");
        } else {
            assert!(err.contains("does not hold the guest; it resumes here"), "{what}: {err}");
        }
        assert!(runs_guest(&mut src), "{what}: the source does not run the guest: {}", src.stderr_text());
        let n = src.reports().len();
        assert!(src.wait_reports(n + 3, Duration::from_secs(30)), "{what}: {}", src.tail(3));
        assert_guest_clean(&src, what);
        assert_no_gap(&src.heartbeats().iter().map(|h| h.1).collect::<Vec<_>>(), what);
        src.kill();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every point a snapshot of this guest (a disk, no broken page) reaches, in order. The VM
/// process writes it, so a fault there is a fault of the process that runs the guest.
const SNAPSHOT_POINTS: &[&str] = &[
    "snapshot.paused",
    "write.MACHINE_CONFIG.before",
    "write.SNAPSHOT_INFO.after",
    "write.RAM_MAP.before",
    "write.DISK_CONFIG.after",
    "write.DISK_MAP.before",
    "write.VCPU_STATE.after",
    "write.DEVICE_STATE.before",
    "write.END.after",
    "snapshot.pages-written",
    "snapshot.synced",
    "snapshot.renamed",
];

/// A snapshot file is whole: `ferry stream inspect --verify` checks every page and block.
fn verifies(exe: &Path, f: &Path) -> bool {
    let out = Command::new(exe).args(["stream", "inspect", "--verify"]).arg(f).output().unwrap();
    out.status.success()
}

/// Fault injection in the snapshot path: at every point, the process killed, stalled, or the
/// next write of the file failing with EIO or ENOSPC. After each: a snapshot either landed whole
/// (it verifies page by page) or left no file at its path; a guest whose process lives runs on
/// with clean verifiers and takes a snapshot that verifies; a killed one's image is free.
#[test]
fn every_fault_at_every_snapshot_step_leaves_a_whole_snapshot_or_none() {
    if !kvm_available("every_fault_at_every_snapshot_step_leaves_a_whole_snapshot_or_none") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const SNAP_ACTIONS: [&str; 4] = ["kill", "stall", "eio", "enospc"];
    let full = std::env::var("FERRY_FAULT_WALK").is_ok_and(|v| v == "full");
    let mut cases = Vec::new();
    for (i, &point) in SNAPSHOT_POINTS.iter().enumerate() {
        if full {
            cases.extend(SNAP_ACTIONS.iter().map(|&a| (point, a)));
        } else {
            cases.push((point, SNAP_ACTIONS[i % SNAP_ACTIONS.len()]));
        }
    }
    let exe = fault_ferry();
    let dir = tmpdir("faults-snap");
    let mut w = Walk { exe: exe.clone(), dir: dir.clone(), gen: 0, tcp: false };
    let started = Instant::now();
    let mut table = Vec::new();
    for (k, &(point, action)) in cases.iter().enumerate() {
        let spec = format!("{point}={action}");
        let what = format!("snapshot case {}/{}: {spec}", k + 1, cases.len());
        let img = dir.join(format!("disk-{k}.img"));
        std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
        let (mut vm, api_path) = w.boot(Some(&img), Some(&spec));
        let file = dir.join(format!("snap-{k}.ferry"));
        let out = Command::new(FERRY)
            .args(["snapshot", "--api-socket", api_path.to_str().unwrap(), "--to", file.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            wait_until(Duration::from_secs(5), || vm.stderr_text().contains(&format!("fault injected at {point}"))),
            "{what}: the point was never reached: {err}\n{}",
            vm.stderr_text()
        );
        let landed = file.exists();
        if landed {
            assert!(verifies(&exe, &file), "{what}: a snapshot landed that does not verify");
        }
        let outcome;
        if action == "kill" {
            assert!(vm.wait_exit_seen(Duration::from_secs(20)).is_some(), "{what}: the process lives");
            assert_eq!(landed, point == "snapshot.renamed", "{what}: landed {landed}");
            assert_guest_clean(&vm, &what);
            // The image is free: a new guest boots on it.
            let (p, _) = w.boot(Some(&img), None);
            assert!(disk_counts(&p).last().is_some_and(|d| d.0 > 0), "{what}: no disk I/O on the freed image");
            outcome = if landed { "process gone; the snapshot had landed whole" } else { "process gone; no file" };
        } else {
            assert!(runs_guest(&mut vm), "{what}: the guest does not run on: {}", vm.stderr_text());
            if out.status.success() {
                assert!(landed, "{what}: snapshot said ok but no file");
                outcome = "snapshot landed whole; the guest runs on";
            } else {
                assert!(!landed, "{what}: a failed snapshot left a file");
                let errno = if action == "eio" { "Input/output error" } else { "No space left on device" };
                assert!(err.contains(errno) && err.contains(&format!("snap-{k}.ferry")), "{what}: {err}");
                outcome = "snapshot refused naming the file and the error; the guest runs on";
            }
            let again = dir.join(format!("snap-{k}-again.ferry"));
            let out = Command::new(FERRY)
                .args(["snapshot", "--api-socket", api_path.to_str().unwrap(), "--to", again.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(out.status.success(), "{what}: the retry failed: {}", String::from_utf8_lossy(&out.stderr));
            assert!(verifies(&exe, &again), "{what}: the retry's snapshot does not verify");
            let n = vm.reports().len();
            assert!(vm.wait_reports(n + 3, Duration::from_secs(30)), "{what}: stopped: {}", vm.tail(3));
            assert_guest_clean(&vm, &what);
            assert_no_gap(&vm.heartbeats().iter().map(|h| h.1).collect::<Vec<_>>(), &what);
            vm.kill();
        }
        eprintln!("faults: {what}: {outcome} ({:.0} s)", started.elapsed().as_secs_f64());
        table.push(format!("| `{point}` | {action} | {outcome} |"));
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(dir.join(format!("snap-{k}-again.ferry")));
        let _ = std::fs::remove_file(&img);
    }
    for row in &table {
        eprintln!("{row}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
