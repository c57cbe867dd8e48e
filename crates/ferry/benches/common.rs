//! Shared pieces of Ferry's benchmarks: processes whose serial lines are kept with host
//! arrival times, QMP for QEMU, medians.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// Runs per figure (FERRY_BENCH_RUNS, else `default`), or None when the benchmark must not run:
/// `--list` (cargo asking), or no /dev/kvm (said loudly).
pub fn bench_runs(name: &str, default: usize) -> Option<usize> {
    if std::env::args().any(|a| a == "--list") {
        return None;
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        println!("SKIPPED {name} benchmark: /dev/kvm is not available");
        return None;
    }
    Some(std::env::var("FERRY_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

pub struct Proc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<(Instant, String)>>>,
    pub started: Instant,
}

impl Proc {
    pub fn spawn(exe: &str, args: &[&str]) -> Proc {
        let started = Instant::now();
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {exe}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push((Instant::now(), l));
            }
        });
        Proc { child, lines, started }
    }

    pub fn first(&self, prefix: &str) -> Option<Instant> {
        self.lines.lock().unwrap().iter().find(|(_, l)| l.starts_with(prefix)).map(|(t, _)| *t)
    }

    pub fn wait(&self, what: &str, timeout: Duration, f: impl Fn(&[(Instant, String)]) -> bool) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if f(&self.lines.lock().unwrap()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("timed out waiting for {what}");
    }

    pub fn last_report_field(&self, key: &str) -> Option<u64> {
        self.lines.lock().unwrap().iter().rev().find(|(_, l)| l.starts_with("REPORT ")).and_then(|(_, l)| field(l, key))
    }

    pub fn hb_times(&self) -> Vec<Instant> {
        self.lines.lock().unwrap().iter().filter(|(_, l)| l.starts_with("HB ")).map(|(t, _)| *t).collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Waits (at least 3 s, at most 20 s) until every CPU of this host ran a busy loop for twice
/// 0.5 s in a row without being held up for more than 5 ms. This host is itself a VM with free page reporting: after a
/// process frees a lot of memory (QEMU exiting does it; Ferry exiting was not seen to), all its
/// CPUs stall for ~35 ms out of every 100 ms for a few seconds. Each run starts after that has
/// passed, so no run pays for the one before it.
///
/// The reporting comes in rounds about 2 s apart (a 1.5 GiB free here: reports at +0, +2, +4
/// and +6 s), and a quiet second can fall between two rounds; memory freed 1.3 s before a
/// migration then stalled its guest for 35-37 ms in 3 of 3 runs (5-7 ms without). So it also
/// waits, within the same 20 s, until the balloon's reporting queue has had no interrupt for
/// 2.5 s (`reporting_vq` in /proc/interrupts, where there is one).
pub fn wait_quiet() {
    wait_reporting_done(Duration::from_secs(20));
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let start = Instant::now();
    let mut quiet = 0;
    while start.elapsed() < Duration::from_secs(20) {
        let worst = (0..cpus)
            .map(|_| {
                std::thread::spawn(|| {
                    let t0 = Instant::now();
                    let (mut last, mut worst) = (t0, Duration::ZERO);
                    while last - t0 < Duration::from_millis(500) {
                        let t = Instant::now();
                        worst = worst.max(t - last);
                        last = t;
                    }
                    worst
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap_or_default();
        quiet = if worst < Duration::from_millis(5) { quiet + 1 } else { 0 };
        if quiet < 2 && start.elapsed() >= Duration::from_secs(20) {
            println!("(host not quiet after 20 s: worst stall {worst:?}; running anyway)");
        }
        // The stalls begin a second or two after the memory was freed.
        if quiet >= 2 && start.elapsed() >= Duration::from_secs(3) {
            return;
        }
    }
}

/// Interrupts of the virtio balloon's free page reporting queue so far, if this host has one.
fn page_reports() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/interrupts").ok()?;
    let line = s.lines().find(|l| l.contains("reporting_vq"))?;
    Some(line.split_whitespace().skip(1).map_while(|x| x.parse::<u64>().ok()).sum())
}

/// Waits (at most `max`) until no free page report came for 2.5 s.
fn wait_reporting_done(max: Duration) {
    let start = Instant::now();
    let Some(mut last) = page_reports() else { return };
    let mut since = Instant::now();
    while start.elapsed() < max {
        std::thread::sleep(Duration::from_millis(50));
        let now = page_reports().unwrap_or(last);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_millis(2500) {
            return;
        }
    }
    println!("(free page reporting still active after {max:?}; running anyway)");
}

/// Largest gap (ms) between heartbeats of both processes in `[from, to]`.
pub fn max_hb_gap(a: &Proc, b: &Proc, from: Instant, to: Instant) -> f64 {
    let mut t: Vec<Instant> = a.hb_times().into_iter().chain(b.hb_times()).filter(|x| *x >= from && *x <= to).collect();
    t.sort();
    t.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0).fold(0.0, f64::max)
}

/// The gap (ms) across the switch-over: from the source's last `HB` before the destination's
/// first to that first one, as the harness received them.
pub fn switch_gap(src: &Proc, dst: &Proc) -> f64 {
    let Some(d0) = dst.hb_times().into_iter().next() else {
        return f64::NAN;
    };
    match src.hb_times().into_iter().rfind(|t| *t <= d0) {
        Some(s) => (d0 - s).as_secs_f64() * 1000.0,
        None => f64::NAN,
    }
}

/// Largest gap (ms) the guest itself measured between its workload iterations (`max_gap_us`
/// of REPORT lines received in `[from, to]`, from both processes): the pause as the guest saw
/// it, free of how fast this harness reads serial output.
pub fn max_guest_gap(a: &Proc, b: &Proc, from: Instant, to: Instant) -> f64 {
    let mut m = 0u64;
    for p in [a, b] {
        for (t, l) in p.lines.lock().unwrap().iter() {
            if *t >= from && *t <= to && l.starts_with("REPORT ") {
                m = m.max(field(l, "max_gap_us").unwrap_or(0));
            }
        }
    }
    m as f64 / 1000.0
}

/// Median of the figures that are numbers (NaN: a run without that figure).
pub fn median(v: Vec<f64>) -> f64 {
    let mut v: Vec<f64> = v.into_iter().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The built-in guest's ELF, for QEMU.
pub fn export_guest(dir: &Path) -> PathBuf {
    let p = dir.join("ferry-guest.elf");
    assert!(Command::new(FERRY).args(["guest", "export", p.to_str().unwrap()]).status().unwrap().success());
    p
}

pub fn qemu_args<'a>(elf: &'a str, memory: &'a str, cpus: &'a str, cmdline: &'a str) -> Vec<&'a str> {
    vec![
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-M",
        "microvm",
        "-bios",
        "/usr/share/qemu/qboot.rom",
        "-m",
        memory,
        "-smp",
        cpus,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit",
        "-kernel",
        elf,
        "-append",
        cmdline,
    ]
}

/// A QMP connection.
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let end = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        let mut q = Qmp { r: BufReader::new(s.try_clone().unwrap()), w: s };
        let _greeting = q.read();
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn read(&mut self) -> serde_json::Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or(serde_json::Value::Null)
    }

    /// Sends a command and returns its "return" (skipping events).
    pub fn cmd(&mut self, c: &str) -> serde_json::Value {
        writeln!(self.w, "{c}").unwrap();
        loop {
            let v = self.read();
            if v.get("return").is_some() {
                return v["return"].clone();
            }
            if v.get("error").is_some() {
                panic!("QMP {c}: {v}");
            }
            if v.is_null() {
                panic!("QMP connection closed on {c}");
            }
        }
    }
}

impl Qmp {
    /// Polls `query-migrate` every `poll` until the migration completed; returns its last
    /// answer. A failed or cancelled one panics, naming `what`.
    pub fn wait_migrated(&mut self, what: &str, poll: Duration) -> serde_json::Value {
        loop {
            let v = self.cmd(r#"{"execute":"query-migrate"}"#);
            match v["status"].as_str() {
                Some("completed") => return v,
                Some("failed") | Some("cancelled") => panic!("{what} failed: {v}"),
                _ => std::thread::sleep(poll),
            }
        }
    }
}

/// Starts a destination Ferry (`--incoming` on a socket in `dir`, plus `dst_extra`), migrates the
/// source behind `api` to it, and returns the destination, the migration's start and end as the
/// harness saw them, and `ferry migrate --json`'s summary.
pub fn ferry_migrate(api: &Path, dir: &Path, dst_extra: &[&str]) -> (Proc, Instant, Instant, serde_json::Value) {
    let sock = dir.join("mig.sock");
    let mig = format!("unix:{}", sock.display());
    let mut args = vec!["run", "--incoming", &mig];
    args.extend(dst_extra);
    let dst = Proc::spawn(FERRY, &args);
    let end = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = Instant::now();
    let out = Command::new(FERRY)
        .args(["migrate", "--api-socket", api.to_str().unwrap(), "--to", &mig, "--json"])
        .output()
        .unwrap();
    let t1 = Instant::now();
    assert!(out.status.success(), "ferry migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    (dst, t0, t1, serde_json::from_slice(&out.stdout).unwrap())
}

/// One real-time (SCHED_FIFO) thread pinned to each of this machine's CPUs, waking every
/// millisecond and keeping the times it ran. Such a thread preempts everything else on its CPU,
/// so a long gap between its wake-ups means that CPU ran nothing at all: the outer hypervisor
/// had stopped it (this host is itself a VM), or the kernel ran with preemption off. A pause
/// that matches such a gap is the host's, not the VMM's. Without the right to use SCHED_FIFO
/// the threads run at normal priority and their gaps also count ordinary scheduling delay.
pub struct CpuWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    times: Vec<Arc<Mutex<Vec<Instant>>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub realtime: bool,
}

impl CpuWatch {
    pub fn start() -> CpuWatch {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rt = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut times = Vec::new();
        let mut threads = Vec::new();
        for cpu in 0..cpus {
            let t = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
            let (stop, t2, rt) = (stop.clone(), t.clone(), rt.clone());
            threads.push(std::thread::spawn(move || {
                // SAFETY: cpu_set_t is plain data; the calls change only this thread's affinity
                // and policy.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    let p = libc::sched_param { sched_priority: 1 };
                    if libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) != 0 {
                        rt.store(false, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    t2.lock().unwrap().push(Instant::now());
                    std::thread::sleep(Duration::from_millis(1));
                }
            }));
            times.push(t);
        }
        std::thread::sleep(Duration::from_millis(20));
        let realtime = rt.load(std::sync::atomic::Ordering::SeqCst);
        CpuWatch { stop, times, threads, realtime }
    }

    /// Largest gap (ms) between one CPU's wake-ups in `[from, to]`, over all CPUs.
    pub fn max_gap(&self, from: Instant, to: Instant) -> f64 {
        self.times
            .iter()
            .map(|t| {
                let t = t.lock().unwrap();
                let v: Vec<Instant> = t.iter().copied().filter(|x| *x >= from && *x <= to).collect();
                v.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0).fold(0.0, f64::max)
            })
            .fold(0.0, f64::max)
    }
}

impl Drop for CpuWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// Two network namespaces `ns` joined by a veth pair `dev`, with addresses `<net>.1` and
/// `<net>.2`, each side's egress limited by `tbf rate <rate> burst <burst>`: two hosts on one
/// machine over a real link. Removed on drop (and before being made, should an earlier run have
/// left them). None where this host cannot make them (root and iproute2 needed).
pub struct TbfNamespaces {
    ns: [&'static str; 2],
}

impl TbfNamespaces {
    pub fn create(ns: [&'static str; 2], dev: [&'static str; 2], net: &str, rate: &str, burst: &str) -> Option<Self> {
        let sh = |args: &[&str]| Command::new(args[0]).args(&args[1..]).status().is_ok_and(|s| s.success());
        let link = TbfNamespaces { ns };
        link.remove();
        if !(sh(&["ip", "netns", "add", ns[0]])
            && sh(&["ip", "netns", "add", ns[1]])
            && sh(&["ip", "link", "add", dev[0], "type", "veth", "peer", "name", dev[1]]))
        {
            return None;
        }
        for i in 0..2 {
            let ip = format!("{net}.{}/24", i + 1);
            let ok = sh(&["ip", "link", "set", dev[i], "netns", ns[i]])
                && sh(&["ip", "-n", ns[i], "addr", "add", &ip, "dev", dev[i]])
                && sh(&["ip", "-n", ns[i], "link", "set", dev[i], "up"])
                && sh(&["ip", "-n", ns[i], "link", "set", "lo", "up"])
                && sh(&[
                    "ip", "netns", "exec", ns[i], "tc", "qdisc", "add", "dev", dev[i], "root", "tbf", "rate", rate,
                    "burst", burst, "latency", "50ms",
                ]);
            if !ok {
                return None;
            }
        }
        Some(link)
    }

    /// `exe args` in namespace `side` (0 or 1).
    pub fn spawn(&self, side: usize, exe: &str, args: &[&str]) -> Proc {
        let mut a = vec!["netns", "exec", self.ns[side], exe];
        a.extend(args);
        Proc::spawn("ip", &a)
    }

    fn remove(&self) {
        for n in self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(Stdio::null()).status();
        }
    }
}

impl Drop for TbfNamespaces {
    fn drop(&mut self) {
        self.remove();
    }
}
