//! `ferry`: run a VM, migrate it, inspect streams.

/// `eprintln!` that never panics: a Ferry whose stderr reader is gone (its supervisor or test
/// harness died, a closed pipe) must still stop, clean up and exit as it says, not die in a
/// message (a SIGTERM once left such a Ferry running: the signal thread panicked printing
/// "stopping on SIGTERM" before it stopped the machine).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod api;
mod client;
mod demo;
mod guest;
mod http;
mod logging;
mod report;
mod request;
mod update;

use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use ferry_migrate::destination::IncomingRam;
use ferry_vmm::devices::disk_image::{DiskImage, DiskSpec};
use ferry_vmm::devices::serial::SerialSink;
use ferry_vmm::memory::GuestRam;
use ferry_vmm::vm::DirtyTracking;
use ferry_vmm::{ExitReason, Vm, VmConfig};

#[derive(Parser)]
#[command(name = "ferry", version, about = "A VMM built around moving running guests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// What Ferry's libraries log on stderr (RUST_LOG, if set, takes precedence).
    #[arg(long, global = true, value_enum, default_value = "info")]
    log_level: logging::LogLevel,
    /// `text` (ferry: lines) or `json` (one object a line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: logging::LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum UpdateModeArg {
    Exec,
    Process,
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Break a guest page for real, as an uncorrectable memory error would (userfaultfd
    /// UFFDIO_POISON on Ferry's mapping): the guest gets a machine check when it touches it, and
    /// migrations, snapshots and restores carry it as broken (docs/poison.md).
    Poison {
        #[arg(long)]
        api_socket: PathBuf,
        /// Guest-physical address (hex with 0x, or decimal); its page breaks.
        #[arg(long, value_parser = parse_u64_auto)]
        gpa: u64,
        /// Do not tell Ferry's poison set first: only an access finds the page broken (the
        /// guest's, or Ferry's own copy, which then recovers).
        #[arg(long)]
        unannounced: bool,
        /// Break it when the next migration's final pass begins (guest paused), not now.
        #[arg(long)]
        at_final_pass: bool,
    },
    /// Make a call the seccomp filter of a thread kind forbids, from a new thread of that kind
    /// (tests of the filters): with `--seccomp kill` the VM's Ferry is killed (SIGSYS), with
    /// `log` the kernel logs the call.
    SeccompProbe {
        #[arg(long)]
        api_socket: PathBuf,
        /// vcpu | device | process
        #[arg(long)]
        thread: String,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum SeccompArg {
    /// No filters.
    Off,
    /// A call outside a thread's filter is logged by the kernel (dmesg: type=1326) and made.
    Log,
    /// A call outside a thread's filter kills Ferry.
    Kill,
}

fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("'{s}' is not a file mode (octal, e.g. 600 or 660)")),
    }
}

fn parse_u64_auto(s: &str) -> std::result::Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("'{s}' is not an address (hex with 0x, or decimal)"))
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a VM (the built-in guest unless --kernel is given).
    Run(Box<RunArgs>),
    /// Send a request to a running Ferry's API socket and print the reply.
    Api {
        #[arg(long)]
        api_socket: PathBuf,
        /// status | pause | resume | quit | migration (over the REST API: GET vm.info, PUT vm.pause,
        /// vm.resume, vm.shutdown, GET vm.migration)
        command: String,
    },
    /// Live-migrate the VM behind an API socket to a destination started with `ferry run --incoming`.
    Migrate(MigrateArgs),
    /// Finish a post-copy whose link failed, over a new connection to the destination (which
    /// waits with its guest running: `ferry run --incoming` takes the new connection on the
    /// same URI).
    MigrateResume {
        #[arg(long)]
        api_socket: PathBuf,
        /// The destination: the URI it listens on.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        tls: TlsArgs,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Cancel the migration running in the VM behind an API socket (the source keeps running).
    MigrateCancel {
        #[arg(long)]
        api_socket: PathBuf,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Save the VM behind an API socket to a snapshot file (restore with `ferry run --restore`).
    Snapshot(SnapshotArgs),
    /// Protect the VM behind an API socket with a backup (`ferry run --incoming URI --standby`):
    /// checkpointed replication with output commit; the backup takes over if this Ferry dies
    /// (docs/ha.md). Returns once the guest is protected; replication goes on in the VM's Ferry.
    Replicate(ReplicateArgs),
    /// End replication cleanly: a last checkpoint, then the backup exits (no failover).
    ReplicateStop {
        #[arg(long)]
        api_socket: PathBuf,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace the running Ferry behind an API socket with a new binary, the guest's memory in
    /// place (docs/live-update.md); the guest pauses for the handover only.
    Update {
        #[arg(long)]
        api_socket: PathBuf,
        /// The new binary (default: this Ferry's own path, e.g. after a rebuild).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// exec: replace the process in place (same PID); process: start a new process that
        /// takes over, and the old one exits.
        #[arg(long, value_enum, default_value = "exec")]
        mode: UpdateModeArg,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// (Internal) what this binary can take over, for `ferry update`'s start check.
    #[command(hide = true)]
    UpdateCheck,
    /// Debugging and testing aids.
    #[command(subcommand)]
    Debug(DebugCmd),
    /// Measure the guest's dirty rate (pages/s, MiB/s; per vCPU with the dirty ring) while it
    /// runs; safe during a migration.
    DirtyRate {
        #[arg(long)]
        api_socket: PathBuf,
        /// Measurement window in ms (10 to 60000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60000))]
        window_ms: u64,
        /// Print the measurement as JSON.
        #[arg(long)]
        json: bool,
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
    /// Shell completions for this CLI, on stdout (e.g. `ferry completions bash >
    /// /etc/bash_completion.d/ferry`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The manual page (roff), on stdout (e.g. `ferry man | man -l -`).
    Man,
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
    Inspect {
        path: PathBuf,
        /// Print only the totals, as JSON.
        #[arg(long)]
        json: bool,
        /// A snapshot file: also read every data page and disk block of every file of its chain
        /// and check it against its crc32c (what `--restore-mode read` checks and `mmap` does
        /// not). A migration stream's page data is covered by its records' checksums always.
        #[arg(long)]
        verify: bool,
    },
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
    /// Longest acceptable pause of the guest, in ms (at least 1): the switch happens once the
    /// final pass is estimated to fit it.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    downtime_ms: u64,
    /// Bandwidth cap in MiB/s (default: none).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=api::MAX_BANDWIDTH_MIB_S))]
    max_bandwidth: Option<u64>,
    /// Give up (or, with --force-switchover, stop the guest anyway) after this many iterations.
    #[arg(long, default_value_t = 30)]
    max_iterations: u32,
    /// Switch over after --max-iterations even if the downtime limit cannot be met.
    #[arg(long)]
    force_switchover: bool,
    /// Do not throttle the guest's vCPUs when its dirty set stops shrinking (by default Ferry
    /// throttles them step by step, 50% and up to 99% of the time, so the final pause stays short).
    #[arg(long)]
    no_auto_converge: bool,
    /// Fail the migration (the source keeps running) when the destination takes no data for
    /// this many ms: it stopped reading (hung, stopped, or a link that died without a reset).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    stall_timeout_ms: u64,
    /// Copy the disks too: their blocks go in the stream (the guest's writes during the
    /// migration included) into the destination's own --disk images, of the same sizes.
    #[arg(long)]
    copy_storage: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// Plain TCP without TLS is intended (no warning).
    #[arg(long, conflicts_with = "tls_cert")]
    insecure: bool,
    /// Also draw the migration as an SVG picture (passes: pages, bandwidth, dirty rate; the
    /// pause and where it went) into this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Post-copy (docs/migration.md): after the first pass the guest runs on the destination
    /// at once and the pages it still lacks follow (those it touches first). `--postcopy auto`
    /// switches to post-copy only when pre-copy does not converge (a guest that dirties faster
    /// than the link carries). If the link fails during post-copy, the guest waits on the
    /// destination until `ferry migrate-resume` finishes over a new connection.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "always")]
    postcopy: Option<PostcopyArg>,
    /// Post-copy after this many pre-copy passes (instead of after the first).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    postcopy_after_iterations: Option<u32>,
    /// Compress page data with zstd (for links slower than the CPU compresses: a batch that
    /// does not shrink goes as it is). The destination must be a Ferry that reads it.
    #[arg(long, value_enum)]
    compress: Option<CompressArg>,
    /// zstd level for --compress (1, the default, is fastest).
    #[arg(long, requires = "compress", value_parser = clap::value_parser!(u64).range(1..=api::MAX_ZSTD_LEVEL))]
    compress_level: Option<u64>,
    /// Connections that carry page data (1 to 16): each has a thread on both sides that
    /// copies, compresses and writes its share of guest memory (2 MiB shards), so a migration
    /// uses more than one CPU per side. The destination must be a Ferry that takes them; not
    /// with --postcopy.
    #[arg(
        long,
        value_parser = clap::value_parser!(u64).range(1..=api::MAX_CHANNELS),
        conflicts_with_all = ["postcopy", "postcopy_after_iterations"]
    )]
    channels: Option<u64>,
    /// Per-vCPU dirty-rate limit, MiB/s (QEMU's dirty-limit idea): once pre-copy stops
    /// converging, each vCPU that dirties memory faster than this is held out of the guest for
    /// short spells until it does not, while vCPUs under the limit run at full speed. Replaces
    /// auto-converge's whole-machine throttle; needs a machine started with --dirty-tracking
    /// ring.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=api::MAX_DIRTY_LIMIT_MIB_S))]
    dirty_limit: Option<u64>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum CompressArg {
    /// zstd (level: --compress-level).
    Zstd,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum PostcopyArg {
    /// After the first pass (or --postcopy-after-iterations).
    Always,
    /// When pre-copy does not converge.
    Auto,
}

/// Mutual TLS for a tcp: peer (docs/security.md): this Ferry's certificate and key, and the CA
/// that signs its peers'. All three or none.
#[derive(clap::Args, Clone, Default)]
struct TlsArgs {
    /// This Ferry's certificate (PEM; chain allowed).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA certificate(s) a peer's certificate must be signed by (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn given(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// Adds the files to an API request, as absolute paths (the VM's Ferry has its own working
    /// directory).
    fn add_to(&self, req: &mut serde_json::Value) -> Result<()> {
        for (k, p) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key), ("tls_ca", &self.tls_ca)] {
            if let Some(p) = p {
                let abs =
                    std::fs::canonicalize(p).with_context(|| format!("--{}: {}", k.replace('_', "-"), p.display()))?;
                req[k] = abs.display().to_string().into();
            }
        }
        Ok(())
    }

    /// The loaded identity, with the names a peer must be valid for.
    fn load(&self, allow: &[String]) -> Result<Option<Arc<ferry_migrate::tls::Tls>>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) else {
            if !allow.is_empty() {
                bail!("--tls-allow-peer needs TLS: give --tls-cert, --tls-key and --tls-ca");
            }
            return Ok(None);
        };
        let files = ferry_migrate::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            allow: allow.to_vec(),
        };
        Ok(Some(Arc::new(ferry_migrate::tls::Tls::load(&files)?)))
    }
}

