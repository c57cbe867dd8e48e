//! End-to-end test harness: runs the `ferry` binary, keeps its serial lines with host arrival
//! times, and talks to its API socket.
#![allow(dead_code)]

pub mod proxy;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// Returns false (after saying so loudly) when KVM cannot be used here, so that the test skips;
/// with `FERRY_REQUIRE_KVM=1` (CI sets it where /dev/kvm exists) it fails the test instead, so
/// that a machine whose KVM broke cannot pass by skipping everything.
pub fn kvm_available(test: &str) -> bool {
    kvm_device_usable(test, Path::new("/dev/kvm"), kvm_required(std::env::var_os("FERRY_REQUIRE_KVM").as_deref()))
}

/// Whether `dev` (the KVM device) opens read-write. When it does not: a panic if `required`,
/// else false after a loud SKIPPED for `test`.
pub fn kvm_device_usable(test: &str, dev: &Path, required: bool) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => true,
        Err(e) if required => {
            panic!("FERRY_REQUIRE_KVM=1 but {} cannot be opened: {e} ({test} needs KVM)", dev.display())
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: this test needs KVM and {} cannot be opened: {e}", dev.display());
            println!("SKIPPED {test}: {} unavailable ({e})", dev.display());
            false
        }
    }
}

/// What a `FERRY_REQUIRE_KVM` value asks for: `1` requires KVM; unset, empty or `0` does not;
/// anything else is refused (a `yes` that silently skipped would defeat the point).
pub fn kvm_required(value: Option<&std::ffi::OsStr>) -> bool {
    match value.map(|v| v.to_str()) {
        None | Some(Some("" | "0")) => false,
        Some(Some("1")) => true,
        Some(v) => panic!("FERRY_REQUIRE_KVM must be 0 or 1, not {v:?}"),
    }
}

/// A fresh temporary directory.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-test-{}-{}-{}", name, std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

fn rand_suffix() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (t as u64) ^ ((t >> 64) as u64)
}

