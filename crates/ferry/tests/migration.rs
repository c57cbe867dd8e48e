//! Live migration end to end on real KVM: the destination guest's own verifier must re-read the
//! whole working set with errors=0, heartbeats continue with the next sequence number, and every
//! failure leaves the source guest running clean so that a retry succeeds.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::proxy::{ConnFault, ConnProxy, Fault, Proxy};
use common::*;

/// Migration tests share the machine's two cores: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// `--dirty-tracking` of both sides: every scenario runs with the bitmap and with the ring.
type Tracking = &'static str;

/// Generates `<scenario>::bitmap` and `<scenario>::ring` tests.
macro_rules! with_both_trackings {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            fn run(t: super::Tracking) {
                if !super::kvm_available(&format!("{}::{t}", stringify!($scenario))) {
                    return;
                }
                let _g = super::SERIAL.lock().unwrap_or_else(|e| e.into_inner());
                super::$scenario(t);
            }
            #[test]
            fn bitmap() {
                run("bitmap");
            }
            #[test]
            fn ring() {
                run("ring");
            }
        }
    )*};
}

struct Source {
    vm: Proc,
    api: PathBuf,
    dir: PathBuf,
    tracking: Tracking,
}

fn source(t: Tracking, name: &str, cmdline: &str) -> Source {
    source_with(t, name, cmdline, &[])
}

fn source_with(t: Tracking, name: &str, cmdline: &str, extra: &[&str]) -> Source {
    let dir = tmpdir(&format!("{name}-{t}"));
    let api = dir.join("api.sock");
    let mut args = vec!["run", "--memory", "1G", "--cmdline", cmdline, "--api-socket", api.to_str().unwrap()];
    args.extend(["--dirty-tracking", t]);
    args.extend(extra);
    let mut vm = Proc::spawn(&args);
    assert!(vm.wait_reports(3, Duration::from_secs(60)), "source never reported: {} {}", vm.tail(4), vm.stderr_text());
    assert!(wait_socket(&api, Duration::from_secs(5)));
    Source { vm, api, dir, tracking: t }
}

/// A destination, once it listens (it says so after binding, UNIX or TCP).
fn destination(uri: &str, t: Tracking) -> Proc {
    let d = Proc::spawn(&["run", "--incoming", uri, "--dirty-tracking", t]);
    assert!(d.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)), "{}", d.stderr_text());
    d
}

struct Outcome {
    code: i32,
    summary: Option<serde_json::Value>,
    stderr: String,
}

fn migrate(api: &Path, uri: &str, extra: &[&str]) -> Outcome {
    finish(&mut start_migrate(api, uri, extra))
}

/// `ferry migrate --json` running: its stderr has the progress lines (`connected to …`,
/// `iteration N: …`) as they happen.
fn start_migrate(api: &Path, uri: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["migrate", "--api-socket", api.to_str().unwrap(), "--to", uri, "--json"];
    args.extend(extra);
    Proc::spawn(&args)
}

fn finish(mig: &mut Proc) -> Outcome {
    let code = mig.wait_exit(Duration::from_secs(600));
    Outcome {
        code: code.unwrap_or(-1),
        summary: serde_json::from_str(mig.text().trim()).ok(),
        stderr: mig.stderr_text(),
    }
}

/// The destination guest re-verifies the whole working set with errors=0 and its heartbeats
/// continue where the source's stopped.
fn assert_destination_clean(src: &Source, dst: &mut Proc, ws_pages: u64) {
    let base = src.vm.reports().last().unwrap().verified;
    dst.wait_report(|r| r.verified.saturating_sub(base) >= ws_pages, Duration::from_secs(60));
    let r = dst.reports();
    let last = r.last().unwrap_or_else(|| panic!("destination printed no REPORT: {}", dst.stderr_text()));
    assert!(dst.lines_with("VERIFY-FAIL").is_empty(), "{:?}", dst.lines_with("VERIFY-FAIL"));
    assert_eq!(last.errors, 0, "{}", last.line);
    assert!(last.verified - base >= ws_pages, "destination verified {} < {ws_pages}", last.verified - base);
    let n = dst.reports().len();
    assert!(dst.wait_reports(n + 2, Duration::from_secs(10)), "destination stopped reporting");
    let hb = joined_heartbeats(&src.vm, dst);
    let breaks: Vec<(u64, u64)> = hb.windows(2).filter(|w| w[1] != w[0] + 1).map(|w| (w[0], w[1])).collect();
    assert!(breaks.is_empty(), "heartbeat sequence breaks across the move: {breaks:?}");
    assert!(dst.heartbeats().len() > 100, "destination heartbeats did not continue");
}

/// After a failed migration the source guest keeps running with errors=0.
fn assert_source_running_clean(src: &mut Source) {
    let n = src.vm.reports().len();
    assert!(src.vm.wait_reports(n + 3, Duration::from_secs(20)), "source stopped reporting: {}", src.vm.tail(3));
    let r = src.vm.reports();
    assert!(r.iter().all(|x| x.errors == 0), "{}", r.last().unwrap().line);
    assert!(src.vm.lines_with("VERIFY-FAIL").is_empty());
    let st = api(&src.api, r#"{"cmd":"status"}"#);
    assert_eq!(st["state"], "running", "{st}");
}

/// A second attempt after a failure moves the guest with nothing lost.
fn assert_retry_succeeds(src: &Source, ws_pages: u64) {
    let uri = format!("unix:{}", src.dir.join("retry.sock").display());
    let mut dst = destination(&uri, src.tracking);
    let o = migrate(&src.api, &uri, &[]);
    assert_eq!(o.code, 0, "retry failed: {}", o.stderr);
    assert_destination_clean(src, &mut dst, ws_pages);
}

fn run_clean_migration(
    t: Tracking,
    name: &str,
    cmdline: &str,
    ws_mib: u64,
    tcp: bool,
    extra: &[&str],
) -> serde_json::Value {
    let src = source(t, name, cmdline);
    let uri = if tcp {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("tcp:127.0.0.1:{port}")
    } else {
        format!("unix:{}", src.dir.join("mig.sock").display())
    };
    let mut dst = destination(&uri, t);

    let o = migrate(&src.api, &uri, extra);

    assert_eq!(o.code, 0, "migration failed: {}", o.stderr);
    assert_destination_clean(&src, &mut dst, ws_mib * 256);
    o.summary.expect("--json summary")
}

fn idle_guest_migrates_and_verifies_clean_on_the_destination(t: Tracking) {
    let s = run_clean_migration(t, "idle", "mib=256 rate=-1 report_ms=500", 256, false, &[]);

    assert!(s["pages"]["zero"].as_u64().unwrap() > 150_000, "{s}");
    assert!(s["downtime_ms"].as_f64().unwrap() > 0.0);
}

fn guest_dirtying_50_mib_s_migrates_over_unix_with_nothing_lost(t: Tracking) {
    let s = run_clean_migration(t, "d50u", "mib=256 rate=50 report_ms=500", 256, false, &[]);

    assert!(!s["iterations"].as_array().unwrap().is_empty());
    assert!(s["downtime_breakdown"]["final_pages"].as_u64().is_some());
}

fn guest_dirtying_50_mib_s_migrates_over_tcp_with_nothing_lost(t: Tracking) {
    run_clean_migration(t, "d50t", "mib=256 rate=50 report_ms=500", 256, true, &[]);
}

/// The guest is still filling its working set (first touch of never-written memory) while the
/// first pass runs: pages that were holes of the memfd when the pass began become data during
/// it, and every one of them must reach the destination.
fn guest_filling_fresh_memory_during_the_first_pass_loses_no_page(t: Tracking) {
    // 1800 MiB take the guest a few seconds to fill; migrate as soon as it reports.
    let dir = tmpdir(&format!("filling-{t}"));
    let api = dir.join("api.sock");
    let cmdline = "mib=1800 rate=-1 report_ms=100";
    let vm = Proc::spawn(&[
        "run",
        "--memory",
        "2G",
        "--cmdline",
        cmdline,
        "--api-socket",
        api.to_str().unwrap(),
        "--dirty-tracking",
        t,
    ]);
    let mut src = Source { vm, api, dir, tracking: t };
    assert!(src.vm.wait_reports(1, Duration::from_secs(60)), "source never reported: {}", src.vm.stderr_text());
    assert!(wait_socket(&src.api, Duration::from_secs(5)));
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, t);
    let before = src.vm.reports().last().cloned().unwrap();

    let o = migrate(&src.api, &uri, &[]);

    assert_eq!(o.code, 0, "migration failed: {}", o.stderr);
    assert!(before.written < 1800 * 256 * 3 / 4, "the fill was nearly over before the migration: {}", before.line);
    assert_destination_clean(&src, &mut dst, 1800 * 256);
    let written = dst.reports().last().unwrap().written;
    assert_eq!(written, 1800 * 256, "the destination finished the fill");
    src.vm.kill();
}

