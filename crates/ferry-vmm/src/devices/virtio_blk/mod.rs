//! virtio-blk over virtio-mmio (virtio 1.x, one request queue) on a raw image file.
//!
//! Threads: the vCPU threads handle register accesses (under the device lock); the guest's
//! queue notifications arrive on an ioeventfd watched by the device's own thread, which pops
//! requests (with `virtio-queue`) and hands them to a pool of I/O threads; those execute them with
//! `pread`/`pwrite`/`fdatasync` straight into guest memory and report back; the device thread
//! writes the status byte, puts the head on the used ring and raises the interrupt by irqfd.
//! Every guest-memory write the device makes is recorded in the dirty log (`GuestDirty`), since
//! KVM does not see writes from host threads.
//!
//! Quiesce (docs/virtio-blk.md): the device stops popping the avail ring and stops putting
//! anything on the used ring. Requests finishing after that point are *held*: their data may be
//! on disk, but the guest is not told. The state section then lists every request popped and not
//! yet used ("in flight"), and a destination executes them again before anything new. If the
//! migration fails, `resume` completes the held requests exactly once, here.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod io;
pub mod state;

use self::io::{complete_to_guest, device_thread, io_thread, notify_guest};
use self::state::{BlockState, Request, TransportState};
use super::disk_dirty::DiskDirty;
use super::disk_image::DiskImage;
use crate::dirty_log::GuestDirty;
use crate::persist::Persist;

/// Guest-physical base of the first virtio-mmio window; disk `i` is at `BASE + i * SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Interrupt line (GSI) of disk 0; disk `i` uses `FIRST_GSI + i`.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Most disks a machine takes (GSIs 5..=12).
pub const MAX_DISKS: usize = 8;
/// Largest queue the device offers.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// After this long waiting for the source to release a disk's lock, the destination says so
/// (and keeps waiting: it never executes a request without the lock).
pub const LOCK_WAIT: Duration = Duration::from_secs(10);
const VENDOR_ID: u32 = 0x5952_5246; // "FRRY"
const MAGIC: u32 = 0x7472_6976; // "virt"
const SEG_MAX: u32 = 126;

/// Errors of a virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot create an eventfd for disk {0}")]
    EventFd(usize, #[source] std::io::Error),
    #[error("KVM cannot {what} for disk {index}")]
    Kvm {
        index: usize,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot start a thread of disk {0}")]
    Spawn(usize, #[source] std::io::Error),
    #[error("disk {index} ({path}) has {here} sectors here but {there} in the migrated state")]
    SizeMismatch { index: usize, path: String, here: u64, there: u64 },
    #[error("disk {index} ({path}) is {here} here but was {there} on the source")]
    ModeMismatch { index: usize, path: String, here: &'static str, there: &'static str },
    #[error("disk {0}: the migrated queue state is invalid")]
    Queue(usize, #[source] virtio_queue::Error),
    #[error("disk {index}: in-flight request at head {head} lies outside guest memory")]
    BadRequest { index: usize, head: u16 },
    #[error("disk {0} lock is poisoned (a device thread panicked)")]
    Poisoned(usize),
    #[error("disk {index} cannot take its image lock back after the failed migration; the guest stays paused so that it never runs twice")]
    LockLost {
        index: usize,
        #[source]
        source: super::disk_image::DiskImageError,
    },
    #[error("disk {index}: the source did not release the image lock in time ({secs} s waited); the guest does not run here")]
    LockWait {
        index: usize,
        secs: u64,
        #[source]
        source: super::disk_image::DiskImageError,
    },
    #[error("disk {0} failed before the handover completed")]
    HandoverFailed(usize),
    #[error(
        "disk {0}: COMMIT came later than this destination may take the guest (the source may have taken it back); \
         the guest does not run here"
    )]
    CommitTooLate(usize),
    #[error("disk {0} lost its image lock to another Ferry; the guest stays paused so that it never runs twice")]
    Fenced(usize),
}

/// What a disk is built on.
pub struct BlockArgs<'a> {
    pub index: usize,
    pub image: DiskImage,
    pub mode: StartMode,
    pub vm: &'a kvm_ioctls::VmFd,
    pub mem: GuestMemoryMmap,
    pub dirty: GuestDirty,
    /// Guest memory's broken pages: the device never touches one (docs/poison.md).
    pub poison: Arc<crate::poison::PoisonSet>,
}

