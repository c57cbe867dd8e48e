//! Checkpointed replication, primary side (Remus; docs/ha.md).
//!
//! ```text
//!  primary                                          backup (ferry run --incoming URI --standby)
//!  HELLO (needs the same format version) ─────────▶
//!  header (CHECKPOINTED), MACHINE_CONFIG, CPU_MODEL, DISK_CONFIG
//!  pre-copy passes, guest running (pages, disk blocks)
//!  ┌ pause ─ harvest dirty pages + blocks, state, output barrier ─ resume ┐
//!  │ send the epoch, CHECKPOINT n ─────────────────▶ stage; apply when CHECKPOINT n checks out
//!  │                         ◀──────────────────────── CHECKPOINT_ACK n
//!  └ release the output checkpoint n covers; wait for the next interval ───┘
//!  replicate-stop: a last checkpoint, END ─────────▶ exits (not a failover)
//! ```
//!
//! Each epoch's records are written into a large in-memory buffer while the guest is paused, and
//! only go to the network after it runs again: the pause is the harvest and the copy, not the
//! link. The output the guest produced is held (output commit) until the checkpoint that covers
//! it is acknowledged, so the outside world never sees what a backup could not reproduce.

use std::io::{BufWriter, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_stream::{MachineConfig, StreamFlags, StreamHeader, StreamWriter, FORMAT_VERSION};
use ferry_vmm::dirty_log::Initial;
use ferry_vmm::Vm;
use serde::Serialize;

use crate::protocol::{self, ProtocolError};
use crate::source::{ms, MigrateError, MigrateParams, MigrationSummary, PageCounts, PauseGuard, Sender};
use crate::transport::{Conn, StallWatch, TransportError, Uri, SEND_POLL};

/// Bytes an epoch may take in memory before its records start going to the network during the
/// pause (a guest that dirties more than this per interval pays for the link in its pause).
const EPOCH_BUFFER: usize = 64 << 20;
/// Between epochs longer than this, the primary sends a HEARTBEAT.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);
/// Pause samples kept for the percentiles.
const SAMPLES: usize = 2048;

/// Errors of replication. The primary's guest keeps running after every one of them (with
/// `--on-backup-loss stop`, the caller pauses it).
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error(
        "the backup reads stream format versions {min} to {max}: replication needs both sides at version {ours} \
         (checkpointed streams are only read between equal versions)"
    )]
    Version { min: u32, max: u32, ours: u32 },
    #[error("the backup did not acknowledge checkpoint {seq}")]
    Ack {
        seq: u64,
        #[source]
        source: ProtocolError,
    },
    #[error("the backup acknowledged checkpoint {got} where {want} was due")]
    WrongAck { want: u64, got: u64 },
    #[error("sending to the backup failed (backup gone?)")]
    Send(#[source] ferry_stream::StreamError),
    #[error("the backup refused the replication stream")]
    Refused(#[source] ProtocolError),
}

/// What the caller asks for.
#[derive(Debug, Clone)]
pub struct ReplicateParams {
    pub to: Uri,
    /// Time from one epoch's pause to the next.
    pub interval: Duration,
    /// The backup is lost when a checkpoint is not acknowledged within this.
    pub ack_timeout: Duration,
    /// The initial copy fails when the backup takes no data for this long.
    pub stall_timeout: Duration,
    /// Mutual TLS on a tcp: backup (crate::tls).
    pub tls: Option<std::sync::Arc<crate::tls::Tls>>,
}

/// Replication's state, as the API and `--json` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReplState {
    #[default]
    InitialCopy,
    /// Every checkpoint is acknowledged by the backup.
    Protected,
    /// The backup was lost: the guest runs (or is paused) without one.
    Unprotected,
    /// Ended by `replicate-stop`.
    Stopped,
    /// The initial copy failed.
    Failed,
}