/// A running process whose stdout lines are collected.
pub struct Proc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<(Instant, String)>>>,
    pub stderr: Arc<Mutex<String>>,
    /// The output ended without a newline: its last line is cut (the rest of a line a guest
    /// was printing at a migration's switch-over appears on the destination).
    pub cut_tail: Arc<Mutex<bool>>,
    /// The output reached its end (the process closed stdout).
    pub eof: Arc<Mutex<bool>>,
    /// The process closed stderr.
    pub stderr_eof: Arc<Mutex<bool>>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        Self::spawn_exe(FERRY, args)
    }

    pub fn spawn_exe(exe: &str, args: &[&str]) -> Proc {
        Self::spawn_exe_env(exe, args, &[])
    }

    /// As [`Proc::spawn_exe`], with `env` added to the environment.
    pub fn spawn_exe_env(exe: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(exe)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn process");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let cut_tail = Arc::new(Mutex::new(false));
        let eof = Arc::new(Mutex::new(false));
        let out = child.stdout.take().expect("stdout");
        {
            let lines = lines.clone();
            let cut_tail = cut_tail.clone();
            let eof = eof.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(out);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => {
                            *eof.lock().unwrap() = true;
                            break;
                        }
                        Ok(_) => {
                            let complete = buf.last() == Some(&b'\n');
                            let l = String::from_utf8_lossy(&buf).trim_end_matches('\n').to_string();
                            lines.lock().unwrap().push((Instant::now(), l));
                            if !complete {
                                *cut_tail.lock().unwrap() = true;
                            }
                        }
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_eof = Arc::new(Mutex::new(false));
        let err = child.stderr.take().expect("stderr");
        {
            let stderr = stderr.clone();
            let stderr_eof = stderr_eof.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(err).lines() {
                    let Ok(l) = l else { break };
                    let mut s = stderr.lock().unwrap();
                    s.push_str(&l);
                    s.push('\n');
                }
                *stderr_eof.lock().unwrap() = true;
            });
        }
        Proc { child, lines, stderr, cut_tail, eof, stderr_eof }
    }

    /// After the process exited: waits (up to 5 s) until both output readers reached the end,
    /// so that every line it printed is in `lines` and `stderr`.
    fn wait_output_end(&self) {
        wait_until(Duration::from_secs(5), || *self.eof.lock().unwrap() && *self.stderr_eof.lock().unwrap());
    }

    /// Waits for a line containing `pat`; returns it.
    pub fn wait_line(&mut self, pat: &str, timeout: Duration) -> Option<String> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|(_, l)| l.contains(pat)) {
                return Some(l.1.clone());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                self.wait_output_end();
                return self.lines.lock().unwrap().iter().find(|(_, l)| l.contains(pat)).map(|l| l.1.clone());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits until at least `n` REPORT lines were printed.
    pub fn wait_reports(&mut self, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.reports().len() >= n {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                self.wait_output_end();
                return self.reports().len() >= n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits until the last REPORT line satisfies `pred` (or the process exited); returns
    /// whether it does.
    /// Waits until every lane of the guest verifies pages: each lane's fill of the working set
    /// is done (a lane verifies only after its fill). What a test that needs the whole working
    /// set waits for, never a count of reports (a slow host fills slowly).
    pub fn wait_lanes_verifying(&mut self, timeout: Duration) -> bool {
        self.wait_report(
            |r| {
                r.lanes > 0
                    && (0..r.lanes).all(|i| {
                        let key = format!("lane{i}=");
                        r.line
                            .split_whitespace()
                            .find_map(|t| t.strip_prefix(key.as_str()))
                            .and_then(|v| v.split('/').nth(1)?.parse::<u64>().ok())
                            .is_some_and(|verified| verified > 0)
                    })
            },
            timeout,
        )
    }

    /// Waits until the guest's disk workload has written a block (it starts after lane 0's
    /// memory fill).
    pub fn wait_disk_writing(&mut self, timeout: Duration) -> bool {
        self.wait_report(|r| r.line.contains("DISK written=") && !r.line.contains("DISK written=0 "), timeout)
    }

    pub fn wait_report(&mut self, pred: impl Fn(&Report) -> bool, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.reports().last().is_some_and(&pred) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                self.wait_output_end();
                return self.reports().last().is_some_and(&pred);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits until the guest printed `n` more `HB` lines than it had when called: about `n`
    /// heartbeat periods (`hb_us`, 1 ms by default) of the guest running.
    pub fn wait_heartbeats(&mut self, n: usize, timeout: Duration) -> bool {
        let want = self.heartbeats().len() + n;
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.heartbeats().len() >= want {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                self.wait_output_end();
                return self.heartbeats().len() >= want;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits until the guest wrote at least `pages` pages after this call: counted from the
    /// `written=` of the first REPORT printed after it (which already counts every write before
    /// the call).
    pub fn wait_written(&mut self, pages: u64, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let n = self.reports().len();
        if !self.wait_reports(n + 1, timeout) {
            return false;
        }
        let from = self.reports()[n].written;
        self.wait_report(|r| r.written >= from + pages, end.saturating_duration_since(Instant::now()))
    }

    /// Waits until the process printed `pat` on stderr.
    pub fn wait_stderr(&self, pat: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.stderr.lock().unwrap().contains(pat))
    }

    pub fn reports(&self) -> Vec<Report> {
        self.lines.lock().unwrap().iter().filter_map(|(_, l)| Report::parse(l)).collect()
    }

    pub fn text(&self) -> String {
        self.lines.lock().unwrap().iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    pub fn tail(&self, n: usize) -> String {
        let l = self.lines.lock().unwrap();
        let start = l.len().saturating_sub(n);
        l[start..].iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join(" | ")
    }

    pub fn lines_with(&self, pat: &str) -> Vec<String> {
        self.lines.lock().unwrap().iter().filter(|(_, l)| l.contains(pat)).map(|(_, l)| l.clone()).collect()
    }

    pub fn heartbeats(&self) -> Vec<(Instant, u64)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(t, l)| l.strip_prefix("HB ").and_then(|s| s.trim().parse().ok()).map(|n| (*t, n)))
            .collect()
    }

    /// Waits for the process to end; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.wait_exit_seen(timeout).and_then(|(code, _)| code)
    }

    /// As [`Proc::wait_exit`], with the moment the exit was seen (within 20 ms of it).
    pub fn wait_exit_seen(&mut self, timeout: Duration) -> Option<(Option<i32>, Instant)> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                let at = Instant::now();
                self.wait_output_end();
                return Some((s.code(), at));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Heartbeat numbers of a guest that moved from `src` to `dst`, with a line cut at the
/// switch-over joined back together.
pub fn joined_heartbeats(src: &Proc, dst: &Proc) -> Vec<u64> {
    // A line cut at the switch-over is only known to be cut once the source's output ended
    // (until then its start waits for a newline in the reader): wait for the source to exit.
    let end = Instant::now() + Duration::from_secs(30);
    while !*src.eof.lock().unwrap() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s: Vec<String> = src.lines.lock().unwrap().iter().map(|l| l.1.clone()).collect();
    let mut d: Vec<String> = dst.lines.lock().unwrap().iter().map(|l| l.1.clone()).collect();
    if *src.cut_tail.lock().unwrap() && !s.is_empty() && !d.is_empty() {
        let first = d.remove(0);
        if let Some(last) = s.last_mut() {
            last.push_str(&first);
        }
    }
    s.into_iter().chain(d).filter_map(|l| l.strip_prefix("HB ").and_then(|x| x.trim().parse().ok())).collect()
}

/// One parsed REPORT line.
#[derive(Debug, Clone)]
pub struct Report {
    pub t_ms: u64,
    pub written: u64,
    pub verified: u64,
    pub errors: u64,
    pub lanes: u64,
    /// The guest's own write rate since its previous REPORT (NaN if the line lacks it).
    pub rate_mib_s: f64,
    pub line: String,
}

pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key).and_then(|v| v.strip_prefix('=')).and_then(|v| v.parse().ok()))
}

