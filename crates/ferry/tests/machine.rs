//! The machine and the built-in guest, end to end on real KVM.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

#[test]
fn builtin_guest_heartbeats_and_reports_clean_verification_that_grows() {
    if !kvm_available("builtin_guest_heartbeats_and_reports_clean_verification_that_grows") {
        return;
    }
    let mut vm = Proc::spawn(&["run", "--memory", "256M", "--cmdline", "mib=32 rate=20 report_ms=300"]);
    assert!(vm.wait_lanes_verifying(Duration::from_secs(40)), "the guest never verified: {}", vm.tail(5));
    let n = vm.reports().len();

    let ok = vm.wait_reports(n + 6, Duration::from_secs(40));

    assert!(ok, "too few REPORT lines; output: {} stderr: {}", vm.tail(5), vm.stderr_text());
    let all = vm.reports();
    assert!(all.iter().all(|x| x.errors == 0), "verify errors: {}", all.last().unwrap().line);
    // After the fill: verification never stops.
    let r = &all[n - 1..];
    assert!(r.iter().all(|x| x.errors == 0), "verify errors: {}", r.last().unwrap().line);
    assert!(vm.lines_with("VERIFY-FAIL").is_empty(), "{:?}", vm.lines_with("VERIFY-FAIL"));
    assert!(r.windows(2).all(|w| w[1].verified > w[0].verified), "verified= does not grow: {r:?}");
    assert!(r.last().unwrap().written >= 32 * 256, "working set not filled: {}", r.last().unwrap().line);
    let hb = vm.heartbeats();
    assert!(hb.len() >= 200, "only {} heartbeats", hb.len());
    assert!(hb.windows(2).all(|w| w[1].1 == w[0].1 + 1), "heartbeat sequence has gaps");
}

#[test]
fn two_vcpus_run_two_lanes_that_both_write_and_verify() {
    if !kvm_available("two_vcpus_run_two_lanes_that_both_write_and_verify") {
        return;
    }
    let mut vm = Proc::spawn(&["run", "--memory", "256M", "--cpus", "2", "--cmdline", "mib=32 rate=20 report_ms=300"]);

    let ok = vm.wait_lanes_verifying(Duration::from_secs(60));

    assert!(ok, "both lanes never verified: {} {}", vm.tail(5), vm.stderr_text());
    let last = vm.reports().last().cloned().unwrap();
    assert_eq!(last.lanes, 2, "{}", last.line);
    assert_eq!(last.errors, 0, "{}", last.line);
    for lane in ["lane0=", "lane1="] {
        let v = last.line.split_whitespace().find_map(|t| t.strip_prefix(lane)).expect("per-lane field");
        let parts: Vec<u64> = v.split('/').map(|x| x.parse().unwrap()).collect();
        assert!(parts[0] > 0 && parts[1] > 0 && parts[2] == 0, "{lane}{v} in {}", last.line);
    }
}