/// Figures of a replication (live, and at its end).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicationReport {
    pub to: String,
    pub state: ReplState,
    pub protected: bool,
    /// Checkpoints acknowledged.
    pub epochs: u64,
    pub epochs_per_s: f64,
    pub interval_ms: f64,
    pub pause_ms_p50: f64,
    pub pause_ms_p99: f64,
    pub pause_ms_max: f64,
    pub bytes_per_epoch: f64,
    pub ack_ms_p50: f64,
    pub ack_ms_p99: f64,
    /// Console output held back now, waiting for its checkpoint's acknowledgement.
    pub output_held_bytes: u64,
    pub pages_sent: u64,
    pub disk_bytes_sent: u64,
    pub bytes_sent: u64,
    /// The initial copy: until the first checkpoint was acknowledged.
    pub initial_copy_ms: f64,
    pub initial_copy_bytes: u64,
    /// Where the pause goes, mean ms per epoch: stopping the vCPUs and disks, the dirty-log
    /// sync, copying dirty pages, reading dirty disk blocks, saving the machine state.
    pub pause_breakdown_ms: PauseBreakdown,
    pub last_error: Option<String>,
}

/// Mean ms per epoch of each part of the pause.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PauseBreakdown {
    pub stop: f64,
    pub sync: f64,
    pub pages: f64,
    pub disk: f64,
    pub state: f64,
}

/// Live figures, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct ReplicationStats {
    report: ReplicationReport,
    pauses: std::collections::VecDeque<f64>,
    acks: std::collections::VecDeque<f64>,
    protected_at: Option<Instant>,
    bytes_in_epochs: u64,
    /// Sums of each part of the pause over all epochs.
    phases: [f64; 5],
}

fn percentile(v: &std::collections::VecDeque<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s: Vec<f64> = v.iter().copied().collect();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * p).round() as usize]
}

impl ReplicationStats {
    /// The figures now.
    pub fn report(&self, vm: &Vm) -> ReplicationReport {
        let mut r = self.report.clone();
        r.pause_ms_p50 = percentile(&self.pauses, 0.5);
        r.pause_ms_p99 = percentile(&self.pauses, 0.99);
        r.pause_ms_max = self.pauses.iter().copied().fold(0.0, f64::max);
        r.ack_ms_p50 = percentile(&self.acks, 0.5);
        r.ack_ms_p99 = percentile(&self.acks, 0.99);
        if let Some(t) = self.protected_at {
            let secs = t.elapsed().as_secs_f64();
            if secs > 0.0 {
                r.epochs_per_s = r.epochs.saturating_sub(1) as f64 / secs;
            }
        }
        if r.epochs > 0 {
            let n = r.epochs as f64;
            r.bytes_per_epoch = self.bytes_in_epochs as f64 / n;
            let [stop, sync, pages, disk, state] = self.phases.map(|x| x / n);
            r.pause_breakdown_ms = PauseBreakdown { stop, sync, pages, disk, state };
        }
        r.output_held_bytes = vm.held_output() as u64;
        r
    }

    pub fn set_state(&mut self, s: ReplState, error: Option<String>) {
        self.report.state = s;
        self.report.protected = s == ReplState::Protected;
        if error.is_some() {
            self.report.last_error = error;
        }
    }

    fn epoch(&mut self, pause_ms: f64, ack_ms: f64, bytes: u64, phases: [f64; 5]) {
        for (s, p) in self.phases.iter_mut().zip(phases) {
            *s += p;
        }
        for (v, x) in [(&mut self.pauses, pause_ms), (&mut self.acks, ack_ms)] {
            if v.len() == SAMPLES {
                v.pop_front();
            }
            v.push_back(x);
        }
        self.report.epochs += 1;
        self.bytes_in_epochs += bytes;
    }
}

fn lock(stats: &Mutex<ReplicationStats>) -> std::sync::MutexGuard<'_, ReplicationStats> {
    stats.lock().unwrap_or_else(|p| p.into_inner())
}

