//! Broken (machine-check poisoned) guest pages on real KVM, poisoned for real with
//! `ferry debug poison` (userfaultfd UFFDIO_POISON): the guest gets a machine check wherever it
//! runs, migrations and snapshots carry the pages as broken, Ferry never reads them (its SIGBUS
//! counters say no fault reached it outside the recovering copy), and streams that misuse BROKEN
//! are refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

struct Guest {
    vm: Proc,
    api: PathBuf,
    dir: PathBuf,
    /// First guest-physical address of the working set.
    ws: u64,
}

fn guest(name: &str, cmdline: &str) -> Guest {
    let dir = tmpdir(name);
    let api = dir.join("api.sock");
    let mut vm = Proc::spawn(&["run", "--memory", "512M", "--cmdline", cmdline, "--api-socket", api.to_str().unwrap()]);
    let boot = vm.wait_line("BOOT ", Duration::from_secs(30)).expect("the guest did not boot");
    assert!(vm.wait_reports(2, Duration::from_secs(60)), "no reports: {}", vm.stderr_text());
    assert!(wait_socket(&api, Duration::from_secs(5)));
    let ws = working_set(&boot).0;
    Guest { vm, api, dir, ws }
}

fn ferry(args: &[&str]) -> (i32, String) {
    let out = Command::new(FERRY).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn poison(api: &Path, gpa: u64, extra: &[&str]) {
    let g = format!("{gpa:#x}");
    let mut args = vec!["debug", "poison", "--api-socket", api.to_str().unwrap(), "--gpa", &g];
    args.extend(extra);
    let (code, err) = ferry(&args);
    assert_eq!(code, 0, "ferry debug poison {g} failed: {err}");
}

/// The `MCE gpa=` addresses a guest printed.
fn mce_lines(p: &Proc) -> Vec<u64> {
    p.lines_with("MCE gpa=")
        .iter()
        .filter_map(|l| l.split("gpa=").nth(1))
        .filter_map(|h| u64::from_str_radix(h.trim().trim_start_matches("0x"), 16).ok())
        .collect()
}

/// Waits until the guest has printed `MCE gpa=` for every page of `want` (it meets them as its
/// verifier goes round), then checks it printed no other and each once.
fn assert_mce_exactly(p: &mut Proc, others: &[u64], want: &BTreeSet<u64>, what: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    let seen = |p: &Proc| mce_lines(p).into_iter().chain(others.iter().copied()).collect::<BTreeSet<u64>>();
    while !want.is_subset(&seen(p)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let all: Vec<u64> = mce_lines(p).into_iter().chain(others.iter().copied()).collect();
    let set: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(set, *want, "{what}: MCE lines for {:x?}, broken pages {:x?}", set, want);
    assert_eq!(all.len(), set.len(), "{what}: a page gave more than one MCE line: {all:x?}");
}

/// The lines of `GET /api/v1/events` as they come, from a thread.
fn follow_events(api: &Path) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::{BufRead, Write};
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut c = std::os::unix::net::UnixStream::connect(api).unwrap();
    write!(c, "GET /api/v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut r = std::io::BufReader::new(c);
    let mut first = String::new();
    // Headers, then the first event (the state): subscribed from here on.
    while r.read_line(&mut first).unwrap() > 0 && !first.starts_with('{') {
        first.clear();
    }
    let l2 = lines.clone();
    std::thread::spawn(move || {
        for l in r.lines().map_while(Result::ok) {
            l2.lock().unwrap().push(l);
        }
    });
    lines
}

fn status(socket: &Path) -> serde_json::Value {
    api(socket, r#"{"cmd":"status"}"#)
}

fn assert_no_unexpected_sigbus(api: &Path) -> serde_json::Value {
    let st = status(api);
    assert_eq!(st["sigbus"]["unexpected"], 0, "a SIGBUS reached Ferry outside the recovery path: {st}");
    st
}

#[test]
fn a_page_broken_under_a_running_guest_gives_it_one_machine_check_and_no_error() {
    if !kvm_available("a_page_broken_under_a_running_guest_gives_it_one_machine_check_and_no_error") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("poison-src", "mib=64 rate=20 report_ms=200");
    let page = g.ws + 4096 * 3000;
    let events = follow_events(&g.api);

    poison(&g.api, page, &[]);

    assert_mce_exactly(&mut g.vm, &[], &BTreeSet::from([page]), "source");
    // The operator hears of it on the events feed: the page, then the machine check.
    let seen = |kind: &str| events.lock().unwrap().iter().any(|l| l.contains(&format!("\"event\":\"{kind}\"")));
    assert!(
        wait_until(Duration::from_secs(5), || seen("page-broken") && seen("machine-check")),
        "{:?}",
        events.lock().unwrap()
    );
    let broken = events.lock().unwrap().iter().find(|l| l.contains("page-broken")).cloned().unwrap();
    assert!(broken.contains(&format!("\"gpa\":{page}")), "{broken}");
    let n = g.vm.reports().len();
    assert!(g.vm.wait_reports(n + 3, Duration::from_secs(10)), "the guest stopped after its machine check");
    let last = g.vm.reports().last().unwrap().line.clone();
    assert!(last.contains("errors=0") && last.contains("broken=1"), "{last}");
    let st = assert_no_unexpected_sigbus(&g.api);
    assert_eq!(st["broken_pages"][0]["gpa"], page, "{st}");
    assert!(st["sigbus"]["vcpu_faults"].as_u64().unwrap() >= 1, "{st}");
}

/// Three pages broken before the migration, two during it and one in its paused final pass:
/// the migration completes, Ferry never reads them, and the destination's guest gets a machine
/// check for exactly those six (the ones it had not met on the source).
#[test]
fn pages_broken_before_during_and_in_the_final_pass_of_a_migration_arrive_broken() {
    if !kvm_available("pages_broken_before_during_and_in_the_final_pass_of_a_migration_arrive_broken") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let src = guest("poison-mig", "mib=256 rate=50 report_ms=200");
    let pages: Vec<u64> = [1000u64, 20000, 40000, 50000, 60000, 65000].iter().map(|n| src.ws + n * 4096).collect();
    for &p in &pages[..3] {
        poison(&src.api, p, &[]);
    }
    poison(&src.api, pages[5], &["--at-final-pass"]);
    let sock = src.dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let mut dst = Proc::spawn(&["run", "--incoming", &uri]);
    assert!(wait_listening(&sock), "the destination socket never appeared");
    let mut mig = Proc::spawn(&["migrate", "--api-socket", src.api.to_str().unwrap(), "--to", &uri, "--json"]);
    // Two more once the migration is under way.
    assert!(mig.wait_stderr("connected to", Duration::from_secs(20)), "{}", mig.stderr_text());
    for &p in &pages[3..5] {
        poison(&src.api, p, &[]);
    }
    let source_status = assert_no_unexpected_sigbus(&src.api);
    let code = mig.wait_exit(Duration::from_secs(120));
    let (out, err) = (mig.text(), mig.stderr_text());

    assert_eq!(code, Some(0), "migration failed: {err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["broken_pages"], 6, "{summary}");
    assert_eq!(source_status["sigbus"]["recovered_copies"], 0, "announced pages were read: {source_status}");
    let on_source = mce_lines(&src.vm);
    assert_mce_exactly(&mut dst, &on_source, &pages.iter().copied().collect(), "source and destination");
    let n = dst.reports().len();
    assert!(dst.wait_reports(n + 3, Duration::from_secs(20)), "destination stopped: {}", dst.tail(3));
    let last = dst.reports().last().unwrap().line.clone();
    assert!(last.contains("errors=0") && last.contains("broken=6"), "{last}");
    assert!(dst.lines_with("VERIFY-FAIL").is_empty(), "{:?}", dst.lines_with("VERIFY-FAIL"));
}

/// A page that breaks where only Ferry's own copy meets it (the guest never touches the AP
/// trampoline page after boot): the copy faults, Ferry recovers, and the page arrives BROKEN.
#[test]
fn a_page_that_breaks_under_ferrys_copy_is_recovered_and_arrives_broken() {
    if !kvm_available("a_page_that_breaks_under_ferrys_copy_is_recovered_and_arrives_broken") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut src = guest("poison-copy", "mib=32 rate=20 report_ms=200");
    let trampoline = 0x8000;
    poison(&src.api, trampoline, &["--unannounced"]);
    let sock = src.dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let mut dst = Proc::spawn(&["run", "--incoming", &uri, "--api-socket", src.dir.join("dst.sock").to_str().unwrap()]);
    assert!(wait_listening(&sock), "the destination socket never appeared");

    let out = Command::new(FERRY)
        .args(["migrate", "--api-socket", src.api.to_str().unwrap(), "--to", &uri, "--json"])
        .output()
        .unwrap();

    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(summary["broken_pages"], 1, "{summary}");
    assert!(wait_socket(&src.dir.join("dst.sock"), Duration::from_secs(10)));
    let st = status(&src.dir.join("dst.sock"));
    assert_eq!(st["broken_pages"], serde_json::json!([{"gpa": trampoline, "cause": "stream"}]), "{st}");
    assert!(dst.wait_reports(3, Duration::from_secs(30)), "{}", dst.stderr_text());
    assert!(dst.reports().iter().all(|r| r.errors == 0), "{}", dst.tail(2));
    assert!(src.vm.wait_exit(Duration::from_secs(20)).is_some(), "the source did not exit after handing over");
    let recovered = src.vm.stderr_text();
    assert!(!recovered.contains("SIGBUS") && !recovered.contains("panicked"), "{recovered}");
}

/// The source's counters, read before it exits, show the recovered copy.
#[test]
fn ferrys_copy_meeting_a_broken_page_is_counted_as_recovered() {
    if !kvm_available("ferrys_copy_meeting_a_broken_page_is_counted_as_recovered") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let src = guest("poison-read", "mib=32 rate=20 report_ms=200");
    poison(&src.api, 0x8000, &["--unannounced"]);

    let r = api(&src.api, r#"{"cmd":"memory-read","gpa":32768,"len":16}"#);

    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("guest page 0x8000 is broken"), "{r}");
    let st = assert_no_unexpected_sigbus(&src.api);
    assert_eq!(st["sigbus"]["recovered_copies"], 1, "{st}");
    assert_eq!(st["broken_pages"], serde_json::json!([{"gpa": 0x8000, "cause": "copy-fault"}]), "{st}");
}

#[test]
fn a_snapshot_with_broken_pages_restores_them_broken() {
    if !kvm_available("a_snapshot_with_broken_pages_restores_them_broken") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("poison-snap", "mib=32 rate=20 report_ms=200");
    let pages = [g.ws + 4096 * 100, g.ws + 4096 * 5000];
    assert_eq!(api(&g.api, r#"{"cmd":"pause"}"#)["ok"], true);
    // Broken while paused: the guest has not met them when the snapshot is taken.
    for &p in &pages {
        poison(&g.api, p, &[]);
    }
    let file = g.dir.join("snap.ferry");
    let (code, err) = ferry(&["snapshot", "--api-socket", g.api.to_str().unwrap(), "--to", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    g.vm.kill();

    for mode in ["read", "mmap"] {
        let mut r = Proc::spawn(&["run", "--restore", file.to_str().unwrap(), "--restore-mode", mode]);

        assert_mce_exactly(&mut r, &[], &pages.iter().copied().collect(), mode);
        let n = r.reports().len();
        assert!(r.wait_reports(n + 2, Duration::from_secs(20)), "{mode}: {}", r.tail(3));
        let last = r.reports().last().unwrap().line.clone();
        assert!(last.contains("errors=0") && last.contains("broken=2"), "{mode}: {last}");
    }
}

/// A stream built by hand: format 1 header, the machine config of a 16 MiB guest, `batch`,
/// END. Sent to a destination, which must refuse it; returns its NACK.
fn refused(batch_entries: &[u64], data: &[u8]) -> String {
    let dir = tmpdir("poison-stream");
    let sock = dir.join("in.sock");
    let mut dst = Proc::spawn(&["run", "--incoming", &format!("unix:{}", sock.display())]);
    assert!(wait_listening(&sock), "the destination socket never appeared");
    let h = ferry_stream::StreamHeader {
        format_version: 1,
        flags: ferry_stream::StreamFlags::empty(),
        page_size: 4096,
        writer_version: (0, 1, 0),
    };
    let mut w = ferry_stream::StreamWriter::new(Vec::new(), &h).unwrap();
    w.machine_config(&ferry_stream::MachineConfig { memory_bytes: 16 << 20, vcpus: 1, regions: vec![(0, 16 << 20)] })
        .unwrap();
    let mut body = Vec::new();
    body.extend_from_slice(&(batch_entries.len() as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for e in batch_entries {
        body.extend_from_slice(&e.to_le_bytes());
    }
    body.extend_from_slice(data);
    w.raw_record(ferry_stream::rtype::PAGE_BATCH, &body).unwrap();
    w.end().unwrap();
    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = c.write_all(&w.into_inner());
    let mut head = [0u8; 8];
    c.read_exact(&mut head).unwrap_or_else(|e| panic!("no answer ({e}): {}", dst.stderr_text()));
    let len = u32::from_le_bytes(head[4..].try_into().unwrap()) as usize;
    let mut msg = vec![0u8; len];
    c.read_exact(&mut msg).unwrap();
    assert_eq!(u32::from_le_bytes(head[..4].try_into().unwrap()), 2, "the destination accepted the stream");
    assert_ne!(dst.wait_exit(Duration::from_secs(20)), Some(0));
    String::from_utf8_lossy(&msg).into_owned()
}

const BROKEN: u64 = 2 << 60;

#[test]
fn a_broken_entry_outside_guest_ram_is_refused() {
    if !kvm_available("a_broken_entry_outside_guest_ram_is_refused") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());

    let msg = refused(&[BROKEN | 0x10_0000], &[]);

    assert!(msg.contains("page frame 0x100000 is outside guest RAM"), "{msg}");
}

#[test]
fn a_broken_entry_with_data_attached_is_refused() {
    if !kvm_available("a_broken_entry_with_data_attached_is_refused") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());

    let msg = refused(&[BROKEN | 0x100], &[0xab; 4096]);

    assert!(msg.contains("1 entries with 0 NORMAL pages need 16 bytes, body has 4112"), "{msg}");
}

#[test]
fn data_for_a_page_declared_broken_is_refused() {
    if !kvm_available("data_for_a_page_declared_broken_is_refused") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());

    let msg = refused(&[BROKEN | 0x100, 0x100], &[0xab; 4096]);

    assert!(msg.contains("page frame 0x100 was sent with data after the stream declared it BROKEN"), "{msg}");
}
