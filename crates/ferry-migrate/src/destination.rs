//! The incoming side: read a stream into fresh guest RAM, rebuild the machine from its state
//! sections, acknowledge, and start it only when the source commits.
//!
//! Nothing runs before COMMIT: on any error the destination answers NACK (when it still can),
//! drops everything it built and the caller exits with the error.

use ferry_stream::fault;
use std::io::{BufReader, Read};
use std::time::{Duration, Instant};

use ferry_stream::{CpuModel, MachineConfig, PageBatch, PageType, RamMap, SnapshotInfo, StreamReader, PAGE_SIZE};
use ferry_vmm::devices::disk_image::DiskImage;
use ferry_vmm::devices::serial::SerialSink;
use ferry_vmm::devices::virtio_blk::StartMode;
use ferry_vmm::dirty_log::Bitmap;
use ferry_vmm::memory::GuestRam;
use ferry_vmm::uffd::{CopyOutcome, Uffd};
use ferry_vmm::vm::{create_machine, create_vcpu, DirtyTracking, Vm};

use crate::protocol::{self, Ack, Opening, ProtocolError};
use crate::records::{load_records, LoadError, LoadOptions, RecordSink, StreamKind};
use crate::transport::{Conn, StallWatch, SEND_POLL};

/// Errors of an incoming migration.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("the handshake with the source failed")]
    Handshake(#[source] ProtocolError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("page frame {0:#x} is outside guest RAM")]
    PageOutside(u64),
    #[error("page frame {0:#x} was sent with data after the stream declared it BROKEN")]
    DataForBroken(u64),
    #[error("cannot mark page frame {gfn:#x} broken here")]
    MarkBroken {
        gfn: u64,
        #[source]
        source: ferry_vmm::memory::MemoryError,
    },
    #[error("record {0} is not valid in a migration stream")]
    Unexpected(&'static str),
    #[error("cannot rebuild the machine")]
    Vm(#[from] ferry_vmm::vm::VmError),
    #[error("guest memory")]
    Memory(#[from] ferry_vmm::memory::MemoryError),
    #[error("filling guest memory failed")]
    Uffd(#[source] ferry_vmm::uffd::UffdError),
    #[error("the source did not commit the handover")]
    Commit(#[source] ProtocolError),
    #[error("cannot answer the source")]
    Reply(#[source] std::io::Error),
    #[error("cannot start the machine's vCPUs")]
    Start(#[source] ferry_vmm::vm::VmError),
    #[error("the disks")]
    Storage(#[from] crate::storage::StorageError),
    #[error("post-copy needs userfaultfd, which this host does not give")]
    NoUffd(#[source] ferry_vmm::uffd::UffdError),
    #[error("post-copy lists frame {0:#x}, which is not guest RAM or is broken")]
    PostcopyFrame(u64),
    #[error("cannot start post-copy")]
    PostcopyStart(#[source] std::io::Error),
    #[error("page frame {gfn:#x} came on page channel {channel} of {count}; its shard belongs to another channel")]
    WrongChannel { gfn: u64, channel: u32, count: u32 },
    #[error("the source asks for page channels, but this destination takes no further connections")]
    NoChannelListener,
    #[error("waiting for the source's page channels failed")]
    ChannelAccept(#[source] std::io::Error),
    #[error("accepting a page channel failed")]
    ChannelConnect(#[source] crate::transport::TransportError),
    #[error("only {got} of the {count} page channels connected within {secs:.1} s (the stall timeout)")]
    ChannelsMissing { got: u32, count: u32, secs: f64 },
    #[error("page channel {channel} sent nothing for {secs:.1} s (the stall timeout) before its END")]
    ChannelStalled { channel: u32, secs: f64 },
    #[error("page channel {index} failed")]
    Channel {
        index: u32,
        #[source]
        source: Box<IncomingError>,
    },
    #[error("page channel {0}'s thread panicked")]
    ChannelPanicked(u32),
    #[error("the load stopped")]
    ChannelStopped,
}

/// Timings of the load, reported in the ACK and to the caller.
#[derive(Debug, Clone, Copy, Default)]
pub struct IncomingStats {
    pub bytes: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub total: Duration,
    pub load: Duration,
    pub restore: Duration,
    /// In-flight disk requests re-executed here.
    pub disk_replayed: u64,
    /// BROKEN entries received (a page can come more than once).
    pub broken_pages: u64,
}

pub(crate) struct Pending {
    /// The machine is built as soon as the configuration arrives, so that the switch-over only
    /// has to put state into it.
    pub(crate) machine: ferry_vmm::vm::MachineParts,
    pub(crate) vcpus: u32,
    /// Created once the CPU model is known.
    pub(crate) fds: Vec<kvm_ioctls::VcpuFd>,
    /// Pages written during this load (a ZERO page there must be cleared again).
    pub(crate) written: Vec<Bitmap>,
    /// Fills missing pages without zeroing them first (None: userfaultfd unavailable).
    pub(crate) uffd: Option<Uffd>,
    /// Pages may exist without this load having written them (`--prefault`, or no
    /// userfaultfd): post-copy drops every page it lists, not only those written here.
    pub(crate) prefaulted: bool,
    /// Post-copy: the session and, per region, the pages still at the source.
    pub(crate) postcopy: Option<(u64, Vec<Bitmap>)>,
}

impl Pending {
    /// A BROKEN entry: the page joins this machine's poison set and is poisoned for real here,
    /// so the guest gets a machine check when it touches it and no stale data is ever read
    /// (whatever this load wrote there before is dropped).
    pub(crate) fn mark_broken(&mut self, gfn: u64) -> Result<(), IncomingError> {
        let (_, ri, page) = self.locate(gfn)?;
        let ram = &self.machine.ram;
        if ram.poison().mark(gfn, ferry_vmm::poison::PoisonCause::Stream) {
            ram.poison_host_page(gfn * PAGE_SIZE as u64, self.uffd.as_ref())
                .map_err(|source| IncomingError::MarkBroken { gfn, source })?;
        }
        // Not a page this load wrote any more: nothing writes or zeroes it again.
        self.written[ri].clear(page);
        Ok(())
    }
}

/// Where incoming pages go: the machine being loaded ([`Pending`]), or a page channel's
/// share of it (channels.rs).
pub(crate) trait PageTarget {
    /// The host address, region and page index (in its region) of guest frame `gfn`.
    fn locate(&self, gfn: u64) -> Result<(*mut u8, usize, u64), IncomingError>;
    /// Whether `gfn` is broken (no data may be written there).
    fn is_broken(&self, gfn: u64) -> bool;
    /// Region `ri`'s pages written by this load, and the userfaultfd that fills missing ones.
    fn fill_state(&mut self, ri: usize) -> (&mut Bitmap, Option<&Uffd>);
    /// A BROKEN entry for `gfn`.
    fn mark_broken(&mut self, gfn: u64) -> Result<(), IncomingError>;
}

impl PageTarget for Pending {
    fn locate(&self, gfn: u64) -> Result<(*mut u8, usize, u64), IncomingError> {
        let ram = &self.machine.ram;
        let gpa = gfn.checked_mul(PAGE_SIZE as u64).ok_or(IncomingError::PageOutside(gfn))?;
        let (ri, page) = ram.page_location(gpa).ok_or(IncomingError::PageOutside(gfn))?;
        let p = ram.host_ptr(gpa, PAGE_SIZE as u64).map_err(|_| IncomingError::PageOutside(gfn))?;
        Ok((p, ri, page))
    }

    fn is_broken(&self, gfn: u64) -> bool {
        self.machine.ram.poison().contains(gfn)
    }

    fn fill_state(&mut self, ri: usize) -> (&mut Bitmap, Option<&Uffd>) {
        (&mut self.written[ri], self.uffd.as_ref())
    }

    fn mark_broken(&mut self, gfn: u64) -> Result<(), IncomingError> {
        Pending::mark_broken(self, gfn)
    }
}

/// Writes a run of `n` NORMAL pages starting at frame `gfn` from `data` (n pages).
fn write_run<T: PageTarget>(t: &mut T, gfn: u64, n: u64, data: &[u8]) -> Result<(), IncomingError> {
    if let Some(g) = (gfn..gfn + n).find(|&g| t.is_broken(g)) {
        return Err(IncomingError::DataForBroken(g));
    }
    let len = n * PAGE_SIZE as u64;
    let (host, ri, page) = t.locate(gfn)?;
    // The run must lie in one region: check its last page too.
    let (_, ri_last, _) = t.locate(gfn + n - 1)?;
    if ri_last != ri || data.len() as u64 != len {
        for i in 0..n {
            write_run(t, gfn + i, 1, &data[(i as usize) * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE])?;
        }
        return Ok(());
    }
    let (written, uffd) = t.fill_state(ri);
    if let Some(u) = uffd {
        // Pages this load wrote already exist (later iterations resend dirtied pages): a
        // plain copy. Missing ones are filled with UFFDIO_COPY. Split the run where that
        // changes, so neither kind costs a failing ioctl per page.
        let mut i = 0;
        while i < n {
            let exists = written.get(page + i);
            let mut j = i + 1;
            while j < n && written.get(page + j) == exists {
                j += 1;
            }
            let sub = &data[(i as usize) * PAGE_SIZE..(j as usize) * PAGE_SIZE];
            // SAFETY: `host` is the run's first page; the run lies in one region (checked
            // above), so the sub-run's pages are guest RAM too.
            let at = unsafe { host.add((i as usize) * PAGE_SIZE) };
            if exists {
                // SAFETY: the pages exist (written earlier in this load), so the copy
                // cannot fault on a missing registered page; no vCPU runs yet; `sub` has
                // the sub-run's length.
                unsafe { std::ptr::copy_nonoverlapping(sub.as_ptr(), at, sub.len()) };
            } else {
                fill_missing(u, written, at, page + i, sub)?;
            }
            i = j;
        }
        return Ok(());
    }
    // No userfaultfd: every page is an ordinary mapping.
    // SAFETY: `host` points to `len` bytes of guest RAM no vCPU uses yet; `data` has `len`.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, len as usize) };
    for i in 0..n {
        written.set(page + i);
    }
    Ok(())
}

/// Fills pages this load has not written (from `page` of `written`'s region, at `host`) with
/// `UFFDIO_COPY`; one that exists anyway (nothing but this load writes guest RAM before the
/// vCPUs run, so only if something else did) is copied into plainly.
fn fill_missing(u: &Uffd, written: &mut Bitmap, host: *mut u8, page: u64, data: &[u8]) -> Result<(), IncomingError> {
    let n = (data.len() / PAGE_SIZE) as u64;
    // SAFETY: `data` holds `n` pages; the destination range is guest RAM registered with
    // this userfaultfd, and no vCPU runs yet.
    match unsafe { u.copy(host as u64, data.as_ptr(), data.len() as u64) } {
        Ok(CopyOutcome::Copied) => {}
        Ok(CopyOutcome::Exists) if n > 1 => {
            for i in 0..n {
                let d = &data[(i as usize) * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE];
                // SAFETY: page `i` of the range checked by the caller.
                fill_missing(u, written, unsafe { host.add((i as usize) * PAGE_SIZE) }, page + i, d)?;
            }
            return Ok(());
        }
        Ok(CopyOutcome::Exists) => {
            // SAFETY: the page exists, so the copy cannot fault on a missing registered
            // page; no vCPU runs yet; `data` is one page.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, PAGE_SIZE) };
        }
        Err(e) => return Err(IncomingError::Uffd(e)),
    }
    for i in 0..n {
        written.set(page + i);
    }
    Ok(())
}

/// Where the incoming guest's RAM comes from.
pub enum IncomingRam {
    /// Created when the stream's MACHINE_CONFIG arrives, of the size it gives (checked against
    /// the size the user asked for, if any). Pages are filled with `UFFDIO_COPY`, so a page
    /// is allocated and written once, never zeroed first.
    Fresh(Option<u64>),
    /// Created and fully allocated before the stream was accepted (`--prefault`): the copy
    /// only writes into pages that exist.
    Prefaulted(GuestRam),
}

/// What the destination is given besides the connection.
pub struct IncomingParams {
    pub ram: IncomingRam,
    pub serial_out: SerialSink,
    pub dirty_tracking: DirtyTracking,
    /// The destination's own images, opened, locked at the handover.
    pub disks: Vec<DiskImage>,
    /// A source that sends nothing for this long before END fails the load.
    pub stall: Duration,
    /// What the load checks besides the stream (`--memory` is in `ram`).
    pub load: LoadOptions,
    /// Post-copy: where a source whose link failed comes back (None: a failed post-copy link
    /// loses the guest).
    pub recover: Option<crate::postcopy::Recover>,
}

/// A post-copy still running after [`receive`] returned: it ends once every page is in place.
pub type PostcopyRun =
    std::thread::JoinHandle<Result<crate::postcopy::IncomingPostcopyStats, crate::postcopy::PostcopyError>>;

/// How long after its ACK a destination (COMMIT_CONFIRM) may still take the first writable
/// disk's image lock, and so the guest: the source's own wait for its last requests (60 s) and
/// then some. A source that hears no COMMITTED waits this long (and a margin) before it takes
/// that lock back, unless the connection ended.
pub const COMMIT_LOCK_WAIT: Duration = Duration::from_secs(70);

/// Receives a machine on `conn`. Returns the machine once the source committed, its disks
/// handed over and its vCPUs still paused: the caller resumes it (after anything it has to say,
/// so that no message cuts the guest's first line in a merged console). A
/// source that sends nothing for `stall` before the stream's END fails the load; the wait for
/// COMMIT after the ACK has no bound (see there).
pub fn receive(conn: Conn, params: IncomingParams) -> Result<(Vm, IncomingStats, Option<PostcopyRun>), IncomingError> {
    fault::disarm();
    let mut reply = conn.try_clone().map_err(IncomingError::Reply)?;
    let commit_conn = conn.try_clone().map_err(IncomingError::Reply)?;
    let t_start = Instant::now();
    // SO_RCVTIMEO is the socket's: the commit wait below clears it again.
    conn.set_read_timeout(Some(SEND_POLL)).map_err(IncomingError::Reply)?;
    conn.set_write_timeout(Some(SEND_POLL)).map_err(IncomingError::Reply)?;
    let local = conn.is_local();
    // Bytes arriving on page channels (if any) count as the source being alive: the main
    // connection may be quiet while they carry a pass.
    let activity = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut watched = StallWatch::from_source(conn, params.stall).with_activity(activity.clone());
    // The handshake: a source with it is answered (or refused, naming both format ranges);
    // one from before it starts with its stream header, read as it stands.
    let (opening, their_features) = match protocol::destination_handshake(&mut watched) {
        Ok(Opening::Hello(h)) => (Vec::new(), h.features),
        Ok(Opening::Stream(head)) => (head.to_vec(), 0),
        Err(e) => return Err(IncomingError::Handshake(e)),
    };
    fault::hit("destination.connected");
    let stream = std::io::Cursor::new(opening).chain(watched);
    let stall = params.stall;
    let IncomingParams { ram, serial_out, dirty_tracking, disks, load: opts, recover, .. } = params;
    let listen = recover.as_ref().map(|r| crate::channels::ChannelListener {
        listener: &r.listener,
        uri: &r.uri,
        admit: &r.admit,
        activity: activity.clone(),
    });
    let loaded = load(stream, reply.try_clone().ok(), local, ram, dirty_tracking, &disks, opts, listen.as_ref(), stall);
    drop(listen);
    match loaded {
        Ok((mut pending, loaded, stats, rest)) => {
            // Post-copy: from here a touch of a page still at the source waits for it.
            let postcopy = match (pending.postcopy.take(), pending.uffd.take()) {
                (Some((session, missing)), Some(uffd)) => {
                    let regions = pending.machine.ram.regions().to_vec();
                    let poison = pending.machine.ram.poison().clone();
                    match crate::postcopy::PostcopyIncoming::start(uffd, regions, poison, missing, session) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            let e = IncomingError::PostcopyStart(e);
                            let _ = protocol::send_nack(&mut reply, &format!("{}", ErrorChain(&e)));
                            return Err(e);
                        }
                    }
                }
                _ => None,
            };
            // The machine is built from its state; vCPU threads start paused, COMMIT resumes
            // them. This counts as load time.
            let t = Instant::now();
            let replay: u64 = loaded.state.disks.iter().map(|d| d.in_flight.len() as u64).sum();
            let vm = match Vm::restore(
                pending.machine,
                pending.fds,
                loaded.cpu,
                &loaded.state,
                serial_out,
                disks,
                StartMode::AwaitHandover,
                true,
            ) {
                Ok(vm) => vm,
                Err(e) => {
                    let e = IncomingError::Start(e);
                    let _ = protocol::send_nack(&mut reply, &format!("{}", ErrorChain(&e)));
                    return Err(e);
                }
            };
            let restore = t.elapsed();
            fault::hit("destination.restored");
            // COMMIT_CONFIRM (pre-copy): the guest becomes ours after COMMIT once we hold the
            // first writable disk's image lock and have said so. The ACK tells the source
            // whether we see its lock on that image (then the lock can settle who holds the
            // guest if our COMMITTED is lost).
            let confirm = their_features & protocol::features::COMMIT_CONFIRM != 0 && postcopy.is_none();
            let flags =
                if confirm && vm.disks_token_lock_seen() == Some(true) { protocol::ACK_TOKEN_LOCK_SEEN } else { 0 };
            let stats = IncomingStats { load: stats.load + restore, restore, disk_replayed: replay, ..stats };
            reply.set_write_timeout(None).map_err(IncomingError::Reply)?;
            protocol::send_ack(
                &mut reply,
                Ack {
                    load_us: stats.load.as_micros() as u64,
                    restore_us: stats.restore.as_micros() as u64,
                    disk_replay: replay,
                    flags,
                },
            )
            .map_err(IncomingError::Reply)?;
            let acked_at = Instant::now();
            fault::hit("destination.ack-sent");
            // Once acknowledged, the handover is the source's decision: it sends COMMIT, or
            // closes the connection (on failure, or by dying). This wait has no bound, as a
            // timeout here could discard a guest the source has already let go of (its COMMIT
            // still in flight on a slow or retransmitting link).
            let mut c = commit_conn;
            c.set_read_timeout(None).map_err(IncomingError::Reply)?;
            protocol::read_commit(&mut c).map_err(IncomingError::Commit)?;
            fault::hit("destination.commit-received");
            // Post-copy: the source sends the missing pages from now on (the disks' replay
            // below may already wait for some).
            let run = match postcopy {
                Some(p) => {
                    // The page stream's reads are watched for silence again (the commit wait
                    // cleared the socket's timeout), and a TLS session's reader must not hold
                    // it for good: the fault thread writes requests on it.
                    c.set_read_timeout(Some(SEND_POLL)).map_err(IncomingError::Reply)?;
                    let stream: Box<dyn Read + Send> = Box::new(rest);
                    Some(
                        std::thread::Builder::new()
                            .name("postcopy-in".into())
                            .spawn(move || p.run(stream, c, recover))
                            .map_err(IncomingError::PostcopyStart)?,
                    )
                }
                None => None,
            };
            // The disks take their image locks (once the source released them) and re-execute
            // the requests that were in flight at the stop, in order, before anything new.
            if confirm {
                // Not after the ACK's deadline: a source that heard nothing by then may have
                // taken the guest back (and let its lock go again since).
                let source_gone = || reply.peer_closed();
                vm.disks_handover_in_order(acked_at + COMMIT_LOCK_WAIT, &source_gone).map_err(IncomingError::Start)?;
                fault::hit("destination.disk-locks-taken");
                // Holding the locks, the guest is ours even if this answer is lost: the source
                // then finds the locks taken and lets the guest go.
                if let Err(e) = protocol::send_committed(&mut reply) {
                    tracing::warn!("cannot confirm the handover to the source ({e}); the guest runs here (the source does not resume it on its own)");
                }
                fault::hit("destination.committed-sent");
            } else {
                vm.disks_handover().map_err(IncomingError::Start)?;
            }
            Ok((vm, IncomingStats { total: t_start.elapsed(), ..stats }, run))
        }
        Err(e) => {
            let _ = reply.set_write_timeout(None);
            let _ = protocol::send_nack(&mut reply, &format!("{}", ErrorChain(&e)));
            Err(e)
        }
    }
}

/// `error: cause: cause` on one line.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut s = self.0.source();
        while let Some(e) = s {
            write!(f, ": {e}")?;
            s = e.source();
        }
        Ok(())
    }
}

/// Where a receive is, for the scheduling class of the threads that copy pages in
/// (copy_priority.rs); shared by the main reader and the page channels' threads.
pub(crate) struct ReceivePhase {
    /// Page entries still to come before the first pass (every page once) is complete.
    first_pass_left: std::sync::atomic::AtomicU64,
    /// The source paused its guest (FINAL_PASS), or the state began.
    urgent: std::sync::atomic::AtomicBool,
    /// Whether the source (and so its running guest) shares this host's CPUs.
    local: bool,
}

impl ReceivePhase {
    fn new(local: bool) -> Self {
        ReceivePhase {
            first_pass_left: std::sync::atomic::AtomicU64::new(u64::MAX),
            urgent: std::sync::atomic::AtomicBool::new(false),
            local,
        }
    }

    /// `n` more page entries arrived.
    pub(crate) fn received(&self, n: u64) {
        use std::sync::atomic::Ordering;
        let _ = self.first_pass_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(l.saturating_sub(n)));
    }

    fn set_urgent(&self) {
        self.urgent.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the copy may stay in the idle class: until the final pass when the source's
    /// guest runs on this host, else until every page has come once.
    pub(crate) fn idle_ok(&self) -> bool {
        use std::sync::atomic::Ordering;
        !self.urgent.load(Ordering::Relaxed) && (self.local || self.first_pass_left.load(Ordering::Relaxed) > 0)
    }
}

/// The migration stream's own records: guest RAM comes in page batches, written as they
/// arrive into a machine built when the configuration arrived.
struct MigrationSink<'a> {
    ram: Option<IncomingRam>,
    dirty_tracking: DirtyTracking,
    disks: &'a [DiskImage],
    /// Where page channels connect (None: this destination takes none).
    listen: Option<&'a crate::channels::ChannelListener<'a>>,
    stall: Duration,
    /// The page channels' threads. Declared before `pending`: dropped (stopped and joined)
    /// before the guest RAM they write into.
    channels: Option<crate::channels::ChannelsIn>,
    pending: Option<Pending>,
    idle_copy: Option<crate::copy_priority::IdleCopy>,
    phase: std::sync::Arc<ReceivePhase>,
    stats: IncomingStats,
    /// The disks' blocks, when the stream carries them (`--copy-storage`).
    storage: crate::storage::StorageReceiver<'a>,
    /// The return path, for POSTCOPY_LISTED.
    reply: Option<Conn>,
    /// The source paused its guest (FINAL_PASS came).
    final_pass: bool,
}

impl RecordSink for MigrationSink<'_> {
    type Error = IncomingError;

    fn machine_config(&mut self, c: &MachineConfig) -> Result<(), IncomingError> {
        let (ram, uffd) = match self.ram.take() {
            // Every page exists: plain copies, no userfaultfd.
            Some(IncomingRam::Prefaulted(ram)) => (ram, None),
            Some(IncomingRam::Fresh(_)) | None => {
                let ram = GuestRam::new(c.memory_bytes)?;
                let uffd = Uffd::new().ok().and_then(|mut u| {
                    ram.regions().iter().try_for_each(|r| u.register(r.host_addr, r.size)).ok().map(|_| u)
                });
                (ram, uffd)
            }
        };
        let written = ram.regions().iter().map(|r| Bitmap::new(r.size / PAGE_SIZE as u64, false)).collect();
        // The source's guest runs while pre-copy arrives: stay off its CPU until every page has
        // come once, or until the final pass if the guest runs on this host.
        let disk_threads = self.disks.iter().map(|d| d.spec().busy_threads()).sum();
        drop(self.idle_copy.replace(crate::copy_priority::IdleCopy::enter(c.vcpus, disk_threads)));
        self.phase.first_pass_left.store(c.memory_bytes / PAGE_SIZE as u64, std::sync::atomic::Ordering::Relaxed);
        let prefaulted = uffd.is_none();
        let machine = create_machine(ram, self.dirty_tracking)?;
        self.pending =
            Some(Pending { machine, vcpus: c.vcpus, fds: Vec::new(), written, uffd, prefaulted, postcopy: None });
        Ok(())
    }

    fn cpu_model(&mut self, m: &CpuModel) -> Result<(), IncomingError> {
        let p = self.pending.as_mut().ok_or(IncomingError::Unexpected("CPU_MODEL before MACHINE_CONFIG"))?;
        p.fds = (0..p.vcpus).map(|id| create_vcpu(&p.machine, id, p.vcpus, m)).collect::<Result<Vec<_>, _>>()?;
        Ok(())
    }

    fn page_batch(&mut self, batch: PageBatch<'_>) -> Result<(), IncomingError> {
        let p = self.pending.as_mut().ok_or(IncomingError::Unexpected("PAGE_BATCH before MACHINE_CONFIG"))?;
        if let Some(c) = &self.channels {
            // The main connection is channel 0: only its shards come here.
            if let Some(&(gfn, _)) = batch.entries().iter().find(|(g, _)| ferry_stream::channel_of(*g, c.count) != 0) {
                return Err(IncomingError::WrongChannel { gfn, channel: 0, count: c.count });
            }
        }
        if let Some((_, missing)) = &mut p.postcopy {
            // After a POSTCOPY record only pages not listed come with data; a listed page that
            // broke meanwhile comes as BROKEN and is owed no more.
            for (gfn, ty) in batch.entries() {
                let Some((ri, page)) = gfn.checked_mul(PAGE_SIZE as u64).and_then(|g| p.machine.ram.page_location(g))
                else {
                    continue;
                };
                if missing[ri].get(page) {
                    if *ty != PageType::Broken {
                        return Err(IncomingError::Unexpected("data for a page listed in POSTCOPY"));
                    }
                    missing[ri].clear(page);
                }
            }
        }
        self.phase.received(batch.len() as u64);
        if !self.phase.idle_ok() {
            drop(self.idle_copy.take());
        }
        if let Some(i) = self.idle_copy.as_mut() {
            i.watch();
        }
        apply_pages(p, &mut self.stats, batch.iter())
    }

    fn disk_config(&mut self, c: ferry_stream::DiskConfig) -> Result<(), IncomingError> {
        Ok(self.storage.config(&c)?)
    }

    fn disk_blocks(&mut self, b: ferry_stream::DiskBlocks<'_>) -> Result<(), IncomingError> {
        Ok(self.storage.apply(&b)?)
    }

    /// Page data also comes on `count - 1` more connections: take them now (before any page).
    fn channels(&mut self, count: u32, session: u64) -> Result<(), IncomingError> {
        let p = self.pending.as_ref().ok_or(IncomingError::Unexpected("CHANNELS before MACHINE_CONFIG"))?;
        if self.channels.is_some() {
            return Err(IncomingError::Unexpected("a second CHANNELS record"));
        }
        if self.stats.normal_pages + self.stats.zero_pages + self.stats.broken_pages > 0 || p.postcopy.is_some() {
            return Err(IncomingError::Unexpected("CHANNELS after page data"));
        }
        let from = self.listen.ok_or(IncomingError::NoChannelListener)?;
        let main =
            self.reply.as_ref().ok_or(IncomingError::NoChannelListener)?.try_clone().map_err(IncomingError::Reply)?;
        let ram = &p.machine.ram;
        let copy = crate::channels::CopyClass {
            phase: self.phase.clone(),
            vcpus: p.vcpus,
            disk_threads: self.disks.iter().map(|d| d.spec().busy_threads()).sum(),
        };
        let set =
            crate::channels::ChannelsIn::accept(from, count, session, ram, p.uffd.as_ref(), main, self.stall, copy)?;
        self.channels = Some(set);
        Ok(())
    }

    /// The switch-over is to post-copy: the listed pages' data is still at the source. What
    /// this load wrote there is stale: it is dropped, so that a touch waits for the page.
    fn postcopy(&mut self, session: u64, runs: Vec<(u64, u64)>) -> Result<(), IncomingError> {
        if self.channels.is_some() {
            return Err(IncomingError::Unexpected("POSTCOPY in a migration with page channels"));
        }
        let p = self.pending.as_mut().ok_or(IncomingError::Unexpected("POSTCOPY before MACHINE_CONFIG"))?;
        let ram = &p.machine.ram;
        // Several records of one session add up: the source lists most pages while its guest
        // still runs (their stale data is dropped here outside the pause), the rest in the
        // final pass.
        let mut missing = match p.postcopy.take() {
            Some((s, m)) if s == session => m,
            Some(_) => return Err(IncomingError::Unexpected("POSTCOPY of another session")),
            None => ram.regions().iter().map(|r| Bitmap::new(r.size / PAGE_SIZE as u64, false)).collect(),
        };
        if p.uffd.is_none() {
            let mut u = Uffd::new().map_err(IncomingError::NoUffd)?;
            for r in ram.regions() {
                u.register(r.host_addr, r.size).map_err(IncomingError::NoUffd)?;
            }
            p.uffd = Some(u);
        }
        for (first, n) in runs {
            let mut g = first;
            while g < first + n {
                let (ri, page) = g
                    .checked_mul(PAGE_SIZE as u64)
                    .and_then(|gpa| ram.page_location(gpa))
                    .ok_or(IncomingError::PostcopyFrame(g))?;
                // The part of the run in this region, split where this load wrote pages.
                let end = (first + n).min(g + (ram.regions()[ri].size / PAGE_SIZE as u64 - page));
                let mut i = g;
                while i < end {
                    let pg = page + (i - g);
                    if ram.poison().contains(i) {
                        return Err(IncomingError::PostcopyFrame(i));
                    }
                    let exists = p.prefaulted || p.written[ri].get(pg);
                    let mut j = i + 1;
                    while j < end && (p.prefaulted || p.written[ri].get(page + (j - g))) == exists {
                        j += 1;
                    }
                    if exists {
                        ram.punch(i * PAGE_SIZE as u64, (j - i) * PAGE_SIZE as u64)?;
                    }
                    for k in i..j {
                        missing[ri].set(page + (k - g));
                        p.written[ri].clear(page + (k - g));
                    }
                    i = j;
                }
                g = end;
            }
        }
        p.postcopy = Some((session, missing));
        if !self.final_pass {
            // The source waits for this before it pauses its guest.
            let r = self.reply.as_mut().ok_or(IncomingError::Unexpected("POSTCOPY before the final pass"))?;
            protocol::send_postcopy_listed(r, session).map_err(IncomingError::Reply)?;
        }
        Ok(())
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

    // The source paused its guest: the final pass is the pause, at full priority.
    fn final_pass(&mut self) {
        self.phase.set_urgent();
        drop(self.idle_copy.take());
        self.final_pass = true;
    }

    fn state_begins(&mut self) {
        self.phase.set_urgent();
        drop(self.idle_copy.take());
    }
}

/// Writes a batch's pages into guest RAM (`(frame, type, data)` in order, data for NORMAL
/// pages): runs of NORMAL pages with consecutive frames and adjacent data are one copy.
pub(crate) fn apply_pages<'d, T: PageTarget>(
    p: &mut T,
    stats: &mut IncomingStats,
    pages: impl Iterator<Item = (u64, PageType, Option<&'d [u8]>)>,
) -> Result<(), IncomingError> {
    // Runs of NORMAL pages with consecutive frames have consecutive data: one copy.
    let mut run: Option<(u64, u64, &[u8])> = None;
    for (gfn, ty, data) in pages {
        if let (PageType::Normal, Some(d)) = (ty, data) {
            stats.normal_pages += 1;
            match &mut run {
                Some((start, n, buf)) if *start + *n == gfn && buf.as_ptr_range().end == d.as_ptr() => {
                    *n += 1;
                    // SAFETY: both slices come from the same record buffer and are
                    // adjacent (checked above), so the joined range is one slice.
                    *buf = unsafe { std::slice::from_raw_parts(buf.as_ptr(), buf.len() + d.len()) };
                    continue;
                }
                _ => {
                    if let Some((start, n, buf)) = run.take() {
                        write_run(p, start, n, buf)?;
                    }
                    run = Some((gfn, 1, d));
                    continue;
                }
            }
        }
        if let Some((start, n, buf)) = run.take() {
            write_run(p, start, n, buf)?;
        }
        match ty {
            PageType::Zero | PageType::Discarded => {
                if p.is_broken(gfn) {
                    return Err(IncomingError::DataForBroken(gfn));
                }
                let (host, ri, page) = p.locate(gfn)?;
                if p.fill_state(ri).0.get(page) {
                    // SAFETY: the page exists (written earlier in this load) and no
                    // vCPU runs yet.
                    unsafe { std::ptr::write_bytes(host, 0, PAGE_SIZE) };
                }
                stats.zero_pages += 1;
            }
            PageType::Broken => {
                p.mark_broken(gfn)?;
                stats.broken_pages += 1;
            }
            PageType::Normal => return Err(IncomingError::Unexpected("NORMAL page without data")),
        }
    }
    if let Some((start, n, buf)) = run.take() {
        write_run(p, start, n, buf)?;
    }
    Ok(())
}

/// Reads the stream into a new machine's RAM; returns the machine's parts and its state, and
/// the connection's reader after END (a post-copy page stream follows there).
#[allow(clippy::too_many_arguments)]
fn load<R: Read>(
    stream: R,
    reply: Option<Conn>,
    local: bool,
    ram: IncomingRam,
    dirty_tracking: DirtyTracking,
    disks: &[DiskImage],
    mut opts: LoadOptions,
    listen: Option<&crate::channels::ChannelListener<'_>>,
    stall: Duration,
) -> Result<(Pending, crate::records::Loaded, IncomingStats, BufReader<R>), IncomingError> {
    if let IncomingRam::Fresh(Some(m)) = &ram {
        opts.memory = Some(*m);
    }
    if let IncomingRam::Prefaulted(r) = &ram {
        opts.memory = Some(r.size());
    }
    // A small buffer: a page batch's body is then mostly read straight into the reader's record
    // buffer (BufReader passes reads larger than its buffer through) instead of being copied
    // twice; small records still come many per read.
    let mut r = StreamReader::new(BufReader::with_capacity(64 << 10, stream)).map_err(LoadError::Stream)?;
    let mut sink = MigrationSink {
        ram: Some(ram),
        dirty_tracking,
        disks,
        listen,
        stall,
        channels: None,
        pending: None,
        idle_copy: None,
        phase: std::sync::Arc::new(ReceivePhase::new(local)),
        stats: IncomingStats::default(),
        storage: crate::storage::StorageReceiver::new(disks),
        reply,
        final_pass: false,
    };
    let loaded = match load_records(&mut r, StreamKind::Migration, &opts, &mut sink) {
        Ok(l) => l,
        Err(e) => {
            // A failed channel shuts the main connection: its error is the one that explains.
            return Err(sink.channels.take().and_then(|c| c.first_error()).unwrap_or(e));
        }
    };
    let t_end = Instant::now();
    let mut stats = sink.stats;
    stats.bytes = loaded.bytes;
    let channels = sink.channels.take();
    let mut p = sink.pending.take().ok_or(LoadError::NoConfig("END"))?;
    if let Some(c) = channels {
        // Every channel's pages are in before the state is loaded (the source ended them all
        // before it sent the state); what they wrote and found broken joins the load's.
        for out in c.join()? {
            for (ri, w) in out.written.iter().enumerate() {
                p.written[ri].or_words(w.words());
            }
            for gfn in out.broken {
                p.mark_broken(gfn)?;
            }
            stats.bytes += out.bytes;
            stats.normal_pages += out.normal;
            stats.zero_pages += out.zero;
            stats.broken_pages += out.broken_entries;
            tracing::debug!("page channel {}: {} bytes", out.index, out.bytes);
        }
    }
    // Without post-copy, guest memory is ordinary from here; with it, the fault handler takes
    // the userfaultfd over.
    if p.postcopy.is_none() {
        if let Some(mut u) = p.uffd.take() {
            u.unregister_all().map_err(IncomingError::Uffd)?;
        }
    }
    stats.load = t_end.elapsed();
    Ok((p, loaded, stats, r.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(ram: &GuestRam, page: u64) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE];
        ram.read(page * PAGE_SIZE as u64, &mut b).unwrap();
        b
    }

    /// A run over missing pages and one that exists although this load never wrote it: every
    /// page ends up holding the run's data and is marked written.
    #[test]
    fn fill_missing_fills_holes_and_copies_into_existing_pages() {
        let ram = GuestRam::new(4 << 20).unwrap();
        // Before registering: a registered missing page must never be touched.
        ram.write(2 * PAGE_SIZE as u64, &[0xee; PAGE_SIZE]).unwrap();
        let mut u = match Uffd::new() {
            Ok(u) => u,
            Err(e) => {
                eprintln!("SKIPPED: no userfaultfd here ({e}): the destination falls back to plain copies");
                return;
            }
        };
        let r = ram.regions()[0];
        u.register(r.host_addr, r.size).unwrap();
        let mut written = Bitmap::new(r.size / PAGE_SIZE as u64, false);
        let data: Vec<u8> = (0..6).flat_map(|p| vec![p as u8 + 1; PAGE_SIZE]).collect();
        // Pages 0..6: 2 exists, the others are holes.
        fill_missing(&u, &mut written, r.host_addr as *mut u8, 0, &data).unwrap();
        // A second run of holes only, further on.
        fill_missing(&u, &mut written, (r.host_addr + 10 * PAGE_SIZE as u64) as *mut u8, 10, &data[..PAGE_SIZE])
            .unwrap();
        u.unregister_all().unwrap();
        for p in 0..6 {
            assert_eq!(page_of(&ram, p), vec![p as u8 + 1; PAGE_SIZE], "page {p}");
            assert!(written.get(p), "page {p} not marked written");
        }
        assert_eq!(page_of(&ram, 10), vec![1; PAGE_SIZE]);
        assert!(written.get(10));
        assert_eq!(written.count(), 7);
        assert_eq!(page_of(&ram, 6), vec![0; PAGE_SIZE], "a page outside both runs changed");
    }
}