/// Replicates `vm` to the standby at `params.to` until `stop` is set (then a last checkpoint
/// and END end it cleanly: `Ok`) or the backup is lost (`Err`). `protected` is called once the
/// first checkpoint is acknowledged; an error before that is a failed initial copy.
///
/// Output commit is on from the first checkpoint; on return the caller decides what happens to
/// the output still held ([`Vm::set_output_commit`]): after a clean stop nothing is held.
pub fn replicate(
    vm: &Vm,
    params: &ReplicateParams,
    stop: &AtomicBool,
    stats: &Mutex<ReplicationStats>,
    protected: &mut dyn FnMut(&ReplicationReport),
) -> Result<(), ReplicateError> {
    let t_start = Instant::now();
    lock(stats).report =
        ReplicationReport { to: params.to.to_string(), interval_ms: ms(params.interval), ..Default::default() };
    let mut conn =
        Conn::connect_with(&params.to, params.stall_timeout, params.tls.as_deref()).map_err(MigrateError::Transport)?;
    conn.set_read_timeout(Some(SEND_POLL)).map_err(|e| MigrateError::Transport(TransportError::Setup(e)))?;
    conn.set_write_timeout(Some(SEND_POLL)).map_err(|e| MigrateError::Transport(TransportError::Setup(e)))?;
    // The initial copy can be cancelled by replicate-stop; once protected, a stop is a clean end
    // after a last checkpoint, never an interrupted send.
    let never = AtomicBool::new(false);
    let theirs = protocol::source_handshake(&mut StallWatch::to_destination(&mut conn, stop, params.stall_timeout))
        .map_err(MigrateError::Handshake)?;
    if theirs.max_format != FORMAT_VERSION {
        conn.shutdown();
        return Err(ReplicateError::Version { min: theirs.min_format, max: theirs.max_format, ours: FORMAT_VERSION });
    }
    let mut reply = conn.try_clone().map_err(|e| MigrateError::Transport(TransportError::Setup(e)))?;
    let r = run(vm, params, stop, &never, stats, protected, conn, &mut reply, t_start);
    if let Err(e) = &r {
        // A refusal from the backup explains a failed send better than "broken pipe".
        let refused = match e {
            ReplicateError::Send(_) | ReplicateError::Migrate(MigrateError::Send(_)) => {
                crate::source::refusal(&mut reply, Duration::from_millis(500))
            }
            _ => None,
        };
        reply.shutdown();
        if let Some(source) = refused {
            return Err(ReplicateError::Refused(source));
        }
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn run(
    vm: &Vm,
    params: &ReplicateParams,
    stop: &AtomicBool,
    never: &AtomicBool,
    stats: &Mutex<ReplicationStats>,
    protected: &mut dyn FnMut(&ReplicationReport),
    conn: Conn,
    reply: &mut Conn,
    t_start: Instant,
) -> Result<(), ReplicateError> {
    let header = StreamHeader::new(StreamFlags::CHECKPOINTED);
    let conn = StallWatch::to_destination(conn, never, params.stall_timeout);
    let w = StreamWriter::new(BufWriter::with_capacity(EPOCH_BUFFER, conn), &header).map_err(ReplicateError::Send)?;
    let registered = vm.dirty_consumer("replication", Initial::AllDirty).map_err(MigrateError::Vm)?;
    let storage = if vm.disks().is_empty() {
        None
    } else {
        Some(crate::storage::StorageSender::start(vm, "replication").map_err(MigrateError::Storage)?)
    };
    let mut s = Sender {
        vm,
        idle: None,
        batch_pages: 512,
        probe_holes: true,
        w,
        pages_buf: Vec::new(),
        consumer: registered.id(),
        counts: PageCounts::default(),
        limit: None,
        cancel: stop,
        storage,
        peer_features: 0,
        channels: None,
        unsynced: Vec::new(),
    };
    let ram = vm.ram();
    let config = MachineConfig {
        memory_bytes: ram.size(),
        vcpus: vm.vcpu_count(),
        regions: ram.regions().iter().map(|r| (r.gpa, r.size)).collect(),
    };
    s.w.machine_config(&config).map_err(ReplicateError::Send)?;
    s.w.cpu_model(vm.cpu_model()).map_err(ReplicateError::Send)?;
    if !vm.disks().is_empty() {
        s.w.disk_config(&crate::storage::disk_config(vm)).map_err(ReplicateError::Send)?;
    }
    // The initial copy: pre-copy passes while the guest runs, until the first checkpoint's
    // pause would be short.
    let initial = MigrateParams {
        to: params.to.clone(),
        downtime_limit: Duration::from_millis(50),
        max_bandwidth: None,
        max_iterations: 10,
        force_switchover: true,
        auto_converge: false,
        stall_timeout: params.stall_timeout,
        copy_storage: true,
        tls: None,
        postcopy: None,
        compress: None,
        channels: 1,
        dirty_limit: None,
    };
    let mut summary = MigrationSummary::default();
    crate::source::precopy(&mut s, &initial, Default::default(), &mut summary, &mut |_| {})?;
    drop(s.idle.take());
    s.batch_pages = 64;
    s.cancel = never;
    let mut seq = 0u64;
    epoch(&mut s, seq, reply, params, stats)?;
    {
        let mut st = lock(stats);
        st.report.initial_copy_ms = ms(t_start.elapsed());
        st.report.initial_copy_bytes = s.w.bytes_written();
        st.protected_at = Some(Instant::now());
        st.set_state(ReplState::Protected, None);
        let report = st.report(vm);
        drop(st);
        protected(&report);
    }
    let mut last = Instant::now();
    loop {
        // Wait for the next epoch, sending heartbeats over long intervals.
        let next = last + params.interval;
        let mut beat = Instant::now();
        while Instant::now() < next && !stop.load(Ordering::SeqCst) {
            if beat.elapsed() >= HEARTBEAT_EVERY {
                s.w.heartbeat().map_err(ReplicateError::Send)?;
                s.w.flush().map_err(ReplicateError::Send)?;
                beat = Instant::now();
            }
            std::thread::sleep(next.saturating_duration_since(Instant::now()).min(Duration::from_millis(5)));
        }
        seq += 1;
        last = Instant::now();
        epoch(&mut s, seq, reply, params, stats)?;
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
    // The last checkpoint is acknowledged: END tells the backup this is not a failover.
    s.w.end().map_err(ReplicateError::Send)?;
    s.w.flush().map_err(ReplicateError::Send)?;
    // The backup exits on END; its closing the connection is its goodbye.
    let _ = reply.set_read_timeout(Some(Duration::from_secs(5)));
    let mut b = [0u8; 1];
    let _ = reply.read(&mut b);
    lock(stats).set_state(ReplState::Stopped, None);
    Ok(())
}

/// One epoch: pause, harvest into the buffer, resume, send, wait for the acknowledgement,
/// release the output the checkpoint covers.
fn epoch(
    s: &mut Sender<'_>,
    seq: u64,
    reply: &mut Conn,
    params: &ReplicateParams,
    stats: &Mutex<ReplicationStats>,
) -> Result<(), ReplicateError> {
    let vm = s.vm;
    let t0 = Instant::now();
    let b0 = s.w.bytes_written();
    let pages0 = s.counts.normal + s.counts.zero;
    let mut disk_bytes = 0;
    let mut phases = [0.0; 5];
    let mut lap = Instant::now();
    let mut mark = |i: usize| {
        phases[i] = ms(lap.elapsed());
        lap = Instant::now();
    };
    {
        // Resumes the disks (completing what they held) and the vCPUs when it goes out of
        // scope, also after an error.
        let _guard = PauseGuard { vm, committed: false };
        // A line the pause cuts stays in the state whole.
        vm.pause_keep_output().map_err(MigrateError::Vm)?;
        vm.quiesce_disks().map_err(MigrateError::Vm)?;
        if seq == 0 {
            vm.set_output_commit(true);
        }
        mark(0);
        vm.dirty_sync().map_err(MigrateError::Vm)?;
        mark(1);
        s.send_pending(t0, b0)?;
        s.send_broken_pages()?;
        mark(2);
        if let Some(st) = s.storage.as_mut() {
            disk_bytes = st.send(&mut s.w).map_err(MigrateError::Storage)?.data_bytes;
        }
        mark(3);
        let state = vm.save_state().map_err(MigrateError::Vm)?;
        crate::records::write_sections(&mut s.w, &state.sections()).map_err(ReplicateError::Send)?;
        vm.output_barrier();
        s.w.checkpoint(seq).map_err(ReplicateError::Send)?;
        mark(4);
    }
    let pause_ms = ms(t0.elapsed());
    s.w.flush().map_err(ReplicateError::Send)?;
    let t_ack = Instant::now();
    let never = AtomicBool::new(false);
    let got = protocol::read_checkpoint_ack(&mut StallWatch::to_destination(&mut *reply, &never, params.ack_timeout))
        .map_err(|source| ReplicateError::Ack { seq, source })?;
    if got != seq {
        return Err(ReplicateError::WrongAck { want: seq, got });
    }
    vm.release_output();
    let ack_ms = ms(t_ack.elapsed());
    let mut st = lock(stats);
    st.epoch(pause_ms, ack_ms, s.w.bytes_written() - b0, phases);
    st.report.pages_sent += s.counts.normal + s.counts.zero - pages0;
    st.report.disk_bytes_sent += disk_bytes;
    st.report.bytes_sent = s.w.bytes_written();
    Ok(())
}