/// A destination that allocated its RAM before accepting (`--prefault`) fills existing pages
/// with plain copies instead of userfaultfd; pages sent with data and later as ZERO (the guest
/// dirtying at 50 MiB/s rewrites some) must still come out right.
fn guest_dirtying_50_mib_s_migrates_into_a_prefaulted_destination(t: Tracking) {
    let src = source(t, "prefault", "mib=256 rate=50 report_ms=500");
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = Proc::spawn(&["run", "--incoming", &uri, "--dirty-tracking", t, "--memory", "1G", "--prefault"]);
    // RAM is allocated before the listening socket appears.
    dst.wait_stderr("waiting for an incoming migration", Duration::from_secs(30));
    assert!(dst.stderr_text().contains("allocated 1024 MiB of guest RAM"), "{}", dst.stderr_text());

    let o = migrate(&src.api, &uri, &[]);

    assert_eq!(o.code, 0, "migration failed: {}", o.stderr);
    assert_destination_clean(&src, &mut dst, 256 * 256);
}

fn guest_dirtying_flat_out_on_two_vcpus_migrates_within_its_downtime_limit(t: Tracking) {
    let src = source_with(t, "max", "mib=256 rate=0 report_ms=500", &["--cpus", "2"]);
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, t);

    let o = migrate(&src.api, &uri, &["--downtime-ms", "500"]);

    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_destination_clean(&src, &mut dst, 256 * 256);
    let last = dst.reports().last().cloned().unwrap();
    assert_eq!(last.lanes, 2);
}

fn capped_link_that_cannot_converge_fails_clearly_and_the_source_runs_on(t: Tracking) {
    let mut src = source(t, "noconv", "mib=256 rate=0 report_ms=500");
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, t);

    // Without the throttle: this is about the engine giving up after --max-iterations. (With
    // auto-converge throttling a ring-tracked guest every 5 ms for the ~25 s this takes, the
    // source guest was twice seen to stop running in full-suite runs; that is open, see the
    // issue notes.)
    let o = migrate(&src.api, &uri, &["--max-bandwidth", "32", "--max-iterations", "3", "--no-auto-converge"]);

    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("did not converge after 3 iterations"), "{}", o.stderr);
    assert_source_running_clean(&mut src);
    assert!(dst.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0), "destination must discard and exit");
}

/// Killed once the first iteration was reported: in the second, which at 64 MiB/s takes seconds
/// (the guest dirtied ~50 MiB/s during the first).
fn destination_killed_mid_iteration_leaves_the_source_running_and_a_retry_works(t: Tracking) {
    let mut src = source(t, "kill", "mib=256 rate=50 report_ms=500");
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, t);
    let mut mig = start_migrate(&src.api, &uri, &["--max-bandwidth", "64"]);
    let first_done = mig.wait_stderr("iteration 1:", Duration::from_secs(60));

    dst.kill();
    let o = finish(&mut mig);

    assert!(first_done, "the first iteration never ended: {}", mig.stderr_text());

    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("migration failed"), "{}", o.stderr);
    assert_source_running_clean(&mut src);
    assert_retry_succeeds(&src, 256 * 256);
}

fn faulty_migration(t: Tracking, name: &str, fault: Fault, expect: &str) {
    let mut src = source(t, name, "mib=256 rate=50 report_ms=500");
    let dst_sock = src.dir.join("dst.sock");
    let mut dst = destination(&format!("unix:{}", dst_sock.display()), t);
    let proxy = Proxy::start(src.dir.join("proxy.sock"), dst_sock, fault);

    let o = migrate(&src.api, &proxy.uri, &[]);

    assert_ne!(o.code, 0, "migration through a faulty link succeeded");
    assert!(o.stderr.contains(expect), "error should mention {expect:?}: {}", o.stderr);
    assert_source_running_clean(&mut src);
    assert!(dst.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0), "destination must discard and exit");
    assert!(dst.reports().is_empty(), "destination must not run the guest");
    assert_retry_succeeds(&src, 256 * 256);
}

/// A destination that stops reading but keeps its connection (hung, stopped, or a link that
/// died without a reset) at `fault`: the migration fails with `expect` once the stall timeout
/// (1.5 s) passes, not when the stall ends (60 s), the source guest runs on, and a retry works.
fn stalled_destination(t: Tracking, name: &str, fault: Fault, expect: &str) {
    let mut src = source(t, name, "mib=256 rate=50 report_ms=500");
    let dst_sock = src.dir.join("dst.sock");
    let _dst = destination(&format!("unix:{}", dst_sock.display()), t);
    let proxy = Proxy::start(src.dir.join("proxy.sock"), dst_sock, fault);

    let o = migrate(&src.api, &proxy.uri, &["--stall-timeout-ms", "1500"]);
    let ended = Instant::now();

    assert_ne!(o.code, 0, "migration to a stalled destination succeeded");
    assert!(o.stderr.contains(expect), "error should mention {expect:?}: {}", o.stderr);
    let stalled_at =
        proxy.stalled_at.lock().unwrap().expect("the proxy never stalled: the fault point was not reached");
    // The timeout, the 0.5 s wait for a refusal after a failed send, and slack; a second
    // stall period (a failed send retried) would exceed it.
    let waited = ended - stalled_at;
    assert!(waited < Duration::from_millis(2900), "the migration failed {waited:?} after the stall began");
    assert_source_running_clean(&mut src);
    assert_retry_succeeds(&src, 256 * 256);
}

fn destination_that_stops_reading_mid_iteration_fails_after_the_stall_timeout_and_a_retry_works(t: Tracking) {
    let fault = Fault::StallAtRecord { record: ferry_stream::rtype::PAGE_BATCH, from_index: 40, hold_ms: 60_000 };
    stalled_destination(t, "stall", fault, "the destination took no data for 1.5 s");
}

