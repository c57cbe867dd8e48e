//! Checkpointed replication, backup side: `ferry run --incoming URI --standby` (docs/ha.md).
//!
//! The standby builds the machine when the stream's configuration arrives and fills its RAM and
//! disks with the initial copy. From then on it stages each epoch (pages, disk blocks, state) in
//! memory and applies it only when the epoch's CHECKPOINT has arrived whole and checked out (the
//! stream reader checks its record count and checksum), then acknowledges it. A half-received
//! epoch is discarded. When the primary is lost (its connection closes or breaks, or it sends
//! nothing for the heartbeat timeout), the standby resumes the guest from the last checkpoint:
//! its output held back by the primary first, then the guest runs. END from the primary
//! (`ferry replicate-stop`) ends the standby without a failover.

use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_stream::{CpuModel, DiskBlocks, DiskConfig, MachineConfig, PageBatch, PageType, RamMap, SnapshotInfo};
use ferry_stream::{StreamError, StreamReader, PAGE_SIZE};
use ferry_vmm::devices::disk_image::DiskImage;
use ferry_vmm::devices::serial::SerialSink;
use ferry_vmm::devices::virtio_blk::StartMode;
use ferry_vmm::dirty_log::Bitmap;
use ferry_vmm::machine_state::MachineState;
use ferry_vmm::memory::GuestRam;
use ferry_vmm::vm::{create_machine, create_vcpu, DirtyTracking, Vm};

use crate::destination::{apply_pages, ErrorChain, IncomingError, IncomingStats, Pending};
use crate::protocol::{self, Opening};
use crate::records::{load_records, LoadError, LoadOptions, RecordSink, StreamKind};
use crate::storage::StorageReceiver;
use crate::transport::{Conn, SEND_POLL};

/// Default of `--heartbeat-timeout-ms`.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(500);

/// Errors of a standby.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("the handshake with the primary failed")]
    Handshake(#[source] protocol::ProtocolError),
    #[error("the replication stream from the primary is refused")]
    Refused(#[source] IncomingError),
    #[error(
        "the primary was lost before the first checkpoint ({0}): there is no consistent state to resume, nothing \
         was started"
    )]
    NoCheckpoint(String),
    #[error("cannot resume the guest from checkpoint {seq}")]
    Failover {
        seq: u64,
        #[source]
        source: ferry_vmm::vm::VmError,
    },
    #[error("cannot answer the primary")]
    Reply(#[source] std::io::Error),
}

/// What the standby is given besides the connection.
pub struct StandbyParams {
    pub serial_out: SerialSink,
    pub dirty_tracking: DirtyTracking,
    /// The backup's own images (locked by the caller), as many and as large as the primary's.
    pub disks: Vec<DiskImage>,
    /// Before the first checkpoint: the primary may send nothing for this long.
    pub stall: Duration,
    /// After it: the primary counts as lost when nothing arrives for this long.
    pub heartbeat_timeout: Duration,
    pub load: LoadOptions,
}

/// How a standby ended.
pub enum StandbyOutcome {
    /// The primary was lost: the guest is restored here from checkpoint `seq`, paused; the
    /// caller resumes it (after saying so: a message written while the guest's first line is
    /// half out would cut that line in a shared console).
    Failover { vm: Box<Vm>, seq: u64, why: String, stats: StandbyStats },
    /// The primary ended replication (END): nothing runs here.
    Ended { seq: u64, stats: StandbyStats },
}

/// Figures of a standby.
#[derive(Debug, Clone, Copy, Default)]
pub struct StandbyStats {
    pub checkpoints: u64,
    pub bytes: u64,
    /// Primary lost (the failing read) to the guest restored here (ready to resume).
    pub failover: Duration,
    /// Epoch records discarded because their checkpoint never arrived.
    pub discarded_pages: u64,
}

/// Reads from the primary; a read that gets nothing for the current timeout fails (a lost
/// primary). The timeout changes once the first checkpoint is in.
struct Watched {
    conn: Conn,
    timeout_ms: Arc<AtomicU64>,
}

