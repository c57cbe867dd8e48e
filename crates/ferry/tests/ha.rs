//! Checkpointed replication (issue 19, docs/ha.md) on real KVM: the built-in guest dirties
//! memory and writes its disk while replicated at 25 ms epochs; the primary dies (kill -9), the
//! backup is lost, the link is cut in the middle of an epoch, replication is stopped. Each time
//! the guest's memory and disk verifiers stay at errors=0 and the HB lines the outside saw have
//! no gap.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::proxy::{Fault, Proxy};
use common::*;

/// These tests share the machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const WORKLOAD: &str = "mib=64 rate=20 hb_us=1000 report_ms=200 disk=1 disk_mib=16 disk_rate=4";

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(64 << 20).unwrap();
    p
}

/// A primary booted with the workload and a disk, once it reports disk writes.
fn primary(dir: &Path) -> (Proc, PathBuf) {
    let api = dir.join("p.sock");
    let img = image(dir, "p.img");
    let mut p = Proc::spawn(&[
        "run",
        "--memory",
        "256M",
        "--cmdline",
        WORKLOAD,
        "--disk",
        img.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    assert!(
        p.wait_report(
            |r| r.line.contains("DISK written=") && !r.line.contains("DISK written=0 "),
            Duration::from_secs(60)
        ),
        "the primary never wrote its disk: {} {}",
        p.tail(3),
        p.stderr_text()
    );
    assert!(wait_socket(&api, Duration::from_secs(5)));
    (p, api)
}

/// A standby on `uri` with its own image `img` (and an API socket, so that it can be
/// replicated in turn after it took over).
fn standby(uri: &str, img: &Path, api: &Path, extra: &[&str]) -> Proc {
    let mut args = vec!["run", "--incoming", uri, "--standby", "--disk", img.to_str().unwrap()];
    args.extend_from_slice(&["--api-socket", api.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let b = Proc::spawn(&args);
    assert!(b.wait_stderr("standby: waiting for the primary", Duration::from_secs(10)), "{}", b.stderr_text());
    b
}

fn replicate(api: &Path, uri: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["replicate", "--api-socket", api.to_str().unwrap(), "--to", uri];
    if !extra.contains(&"--interval-ms") {
        args.extend_from_slice(&["--interval-ms", "25"]);
    }
    args.extend_from_slice(extra);
    Command::new(FERRY).args(&args).output().unwrap()
}

fn hb(p: &Proc) -> Vec<u64> {
    p.heartbeats().into_iter().map(|(_, n)| n).collect()
}

/// Every REPORT clean (memory and disk) and no VERIFY-FAIL or DISK-FAIL.
fn assert_clean(p: &Proc, who: &str) {
    assert!(p.lines_with("VERIFY-FAIL").is_empty(), "{who}: {:?}", p.lines_with("VERIFY-FAIL"));
    assert!(p.lines_with("DISK-FAIL").is_empty(), "{who}: {:?}", p.lines_with("DISK-FAIL"));
    for l in p.lines_with("REPORT ") {
        assert!(l.split_whitespace().filter(|t| t.starts_with("errors=")).all(|t| t == "errors=0"), "{who}: {l}");
    }
}

/// The HB numbers the outside saw from all of `procs` (in order of their lives): one run from
/// the first to the last, duplicates allowed, none missing.
fn assert_no_gap(procs: &[&Proc]) {
    let mut all: Vec<u64> = procs.iter().flat_map(|p| hb(p)).collect();
    all.sort_unstable();
    all.dedup();
    let gaps: Vec<(u64, u64)> = all.windows(2).filter(|w| w[1] != w[0] + 1).map(|w| (w[0], w[1])).collect();
    assert!(gaps.is_empty(), "the HB lines seen outside have gaps {gaps:?}");
}

/// Waits until `p` printed `n` more REPORT lines.
fn more_reports(p: &mut Proc, n: usize, what: &str) {
    let have = p.reports().len();
    assert!(
        p.wait_reports(have + n, Duration::from_secs(30)),
        "{what}: stopped reporting: {} {}",
        p.tail(3),
        p.stderr_text()
    );
}

/// A small xorshift: the kill instants are random, and reproducible from the printed seed.
struct Rng(u64);
impl Rng {
    fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo)
    }
}

/// Ten generations: each backup takes over from a primary killed at a random instant, then is
/// replicated to a new backup itself. Every takeover is within 1 s, no HB is missing across all
/// of them, and memory and disk stay clean for 3 s after the last.
#[test]
fn kill_9_of_the_primary_at_ten_random_instants_loses_nothing() {
    if !kvm_available("kill_9_of_the_primary_at_ten_random_instants_loses_nothing") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("kill instants from seed {seed:#x}");
    let mut rng = Rng(seed);
    let dir = tmpdir("ha-kill");
    let (first, mut api) = primary(&dir);
    let mut gens: Vec<Proc> = vec![first];
    let mut failovers = Vec::new();
    for g in 1..=10 {
        let uri = format!("unix:{}", dir.join(format!("ha{g}.sock")).display());
        let next_api = dir.join(format!("b{g}.sock"));
        let backup = standby(&uri, &image(&dir, &format!("b{g}.img")), &next_api, &[]);
        let r = replicate(&api, &uri, &[]);
        assert!(r.status.success(), "generation {g}: replicate failed: {}", String::from_utf8_lossy(&r.stderr));
        std::thread::sleep(Duration::from_millis(rng.next_ms(200, 1500)));
        let prim = gens.last_mut().unwrap();
        let t_kill = Instant::now();
        prim.kill();
        gens.push(backup);
        let b = gens.last_mut().unwrap();
        let resumed = wait_until(Duration::from_secs(5), || b.heartbeats().first().is_some_and(|(t, _)| *t > t_kill));
        assert!(resumed, "generation {g}: the backup printed no HB after the kill: {}", b.stderr_text());
        let first_hb = b.heartbeats().first().unwrap().0;
        let took = first_hb.saturating_duration_since(t_kill);
        assert!(took < Duration::from_secs(1), "generation {g}: the backup took {took:?} to resume");
        failovers.push(took.as_millis());
        assert!(b.stderr_text().contains("the guest resumes here from checkpoint"), "{}", b.stderr_text());
        more_reports(b, 3, "the new primary");
        assert!(wait_socket(&next_api, Duration::from_secs(5)));
        api = next_api;
    }
    // The last backup runs on for 3 s.
    std::thread::sleep(Duration::from_secs(3));
    let refs: Vec<&Proc> = gens.iter().collect();
    for (i, p) in gens.iter().enumerate() {
        assert_clean(p, &format!("generation {i}"));
    }
    assert_no_gap(&refs);
    eprintln!("failover (kill to the backup's first HB), ms: {failovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A primary replicated with `--on-backup-loss policy` whose backup was then killed.
fn protected_then_backup_killed(dir: &Path, policy: &str) -> (Proc, PathBuf) {
    let (mut prim, api) = primary(dir);
    let uri = format!("unix:{}", dir.join("ha.sock").display());
    let mut backup = standby(&uri, &image(dir, "b.img"), &dir.join("b.sock"), &[]);
    let r = replicate(&api, &uri, &["--on-backup-loss", policy]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    more_reports(&mut prim, 3, "the primary");
    backup.kill();
    (prim, api)
}

/// The backup dies: with `--on-backup-loss stop` the primary pauses its guest and says why; the
/// API resumes it (unprotected, its held output released) and nothing was lost.
#[test]
fn a_lost_backup_pauses_the_primary_under_stop_and_resume_runs_it_unprotected() {
    if !kvm_available("a_lost_backup_pauses_the_primary_under_stop_and_resume_runs_it_unprotected") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("ha-lost-stop");
    let (mut prim, api) = protected_then_backup_killed(&dir, "stop");

    assert!(prim.wait_stderr("the backup is lost", Duration::from_secs(5)), "{}", prim.stderr_text());
    assert!(prim.stderr_text().contains("PAUSED (--on-backup-loss stop)"), "{}", prim.stderr_text());
    let st = api_status(&api);
    assert_eq!(st["state"], "paused", "{st}");
    assert_eq!(st["replication"]["state"], "unprotected", "{st}");
    assert!(st["replication"]["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{st}");
    // Paused: no HB for a while.
    let n = hb(&prim).len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hb(&prim).len(), n, "the guest ran on after its backup was lost under stop");
    assert_eq!(common::api(&api, r#"{"cmd":"resume"}"#)["ok"], true);
    more_reports(&mut prim, 5, "the primary after resume");
    assert_clean(&prim, "primary");
    assert_no_gap(&[&prim]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_lost_backup_under_continue_leaves_the_guest_running_unprotected() {
    if !kvm_available("a_lost_backup_under_continue_leaves_the_guest_running_unprotected") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("ha-lost-cont");
    let (mut prim, api) = protected_then_backup_killed(&dir, "continue");

    assert!(prim.wait_stderr("runs UNPROTECTED", Duration::from_secs(5)), "{}", prim.stderr_text());
    more_reports(&mut prim, 5, "the primary running unprotected");
    let st = api_status(&api);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["replication"]["state"], "unprotected", "{st}");
    assert_eq!(st["replication"]["output_held_bytes"], 0, "{st}");
    assert_clean(&prim, "primary");
    assert_no_gap(&[&prim]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The link breaks in the middle of an epoch: the backup discards the half epoch and resumes
/// from the checkpoint before it; the primary (stop) pauses. Only one guest runs, and it lost
/// nothing.
#[test]
fn a_connection_cut_in_the_middle_of_an_epoch_resumes_the_backup_from_the_checkpoint_before() {
    if !kvm_available("a_connection_cut_in_the_middle_of_an_epoch_resumes_the_backup_from_the_checkpoint_before") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("ha-cut");
    let (prim, api) = primary(&dir);
    let target = dir.join("ha.sock");
    let mut backup = standby(&format!("unix:{}", target.display()), &image(&dir, "b.img"), &dir.join("b.sock"), &[]);
    let proxy = Proxy::start(dir.join("proxy.sock"), target, Fault::CutInEpoch { checkpoints: 40 });

    let r = replicate(&api, &proxy.uri, &["--on-backup-loss", "stop"]);

    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        backup.wait_stderr("the guest resumes here from checkpoint 39", Duration::from_secs(10)),
        "{}",
        backup.stderr_text()
    );
    assert!(prim.wait_stderr("the backup is lost", Duration::from_secs(5)), "{}", prim.stderr_text());
    more_reports(&mut backup, 15, "the backup");
    assert_clean(&prim, "primary");
    assert_clean(&backup, "backup");
    assert_no_gap(&[&prim, &backup]);
    assert_eq!(api_status(&api)["state"], "paused");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ferry replicate-stop`: a last checkpoint and END; the backup exits 0 without running the
/// guest, the primary runs on with all its output out.
#[test]
fn replicate_stop_ends_the_backup_without_a_failover() {
    if !kvm_available("replicate_stop_ends_the_backup_without_a_failover") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("ha-stop");
    let (mut prim, api) = primary(&dir);
    let uri = format!("unix:{}", dir.join("ha.sock").display());
    let mut backup = standby(&uri, &image(&dir, "b.img"), &dir.join("b.sock"), &[]);
    // The events feed follows replication too.
    let mut ev = std::os::unix::net::UnixStream::connect(&api).unwrap();
    write!(ev, "GET /api/v1/events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let events = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for l in std::io::BufReader::new(ev).lines() {
            let Ok(l) = l else { break };
            let done = l.contains("replication-stopped");
            seen.push(l);
            if done {
                break;
            }
        }
        seen
    });
    let r = replicate(&api, &uri, &["--json"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let started: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(started["state"], "protected", "{started}");
    // The guest may not use pause, migrate or snapshot meanwhile.
    let refused = common::api(&api, r#"{"cmd":"pause"}"#);
    assert!(refused["error"].as_str().unwrap().contains("replication to a backup is running"), "{refused}");
    more_reports(&mut prim, 5, "the primary");
    // Enough epochs to stop in the middle of (what is asserted below), whatever the host's pace.
    let epochs = || common::api(&api, r#"{"cmd":"status"}"#)["replication"]["epochs"].as_u64().unwrap_or(0);
    assert!(wait_until(Duration::from_secs(30), || epochs() > 20), "only {} epochs in 30 s", epochs());

    let out =
        Command::new(FERRY).args(["replicate-stop", "--api-socket", api.to_str().unwrap(), "--json"]).output().unwrap();

    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fin: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fin["state"], "stopped", "{fin}");
    assert!(fin["epochs"].as_u64().unwrap() > 20, "{fin}");
    assert!(fin["pause_ms_p99"].as_f64().unwrap() > 0.0, "{fin}");
    assert_eq!(backup.wait_exit(Duration::from_secs(10)), Some(0), "{}", backup.stderr_text());
    assert!(backup.stderr_text().contains("the primary ended replication"), "{}", backup.stderr_text());
    assert!(hb(&backup).is_empty(), "the backup ran the guest");
    more_reports(&mut prim, 5, "the primary after the stop");
    assert_clean(&prim, "primary");
    assert_no_gap(&[&prim]);
    assert_eq!(api_status(&api)["replication"]["output_held_bytes"], 0);
    let seen = events.join().unwrap();
    assert!(seen.iter().any(|l| l.contains("replication-protected")), "{seen:?}");
    assert!(seen.last().unwrap().contains("replication-stopped"), "{seen:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A primary that stops sending (SIGSTOP: hung, not dead, its connection still open) is lost
/// after `--heartbeat-timeout-ms`; one that is quiet between long epochs but sends heartbeats is
/// not.
#[test]
fn a_silent_primary_is_lost_after_the_heartbeat_timeout_and_heartbeats_keep_a_slow_one_alive() {
    if !kvm_available("a_silent_primary_is_lost_after_the_heartbeat_timeout_and_heartbeats_keep_a_slow_one_alive") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("ha-heartbeat");
    let (mut prim, api) = primary(&dir);
    let uri = format!("unix:{}", dir.join("ha.sock").display());
    let mut backup = standby(&uri, &image(&dir, "b.img"), &dir.join("b.sock"), &["--heartbeat-timeout-ms", "300"]);
    // Epochs 1 s apart: only the heartbeats between them keep the backup from taking over.
    let r = replicate(&api, &uri, &["--interval-ms", "1000"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    std::thread::sleep(Duration::from_secs(3));
    assert!(backup.child.try_wait().unwrap().is_none(), "the backup ended: {}", backup.stderr_text());
    assert!(hb(&backup).is_empty(), "the backup took over from a live primary: {}", backup.stderr_text());

    let t = Instant::now();
    // SAFETY: (test) SIGSTOP to our own child process, by pid.
    unsafe { libc::kill(prim.child.id() as i32, libc::SIGSTOP) };

    assert!(backup.wait_stderr("the primary is lost", Duration::from_secs(5)), "{}", backup.stderr_text());
    let took = t.elapsed();
    prim.kill();
    // Silence counts from the last byte, which came up to one heartbeat (100 ms) before the stop.
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(2), "took over after {took:?}");
    assert!(backup.stderr_text().contains("the primary sent nothing for 300 ms"), "{}", backup.stderr_text());
    more_reports(&mut backup, 5, "the backup");
    assert_clean(&prim, "primary");
    assert_clean(&backup, "backup");
    assert_no_gap(&[&prim, &backup]);
    let _ = std::fs::remove_dir_all(&dir);
}

fn api_status(api: &Path) -> serde_json::Value {
    common::api(api, r#"{"cmd":"status"}"#)
}

/// Seed 004's fourth case, at the standby: a checkpointed stream of format version 2 is refused
/// at its header, naming both versions, before anything is applied.
#[test]
fn a_standby_refuses_a_checkpointed_stream_of_another_version_at_its_header() {
    if !kvm_available("a_standby_refuses_a_checkpointed_stream_of_another_version_at_its_header") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("ha-oldver");
    let sock = dir.join("ha.sock");
    let mut backup = standby(&format!("unix:{}", sock.display()), &image(&dir, "b.img"), &dir.join("b.sock"), &[]);
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut hello = [0u8; 32];
    hello[..8].copy_from_slice(b"FERRYHLO");
    hello[8..12].copy_from_slice(&1u32.to_le_bytes());
    hello[12..16].copy_from_slice(&2u32.to_le_bytes());
    c.write_all(&hello).unwrap();
    let mut theirs = [0u8; 32];
    c.read_exact(&mut theirs).unwrap();
    assert_eq!(&theirs[..8], b"FERRYHLO");
    let h = ferry_stream::StreamHeader {
        format_version: 2,
        flags: ferry_stream::StreamFlags::CHECKPOINTED,
        page_size: 4096,
        writer_version: (0, 1, 0),
    };
    c.write_all(&h.encode_for_tests()).unwrap();
    let mut frame = Vec::new();
    let _ = c.read_to_end(&mut frame);

    assert!(frame.len() > 8 && frame[..4] == 2u32.to_le_bytes(), "no NACK: {frame:?}");
    let msg = String::from_utf8_lossy(&frame[8..]);
    assert!(msg.contains("format version 2") && msg.contains("version 3"), "{msg}");
    assert!(backup.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0));
    assert!(hb(&backup).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backup whose Ferry reads other format versions is refused at the handshake, before a page
/// is sent, naming both; a plain migration to a standby and replication to a plain destination
/// are refused by name. The primary runs on, clean, after each.
#[test]
fn incompatible_backups_and_stream_kinds_are_refused_by_name_and_the_primary_runs_on() {
    if !kvm_available("incompatible_backups_and_stream_kinds_are_refused_by_name_and_the_primary_runs_on") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("ha-refuse");
    let (mut prim, api) = primary(&dir);

    // A backup of the previous format (reads 1 to 2) and one of a newer one (reads 1 to 4):
    // checkpoints only between equal versions.
    for (max, want) in [(2u32, "the destination reads 1 to 2"), (4, "the backup reads stream format versions 1 to 4")] {
        let old = dir.join(format!("v{max}.sock"));
        let l = std::os::unix::net::UnixListener::bind(&old).unwrap();
        let fake = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut h = [0u8; 32];
            c.read_exact(&mut h).unwrap();
            let mut ours = [0u8; 32];
            ours[..8].copy_from_slice(b"FERRYHLO");
            ours[8..12].copy_from_slice(&1u32.to_le_bytes());
            ours[12..16].copy_from_slice(&max.to_le_bytes());
            c.write_all(&ours).unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
            rest.len()
        });
        let r = replicate(&api, &format!("unix:{}", old.display()), &[]);
        assert!(!r.status.success());
        let e = String::from_utf8_lossy(&r.stderr);
        assert!(e.contains(want) && e.contains("3"), "{e}");
        assert_eq!(fake.join().unwrap(), 0, "bytes of a stream reached the incompatible backup");
    }

    // A plain destination refuses a checkpointed stream.
    let plain_uri = format!("unix:{}", dir.join("plain.sock").display());
    let mut plain = Proc::spawn(&["run", "--incoming", &plain_uri, "--disk", image(&dir, "d.img").to_str().unwrap()]);
    assert!(plain.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)));
    let r = replicate(&api, &plain_uri, &[]);
    assert!(!r.status.success());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(e.contains("only a standby takes one"), "{e}");
    assert!(plain.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0));

    // A standby refuses a plain migration.
    let sb_uri = format!("unix:{}", dir.join("sb.sock").display());
    let mut sb = standby(&sb_uri, &image(&dir, "b.img"), &dir.join("b.sock"), &[]);
    let out =
        Command::new(FERRY).args(["migrate", "--api-socket", api.to_str().unwrap(), "--to", &sb_uri]).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("a standby takes only a checkpointed stream"), "{e}");
    assert!(sb.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0));

    more_reports(&mut prim, 5, "the primary after the refusals");
    assert_clean(&prim, "primary");
    assert_no_gap(&[&prim]);
    let _ = std::fs::remove_dir_all(&dir);
}