/// The same in a later iteration (64-page batches).
fn destination_that_stops_reading_in_a_later_iteration_fails_after_the_stall_timeout(t: Tracking) {
    // The first pass is 512 batches of 512 pages (1 GiB) after MACHINE_CONFIG (index 0): 520
    // is in the second pass, which always exists (rate=50 dirties pages during the first).
    let fault = Fault::StallAtRecord { record: ferry_stream::rtype::PAGE_BATCH, from_index: 520, hold_ms: 60_000 };
    stalled_destination(t, "stall2", fault, "the destination took no data for 1.5 s");
}

/// The final pass fits in socket buffers, so the source waits with its guest paused for the
/// destination to read it: that wait is bounded the same way.
fn destination_that_stops_reading_in_the_final_pass_resumes_the_source_and_a_retry_works(t: Tracking) {
    let fault = Fault::StallAtRecord { record: ferry_stream::rtype::VM_STATE, from_index: 0, hold_ms: 60_000 };
    stalled_destination(t, "stallfin", fault, "the destination took no data for 1.5 s");
}

/// A destination that read the whole stream and never answers: the source, its guest paused,
/// gives up after the stall timeout and resumes.
fn destination_that_never_answers_resumes_the_source_and_a_retry_works(t: Tracking) {
    stalled_destination(
        t,
        "noanswer",
        Fault::SwallowAnswer { hold_ms: 60_000 },
        "the destination sent no answer for 1.5 s",
    );
}

/// A source that stops sending mid-stream (hung, stopped, or a link that died without a reset)
/// does not keep the destination waiting: after its own `--stall-timeout-ms` the destination
/// fails, naming the silence, with nothing started. The source here waits longer (3 s) so that
/// the destination's bound, not the source's failure, is what ends it; the source then fails by
/// its own bound and runs on clean.
#[test]
fn destination_fails_after_its_stall_timeout_when_the_source_stops_sending() {
    if !kvm_available("destination_fails_after_its_stall_timeout_when_the_source_stops_sending") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut src = source("bitmap", "quietsrc", "mib=256 rate=50 report_ms=500");
    let dst_sock = src.dir.join("dst.sock");
    let dst_uri = format!("unix:{}", dst_sock.display());
    let mut dst = Proc::spawn(&["run", "--incoming", &dst_uri, "--stall-timeout-ms", "1500"]);
    wait_listening(&dst_sock);
    let fault = Fault::StallAtRecord { record: ferry_stream::rtype::PAGE_BATCH, from_index: 40, hold_ms: 60_000 };
    let proxy = Proxy::start(src.dir.join("proxy.sock"), dst_sock, fault);
    let (api_path, uri) = (src.api.clone(), proxy.uri.clone());
    let mig = std::thread::spawn(move || migrate(&api_path, &uri, &["--stall-timeout-ms", "3000"]));

    let exit = dst.wait_exit_seen(Duration::from_secs(20));
    let o = mig.join().unwrap();

    let (code, dst_ended) = exit.expect("the destination was still waiting 20 s later");
    assert!(code.is_some_and(|c| c != 0), "the destination did not fail: {code:?}");
    let err = dst.stderr_text();
    assert!(err.contains("the source sent no data for 1.5 s"), "{err}");
    assert!(err.contains("nothing was started"), "{err}");
    assert!(dst.reports().is_empty(), "the destination ran a guest");
    let stalled_at =
        proxy.stalled_at.lock().unwrap().expect("the proxy never stalled: the fault point was not reached");
    let waited = dst_ended - stalled_at;
    assert!(waited >= Duration::from_millis(1400), "the destination gave up {waited:?} after the stall began");
    assert!(waited < Duration::from_millis(2900), "the destination failed {waited:?} after the stall began");
    assert_ne!(o.code, 0, "the migration succeeded without a destination");
    assert_source_running_clean(&mut src);
}

/// Once the destination has acknowledged, only the source decides: a COMMIT that arrives later
/// than the destination's stall timeout (held 2.5 s against its 1 s) must still start the guest
/// there, not be given up on (the source has already let its guest go).
#[test]
fn a_commit_slower_than_the_destinations_stall_timeout_still_hands_over() {
    if !kvm_available("a_commit_slower_than_the_destinations_stall_timeout_still_hands_over") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let src = source("bitmap", "slowcommit", "mib=256 rate=50 report_ms=500");
    let dst_sock = src.dir.join("dst.sock");
    let dst_uri = format!("unix:{}", dst_sock.display());
    let mut dst = Proc::spawn(&["run", "--incoming", &dst_uri, "--stall-timeout-ms", "1000"]);
    wait_listening(&dst_sock);
    let proxy = Proxy::start(src.dir.join("proxy.sock"), dst_sock, Fault::DelayCommit { hold_ms: 2500 });

    let o = migrate(&src.api, &proxy.uri, &[]);

    assert_eq!(o.code, 0, "migration failed: {}", o.stderr);
    assert!(proxy.stalled_at.lock().unwrap().is_some(), "the proxy never held a COMMIT back");
    assert_destination_clean(&src, &mut dst, 256 * 256);
}

/// A cancel while the sender is blocked on a destination that stopped reading takes effect at
/// once, not at the (default, 10 s) stall timeout.
fn migration_blocked_on_a_stalled_destination_can_be_cancelled(t: Tracking) {
    let mut src = source(t, "stallcancel", "mib=256 rate=50 report_ms=500");
    let dst_sock = src.dir.join("dst.sock");
    let _dst = destination(&format!("unix:{}", dst_sock.display()), t);
    let fault = Fault::StallAtRecord { record: ferry_stream::rtype::PAGE_BATCH, from_index: 40, hold_ms: 60_000 };
    let proxy = Proxy::start(src.dir.join("proxy.sock"), dst_sock, fault);
    let mut mig = start_migrate(&src.api, &proxy.uri, &[]);
    let stalled = wait_until(Duration::from_secs(60), || proxy.stalled_at.lock().unwrap().is_some());
    // The socket buffers between source and proxy fill within milliseconds of the stall, and
    // nothing shows when the sender blocks on them: 200 ms of wall time covers it.
    std::thread::sleep(Duration::from_millis(200));

    let cancelled_at = Instant::now();
    let cancel_status =
        Command::new(FERRY).args(["migrate-cancel", "--api-socket", src.api.to_str().unwrap()]).status().unwrap();
    let ended = mig.wait_exit_seen(Duration::from_secs(30)).map(|(_, at)| at);
    let o = finish(&mut mig);

    assert!(stalled, "the proxy never stalled: the fault point was not reached");
    assert!(cancel_status.success());
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("migration cancelled"), "{}", o.stderr);
    // Behaviour, not speed: the cancel ended it, well before the 10 s stall timeout would have.
    let after_cancel = ended.expect("the migration did not end after the cancel") - cancelled_at;
    assert!(after_cancel < Duration::from_secs(5), "the cancel took {after_cancel:?} to end the migration");
    assert_source_running_clean(&mut src);
    assert_retry_succeeds(&src, 256 * 256);
}

fn connection_cut_during_the_final_pass_resumes_the_source_and_a_retry_works(t: Tracking) {
    faulty_migration(t, "cut", Fault::CutAtRecord(4), "migration failed");
}

fn truncated_stream_is_refused_by_the_destination_and_a_retry_works(t: Tracking) {
    faulty_migration(t, "trunc", Fault::TruncateAfter(20 << 20), "migration failed");
}