impl Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::ErrorKind;
        let start = Instant::now();
        loop {
            match self.conn.read(buf) {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    let limit = Duration::from_millis(self.timeout_ms.load(Ordering::SeqCst));
                    if start.elapsed() >= limit {
                        return Err(std::io::Error::new(
                            ErrorKind::TimedOut,
                            format!("the primary sent nothing for {} ms", limit.as_millis()),
                        ));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

/// An epoch's records, held until its checkpoint.
#[derive(Default)]
struct Staged {
    pages: Vec<(u64, PageType, Option<usize>)>,
    page_data: Vec<u8>,
    blocks: Vec<(u32, u64, u64, Option<usize>)>,
    block_data: Vec<u8>,
}

impl Staged {
    fn clear(&mut self) {
        self.pages.clear();
        self.page_data.clear();
        self.blocks.clear();
        self.block_data.clear();
    }
}

struct StandbySink<'a> {
    pending: Option<Pending>,
    vcpus: u32,
    cpu: Option<CpuModel>,
    dirty_tracking: DirtyTracking,
    storage: StorageReceiver<'a>,
    reply: Conn,
    /// The last checkpoint applied.
    last: Option<(u64, MachineState)>,
    staged: Staged,
    stats: IncomingStats,
    checkpoints: u64,
    /// Set at the first checkpoint: the primary's silence is measured against it from then on.
    timeout_ms: Arc<AtomicU64>,
    heartbeat_ms: u64,
}

impl StandbySink<'_> {
    fn pending(&mut self) -> Result<&mut Pending, IncomingError> {
        self.pending.as_mut().ok_or(IncomingError::Unexpected("a record before MACHINE_CONFIG"))
    }

    /// Applies the staged epoch: pages into RAM, blocks into the disks.
    fn apply_staged(&mut self) -> Result<(), IncomingError> {
        let staged = std::mem::take(&mut self.staged);
        {
            let data = &staged.page_data;
            let pages = staged.pages.iter().map(|&(gfn, t, off)| (gfn, t, off.map(|o| &data[o..o + PAGE_SIZE])));
            let p = self.pending.as_mut().ok_or(IncomingError::Unexpected("CHECKPOINT before MACHINE_CONFIG"))?;
            apply_pages(p, &mut self.stats, pages)?;
        }
        for &(disk, offset, len, off) in &staged.blocks {
            let data = off.map(|o| &staged.block_data[o..o + len as usize]);
            self.storage.apply(&DiskBlocks { disk, offset, len, data })?;
        }
        self.staged = staged;
        self.staged.clear();
        Ok(())
    }
}

impl RecordSink for StandbySink<'_> {
    type Error = IncomingError;

    fn machine_config(&mut self, c: &MachineConfig) -> Result<(), IncomingError> {
        // Plain copies: an epoch rewrites pages that exist already, and userfaultfd would only
        // help the first.
        let ram = GuestRam::new(c.memory_bytes)?;
        let written = ram.regions().iter().map(|r| Bitmap::new(r.size / PAGE_SIZE as u64, false)).collect();
        let machine = create_machine(ram, self.dirty_tracking)?;
        self.vcpus = c.vcpus;
        self.pending = Some(Pending {
            machine,
            vcpus: c.vcpus,
            fds: Vec::new(),
            written,
            uffd: None,
            prefaulted: false,
            postcopy: None,
        });
        Ok(())
    }

    fn cpu_model(&mut self, m: &CpuModel) -> Result<(), IncomingError> {
        let p = self.pending()?;
        p.fds = (0..p.vcpus).map(|id| create_vcpu(&p.machine, id, p.vcpus, m)).collect::<Result<Vec<_>, _>>()?;
        self.cpu = Some(m.clone());
        Ok(())
    }

    fn page_batch(&mut self, b: PageBatch<'_>) -> Result<(), IncomingError> {
        if self.last.is_none() {
            // Before the first checkpoint there is no consistent state to keep: into place.
            let stats = &mut self.stats;
            let p = self.pending.as_mut().ok_or(IncomingError::Unexpected("PAGE_BATCH before MACHINE_CONFIG"))?;
            return apply_pages(p, stats, b.iter());
        }
        for (gfn, t, data) in b.iter() {
            let off = data.map(|d| {
                let o = self.staged.page_data.len();
                self.staged.page_data.extend_from_slice(d);
                o
            });
            self.staged.pages.push((gfn, t, off));
        }
        Ok(())
    }

    fn disk_config(&mut self, c: DiskConfig) -> Result<(), IncomingError> {
        Ok(self.storage.config(&c)?)
    }

    fn disk_blocks(&mut self, b: DiskBlocks<'_>) -> Result<(), IncomingError> {
        self.storage.check(b.disk, b.offset, b.len)?;
        if self.last.is_none() {
            return Ok(self.storage.apply(&b)?);
        }
        let off = b.data.map(|d| {
            let o = self.staged.block_data.len();
            self.staged.block_data.extend_from_slice(d);
            o
        });
        self.staged.blocks.push((b.disk, b.offset, b.len, off));
        Ok(())
    }

    fn checkpoint(&mut self, seq: u64, state: &MachineState) -> Result<(), IncomingError> {
        self.apply_staged()?;
        self.last = Some((seq, state.clone()));
        self.checkpoints += 1;
        self.timeout_ms.store(self.heartbeat_ms, Ordering::SeqCst);
        protocol::send_checkpoint_ack(&mut self.reply, seq).map_err(IncomingError::Reply)
    }

    fn snapshot_info(&mut self, _: SnapshotInfo) -> Result<(), IncomingError> {
        Err(IncomingError::Unexpected("SNAPSHOT_INFO"))
    }

    fn ram_map(&mut self, _: RamMap) -> Result<(), IncomingError> {
        Err(IncomingError::Unexpected("RAM_MAP"))
    }

    fn broken_pages(&mut self, _: Vec<u64>) -> Result<(), IncomingError> {
        Err(IncomingError::Unexpected("BROKEN_PAGES"))
    }

    fn final_pass(&mut self) {}

    fn state_begins(&mut self) {}
}