impl Persist for BlockDevice {
    type State = BlockState;
    type ConstructorArgs<'a> = BlockArgs<'a>;
    type Error = BlockError;

    /// The device's state (call while quiesced, vCPUs paused).
    fn save(&self) -> Result<BlockState, BlockError> {
        let st = self.lock()?;
        Ok(BlockState {
            sectors: self.inner.image.sectors(),
            readonly: self.inner.image.readonly(),
            transport: st.t,
            queue: st.queue.state(),
            in_flight: st.in_flight.values().map(|f| f.req.clone()).collect(),
        })
    }

    /// The disk as it was at the source's stop: its queue, and the requests in flight there
    /// to execute again (in their order) before anything new.
    fn restore(args: BlockArgs<'_>, state: &BlockState) -> Result<Self, BlockError> {
        BlockDevice::build(args, Some(state.clone()))
    }
}

/// How a device starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Serving at once (the image is locked).
    Running,
    /// A migration destination: nothing executes until [`BlockDevice::handover`].
    AwaitHandover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    /// Destination before COMMIT.
    AwaitHandover,
    /// Waiting for the source to release the image lock (since `since`).
    AwaitLock(Instant),
    /// The lock could not be had back: the device executes nothing more.
    Failed,
}

/// Counters of one disk.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct BlockStats {
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub io_errors: u64,
    pub refused_writes: u64,
    /// In flight when the device last quiesced.
    pub in_flight_at_quiesce: u64,
    /// Of those, finished (held, not completed to the guest) since the quiesce.
    pub completed_after_quiesce: u64,
    /// Of which writes (their data is on disk; the destination writes it again).
    pub writes_completed_after_quiesce: u64,
    /// Requests re-executed from a migrated state.
    pub replayed: u64,
}

struct InFlight {
    req: Request,
    /// Finished while quiesced: (status, bytes written into guest buffers incl. status).
    held: Option<(u8, u32)>,
}

struct Job {
    seq: u64,
    epoch: u64,
    req: Request,
}

struct Done {
    seq: u64,
    epoch: u64,
    status: u8,
    used_len: u32,
}

struct Shared {
    t: TransportState,
    queue: Queue,
    mode: Mode,
    /// Popping nothing, completing nothing, starting nothing (the machine is being saved),
    /// whatever the mode.
    quiesced: bool,
    /// The driver broke the ring (NEEDS_RESET set): nothing is popped until a reset.
    broken: bool,
    /// Popped and not yet on the used ring, by pop order.
    in_flight: BTreeMap<u64, InFlight>,
    next_seq: u64,
    /// Bumped on reset: completions of an older epoch are dropped.
    epoch: u64,
    /// Requests to execute again (destination), in their original order; executed one at a
    /// time so overlapping requests keep their order.
    replay: VecDeque<u64>,
    replay_running: Option<u64>,
    stats: BlockStats,
    /// Executing in an I/O thread right now.
    executing: u64,
}

struct Inner {
    index: usize,
    image: DiskImage,
    /// Blocks the guest wrote, per consumer (storage migration, replication).
    blocks: DiskDirty,
    mem: GuestMemoryMmap,
    dirty: GuestDirty,
    poison: Arc<crate::poison::PoisonSet>,
    irq: EventFd,
    notify: EventFd,
    done_evt: EventFd,
    ctl: EventFd,
    quit: AtomicBool,
    latency: Duration,
    st: Mutex<Shared>,
    refused_logged: AtomicU64,
}

/// One virtio-blk device with its threads.
pub struct BlockDevice {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

fn device_features(readonly: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_RING_F_EVENT_IDX);
    if readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// The kernel command-line token announcing disk `index` (Linux's virtio_mmio.device= form).
pub fn cmdline_token(index: usize) -> String {
    format!("virtio_mmio.device=4K@{:#x}:{}", mmio_base(index), VIRTIO_FIRST_GSI + index as u32)
}

pub fn mmio_base(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE
}

impl BlockDevice {
    /// A fresh disk `index` on `image`, wired into `vm`, its threads started.
    pub fn new(args: BlockArgs<'_>) -> Result<Self, BlockError> {
        BlockDevice::build(args, None)
    }