fn byte_flipped_in_a_page_batch_is_caught_by_its_checksum_and_a_retry_works(t: Tracking) {
    faulty_migration(t, "flip", Fault::FlipByte { index: 3, offset: 9000 }, "checksum mismatch");
}

/// The `ferry migrate` client killed mid-migration: the migration (run by the source's API)
/// goes on, and once the guest runs on the destination the source ends, as with a live client.
#[test]
fn a_killed_migrate_client_does_not_keep_the_source_alive_after_the_guest_left() {
    if !kvm_available("a_killed_migrate_client_does_not_keep_the_source_alive_after_the_guest_left") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut src = source("bitmap", "killedcli", "mib=128 rate=30 report_ms=500");
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, "bitmap");
    let mut cli =
        Proc::spawn(&["migrate", "--api-socket", src.api.to_str().unwrap(), "--to", &uri, "--max-bandwidth", "100"]);
    assert!(cli.wait_stderr("connected to", Duration::from_secs(20)), "{}", cli.stderr_text());

    cli.kill();
    let code = src.vm.wait_exit(Duration::from_secs(60));

    assert_eq!(code, Some(0), "the source did not end after its guest left: {}", src.vm.stderr_text());
    assert_destination_clean(&src, &mut dst, 128 * 256);
}

fn cancelled_migration_leaves_the_source_running_and_the_destination_discards(t: Tracking) {
    let mut src = source(t, "cancel", "mib=256 rate=50 report_ms=500");
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, t);
    let mut mig = start_migrate(&src.api, &uri, &["--max-bandwidth", "32"]);
    // Connected: the first pass (256 MiB at 32 MiB/s) has begun.
    let connected = mig.wait_stderr("connected to", Duration::from_secs(30));

    // Resuming or pausing a guest that is moving must be refused.
    let resume = api(&src.api, r#"{"cmd":"resume"}"#);
    let cancel_status =
        Command::new(FERRY).args(["migrate-cancel", "--api-socket", src.api.to_str().unwrap()]).status().unwrap();
    let o = finish(&mut mig);

    assert!(connected, "the migration never connected: {}", mig.stderr_text());
    assert_eq!(resume["ok"], false, "resume during a migration was accepted: {resume}");
    assert!(resume["error"].as_str().unwrap().contains("a migration is running"), "{resume}");
    assert!(cancel_status.success());
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("cancelled"), "{}", o.stderr);
    assert_source_running_clean(&mut src);
    assert!(dst.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0));
    assert!(dst.reports().is_empty());
}

/// A second consumer of the dirty log (the dirty-rate monitor, which harvests and re-protects
/// pages on its own) polled throughout a migration must not make the migration lose a page.
fn dirty_rate_polled_throughout_a_migration_loses_no_page(t: Tracking) {
    let src = source(t, "rate", "mib=256 rate=50 report_ms=500");
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, t);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let poller = {
        let (stop, answers, api_path) = (stop.clone(), answers.clone(), src.api.clone());
        std::thread::spawn(move || {
            let mut rates = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let out = Command::new(FERRY)
                    .args(["dirty-rate", "--api-socket", api_path.to_str().unwrap(), "--window-ms", "100", "--json"])
                    .output()
                    .unwrap();
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                    rates.push(v["mib_per_s"].as_f64().unwrap_or(0.0));
                    answers.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            rates
        })
    };
    let polling = wait_until(Duration::from_secs(30), || answers.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert!(polling, "dirty-rate never answered before the migration");

    let o = migrate(&src.api, &uri, &[]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rates = poller.join().unwrap();

    assert_eq!(o.code, 0, "migration failed: {}", o.stderr);
    assert!(rates.len() >= 2, "dirty-rate succeeded only {} times during the migration", rates.len());
    assert!(rates.iter().any(|&r| r > 10.0), "dirty-rate never saw the guest's 50 MiB/s: {rates:?}");
    assert_destination_clean(&src, &mut dst, 256 * 256);
}

/// A guest that dirties faster than the link sends never converges by itself: here a flat-out
/// guest (about 100 000 pages/s under dirty tracking on this host) over a link capped at
/// 128 MiB/s (32 768 pages/s; uncapped, a local link now outruns it). The cap paces pre-copy
/// only; the final pass runs uncapped. Ferry throttles the guest (auto-converge, on by
/// default) until it converges within the default downtime limit, and nothing is lost. With
/// --no-auto-converge the same migration is never throttled. How short the pause gets is a
/// figure, not asserted here (see the migration bench).
fn flat_out_guest_over_a_capped_link_is_throttled_until_it_converges(t: Tracking) {
    let s = run_clean_migration(t, "ac", "mib=256 rate=0 report_ms=500", 256, false, &["--max-bandwidth", "128"]);
    // Unthrottled, the dirty set stalls at the whole working set (~256 MiB, estimated at the
    // capped rate to take ~2 s): give it a limit it meets, so it switches over once stalled.
    let off = run_clean_migration(
        t,
        "noac",
        "mib=256 rate=0 report_ms=500",
        256,
        false,
        &["--no-auto-converge", "--max-bandwidth", "128", "--downtime-ms", "4000"],
    );

    assert!(s["max_throttle_percent"].as_u64().unwrap() > 0, "the guest was never throttled: {s}");
    assert_eq!(off["max_throttle_percent"], 0, "--no-auto-converge throttled: {off}");
}

with_both_trackings!(
    flat_out_guest_over_a_capped_link_is_throttled_until_it_converges,
    dirty_rate_polled_throughout_a_migration_loses_no_page,
    idle_guest_migrates_and_verifies_clean_on_the_destination,
    guest_dirtying_50_mib_s_migrates_over_unix_with_nothing_lost,
    guest_dirtying_50_mib_s_migrates_over_tcp_with_nothing_lost,
    guest_dirtying_50_mib_s_migrates_into_a_prefaulted_destination,
    guest_filling_fresh_memory_during_the_first_pass_loses_no_page,
    guest_dirtying_flat_out_on_two_vcpus_migrates_within_its_downtime_limit,
    capped_link_that_cannot_converge_fails_clearly_and_the_source_runs_on,
    destination_killed_mid_iteration_leaves_the_source_running_and_a_retry_works,
    connection_cut_during_the_final_pass_resumes_the_source_and_a_retry_works,
    destination_that_stops_reading_mid_iteration_fails_after_the_stall_timeout_and_a_retry_works,
    destination_that_stops_reading_in_the_final_pass_resumes_the_source_and_a_retry_works,
    migration_blocked_on_a_stalled_destination_can_be_cancelled,
    destination_that_stops_reading_in_a_later_iteration_fails_after_the_stall_timeout,
    destination_that_never_answers_resumes_the_source_and_a_retry_works,
    truncated_stream_is_refused_by_the_destination_and_a_retry_works,
    byte_flipped_in_a_page_batch_is_caught_by_its_checksum_and_a_retry_works,
    cancelled_migration_leaves_the_source_running_and_the_destination_discards,
    postcopy_moves_a_flat_out_guest_with_nothing_lost,
);

/// `--compress zstd` on a guest whose pages compress like ordinary memory (`word_bits=16`: six
/// of every eight bytes zero) while it dirties 50 MiB/s: every page arrives (the destination
/// re-verifies the whole working set, heartbeats unbroken) and the stream carries the page
/// data in far fewer bytes.
#[test]
fn compressed_migration_moves_every_page_in_fewer_bytes() {
    if !kvm_available("compressed_migration_moves_every_page_in_fewer_bytes") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let src = source("bitmap", "zstd", "mib=128 rate=50 word_bits=16 hb_us=1000 report_ms=300");
    assert!(!src.vm.lines_with("CONFIG word_bits=16").is_empty(), "the guest did not take word_bits");
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, "bitmap");

    let o = migrate(&src.api, &uri, &["--compress", "zstd"]);

    assert_eq!(o.code, 0, "compressed migration failed: {}", o.stderr);
    let s = o.summary.expect("--json summary");
    let z = &s["zstd"];
    let (raw, wire) = (z["page_bytes"].as_u64().unwrap(), z["wire_bytes"].as_u64().unwrap());
    assert_eq!(raw, s["pages"]["normal"].as_u64().unwrap() * 4096, "{s}");
    assert!(raw >= 128 << 20, "the working set's pages went uncounted: {z}");
    assert!(wire * 3 < raw * 2, "zstd saved less than a third of the page data: {z}");
    assert!(s["bytes"].as_u64().unwrap() < raw, "the stream is not smaller than its pages: {s}");
    assert_eq!(z["level"], 1, "{z}");
    assert_destination_clean(&src, &mut dst, 128 * 256);
}

