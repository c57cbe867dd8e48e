//! Live update on real KVM: `ferry update` replaces the Ferry under a guest that dirties memory
//! and writes its disk; the guest's own verifiers stay clean, its heartbeats do not skip, the API
//! answers after, and only state crosses. Every failure before the new Ferry holds the guest
//! leaves it running in the old one.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

const CMDLINE: &str = "mib=64 rate=50 hb_us=1000 report_ms=200 disk=1 disk_mib=16 disk_rate=4";

struct Guest {
    vm: Proc,
    api: PathBuf,
    dir: PathBuf,
}

fn guest(name: &str) -> Guest {
    guest_on(FERRY, name)
}

/// The guest of [`guest`], run by the Ferry binary `exe`.
fn guest_on(exe: &str, name: &str) -> Guest {
    let dir = tmpdir(name);
    let api = dir.join("api.sock");
    let img = dir.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let mut vm = Proc::spawn_exe(
        exe,
        &[
            "run",
            "--memory",
            "1G",
            "--cmdline",
            CMDLINE,
            "--disk",
            img.to_str().unwrap(),
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    assert!(
        vm.wait_report(
            |r| r.line.contains("DISK written=") && !r.line.contains("DISK written=0 "),
            Duration::from_secs(60)
        ),
        "the guest never wrote its disk: {} {}",
        vm.tail(3),
        vm.stderr_text()
    );
    assert!(wait_socket(&api, Duration::from_secs(5)));
    Guest { vm, api, dir }
}

fn update(api: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(FERRY)
        .args(["update", "--api-socket", api.to_str().unwrap(), "--json"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The guest keeps running clean: more reports, memory and disk errors 0, heartbeats unbroken.
fn assert_runs_clean(p: &mut Proc, what: &str) {
    let n = p.reports().len();
    // Not Proc::wait_reports: after a process-mode update the process the test started has
    // exited, while the guest reports on through the same output from its successor.
    assert!(
        wait_until(Duration::from_secs(30), || p.reports().len() >= n + 5),
        "{what}: the guest stopped: {}",
        p.tail(3)
    );
    let r = p.reports();
    for x in &r {
        assert_eq!(x.errors, 0, "{what}: {}", x.line);
        assert!(
            x.line.contains(" DISK ") && field(x.line.split(" DISK ").nth(1).unwrap(), "errors") == Some(0),
            "{what}: {}",
            x.line
        );
    }
    assert!(p.lines_with("VERIFY-FAIL").is_empty() && p.lines_with("DISK-FAIL").is_empty(), "{what}: {}", p.tail(5));
    let hb: Vec<u64> = p.heartbeats().iter().map(|h| h.1).collect();
    let breaks: Vec<(u64, u64)> = hb.windows(2).filter(|w| w[1] != w[0] + 1).map(|w| (w[0], w[1])).collect();
    assert!(breaks.is_empty(), "{what}: heartbeat sequence breaks: {breaks:?}");
}

fn summary(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {out:?}"))
}

#[test]
fn exec_update_keeps_the_pid_the_guest_and_its_disk_and_moves_only_state() {
    if !kvm_available("exec_update_keeps_the_pid_the_guest_and_its_disk_and_moves_only_state") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("update-exec");
    let pid = g.vm.child.id();

    let (code, out, err) = update(&g.api, &[]);

    assert_eq!(code, 0, "{err}");
    let s = summary(&out);
    assert_eq!(s["mode"], "exec");
    assert_eq!(s["pid"], pid, "exec mode keeps the PID");
    assert_eq!(s["ram_bytes_in_place"], 1u64 << 30);
    let bytes = s["handover_bytes"].as_u64().unwrap();
    assert!(bytes < 256 << 10, "{bytes} bytes crossed for a 1 GiB guest: page data went along");
    // Two steps: parked in a process of the old binary, then pulled back after the exec.
    let pauses = s["pauses_ms"].as_array().unwrap();
    assert_eq!(pauses.len(), 2, "{s}");
    assert_eq!(s["pause_ms"].as_f64().unwrap(), pauses.iter().map(|p| p.as_f64().unwrap()).fold(0.0, f64::max));
    let parked = s["parked_pid"].as_u64().unwrap() as u32;
    assert_ne!(parked, pid);
    assert!(
        wait_until(Duration::from_secs(10), || !Path::new(&format!("/proc/{parked}")).exists()),
        "the parked process {parked} was not reaped"
    );
    assert!(g.vm.child.try_wait().unwrap().is_none(), "the Ferry process exited");
    assert_runs_clean(&mut g.vm, "after exec update");
    assert_eq!(api(&g.api, r#"{"cmd":"status"}"#)["state"], "running");
}

#[test]
fn process_update_hands_the_guest_to_a_new_process_and_the_old_one_exits() {
    if !kvm_available("process_update_hands_the_guest_to_a_new_process_and_the_old_one_exits") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("update-process");
    let old = g.vm.child.id();

    let (code, out, err) = update(&g.api, &["--mode", "process"]);

    assert_eq!(code, 0, "{err}");
    let s = summary(&out);
    assert_eq!(s["mode"], "process");
    let new = s["pid"].as_u64().unwrap() as u32;
    assert_ne!(new, old);
    assert_eq!(g.vm.wait_exit(Duration::from_secs(10)), Some(0), "the old Ferry did not exit after the handover");
    assert_runs_clean(&mut g.vm, "after process update");
    assert_eq!(api(&g.api, r#"{"cmd":"status"}"#)["state"], "running");
    let _ = api(&g.api, r#"{"cmd":"quit"}"#);
}

#[test]
fn twenty_exec_updates_in_a_row_under_load_lose_nothing() {
    if !kvm_available("twenty_exec_updates_in_a_row_under_load_lose_nothing") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("update-twenty");

    for i in 0..20 {
        let (code, _, err) = update(&g.api, &[]);
        assert_eq!(code, 0, "update {i}: {err}");
        assert!(
            g.vm.wait_heartbeats(20, Duration::from_secs(20)),
            "update {i}: the guest stopped: {} | {}",
            g.vm.tail(4),
            g.vm.stderr_text().lines().rev().take(6).collect::<Vec<_>>().join(" / ")
        );
    }

    assert_runs_clean(&mut g.vm, "after 20 updates");
    // Each exec left the previous address space to a holder process until the guest ran again:
    // every one of them has exited and been reaped (no process, no zombie left behind).
    let pid = g.vm.child.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut left = children_of(pid);
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = children_of(pid);
    }
    assert!(left.is_empty(), "processes left behind by the updates (pid, state): {left:?}");
}

/// The processes whose parent is `pid`, with their state letter.
fn children_of(pid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
        let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if f.next().and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push((head.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(0), state));
        }
    }
    out
}

/// A guest restored from a snapshot by mmap has its RAM in a private mapping of the snapshot
/// file, which no other process can take over. `ferry update` moves that RAM into the memfd
/// first, with the guest running, then hands the memfd over: the guest re-verifies its whole
/// working set clean after the update, its disk too, and a second update (process mode)
/// finds an ordinary machine.
#[test]
fn a_guest_restored_by_mmap_is_updated_once_its_ram_moved_into_memory() {
    if !kvm_available("a_guest_restored_by_mmap_is_updated_once_its_ram_moved_into_memory") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("update-mmap");
    let snap = g.dir.join("guest.snap");
    let out = Command::new(FERRY)
        .args(["snapshot", "--api-socket", g.api.to_str().unwrap(), "--to", snap.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "snapshot: {}", String::from_utf8_lossy(&out.stderr));
    g.vm.kill();
    let sock = g.dir.join("mapped.sock");
    let img = g.dir.join("disk.img");
    let mut vm = Proc::spawn(&[
        "run",
        "--restore",
        snap.to_str().unwrap(),
        "--restore-mode",
        "mmap",
        "--disk",
        img.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert!(vm.wait_reports(3, Duration::from_secs(60)), "the restored guest does not report: {}", vm.stderr_text());
    assert!(wait_socket(&sock, Duration::from_secs(5)));
    // mib=64 of CMDLINE.
    let ws_pages = 64 * 256;
    let verified = vm.reports().last().unwrap().verified;

    let (code, out, err) = update(&sock, &[]);

    assert_eq!(code, 0, "{err}");
    assert_eq!(summary(&out)["mode"], "exec");
    assert!(
        vm.wait_stderr("moved the guest's RAM mapped from its snapshot file into memory", Duration::from_secs(5)),
        "{}",
        vm.stderr_text()
    );
    // Every page of the working set checked again after the move.
    assert!(
        vm.wait_report(|r| r.verified >= verified + 2 * ws_pages, Duration::from_secs(60)),
        "the guest did not re-verify its working set: {}",
        vm.tail(3)
    );
    assert_runs_clean(&mut vm, "after the update of a guest restored by mmap");

    let (code, _, err) = update(&sock, &["--mode", "process"]);
    assert_eq!(code, 0, "{err}");
    assert_runs_clean(&mut vm, "after a second update (process mode)");
    let _ = api(&sock, r#"{"cmd":"quit"}"#);
}

/// The previous release, as `.ci/previous-release` names it ("NAME COMMIT"; docs/releases.md):
/// this repository's source at that commit, extracted with `git archive` and built once into
/// `target/previous-release/COMMIT`. None, said loudly, when the commit is not in this clone
/// (a shallow one); a build that fails is a failure.
fn previous_release() -> Option<(String, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let spec = std::fs::read_to_string(root.join(".ci/previous-release")).unwrap();
    let mut it = spec.split_whitespace();
    let (name, commit) = (it.next().unwrap().to_string(), it.next().unwrap().to_string());
    let base = root.join("target/previous-release").join(&commit);
    let exe = base.join("target/release/ferry");
    if exe.exists() {
        return Some((name, exe));
    }
    let tar = Command::new("git").arg("-C").arg(&root).args(["archive", "--format=tar", &commit]).output();
    let tar = match tar {
        Ok(o) if o.status.success() => o.stdout,
        Ok(o) => {
            println!(
                "SKIPPED the update from the previous release {name}: its commit {commit} is not in this clone \
                 (a shallow clone?): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        Err(e) => {
            println!("SKIPPED the update from the previous release {name}: git cannot run: {e}");
            return None;
        }
    };
    let src = base.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    let mut x = Command::new("tar").arg("-x").arg("-C").arg(&src).stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(x.stdin.as_mut().unwrap(), &tar).unwrap();
    drop(x.stdin.take());
    assert!(x.wait().unwrap().success(), "cannot unpack {name} ({commit})");
    println!("building the previous release {name} ({commit}) into {}", base.display());
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.args(["build", "--release", "-p", "ferry"]).current_dir(&src).env("CARGO_TARGET_DIR", base.join("target"));
    // Nothing of this test's own build reaches that one's.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            build.env_remove(k);
        }
    }
    let out = build.output().unwrap();
    assert!(
        out.status.success(),
        "the previous release {name} ({commit}) does not build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some((name, exe))
}

/// `ferry --version` of a binary: its version.
fn version_of(exe: &Path) -> String {
    let out = Command::new(exe).arg("--version").output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap_or_default().to_string()
}

/// Issue 20 item 5: a guest run by the previous release is updated to this Ferry and back, in
/// exec mode (same PID) and in process mode, under load, losing nothing.
#[test]
fn an_update_from_the_previous_release_to_this_one_and_back_loses_nothing() {
    if !kvm_available("an_update_from_the_previous_release_to_this_one_and_back_loses_nothing") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((name, old)) = previous_release() else {
        return;
    };
    let (old_version, new_version) = (version_of(&old), env!("CARGO_PKG_VERSION").to_string());
    assert_ne!(old_version, new_version, "{name} and this Ferry have the same version");
    let mut g = guest_on(old.to_str().unwrap(), "update-release");
    let pid = g.vm.child.id();
    let steps: [(&str, &str, &str); 4] = [
        (FERRY, "exec", &new_version),
        (old.to_str().unwrap(), "exec", &old_version),
        (FERRY, "process", &new_version),
        (old.to_str().unwrap(), "process", &old_version),
    ];

    for (binary, mode, version) in steps {
        let (code, out, err) = update(&g.api, &["--binary", binary, "--mode", mode]);

        let what = format!("update to {version} ({mode} mode)");
        assert_eq!(code, 0, "{what}: {err}");
        let s = summary(&out);
        assert_eq!(s["ferry_version"], version, "{what}");
        if mode == "exec" {
            assert_eq!(s["pid"], pid, "{what}");
        }
        assert!(s["handover_bytes"].as_u64().unwrap() < 256 << 10, "{what}: page data crossed");
        assert_runs_clean(&mut g.vm, &what);
        assert_eq!(api(&g.api, r#"{"cmd":"status"}"#)["state"], "running", "{what}");
    }
    let _ = api(&g.api, r#"{"cmd":"quit"}"#);
}

/// A script standing in for a new binary.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Each way a new binary can fail before it holds the guest leaves the guest running, clean, in
/// the old Ferry, with an error naming the cause.
#[test]
fn every_failure_before_the_new_ferry_holds_the_guest_leaves_it_running_in_the_old_one() {
    if !kvm_available("every_failure_before_the_new_ferry_holds_the_guest_leaves_it_running_in_the_old_one") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("update-fail");
    let dir = g.dir.clone();
    let crashes = script(&dir, "crashes", "kill -SEGV $$");
    let future = script(&dir, "future", r#"echo '{"min_format":7,"max_format":9,"handover":true}'"#);
    let spare = dir.join("spare.img");
    std::fs::File::create(&spare).unwrap().set_len(1 << 20).unwrap();
    // Passes the start check, then cannot rebuild the machine (it is told of a disk the handover
    // does not carry): exec mode hands the guest back to the old binary.
    let fails_restore = script(
        &dir,
        "fails-restore",
        &format!(
            "if [ \"$1\" = update-check ]; then exec {FERRY} update-check; fi\nexec {FERRY} \"$@\" --disk {}",
            spare.display()
        ),
    );
    let dies_in_process =
        script(&dir, "dies", &format!("if [ \"$1\" = update-check ]; then exec {FERRY} update-check; fi\nexit 3"));
    // Passes the start check and removes itself: the exec after the guest was parked fails, and
    // the old binary pulls the guest back from the parked process.
    let vanishes = script(
        &dir,
        "vanishes",
        &format!("if [ \"$1\" = update-check ]; then rm -f \"$0\"; exec {FERRY} update-check; fi\nexit 3"),
    );
    let vanishes_msg = format!("cannot exec the new binary {}", vanishes.display());
    let pid = g.vm.child.id();
    let future_msg = format!("reads stream formats 7 to 9; this Ferry writes format {}", ferry_stream::FORMAT_VERSION);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--binary".into(), dir.join("missing").display().to_string()], "cannot be started"),
        (vec!["--binary".into(), crashes.display().to_string()], "crashed at start (signal 11)"),
        (vec!["--binary".into(), future.display().to_string()], &future_msg),
        (
            vec!["--binary".into(), fails_restore.display().to_string()],
            "the previous Ferry took the guest back and runs it",
        ),
        (
            vec!["--binary".into(), dies_in_process.display().to_string(), "--mode".into(), "process".into()],
            "the new Ferry exited before taking over",
        ),
        (vec!["--binary".into(), vanishes.display().to_string()], &vanishes_msg),
    ];

    for (args, want) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();

        let (code, _, err) = update(&g.api, &a);

        assert_ne!(code, 0, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(g.vm.child.id(), pid);
        assert!(g.vm.child.try_wait().unwrap().is_none(), "{args:?}: the Ferry process exited");
        assert_runs_clean(&mut g.vm, &format!("{args:?}"));
        assert_eq!(api(&g.api, r#"{"cmd":"status"}"#)["state"], "running", "{args:?}");
    }
}

/// The new binary dies right after the exec (its first step, before it asked for the guest): the
/// process that was the Ferry is gone, and the guest, parked for the exec, runs on in the parked
/// process, which then serves the API. A single-step exec would have lost the guest with it.
#[test]
fn a_new_binary_dying_after_the_exec_leaves_the_guest_running_in_the_parked_process() {
    if !kvm_available("a_new_binary_dying_after_the_exec_leaves_the_guest_running_in_the_parked_process") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = guest("update-orphan");
    let crashes_later = script(
        &g.dir,
        "crashes-later",
        &format!("if [ \"$1\" = update-check ]; then exec {FERRY} update-check; fi\nkill -SEGV $$"),
    );

    let (code, _, err) = update(&g.api, &["--binary", crashes_later.to_str().unwrap()]);

    assert_ne!(code, 0, "the update succeeded with a binary that crashes: {err}");
    // Killed by the signal: no exit code (the output goes on, from the parked process).
    let died = g.vm.wait_exit_seen(Duration::from_secs(10));
    assert!(matches!(died, Some((None, _))), "the Ferry process did not die of SIGSEGV: {died:?}");
    let status = api(&g.api, r#"{"cmd":"status"}"#);
    assert_eq!(status["state"], "running", "{status}");
    assert!(
        g.vm.stderr_text().contains("runs the guest and serves its API"),
        "the parked process did not say it took the guest: {}",
        g.vm.stderr_text()
    );
    assert_runs_clean(&mut g.vm, "in the parked process");
    let _ = api(&g.api, r#"{"cmd":"quit"}"#);
}
