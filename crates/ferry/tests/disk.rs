//! virtio-blk end to end on real KVM: the built-in guest keeps up to 8 requests in flight on a
//! raw image, verifies every block it reads back (block, generation, checksum), and counts a
//! completion for a request that is not in flight (a duplicate) or a request that never
//! completes (stuck) as an error. Migrations during that I/O must leave both its memory and its
//! disk verifiers at errors=0, with the in-flight requests replayed exactly once.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::proxy::{Fault, Proxy};
use common::*;

/// These tests share the machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const WORKLOAD: &str = "mib=32 rate=10 disk=1 disk_qd=8 disk_mib=32 report_ms=300";

/// The DISK part of a REPORT line.
#[derive(Debug, Clone, Copy)]
struct Disk {
    written: u64,
    verified: u64,
    errors: u64,
    ioerr: u64,
}

fn disk_reports(p: &Proc) -> Vec<Disk> {
    p.lines_with("REPORT ")
        .iter()
        .filter_map(|l| {
            let d = &l[l.find(" DISK ")?..];
            Some(Disk {
                written: field(d, "written")?,
                verified: field(d, "verified")?,
                errors: field(d, "errors")?,
                ioerr: field(d, "ioerr")?,
            })
        })
        .collect()
}

fn image(dir: &Path, mib: u64) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(mib << 20).unwrap();
    p
}

struct Source {
    vm: Proc,
    api: PathBuf,
    dir: PathBuf,
}

fn source(name: &str, disk: &str) -> Source {
    source_with(name, disk, WORKLOAD)
}

fn source_with(name: &str, disk: &str, cmdline: &str) -> Source {
    let dir = tmpdir(name);
    let api = dir.join("api.sock");
    let img = image(&dir, 64);
    let spec = disk.replace("IMG", img.to_str().unwrap());
    let mut vm = Proc::spawn(&[
        "run",
        "--memory",
        "512M",
        "--cmdline",
        cmdline,
        "--api-socket",
        api.to_str().unwrap(),
        "--disk",
        &spec,
    ]);
    assert!(vm.wait_reports(4, Duration::from_secs(60)), "source never reported: {} {}", vm.tail(4), vm.stderr_text());
    assert!(vm.wait_disk_writing(Duration::from_secs(60)), "guest does no disk I/O: {}", vm.tail(2));
    assert!(wait_socket(&api, Duration::from_secs(5)));
    let d = disk_reports(&vm);
    assert!(d.last().is_some_and(|d| d.written > 0), "guest does no disk I/O: {}", vm.tail(2));
    Source { vm, api, dir }
}

/// A destination, once it listens (it says so after binding).
fn destination(uri: &str, disk: &str) -> Proc {
    let d = Proc::spawn(&["run", "--incoming", uri, "--disk", disk]);
    assert!(d.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)), "{}", d.stderr_text());
    d
}

fn img_spec(src: &Source, disk: &str) -> String {
    disk.replace("IMG", src.dir.join("disk.img").to_str().unwrap())
}

struct Outcome {
    code: i32,
    summary: serde_json::Value,
    stderr: String,
}