/// `--channels 3`: page data over three connections, each frame always on the channel of its
/// 2 MiB shard. A guest dirtying 50 MiB/s moves with nothing lost, and each connection carries
/// its share.
#[test]
fn page_channels_carry_every_page_and_the_guest_verifies_clean() {
    if !kvm_available("page_channels_carry_every_page_and_the_guest_verifies_clean") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut src = source("bitmap", "channels", "mib=256 rate=50 report_ms=300");
    assert!(src.vm.wait_report(|r| r.written >= 256 * 256, Duration::from_secs(60)), "the guest never filled its set");
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, "bitmap");

    let o = migrate(&src.api, &uri, &["--channels", "3"]);

    assert_eq!(o.code, 0, "migration over three channels failed: {}", o.stderr);
    let s = o.summary.expect("--json summary");
    assert_eq!(s["channels"], 3, "{s}");
    let per: Vec<u64> = s["channel_bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect();
    assert_eq!(per.len(), 3, "{s}");
    // The data pages in 2 MiB shards, round robin: each channel carries about a third.
    let total: u64 = per.iter().sum();
    assert_eq!(total, s["bytes"].as_u64().unwrap(), "{s}");
    assert!(total > 32 << 20, "{s}");
    assert!(per.iter().all(|&b| b > total / 5), "a channel carried far less than its share: {per:?}");
    assert!(s["pages"]["normal"].as_u64().unwrap() >= 256 * 256, "{s}");
    assert_destination_clean(&src, &mut dst, 256 * 256);
}

/// Channels with zstd on each and the dirty ring: each channel compresses its own pages, and
/// nothing is lost.
#[test]
fn compressed_page_channels_with_the_dirty_ring_lose_no_page() {
    if !kvm_available("compressed_page_channels_with_the_dirty_ring_lose_no_page") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let src = source("ring", "chzstd", "mib=128 rate=50 word_bits=16 hb_us=1000 report_ms=300");
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, "ring");

    let o = migrate(&src.api, &uri, &["--channels", "2", "--compress", "zstd"]);

    assert_eq!(o.code, 0, "compressed migration over two channels failed: {}", o.stderr);
    let s = o.summary.expect("--json summary");
    let z = &s["zstd"];
    let (raw, wire) = (z["page_bytes"].as_u64().unwrap(), z["wire_bytes"].as_u64().unwrap());
    assert_eq!(raw, s["pages"]["normal"].as_u64().unwrap() * 4096, "{s}");
    assert!(wire * 3 < raw * 2, "zstd over channels saved less than a third of the page data: {z}");
    assert_eq!(s["channel_bytes"].as_array().map(Vec::len), Some(2), "{s}");
    assert_destination_clean(&src, &mut dst, 128 * 256);
}

/// One page channel's connection cut mid-migration: the migration fails naming the channel, the
/// source guest runs on clean (the bits of what the channels had not confirmed go back), the
/// destination discards everything and exits, and a retry moves the guest with nothing lost.
#[test]
fn a_page_channel_cut_mid_migration_resumes_the_source_and_a_retry_works() {
    if !kvm_available("a_page_channel_cut_mid_migration_resumes_the_source_and_a_retry_works") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut src = source("bitmap", "chcut", "mib=256 rate=50 report_ms=500");
    let dst_sock = src.dir.join("dst.sock");
    let mut dst = destination(&format!("unix:{}", dst_sock.display()), "bitmap");
    // Connection 1 is the first page channel (0 is the main connection).
    let proxy = ConnProxy::start(src.dir.join("proxy.sock"), dst_sock, Some((1, ConnFault::Cut(16 << 20))));

    let o = migrate(&src.api, &proxy.uri, &["--channels", "2", "--max-bandwidth", "256"]);

    assert!(proxy.cut.load(std::sync::atomic::Ordering::SeqCst), "the proxy never cut the channel");
    assert_ne!(o.code, 0, "a migration whose channel was cut succeeded");
    assert!(o.stderr.contains("page channel 1"), "the error should name the channel: {}", o.stderr);
    assert_source_running_clean(&mut src);
    assert!(dst.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0), "destination must discard and exit");
    assert!(dst.reports().is_empty(), "destination must not run the guest");
    assert_retry_succeeds(&src, 256 * 256);
}

/// A byte flipped in page channel 2 of 3: the destination's channel finds the checksum wrong,
/// stops the whole load (its other channels included, blocked in reads) and refuses naming
/// the channel; the source guest runs on clean, the destination exits, and a retry works.
#[test]
fn a_corrupt_page_channel_stops_the_destination_with_the_channels_error() {
    if !kvm_available("a_corrupt_page_channel_stops_the_destination_with_the_channels_error") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut src = source("bitmap", "chflip", "mib=256 rate=50 report_ms=500");
    let dst_sock = src.dir.join("dst.sock");
    let mut dst = destination(&format!("unix:{}", dst_sock.display()), "bitmap");
    // Connection 2 is the second page channel; 4 MiB into it is page data.
    let proxy = ConnProxy::start(src.dir.join("proxy.sock"), dst_sock, Some((2, ConnFault::Flip(4 << 20))));

    let o = migrate(&src.api, &proxy.uri, &["--channels", "3"]);

    assert!(proxy.cut.load(std::sync::atomic::Ordering::SeqCst), "the proxy never flipped a byte");
    assert_ne!(o.code, 0, "a migration with a corrupt channel succeeded");
    assert!(o.stderr.contains("page channel 2") && o.stderr.contains("checksum"), "{}", o.stderr);
    assert!(dst.wait_exit(Duration::from_secs(20)).is_some_and(|c| c != 0), "destination must discard and exit");
    assert!(dst.stderr_text().contains("page channel 2"), "{}", dst.stderr_text());
    assert!(dst.reports().is_empty(), "destination must not run the guest");
    assert_source_running_clean(&mut src);
    assert_retry_succeeds(&src, 256 * 256);
}