impl Report {
    pub fn parse(l: &str) -> Option<Report> {
        if !l.starts_with("REPORT ") {
            return None;
        }
        Some(Report {
            t_ms: field(l, "t_ms")?,
            written: field(l, "written")?,
            verified: field(l, "verified")?,
            errors: field(l, "errors")?,
            lanes: field(l, "lanes").unwrap_or(1),
            rate_mib_s: l
                .split_whitespace()
                .find_map(|t| t.strip_prefix("rate_mib_s=").and_then(|v| v.parse().ok()))
                .unwrap_or(f64::NAN),
            line: l.to_string(),
        })
    }
}

/// One API request; returns the reply.
pub fn api(socket: &Path, req: &str) -> serde_json::Value {
    let conn = UnixStream::connect(socket).expect("connect API socket");
    let mut w = conn.try_clone().unwrap();
    writeln!(w, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).unwrap();
    serde_json::from_str(&line).expect("API reply is JSON")
}

/// Polls `cond` every 20 ms until it holds; returns whether it did within `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Waits (up to 10 s) until a destination listens on its UNIX socket `p`: not by connecting, as
/// a destination takes its first connection as the stream, and not by the path appearing, which
/// happens at bind(), before listen() (a connect in between is refused: a suite run under load
/// failed so). Returns whether it listens.
pub fn wait_listening(p: &Path) -> bool {
    wait_until(Duration::from_secs(10), || unix_listening(p))
}

/// Whether a UNIX socket listens at `p`, from /proc/net/unix (the flag __SO_ACCEPTCON, 0x10000,
/// is set by listen()).
pub fn unix_listening(p: &Path) -> bool {
    let want = p.to_string_lossy();
    std::fs::read_to_string("/proc/net/unix").is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8 && f[7] == want && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
        })
    })
}