fn migrate(api: &Path, uri: &str) -> Outcome {
    let out = Command::new(FERRY)
        .args(["migrate", "--api-socket", api.to_str().unwrap(), "--to", uri, "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Outcome {
        code: out.status.code().unwrap_or(-1),
        summary: serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Waits until `p` printed `n` more REPORT lines, then returns its DISK reports.
fn more_reports(p: &mut Proc, n: usize) -> Vec<Disk> {
    let have = p.reports().len();
    assert!(p.wait_reports(have + n, Duration::from_secs(30)), "stopped reporting: {}", p.tail(3));
    disk_reports(p)
}

/// After the move: memory and disk verifiers clean, disk I/O going on, and for longer than the
/// guest's 3 s stuck-request limit (a lost completion would show as an error).
fn assert_guest_clean_after(src: &Source, p: &mut Proc) {
    let before = disk_reports(&src.vm).last().copied().unwrap();
    let d = more_reports(p, 14);
    let last = *d.last().unwrap_or_else(|| panic!("no DISK report: {}", p.tail(3)));
    assert!(p.lines_with("VERIFY-FAIL").is_empty(), "{:?}", p.lines_with("VERIFY-FAIL"));
    assert!(p.lines_with("DISK-FAIL").is_empty(), "{:?}", p.lines_with("DISK-FAIL"));
    assert_eq!(last.errors, 0, "{last:?}");
    assert!(p.reports().iter().all(|r| r.errors == 0), "{}", p.tail(2));
    assert!(last.written > before.written + 50, "disk writes did not continue: {before:?} -> {last:?}");
    assert!(last.verified > before.verified + 50, "disk reads did not continue: {before:?} -> {last:?}");
}

/// Boots a guest doing disk I/O on `disk` (IMG stands for its image) and migrates it to a
/// destination given the same image.
fn migrate_busy_guest(name: &str, disk: &str, cmdline: &str) -> (Source, Proc, Outcome) {
    let src = source_with(name, disk, cmdline);
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let dst = destination(&uri, &img_spec(&src, disk));
    let o = migrate(&src.api, &uri);
    (src, dst, o)
}

#[test]
fn migration_during_disk_io_replays_the_in_flight_requests_and_both_verifiers_stay_clean() {
    if !kvm_available("migration_during_disk_io_replays_the_in_flight_requests_and_both_verifiers_stay_clean") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // 2 ms per request: with 8 in flight the stop always finds some.
    let (src, mut dst, o) = migrate_busy_guest("blk-mig", "path=IMG,io-threads=4,latency-us=2000", WORKLOAD);

    assert_eq!(o.code, 0, "migration failed: {}", o.stderr);
    let s = &o.summary;
    let in_flight = s["disk_in_flight_at_stop"].as_u64().unwrap();
    assert!(in_flight > 0, "no request was in flight at the stop: {s}");
    assert_eq!(s["disk_replayed"].as_u64().unwrap(), in_flight, "{s}");
    assert_guest_clean_after(&src, &mut dst);
    assert!(dst.stderr_text().contains("re-executing"), "{}", dst.stderr_text());
}

#[test]
fn a_write_finished_after_the_quiesce_point_is_replayed_and_completes_once() {
    if !kvm_available("a_write_finished_after_the_quiesce_point_is_replayed_and_completes_once") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // 40 ms per request: the final pass (a few ms) ends long before they do, so they finish on
    // the source after the quiesce point, their data on disk, their completion held.
    // 32 slots each cycling write, read, read, each request on its own I/O thread with its own
    // jittered latency, so the slots drift apart: some writes are in flight at the stop (the
    // chance that none is, is about (2/3)^32).
    let cmdline = "mib=32 rate=10 disk=1 disk_qd=32 disk_mib=32 report_ms=300";
    let (src, mut dst, o) = migrate_busy_guest("blk-late", "path=IMG,io-threads=32,latency-us=40000", cmdline);

    assert_eq!(o.code, 0, "migration failed: {}", o.stderr);
    let s = &o.summary;
    assert!(s["disk_writes_completed_after_quiesce"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["disk_replayed"], s["disk_in_flight_at_stop"], "{s}");
    assert_eq!(s["disk_lock_released_before_commit"], false, "requests were still executing at COMMIT: {s}");
    // The guest counts a second completion of any request as an error ("dup").
    assert_guest_clean_after(&src, &mut dst);
}

#[test]
fn destination_dying_after_the_stop_resumes_the_source_whose_requests_complete_exactly_once() {
    if !kvm_available("destination_dying_after_the_stop_resumes_the_source_whose_requests_complete_exactly_once") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let disk = "path=IMG,io-threads=4,latency-us=40000";
    let mut src = source("blk-die", disk);
    let dst_sock = src.dir.join("dst.sock");
    let mut dst = destination(&format!("unix:{}", dst_sock.display()), &img_spec(&src, disk));
    // The stream stalls at the device state (the source paused and quiesced) for longer than
    // the disk takes to finish what was in flight, then the destination is killed.
    let fault = Fault::KillAtRecord { record: 5, pid: dst.child.id(), after_ms: 300 };
    let proxy = Proxy::start(src.dir.join("proxy.sock"), dst_sock, fault);

    let o = migrate(&src.api, &proxy.uri);

    assert_ne!(o.code, 0, "migration to a dead destination succeeded");
    assert!(dst.wait_exit_seen(Duration::from_secs(10)).is_some(), "destination still alive");
    let st = api(&src.api, r#"{"cmd":"status"}"#);
    assert_eq!(st["state"], "running", "{st}");
    let stats = &st["disks"][0];
    assert!(stats["in_flight_at_quiesce"].as_u64().unwrap() > 0, "{st}");
    assert!(stats["completed_after_quiesce"].as_u64().unwrap() > 0, "no request was held: {st}");
    // Held requests completed on resume once (a second completion or a lost one is a guest error).
    let before = disk_reports(&src.vm).last().copied().unwrap();
    let d = more_reports(&mut src.vm, 14);
    let last = *d.last().unwrap();
    assert_eq!(last.errors, 0, "{last:?} {:?}", src.vm.lines_with("DISK-FAIL"));
    assert!(last.written > before.written + 20, "source disk I/O did not continue: {before:?} -> {last:?}");
    assert!(src.vm.reports().iter().all(|r| r.errors == 0));

    // And the lock is the source's again: a retry hands it over.
    let uri = format!("unix:{}", src.dir.join("retry.sock").display());
    let mut dst2 = destination(&uri, &img_spec(&src, disk));
    let o = migrate(&src.api, &uri);
    assert_eq!(o.code, 0, "retry failed: {}", o.stderr);
    assert_guest_clean_after(&src, &mut dst2);
}

#[test]
fn missing_and_locked_images_are_refused_with_the_image_named() {
    if !kvm_available("missing_and_locked_images_are_refused_with_the_image_named") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let src = source("blk-lock", "IMG");
    let img = src.dir.join("disk.img");
    let missing = src.dir.join("missing.img");

    let mut second = Proc::spawn(&["run", "--memory", "256M", "--cmdline", WORKLOAD, "--disk", img.to_str().unwrap()]);
    let mut third = Proc::spawn(&["run", "--memory", "256M", "--disk", missing.to_str().unwrap()]);

    assert_eq!(second.wait_exit(Duration::from_secs(20)), Some(1));
    let e = second.stderr_text();
    assert!(e.contains("in use by another process") && e.contains("disk.img"), "{e}");
    assert!(second.reports().is_empty(), "a second writer ran a guest");
    assert_eq!(third.wait_exit(Duration::from_secs(20)), Some(1));
    let e = third.stderr_text();
    assert!(e.contains("missing.img") && e.contains("No such file"), "{e}");
    let d = disk_reports(&src.vm);
    assert_eq!(d.last().unwrap().errors, 0, "the first owner was disturbed");
}

#[test]
fn writes_to_a_read_only_image_fail_in_the_guest_and_change_nothing() {
    if !kvm_available("writes_to_a_read_only_image_fail_in_the_guest_and_change_nothing") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("blk-ro");
    let img = dir.join("ro.img");
    let pattern: Vec<u8> = (0..(8u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    std::fs::write(&img, &pattern).unwrap();

    let spec = format!("path={},readonly=on", img.display());
    let mut vm = Proc::spawn(&[
        "run",
        "--memory",
        "256M",
        "--cmdline",
        "mib=8 rate=5 disk=1 disk_qd=4 disk_mib=8 report_ms=300",
        "--disk",
        &spec,
    ]);
    // Refused writes show once the disk workload runs (after the memory fill).
    let refused =
        |r: &Report| r.line.find(" DISK ").and_then(|at| field(&r.line[at..], "ioerr")).is_some_and(|n| n > 0);
    assert!(vm.wait_report(refused, Duration::from_secs(60)), "{} {}", vm.tail(3), vm.stderr_text());
    vm.kill();

    let info = vm.lines_with("DISK-INFO");
    assert!(info.first().is_some_and(|l| l.contains("ro=1")), "{info:?}");
    let d = disk_reports(&vm);
    let last = d.last().unwrap();
    assert!(last.ioerr > 0, "writes were not refused: {last:?}");
    assert_eq!(last.written, 0, "a write to a read-only disk succeeded: {last:?}");
    assert!(vm.stderr_text().contains("is read-only: refused a write"), "{}", vm.stderr_text());
    assert!(std::fs::read(&img).unwrap() == pattern, "the read-only image changed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_destination_with_a_different_image_size_refuses_and_the_source_runs_on() {
    if !kvm_available("a_destination_with_a_different_image_size_refuses_and_the_source_runs_on") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut src = source("blk-size", "IMG");
    let other = src.dir.join("other.img");
    std::fs::File::create(&other).unwrap().set_len(32 << 20).unwrap();
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, other.to_str().unwrap());

    let o = migrate(&src.api, &uri);

    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("sectors here but"), "{}", o.stderr);
    assert!(dst.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0));
    let d = more_reports(&mut src.vm, 6);
    assert_eq!(d.last().unwrap().errors, 0);
    assert!(src.vm.reports().iter().all(|r| r.errors == 0));
}

impl Drop for Source {
    fn drop(&mut self) {
        self.vm.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Snapshots carry the disks: a live full snapshot and an incremental one on top, taken while
/// the guest writes its disk; the chain restored into a fresh image (garbage-filled first) gives
/// a guest whose memory and disk verifiers stay clean and whose writes continue.
#[test]
fn a_snapshot_chain_of_a_machine_with_a_disk_restores_into_a_new_image_and_the_guest_verifies_it() {
    if !kvm_available("a_snapshot_chain_of_a_machine_with_a_disk_restores_into_a_new_image_and_the_guest_verifies_it") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut src = source("blk-snap", "path=IMG,latency-us=500");
    let (full, inc) = (src.dir.join("full.ferry"), src.dir.join("inc.ferry"));
    let snap = |args: &[&str]| {
        let mut a = vec!["snapshot", "--api-socket", src.api.to_str().unwrap(), "--json"];
        a.extend_from_slice(args);
        let out = Command::new(FERRY).args(&a).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let s1 = snap(&["--to", full.to_str().unwrap(), "--live"]);
    assert_eq!(s1["disks"], 1, "{s1}");
    assert!(s1["disk_data_blocks"].as_u64().unwrap() > 0, "{s1}");
    let _ = more_reports(&mut src.vm, 3);
    let s2 = snap(&["--to", inc.to_str().unwrap(), "--incremental-from", full.to_str().unwrap()]);
    assert_eq!(s2["kind"], "incremental", "{s2}");
    let before = disk_reports(&src.vm).last().copied().unwrap();
    src.vm.kill();

    let img = src.dir.join("restored.img");
    std::fs::write(&img, vec![0x3cu8; 64 << 20]).unwrap();
    // Without an image for its disk the restore is refused, naming what is missing.
    let none = Command::new(FERRY).args(["run", "--restore", inc.to_str().unwrap()]).output().unwrap();
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("holds 1 disk(s) and 0 --disk image(s)"));
    let mut r = Proc::spawn(&["run", "--restore", inc.to_str().unwrap(), "--disk", img.to_str().unwrap()]);

    let d = more_reports(&mut r, 14);
    let last = *d.last().unwrap_or_else(|| panic!("no DISK report: {} {}", r.tail(3), r.stderr_text()));
    assert!(r.lines_with("VERIFY-FAIL").is_empty() && r.lines_with("DISK-FAIL").is_empty(), "{}", r.tail(5));
    assert!(r.reports().iter().all(|x| x.errors == 0), "{}", r.tail(2));
    assert_eq!(last.errors, 0, "{last:?}");
    assert!(last.written > before.written && last.verified > before.verified, "{before:?} -> {last:?}");
}

#[test]
fn two_disks_migrate_each_with_its_own_state_and_a_destination_missing_one_refuses() {
    if !kvm_available("two_disks_migrate_each_with_its_own_state_and_a_destination_missing_one_refuses") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("blk-two");
    let a = image(&dir, 64);
    let b = dir.join("b.img");
    std::fs::File::create(&b).unwrap().set_len(16 << 20).unwrap();
    let (a, b) = (a.to_str().unwrap().to_string(), b.to_str().unwrap().to_string());
    let api = dir.join("api.sock");
    let vm = Proc::spawn(&[
        "run",
        "--memory",
        "512M",
        "--cmdline",
        WORKLOAD,
        "--api-socket",
        api.to_str().unwrap(),
        "--disk",
        &a,
        "--disk",
        &b,
    ]);
    let mut src = Source { vm, api, dir };
    assert!(src.vm.wait_reports(4, Duration::from_secs(60)), "{}", src.vm.stderr_text());
    assert!(wait_socket(&src.api, Duration::from_secs(5)));
    // The guest drives the first virtio-blk device it finds: disk 0.
    assert!(src.vm.lines_with("DISK-INFO").first().is_some_and(|l| l.contains("capacity_sectors=131072")));

    let uri1 = format!("unix:{}", src.dir.join("one.sock").display());
    let mut one = destination(&uri1, &a);
    let refused = migrate(&src.api, &uri1);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("2 disk(s) but this destination was started with 1"), "{}", refused.stderr);
    assert!(one.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0));
    let _ = more_reports(&mut src.vm, 3);

    let uri2 = format!("unix:{}", src.dir.join("two.sock").display());
    let mut dst = Proc::spawn(&["run", "--incoming", &uri2, "--disk", &a, "--disk", &b]);
    assert!(dst.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)), "{}", dst.stderr_text());
    let o = migrate(&src.api, &uri2);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.summary["disks"], 2, "{}", o.summary);
    assert_guest_clean_after(&src, &mut dst);
}

/// `--copy-storage`: the destination has its own image, filled with garbage beforehand; every
/// block the guest wrote (before and during the migration) arrives, and the guest's disk
/// verifier, which reads back what it wrote, stays clean on the destination.
#[test]
fn copy_storage_moves_the_disk_into_the_destinations_own_image_and_the_guest_verifies_it() {
    if !kvm_available("copy_storage_moves_the_disk_into_the_destinations_own_image_and_the_guest_verifies_it") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let src = source("blk-copy", "path=IMG,latency-us=500");
    let own = src.dir.join("own.img");
    std::fs::write(&own, vec![0xa5u8; 64 << 20]).unwrap();
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let dst = destination(&uri, own.to_str().unwrap());

    let out = Command::new(FERRY)
        .args(["migrate", "--api-socket", src.api.to_str().unwrap(), "--to", &uri, "--copy-storage", "--json"])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let st = &s["storage"];
    // Every block went in the first pass: 64 MiB as data or zeros.
    assert!(st["data_bytes"].as_u64().unwrap() + st["zero_bytes"].as_u64().unwrap() >= 64 << 20, "{s}");
    assert!(st["data_bytes"].as_u64().unwrap() > 0, "{s}");
    let mut dst = dst;
    assert_guest_clean_after(&src, &mut dst);
    // The source's image is not the destination's: blocks the guest never wrote are zeros there
    // now (the garbage was overwritten by the zero extents).
    let img = std::fs::read(&own).unwrap();
    assert!(img[(63 << 20)..].iter().all(|&b| b == 0), "the tail of the image kept its garbage");
}

#[test]
fn copy_storage_to_an_image_of_another_size_is_refused_before_a_block_is_written() {
    if !kvm_available("copy_storage_to_an_image_of_another_size_is_refused_before_a_block_is_written") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut src = source("blk-copy-size", "IMG");
    let own = src.dir.join("own.img");
    std::fs::write(&own, vec![0x5au8; 32 << 20]).unwrap();
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, own.to_str().unwrap());

    let out = Command::new(FERRY)
        .args(["migrate", "--api-socket", src.api.to_str().unwrap(), "--to", &uri, "--copy-storage"])
        .output()
        .unwrap();

    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("has 65536 sectors here but 131072 on the source"), "{e}");
    assert!(dst.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0));
    assert!(std::fs::read(&own).unwrap().iter().all(|&b| b == 0x5a), "the refused image was written");
    let d = more_reports(&mut src.vm, 4);
    assert_eq!(d.last().unwrap().errors, 0);
}