/// Runs a post-copy scenario once (bitmap tracking), alone on the machine.
fn postcopy_scenario(name: &str, f: fn()) {
    if !kvm_available(name) {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    f();
}

/// The link of the post-copy tests, in MiB/s. Uncapped, the first pass of the 256 MiB working
/// set took so little time on a fast host that the guest (each first write after a dirty-log
/// clear costs a write-protect fault here) dirtied fewer than 1000 pages, and the push sent them
/// all in 6 ms, before the guest touched one: nothing was left to test. At 128 MiB/s the first
/// pass takes about 2 s and the push of what the guest dirtied meanwhile is long enough for the
/// guest to fault on pages still missing.
const POSTCOPY_BANDWIDTH: &str = "128";

/// How much of the post-copy page stream the link carries before it is cut. Small against what
/// a flat-out guest owes at the switch (`assert_postcopy_summary` asks for more than 1000
/// pages; a CI host that starved the guest during the first pass once left fewer than the 8 MiB
/// this used to be, and the whole post-copy went through before the "cut").
const POSTCOPY_CUT_AFTER: u64 = 1 << 20;

/// Checks a post-copy summary: every page owed at the switch went (asked for or pushed), and
/// the destination saw faults on missing pages (a flat-out guest touches them at once).
fn assert_postcopy_summary(s: &serde_json::Value) -> serde_json::Value {
    let pc = s["postcopy"].clone();
    assert!(pc.is_object(), "no post-copy in the summary: {s}");
    let owed = pc["pages_at_switch"].as_u64().unwrap();
    assert!(owed > 1000, "a flat-out guest left only {owed} pages for post-copy: {pc}");
    let (asked, pushed) = (pc["requested_pages"].as_u64().unwrap(), pc["pushed_pages"].as_u64().unwrap());
    assert!(asked + pushed >= owed, "{asked} asked + {pushed} pushed < {owed} owed: {pc}");
    assert!(pc["destination"]["remote_faults"].as_u64().unwrap() > 0, "{pc}");
    pc
}

/// `--postcopy`: after the first pass the guest runs on the destination at once, its missing
/// pages arriving while it runs; the destination's verifier re-reads the whole working set.
fn postcopy_moves_a_flat_out_guest_with_nothing_lost(t: Tracking) {
    let src = source(t, "postcopy", "mib=256 rate=0 hb_us=1000 report_ms=300");
    let uri = format!("unix:{}", src.dir.join("mig.sock").display());
    let mut dst = destination(&uri, t);

    let o = migrate(&src.api, &uri, &["--postcopy", "--max-bandwidth", POSTCOPY_BANDWIDTH]);

    assert_eq!(o.code, 0, "post-copy migration failed: {}", o.stderr);
    let s = o.summary.expect("--json summary");
    assert_postcopy_summary(&s);
    assert_eq!(s["iterations"].as_array().unwrap().len(), 1, "--postcopy switches after the first pass: {s}");
    assert_destination_clean(&src, &mut dst, 256 * 256);
    assert!(dst.wait_stderr("post-copy complete", Duration::from_secs(10)), "{}", dst.stderr_text());
}

/// The link fails while the guest already runs on the destination: the source keeps what it
/// still owes, the destination's guest waits for it, and `migrate-resume` finishes over a new
/// connection straight to the destination, nothing lost.
#[test]
fn postcopy_link_cut_is_resumed_over_a_new_connection_with_nothing_lost() {
    postcopy_scenario("postcopy_link_cut", || {
        let mut src = source("bitmap", "pc-cut", "mib=256 rate=0 hb_us=1000 report_ms=300");
        let dst_sock = src.dir.join("dst.sock");
        let dst_uri = format!("unix:{}", dst_sock.display());
        let dst_api = src.dir.join("dst-api.sock");
        let mut dst = Proc::spawn(&["run", "--incoming", &dst_uri, "--api-socket", dst_api.to_str().unwrap()]);
        assert!(dst.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)), "{}", dst.stderr_text());
        let proxy = Proxy::start(
            src.dir.join("proxy.sock"),
            dst_sock,
            Fault::CutInPostcopy { after_bytes: POSTCOPY_CUT_AFTER },
        );

        let o = migrate(&src.api, &proxy.uri, &["--postcopy", "--max-bandwidth", POSTCOPY_BANDWIDTH]);

        assert_ne!(o.code, 0, "the post-copy through a cut link reported success: {:?} {}", o.summary, o.stderr);
        assert!(o.stderr.contains("migrate-resume"), "the error should say how to go on: {}", o.stderr);
        assert!(dst.wait_stderr("waiting up to", Duration::from_secs(20)), "{}", dst.stderr_text());
        // The source stays to serve the rest; it must not run the guest.
        assert!(src.vm.wait_exit(Duration::from_millis(500)).is_none(), "the source exited with pages still owed");
        let st = api(&src.api, r#"{"cmd":"resume"}"#);
        assert_eq!(st["ok"], false, "the source resumed a guest that runs on the destination: {st}");
        // Nothing copies the destination's guest while its memory is still arriving (a
        // snapshot would take the missing pages for zero pages).
        assert!(wait_socket(&dst_api, Duration::from_secs(5)));
        let snap = src.dir.join("early.snap");
        let st = api(&dst_api, &format!(r#"{{"cmd":"snapshot","to":"{}"}}"#, snap.display()));
        assert_eq!(st["ok"], false, "{st}");
        assert!(st["error"].as_str().unwrap().contains("still arriving"), "{st}");

        let mut r =
            Proc::spawn(&["migrate-resume", "--api-socket", src.api.to_str().unwrap(), "--to", &dst_uri, "--json"]);
        let code = r.wait_exit(Duration::from_secs(120));

        assert_eq!(code, Some(0), "migrate-resume failed: {}", r.stderr_text());
        let s: serde_json::Value = serde_json::from_str(r.text().trim()).expect("--json summary");
        assert_eq!(s["postcopy"]["recoveries"], 1, "{s}");
        assert_destination_clean(&src, &mut dst, 256 * 256);
        assert_eq!(
            src.vm.wait_exit(Duration::from_secs(20)),
            Some(0),
            "the source should exit once the guest is whole"
        );
    });
}

/// A post-copy whose source dies: only the source had the missing pages, so the destination
/// waits for it as long as it was told, then fails loudly (exit status 1, naming the loss).
#[test]
fn postcopy_destination_gives_up_loudly_when_the_source_never_comes_back() {
    postcopy_scenario("postcopy_source_dies", || {
        let mut src = source("bitmap", "pc-dies", "mib=256 rate=0 hb_us=1000 report_ms=300");
        let dst_sock = src.dir.join("dst.sock");
        let dst_uri = format!("unix:{}", dst_sock.display());
        let mut dst = Proc::spawn(&["run", "--incoming", &dst_uri, "--postcopy-recover-timeout-ms", "3000"]);
        assert!(dst.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)));
        let proxy = Proxy::start(
            src.dir.join("proxy.sock"),
            dst_sock,
            Fault::CutInPostcopy { after_bytes: POSTCOPY_CUT_AFTER },
        );
        let o = migrate(&src.api, &proxy.uri, &["--postcopy", "--max-bandwidth", POSTCOPY_BANDWIDTH]);
        assert_ne!(o.code, 0);

        src.vm.kill();
        let code = dst.wait_exit(Duration::from_secs(30));

        assert_eq!(code, Some(1), "the destination should fail: {}", dst.stderr_text());
        let err = dst.stderr_text();
        assert!(err.contains("post-copy failed") && err.contains("the source never came back"), "{err}");
    });
}