/// Whether a load failure means the primary is gone (its connection closed, broke or went
/// silent; a record cut off by its death) rather than a stream this standby refuses.
fn primary_lost(e: &IncomingError) -> Option<String> {
    match e {
        IncomingError::Load(LoadError::Stream(
            s @ (StreamError::Read { .. } | StreamError::TruncatedRecord { .. } | StreamError::MissingEnd { .. }),
        )) => Some(format!("{}", ErrorChain(s))),
        // The acknowledgement could not be sent: the primary's end is closed.
        IncomingError::Reply(io) => Some(format!("cannot acknowledge to the primary: {io}")),
        _ => None,
    }
}

/// Serves as the standby for the primary on `conn` until the primary ends replication or is
/// lost (then the guest runs here).
pub fn standby(conn: Conn, params: StandbyParams) -> Result<StandbyOutcome, StandbyError> {
    let reply = conn.try_clone().map_err(StandbyError::Reply)?;
    let mut hs = conn.try_clone().map_err(StandbyError::Reply)?;
    // Answers (and CHECKPOINT_ACKs) are small: a plain blocking send. A peer that sends no
    // HELLO within the stall timeout fails the handshake.
    conn.set_read_timeout(Some(params.stall)).map_err(StandbyError::Reply)?;
    let opening = protocol::destination_handshake(&mut hs).map_err(StandbyError::Handshake)?;
    // From here every read wakes up to check the primary's silence.
    conn.set_read_timeout(Some(SEND_POLL)).map_err(StandbyError::Reply)?;
    let head = match opening {
        Opening::Hello(_) => Vec::new(),
        Opening::Stream(h) => h.to_vec(),
    };
    let timeout_ms = Arc::new(AtomicU64::new(params.stall.as_millis() as u64));
    let watched = Watched { conn, timeout_ms: timeout_ms.clone() };
    let stream = std::io::Cursor::new(head).chain(watched);
    let StandbyParams { serial_out, dirty_tracking, disks, heartbeat_timeout, load: opts, .. } = params;
    let mut sink = StandbySink {
        pending: None,
        vcpus: 0,
        cpu: None,
        dirty_tracking,
        storage: StorageReceiver::new(&disks),
        reply,
        last: None,
        staged: Staged::default(),
        stats: IncomingStats::default(),
        checkpoints: 0,
        timeout_ms,
        heartbeat_ms: heartbeat_timeout.as_millis() as u64,
    };
    let result = match StreamReader::new(BufReader::with_capacity(64 << 10, stream)) {
        Ok(mut r) => {
            let res = load_records(&mut r, StreamKind::Replication, &opts, &mut sink);
            sink.stats.bytes = r.bytes_read();
            res.map(|_| ())
        }
        Err(e) => Err(IncomingError::Load(LoadError::Stream(e))),
    };
    let t_lost = Instant::now();
    let mut stats = StandbyStats {
        checkpoints: sink.checkpoints,
        bytes: sink.stats.bytes,
        discarded_pages: sink.staged.pages.len() as u64,
        ..Default::default()
    };
    let why = match result {
        Ok(()) => {
            let seq = sink.last.as_ref().map_or(0, |(s, _)| *s);
            return Ok(StandbyOutcome::Ended { seq, stats });
        }
        Err(e) => match primary_lost(&e) {
            Some(why) => why,
            None => {
                // A stream this standby refuses (another version, a corrupt epoch, a machine it
                // cannot run): the primary is alive and is told; nothing resumes here.
                let _ = protocol::send_nack(&mut sink.reply, &format!("{}", ErrorChain(&e)));
                return Err(StandbyError::Refused(e));
            }
        },
    };
    let StandbySink { pending, cpu, last, .. } = sink;
    let (Some((seq, state)), Some(p), Some(cpu)) = (last, pending, cpu) else {
        return Err(StandbyError::NoCheckpoint(why));
    };
    // The primary is gone: the guest resumes from the last checkpoint. Its disks re-execute
    // the requests that were in flight there before anything new.
    let vm = Vm::restore(p.machine, p.fds, cpu, &state, serial_out, disks, StartMode::Running, true)
        .map_err(|source| StandbyError::Failover { seq, source })?;
    stats.failover = t_lost.elapsed();
    Ok(StandbyOutcome::Failover { vm: Box::new(vm), seq, why, stats })
}
