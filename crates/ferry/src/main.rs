//! `ferry`: run a VM, migrate it, inspect streams.

mod api;
mod demo;
mod guest;
mod report;

use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ferry_vmm::devices::serial::SerialSink;
use ferry_vmm::{ExitReason, Vm, VmConfig};

#[derive(Parser)]
#[command(name = "ferry", version, about = "A VMM built around moving running guests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a VM (the built-in guest unless --kernel is given).
    Run(RunArgs),
    /// Send a request to a running Ferry's API socket and print the reply.
    Api {
        #[arg(long)]
        api_socket: PathBuf,
        /// status | pause | resume | quit
        command: String,
    },
    /// Live-migrate the VM behind an API socket to a destination started with `ferry run --incoming`.
    Migrate(MigrateArgs),
    /// Cancel the migration running in the VM behind an API socket (the source keeps running).
    MigrateCancel {
        #[arg(long)]
        api_socket: PathBuf,
    },
    /// Ferry's main job on one machine: boot the built-in guest, migrate it to a second Ferry
    /// over a UNIX socket, and show it verifying its memory on the destination.
    Demo {
        #[arg(long, default_value = "1G")]
        memory: String,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// The built-in guest's workload.
        #[arg(long, default_value = "mib=256 rate=50")]
        cmdline: String,
    },
    /// Migration streams and snapshot files.
    Stream {
        #[command(subcommand)]
        cmd: StreamCmd,
    },
    /// The built-in guest.
    Guest {
        #[command(subcommand)]
        cmd: GuestCmd,
    },
}

#[derive(Subcommand)]
enum StreamCmd {
    /// Print a stream record by record (and check it).
    Inspect { path: PathBuf },
}

#[derive(Subcommand)]
enum GuestCmd {
    /// Write the built-in guest's ELF (PVH-bootable, e.g. by `qemu-system-x86_64 -kernel`).
    Export { path: PathBuf },
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// API socket of the source Ferry.
    #[arg(long)]
    api_socket: PathBuf,
    /// Destination: unix:PATH or tcp:HOST:PORT.
    #[arg(long)]
    to: String,
    /// Longest acceptable pause of the guest, in ms.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Bandwidth cap in MiB/s (default: none).
    #[arg(long)]
    max_bandwidth: Option<u64>,
    /// Give up (or, with --force-switchover, stop the guest anyway) after this many iterations.
    #[arg(long, default_value_t = 30)]
    max_iterations: u32,
    /// Switch over after --max-iterations even if the downtime limit cannot be met.
    #[arg(long)]
    force_switchover: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// ELF kernel with a PVH entry note (default: the built-in guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest RAM, e.g. 512M, 1G (default 1G; with --incoming, the source's size).
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Kernel command line (for the built-in guest: its workload, see docs/guest.md).
    #[arg(long)]
    cmdline: Option<String>,
    /// Serial output: `stdout` or a file path.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// Control socket path.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Wait for an incoming migration on unix:PATH or tcp:HOST:PORT instead of booting.
    #[arg(long)]
    incoming: Option<String>,
}

/// Parses sizes like `512M`, `1G`, `1048576`.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 512M, 1G)"))?;
    n.checked_mul(mul).ok_or_else(|| format!("'{s}' is too large"))
}

fn serial_sink(spec: &str) -> Result<SerialSink> {
    if spec == "stdout" {
        return Ok(Box::new(std::io::stdout()));
    }
    let f = std::fs::File::create(spec).with_context(|| format!("cannot create serial output file {spec}"))?;
    Ok(Box::new(LineWriter::new(f)))
}

/// Exit status of `ferry run` for each way a VM ends (documented in docs/cli.md).
fn exit_code(r: &ExitReason) -> i32 {
    match r {
        ExitReason::GuestShutdown(c) => *c as i32,
        ExitReason::Stopped | ExitReason::Migrated => 0,
        ExitReason::GuestReset(_) => 120,
        ExitReason::KvmError(_) => 121,
    }
}

fn run(a: RunArgs) -> Result<i32> {
    if a.cpus == 0 {
        bail!("--cpus 0: a VM needs at least one vCPU");
    }
    let vm = match &a.incoming {
        Some(uri) => incoming(&a, uri)?,
        None => boot(&a)?,
    };
    serve_and_wait(&a, vm)
}

fn incoming(a: &RunArgs, uri: &str) -> Result<Arc<Vm>> {
    if a.kernel.is_some() || a.cmdline.is_some() {
        bail!("--incoming takes the guest from the migration stream: --kernel and --cmdline do not apply");
    }
    let uri = ferry_migrate::transport::Uri::parse(uri)?;
    let listener = ferry_migrate::transport::Listener::bind(&uri)?;
    eprintln!("ferry: waiting for an incoming migration on {uri}");
    let conn = listener.accept(&uri)?;
    drop(listener);
    let (vm, stats) = ferry_migrate::destination::receive(conn, a.memory, serial_sink(&a.serial)?)
        .context("incoming migration failed; nothing was started")?;
    eprintln!(
        "ferry: incoming migration complete: {:.1} MiB, {} normal and {} zero pages, load {:.1} ms (restore {:.1} ms)",
        stats.bytes as f64 / (1 << 20) as f64,
        stats.normal_pages,
        stats.zero_pages,
        stats.load.as_secs_f64() * 1000.0,
        stats.restore.as_secs_f64() * 1000.0
    );
    Ok(Arc::new(vm))
}

