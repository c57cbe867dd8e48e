//! The pre-copy engine (source side).
//!
//! Iteration 1 sends every page (pages in memfd holes or full of zeros as ZERO, without data);
//! each later iteration sends what the guest dirtied meanwhile. Before each iteration the engine
//! syncs the dirty log and estimates the pause the remaining dirty set would cost at the
//! bandwidth measured in the previous iteration; when that fits the downtime limit it pauses the
//! vCPUs, sends the last dirty pages and all machine state, and waits for the destination's ACK.
//!
//! Failure at any point leaves the source running: the vCPU pause is a guard that resumes on
//! drop, harvested-but-unsent dirty bits are given back, and the migration's dirty-log consumer
//! is unregistered (other consumers keep their bits).

use ferry_stream::fault;
use std::io::BufWriter;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_stream::{MachineConfig, PageType, StreamFlags, StreamHeader, StreamWriter, PAGE_SIZE};
use ferry_vmm::dirty_log::{Bitmap, ConsumerId, Initial};
use ferry_vmm::Vm;
use serde::Serialize;

use crate::protocol::{self, ProtocolError};
use crate::transport::{cancelled_io, Conn, StallWatch, TransportError, Uri, SEND_POLL};

/// Pages per PAGE_BATCH record.
const BATCH_PAGES: usize = 512;
/// Below this estimated pause Ferry stops iterating (if the limit allows).
const TARGET_DOWNTIME_MS: f64 = 1.0;
/// An iteration that leaves more than this fraction of the previous dirty set has stalled.
const STALL_RATIO: f64 = 0.7;
/// Pages per batch after the first pass.
const LATE_BATCH_PAGES: usize = 64;
/// Pages harvested (and cleared in KVM) at a time.
const HARVEST_PAGES: u64 = 16384;

/// Errors of an outgoing migration. The source keeps running after every one of them.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot reach the destination")]
    Transport(#[from] TransportError),
    #[error("sending the stream failed (destination gone?)")]
    Send(#[source] ferry_stream::StreamError),
    #[error("the destination did not complete the handover")]
    Handover(#[from] ProtocolError),
    #[error("the handshake with the destination failed")]
    Handshake(#[source] ProtocolError),
    #[error("the machine")]
    Vm(#[from] ferry_vmm::vm::VmError),
    #[error(
        "migration did not converge after {iterations} iterations: {pending_mib:.1} MiB still dirty would take \
         {estimate_ms:.0} ms at {bandwidth_mib_s:.1} MiB/s, over the {limit_ms} ms downtime limit \
         (raise --downtime-ms or --max-bandwidth, or use --force-switchover)"
    )]
    NotConverged { iterations: u32, pending_mib: f64, estimate_ms: f64, bandwidth_mib_s: f64, limit_ms: u64 },
    #[error("migration cancelled")]
    Cancelled,
    #[error("copying the disks")]
    Storage(#[from] crate::storage::StorageError),
    #[error("--copy-storage: the machine has no disk to copy")]
    NoDisks,
    #[error("the destination took no data for {secs:.1} s (the stall timeout; {unread} bytes still queued to it)")]
    Stalled { secs: f64, unread: u64 },
    #[error("reading guest memory at {gpa:#x} failed")]
    Memory {
        gpa: u64,
        #[source]
        source: ferry_vmm::memory::MemoryError,
    },
    /// After COMMIT, no COMMITTED came, and the destination is known not to run the guest (it
    /// never took the disk lock the source holds again, or its process is gone): the guest
    /// resumes here.
    #[error("the destination did not confirm the handover and does not hold the guest; it resumes here")]
    NotConfirmed(#[source] ProtocolError),
    /// After COMMIT, no COMMITTED came, and nothing tells whether the destination runs the guest
    /// (no writable disk whose lock would say, a destination on another host): the guest stays
    /// paused here, neither lost nor run twice, for the operator to resume here (only if the
    /// destination is known not to run it) or to quit.
    #[error(
        "the destination did not confirm the handover, and it may be running the guest: the guest stays paused \
         here. Resume it here (ferry's `resume`) only if the destination is known not to run it; otherwise quit"
    )]
    HandoverUnknown(#[source] ProtocolError),
    #[error("the destination does not serve post-copy (a Ferry without it)")]
    NoPostcopy,
    #[error("the destination (Ferry {0}) does not read zstd-compressed pages: migrate to it without --compress")]
    NoCompression(String),
    #[error("zstd compression could not be set up")]
    Compression(#[source] ferry_stream::StreamError),
    #[error("the destination (Ferry {0}) does not take page channels: migrate to it without --channels")]
    NoChannels(String),
    #[error("--channels {0}: 1 to {max} connections", max = ferry_stream::MAX_CHANNELS)]
    ChannelCount(u32),
    #[error("--channels and --postcopy do not go together yet: the post-copy page stream has one connection")]
    ChannelsWithPostcopy,
    #[error("page channel {index} failed")]
    Channel {
        index: u32,
        #[source]
        source: Box<MigrateError>,
    },
    #[error("its thread ended after an earlier failure")]
    ChannelGone,
    #[error(transparent)]
    DirtyLimit(#[from] crate::dirty_limit::DirtyLimitError),
    #[error("post-copy: {} page(s) still here are too scattered for one POSTCOPY record", .0)]
    PostcopyTooScattered(u64),
    /// The guest runs on the destination; `pending` holds what it is still owed, for
    /// `migrate-resume`.
    #[error("post-copy interrupted")]
    PostcopyInterrupted {
        #[source]
        error: crate::postcopy::PostcopyError,
        pending: Box<crate::postcopy::PostcopySource>,
    },
}

/// What the caller asks for.
#[derive(Debug, Clone)]
pub struct MigrateParams {
    pub to: Uri,
    pub downtime_limit: Duration,
    /// Bytes per second; `None` = as fast as the link goes.
    pub max_bandwidth: Option<NonZeroU64>,
    pub max_iterations: u32,
    pub force_switchover: bool,
    /// Throttle the vCPUs when the dirty set stops shrinking (see [`crate::throttle`]).
    pub auto_converge: bool,
    /// Fail the migration when the destination takes no stream data for this long (it stopped
    /// reading: hung, stopped, or a dead link that does not reset).
    pub stall_timeout: Duration,
    /// Send the disks' blocks too (the destination writes them into its own images).
    pub copy_storage: bool,
    /// Mutual TLS on a tcp: destination (crate::tls).
    pub tls: Option<std::sync::Arc<crate::tls::Tls>>,
    /// Switch to post-copy (crate::postcopy) instead of stopping for the last pass.
    pub postcopy: Option<crate::postcopy::PostcopyMode>,
    /// Compress page data in the migration stream (not in a post-copy's page stream).
    pub compress: Option<Compression>,
    /// Connections that carry page data (channels.rs); 1: the main connection only.
    pub channels: u32,
    /// Per-vCPU dirty-rate limit in MiB/s (crate::dirty_limit), applied instead of the
    /// whole-machine throttle once pre-copy stalls. Needs the dirty ring.
    pub dirty_limit: Option<NonZeroU64>,
}

/// Page-data compression on the wire (`ferry migrate --compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// zstd at `level` (1 is fastest; negative levels are faster still and compress less).
    Zstd { level: i32 },
}

/// What compression did to the page data of a migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompressionStats {
    pub level: i32,
    /// Data-page bytes (NORMAL pages) sent, before and after compression.
    pub page_bytes: u64,
    pub wire_bytes: u64,
    /// page_bytes / wire_bytes.
    pub ratio: f64,
}

/// Default for [`MigrateParams::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until the destination has read everything sent on `conn`; fails with
/// [`MigrateError::Stalled`] when the count of bytes it has not taken stops falling for
/// `stall`, or with [`MigrateError::Cancelled`].
pub(crate) fn wait_read(conn: &Conn, stall: Duration, cancel: &AtomicBool) -> Result<(), MigrateError> {
    let (mut last, mut since) = (u64::MAX, Instant::now());
    loop {
        let left = conn.unread_bytes().map_err(TransportError::Setup)?;
        if left == 0 {
            return Ok(());
        }
        if cancel.load(Ordering::SeqCst) {
            return Err(MigrateError::Cancelled);
        }
        if left < last {
            (last, since) = (left, Instant::now());
        } else if since.elapsed() >= stall {
            return Err(MigrateError::Stalled { secs: stall.as_secs_f64(), unread: left });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// One pre-copy iteration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IterationStats {
    pub iteration: u32,
    /// Pages dirty at the start of the iteration (all pages for the first one).
    pub pages_dirtied: u64,
    pub pages_sent: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub duration_ms: f64,
    pub bandwidth_mib_s: f64,
    /// Guest dirty rate seen at the start of this iteration (pages dirtied during the previous
    /// one, per second of it).
    pub dirty_rate_pages_s: f64,
    /// Estimated pause if the switch-over had happened at the start of this iteration.
    pub estimated_downtime_ms: f64,
    /// vCPU throttle in force during this iteration (auto-converge), in percent.
    pub throttle_percent: u32,
    /// Share of this iteration the throttle really held the vCPUs paused, in percent.
    pub throttled_percent: f64,
}

/// Where the pause went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DowntimeBreakdown {
    /// Stopping the vCPUs.
    pub pause_ms: f64,
    pub final_sync_ms: f64,
    pub final_pages: u64,
    pub final_pages_ms: f64,
    /// Saving and sending vCPU, VM-wide and device state.
    pub state_ms: f64,
    /// Destination: END received to machine ready (its own measure).
    pub dest_load_ms: f64,
    /// Of which restoring KVM state.
    pub dest_restore_ms: f64,
    /// Source: last byte sent to ACK received (transfer tail + destination load).
    pub ack_wait_ms: f64,
    /// Sending COMMIT (the destination resumes on receipt).
    pub commit_ms: f64,
}

/// Page counts by type.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PageCounts {
    pub normal: u64,
    pub zero: u64,
    pub broken: u64,
    pub discarded: u64,
}

/// The result of a completed migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationSummary {
    pub to: String,
    pub total_ms: f64,
    /// Source paused → destination's ACK received and COMMIT sent.
    pub downtime_ms: f64,
    pub setup_ms: f64,
    pub bytes: u64,
    pub pages: PageCounts,
    pub iterations: Vec<IterationStats>,
    pub downtime_breakdown: DowntimeBreakdown,
    pub downtime_limit_ms: u64,
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// Highest vCPU throttle applied (auto-converge), in percent.
    pub max_throttle_percent: u32,
    /// Disks attached to the machine.
    pub disks: u64,
    /// Disk requests popped and not completed when the disks quiesced: sent as device state.
    pub disk_in_flight_at_stop: u64,
    /// Of those, finished here after the quiesce point (not completed to the guest here).
    pub disk_completed_after_quiesce: u64,
    /// Of which writes: on disk here already, written again by the destination's replay.
    pub disk_writes_completed_after_quiesce: u64,
    /// Requests the destination reported it re-executes (its ACK).
    pub disk_replayed: u64,
    /// The source released the disk locks before COMMIT (nothing was executing any more).
    pub disk_lock_released_before_commit: bool,
    /// Broken pages handed over (sent typed BROKEN in the final pass).
    pub broken_pages: u64,
    /// Disk blocks sent (`--copy-storage`), all passes.
    pub storage: crate::storage::StorageCounts,
    /// The post-copy phase, if the migration switched to post-copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<crate::postcopy::PostcopyStats>,
    /// zstd's effect on the page data (`--compress zstd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zstd: Option<CompressionStats>,
    /// Connections that carried page data (`--channels`), and the stream bytes each carried
    /// (the main connection first).
    pub channels: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub channel_bytes: Vec<u64>,
    /// What the per-vCPU dirty-rate limit did (`--dirty-limit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_limit: Option<crate::dirty_limit::DirtyLimitStats>,
}

/// Progress reports while the migration runs.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Progress {
    Connected {
        to: String,
    },
    Iteration(IterationStats),
    Switchover {
        pending_pages: u64,
        estimated_downtime_ms: f64,
    },
    Throttle {
        percent: u32,
    },
    /// The per-vCPU dirty-rate limit took effect (`--dirty-limit`), MiB/s per vCPU.
    DirtyLimit {
        mib_s: u64,
    },
    /// The switch-over was to post-copy: these pages follow while the destination runs.
    PostcopyStarted {
        pages: u64,
    },
    Postcopy(crate::postcopy::PostcopyProgress),
}

/// Resumes the disks (completing what they held) and then the vCPUs on drop unless committed:
/// the source keeps running after any failure.
pub(crate) struct PauseGuard<'a> {
    pub(crate) vm: &'a Vm,
    pub(crate) committed: bool,
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        if !self.committed {
            match self.vm.resume_disks() {
                Ok(()) => {
                    let _ = self.vm.resume();
                }
                // Someone else holds a disk's image (a destination that did get COMMIT):
                // resuming here could run the guest twice.
                Err(e) => tracing::error!("{}: the source guest stays paused", crate::destination::ErrorChain(&e)),
            }
        }
    }
}