/// A loud word on plain TCP: the stream is the whole guest.
fn warn_plain_tcp(uri: &ferry_migrate::transport::Uri, tls: bool, insecure: bool) {
    if matches!(uri, ferry_migrate::transport::Uri::Tcp(_)) && !tls && !insecure {
        say!(
            "ferry: WARNING: {uri} is plain TCP: the guest's memory and disks cross the network unencrypted, and \
             anyone who can reach it is trusted; give --tls-cert/--tls-key/--tls-ca (docs/security.md), or \
             --insecure to say this is intended"
        );
    }
}

/// Who an incoming listener lets in; a uid restriction on a TCP address is refused up front.
fn admission(
    uri: &ferry_migrate::transport::Uri,
    tls: Option<Arc<ferry_migrate::tls::Tls>>,
    peer_uid: Option<u32>,
) -> Result<ferry_migrate::transport::Admission> {
    if peer_uid.is_some() && matches!(uri, ferry_migrate::transport::Uri::Tcp(_)) {
        bail!(
            "--allow-peer-uid applies to unix: addresses; restrict a tcp: listener's peers with TLS (--tls-allow-peer)"
        );
    }
    Ok(ferry_migrate::transport::Admission { tls, peer_uid })
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackupLossArg {
    Stop,
    Continue,
}

#[derive(clap::Args)]
struct ReplicateArgs {
    #[arg(long)]
    api_socket: PathBuf,
    /// The standby: unix:PATH or tcp:HOST:PORT.
    #[arg(long)]
    to: String,
    /// Time between checkpoints, ms (Remus ran 25 ms: 40 checkpoints/s).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=60000))]
    interval_ms: u64,
    /// When the backup is lost: stop (pause the guest: never two copies running) or continue
    /// (run on unprotected).
    #[arg(long, value_enum, default_value = "stop")]
    on_backup_loss: BackupLossArg,
    /// The backup counts as lost when it does not acknowledge a checkpoint within this, ms.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    ack_timeout_ms: u64,
    #[command(flatten)]
    tls: TlsArgs,
    /// Plain TCP without TLS is intended (no warning).
    #[arg(long, conflicts_with = "tls_cert")]
    insecure: bool,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct SnapshotArgs {
    #[arg(long)]
    api_socket: PathBuf,
    /// The snapshot file to write (written as PATH.partial, renamed when complete).
    #[arg(long)]
    to: PathBuf,
    /// Copy memory while the guest runs; pause only for the last pass.
    #[arg(long)]
    live: bool,
    /// Leave the guest paused afterwards.
    #[arg(long)]
    stop: bool,
    /// Only the pages dirtied since this snapshot (the last one this Ferry took).
    #[arg(long)]
    incremental_from: Option<PathBuf>,
    /// Print the summary as JSON.
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
    /// The control socket's file mode, octal (default 600: only its owner may connect).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    api_socket_mode: u32,
    /// Wait for an incoming migration on unix:PATH or tcp:HOST:PORT instead of booting.
    #[arg(long)]
    incoming: Option<String>,
    /// Restore a snapshot file (following its chain of parents) instead of booting.
    #[arg(long)]
    restore: Option<PathBuf>,
    /// With --restore: `read` every page (and check its checksum) or `mmap` the snapshot
    /// copy-on-write (pages load when the guest touches them).
    #[arg(long, value_enum, default_value = "read")]
    restore_mode: RestoreModeArg,
    /// With --restore: leave the restored guest paused until the API resumes it.
    #[arg(long)]
    paused: bool,
    /// How KVM reports dirty pages: a per-slot bitmap (manual protect) or per-vCPU rings.
    #[arg(long, value_enum, default_value = "bitmap")]
    dirty_tracking: TrackingArg,
    /// Bitmap tracking: guest memory re-protected per KVM_CLEAR_DIRTY_LOG call, e.g. 64M.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    dirty_clear_chunk: u64,
    /// Ring tracking: entries per vCPU ring (a power of two, at least 1024).
    #[arg(long, default_value_t = ferry_vmm::dirty_ring::DEFAULT_RING_ENTRIES)]
    dirty_ring_entries: u32,
    /// A raw disk image as a virtio-blk device (repeat for several): PATH, or
    /// path=PATH[,readonly=on][,io-threads=N][,latency-us=N]. Locked while in use; a migration
    /// destination takes the lock over from the source at the switch-over.
    #[arg(long, value_parser = ferry_vmm::devices::disk_image::parse_disk_spec)]
    disk: Vec<DiskSpec>,
    /// Allocate all guest RAM up front: before booting, or with --incoming before accepting the
    /// stream (needs --memory there), so that neither the guest nor the incoming copy pays for
    /// page allocation later. Takes the whole RAM size in host memory at once.
    #[arg(long)]
    prefault: bool,
    /// With --incoming: fail (nothing is started) when the source sends no data for this many
    /// ms once its connection is accepted: it hung, was stopped, or its link died without a
    /// reset. Default 10000.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    stall_timeout_ms: Option<u64>,
    /// With --incoming, during a post-copy: how long to wait for the source to come back
    /// (`ferry migrate-resume`) after the link failed, before the guest, whose missing pages
    /// only the source has, is given up (Ferry then exits with status 1).
    #[arg(long, default_value_t = 600_000, value_parser = clap::value_parser!(u64).range(1..))]
    postcopy_recover_timeout_ms: u64,
    /// seccomp filters per thread kind (docs/security.md): the process-wide one, tighter ones for
    /// vCPU and disk threads. `kill` (default): a call outside them kills Ferry; `log`: the
    /// kernel logs it (dmesg) and lets it through; `off`: none.
    #[arg(long, value_enum, default_value_t = SeccompArg::Kill)]
    seccomp: SeccompArg,
    /// At exit, say how the run ended as one JSON object on stderr (status, reason, detail),
    /// instead of a sentence; stdout stays the guest's console.
    #[arg(long)]
    json: bool,
    /// With --incoming: be the backup of a replicated guest (`ferry replicate` on the primary):
    /// hold the last checkpoint and resume the guest from it when the primary is lost.
    #[arg(long)]
    standby: bool,
    /// With --standby: the primary counts as lost when it sends nothing for this many ms.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_timeout_ms: Option<u64>,
    /// With --incoming tcp:…: mutual TLS; a source must present a certificate signed by
    /// --tls-ca.
    #[command(flatten)]
    tls: TlsArgs,
    /// With TLS: a source's certificate must be valid for one of these names (repeatable).
    #[arg(long)]
    tls_allow_peer: Vec<String>,
    /// With --incoming tcp:… without TLS: plain TCP is intended (no warning).
    #[arg(long, conflicts_with = "tls_cert")]
    insecure: bool,
    /// With --incoming unix:…: take the stream only from a process running as this uid (the
    /// kernel's peer credentials); connections from other users are refused and logged.
    #[arg(long)]
    allow_peer_uid: Option<u32>,
    /// With --incoming or --restore (for tests of the CPU check): pretend this host lacks a
    /// CPUID feature bit, LEAF[.SUBLEAF].REG.BIT (e.g. 0x7.0.ebx.5 for AVX2). Repeatable.
    #[arg(long, hide = true)]
    debug_mask_cpuid: Vec<ferry_migrate::records::CpuidMask>,
    /// (Internal) take over a machine from the Ferry that exec'd or started this one
    /// (`ferry update`); the other machine options describe it as the old one was started.
    #[arg(long, hide = true, value_parser = update::HandoverArgs::parse)]
    handover: Option<update::HandoverArgs>,
    /// (Internal) why a new binary handed the guest back to this one.
    #[arg(long, hide = true)]
    handover_failed: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RestoreModeArg {
    Read,
    Mmap,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TrackingArg {
    Bitmap,
    Ring,
}

impl RunArgs {
    /// What loading a stream checks besides the stream.
    fn load_options(&self) -> ferry_migrate::records::LoadOptions {
        ferry_migrate::records::LoadOptions { memory: None, cpuid_masks: self.debug_mask_cpuid.clone() }
    }

    fn dirty_tracking(&self) -> Result<DirtyTracking> {
        Ok(match self.dirty_tracking {
            TrackingArg::Bitmap => {
                let pages = self.dirty_clear_chunk / 4096;
                if pages < 64 || !pages.is_power_of_two() {
                    bail!("--dirty-clear-chunk {} is not a power of two of at least 256K", self.dirty_clear_chunk);
                }
                DirtyTracking::Bitmap { clear_chunk_pages: pages }
            }
            TrackingArg::Ring => {
                let n = self.dirty_ring_entries;
                if n < 1024 || !n.is_power_of_two() {
                    bail!("--dirty-ring-entries {n} is not a power of two of at least 1024");
                }
                DirtyTracking::Ring { entries: n }
            }
        })
    }
}

/// Parses sizes like `512M`, `1G`, `1048576`.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 512M, 1G, 1T)"))?;
    n.checked_mul(mul).ok_or_else(|| format!("'{s}' is too large"))
}

/// The serial sink of a Ferry taking a guest over: a file is appended to, not truncated.
fn serial_sink_append(spec: &str) -> Result<SerialSink> {
    if spec == "stdout" {
        return Ok(Box::new(std::io::stdout()));
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec)
        .with_context(|| format!("cannot open serial output file {spec}"))?;
    Ok(Box::new(LineWriter::new(f)))
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
    // Before any thread starts: the process-wide filter reaches every thread (a Ferry exec'd
    // by a live update keeps the one it inherited).
    ferry_vmm::seccomp::set_mode(match a.seccomp {
        SeccompArg::Off => ferry_vmm::seccomp::Mode::Off,
        SeccompArg::Log => ferry_vmm::seccomp::Mode::Log,
        SeccompArg::Kill => ferry_vmm::seccomp::Mode::Kill,
    });
    ferry_vmm::seccomp::install(ferry_vmm::seccomp::ThreadKind::Process)?;
    // A live update: the machine comes from the Ferry before this one, nothing else applies.
    if let Some(h) = a.handover.clone() {
        let (vm, listener) = handover_in(&a, &h)?;
        if h.park.is_some() {
            return parked(&a, &h, vm, listener);
        }
        return serve_and_wait_on(&a, vm, listener);
    }
    if a.cpus == 0 {
        bail!("--cpus 0: a VM needs at least one vCPU");
    }
    if a.paused && a.restore.is_none() {
        bail!("--paused applies to --restore only");
    }
    if a.stall_timeout_ms.is_some() && a.incoming.is_none() {
        bail!("--stall-timeout-ms applies to --incoming only (for a source, give it to `ferry migrate`)");
    }
    if a.standby && a.incoming.is_none() {
        bail!("--standby needs --incoming URI: the primary's `ferry replicate --to` connects there");
    }
    if a.heartbeat_timeout_ms.is_some() && !a.standby {
        bail!("--heartbeat-timeout-ms applies to --standby only");
    }
    if let (true, Some(uri)) = (a.standby, &a.incoming) {
        return match standby(&a, uri)? {
            Some(vm) => serve_and_wait(&a, vm),
            None => Ok(0),
        };
    }
    let vm = match (&a.incoming, &a.restore) {
        (Some(_), Some(_)) => bail!("--incoming and --restore exclude each other: a guest comes from one place"),
        (Some(uri), None) => incoming(&a, uri)?,
        (None, Some(_)) if a.prefault => {
            bail!("--prefault does not apply to --restore: a restore allocates what the snapshot holds")
        }
        (None, Some(path)) => restore(&a, path)?,
        (None, None) => boot(&a)?,
    };
    serve_and_wait(&a, vm)
}

fn restore(a: &RunArgs, path: &std::path::Path) -> Result<Arc<Vm>> {
    if a.kernel.is_some() || a.cmdline.is_some() {
        bail!("--restore takes the guest from the snapshot: --kernel and --cmdline do not apply");
    }
    // The images the snapshot's disks are written into (locked: this machine runs on them).
    let disks =
        a.disk.iter().map(|d| DiskImage::open_locked(d).map_err(anyhow::Error::new)).collect::<Result<Vec<_>>>()?;
    let (vm, st) = ferry_migrate::snapshot::restore(
        path,
        a.memory,
        disks,
        serial_sink(&a.serial)?,
        a.dirty_tracking()?,
        a.paused,
        match a.restore_mode {
            RestoreModeArg::Read => ferry_migrate::snapshot::RestoreMode::Read,
            RestoreModeArg::Mmap => ferry_migrate::snapshot::RestoreMode::Mmap,
        },
        &a.load_options(),
    )
    .with_context(|| format!("cannot restore {}; nothing was started", path.display()))?;
    say!(
        "ferry: restored {} ({} snapshot{} in the chain): {} data ({} mapped) and {} zero pages, {} disk blocks with data, {:.1} MiB read, {:.1} ms{}",
        path.display(),
        st.chain_len,
        if st.chain_len == 1 { "" } else { "s" },
        st.data_pages,
        st.mapped_pages,
        st.zero_pages,
        st.disk_data_blocks,
        st.bytes_read as f64 / (1 << 20) as f64,
        st.total.as_secs_f64() * 1000.0,
        if a.paused { "; paused until the API resumes it" } else { "" }
    );
    Ok(Arc::new(vm))
}

fn incoming(a: &RunArgs, uri: &str) -> Result<Arc<Vm>> {
    if a.kernel.is_some() || a.cmdline.is_some() {
        bail!("--incoming takes the guest from the migration stream: --kernel and --cmdline do not apply");
    }
    let uri = ferry_migrate::transport::Uri::parse(uri)?;
    let ram = match (a.prefault, a.memory) {
        (false, m) => IncomingRam::Fresh(m),
        (true, None) => {
            bail!("--prefault with --incoming needs --memory: RAM is allocated before the stream says its size")
        }
        (true, Some(m)) => {
            let t = std::time::Instant::now();
            let ram = GuestRam::new(m).context("guest RAM")?;
            ram.prefault().context("--prefault")?;
            say!("ferry: allocated {} MiB of guest RAM in {:.0} ms", m >> 20, t.elapsed().as_secs_f64() * 1000.0);
            IncomingRam::Prefaulted(ram)
        }
    };
    // Opened now (a missing image fails before anything waits), locked at the switch-over.
    let disks = a.disk.iter().map(|d| DiskImage::open(d).map_err(anyhow::Error::new)).collect::<Result<Vec<_>>>()?;
    let tls = a.tls.load(&a.tls_allow_peer)?;
    let admit = admission(&uri, tls, a.allow_peer_uid)?;
    warn_plain_tcp(&uri, admit.tls.is_some(), a.insecure);
    let listener = ferry_migrate::transport::Listener::bind(&uri)?;
    say!("ferry: waiting for an incoming migration on {uri}{}", if admit.tls.is_some() { " (mutual TLS)" } else { "" });
    let conn = listener.accept_with(&uri, &admit)?;
    // Kept for a post-copy whose link fails: the source comes back here (`migrate-resume`).
    let recover = ferry_migrate::postcopy::Recover {
        listener,
        uri: uri.clone(),
        admit,
        timeout: std::time::Duration::from_millis(a.postcopy_recover_timeout_ms),
    };
    let stall = std::time::Duration::from_millis(a.stall_timeout_ms.unwrap_or(10_000));
    let params = ferry_migrate::destination::IncomingParams {
        ram,
        serial_out: serial_sink(&a.serial)?,
        dirty_tracking: a.dirty_tracking()?,
        disks,
        stall,
        load: a.load_options(),
        recover: Some(recover),
    };
    let (vm, stats, postcopy) =
        ferry_migrate::destination::receive(conn, params).context("incoming migration failed; nothing was started")?;
    if stats.disk_replayed > 0 {
        say!("ferry: re-executing {} disk request(s) that were in flight at the stop", stats.disk_replayed);
    }
    say!(
        "ferry: incoming migration complete: {:.1} MiB, {} normal and {} zero pages, load {:.1} ms (restore {:.1} ms)",
        stats.bytes as f64 / (1 << 20) as f64,
        stats.normal_pages,
        stats.zero_pages,
        stats.load.as_secs_f64() * 1000.0,
        stats.restore.as_secs_f64() * 1000.0
    );
    if let Some(run) = postcopy {
        say!("ferry: post-copy: the guest runs here; the pages it still lacks follow from the source");
        api::POSTCOPY_INCOMING.store(true, std::sync::atomic::Ordering::SeqCst);
        std::thread::Builder::new()
            .name("postcopy-wait".into())
            .spawn(move || match run.join() {
                Ok(Ok(s)) => {
                    api::POSTCOPY_INCOMING.store(false, std::sync::atomic::Ordering::SeqCst);
                    say!(
                    "ferry: post-copy complete in {:.1} ms: {} pages; {} faults on missing pages (p50 {} us, p99 {} us, \
                     max {} us), {} on zero pages, {} link recoveries",
                    s.duration.as_secs_f64() * 1000.0,
                    s.done.pages,
                    s.done.remote_faults,
                    s.done.fault_p50_us,
                    s.done.fault_p99_us,
                    s.done.fault_max_us,
                    s.done.zero_faults,
                        s.recoveries
                    )
                }
                Ok(Err(e)) => {
                    // Only the source had these pages: the guest cannot go on, and a vCPU
                    // waiting on one cannot be stopped but by ending the process.
                    say!("ferry: post-copy failed: {:#}", anyhow::Error::new(e));
                    std::process::exit(1);
                }
                Err(_) => {
                    say!("ferry: post-copy failed: its thread panicked");
                    std::process::exit(1);
                }
            })
            .context("cannot start the post-copy waiter")?;
    }
    // Resumed only now: a message written while the guest's first line is half out would cut
    // that line in a console that merges stderr and stdout.
    vm.resume().context("cannot resume the migrated guest")?;
    ferry_stream::fault::hit("destination.resumed");
    Ok(Arc::new(vm))
}

/// The backup of a replicated guest: `None` when the primary ended replication, the running
/// machine after a failover.
fn standby(a: &RunArgs, uri: &str) -> Result<Option<Arc<Vm>>> {
    use ferry_migrate::standby::{StandbyOutcome, StandbyParams, DEFAULT_HEARTBEAT_TIMEOUT};
    if a.kernel.is_some() || a.cmdline.is_some() || a.prefault {
        bail!("--standby takes the guest from the primary: --kernel, --cmdline and --prefault do not apply");
    }
    let uri = ferry_migrate::transport::Uri::parse(uri)?;
    // The backup's own images: locked now, written by the checkpoints, run by a failover.
    let disks =
        a.disk.iter().map(|d| DiskImage::open_locked(d).map_err(anyhow::Error::new)).collect::<Result<Vec<_>>>()?;
    let tls = a.tls.load(&a.tls_allow_peer)?;
    let admit = admission(&uri, tls, a.allow_peer_uid)?;
    warn_plain_tcp(&uri, admit.tls.is_some(), a.insecure);
    let listener = ferry_migrate::transport::Listener::bind(&uri)?;
    say!("ferry: standby: waiting for the primary on {uri}{}", if admit.tls.is_some() { " (mutual TLS)" } else { "" });
    let conn = listener.accept_with(&uri, &admit)?;
    drop(listener);
    let params = StandbyParams {
        serial_out: serial_sink(&a.serial)?,
        dirty_tracking: a.dirty_tracking()?,
        disks,
        stall: std::time::Duration::from_millis(a.stall_timeout_ms.unwrap_or(10_000)),
        heartbeat_timeout: a
            .heartbeat_timeout_ms
            .map(std::time::Duration::from_millis)
            .unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT),
        load: a.load_options(),
    };
    match ferry_migrate::standby::standby(conn, params).context("standby failed; nothing was started")? {
        StandbyOutcome::Ended { seq, stats } => {
            say!(
                "ferry: standby: the primary ended replication after checkpoint {seq} ({} checkpoints, {:.1} MiB); \
                 nothing runs here",
                stats.checkpoints,
                stats.bytes as f64 / (1 << 20) as f64
            );
            Ok(None)
        }
        StandbyOutcome::Failover { vm, seq, why, stats } => {
            say!(
                "ferry: standby: the primary is lost ({why}); the guest resumes here from checkpoint {seq}, restored in {:.1} ms \
                 ({} checkpoints received, {} pages of an unfinished epoch discarded)",
                stats.failover.as_secs_f64() * 1000.0,
                stats.checkpoints,
                stats.discarded_pages
            );
            vm.resume().context("cannot resume the guest")?;
            Ok(Some(Arc::new(*vm)))
        }
    }
}

/// The host's RAM (MemTotal), if /proc/meminfo says.
fn host_ram() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = m.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib << 10)
}