    /// Builds disk `index` on `image`, fresh (`state` None) or from a migrated state, wires its
    /// irqfd and ioeventfd into `vm`, and starts its threads.
    fn build(args: BlockArgs<'_>, state: Option<BlockState>) -> Result<Self, BlockError> {
        let BlockArgs { index, image, mode, vm, mem, dirty, poison } = args;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(|e| BlockError::EventFd(index, e));
        let (irq, notify, done_evt, ctl) = (evt()?, evt()?, evt()?, evt()?);
        let kvm = |what| move |source| BlockError::Kvm { index, what, source };
        vm.register_irqfd(&irq, VIRTIO_FIRST_GSI + index as u32).map_err(kvm("register the irqfd"))?;
        let addr = kvm_ioctls::IoEventAddress::Mmio(mmio_base(index) + VIRTIO_MMIO_QUEUE_NOTIFY as u64);
        vm.register_ioevent(&notify, &addr, kvm_ioctls::NoDatamatch).map_err(kvm("register the ioeventfd"))?;

        let path = image.path().display().to_string();
        let (t, queue, in_flight, replay, next_seq) = match state {
            None => (TransportState::default(), new_queue(index)?, BTreeMap::new(), VecDeque::new(), 0),
            Some(s) => {
                if s.sectors != image.sectors() {
                    return Err(BlockError::SizeMismatch { index, path, here: image.sectors(), there: s.sectors });
                }
                if s.readonly != image.readonly() {
                    let m = |ro| if ro { "read-only" } else { "read-write" };
                    return Err(BlockError::ModeMismatch {
                        index,
                        path,
                        here: m(image.readonly()),
                        there: m(s.readonly),
                    });
                }
                let queue = Queue::try_from(s.queue).map_err(|e| BlockError::Queue(index, e))?;
                let mut map = BTreeMap::new();
                let mut replay = VecDeque::new();
                for (seq, req) in s.in_flight.into_iter().enumerate() {
                    if !request_in_memory(&mem, &req) {
                        return Err(BlockError::BadRequest { index, head: req.head });
                    }
                    map.insert(seq as u64, InFlight { req, held: None });
                    replay.push_back(seq as u64);
                }
                let n = map.len() as u64;
                (s.transport, queue, map, replay, n)
            }
        };
        let st = Shared {
            t,
            queue,
            mode: match mode {
                StartMode::Running => Mode::Running,
                StartMode::AwaitHandover => Mode::AwaitHandover,
            },
            in_flight,
            next_seq,
            quiesced: false,
            broken: false,
            epoch: 0,
            replay,
            replay_running: None,
            stats: BlockStats::default(),
            executing: 0,
        };
        let threads = image.spec().io_threads.max(1);
        let latency = Duration::from_micros(image.spec().latency_us);
        let inner = Arc::new(Inner {
            index,
            blocks: DiskDirty::new(image.bytes()),
            image,
            mem,
            dirty,
            poison,
            irq,
            notify,
            done_evt,
            ctl,
            quit: AtomicBool::new(false),
            latency,
            st: Mutex::new(st),
            refused_logged: AtomicU64::new(0),
        });
        let (job_tx, job_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut workers = Vec::new();
        for w in 0..threads {
            let (inner, rx, tx) = (inner.clone(), job_rx.clone(), done_tx.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("disk{index}-io{w}"))
                    .spawn(move || {
                        crate::seccomp::install_or_warn(crate::seccomp::ThreadKind::Device);
                        io_thread(&inner, w, &rx, &tx)
                    })
                    .map_err(|e| BlockError::Spawn(index, e))?,
            );
        }
        drop(done_tx);
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("disk{index}"))
                .spawn(move || {
                    crate::seccomp::install_or_warn(crate::seccomp::ThreadKind::Device);
                    device_thread(&inner, job_tx, done_rx)
                })
                .map_err(|e| BlockError::Spawn(index, e))?
        };
        Ok(BlockDevice { inner, thread: Some(thread), workers })
    }

    pub fn index(&self) -> usize {
        self.inner.index
    }

    pub fn image(&self) -> &DiskImage {
        &self.inner.image
    }

    /// The blocks the guest wrote (docs/virtio-blk.md, "Storage in the stream").
    pub fn dirty_blocks(&self) -> &DiskDirty {
        &self.inner.blocks
    }

    fn lock(&self) -> Result<MutexGuard<'_, Shared>, BlockError> {
        self.inner.st.lock().map_err(|_| BlockError::Poisoned(self.inner.index))
    }

    fn kick(&self) {
        let _ = self.inner.ctl.write(1);
    }

    /// Handles a guest read of the device's MMIO window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(st) = self.lock() else { return };
        if offset >= VIRTIO_MMIO_CONFIG as u64 {
            let mut cfg = [0u8; 24];
            cfg[..8].copy_from_slice(&self.inner.image.sectors().to_le_bytes());
            cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
            let off = (offset - VIRTIO_MMIO_CONFIG as u64) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = cfg.get(off + i).copied().unwrap_or(0);
            }
            return;
        }
        let features = device_features(self.inner.image.readonly());
        let v: u32 = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => VIRTIO_ID_BLOCK,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match st.t.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX if st.t.queue_sel == 0 => QUEUE_MAX_SIZE as u32,
            VIRTIO_MMIO_QUEUE_READY => (st.t.queue_sel == 0 && st.queue.ready()) as u32,
            VIRTIO_MMIO_INTERRUPT_STATUS => st.t.interrupt_status,
            VIRTIO_MMIO_STATUS => st.t.status,
            VIRTIO_MMIO_CONFIG_GENERATION => st.t.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    /// Handles a guest write to the device's MMIO window.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        if data.len() != 4 || offset >= VIRTIO_MMIO_CONFIG as u64 {
            return; // config space is read-only; registers are 32-bit
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let Ok(mut st) = self.lock() else { return };
        let q0 = st.t.queue_sel == 0;
        // Queue registers may only change before the driver is done with setup.
        let setup = st.t.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => st.t.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => st.t.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if st.t.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match st.t.driver_features_sel {
                    0 => st.t.driver_features = (st.t.driver_features & !0xffff_ffff) | v as u64,
                    1 => st.t.driver_features = (st.t.driver_features & 0xffff_ffff) | ((v as u64) << 32),
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => st.t.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if q0 && setup => st.queue.set_size(v as u16),
            VIRTIO_MMIO_QUEUE_READY if q0 && setup => st.queue.set_ready(v == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW if q0 && setup => st.queue.set_desc_table_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH if q0 && setup => st.queue.set_desc_table_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if q0 && setup => st.queue.set_avail_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if q0 && setup => st.queue.set_avail_ring_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_USED_LOW if q0 && setup => st.queue.set_used_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH if q0 && setup => st.queue.set_used_ring_address(None, Some(v)),
            // Reaches us only if the ioeventfd did not take it.
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                let _ = self.inner.notify.write(1);
            }
            VIRTIO_MMIO_INTERRUPT_ACK => st.t.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => {
                if v == 0 {
                    reset(&mut st);
                    drop(st);
                    self.wait_idle();
                    return;
                }
                let old = st.t.status;
                let mut new = v;
                if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 && old & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                    let offered = device_features(self.inner.image.readonly());
                    let f = st.t.driver_features;
                    if f & !offered != 0 || f & (1 << VIRTIO_F_VERSION_1) == 0 {
                        new &= !VIRTIO_CONFIG_S_FEATURES_OK;
                    }
                }
                st.t.status = new;
                if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 && old & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
                    let eidx = st.t.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
                    st.queue.set_event_idx(eidx);
                    drop(st);
                    self.kick();
                }
            }
            _ => {}
        }
    }

    /// Waits (the device lock released) until no request of an older epoch executes, so that a
    /// reset device never writes a buffer or sector the driver reuses after the reset.
    fn wait_idle(&self) {
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            match self.lock() {
                Ok(st) if st.executing > 0 => {}
                _ => return,
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        tracing::warn!("disk {}: a request still executes 30 s after the guest reset the device", self.inner.index);
    }

    /// Stops taking requests and completing them (the machine's vCPUs are paused). Returns the
    /// number of requests in flight.
    pub fn quiesce(&self) -> Result<u64, BlockError> {
        let mut st = self.lock()?;
        st.quiesced = true;
        let n = st.in_flight.len() as u64;
        st.stats.in_flight_at_quiesce = n;
        st.stats.completed_after_quiesce = 0;
        st.stats.writes_completed_after_quiesce = 0;
        Ok(n)
    }

    /// Requests held since the quiesce (finished, not completed to the guest).
    pub fn held(&self) -> u64 {
        self.lock().map(|st| st.in_flight.values().filter(|f| f.held.is_some()).count() as u64).unwrap_or(0)
    }

    /// Undoes a quiesce after a failed migration: completes the held requests (once), takes
    /// the image lock again if it was released, and serves the queue again.
    pub fn resume(&self) -> Result<(), BlockError> {
        let mut st = self.lock()?;
        if st.mode == Mode::Failed {
            // A second resume must not find the device merely "not quiesced" and let the
            // guest run while another Ferry holds the image.
            return Err(BlockError::Fenced(self.inner.index));
        }
        if !st.quiesced {
            return Ok(());
        }
        st.quiesced = false;
        // The lock was released before COMMIT and COMMIT failed: take it back before anything
        // executes again. If someone else has it (a destination that got COMMIT after all),
        // nothing more executes here.
        let mut lost = None;
        if st.mode == Mode::Running {
            if let Err(source) = self.inner.image.lock() {
                st.mode = Mode::Failed;
                lost = Some(BlockError::LockLost { index: self.inner.index, source });
            }
        }
        // Held requests finished on disk under our lock: completing them touches guest memory
        // only, so they complete (once) even when the lock is lost.
        let held: Vec<u64> = st.in_flight.iter().filter(|(_, f)| f.held.is_some()).map(|(&s, _)| s).collect();
        let mut any = false;
        for seq in held {
            if let Some(f) = st.in_flight.remove(&seq) {
                if let Some((status, len)) = f.held {
                    complete_to_guest(&self.inner, &mut st, &f.req, status, len);
                    any = true;
                }
            }
        }
        if any {
            notify_guest(&self.inner, &mut st);
        }
        drop(st);
        self.kick();
        match lost {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Source, after the destination has everything: releases the image lock if none of this
    /// disk's requests is still executing. Returns whether it did.
    pub fn try_release(&self) -> bool {
        let Ok(st) = self.lock() else { return false };
        // Only a quiesced device starts nothing new: otherwise it could write after unlocking.
        if st.quiesced && st.executing == 0 {
            self.inner.image.unlock();
            true
        } else {
            false
        }
    }

    /// Source, after COMMIT: waits (up to `timeout`) until no request executes, then releases
    /// the lock. The destination waits for it before it executes anything.
    pub fn release_when_idle(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.try_release() {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Destination after COMMIT (COMMIT_CONFIRM): waits until this device holds its image lock,
    /// taking it as soon as the source lets it go; with a `deadline`, never after it, nor once
    /// `source_gone` has said for a second that the source ended the connection while the lock
    /// stays held (a source that took the guest back; a dying one lets its locks go within
    /// that second). The device then fails, so that its thread does not take the lock later.
    pub fn await_lock(&self, deadline: Option<Instant>, source_gone: &dyn Fn() -> bool) -> Result<(), BlockError> {
        let start = Instant::now();
        let mut gone_since: Option<Instant> = None;
        loop {
            {
                let mut st = self.lock()?;
                let gave_up = deadline.is_some_and(|d| Instant::now() > d)
                    || gone_since.is_some_and(|t| t.elapsed() > Duration::from_secs(1));
                match st.mode {
                    Mode::Running => return Ok(()),
                    Mode::AwaitLock(_) if gave_up => {
                        st.mode = Mode::Failed;
                        let source =
                            super::disk_image::DiskImageError::Locked { path: self.inner.image.spec().path.clone() };
                        return Err(BlockError::LockWait {
                            index: self.inner.index,
                            secs: start.elapsed().as_secs(),
                            source,
                        });
                    }
                    Mode::AwaitLock(_) => {
                        if self.inner.image.lock().is_ok() {
                            st.mode = Mode::Running;
                            drop(st);
                            self.kick();
                            return Ok(());
                        }
                        if deadline.is_some() && gone_since.is_none() && source_gone() {
                            gone_since = Some(Instant::now());
                        }
                    }
                    Mode::AwaitHandover | Mode::Failed => return Err(BlockError::HandoverFailed(self.inner.index)),
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Destination, at COMMIT: takes the image lock if the source released it already and
    /// starts re-executing the migrated in-flight requests; otherwise the device thread waits
    /// for the lock. Returns the number of requests to replay.
    pub fn handover(&self) -> Result<u64, BlockError> {
        let mut st = self.lock()?;
        if st.mode != Mode::AwaitHandover {
            return Ok(0);
        }
        let n = st.replay.len() as u64;
        st.stats.replayed = n;
        // Usually the source has released the lock by now: then the replay starts before the
        // guest's vCPUs do. Otherwise the device thread takes the lock when it is free.
        st.mode = match self.inner.image.lock() {
            Ok(()) => Mode::Running,
            Err(_) => Mode::AwaitLock(Instant::now()),
        };
        // An interrupt raised just before the source quiesced may not have reached the saved
        // irqchip state: raise it again (a spurious one is harmless, a lost one hangs Linux).
        if st.t.interrupt_status != 0 {
            let _ = self.inner.irq.write(1);
        }
        drop(st);
        self.kick();
        Ok(n)
    }

    pub fn stats(&self) -> BlockStats {
        self.lock().map(|st| st.stats).unwrap_or_default()
    }

    /// Stops the threads (requests still executing finish first).
    pub fn stop(&mut self) {
        self.inner.quit.store(true, Ordering::SeqCst);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

fn new_queue(index: usize) -> Result<Queue, BlockError> {
    Queue::new(QUEUE_MAX_SIZE).map_err(|e| BlockError::Queue(index, e))
}

fn reset(st: &mut Shared) {
    st.queue.reset();
    st.t = TransportState::default();
    st.broken = false;
    st.in_flight.clear();
    st.replay.clear();
    st.replay_running = None;
    st.epoch += 1;
}

/// Takes every chain the driver made available in `queue` as the device thread does (see
/// `io::take_chain`): a request's status is not written here (its I/O would), a malformed one's
/// error status is, and every head goes on the used ring. At most 4 queues' worth, as the ring
/// can be rewritten under the device. For the fuzz target (`crate::fuzzing`): the requests
/// taken, and how many chains were refused.
pub(crate) fn take_available(
    mem: &GuestMemoryMmap,
    poison: &crate::poison::PoisonSet,
    queue: &mut Queue,
) -> (Vec<Request>, usize) {
    let (mut ok, mut bad) = (Vec::new(), 0);
    for _ in 0..4 * usize::from(queue.size()) {
        let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
        let head = chain.head_index();
        match io::take_chain(mem, poison, chain) {
            Ok(r) => ok.push(r),
            Err(status) => {
                if let Some(gpa) = status {
                    let _ = mem.write_obj(VIRTIO_BLK_S_IOERR as u8, GuestAddress(gpa));
                }
                bad += 1;
            }
        }
        let _ = queue.add_used(mem, head, 0);
    }
    (ok, bad)
}

/// Whether any page of `[gpa, gpa+len)` is broken.
fn touches_broken(poison: &crate::poison::PoisonSet, gpa: u64, len: u64) -> bool {
    // A range past the end of the address space (a hostile descriptor) ends at its top.
    !poison.is_empty() && poison.any_in(gpa / 4096, gpa.saturating_add(len.max(1) - 1) / 4096)
}

fn request_in_memory(mem: &GuestMemoryMmap, r: &Request) -> bool {
    GuestMemoryBackend::check_range(mem, GuestAddress(r.status_gpa), 1)
        && r.segments.iter().all(|s| GuestMemoryBackend::check_range(mem, GuestAddress(s.gpa), s.len as usize))
}