pub(crate) struct Sender<'a> {
    pub(crate) vm: &'a Vm,
    /// The sender's idle-class guard during pre-copy (copy_priority.rs).
    pub(crate) idle: Option<crate::copy_priority::IdleCopy>,
    /// Pages per PAGE_BATCH: large for the bulk pass, small afterwards so the destination's
    /// work behind the last byte it read stays short.
    pub(crate) batch_pages: usize,
    /// Look for memfd holes (never-written pages) before reading pages. Only the first pass
    /// needs it: afterwards every dirty bit comes from a write, so the page is not a hole.
    pub(crate) probe_holes: bool,
    pub(crate) w: StreamWriter<BufWriter<StallWatch<'a, Conn>>>,
    /// Page bytes of the batch being built (reused).
    pub(crate) pages_buf: Vec<u8>,
    pub(crate) consumer: ConsumerId,
    pub(crate) counts: PageCounts,
    pub(crate) limit: Option<NonZeroU64>,
    pub(crate) cancel: &'a AtomicBool,
    /// The disks' dirty blocks (`--copy-storage`).
    pub(crate) storage: Option<crate::storage::StorageSender<'a>>,
    /// The destination's HELLO features (0: none known, as for a replication backup).
    pub(crate) peer_features: u64,
    /// The page channels beyond the main connection (`--channels`).
    pub(crate) channels: Option<crate::channels::ChannelSet<'a>>,
    /// With channels: the chunks handed to them since their last sync (region, first page,
    /// bits), whose bits go back if a channel fails.
    pub(crate) unsynced: Vec<(usize, u64, Vec<u64>)>,
}