/// Refuses a `--disk` image given twice (the second would only say "in use by another
/// process", which is this one).
fn check_disks_distinct(disks: &[DiskSpec]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for d in disks {
        let key = std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone());
        if !seen.insert(key) {
            bail!("--disk {} is given twice: each image can back one disk", d.path.display());
        }
    }
    Ok(())
}

fn boot(a: &RunArgs) -> Result<Arc<Vm>> {
    let memory = a.memory.unwrap_or(1 << 30);
    check_disks_distinct(&a.disk)?;
    if let Some(host) = host_ram().filter(|&h| memory > h) {
        say!(
            "ferry: warning: --memory {} MiB is more than this host's {} MiB of RAM: the guest's memory is allocated \
             as it is touched, and touching it all will swap or fail",
            memory >> 20,
            host >> 20
        );
    }
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
    if a.disk.len() > ferry_vmm::devices::virtio_blk::MAX_DISKS {
        bail!("{} --disk options; Ferry attaches at most {}", a.disk.len(), ferry_vmm::devices::virtio_blk::MAX_DISKS);
    }
    let disks =
        a.disk.iter().map(|d| DiskImage::open_locked(d).map_err(anyhow::Error::new)).collect::<Result<Vec<_>>>()?;
    let cfg = VmConfig {
        memory,
        vcpus: a.cpus,
        kernel,
        cmdline,
        serial_out: serial_sink(&a.serial)?,
        dirty_tracking: a.dirty_tracking()?,
        disks,
        prefault: a.prefault,
    };
    let vm = Vm::boot(cfg).map_err(|e| {
        let name = a.kernel.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in guest".into());
        anyhow::Error::new(e).context(format!("cannot start the VM ({name})"))
    })?;
    Ok(Arc::new(vm))
}

