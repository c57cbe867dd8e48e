//! `ferry`: run a VM, migrate it, inspect streams.

mod api;
mod guest;

use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
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
    /// The built-in guest.
    Guest {
        #[command(subcommand)]
        cmd: GuestCmd,
    },
}

#[derive(Subcommand)]
enum GuestCmd {
    /// Write the built-in guest's ELF (PVH-bootable, e.g. by `qemu-system-x86_64 -kernel`).
    Export { path: PathBuf },
}

#[derive(clap::Args)]
struct RunArgs {
    /// ELF kernel with a PVH entry note (default: the built-in guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest RAM, e.g. 512M, 1G.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
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
    let (kernel, cmdline) = match &a.kernel {
        Some(p) => {
            let img = ferry_vmm::boot::read_image(p).with_context(|| format!("kernel {}", p.display()))?;
            (img, a.cmdline.clone().unwrap_or_default())
        }
        None => {
            let c = a.cmdline.clone().unwrap_or_else(|| guest::DEFAULT_CMDLINE.to_string());
            guest::validate_cmdline(&c, a.memory)?;
            (guest::GUEST_ELF.to_vec(), c)
        }
    };
    let cfg = VmConfig { memory: a.memory, vcpus: a.cpus, kernel, cmdline, serial_out: serial_sink(&a.serial)? };
    let vm = Arc::new(Vm::boot(cfg).map_err(|e| {
        let name = a.kernel.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in guest".into());
        anyhow::Error::new(e).context(format!("cannot start the VM ({name})"))
    })?);
    if let Some(sock) = &a.api_socket {
        let ctx = Arc::new(api::ApiContext { vm: vm.clone(), paused: AtomicBool::new(false) });
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

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
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