/// Waits until the API socket accepts connections.
pub fn wait_socket(socket: &Path, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if UnixStream::connect(socket).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Parses `ws=0xA-0xB` from the guest's BOOT line.
pub fn working_set(boot_line: &str) -> (u64, u64) {
    let ws = boot_line.split_whitespace().find_map(|t| t.strip_prefix("ws=")).expect("BOOT line has ws=");
    let (a, b) = ws.split_once('-').expect("ws=A-B");
    let p = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
    (p(a), p(b))
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Resident memory of a process, KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The DISK part of each REPORT line: (written, errors).
pub fn disk_counts(p: &Proc) -> Vec<(u64, u64)> {
    p.lines_with("REPORT ")
        .iter()
        .filter_map(|l| {
            let d = &l[l.find(" DISK ")?..];
            Some((field(d, "written")?, field(d, "errors")?))
        })
        .collect()
}

/// Every memory and disk report of `p` clean, and no verifier failure line.
pub fn assert_guest_clean(p: &Proc, what: &str) {
    assert!(p.reports().iter().all(|r| r.errors == 0), "{what}: memory errors: {}", p.tail(3));
    assert!(disk_counts(p).iter().all(|d| d.1 == 0), "{what}: disk errors: {}", p.tail(3));
    assert!(p.lines_with("VERIFY-FAIL").is_empty() && p.lines_with("DISK-FAIL").is_empty(), "{what}: {}", p.tail(5));
}

/// Two network namespaces joined by a veth pair, each side's egress limited by a `tbf` qdisc:
/// two hosts on one machine, over a real link of a given rate (issue 24, item 5). Removed on
/// drop.
pub struct TbfLink {
    ns: [String; 2],
    /// The address of side 1 (the destination's side).
    pub dst_ip: &'static str,
}

impl TbfLink {
    /// A link at `rate` (tc syntax, e.g. `256mbit`) with `burst`, or None, after a loud SKIPPED
    /// for `test`, where this host cannot make one (not root, no `ip`/`tc`, no veth or tbf).
    /// With FERRY_REQUIRE_KVM=1 (CI) a link that cannot be made fails the test instead.
    pub fn create(test: &str, rate: &str, burst: &str) -> Option<TbfLink> {
        let tag =
            format!("{}{}", std::process::id() % 100_000, LINK_SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let ns = [format!("ferry-t{tag}a"), format!("ferry-t{tag}b")];
        let dev = [format!("fty{tag}a"), format!("fty{tag}b")];
        let link = TbfLink { ns: ns.clone(), dst_ip: "10.77.0.2" };
        let run = |args: &[&str]| -> Result<(), String> {
            match Command::new(args[0]).args(&args[1..]).stderr(Stdio::piped()).stdout(Stdio::null()).output() {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim())),
                Err(e) => Err(format!("{}: {e}", args.join(" "))),
            }
        };
        let setup = || -> Result<(), String> {
            run(&["ip", "netns", "add", &ns[0]])?;
            run(&["ip", "netns", "add", &ns[1]])?;
            run(&["ip", "link", "add", &dev[0], "type", "veth", "peer", "name", &dev[1]])?;
            for (i, ip) in ["10.77.0.1/24", "10.77.0.2/24"].into_iter().enumerate() {
                run(&["ip", "link", "set", &dev[i], "netns", &ns[i]])?;
                run(&["ip", "-n", &ns[i], "addr", "add", ip, "dev", &dev[i]])?;
                run(&["ip", "-n", &ns[i], "link", "set", &dev[i], "up"])?;
                run(&["ip", "-n", &ns[i], "link", "set", "lo", "up"])?;
                run(&[
                    "ip", "netns", "exec", &ns[i], "tc", "qdisc", "add", "dev", &dev[i], "root", "tbf", "rate", rate,
                    "burst", burst, "latency", "50ms",
                ])?;
            }
            Ok(())
        };
        match setup() {
            Ok(()) => Some(link),
            Err(e) if kvm_required(std::env::var_os("FERRY_REQUIRE_KVM").as_deref()) => {
                panic!("FERRY_REQUIRE_KVM=1 but the link for {test} cannot be made: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED {test}: it needs two network namespaces and tbf (root, iproute2): {e}");
                println!("SKIPPED {test}: no network namespaces ({e})");
                None
            }
        }
    }

    /// `ferry args` in namespace `side` (0: source, 1: destination).
    pub fn spawn(&self, side: usize, args: &[&str]) -> Proc {
        let mut a = vec!["netns", "exec", &self.ns[side], FERRY];
        a.extend(args);
        Proc::spawn_exe("ip", &a)
    }
}

static LINK_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Drop for TbfLink {
    fn drop(&mut self) {
        for n in &self.ns {
            // Deleting a namespace deletes its end of the veth pair, and so the pair.
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(Stdio::null()).status();
        }
    }
}