fn serve_and_wait(a: &RunArgs, vm: Arc<Vm>) -> Result<i32> {
    serve_and_wait_on(a, vm, None)
}

/// A guest parked for an exec (docs/live-update.md, "Exec mode"): runs it until the image after
/// the exec pulls it, then exits. If the process that parked it is gone without pulling it,
/// this one keeps the guest and serves its API.
fn parked(
    a: &RunArgs,
    h: &update::HandoverArgs,
    vm: Arc<Vm>,
    listener: Option<std::os::unix::net::UnixListener>,
) -> Result<i32> {
    match update::park(&vm, h) {
        update::ParkEnd::HandedOn => {
            let _ = std::io::stdout().flush();
            // SAFETY: _exit without destructors: the guest is the pulling image's now, nothing
            // of it may be touched (no vCPU stop, no disk flush from here).
            unsafe { libc::_exit(0) }
        }
        update::ParkEnd::Orphaned => {
            say!(
                "ferry: the Ferry that parked the guest here for its update is gone; this process ({}) runs the \
                 guest and serves its API",
                std::process::id()
            );
            serve_and_wait_on(a, vm, listener)
        }
    }
}

/// The new side of `ferry update`: rebuilds the machine the previous Ferry handed over, resumes
/// it and answers the client. If it cannot, the guest goes back to the previous binary.
fn handover_in(a: &RunArgs, h: &update::HandoverArgs) -> Result<(Arc<Vm>, Option<std::os::unix::net::UnixListener>)> {
    use std::os::fd::FromRawFd;
    update::own_fds(h);
    // Everything is used through duplicates: if this image cannot take the guest, the handed-over
    // descriptors are still open for the hand-back.
    let took = (|| -> Result<(Vm, ferry_migrate::handover::HandoverStats)> {
        if a.disk.len() != h.disks.len() {
            bail!("the handover passes {} disk(s) but the command line names {}", h.disks.len(), a.disk.len());
        }
        let disks = a
            .disk
            .iter()
            .zip(&h.disks)
            .map(|(spec, &fd)| DiskImage::adopt(spec, update::dup_file(fd)?).map_err(anyhow::Error::new))
            .collect::<Result<Vec<_>>>()?;
        let state = if h.pull.is_some() {
            // The guest is parked: asked for over the parking socket, it comes on a new one.
            update::pull(h)?
        } else {
            let mut state = update::dup_file(h.state)?;
            if h.mode == update::Mode::Exec {
                // A memfd this image (or a hand-back) reads from its start; process mode's is a
                // socket.
                std::io::Seek::seek(&mut state, std::io::SeekFrom::Start(0))?;
            }
            state
        };
        let ram = update::dup_file(h.ram)?;
        let (vm, stats) = ferry_migrate::handover::receive_handover(
            state,
            vec![(h.ram as u32, ram)],
            // Appended to: the previous Ferry's output stays (a file named by --serial).
            serial_sink_append(&a.serial)?,
            a.dirty_tracking()?,
            disks,
            &mut || update::ready(h),
        )?;
        // Said before the guest runs: a line it is printing when it resumes must not be cut
        // by this one in a console that merges stderr and stdout.
        say!(
            "ferry: {} the guest over ({}): {} bytes of state, {} MiB of RAM in place",
            if a.handover_failed.is_some() { "took back" } else { "took" },
            match (h.mode, h.park.is_some(), h.pull.is_some()) {
                (_, true, _) => "parked for the exec of the Ferry before it",
                (update::Mode::Exec, _, true) => "exec mode, from the parked process",
                (update::Mode::Exec, _, _) => "exec mode",
                (update::Mode::Process, _, _) => "process mode",
            },
            stats.stream_bytes,
            stats.ram_bytes >> 20
        );
        if !h.paused {
            vm.resume()?;
        }
        Ok((vm, stats))
    })();
    let (vm, stats) = match took {
        Ok(x) => x,
        Err(e) => {
            let why = format!("the new Ferry could not take the guest over: {e:#}");
            say!("ferry: {why}");
            return Err(update::hand_back(h, &why));
        }
    };
    let t0_ns = match h.mode {
        update::Mode::Exec if h.pull.is_none() => h.t0_ns,
        _ => update::pause_start(h).unwrap_or(h.t0_ns),
    };
    let pause_ms = (update::monotonic_ns().saturating_sub(t0_ns)) as f64 / 1e6;
    // Exec mode in two steps: the guest paused once to be parked, once to come back.
    let pauses_ms: Vec<f64> = h.park_pause_ns.map(|p| p as f64 / 1e6).into_iter().chain([pause_ms]).collect();
    update::close_handed_over(h);
    update::release_old_vm(h);
    // SAFETY: the API listener, handed over for this; owned from here on.
    let listener = h.api.map(|fd| unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) });
    let summary = serde_json::json!({
        "mode": if h.mode == update::Mode::Exec { "exec" } else { "process" },
        "pid": std::process::id(),
        // The longest pause the guest saw; each of them in `pauses_ms`.
        "pause_ms": pauses_ms.iter().copied().fold(0.0, f64::max),
        "pauses_ms": pauses_ms,
        "parked_pid": h.parked_pid,
        "restore_ms": stats.restore.as_secs_f64() * 1000.0,
        "build_ms": stats.build.as_secs_f64() * 1000.0,
        // From the pause to this image's main(): quiesce, state, exec (or spawn), start-up.
        "to_new_image_ms": MAIN_START_NS.get().filter(|_| h.mode == update::Mode::Exec && h.pull.is_none()).map(|&n| n.saturating_sub(h.t0_ns) as f64 / 1e6),
        "handover_bytes": stats.stream_bytes,
        "ram_bytes_in_place": stats.ram_bytes,
        "broken_pages": stats.broken_pages,
        "ferry_version": env!("CARGO_PKG_VERSION"),
    });
    let reply = match &a.handover_failed {
        None => serde_json::json!({"ok": true, "summary": summary}),
        Some(why) => serde_json::json!({
            "ok": false,
            "error": format!("{why}; the previous Ferry took the guest back and runs it")
        }),
    };
    update::reply(h, &reply);
    update::acknowledge(h);
    Ok((Arc::new(vm), listener))
}