fn boot(a: &RunArgs) -> Result<Arc<Vm>> {
    let memory = a.memory.unwrap_or(1 << 30);
    let (kernel, cmdline) = match &a.kernel {
        Some(p) => {
            let img = ferry_vmm::boot::read_image(p).with_context(|| format!("kernel {}", p.display()))?;
            (img, a.cmdline.clone().unwrap_or_default())
        }
        None => {
            let c = a.cmdline.clone().unwrap_or_else(|| guest::DEFAULT_CMDLINE.to_string());
            guest::validate_cmdline(&c, memory)?;
            (guest::GUEST_ELF.to_vec(), c)
        }
    };
    let cfg = VmConfig { memory, vcpus: a.cpus, kernel, cmdline, serial_out: serial_sink(&a.serial)? };
    let vm = Vm::boot(cfg).map_err(|e| {
        let name = a.kernel.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in guest".into());
        anyhow::Error::new(e).context(format!("cannot start the VM ({name})"))
    })?;
    Ok(Arc::new(vm))
}

fn serve_and_wait(a: &RunArgs, vm: Arc<Vm>) -> Result<i32> {
    if let Some(sock) = &a.api_socket {
        let ctx = Arc::new(api::ApiContext::new(vm.clone()));
        api::serve(sock, ctx)?;
    }
    let reason = vm.wait_exit();
    let _ = std::io::stdout().flush();
    match &reason {
        ExitReason::GuestShutdown(c) => eprintln!("ferry: guest shut down with status {c}"),
        ExitReason::GuestReset(m) => eprintln!("ferry: guest reset: {m}"),
        ExitReason::KvmError(m) => eprintln!("ferry: KVM error: {m}"),
        ExitReason::Stopped => eprintln!("ferry: stopped"),
        ExitReason::Migrated => eprintln!("ferry: guest migrated away"),
    }
    if let Some(sock) = &a.api_socket {
        let _ = std::fs::remove_file(sock);
    }
    Ok(exit_code(&reason))
}

fn inspect(path: &std::path::Path) -> Result<i32> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    ferry_stream::inspect(std::io::BufReader::new(f), &mut out)
        .with_context(|| format!("{} is not a valid Ferry stream", path.display()))?;
    Ok(0)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn migrate(a: MigrateArgs) -> Result<i32> {
    ferry_migrate::transport::Uri::parse(&a.to)?;
    // Ctrl-C cancels the migration (the source keeps running) instead of killing this client.
    vmm_sys_util::signal::register_signal_handler(libc::SIGINT, on_sigint)
        .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}"))?;
    let mut req = serde_json::json!({
        "cmd": "migrate",
        "to": a.to,
        "downtime_ms": a.downtime_ms,
        "max_iterations": a.max_iterations,
        "force_switchover": a.force_switchover,
    });
    if let Some(b) = a.max_bandwidth {
        req["max_bandwidth_mib_s"] = b.into();
    }
    let sock = a.api_socket.clone();
    let mut cancelled = false;
    let reply = api::call_streaming(
        &a.api_socket,
        &req,
        &mut |ev| eprintln!("ferry: {}", report::progress_line(ev)),
        &mut || {
            if INTERRUPTED.load(Ordering::SeqCst) && !cancelled {
                cancelled = true;
                eprintln!("ferry: cancelling the migration (the source keeps running)");
                let _ = api::call(&sock, &serde_json::json!({"cmd": "migrate-cancel"}));
            }
        },
    )?;
    if reply["ok"] != serde_json::json!(true) {
        bail!("migration failed: {}", reply["error"].as_str().unwrap_or("unknown error"));
    }
    let summary = &reply["summary"];
    if a.json {
        println!("{summary}");
    } else {
        print!("{}", report::summary_text(summary));
    }
    Ok(0)
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Migrate(a) => migrate(a),
        Cmd::Demo { memory, cpus, cmdline } => {
            demo::run(demo::DemoArgs { memory, cpus, cmdline, after: std::time::Duration::from_secs(60) })
        }
        Cmd::Stream { cmd: StreamCmd::Inspect { path } } => inspect(&path),
        Cmd::MigrateCancel { api_socket } => {
            api::call(&api_socket, &serde_json::json!({"cmd": "migrate-cancel"})).map(|_| 0)
        }
        Cmd::Api { api_socket, command } => api::call(&api_socket, &serde_json::json!({ "cmd": command })).map(|v| {
            println!("{v}");
            0
        }),
        Cmd::Guest { cmd: GuestCmd::Export { path } } => std::fs::write(&path, guest::GUEST_ELF)
            .with_context(|| format!("cannot write {}", path.display()))
            .map(|_| 0),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            std::process::exit(1);
        }
    }
}