/// Issue 21 item 1, the lost heartbeat (15de27f: "HB 2260 then 2262"). A line the guest is in
/// the middle of printing when the source pauses for the switch-over used to come out half from
/// the source (its pause passed the partial line on) and half from the destination. Only a
/// reader that joined the two outputs, once the source's had ended, saw the line whole; a
/// source that exited late (starved in the idle class) left the halves unjoined, and that
/// heartbeat was lost to the reader. The partial line now stays in the source's serial state
/// and the destination writes it whole. Twenty migrations in a row of a guest that prints long
/// REPORT lines every 20 ms (each takes milliseconds at one exit per byte, so a pause often
/// lands inside one): no output ends inside a line, and every line of every process, read on
/// its own without joining anything, is whole (every HB in sequence, every REPORT parses).
#[test]
fn a_line_cut_by_the_switch_over_comes_out_whole_from_one_process() {
    if !kvm_available("a_line_cut_by_the_switch_over_comes_out_whole_from_one_process") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("whole-lines");
    let api0 = dir.join("api-0.sock");
    let mut procs = vec![Proc::spawn(&[
        "run",
        "--cmdline",
        "mib=32 rate=50 hb_us=1000 report_ms=20",
        "--api-socket",
        api0.to_str().unwrap(),
    ])];
    assert!(procs[0].wait_reports(3, Duration::from_secs(60)), "{}", procs[0].stderr_text());
    assert!(wait_socket(&api0, Duration::from_secs(5)));
    let mut cur = api0;

    for i in 1..=20 {
        let uri = format!("unix:{}", dir.join(format!("mig-{i}.sock")).display());
        let next_api = dir.join(format!("api-{i}.sock"));
        let dst = Proc::spawn(&["run", "--incoming", &uri, "--api-socket", next_api.to_str().unwrap()]);
        assert!(dst.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)), "{}", dst.stderr_text());

        let o = migrate(&cur, &uri, &[]);

        assert_eq!(o.code, 0, "migration {i}: {}", o.stderr);
        let src = procs.last_mut().unwrap();
        assert_eq!(src.wait_exit(Duration::from_secs(30)), Some(0), "migration {i}: the source did not exit");
        assert!(wait_until(Duration::from_secs(10), || *src.eof.lock().unwrap()), "migration {i}: output never ended");
        assert!(
            !*src.cut_tail.lock().unwrap(),
            "migration {i}: the source's output ends inside a line: {:?}",
            src.lines.lock().unwrap().last()
        );
        procs.push(dst);
        let dst = procs.last_mut().unwrap();
        assert!(
            dst.wait_reports(2, Duration::from_secs(30)),
            "migration {i}: the guest stopped: {}",
            dst.stderr_text()
        );
        assert!(wait_socket(&next_api, Duration::from_secs(5)));
        cur = next_api;
    }

    let mut hb: Vec<u64> = Vec::new();
    for (k, p) in procs.iter().enumerate() {
        for (_, l) in p.lines.lock().unwrap().iter() {
            if let Some(n) = l.strip_prefix("HB ") {
                hb.push(n.trim().parse().unwrap_or_else(|_| panic!("process {k}: a cut heartbeat line {l:?}")));
            } else if l.starts_with("REPORT ") {
                // Whole: it parses and ends with its last lane's written/verified/errors.
                let end = l.split_whitespace().last().unwrap_or_default();
                assert!(
                    Report::parse(l).is_some() && end.starts_with("lane") && end.matches('/').count() == 2,
                    "process {k}: a cut REPORT line {l:?}"
                );
            } else {
                assert!(l.starts_with("BOOT "), "process {k}: a cut or unexpected line {l:?}");
            }
        }
    }
    let breaks: Vec<(u64, u64)> = hb.windows(2).filter(|w| w[1] != w[0] + 1).map(|w| (w[0], w[1])).collect();
    assert!(breaks.is_empty(), "heartbeats out of sequence across 20 migrations: {breaks:?}");
    let last = procs.last_mut().unwrap();
    assert_eq!(last.reports().last().unwrap().errors, 0);
    let _ = api(&cur, r#"{"cmd":"quit"}"#);
}

/// A post-copy whose destination dies: the guest ran there, so the source's copy is stale
/// (docs/migration.md). The source keeps what it owes, stays in `postcopy-paused` and never
/// runs the guest again (no heartbeat, `resume` refused); `quit` ends it.
#[test]
fn postcopy_source_never_runs_the_guest_again_when_the_destination_dies() {
    postcopy_scenario("postcopy_destination_dies", || {
        let mut src = source("bitmap", "pc-dst-dies", "mib=256 rate=0 hb_us=1000 report_ms=300");
        let uri = format!("unix:{}", src.dir.join("mig.sock").display());
        let mut dst = destination(&uri, "bitmap");
        // A capped link: the push of the owed pages lasts seconds, so the destination dies in
        // the middle of it.
        let mut mig = start_migrate(&src.api, &uri, &["--postcopy", "--max-bandwidth", "32"]);
        assert!(
            dst.wait_heartbeats(5, Duration::from_secs(60)),
            "the guest never ran on the destination: {} | {}",
            dst.stderr_text(),
            mig.stderr_text()
        );
        assert!(mig.child.try_wait().unwrap().is_none(), "the post-copy ended before the destination died");

        dst.kill();
        let o = finish(&mut mig);

        assert_ne!(o.code, 0, "a post-copy whose destination died reported success");
        assert!(o.stderr.contains("post-copy"), "{}", o.stderr);
        let beats = src.vm.heartbeats().len();
        std::thread::sleep(Duration::from_secs(1));
        assert!(src.vm.child.try_wait().unwrap().is_none(), "the source exited with pages still owed");
        assert_eq!(src.vm.heartbeats().len(), beats, "the source ran the guest again");
        let st = api(&src.api, r#"{"cmd":"resume"}"#);
        assert_eq!(st["ok"], false, "the source resumed a stale guest: {st}");
        let st =
            Command::new(FERRY).args(["api", "--api-socket", src.api.to_str().unwrap(), "migration"]).output().unwrap();
        let st = String::from_utf8_lossy(&st.stdout);
        assert!(st.contains("postcopy-paused"), "{st}");
        assert_eq!(src.vm.heartbeats().len(), beats, "the source ran the guest again");

        let _ = api(&src.api, r#"{"cmd":"quit"}"#);
        assert!(src.vm.wait_exit(Duration::from_secs(10)).is_some(), "quit did not end the source");
    });
}

/// `--postcopy auto` on a link the guest out-dirties: pre-copy is seen not to converge after
/// the first pass, and post-copy finishes the move (the cap holds for its push too).
#[test]
fn postcopy_auto_moves_a_guest_that_a_capped_link_cannot_converge() {
    postcopy_scenario("postcopy_auto", || {
        let src = source("bitmap", "pc-auto", "mib=128 rate=0 hb_us=1000 report_ms=300");
        let uri = format!("unix:{}", src.dir.join("mig.sock").display());
        let mut dst = destination(&uri, "bitmap");

        let o = migrate(&src.api, &uri, &["--max-bandwidth", "64", "--postcopy", "auto"]);

        assert_eq!(o.code, 0, "auto post-copy failed: {}", o.stderr);
        let s = o.summary.expect("--json summary");
        let pc = assert_postcopy_summary(&s);
        // 128 MiB again at 64 MiB/s: about 2 s; the cap holds for the push (not much faster).
        let pushed_mib = pc["pushed_pages"].as_u64().unwrap() as f64 / 256.0;
        let secs = pc["duration_ms"].as_f64().unwrap() / 1000.0;
        assert!(pushed_mib / secs < 64.0 * 1.5, "push ran at {:.0} MiB/s over a 64 MiB/s cap", pushed_mib / secs);
        assert_destination_clean(&src, &mut dst, 128 * 256);
    });
}

/// The source of the link tests: `cmdline`'s guest in namespace 0 of `link`.
fn source_on(link: &TbfLink, name: &str, cmdline: &str) -> Source {
    let dir = tmpdir(name);
    let api = dir.join("api.sock");
    let mut vm = link.spawn(0, &["run", "--memory", "1G", "--cmdline", cmdline, "--api-socket", api.to_str().unwrap()]);
    assert!(vm.wait_reports(3, Duration::from_secs(60)), "source never reported: {} {}", vm.tail(4), vm.stderr_text());
    assert!(wait_socket(&api, Duration::from_secs(5)));
    Source { vm, api, dir, tracking: "bitmap" }
}

/// The destination of the link tests, listening on TCP in namespace 1 of `link`.
fn destination_on(link: &TbfLink) -> (Proc, String) {
    let uri = format!("tcp:{}:7777", link.dst_ip);
    let d = link.spawn(1, &["run", "--incoming", &uri]);
    assert!(d.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)), "{}", d.stderr_text());
    (d, uri)
}