/// The stop signal received (0: none).
static STOP_REQUESTED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_REQUESTED.store(sig, Ordering::SeqCst);
}

/// SIGTERM, SIGINT and SIGHUP (a closed terminal) stop the machine the way the API's `quit`
/// does (the API socket is removed, exit status 0), instead of killing the process with its
/// socket left behind.
fn stop_on_signals(vm: &Arc<Vm>) -> Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal)
            .map_err(|e| anyhow!("cannot handle signal {sig}: {e}"))?;
    }
    let vm = Arc::downgrade(vm);
    std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let Some(vm) = vm.upgrade() else { return };
        if vm.exit_reason().is_some() {
            return;
        }
        let sig = STOP_REQUESTED.load(Ordering::SeqCst);
        if sig != 0 {
            let name = match sig {
                libc::SIGTERM => "SIGTERM",
                libc::SIGINT => "SIGINT",
                libc::SIGHUP => "SIGHUP",
                _ => "a signal",
            };
            say!("ferry: stopping on {name} (exit status 0)");
            vm.request_exit(ExitReason::Stopped);
            return;
        }
    })?;
    Ok(())
}

fn serve_and_wait_on(a: &RunArgs, vm: Arc<Vm>, listener: Option<std::os::unix::net::UnixListener>) -> Result<i32> {
    stop_on_signals(&vm)?;
    if let Some(sock) = &a.api_socket {
        let ctx = Arc::new(api::ApiContext::new(vm.clone()));
        let paused = match &a.handover {
            Some(h) => h.paused,
            None => a.paused,
        };
        ctx.paused.store(paused, Ordering::SeqCst);
        api::watch_machine_checks(ctx.clone());
        match listener {
            Some(l) => api::serve_listener(l, sock, ctx)?,
            None => api::serve(sock, a.api_socket_mode, ctx)?,
        }
    }
    // The guest runs (booted, restored, or resumed after an incoming migration or a failover)
    // and the API answers: a supervisor may go on.
    sd_notify(&format!("READY=1\nSTATUS=guest running, {} MiB, {} vCPU(s)", vm.ram().size() >> 20, vm.vcpu_count()));
    let reason = vm.wait_exit();
    sd_notify("STOPPING=1");
    let _ = std::io::stdout().flush();
    let (what, detail) = match &reason {
        ExitReason::GuestShutdown(c) => ("guest-shutdown", format!("guest shut down with status {c}")),
        ExitReason::GuestReset(m) => ("guest-reset", format!("guest reset: {m}")),
        ExitReason::KvmError(m) => ("kvm-error", format!("KVM error: {m}")),
        ExitReason::Stopped => ("stopped", "stopped".to_string()),
        ExitReason::Migrated => ("migrated", "guest migrated away".to_string()),
    };
    if a.json {
        say!("{}", serde_json::json!({"exit_status": exit_code(&reason), "reason": what, "detail": detail}));
    } else {
        say!("ferry: {detail}");
    }
    if let Some(sock) = &a.api_socket {
        let _ = std::fs::remove_file(sock);
    }
    Ok(exit_code(&reason))
}

