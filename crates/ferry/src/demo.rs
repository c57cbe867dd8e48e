//! `ferry demo`: Ferry's main job on one machine. Starts a source VM with the built-in guest
//! dirtying memory, a destination waiting for it, migrates over a UNIX socket, and shows the
//! guest continuing on the destination with its verifier clean.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Demo settings.
pub struct DemoArgs {
    pub memory: String,
    pub cmdline: String,
    pub cpus: u32,
    pub after: Duration,
}

struct Vmm {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Vmm {
    fn spawn(name: &'static str, args: &[&str]) -> Result<Vmm> {
        let exe = std::env::current_exe().context("cannot find the ferry executable")?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start the {name} VMM"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    // Heartbeats are 1 kHz: show only every 500th.
                    let show = match l.strip_prefix("HB ").and_then(|s| s.trim().parse::<u64>().ok()) {
                        Some(n) => n % 500 == 0,
                        None => true,
                    };
                    if show {
                        println!("[{name}] {l}");
                    }
                    if let Ok(mut v) = lines.lock() {
                        v.push(l);
                    }
                }
            });
        }
        Ok(Vmm { child, lines })
    }

    fn reports(&self) -> Vec<String> {
        self.lines.lock().map(|v| v.iter().filter(|l| l.starts_with("REPORT ")).cloned().collect()).unwrap_or_default()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out waiting for {what}")
}

pub fn run(a: DemoArgs) -> Result<i32> {
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let api = dir.join("source.sock");
    let mig = dir.join("migration.sock");
    let api_s = api.to_string_lossy().into_owned();
    let uri = format!("unix:{}", mig.display());
    let cpus = a.cpus.to_string();
    println!("demo: starting the source VM ({} RAM, built-in guest: {})", a.memory, a.cmdline);
    let src = Vmm::spawn(
        "source",
        &["run", "--memory", &a.memory, "--cpus", &cpus, "--cmdline", &a.cmdline, "--api-socket", &api_s],
    )?;
    wait_for("the source guest's first reports", Duration::from_secs(120), || src.reports().len() >= 3)?;
    println!("demo: starting the destination, waiting on {uri}");
    let dst = Vmm::spawn("dest", &["run", "--incoming", &uri])?;
    wait_for("the destination socket", Duration::from_secs(10), || Path::new(&mig).exists())?;
    println!("demo: migrating");
    let exe = std::env::current_exe()?;
    let status = Command::new(exe)
        .args(["migrate", "--api-socket", &api_s, "--to", &uri])
        .status()
        .context("cannot run ferry migrate")?;
    if !status.success() {
        bail!("the migration failed; the source guest is still running");
    }
    let base = src.reports().last().and_then(|l| field(l, "verified")).unwrap_or(0);
    let ws_pages =
        a.cmdline.split_whitespace().find_map(|t| t.strip_prefix("mib=")?.parse::<u64>().ok()).unwrap_or(64) * 256;
    println!(
        "demo: the guest runs on the destination; waiting until it has re-verified its {ws_pages}-page working set"
    );
    let end = Instant::now() + a.after.max(Duration::from_secs(60));
    let mut last = None;
    while Instant::now() < end {
        last = dst.reports().last().cloned();
        if let Some(l) = &last {
            if field(l, "errors").unwrap_or(1) != 0 {
                bail!("the destination guest found errors: {l}");
            }
            if field(l, "verified").unwrap_or(0).saturating_sub(base) >= ws_pages {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = last.context("the destination guest printed no report")?;
    let verified = field(&last, "verified").unwrap_or(0).saturating_sub(base);
    if verified < ws_pages {
        bail!("the destination guest verified only {verified} of {ws_pages} pages: {last}");
    }
    println!("demo: done: the destination guest verified {verified} pages since the move, errors=0");
    drop(dst);
    drop(src);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(0)
}