/// Whether a page's bytes are all zero.
pub(crate) fn is_zero(p: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: reinterpreting initialized bytes as u64 words (align_to handles alignment).
        unsafe { p.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Copies the page at `gpa` into `slot` (one page) unless it is broken, and says what it is:
/// NORMAL (data in `slot`), ZERO (all zero), or BROKEN (known broken, never read; or it broke
/// while it was copied, which the copy catches and the poison set records).
pub(crate) fn copy_page(
    ram: &ferry_vmm::memory::GuestRam,
    gpa: u64,
    slot: &mut [u8],
) -> Result<PageType, ferry_vmm::memory::MemoryError> {
    if ram.is_poisoned(gpa) {
        return Ok(PageType::Broken);
    }
    match ram.copy_out(gpa, slot) {
        Ok(()) if !is_zero(slot) => Ok(PageType::Normal),
        Ok(()) => Ok(PageType::Zero),
        Err(ferry_vmm::memory::MemoryError::Poisoned { .. }) => Ok(PageType::Broken),
        Err(e) => Err(e),
    }
}

impl Sender<'_> {
    /// Waits until the destination has read everything written so far (see [`wait_read`]).
    pub(crate) fn drain(&mut self) -> Result<(), MigrateError> {
        let cancel = self.cancel;
        let sw = self.w.get_mut().get_ref();
        wait_read(&sw.conn, sw.stall, cancel)?;
        match &self.channels {
            Some(c) => c.drain(cancel),
            None => Ok(()),
        }
    }

    /// Stream bytes written so far, all connections (channels as of their last sync).
    pub(crate) fn bytes_written(&self) -> u64 {
        self.w.bytes_written() + self.channels.as_ref().map_or(0, |c| c.bytes())
    }

    /// Page data bytes before and after compression, all connections.
    pub(crate) fn page_bytes(&self) -> ferry_stream::PageBytes {
        let m = self.w.page_bytes();
        match &self.channels {
            Some(c) => {
                let o = c.page_bytes();
                ferry_stream::PageBytes { raw: m.raw + o.raw, wire: m.wire + o.wire }
            }
            None => m,
        }
    }

    /// With channels: waits until every channel has written what it was given, and adds what
    /// they sent to the counts. Returns (normal, zero) pages they sent.
    fn sync_channels(&mut self) -> Result<(u64, u64), MigrateError> {
        let Some(c) = self.channels.as_mut() else { return Ok((0, 0)) };
        let r = c.sync();
        self.settle_channels(r)
    }

    /// Ends every channel (END) after the final pass.
    fn end_channels(&mut self) -> Result<(), MigrateError> {
        let Some(c) = self.channels.as_mut() else { return Ok(()) };
        let r = c.end();
        self.settle_channels(r).map(|_| ())
    }

    fn settle_channels(
        &mut self,
        r: Result<crate::channels::SentPages, MigrateError>,
    ) -> Result<(u64, u64), MigrateError> {
        match r {
            Ok(p) => {
                self.unsynced.clear();
                self.counts.normal += p.normal;
                self.counts.zero += p.zero;
                self.counts.broken += p.broken;
                Ok((p.normal, p.zero))
            }
            Err(e) => {
                // Not known to have been sent: the bits go back.
                self.give_back_unsynced();
                Err(e)
            }
        }
    }

    /// Harvests and sends every page the consumer has pending. Returns (pages sent, bytes).
    pub(crate) fn send_pending(
        &mut self,
        iter_start: Instant,
        iter_bytes_start: u64,
    ) -> Result<(u64, u64, u64), MigrateError> {
        let ram = self.vm.ram();
        let mut sent = 0;
        let (mut normal, mut zero) = (0, 0);
        for (ri, region) in ram.regions().iter().enumerate() {
            let npages = region.size / PAGE_SIZE as u64;
            // The first pass probes each chunk for holes right after harvesting it: the
            // harvest cleared the chunk's bits in KVM, so a hole the guest fills after the
            // probe is dirty again (with KVM_DIRTY_LOG_INITIALLY_SET nothing is write-protected
            // before its first clear).
            let probe = self.probe_holes && ram.memfd_backs(ri);
            let mut first = 0;
            while first < npages {
                let count = HARVEST_PAGES.min(npages - first);
                if self.cancel.load(Ordering::SeqCst) {
                    self.give_back_unsynced();
                    return Err(MigrateError::Cancelled);
                }
                let bits = match self.vm.dirty_harvest(self.consumer, ri, first, count) {
                    Ok(b) => b,
                    Err(e) => {
                        self.give_back_unsynced();
                        return Err(e.into());
                    }
                };
                if bits.iter().all(|&w| w == 0) {
                    first += count;
                    continue;
                }
                let data = if probe {
                    match ram.data_pages(ri, first, count) {
                        Ok(d) => Some(d),
                        Err(source) => {
                            let _ = self.vm.dirty_give_back(self.consumer, ri, first, &bits);
                            self.give_back_unsynced();
                            return Err(MigrateError::Memory { gpa: region.gpa + first * PAGE_SIZE as u64, source });
                        }
                    }
                } else {
                    None
                };
                if self.channels.is_some() {
                    self.unsynced.push((ri, first, bits.clone()));
                }
                let res = self.send_chunk(ri, first, &bits, data.as_ref(), iter_start, iter_bytes_start);
                match res {
                    Ok((n, z)) => {
                        normal += n;
                        zero += z;
                        sent += n + z;
                    }
                    Err(e) => {
                        // Nothing of this chunk is known to have arrived: the bits go back
                        // (with channels, those of every chunk since their last sync).
                        if self.channels.is_some() {
                            self.give_back_unsynced();
                        } else {
                            let _ = self.vm.dirty_give_back(self.consumer, ri, first, &bits);
                        }
                        return Err(e);
                    }
                }
                first += count;
            }
        }
        let (n, z) = self.sync_channels()?;
        Ok((sent + n + z, normal + n, zero + z))
    }

    /// The bits of every chunk handed to the channels since their last sync go back.
    fn give_back_unsynced(&mut self) {
        for (ri, first, bits) in std::mem::take(&mut self.unsynced) {
            let _ = self.vm.dirty_give_back(self.consumer, ri, first, &bits);
        }
    }

    /// Sends the pages set in `bits` (pages `first + i` of region `ri`); pages not set in `data`
    /// (if given; same indexing, `GuestRam::data_pages`) are holes of the memfd and go as ZERO
    /// without being read. With channels, each channel's shards go to its thread and this
    /// thread sends channel 0's. Returns the (normal, zero) pages this thread sent.
    fn send_chunk(
        &mut self,
        ri: usize,
        first: u64,
        bits: &[u64],
        data: Option<&Bitmap>,
        iter_start: Instant,
        iter_bytes_start: u64,
    ) -> Result<(u64, u64), MigrateError> {
        let ram = self.vm.ram();
        let region = ram.regions()[ri];
        let mut pages_buf = std::mem::take(&mut self.pages_buf);
        let batch_pages = self.batch_pages;
        let idle_applied = self.idle.as_ref().is_some_and(|i| i.applied());
        let (idle, cancel) = (&mut self.idle, self.cancel);
        let share = self.channels.as_ref().map_or(1, |c| c.count());
        let limit = self.limit.and_then(|l| NonZeroU64::new(l.get() / u64::from(share)).or(Some(l)));
        let mut after = |w: &mut StreamWriter<_>| -> Result<(), MigrateError> {
            if let Some(i) = idle.as_mut() {
                i.watch();
            }
            // Keep the iteration's average rate at the limit (this connection's share).
            crate::channels::pace(limit, w.bytes_written().saturating_sub(iter_bytes_start), iter_start, cancel)
        };
        let mut out = crate::channels::SentPages::default();
        let r = (|| -> Result<(), MigrateError> {
            match self.channels.as_mut() {
                None => {
                    out = crate::channels::send_pages(
                        ram,
                        &mut self.w,
                        &mut pages_buf,
                        batch_pages,
                        ri,
                        first,
                        bits,
                        data.map(|d| (d, first)),
                        &mut after,
                    )?;
                }
                Some(c) => {
                    let pass = crate::channels::Pass { start: iter_start, limit, idle: idle_applied, batch_pages };
                    let own = c.dispatch(ri, region.gpa / PAGE_SIZE as u64, first, bits, data, pass)?;
                    for (f, words) in &own {
                        out += crate::channels::send_pages(
                            ram,
                            &mut self.w,
                            &mut pages_buf,
                            batch_pages,
                            ri,
                            *f,
                            words,
                            data.map(|d| (d, first)),
                            &mut after,
                        )?;
                    }
                }
            }
            Ok(())
        })();
        self.pages_buf = pages_buf;
        self.counts.normal += out.normal;
        self.counts.zero += out.zero;
        self.counts.broken += out.broken;
        r.map(|()| (out.normal, out.zero))
    }

    /// Sends every page the poison set holds, typed BROKEN: whatever the destination got for
    /// them before (data sent before they broke, seed 001 case B.II; or nothing yet), it marks
    /// them broken, so the guest there sees exactly the pages the source knew broken.
    pub(crate) fn send_broken_pages(&mut self) -> Result<u64, MigrateError> {
        let broken = self.vm.ram().poison().list();
        let mut entries: Vec<(u64, PageType)> = Vec::with_capacity(self.batch_pages);
        let t = Instant::now();
        let b0 = self.w.bytes_written();
        // With channels, each frame goes on its own channel, after its data.
        let gfns: Vec<u64> = broken.iter().map(|&(g, _)| g).collect();
        let own = match self.channels.as_mut() {
            Some(c) => c.dispatch_broken(&gfns)?,
            None => gfns,
        };
        for &gfn in &own {
            entries.push((gfn, PageType::Broken));
            if entries.len() >= self.batch_pages {
                self.flush_batch(&mut entries, &[], t, b0)?;
            }
        }
        self.flush_batch(&mut entries, &[], t, b0)?;
        Ok(broken.len() as u64)
    }

    fn flush_batch(
        &mut self,
        entries: &mut Vec<(u64, PageType)>,
        pages: &[u8],
        iter_start: Instant,
        iter_bytes_start: u64,
    ) -> Result<(), MigrateError> {
        if entries.is_empty() {
            return Ok(());
        }
        if let Some(i) = self.idle.as_mut() {
            i.watch();
        }
        self.w.page_batch_packed(entries, pages).map_err(MigrateError::Send)?;
        entries.clear();
        // Keep the iteration's average rate at the limit.
        crate::channels::pace(
            self.limit,
            self.w.bytes_written().saturating_sub(iter_bytes_start),
            iter_start,
            self.cancel,
        )
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Migrates `vm` to `params.to`. On success the guest runs on the destination and the caller
/// must stop this machine without resuming it; on error the source guest is running.
pub fn migrate(
    vm: &Vm,
    params: &MigrateParams,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationSummary, MigrateError> {
    let t_start = Instant::now();
    fault::disarm();
    if params.channels == 0 || params.channels > ferry_stream::MAX_CHANNELS {
        return Err(MigrateError::ChannelCount(params.channels));
    }
    if params.channels > 1 && params.postcopy.is_some() {
        return Err(MigrateError::ChannelsWithPostcopy);
    }
    // Before the destination is reached: a limit this machine cannot keep is refused at once.
    if params.dirty_limit.is_some() && vm.dirty_ring_stats().is_none() {
        return Err(crate::dirty_limit::DirtyLimitError::NoRing.into());
    }
    // Bounded like every other wait on the destination (a cancel is seen once it ends).
    let mut conn = Conn::connect_with(&params.to, params.stall_timeout, params.tls.as_deref())?;
    // Both sides' stream formats and features, before anything else: an incompatible pair
    // fails here, with both ranges named, before a page is sent.
    conn.set_read_timeout(Some(SEND_POLL)).map_err(TransportError::Setup)?;
    conn.set_write_timeout(Some(SEND_POLL)).map_err(TransportError::Setup)?;
    let hs = protocol::source_handshake(&mut StallWatch::to_destination(&mut conn, cancel, params.stall_timeout));
    let theirs = match hs {
        Ok(h) => h,
        Err(e) => {
            conn.shutdown();
            return Err(if cancelled_io(&e) { MigrateError::Cancelled } else { MigrateError::Handshake(e) });
        }
    };
    fault::hit("source.connected");
    if params.postcopy.is_some() && theirs.features & protocol::features::POSTCOPY == 0 {
        conn.shutdown();
        return Err(MigrateError::NoPostcopy);
    }
    if params.compress.is_some() && theirs.features & protocol::features::ZSTD_PAGES == 0 {
        conn.shutdown();
        let (a, b, c) = theirs.ferry_version;
        return Err(MigrateError::NoCompression(format!("{a}.{b}.{c}")));
    }
    if params.channels > 1 && theirs.features & protocol::features::CHANNELS == 0 {
        conn.shutdown();
        let (a, b, c) = theirs.ferry_version;
        return Err(MigrateError::NoChannels(format!("{a}.{b}.{c}")));
    }
    let mut reply = conn.try_clone().map_err(TransportError::Setup)?;
    progress(&Progress::Connected { to: params.to.to_string() });
    let peer = theirs.features;
    let mut r = std::thread::scope(|scope| run(vm, params, cancel, progress, conn, t_start, &mut reply, peer, scope));
    // A cancel that ended a blocked send or answer wait surfaces as an I/O error: it is the
    // cancel.
    if r.as_ref().err().is_some_and(|e| cancelled_io(e)) {
        r = Err(MigrateError::Cancelled);
    }
    if r.is_err() {
        // A refusal from the destination explains a failed send better than "broken pipe" (on
        // the main connection or a page channel: a destination that refuses what came on one
        // channel closes them all): give it a moment to arrive. Then tell the destination this
        // attempt is over; it discards what it received.
        let refusal = match &r {
            Err(MigrateError::Send(_) | MigrateError::Channel { .. }) => {
                refusal(&mut reply, Duration::from_millis(500))
            }
            _ => None,
        };
        reply.shutdown();
        if let Some(refused) = refusal {
            return Err(MigrateError::Handover(refused));
        }
    }
    r
}

/// The destination's NACK, if one arrives within `wait`.
pub(crate) fn refusal(reply: &mut Conn, wait: Duration) -> Option<ProtocolError> {
    reply.set_read_timeout(Some(wait)).ok()?;
    match protocol::read_answer(reply) {
        Err(e @ ProtocolError::Refused(_)) => Some(e),
        _ => None,
    }
}

/// The convergence policy: when to stop iterating, when to throttle, when to give up. It only
/// decides; the passes and the handover act.
struct Convergence {
    limit_ms: f64,
    /// Bytes per second the last meaningful pass moved.
    bandwidth: f64,
    /// The first pass's bandwidth (a later pass far below it was starved of CPU).
    first_bandwidth: f64,
    /// Length of the last pass, in seconds.
    last_pass_secs: f64,
    /// Pages the last pass really had to send (what the next dirty set is judged against).
    last_sent: u64,
    iteration: u32,
}

/// What to do before the next pass.
enum Decision {
    /// The pause fits: stop the guest and send the rest.
    SwitchOver,
    /// Send another pass, throttling harder first if the dirty set stopped shrinking
    /// (measured dirty rate and send rate, pages per second).
    Iterate { throttle_up: Option<(f64, f64)> },
    /// Iterated as long as allowed without fitting the limit.
    GiveUp,
}

impl Convergence {
    fn new(limit: Duration) -> Self {
        Convergence {
            limit_ms: ms(limit),
            bandwidth: 0.0,
            first_bandwidth: 0.0,
            last_pass_secs: 0.0,
            last_sent: u64::MAX,
            iteration: 0,
        }
    }

    /// The pause `pending` pages would cost at the measured bandwidth.
    fn estimate_ms(&self, pending: u64) -> f64 {
        if self.bandwidth > 0.0 {
            pending as f64 * PAGE_SIZE as f64 / self.bandwidth * 1000.0
        } else {
            f64::INFINITY
        }
    }

    /// Decides with `pending` pages dirty. Switch over once the pause fits the limit and
    /// iterating more would not shrink it much: either it is already tiny, or the dirty set
    /// stopped shrinking (the guest dirties about as much per pass as a pass sends). With
    /// auto-converge a stalled dirty set is throttled down rather than accepted, until the pause
    /// is tiny or the throttle is at its maximum.
    fn decide(&mut self, pending: u64, can_throttle: bool, params: &MigrateParams) -> Decision {
        self.iteration += 1;
        let estimate_ms = self.estimate_ms(pending);
        let tiny = estimate_ms <= self.limit_ms.min(TARGET_DOWNTIME_MS);
        let stalled = pending as f64 >= self.last_sent as f64 * STALL_RATIO;
        if self.iteration > 1 && estimate_ms <= self.limit_ms && (tiny || (stalled && !can_throttle)) {
            return Decision::SwitchOver;
        }
        if self.iteration > params.max_iterations {
            return if params.force_switchover { Decision::SwitchOver } else { Decision::GiveUp };
        }
        let throttle_up =
            (self.iteration > 1 && stalled).then(|| (self.dirty_rate(pending), self.bandwidth / PAGE_SIZE as f64));
        Decision::Iterate { throttle_up }
    }

    /// Pages per second the guest dirtied during the last pass, if it left `pending`.
    fn dirty_rate(&self, pending: u64) -> f64 {
        if self.last_pass_secs > 0.0 {
            pending as f64 / self.last_pass_secs
        } else {
            0.0
        }
    }

    /// Takes a pass's measurements. Returns whether the pass was starved (it got less than half
    /// the first pass's bandwidth).
    fn record_pass(&mut self, sent: u64, normal: u64, bytes: u64, secs: f64) -> bool {
        // Zero pages cost almost nothing, so the first pass (every page) counts by its data
        // pages: a guest that re-dirties its whole working set stalls at once.
        self.last_sent = normal.max(sent / 8);
        self.last_pass_secs = secs;
        // Tiny passes measure latency, not bandwidth: keep the previous figure then.
        if bytes < 1 << 20 && self.bandwidth > 0.0 {
            return false;
        }
        self.bandwidth = bytes as f64 / secs;
        if self.iteration == 1 {
            self.first_bandwidth = self.bandwidth;
            return false;
        }
        self.bandwidth < self.first_bandwidth / 2.0
    }

    fn not_converged(&self, pending: u64, params: &MigrateParams) -> MigrateError {
        MigrateError::NotConverged {
            iterations: self.iteration - 1,
            pending_mib: pending as f64 * PAGE_SIZE as f64 / (1 << 20) as f64,
            estimate_ms: self.estimate_ms(pending),
            bandwidth_mib_s: self.bandwidth / (1 << 20) as f64,
            limit_ms: params.downtime_limit.as_millis() as u64,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run<'s>(
    vm: &'s Vm,
    params: &MigrateParams,
    cancel: &'s AtomicBool,
    progress: &mut dyn FnMut(&Progress),
    conn: Conn,
    t_start: Instant,
    reply: &mut Conn,
    peer_features: u64,
    scope: &'s std::thread::Scope<'s, '_>,
) -> Result<MigrationSummary, MigrateError> {
    let header = StreamHeader::new(StreamFlags::empty());
    // Sends wake every SEND_POLL while blocked (StallWatch). The reply connection shares the
    // socket, so it shares the timeout too; it is cleared before COMMIT.
    conn.set_write_timeout(Some(SEND_POLL)).map_err(TransportError::Setup)?;
    let conn = StallWatch::to_destination(conn, cancel, params.stall_timeout);
    let mut w = StreamWriter::new(BufWriter::with_capacity(1 << 20, conn), &header).map_err(MigrateError::Send)?;
    if let Some(Compression::Zstd { level }) = params.compress {
        w.compress_pages(level).map_err(MigrateError::Compression)?;
    }
    let registered = vm.dirty_consumer("migration", Initial::AllDirty)?;
    let mut s = Sender {
        vm,
        idle: None,
        batch_pages: BATCH_PAGES,
        probe_holes: true,
        w,
        pages_buf: Vec::new(),
        consumer: registered.id(),
        counts: PageCounts::default(),
        limit: params.max_bandwidth,
        cancel,
        storage: None,
        peer_features,
        channels: None,
        unsynced: Vec::new(),
    };
    let ram = vm.ram();
    let config = MachineConfig {
        memory_bytes: ram.size(),
        vcpus: vm.vcpu_count(),
        regions: ram.regions().iter().map(|r| (r.gpa, r.size)).collect(),
    };
    s.w.machine_config(&config).map_err(MigrateError::Send)?;
    s.w.cpu_model(vm.cpu_model()).map_err(MigrateError::Send)?;
    if params.channels > 1 {
        // Before any page: the destination takes the other connections of this session now.
        let session = crate::postcopy::new_session();
        s.w.channels(params.channels, session).map_err(MigrateError::Send)?;
        s.w.flush().map_err(MigrateError::Send)?;
        s.channels = Some(crate::channels::ChannelSet::open(scope, vm, params, cancel, params.channels, session)?);
    }
    if params.copy_storage {
        if vm.disks().is_empty() {
            return Err(MigrateError::NoDisks);
        }
        s.w.disk_config(&crate::storage::disk_config(vm)).map_err(MigrateError::Send)?;
        s.storage = Some(crate::storage::StorageSender::start(vm, "migration")?);
    }
    let mut summary = MigrationSummary {
        to: params.to.to_string(),
        setup_ms: ms(t_start.elapsed()),
        downtime_limit_ms: params.downtime_limit.as_millis() as u64,
        memory_bytes: ram.size(),
        vcpus: vm.vcpu_count(),
        disks: vm.disks().len() as u64,
        channels: params.channels.max(1),
        ..Default::default()
    };
    // A per-vCPU dirty-rate limit replaces the whole-machine throttle.
    let mut limiter = match params.dirty_limit {
        Some(l) => Some(crate::dirty_limit::DirtyLimiter::start(scope, vm, l.get())?),
        None => None,
    };
    let mut throttle = (params.auto_converge && limiter.is_none()).then(|| crate::throttle::start(scope, vm));
    let brakes = Brakes { throttle: throttle.as_ref(), limiter: limiter.as_ref() };
    let post = precopy(&mut s, params, brakes, &mut summary, progress)?;
    // The limit ends before the pause (its last hold runs out by itself).
    summary.dirty_limit = limiter.as_mut().map(|l| l.stop());
    // Taken before COMMIT: nothing after it may fail but the post-copy's link itself.
    let serve_conn = if post { Some(reply.try_clone().map_err(TransportError::Setup)?) } else { None };
    let early = if post { Some(list_owed_early(&mut s, params, reply)?) } else { None };
    let owed = handover(&mut s, params, throttle.as_mut(), reply, &mut summary, early)?;
    drop(throttle);
    drop(limiter);
    if let (Some(mut pc), Some(conn)) = (owed, serve_conn) {
        // The guest runs on the destination now: serve it the pages it is still owed.
        progress(&Progress::PostcopyStarted { pages: pc.left() });
        let served = pc.serve(vm, conn, &mut |p| progress(&Progress::Postcopy(p.clone())));
        summary.bytes += pc.stats.bytes;
        summary.postcopy = Some(pc.stats.clone());
        if let Err(error) = served {
            return Err(MigrateError::PostcopyInterrupted { error, pending: Box::new(pc) });
        }
    }
    summary.total_ms = ms(t_start.elapsed());
    Ok(summary)
}

/// What slows a guest that dirties faster than the link sends: the whole-machine throttle
/// (auto-converge) or the per-vCPU dirty-rate limit, at most one of them.
#[derive(Clone, Copy, Default)]
pub(crate) struct Brakes<'b, 'a> {
    pub(crate) throttle: Option<&'b crate::throttle::Throttle<'a>>,
    pub(crate) limiter: Option<&'b crate::dirty_limit::DirtyLimiter<'a>>,
}

/// The passes while the guest runs, until the policy says switch over (or gives up). Returns
/// whether the switch-over is to post-copy.
pub(crate) fn precopy(
    s: &mut Sender<'_>,
    params: &MigrateParams,
    brakes: Brakes<'_, '_>,
    summary: &mut MigrationSummary,
    progress: &mut dyn FnMut(&Progress),
) -> Result<bool, MigrateError> {
    let (throttle, limiter) = (brakes.throttle, brakes.limiter);
    use crate::postcopy::PostcopyMode;
    let vm = s.vm;
    let mut policy = Convergence::new(params.downtime_limit);
    // Pre-copy runs in the idle class where there is a spare CPU (copy_priority.rs); it returns
    // to normal priority when starved in a pass, or when a later pass gets less than half the
    // first pass's bandwidth.
    let disk_threads = vm.disks().iter().map(|d| d.image().spec().busy_threads()).sum();
    s.idle = Some(crate::copy_priority::IdleCopy::enter(vm.vcpu_count(), disk_threads));
    loop {
        vm.dirty_sync()?;
        // Disk blocks are page-sized: they count as pages for the estimate.
        let pending = vm.dirty_pending(s.consumer)? + s.storage.as_ref().map_or(0, |st| st.pending());
        let estimate_ms = policy.estimate_ms(pending);
        let can_throttle = throttle.is_some_and(|t| t.can_step_up()) || limiter.is_some_and(|l| !l.engaged());
        let decision = policy.decide(pending, can_throttle, params);
        // Post-copy instead of a stop-and-copy: after the passes asked for (unless the pause
        // would be tiny anyway), or (auto) once pre-copy is seen not to converge.
        let tiny = estimate_ms <= policy.limit_ms.min(TARGET_DOWNTIME_MS);
        let post = match (params.postcopy, &decision) {
            (Some(PostcopyMode::After(n)), _) => policy.iteration > n.max(1) && !tiny,
            (Some(PostcopyMode::Auto), Decision::GiveUp) => true,
            (Some(PostcopyMode::Auto), Decision::Iterate { throttle_up: Some(_) }) => policy.iteration > 1,
            _ => false,
        };
        if post {
            progress(&Progress::Switchover { pending_pages: pending, estimated_downtime_ms: estimate_ms });
            return Ok(true);
        }
        match decision {
            Decision::SwitchOver => {
                progress(&Progress::Switchover { pending_pages: pending, estimated_downtime_ms: estimate_ms });
                return Ok(false);
            }
            Decision::GiveUp => return Err(policy.not_converged(pending, params)),
            Decision::Iterate { throttle_up } => {
                if let Some((dirty, send)) = throttle_up {
                    if let Some(pct) = throttle.and_then(|t| t.step_up(dirty, send)) {
                        summary.max_throttle_percent = pct;
                        progress(&Progress::Throttle { percent: pct });
                    }
                    if let Some(l) = limiter.filter(|l| !l.engaged()) {
                        l.engage(policy.iteration);
                        progress(&Progress::DirtyLimit { mib_s: params.dirty_limit.map_or(0, NonZeroU64::get) });
                    }
                }
            }
        }
        let t0 = Instant::now();
        let b0 = s.bytes_written();
        let p0 = s.page_bytes();
        let off0 = throttle.map(|t| t.off_total());
        let (sent, normal, zero) = s.send_pending(t0, s.w.bytes_written())?;
        if let Some(st) = s.storage.as_mut() {
            summary.storage += st.send(&mut s.w)?;
        }
        s.probe_holes = false;
        s.batch_pages = LATE_BATCH_PAGES;
        s.w.flush().map_err(MigrateError::Send)?;
        // Let the destination take in what was sent before measuring and deciding: the pause
        // must not include the tail of an earlier pass sitting in socket buffers.
        s.drain()?;
        let secs = t0.elapsed().as_secs_f64().max(1e-6);
        let bytes = s.bytes_written() - b0;
        let dirty_rate = policy.dirty_rate(pending);
        // The pause is estimated from pages at their raw size: with compression, the pass's
        // bandwidth counts the bytes its pages would have taken.
        let p1 = s.page_bytes();
        let saved = (p1.raw - p0.raw).saturating_sub(p1.wire - p0.wire);
        if policy.record_pass(sent, normal, bytes + saved, secs) && s.idle.as_ref().is_some_and(|i| i.applied()) {
            // Starved: other threads want the spare CPUs.
            drop(s.idle.take());
        }
        let stats = IterationStats {
            iteration: policy.iteration,
            pages_dirtied: pending,
            pages_sent: sent,
            normal_pages: normal,
            zero_pages: zero,
            bytes,
            duration_ms: secs * 1000.0,
            bandwidth_mib_s: bytes as f64 / secs / (1 << 20) as f64,
            dirty_rate_pages_s: dirty_rate,
            estimated_downtime_ms: if estimate_ms.is_finite() { estimate_ms } else { 0.0 },
            throttle_percent: throttle.map_or(0, |t| t.percent()),
            throttled_percent: match (throttle, off0) {
                (Some(t), Some(o)) => (t.off_total().saturating_sub(o).as_secs_f64() / secs * 100.0).min(100.0),
                _ => 0.0,
            },
        };
        progress(&Progress::Iteration(stats.clone()));
        summary.iterations.push(stats);
    }
}

/// The switch-over: stop the guest (a throttle ends with it paused), quiesce the disks, send
/// the last dirty pages (or, for post-copy, the list of them) and the machine's state, wait for
/// the ACK, pass the disk locks, COMMIT. Until COMMIT is sent, any failure resumes the guest
/// here (the pause guard) with its dirty bits given back. Returns, for post-copy, the pages the
/// destination is still owed.
fn handover(
    s: &mut Sender<'_>,
    params: &MigrateParams,
    throttle: Option<&mut crate::throttle::Throttle<'_>>,
    reply: &mut Conn,
    summary: &mut MigrationSummary,
    postcopy: Option<(u64, Vec<Bitmap>)>,
) -> Result<Option<crate::postcopy::PostcopySource>, MigrateError> {
    let vm = s.vm;
    // The final pass runs at normal priority.
    drop(s.idle.take());
    let t_pause = Instant::now();
    let mut guard = PauseGuard { vm, committed: false };
    // A console line the guest is in the middle of printing stays in the serial state and
    // comes out whole from the destination (or from here, if the guest resumes here), never
    // half from each process.
    match throttle {
        Some(t) => t.stop_paused()?,
        None => vm.pause_keep_output()?,
    }
    // Disks stop taking and completing requests before the last sync, so every used-ring write
    // they made is in it; what is in flight goes to the destination as device state.
    summary.disk_in_flight_at_stop = vm.quiesce_disks()?;
    // Pages armed to break in the final pass (tests of seed 001's paused-pass cases).
    vm.poison_armed_pages()?;
    fault::hit("source.final-pass.paused");
    let mut bd = DowntimeBreakdown { pause_ms: ms(t_pause.elapsed()), ..Default::default() };
    // Tells the destination the pause has begun (it leaves the idle class for the final pass).
    s.w.final_pass().map_err(MigrateError::Send)?;
    let t = Instant::now();
    vm.dirty_sync()?;
    bd.final_sync_ms = ms(t.elapsed());
    let t = Instant::now();
    let b0 = s.w.bytes_written();
    s.limit = None;
    if let Some((session, early)) = postcopy {
        let consumer = s.consumer;
        let give_back = |owed: &[Bitmap]| {
            for (ri, m) in owed.iter().enumerate() {
                let _ = vm.dirty_give_back(consumer, ri, 0, m.words());
            }
        };
        // What the guest dirtied since the early list: listed now, in the pause (mostly pages
        // listed already, whose data the destination dropped then).
        let late = match s.harvest_owed() {
            Ok(l) => l,
            Err(e) => {
                give_back(&early);
                return Err(e);
            }
        };
        let mut owed = early.clone();
        let mut new = late.clone();
        for (ri, (o, n)) in owed.iter_mut().zip(new.iter_mut()).enumerate() {
            o.or_words(late[ri].words());
            for p in early[ri].iter_set() {
                n.clear(p);
            }
        }
        let r = finish_handover(s, params, reply, summary, bd, (t_pause, t), Some((&new, session)));
        if r.is_err() {
            // Nothing of these pages reached the destination: their bits go back.
            give_back(&owed);
        }
        r?;
        guard.committed = true;
        let pc = crate::postcopy::PostcopySource::new(session, owed, params.stall_timeout, params.max_bandwidth);
        return Ok(Some(pc));
    }
    let (final_pages, _, _) = s.send_pending(t, b0)?;
    fault::hit("source.final-pass.pages-sent");
    bd.final_pages = final_pages;
    let r = finish_handover(s, params, reply, summary, bd, (t_pause, t), None);
    // Not known to be ours, not known to be theirs: the guest stays paused here.
    guard.committed = matches!(r, Ok(()) | Err(MigrateError::HandoverUnknown(_)));
    r?;
    Ok(None)
}

/// The switch-over after the last pages: disk blocks, broken pages, (post-copy) the pages still
/// owed, state, END, ACK, the disk locks, COMMIT.
fn finish_handover(
    s: &mut Sender<'_>,
    params: &MigrateParams,
    reply: &mut Conn,
    summary: &mut MigrationSummary,
    mut bd: DowntimeBreakdown,
    (t_pause, t): (Instant, Instant),
    owed: Option<(&Vec<Bitmap>, u64)>,
) -> Result<(), MigrateError> {
    let (vm, cancel) = (s.vm, s.cancel);
    // The disks are quiesced: what the guest wrote is all in their logs now. Requests still
    // executing are in the device state and written again by the destination.
    if let Some(st) = s.storage.as_mut() {
        summary.storage += st.send(&mut s.w)?;
    }
    // The final re-check of page types (seed 001, step 8): every page known broken now goes
    // again as BROKEN, including those that broke after their data was sent.
    summary.broken_pages = s.send_broken_pages()?;
    // Every channel has sent its last pages (END): the destination loads the state only after
    // it has read them all.
    s.end_channels()?;
    if let Some((owed, session)) = owed {
        // A page that broke since the harvest went as BROKEN just now: it is not owed.
        let mut listed = owed.clone();
        for (gfn, _) in vm.ram().poison().list() {
            if let Some((ri, page)) = vm.ram().page_location(gfn * PAGE_SIZE as u64) {
                listed[ri].clear(page);
            }
        }
        let runs = crate::postcopy::runs_of(vm.ram().regions(), &listed);
        if runs.len() > ferry_stream::MAX_POSTCOPY_RUNS as usize {
            return Err(MigrateError::PostcopyTooScattered(owed.iter().map(Bitmap::count).sum()));
        }
        s.w.postcopy(session, &runs).map_err(MigrateError::Send)?;
    }
    bd.final_pages_ms = ms(t.elapsed());

    let t = Instant::now();
    crate::records::write_sections(&mut s.w, &vm.save_state()?.sections()).map_err(MigrateError::Send)?;
    s.w.end().map_err(MigrateError::Send)?;
    s.w.flush().map_err(MigrateError::Send)?;
    fault::hit("source.end-sent");
    bd.state_ms = ms(t.elapsed());

    let t = Instant::now();
    // The tail of the stream in socket buffers (it must keep moving), then the destination's
    // load: an answer that does not come within the stall timeout after the destination read
    // END fails the migration (the guest resumes here).
    s.drain()?;
    reply.set_read_timeout(Some(SEND_POLL)).map_err(TransportError::Setup)?;
    let ack = protocol::read_answer(&mut StallWatch::to_destination(&mut *reply, cancel, params.stall_timeout))?;
    let acked_at = Instant::now();
    fault::hit("source.ack-received");
    bd.ack_wait_ms = ms(t.elapsed());
    bd.dest_load_ms = ack.load_us as f64 / 1000.0;
    bd.dest_restore_ms = ack.restore_us as f64 / 1000.0;
    if cancel.load(Ordering::SeqCst) {
        return Err(MigrateError::Cancelled);
    }
    summary.disk_replayed = ack.disk_replay;
    (summary.disk_completed_after_quiesce, summary.disk_writes_completed_after_quiesce) = vm.disks_held();
    // The image locks pass now if nothing of ours still executes (the destination then replays
    // before its vCPUs run); otherwise right after COMMIT, once our requests finished.
    summary.disk_lock_released_before_commit = vm.disks_try_release();
    fault::hit("source.disk-locks-released");
    let t = Instant::now();
    // COMMIT is a few bytes into a drained socket: a plain blocking send.
    reply.set_write_timeout(None).map_err(TransportError::Setup)?;
    protocol::send_commit(reply).map_err(ProtocolError::Io)?;
    fault::hit("source.commit-sent");
    bd.commit_ms = ms(t.elapsed());
    if !summary.disk_lock_released_before_commit && !vm.disks_release_when_idle(Duration::from_secs(60)) {
        tracing::warn!("a disk request still executes 60 s after the handover; the lock passes when Ferry exits");
    }
    if owed.is_none() && s.peer_features & protocol::features::COMMIT_CONFIRM != 0 {
        // The token lock settles who holds the guest only when the destination saw our lock on
        // the same image (images copied by the stream are its own files).
        let token = !params.copy_storage && ack.flags & protocol::ACK_TOKEN_LOCK_SEEN != 0;
        confirm_handover(vm, reply, acked_at, token)?;
    }
    let (held, writes) = vm.disks_held();
    summary.disk_completed_after_quiesce = summary.disk_completed_after_quiesce.max(held);
    summary.disk_writes_completed_after_quiesce = summary.disk_writes_completed_after_quiesce.max(writes);
    summary.downtime_ms = ms(t_pause.elapsed());
    summary.downtime_breakdown = bd;
    summary.bytes = s.bytes_written();
    summary.pages = s.counts;
    if let Some(c) = &s.channels {
        summary.channel_bytes = std::iter::once(s.w.bytes_written()).chain(c.bytes_by_channel()).collect();
    }
    if let Some(Compression::Zstd { level }) = params.compress {
        let p = s.page_bytes();
        summary.zstd = Some(CompressionStats {
            level,
            page_bytes: p.raw,
            wire_bytes: p.wire,
            ratio: if p.wire > 0 { p.raw as f64 / p.wire as f64 } else { 1.0 },
        });
    }
    Ok(())
}

/// After COMMIT (COMMIT_CONFIRM): waits for the destination's COMMITTED. Without it, finds out
/// who holds the guest: the token (the first writable disk's image lock, when the destination
/// saw ours on the same image: `token`), taken back here, means the destination never will (it
/// takes that lock before anything else, only until its deadline after the ACK, and runs
/// nothing without it); a destination process that is gone (a UNIX peer) runs nothing either.
/// Then the guest resumes here ([`MigrateError::NotConfirmed`]). A token the destination holds
/// means it runs the guest (success). Nothing to tell by: [`MigrateError::HandoverUnknown`],
/// the guest stays paused. A destination that stays silent on an open connection is waited for
/// until its deadline has passed, so that it cannot take the token after this side did.
fn confirm_handover(vm: &Vm, reply: &mut Conn, acked_at: Instant, token: bool) -> Result<(), MigrateError> {
    // Not cancellable: a cancel cannot undo a COMMIT.
    let never = AtomicBool::new(false);
    let deadline = acked_at + crate::destination::COMMIT_LOCK_WAIT + Duration::from_secs(5);
    let silence = deadline.saturating_duration_since(Instant::now());
    let e = match reply
        .set_read_timeout(Some(SEND_POLL))
        .map_err(ProtocolError::Io)
        .and_then(|()| protocol::read_committed(&mut StallWatch::to_destination(&mut *reply, &never, silence)))
    {
        Ok(()) => {
            fault::hit("source.committed-received");
            return Ok(());
        }
        Err(e) => e,
    };
    tracing::warn!("the destination did not confirm COMMIT: {}", crate::destination::ErrorChain(&e));
    // A destination that is dying closes its connection and lets its locks go in no fixed
    // order: a token still held is looked at again for two seconds. One that lives and holds
    // it runs the guest, and keeps it.
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        match token.then(|| vm.disks_take_back_token()).flatten() {
            Some(true) => return Err(MigrateError::NotConfirmed(e)),
            Some(false) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
            Some(false) => {
                tracing::warn!("the destination holds the disk lock: the guest runs there");
                return Ok(());
            }
            None => break,
        }
    }
    // A UNIX peer that just closed may still be exiting: look for a moment. A TCP peer's
    // process cannot be seen from here (Conn::peer_gone): no point in waiting for it.
    let until = Instant::now() + Duration::from_secs(1);
    if matches!(reply, Conn::Unix(_)) {
        loop {
            if reply.peer_gone() {
                return Err(MigrateError::NotConfirmed(e));
            }
            if Instant::now() > until {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Err(MigrateError::HandoverUnknown(e))
}

/// Post-copy, before the pause: lists every page dirty now as owed (a POSTCOPY record), so that
/// the destination drops their stale data while the guest still runs here, and waits until it
/// has. Returns the session and the pages listed (their bits are given back on failure).
fn list_owed_early(
    s: &mut Sender<'_>,
    params: &MigrateParams,
    reply: &mut Conn,
) -> Result<(u64, Vec<Bitmap>), MigrateError> {
    let (vm, cancel) = (s.vm, s.cancel);
    vm.dirty_sync()?;
    let owed = s.harvest_owed()?;
    let session = crate::postcopy::new_session();
    let r = (|| -> Result<(), MigrateError> {
        let runs = crate::postcopy::runs_of(vm.ram().regions(), &owed);
        if runs.len() > ferry_stream::MAX_POSTCOPY_RUNS as usize {
            return Err(MigrateError::PostcopyTooScattered(owed.iter().map(Bitmap::count).sum()));
        }
        s.w.postcopy(session, &runs).map_err(MigrateError::Send)?;
        s.w.flush().map_err(MigrateError::Send)?;
        reply.set_read_timeout(Some(SEND_POLL)).map_err(TransportError::Setup)?;
        protocol::read_postcopy_listed(
            &mut StallWatch::to_destination(&mut *reply, cancel, params.stall_timeout),
            session,
        )?;
        Ok(())
    })();
    if let Err(e) = r {
        for (ri, m) in owed.iter().enumerate() {
            let _ = vm.dirty_give_back(s.consumer, ri, 0, m.words());
        }
        return Err(e);
    }
    Ok((session, owed))
}

impl Sender<'_> {
    /// Post-copy's switch: harvests every page still dirty into per-region bitmaps (cleared in
    /// KVM; given back by the caller on failure). Broken pages are not owed: they go as
    /// BROKEN in the final pass.
    fn harvest_owed(&mut self) -> Result<Vec<Bitmap>, MigrateError> {
        let ram = self.vm.ram();
        let mut owed = Vec::with_capacity(ram.regions().len());
        for (ri, region) in ram.regions().iter().enumerate() {
            let npages = region.size / PAGE_SIZE as u64;
            let mut words = Vec::with_capacity(npages.div_ceil(64) as usize);
            let mut first = 0;
            while first < npages {
                let count = HARVEST_PAGES.min(npages - first);
                match self.vm.dirty_harvest(self.consumer, ri, first, count) {
                    Ok(bits) => words.extend(bits),
                    Err(e) => {
                        // Give back what was harvested so far, this region and the earlier ones.
                        let _ = self.vm.dirty_give_back(self.consumer, ri, 0, &words);
                        for (rj, m) in owed.iter().enumerate() {
                            let _ = self.vm.dirty_give_back(self.consumer, rj, 0, Bitmap::words(m));
                        }
                        return Err(e.into());
                    }
                }
                first += count;
            }
            let mut m = Bitmap::new(npages, false);
            m.or_words(&words);
            for (gfn, _) in ram.poison().list() {
                if let Some((rj, page)) = ram.page_location(gfn * PAGE_SIZE as u64) {
                    if rj == ri {
                        m.clear(page);
                    }
                }
            }
            owed.push(m);
        }
        Ok(owed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_sees_one_non_zero_byte_anywhere() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[3] = 9;
        assert!(!is_zero(&p));
    }
    #[test]
    fn wait_read_returns_once_read_and_fails_when_the_peer_stops_reading() {
        use std::io::{Read, Write};
        let no_cancel = AtomicBool::new(false);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut a = Conn::Unix(a);
        a.write_all(&[7u8; 4096]).unwrap();
        // Nobody reads: the unread count stops falling.
        let t = Instant::now();
        match wait_read(&a, Duration::from_millis(300), &no_cancel) {
            Err(MigrateError::Stalled { unread, .. }) => assert!(unread > 0),
            other => panic!("expected a stall, got {other:?}"),
        }
        assert!(t.elapsed() >= Duration::from_millis(300));
        // A cancel ends the wait at once.
        let cancel = AtomicBool::new(true);
        assert!(matches!(wait_read(&a, Duration::from_secs(60), &cancel), Err(MigrateError::Cancelled)));
        // The peer reads it all: done.
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let mut buf = [0u8; 4096];
            b.read_exact(&mut buf).unwrap();
            b
        });
        wait_read(&a, Duration::from_secs(5), &no_cancel).unwrap();
        drop(reader.join().unwrap());
    }
}