/// Tells a supervisor (systemd's `Type=notify`, or anything speaking its protocol) about this
/// Ferry: one datagram to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Without
/// the variable nothing is sent; a supervisor that went away is not an error.
fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let _ = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
        }
        None => sock.send_to(msg.as_bytes(), &path),
    };
}

/// `stream inspect --json`: the stream checked whole, its totals as one JSON object.
fn inspect_json(path: &std::path::Path, verify: bool) -> Result<i32> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut head = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open(path)?, &mut head)
        .context("the file is shorter than a header")?;
    let s = ferry_stream::inspect(&mut std::io::BufReader::new(f), &mut std::io::sink())
        .with_context(|| format!("{} is not a valid Ferry stream", path.display()))?;
    let flags = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    let verified = if verify && flags & ferry_stream::StreamFlags::SNAPSHOT.0 != 0 {
        let (v, _) = verify_chain(path)?;
        serde_json::json!({"ram_pages": v.ram_pages, "disk_blocks": v.disk_blocks})
    } else {
        serde_json::Value::Null
    };
    println!(
        "{}",
        serde_json::json!({
            "verified": verified,
            "format_version": u32::from_le_bytes([head[8], head[9], head[10], head[11]]),
            "snapshot": flags & ferry_stream::StreamFlags::SNAPSHOT.0 != 0,
            "checkpointed": flags & ferry_stream::StreamFlags::CHECKPOINTED.0 != 0,
            "records": s.records,
            "bytes": s.bytes,
            "pages": {"normal": s.normal, "zero": s.zero, "broken": s.broken, "discarded": s.discarded},
            "checkpoints": s.checkpoints,
            "complete": s.ended,
        })
    );
    Ok(0)
}

/// Every data page and disk block of every file of the snapshot chain at `path`, checked against
/// its crc32c: the totals, and a line per file.
fn verify_chain(path: &std::path::Path) -> Result<(ferry_migrate::snapshot::VerifiedData, Vec<String>)> {
    let chain =
        ferry_migrate::snapshot::chain(path).with_context(|| format!("the chain of {} is broken", path.display()))?;
    let mut total = ferry_migrate::snapshot::VerifiedData::default();
    let mut lines = Vec::new();
    for m in &chain {
        let v = ferry_migrate::snapshot::verify_data(m).with_context(|| format!("{} is corrupt", m.path.display()))?;
        lines.push(format!(
            "  {}: {} data pages and {} disk blocks match their crc32c",
            m.path.display(),
            v.ram_pages,
            v.disk_blocks
        ));
        total.ram_pages += v.ram_pages;
        total.disk_blocks += v.disk_blocks;
    }
    Ok((total, lines))
}

fn inspect(path: &std::path::Path, verify: bool) -> Result<i32> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    let mut r = std::io::BufReader::new(f);
    ferry_stream::inspect(&mut r, &mut out)
        .with_context(|| format!("{} is not a valid Ferry stream", path.display()))?;
    let is_snapshot = {
        let mut h = [0u8; 16];
        std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut h)).is_ok()
            && u32::from_le_bytes([h[12], h[13], h[14], h[15]]) & ferry_stream::StreamFlags::SNAPSHOT.0 != 0
    };
    if !is_snapshot {
        return Ok(0);
    }
    // A snapshot file: show its chain, every link checked as a restore would.
    let chain =
        ferry_migrate::snapshot::chain(path).with_context(|| format!("the chain of {} is broken", path.display()))?;
    // The links are the metadata (ids, checksums, machine); the page data is checked by
    // --verify (and by a read restore), not here.
    writeln!(
        out,
        "chain: {} snapshot{} (newest first), every link's metadata checked{}",
        chain.len(),
        if chain.len() == 1 { "" } else { "s" },
        if verify { "" } else { "; page data not read (--verify checks every page)" }
    )?;
    for m in &chain {
        let data: u64 = m.maps.iter().map(|x| x.present_count()).sum();
        let id: String = m.info.id.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(
            out,
            "  {} {:?} id {id}: {} data pages, metadata crc {:#010x}",
            m.path.display(),
            m.info.kind,
            data,
            m.meta_crc
        )?;
    }
    if verify {
        let (v, lines) = verify_chain(path)?;
        for l in lines {
            writeln!(out, "{l}")?;
        }
        writeln!(
            out,
            "verified: {} data pages, {} disk blocks, every one matching its crc32c",
            v.ram_pages, v.disk_blocks
        )?;
    }
    Ok(0)
}

