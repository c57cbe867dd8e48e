//! Snapshots end to end on real KVM: restored guests verify their whole working set with
//! errors=0, snapshot → restore → snapshot is idempotent, an incremental chain equals a full
//! snapshot of the same moment, failures (disk full, corrupt or truncated files, wrong or
//! missing parents) are clear errors that lose nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use ferry_migrate::snapshot::{chain, read_meta, SnapshotMeta};

/// These tests share the machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const WS_MIB: u64 = 128;
const CMDLINE: &str = "mib=128 rate=50 report_ms=300";

struct Guest {
    vm: Proc,
    api: PathBuf,
    dir: PathBuf,
}

impl Drop for Guest {
    /// Snapshot files are hundreds of MiB (sparse): do not leave them in the temp dir.
    fn drop(&mut self) {
        self.vm.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn guest(name: &str, cmdline: &str) -> Guest {
    let dir = tmpdir(name);
    let api = dir.join("api.sock");
    let mut vm = Proc::spawn(&["run", "--memory", "512M", "--cmdline", cmdline, "--api-socket", api.to_str().unwrap()]);
    assert!(vm.wait_reports(3, Duration::from_secs(60)), "guest never reported: {}", vm.stderr_text());
    // Every snapshot test counts on the whole working set being there: wait for the guest to
    // say it has written it (three reports were not always enough: a CI run's full snapshot
    // once held only 116 of the 128 MiB).
    let pages =
        cmdline.split_whitespace().find_map(|t| t.strip_prefix("mib=")?.parse::<u64>().ok()).unwrap_or(64) * 256;
    assert!(
        vm.wait_report(|r| r.written >= pages, Duration::from_secs(120)),
        "the guest never filled its {pages} pages: {}",
        vm.tail(3)
    );
    assert!(wait_socket(&api, Duration::from_secs(5)));
    Guest { vm, api, dir }
}

struct Snap {
    ok: bool,
    summary: serde_json::Value,
    stderr: String,
}

fn snapshot(api: &Path, to: &Path, extra: &[&str]) -> Snap {
    let out = Command::new(FERRY)
        .args(["snapshot", "--api-socket", api.to_str().unwrap(), "--to", to.to_str().unwrap(), "--json"])
        .args(extra)
        .output()
        .unwrap();
    Snap {
        ok: out.status.success(),
        summary: serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn snapshot_ok(api: &Path, to: &Path, extra: &[&str]) -> serde_json::Value {
    let s = snapshot(api, to, extra);
    assert!(s.ok, "snapshot to {} failed: {}", to.display(), s.stderr);
    s.summary
}

/// Restores `path` and checks that the guest re-verifies its whole working set with errors=0.
/// `base` is a `verified=` count the snapshot's own cannot exceed.
fn assert_restores_clean(path: &Path, base: u64) {
    assert_restores_clean_with(path, base, &[]);
}

fn assert_restores_clean_with(path: &Path, base: u64, extra: &[&str]) -> Proc {
    let mut args = vec!["run", "--restore", path.to_str().unwrap()];
    args.extend(extra);
    let mut vm = Proc::spawn(&args);
    let ws = WS_MIB * 256;
    vm.wait_report(|r| r.verified >= base + ws, Duration::from_secs(60));
    let r = vm.reports();
    let last = r.last().unwrap_or_else(|| panic!("restored guest printed no REPORT: {}", vm.stderr_text()));
    assert!(vm.lines_with("VERIFY-FAIL").is_empty(), "{:?}", vm.lines_with("VERIFY-FAIL"));
    assert_eq!(last.errors, 0, "{}", last.line);
    assert!(last.verified >= base + ws, "restored guest verified {} < {base} + {ws}", last.verified);
    vm
}

/// `verified=` of the first REPORT the guest prints from now on (≥ its value at any earlier
/// snapshot).
fn verified_after(g: &mut Guest) -> u64 {
    let n = g.vm.reports().len();
    assert!(g.vm.wait_reports(n + 1, Duration::from_secs(10)), "guest stopped reporting");
    g.vm.reports()[n].verified
}

/// Lets the (dirtying) guest write `pages` pages from now on: memory a later snapshot must
/// see changed.
fn let_guest_write(g: &mut Guest, pages: u64) {
    assert!(g.vm.wait_written(pages, Duration::from_secs(30)), "guest stopped writing: {}", g.vm.tail(3));
}

/// Per page of guest RAM: Some(crc32c) for data, None for zero, resolved through the chain.
fn fingerprint(path: &Path) -> Vec<Option<u32>> {
    let chain: Vec<SnapshotMeta> = chain(path).unwrap();
    let regions = chain[0].maps.len();
    let mut out = Vec::new();
    for ri in 0..regions {
        let npages = chain[0].maps[ri].npages;
        let mut cursors = vec![0usize; chain.len()];
        for p in 0..npages {
            let mut v = None;
            let mut found = false;
            for (k, m) in chain.iter().enumerate() {
                let map = &m.maps[ri];
                if map.is_present(p) {
                    if !found {
                        v = Some(map.crcs[cursors[k]]);
                        found = true;
                    }
                    cursors[k] += 1;
                } else if map.is_zero(p) && !found {
                    found = true;
                }
            }
            assert!(found, "page {p} of region {ri} is in no snapshot of {}", path.display());
            out.push(v);
        }
    }
    out
}

/// The guest state a paused machine must reproduce exactly: everything but what time moves
/// (TSC and kvmclock, the PIT's and LAPIC timer's counters).
fn frozen_state(m: &SnapshotMeta) -> Vec<String> {
    let vm = &m.state.vm;
    let mut v = vec![
        format!("pic {:?}", vm.pic_master.chip_id),
        format!("pic regs {:?}", bytes_of(&vm.pic_master)),
        format!("pic2 regs {:?}", bytes_of(&vm.pic_slave)),
        format!("ioapic {:?}", bytes_of(&vm.ioapic)),
        format!("serial {:?}", m.state.serial),
    ];
    for s in &m.state.vcpus {
        v.push(format!("regs {:?}", s.regs));
        v.push(format!("sregs {:?}", s.sregs));
        v.push(format!("fpu {:?} {:?}", s.fpu.fpr, s.fpu.xmm));
        v.push(format!("xsave {:?}", s.xsave));
        v.push(format!("mp {:?} events {:?} dr {:?}", s.mp_state, s.events, s.debugregs));
        let mut lapic = s.lapic.regs.to_vec();
        lapic[0x390..0x394].fill(0); // timer current count
        v.push(format!("lapic {lapic:?}"));
        let msrs: Vec<_> = s.msrs.iter().filter(|(i, _)| *i != 0x10).collect();
        v.push(format!("msrs {msrs:?}"));
    }
    v
}

/// The bytes of a plain C state struct (kvm_irqchip holds a union, which has no useful Debug).
fn bytes_of<T: Copy>(c: &T) -> Vec<u8> {
    let p = c as *const T as *const u8;
    // SAFETY: T is one of KVM's plain C structs of integers, fully initialised by decode.
    unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<T>()) }.to_vec()
}

#[test]
fn full_live_and_incremental_snapshots_restore_to_guests_that_verify_clean() {
    if !kvm_available("full_live_and_incremental_snapshots_restore_to_guests_that_verify_clean") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("snap-restore", CMDLINE);
    let (full, inc, live) = (g.dir.join("full.snap"), g.dir.join("inc.snap"), g.dir.join("live.snap"));

    let f = snapshot_ok(&g.api, &full, &[]);
    let base_full = verified_after(&mut g);
    let i = snapshot_ok(&g.api, &inc, &["--incremental-from", full.to_str().unwrap()]);
    let base_inc = verified_after(&mut g);
    let l = snapshot_ok(&g.api, &live, &["--live"]);
    let base_live = verified_after(&mut g);

    assert_eq!(f["kind"], "full");
    assert_eq!(i["kind"], "incremental");
    assert!(i["parent_pages"].as_u64().unwrap() > 0, "{i}");
    assert_eq!(l["kind"], "live");
    assert!(l["passes"].as_u64().unwrap() >= 2, "{l}");
    let r = g.vm.reports();
    assert!(r.iter().all(|x| x.errors == 0), "source guest: {}", r.last().unwrap().line);
    assert_restores_clean(&full, base_full);
    assert_restores_clean(&inc, base_inc);
    assert_restores_clean(&live, base_live);
}

#[test]
fn snapshot_restore_snapshot_gives_the_same_memory_and_device_state() {
    if !kvm_available("snapshot_restore_snapshot_gives_the_same_memory_and_device_state") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("snap-idem", CMDLINE);
    let (a, b, c) = (g.dir.join("a.snap"), g.dir.join("b.snap"), g.dir.join("c.snap"));
    snapshot_ok(&g.api, &a, &[]);
    let_guest_write(&mut g, 1024);
    snapshot_ok(&g.api, &b, &[]);
    let api2 = g.dir.join("restored.sock");
    let _restored =
        Proc::spawn(&["run", "--restore", a.to_str().unwrap(), "--paused", "--api-socket", api2.to_str().unwrap()]);
    assert!(wait_socket(&api2, Duration::from_secs(30)));

    snapshot_ok(&api2, &c, &[]);

    let (ma, mb, mc) = (read_meta(&a).unwrap(), read_meta(&b).unwrap(), read_meta(&c).unwrap());

    // KVM rewrites the guest's kvmclock page (registered by MSR 0x4b564d01) whenever it
    // publishes the time: like the TSC, it is time's part of the state, not the guest's.
    let clock_page = |m: &SnapshotMeta| -> Option<usize> {
        let s = m.state.vcpus.first()?;
        s.msrs.iter().find(|(i, v)| *i == 0x4b56_4d01 && v & 1 == 1).map(|(_, v)| (v >> 12) as usize)
    };
    let pvclock = clock_page(&ma).expect("the guest registers a kvmclock page");
    assert_eq!(clock_page(&mc), Some(pvclock));
    let fp = |p: &Path| {
        let mut f = fingerprint(p);
        f[pvclock] = None;
        f
    };
    let (fa, fb, fc) = (fp(&a), fp(&b), fp(&c));
    let differ = |x: &[Option<u32>], y: &[Option<u32>]| -> Vec<usize> {
        x.iter().zip(y).enumerate().filter(|(_, (p, q))| p != q).map(|(i, _)| i).collect()
    };
    let ac = differ(&fa, &fc);
    assert!(ac.is_empty(), "memory of A and C differs in {} pages, first {:?}", ac.len(), &ac[..ac.len().min(10)]);
    assert!(!differ(&fa, &fb).is_empty(), "the guest ran between A and B: memory must differ");
    assert_eq!(frozen_state(&ma), frozen_state(&mc), "device or vCPU state of A and C differs");
    assert_ne!(frozen_state(&ma), frozen_state(&mb));
    let st = api(&api2, r#"{"cmd":"status"}"#);
    assert_eq!(st["state"], "paused", "a snapshot of a paused guest must leave it paused: {st}");
}

#[test]
fn chain_of_three_incrementals_equals_a_full_snapshot_of_the_same_moment() {
    if !kvm_available("chain_of_three_incrementals_equals_a_full_snapshot_of_the_same_moment") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("snap-chain", CMDLINE);
    let dir = g.dir.clone();
    let p = |n: &str| dir.join(n);
    snapshot_ok(&g.api, &p("base.snap"), &[]);
    let_guest_write(&mut g, 1024);
    snapshot_ok(&g.api, &p("i1.snap"), &["--incremental-from", p("base.snap").to_str().unwrap()]);
    let_guest_write(&mut g, 1024);
    snapshot_ok(&g.api, &p("i2.snap"), &["--incremental-from", p("i1.snap").to_str().unwrap()]);
    let_guest_write(&mut g, 1024);
    // The third incremental stops the guest, so the full snapshot sees the same moment.
    snapshot_ok(&g.api, &p("i3.snap"), &["--incremental-from", p("i2.snap").to_str().unwrap(), "--stop"]);
    snapshot_ok(&g.api, &p("full.snap"), &[]);

    assert_eq!(chain(&p("i3.snap")).unwrap().len(), 4);
    let inspect = Command::new(FERRY).args(["stream", "inspect", p("i3.snap").to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success() && text.contains("chain: 4 snapshots"), "{text}");
    assert!(text.contains("SNAPSHOT_INFO incremental") && text.contains("RAM_MAP region 0"), "{text}");
    assert_eq!(fingerprint(&p("i3.snap")), fingerprint(&p("full.snap")), "chain and full snapshot differ");
    assert_eq!(frozen_state(&read_meta(&p("i3.snap")).unwrap()), frozen_state(&read_meta(&p("full.snap")).unwrap()));
    api(&g.api, r#"{"cmd":"resume"}"#);
    let base = verified_after(&mut g);
    assert_restores_clean(&p("i3.snap"), base);
}

#[test]
fn incremental_snapshot_of_an_idle_guest_is_a_small_fraction_of_a_full_one() {
    if !kvm_available("incremental_snapshot_of_an_idle_guest_is_a_small_fraction_of_a_full_one") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("snap-idle", "mib=128 rate=-1 report_ms=300");
    let (full, inc) = (g.dir.join("full.snap"), g.dir.join("inc.snap"));
    let f = snapshot_ok(&g.api, &full, &[]);
    // An idle guest writes nothing countable: let it run 1000 heartbeat periods (~1 s), so that
    // what it does touch (heartbeat and report state) is in the incremental.
    assert!(g.vm.wait_heartbeats(1000, Duration::from_secs(30)), "guest stopped: {}", g.vm.tail(3));

    let i = snapshot_ok(&g.api, &inc, &["--incremental-from", full.to_str().unwrap()]);
    let base = verified_after(&mut g);

    let (fb, ib) = (f["allocated_bytes"].as_u64().unwrap(), i["allocated_bytes"].as_u64().unwrap());
    assert!(fb >= WS_MIB << 20, "full snapshot holds only {fb} bytes: {f}");
    assert!(ib * 50 <= fb, "incremental of an idle guest is {ib} bytes, more than 2% of the full {fb}: {i}");
    assert_restores_clean(&inc, base);
}

/// A small tmpfs, unmounted on drop.
struct SmallFs(PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_fails_clearly_keeps_the_guest_running_and_loses_no_dirty_page() {
    if !kvm_available("disk_full_fails_clearly_keeps_the_guest_running_and_loses_no_dirty_page") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("snap-full", CMDLINE);
    let small = g.dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"]).arg(&small).status();
    assert!(mounted.is_ok_and(|s| s.success()), "cannot mount a small tmpfs (the test needs root)");
    let _fs = SmallFs(small.clone());
    let base = g.dir.join("base.snap");
    snapshot_ok(&g.api, &base, &[]);
    let_guest_write(&mut g, 8192); // 32 MiB of distinct pages (sequential, 128 MiB set): 4x the 8 MiB

    let failed = snapshot(&g.api, &small.join("inc.snap"), &["--incremental-from", base.to_str().unwrap()]);

    assert!(!failed.ok, "a snapshot larger than the disk succeeded");
    assert!(failed.stderr.contains("No space left"), "{}", failed.stderr);
    assert!(std::fs::read_dir(&small).unwrap().next().is_none(), "a partial file was left behind");
    let n = g.vm.reports().len();
    assert!(g.vm.wait_reports(n + 3, Duration::from_secs(10)), "guest stopped after the failure");
    assert_eq!(api(&g.api, r#"{"cmd":"status"}"#)["state"], "running");
    // The pages dirtied before the failure must all be in the next incremental snapshot.
    let retry = g.dir.join("inc.snap");
    snapshot_ok(&g.api, &retry, &["--incremental-from", base.to_str().unwrap()]);
    let base_verified = verified_after(&mut g);
    assert!(g.vm.reports().iter().all(|r| r.errors == 0));
    assert_restores_clean(&retry, base_verified);
}

fn restore_fails(path: &Path, expect: &str) {
    let mut vm = Proc::spawn(&["run", "--restore", path.to_str().unwrap()]);
    let code = vm.wait_exit(Duration::from_secs(30));
    assert!(code.is_some_and(|c| c != 0), "restore of {} did not fail", path.display());
    assert!(vm.stderr_text().contains(expect), "error should say {expect:?}: {}", vm.stderr_text());
    assert!(vm.heartbeats().is_empty(), "a guest ran from a bad snapshot");
}

fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn corrupt_truncated_and_unchained_snapshots_are_refused_with_clear_errors() {
    if !kvm_available("corrupt_truncated_and_unchained_snapshots_are_refused_with_clear_errors") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = guest("snap-bad", CMDLINE);
    let p = |n: &str| g.dir.join(n);
    snapshot_ok(&g.api, &p("other.snap"), &[]);
    snapshot_ok(&g.api, &p("base.snap"), &[]);
    snapshot_ok(&g.api, &p("inc.snap"), &["--incremental-from", p("base.snap").to_str().unwrap()]);
    let meta = read_meta(&p("base.snap")).unwrap();
    let m = &meta.maps[0];
    let first_data = (0..m.npages).find(|&q| m.is_present(q)).unwrap();
    for n in ["page.snap", "meta.snap", "trunc.snap"] {
        std::fs::copy(p("base.snap"), p(n)).unwrap();
    }

    flip(&p("page.snap"), m.data_offset + first_data * 4096 + 100);
    flip(&p("meta.snap"), 200);
    let f = std::fs::OpenOptions::new().write(true).open(p("trunc.snap")).unwrap();
    f.set_len(m.data_offset + m.npages * 2048).unwrap();

    restore_fails(&p("page.snap"), "is corrupt");
    // inspect reads the metadata only and says so; --verify reads every page and names the bad one.
    let inspect = |path: &Path, verify: bool| {
        let mut a = vec!["stream", "inspect", path.to_str().unwrap()];
        if verify {
            a.push("--verify");
        }
        let out = Command::new(FERRY).args(&a).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, _) = inspect(&p("page.snap"), false);
    assert!(ok && out.contains("page data not read (--verify checks every page)"), "{out}");
    let (ok, out, err) = inspect(&p("page.snap"), true);
    assert!(!ok, "inspect --verify passed a flipped data page: {out}");
    assert!(err.contains(&format!("page {first_data} of region 0")) && err.contains("is corrupt"), "{err}");
    let (ok, out, err) = inspect(&p("inc.snap"), true);
    assert!(ok, "{err}");
    let data: u64 = [&meta, &read_meta(&p("inc.snap")).unwrap()]
        .iter()
        .map(|m| m.maps.iter().map(|x| x.present_count()).sum::<u64>())
        .sum();
    assert!(out.contains(&format!("verified: {data} data pages")), "expected {data} pages: {out}");
    restore_fails(&p("meta.snap"), "checksum mismatch");
    restore_fails(&p("trunc.snap"), "truncated");
    std::fs::rename(p("base.snap"), p("base.moved")).unwrap();
    restore_fails(&p("inc.snap"), "is missing");
    std::fs::copy(p("other.snap"), p("base.snap")).unwrap();
    restore_fails(&p("inc.snap"), "is not the parent");
    let not_last = snapshot(&g.api, &p("x.snap"), &["--incremental-from", p("other.snap").to_str().unwrap()]);
    assert!(!not_last.ok && not_last.stderr.contains("is not it"), "{}", not_last.stderr);
}

/// Migrates the VM behind `api` to a fresh destination and checks that the destination guest
/// re-verifies its whole working set with errors=0 (`base`: a `verified=` count the source's
/// own at the move cannot exceed).
fn migrate_and_assert_clean(api: &Path, dir: &Path, base: u64) {
    let sock = dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let mut dst = Proc::spawn(&["run", "--incoming", &uri]);
    assert!(dst.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)), "{}", dst.stderr_text());
    let out =
        Command::new(FERRY).args(["migrate", "--api-socket", api.to_str().unwrap(), "--to", &uri]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ws = WS_MIB * 256;
    dst.wait_report(|r| r.verified >= base + ws, Duration::from_secs(60));
    let last = dst.reports().last().cloned().unwrap();
    assert!(dst.lines_with("VERIFY-FAIL").is_empty(), "{:?}", dst.lines_with("VERIFY-FAIL"));
    assert_eq!(last.errors, 0, "{}", last.line);
    assert!(last.verified >= base + ws, "{}", last.line);
    assert!(dst.wait_reports(dst.reports().len() + 1, Duration::from_secs(10)), "destination stopped reporting");
}

/// A snapshot tracker (the consumer kept for the next incremental snapshot) stays registered on
/// the dirty log during a migration: the migration must still lose nothing.
#[test]
fn migration_with_a_snapshot_consumer_registered_loses_no_page() {
    if !kvm_available("migration_with_a_snapshot_consumer_registered_loses_no_page") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("snap-mig", CMDLINE);
    snapshot_ok(&g.api, &g.dir.join("tracked.snap"), &[]);
    let base = verified_after(&mut g);

    migrate_and_assert_clean(&g.api, &g.dir, base);
}

/// `--restore-mode mmap` maps the full snapshot copy-on-write: the guest verifies clean, from a
/// chain too, and a guest restored that way migrates on with nothing lost (its RAM is no longer
/// in the memfd, so the migration must not take memfd holes for zero pages).
#[test]
fn mmap_restores_verify_clean_and_the_restored_guest_migrates_on() {
    if !kvm_available("mmap_restores_verify_clean_and_the_restored_guest_migrates_on") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("snap-mmap", CMDLINE);
    let (full, inc) = (g.dir.join("full.snap"), g.dir.join("inc.snap"));
    snapshot_ok(&g.api, &full, &[]);
    let_guest_write(&mut g, 2048);
    snapshot_ok(&g.api, &inc, &["--incremental-from", full.to_str().unwrap()]);
    let base = verified_after(&mut g);
    g.vm.kill();
    let api2 = g.dir.join("mapped.sock");

    assert_restores_clean_with(&inc, base, &["--restore-mode", "mmap"]);
    let src =
        assert_restores_clean_with(&full, base, &["--restore-mode", "mmap", "--api-socket", api2.to_str().unwrap()]);

    let src_verified = src.reports().last().unwrap().verified;
    migrate_and_assert_clean(&api2, &g.dir, src_verified);
}