/// The rate the first pass really moved at, MiB/s: the link is what the test says it is.
fn first_pass_mib_s(s: &serde_json::Value) -> f64 {
    let it = &s["iterations"][0];
    it["bytes"].as_f64().unwrap() / (1 << 20) as f64 / (it["duration_ms"].as_f64().unwrap() / 1000.0)
}

/// A 256 MiB flat-out guest over a real 32 MiB/s link (two network namespaces, veth, tbf): pre-copy
/// cannot converge, `--postcopy auto` sees it and switches, and the destination's guest
/// re-verifies every page clean (acceptance 15's scenario, in the suite).
#[test]
fn flat_out_guest_over_a_real_32_mib_s_link_moves_with_auto_postcopy() {
    postcopy_scenario("flat_out_guest_over_a_real_32_mib_s_link_moves_with_auto_postcopy", || {
        let Some(link) =
            TbfLink::create("flat_out_guest_over_a_real_32_mib_s_link_moves_with_auto_postcopy", "256mbit", "64kb")
        else {
            return;
        };
        let src = source_on(&link, "tbf-postcopy", "mib=256 rate=0 hb_us=1000 report_ms=300");
        let (mut dst, uri) = destination_on(&link);

        let o = migrate(&src.api, &uri, &["--postcopy", "auto"]);

        assert_eq!(o.code, 0, "post-copy auto over the link failed: {}", o.stderr);
        let s = o.summary.expect("--json summary");
        let rate = first_pass_mib_s(&s);
        assert!(rate < 40.0, "the first pass moved {rate:.0} MiB/s: the link is not limited to 32 MiB/s");
        assert_postcopy_summary(&s);
        assert_destination_clean(&src, &mut dst, 256 * 256);
        assert!(dst.wait_stderr("post-copy complete", Duration::from_secs(10)), "{}", dst.stderr_text());
    });
}

/// Two page channels with zstd over a real 1 Gbit/s link: every channel's connection crosses the
/// namespaces, each carries its share, and the destination's guest verifies clean.
#[test]
fn compressed_page_channels_over_a_real_1_gbit_link_lose_no_page() {
    postcopy_scenario("compressed_page_channels_over_a_real_1_gbit_link_lose_no_page", || {
        let Some(link) =
            TbfLink::create("compressed_page_channels_over_a_real_1_gbit_link_lose_no_page", "1gbit", "1mb")
        else {
            return;
        };
        let src = source_on(&link, "tbf-channels", "mib=256 rate=50 word_bits=16 hb_us=1000 report_ms=300");
        let (mut dst, uri) = destination_on(&link);

        let o = migrate(&src.api, &uri, &["--channels", "2", "--compress", "zstd"]);

        assert_eq!(o.code, 0, "channels over the link failed: {}", o.stderr);
        let s = o.summary.expect("--json summary");
        assert_eq!(s["channels"], 2, "{s}");
        let per: Vec<u64> = s["channel_bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect();
        assert!(per.len() == 2 && per.iter().all(|&b| b > 1 << 20), "each connection carries its share: {per:?}");
        assert_destination_clean(&src, &mut dst, 256 * 256);
    });
}

/// `--dirty-limit`: a flat-out guest over a capped link, its machine on the dirty ring. Once
/// pre-copy stalls, the vCPU is held to the limit instead of the whole machine being throttled,
/// the dirty set shrinks, and the migration converges in pre-copy with every page verified.
#[test]
fn a_per_vcpu_dirty_limit_brings_a_flat_out_guest_to_converge() {
    postcopy_scenario("a_per_vcpu_dirty_limit_brings_a_flat_out_guest_to_converge", || {
        let s = run_clean_migration(
            "ring",
            "dirty-limit",
            "mib=256 rate=0 report_ms=500",
            256,
            false,
            &["--max-bandwidth", "128", "--dirty-limit", "16"],
        );

        let dl = &s["dirty_limit"];
        assert!(dl["engaged_at_iteration"].as_u64().unwrap() >= 2, "the limit never took effect: {s}");
        assert_eq!(dl["limit_mib_s"], 16, "{dl}");
        let held = dl["held_ms"][0].as_f64().unwrap();
        assert!(held > 0.0, "the flat-out vCPU was never held: {dl}");
        // Under the limit the vCPU dirtied about 16 MiB/s (what it dirtied in the first period,
        // before its first hold, and a debt not yet held off when the limit ended, on top).
        let rate = dl["dirty_rate_mib_s"][0].as_f64().unwrap();
        assert!(rate < 16.0 * 2.0, "the vCPU dirtied {rate:.1} MiB/s under a 16 MiB/s limit: {dl}");
        assert_eq!(s["max_throttle_percent"], 0, "the whole-machine throttle ran beside the limit: {s}");
        assert!(s["postcopy"].is_null(), "{s}");
    });
}

/// `--dirty-limit` on a machine that tracks dirty pages with a bitmap (which cannot tell the
/// vCPUs apart) is refused before anything is sent, naming why; the guest runs on.
#[test]
fn a_dirty_limit_without_the_dirty_ring_is_refused_and_the_source_runs_on() {
    postcopy_scenario("a_dirty_limit_without_the_dirty_ring_is_refused_and_the_source_runs_on", || {
        let mut src = source("bitmap", "dirty-limit-bitmap", "mib=64 rate=50 report_ms=300");
        let uri = format!("unix:{}", src.dir.join("mig.sock").display());
        let mut dst = destination(&uri, "bitmap");

        let o = migrate(&src.api, &uri, &["--dirty-limit", "16"]);

        assert_ne!(o.code, 0, "a dirty limit on a bitmap-tracked machine was accepted");
        assert!(o.stderr.contains("--dirty-limit needs the dirty ring"), "{}", o.stderr);
        assert_source_running_clean(&mut src);
        dst.kill();
    });
}