fn snapshot(a: SnapshotArgs) -> Result<i32> {
    let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut req = serde_json::json!({"to": abs(&a.to), "live": a.live, "stop": a.stop});
    if let Some(p) = &a.incremental_from {
        req["incremental_from"] = serde_json::json!(abs(p));
    }
    let v = client::request(&a.api_socket, "PUT", "/api/v1/vm.snapshot", Some(&req))?;
    let s = &v["summary"];
    if a.json {
        println!("{s}");
        return Ok(0);
    }
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "snapshot {} ({}) written to {}: {} data pages, {} zero, {} from the parent; {:.1} MiB on disk",
        s["id"].as_str().unwrap_or("?"),
        s["kind"].as_str().unwrap_or("?"),
        s["path"].as_str().unwrap_or("?"),
        s["data_pages"],
        s["zero_pages"],
        s["parent_pages"],
        f("allocated_bytes") / (1 << 20) as f64
    );
    println!("  total {:.1} ms, guest paused {:.1} ms, {} pass(es)", f("total_ms"), f("pause_ms"), s["passes"]);
    Ok(0)
}

fn dirty_rate(api_socket: &std::path::Path, window_ms: u64, json: bool) -> Result<i32> {
    let v = client::request(api_socket, "GET", &format!("/api/v1/vm.dirty-rate?window_ms={window_ms}"), None)?;
    let r = &v["dirty_rate"];
    if json {
        println!("{r}");
        return Ok(0);
    }
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "dirty rate ({}): {} pages in {:.0} ms = {:.0} pages/s, {:.1} MiB/s",
        r["tracking"].as_str().unwrap_or("?"),
        r["pages"],
        f("window_ms"),
        f("pages_per_s"),
        f("mib_per_s")
    );
    if let Some(per) = r["per_vcpu_pages_per_s"].as_array() {
        for (i, p) in per.iter().enumerate() {
            println!("  vCPU {i}: {:.0} ring entries/s", p.as_f64().unwrap_or(f64::NAN));
        }
    }
    println!(
        "  start sync + clear of all RAM: {:.2} ms ({} pages re-protected); end sync {:.2} ms ({} fetched)",
        f("start_sync_clear_ms"),
        r["start_pages"],
        f("end_sync_ms"),
        r["end_fetched"]
    );
    if let Some(n) = r["ring_full_exits"].as_u64() {
        println!("  ring-full exits in the window: {n}");
    }
    Ok(0)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn migrate(a: MigrateArgs) -> Result<i32> {
    ferry_migrate::transport::Uri::parse(&a.to)?;
    if a.max_iterations == 0 && !a.force_switchover {
        bail!("--max-iterations 0 switches over right after the first pass: it needs --force-switchover");
    }
    // Ctrl-C cancels the migration (the source keeps running) instead of killing this client.
    vmm_sys_util::signal::register_signal_handler(libc::SIGINT, on_sigint)
        .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}"))?;
    let mut req = serde_json::json!({
        "cmd": "migrate",
        "to": a.to,
        "downtime_ms": a.downtime_ms,
        "max_iterations": a.max_iterations,
        "force_switchover": a.force_switchover,
        "auto_converge": !a.no_auto_converge,
        "stall_timeout_ms": a.stall_timeout_ms,
        "copy_storage": a.copy_storage,
    });
    a.tls.add_to(&mut req)?;
    warn_plain_tcp(&ferry_migrate::transport::Uri::parse(&a.to)?, a.tls.given(), a.insecure);
    if let Some(b) = a.max_bandwidth {
        req["max_bandwidth_mib_s"] = b.into();
    }
    if let Some(CompressArg::Zstd) = a.compress {
        req["compress"] = "zstd".into();
    }
    if let Some(l) = a.compress_level {
        req["compress_level"] = l.into();
    }
    if let Some(n) = a.channels {
        req["channels"] = n.into();
    }
    if let Some(l) = a.dirty_limit {
        req["dirty_limit_mib_s"] = l.into();
    }
    match (a.postcopy, a.postcopy_after_iterations) {
        (Some(PostcopyArg::Auto), Some(_)) => {
            bail!("--postcopy auto decides when to switch itself: it takes no --postcopy-after-iterations")
        }
        (Some(PostcopyArg::Auto), None) => req["postcopy"] = "auto".into(),
        (Some(PostcopyArg::Always), n) | (None, n @ Some(_)) => {
            req["postcopy"] = "always".into();
            req["postcopy_after_iterations"] = n.unwrap_or(1).into();
        }
        (None, None) => {}
    }
    if let Some(o) = req.as_object_mut() {
        o.remove("cmd");
    }
    // Through the REST API, as `curl` would: the events feed first (so that nothing is
    // missed), then the request; the migration runs in the VM's Ferry whatever becomes of
    // this client.
    let mut events = client::Events::open(&a.api_socket)?;
    client::request(&a.api_socket, "PUT", "/api/v1/vm.migrate", Some(&req))
        .map_err(|e| anyhow::anyhow!("migration failed: {e:#}"))?;
    let summary = follow(&a.api_socket, &mut events, a.json)?;
    let summary = &summary;
    if a.json {
        println!("{summary}");
    } else {
        print!("{}", report::summary_text(summary));
    }
    if let Some(path) = &a.report {
        std::fs::write(path, report::svg(summary))
            .with_context(|| format!("cannot write the report {}", path.display()))?;
        say!("ferry: report written to {}", path.display());
    }
    Ok(0)
}