#[test]
fn one_page_corrupted_from_the_host_is_reported_for_exactly_that_page() {
    if !kvm_available("one_page_corrupted_from_the_host_is_reported_for_exactly_that_page") {
        return;
    }
    let dir = tmpdir("corrupt");
    let sock = dir.join("api.sock");
    let mut vm = Proc::spawn(&[
        "run",
        "--memory",
        "128M",
        "--cmdline",
        "mib=16 rate=-1 report_ms=200",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    let boot = vm.wait_line("BOOT ", Duration::from_secs(20)).expect("BOOT line");
    let (ws, _) = working_set(&boot);
    assert!(wait_socket(&sock, Duration::from_secs(5)));
    let filled = vm.wait_report(|r| r.written >= 16 * 256, Duration::from_secs(30));
    assert!(filled, "the guest never filled its working set: {}", vm.tail(3));
    let page = 1234u64;

    let reply = api(&sock, &format!(r#"{{"cmd":"memory-write","gpa":{},"hex":"deadbeef"}}"#, ws + page * 4096 + 2048));
    let fail = vm.wait_line("VERIFY-FAIL", Duration::from_secs(20));
    let before = vm.reports().len();
    assert!(vm.wait_reports(before + 2, Duration::from_secs(10)));

    assert_eq!(reply["ok"], true, "{reply}");
    let fail = fail.expect("guest never reported the corrupted page");
    assert!(fail.contains(&format!("page={page} ")), "{fail}");
    assert_eq!(vm.lines_with("VERIFY-FAIL").len(), 1, "{:?}", vm.lines_with("VERIFY-FAIL"));
    assert_eq!(vm.reports().last().unwrap().errors, 1);
}

#[test]
fn api_pause_stops_heartbeats_and_resume_continues_the_sequence() {
    if !kvm_available("api_pause_stops_heartbeats_and_resume_continues_the_sequence") {
        return;
    }
    let dir = tmpdir("pause");
    let sock = dir.join("api.sock");
    let mut vm =
        Proc::spawn(&["run", "--memory", "64M", "--cmdline", "mib=8 rate=10", "--api-socket", sock.to_str().unwrap()]);
    assert!(vm.wait_line("HB 100", Duration::from_secs(20)).is_some(), "{}", vm.tail(3));
    assert!(wait_socket(&sock, Duration::from_secs(5)));

    let paused = api(&sock, r#"{"cmd":"pause"}"#);
    let status = api(&sock, r#"{"cmd":"status"}"#);
    // Wall time, as nothing a paused guest prints can mark these moments: 100 ms for the reader
    // to take the lines printed before the pause, then 500 ms (500 heartbeat periods) in which
    // a paused guest must print nothing.
    std::thread::sleep(Duration::from_millis(100));
    let n1 = vm.heartbeats().len();
    std::thread::sleep(Duration::from_millis(500));
    let n2 = vm.heartbeats().len();
    let resumed = api(&sock, r#"{"cmd":"resume"}"#);
    let went_on = vm.wait_heartbeats(50, Duration::from_secs(20));
    let hb = vm.heartbeats();

    assert_eq!(paused["ok"], true);
    assert_eq!(status["state"], "paused");
    assert_eq!(n1, n2, "heartbeats continued while paused");
    assert_eq!(resumed["ok"], true);
    assert!(went_on, "guest did not resume: {}", vm.tail(3));
    assert!(hb.windows(2).all(|w| w[1].1 == w[0].1 + 1), "sequence broke across pause");
}

#[test]
fn api_quit_ends_ferry_with_status_zero() {
    if !kvm_available("api_quit_ends_ferry_with_status_zero") {
        return;
    }
    let dir = tmpdir("quit");
    let sock = dir.join("api.sock");
    let mut vm = Proc::spawn(&["run", "--memory", "64M", "--cmdline", "mib=8", "--api-socket", sock.to_str().unwrap()]);
    assert!(vm.wait_line("HB 10", Duration::from_secs(20)).is_some());
    assert!(wait_socket(&sock, Duration::from_secs(5)));

    let reply = api(&sock, r#"{"cmd":"quit"}"#);
    let code = vm.wait_exit(Duration::from_secs(10));

    assert_eq!(reply["ok"], true);
    assert_eq!(code, Some(0));
}

/// `--json`: how the run ended, as one JSON object on stderr.
#[test]
fn run_with_json_says_how_it_ended_as_json() {
    if !kvm_available("run_with_json_says_how_it_ended_as_json") {
        return;
    }
    let dir = tmpdir("json-exit");
    let sock = dir.join("api.sock");
    let mut vm = Proc::spawn(&[
        "run",
        "--memory",
        "64M",
        "--cmdline",
        "mib=8",
        "--api-socket",
        sock.to_str().unwrap(),
        "--json",
    ]);
    assert!(vm.wait_line("HB 10", Duration::from_secs(20)).is_some());
    assert!(wait_socket(&sock, Duration::from_secs(5)));

    api(&sock, r#"{"cmd":"quit"}"#);
    let code = vm.wait_exit(Duration::from_secs(10));

    assert_eq!(code, Some(0));
    let err = vm.stderr_text();
    let last = err.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(v["exit_status"], 0, "{v}");
    assert_eq!(v["reason"], "stopped", "{v}");
}

#[test]
fn sigterm_sigint_and_sighup_stop_ferry_with_status_zero_and_remove_its_api_socket() {
    if !kvm_available("sigterm_sigint_and_sighup_stop_ferry_with_status_zero_and_remove_its_api_socket") {
        return;
    }
    for (name, sig) in [("SIGTERM", libc::SIGTERM), ("SIGINT", libc::SIGINT), ("SIGHUP", libc::SIGHUP)] {
        let dir = tmpdir(&format!("stop-{name}"));
        let sock = dir.join("api.sock");
        let mut vm =
            Proc::spawn(&["run", "--memory", "64M", "--cmdline", "mib=8", "--api-socket", sock.to_str().unwrap()]);
        assert!(vm.wait_line("HB 10", Duration::from_secs(20)).is_some());
        assert!(wait_socket(&sock, Duration::from_secs(5)));

        // SAFETY: (test) a signal to the child this test started.
        unsafe { libc::kill(vm.child.id() as i32, sig) };
        let code = vm.wait_exit(Duration::from_secs(10));

        assert_eq!(code, Some(0), "{name}: {}", vm.stderr_text());
        assert!(vm.stderr_text().contains(&format!("stopping on {name}")), "{name}: {}", vm.stderr_text());
        assert!(!sock.exists(), "{name}: the API socket was left behind");
    }
}

/// A Ferry whose stdout and stderr reader is gone (its supervisor or test harness died) still
/// stops on SIGTERM and removes its API socket: its messages to the closed pipe fail quietly.
/// (A suite run cut short left such Ferrys running, at 100 % of a CPU: the signal thread
/// panicked printing "stopping on SIGTERM" and never stopped the machine.)
#[test]
fn sigterm_stops_ferry_even_when_its_output_pipe_is_closed() {
    if !kvm_available("sigterm_stops_ferry_even_when_its_output_pipe_is_closed") {
        return;
    }
    use std::process::{Command, Stdio};
    let dir = tmpdir("stop-closed-pipe");
    let sock = dir.join("api.sock");
    let mut child = Command::new(FERRY)
        .args(["run", "--memory", "64M", "--cmdline", "mib=8", "--api-socket", sock.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_socket(&sock, Duration::from_secs(20)), "the API socket never appeared");
    // The reader goes away: every later write to stdout or stderr fails with EPIPE.
    drop(child.stdout.take());
    drop(child.stderr.take());
    std::thread::sleep(Duration::from_millis(500));

    // SAFETY: (test) a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exited = wait_until(Duration::from_secs(10), || child.try_wait().unwrap().is_some());

    if !exited {
        let _ = child.kill();
    }
    assert!(exited, "ferry ignored SIGTERM once its output pipe was closed");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(!sock.exists(), "the API socket was left behind");
}

#[test]
fn a_file_that_is_not_ours_is_never_replaced_by_a_socket_or_a_snapshot() {
    if !kvm_available("a_file_that_is_not_ours_is_never_replaced_by_a_socket_or_a_snapshot") {
        return;
    }
    let dir = tmpdir("precious");
    let path = dir.join("precious");
    std::fs::write(&path, "precious data\n").unwrap();

    let mut vm = Proc::spawn(&["run", "--memory", "64M", "--cmdline", "mib=8", "--api-socket", path.to_str().unwrap()]);
    let code = vm.wait_exit(Duration::from_secs(30));

    assert_ne!(code, Some(0));
    assert!(vm.stderr_text().contains("exists and is not a socket"), "{}", vm.stderr_text());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious data\n");

    // Nor at an incoming migration's socket path.
    let incoming = format!("unix:{}", path.display());
    let mut dst = Proc::spawn(&["run", "--incoming", &incoming]);
    let code = dst.wait_exit(Duration::from_secs(30));
    assert_ne!(code, Some(0));
    assert!(dst.stderr_text().contains("exists and is not a socket"), "{}", dst.stderr_text());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious data\n");

    // A snapshot to the VM's own API socket is refused; the VM stays manageable.
    let sock = dir.join("api.sock");
    let mut vm = Proc::spawn(&["run", "--memory", "64M", "--cmdline", "mib=8", "--api-socket", sock.to_str().unwrap()]);
    assert!(vm.wait_line("HB 5", Duration::from_secs(20)).is_some());
    assert!(wait_socket(&sock, Duration::from_secs(5)));
    let out = std::process::Command::new(FERRY)
        .args(["snapshot", "--api-socket", sock.to_str().unwrap(), "--to", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a regular file"), "{err}");
    let status = std::process::Command::new(FERRY)
        .args(["api", "status", "--api-socket", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success(), "the API socket no longer answers: {}", String::from_utf8_lossy(&status.stderr));
    vm.kill();
}

/// `ferry dirty-rate` measures the rate the guest writes at (told 40 MiB/s; compared with the
/// rate the guest itself reports over the same time, so a slow host cannot fail it), with both
/// backends.
#[test]
fn dirty_rate_measures_the_rate_the_guest_writes_at_with_bitmap_and_ring() {
    if !kvm_available("dirty_rate_measures_the_rate_the_guest_writes_at_with_bitmap_and_ring") {
        return;
    }
    for tracking in ["bitmap", "ring"] {
        let dir = tmpdir(&format!("rate-{tracking}"));
        let sock = dir.join("api.sock");
        let mut vm = Proc::spawn(&[
            "run",
            "--memory",
            "512M",
            "--cmdline",
            "mib=128 rate=40 report_ms=500",
            "--api-socket",
            sock.to_str().unwrap(),
            "--dirty-tracking",
            tracking,
        ]);
        // The rate is the workload's: the fill (written as fast as the guest can) must be over
        // before the window, and one whole report period after it.
        assert!(vm.wait_lanes_verifying(Duration::from_secs(60)), "{tracking}: {}", vm.stderr_text());
        let n = vm.reports().len();
        assert!(vm.wait_reports(n + 1, Duration::from_secs(10)), "{tracking}: the guest stopped reporting");
        let from = vm.reports().len();

        let out = std::process::Command::new(FERRY)
            .args(["dirty-rate", "--api-socket", sock.to_str().unwrap(), "--window-ms", "1000", "--json"])
            .output()
            .unwrap();
        // The guest's own rate over the window: the REPORTs printed during it and the next one.
        let to = vm.reports().len() + 1;
        assert!(vm.wait_reports(to, Duration::from_secs(10)), "{tracking}: the guest stopped reporting");
        let during: Vec<f64> = vm.reports()[from..to].iter().map(|r| r.rate_mib_s).collect();
        let guest = during.iter().sum::<f64>() / during.len() as f64;

        assert!(out.status.success(), "{tracking}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let measured = v["mib_per_s"].as_f64().unwrap();
        assert_eq!(v["tracking"], tracking);
        let ratio = measured / guest;
        assert!(
            (0.7..=1.4).contains(&ratio),
            "{tracking}: measured {measured} MiB/s, the guest reported {during:?} MiB/s: {v}"
        );
        assert_eq!(v["per_vcpu_pages_per_s"].is_array(), tracking == "ring", "{v}");
        vm.kill();
    }
}

/// A guest writing flat out fills its 65536-entry dirty ring: every ring-full exit is collected
/// by the vCPU thread and the guest runs on with errors=0. Under tracking a flat-out guest here
/// newly dirties only 21–36 K pages/s, so the window is 4 s (a 1.5 s window once saw 43 593
/// pages, no ring full).
#[test]
fn full_dirty_rings_are_collected_and_the_guest_runs_on_clean() {
    if !kvm_available("full_dirty_rings_are_collected_and_the_guest_runs_on_clean") {
        return;
    }
    let dir = tmpdir("ringfull");
    let sock = dir.join("api.sock");
    let mut vm = Proc::spawn(&[
        "run",
        "--memory",
        "1G",
        "--cmdline",
        "mib=384 rate=0 report_ms=300",
        "--api-socket",
        sock.to_str().unwrap(),
        "--dirty-tracking",
        "ring",
    ]);
    assert!(vm.wait_reports(3, Duration::from_secs(60)), "{}", vm.stderr_text());

    let out = std::process::Command::new(FERRY)
        .args(["dirty-rate", "--api-socket", sock.to_str().unwrap(), "--window-ms", "4000", "--json"])
        .output()
        .unwrap();

    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["ring_full_exits"].as_u64().unwrap() > 0, "no ring-full exit in 4 s flat out: {v}");
    let n = vm.reports().len();
    assert!(vm.wait_reports(n + 3, Duration::from_secs(20)), "guest stopped after ring-full exits");
    let last = vm.reports().last().cloned().unwrap();
    assert_eq!(last.errors, 0, "{}", last.line);
    assert!(vm.lines_with("VERIFY-FAIL").is_empty());
    vm.kill();
}