/// Follows the migration on the events feed (a live line on a terminal, one line per event
/// otherwise; Ctrl-C cancels it) and returns its summary.
fn follow(socket: &std::path::Path, events: &mut client::Events, json: bool) -> Result<serde_json::Value> {
    let mut cancelled = false;
    // On a terminal (and not --json): a live line instead of one line per event.
    let bar = (!json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(report::progress_bar);
    let outcome = client::follow_migration(
        events,
        &mut |ev| match &bar {
            Some(b) => report::update_bar(b, ev),
            None => say!("ferry: {}", report::progress_line(ev)),
        },
        &mut || {
            if INTERRUPTED.load(Ordering::SeqCst) && !cancelled {
                cancelled = true;
                say!("ferry: cancelling the migration (the source keeps running)");
                let _ = client::request(socket, "PUT", "/api/v1/vm.migrate-cancel", None);
            }
        },
    );
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match outcome? {
        client::Outcome::Completed(summary) => Ok(summary),
        client::Outcome::Failed(msg) => bail!("migration failed: {msg}"),
    }
}

fn migrate_resume(api_socket: &std::path::Path, to: &str, tls: &TlsArgs, json: bool) -> Result<i32> {
    ferry_migrate::transport::Uri::parse(to)?;
    let mut req = serde_json::json!({"to": to});
    tls.add_to(&mut req)?;
    let mut events = client::Events::open(api_socket)?;
    client::request(api_socket, "PUT", "/api/v1/vm.migrate-resume", Some(&req))
        .map_err(|e| anyhow::anyhow!("post-copy resume failed: {e:#}"))?;
    let summary = follow(api_socket, &mut events, json)?;
    let summary = &summary;
    if json {
        println!("{summary}");
    } else {
        print!("{}", report::summary_text(summary));
    }
    Ok(0)
}

fn ferry_update(api_socket: &std::path::Path, binary: Option<PathBuf>, mode: UpdateModeArg, json: bool) -> Result<i32> {
    let mut req = serde_json::json!({
        "cmd": "update",
        "mode": match mode { UpdateModeArg::Exec => "exec", UpdateModeArg::Process => "process" },
    });
    if let Some(b) = binary {
        let b = std::fs::canonicalize(&b).unwrap_or(b);
        req["binary"] = b.display().to_string().into();
    }
    let v = api::call(api_socket, &req).context("the update failed; the guest runs on in the Ferry it was in")?;
    let s = &v["summary"];
    if json {
        println!("{s}");
    } else {
        // Exec mode in two steps: a pause to park the guest for the exec, one to take it back.
        let pauses: Vec<String> = s["pauses_ms"]
            .as_array()
            .map(|v| v.iter().filter_map(|p| p.as_f64()).map(|p| format!("{p:.2}")).collect())
            .unwrap_or_default();
        let paused = match (pauses.len(), s["parked_pid"].as_u64()) {
            (2, Some(pid)) => format!("guest paused {} ms (parked in process {pid} for the exec)", pauses.join(" + ")),
            _ => format!("guest paused {:.2} ms", s["pause_ms"].as_f64().unwrap_or(f64::NAN)),
        };
        say!(
            "ferry: updated ({} mode, pid {}): {paused}, {} bytes of state handed over, {} MiB of RAM in place",
            s["mode"].as_str().unwrap_or("?"),
            s["pid"],
            s["handover_bytes"],
            s["ram_bytes_in_place"].as_u64().unwrap_or(0) >> 20
        );
    }
    Ok(0)
}

fn debug_poison(api_socket: &std::path::Path, gpa: u64, unannounced: bool, at_final_pass: bool) -> Result<i32> {
    let at = if at_final_pass { "final-pass" } else { "now" };
    let v =
        api::call(api_socket, &serde_json::json!({"cmd": "poison", "gpa": gpa, "announce": !unannounced, "at": at}))?;
    let page = v["gpa"].as_u64().unwrap_or(gpa);
    if at_final_pass {
        say!("ferry: guest page {page:#x} breaks when the next migration's final pass begins");
    } else {
        say!("ferry: guest page {page:#x} is broken");
    }
    Ok(0)
}

/// CLOCK_MONOTONIC at the start of main (a live update reports how long its exec took).
static MAIN_START_NS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn replicate(a: ReplicateArgs) -> Result<i32> {
    let req = serde_json::json!({
        "cmd": "replicate",
        "to": a.to,
        "interval_ms": a.interval_ms,
        "on_backup_loss": match a.on_backup_loss { BackupLossArg::Stop => "stop", BackupLossArg::Continue => "continue" },
        "ack_timeout_ms": a.ack_timeout_ms,
    });
    let mut req = req;
    a.tls.add_to(&mut req)?;
    warn_plain_tcp(&ferry_migrate::transport::Uri::parse(&a.to)?, a.tls.given(), a.insecure);
    let v = api::call(&a.api_socket, &req)?;
    print_replication(&v["replication"], a.json, "the guest is protected");
    Ok(0)
}

fn print_replication(r: &serde_json::Value, json: bool, what: &str) {
    if json {
        println!("{r}");
        return;
    }
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    say!(
        "ferry: {what}: backup {}, {} checkpoints ({:.1}/s), pause p50 {:.2} ms p99 {:.2} ms, ack p50 {:.2} ms, {:.0} KiB per epoch; initial copy {:.0} ms, {:.1} MiB",
        r["to"].as_str().unwrap_or("?"),
        r["epochs"].as_u64().unwrap_or(0),
        f("epochs_per_s"),
        f("pause_ms_p50"),
        f("pause_ms_p99"),
        f("ack_ms_p50"),
        f("bytes_per_epoch") / 1024.0,
        f("initial_copy_ms"),
        f("initial_copy_bytes") / (1 << 20) as f64
    );
}

fn main() {
    MAIN_START_NS.get_or_init(update::monotonic_ns);
    let cli = Cli::parse();
    logging::init(cli.log_level, cli.log_format);
    // FERRY_FAULT (docs/reliability.md): armed in a fault-injection build, refused in any other
    // (a fault asked for and silently not injected would let a test pass that tried nothing).
    if let Some(f) = ferry_stream::fault::configured() {
        if !ferry_stream::fault::ENABLED {
            say!("ferry: FERRY_FAULT={f} is set, but this Ferry was built without the fault-injection feature");
            std::process::exit(2);
        }
        say!("ferry: fault injection armed: {f}");
    }
    let r = match cli.cmd {
        Cmd::Run(a) => run(*a),
        Cmd::Migrate(a) => migrate(a),
        Cmd::Demo { memory, cpus, cmdline } => {
            demo::run(demo::DemoArgs { memory, cpus, cmdline, after: std::time::Duration::from_secs(60) })
        }
        Cmd::Stream { cmd: StreamCmd::Inspect { path, json: false, verify } } => inspect(&path, verify),
        Cmd::Stream { cmd: StreamCmd::Inspect { path, json: true, verify } } => inspect_json(&path, verify),
        Cmd::MigrateResume { api_socket, to, tls, json } => migrate_resume(&api_socket, &to, &tls, json),
        Cmd::MigrateCancel { api_socket, json } => {
            api::call(&api_socket, &serde_json::json!({"cmd": "migrate-cancel"})).map(|_| {
                if json {
                    println!("{}", serde_json::json!({"cancelled": true}));
                }
                0
            })
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()).map(|_| 0).map_err(Into::into)
        }
        Cmd::Snapshot(a) => snapshot(a),
        Cmd::Replicate(a) => replicate(a),
        Cmd::ReplicateStop { api_socket, json } => {
            api::call(&api_socket, &serde_json::json!({"cmd": "replicate-stop"})).map(|v| {
                print_replication(&v["replication"], json, "replication stopped");
                0
            })
        }
        Cmd::DirtyRate { api_socket, window_ms, json } => dirty_rate(&api_socket, window_ms, json),
        Cmd::Update { api_socket, binary, mode, json } => ferry_update(&api_socket, binary, mode, json),
        Cmd::UpdateCheck => {
            println!("{}", update::check_info());
            Ok(0)
        }
        Cmd::Debug(DebugCmd::Poison { api_socket, gpa, unannounced, at_final_pass }) => {
            debug_poison(&api_socket, gpa, unannounced, at_final_pass)
        }
        Cmd::Debug(DebugCmd::SeccompProbe { api_socket, thread }) => {
            api::call(&api_socket, &serde_json::json!({"cmd": "seccomp-probe", "thread": thread})).map(|v| {
                println!("{v}");
                0
            })
        }
        Cmd::Api { api_socket, command } => {
            let (method, path) = match command.as_str() {
                "status" | "info" => ("GET", "/api/v1/vm.info"),
                "pause" => ("PUT", "/api/v1/vm.pause"),
                "resume" => ("PUT", "/api/v1/vm.resume"),
                "quit" | "shutdown" => ("PUT", "/api/v1/vm.shutdown"),
                "migration" => ("GET", "/api/v1/vm.migration"),
                other => {
                    say!(
                        "ferry: error: unknown API command {other:?} (status, pause, resume, quit, migration; the \
                         rest has its own subcommand or a REST route: docs/api/openapi.yaml)"
                    );
                    std::process::exit(2);
                }
            };
            client::request(&api_socket, method, path, None).map(|v| {
                println!("{v}");
                0
            })
        }
        Cmd::Guest { cmd: GuestCmd::Export { path } } => std::fs::write(&path, guest::GUEST_ELF)
            .with_context(|| format!("cannot write {}", path.display()))
            .map(|_| 0),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            say!("ferry: error: {e:#}");
            std::process::exit(1);
        }
    }
}
