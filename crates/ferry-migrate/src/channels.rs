//! Page channels: page data over several connections (`ferry migrate --channels N`), so that
//! copying, compressing, sending, receiving, checking and writing pages use more than one CPU
//! on each side (QEMU's multifd, Cloud Hypervisor's multi-connection migration).
//!
//! The main connection carries the stream as always. Its CHANNELS record (right after
//! CPU_MODEL, before any page) names a random session and the count N; the source then opens
//! N - 1 more connections to the same URI, each starting with a CHANNEL_HELLO (session, index)
//! and then a stream of its own (header flag CHANNEL) of page batches only, ended by END.
//!
//! **Order without sync points.** Guest frames are sharded by 2 MiB: frame `gfn` always goes on
//! channel `(gfn >> 9) % N` (channel 0 is the main connection), in every pass, including its
//! BROKEN entries of the final re-check. So every send of one page travels on one connection,
//! in order, and a later pass's data can never be overtaken by an earlier pass's on another
//! connection. The destination checks that each frame came on its channel. The source ends
//! every channel (END) after the final pass, before the main stream's state; the destination
//! loads the state only once every channel has reached its END, so no page is missing when the
//! vCPUs start.
//!
//! **Work on the source.** The main sender harvests the dirty log (the clear in KVM comes before
//! any read, as with one channel) and probes for holes; it hands each channel thread its shards
//! of the chunk and sends shard 0 itself. A channel thread copies its pages out of guest RAM,
//! compresses them (`--compress`), and writes them. At the end of each pass every channel
//! reports (a sync through its queue) and the pass waits until the destination has read every
//! connection, as it does for one.
//!
//! **Failure.** Any channel failing fails the migration as a failed main connection does: the
//! guest resumes on the source, the dirty bits of every chunk not known sent are given back,
//! and all connections are shut so the destination discards what it got.
//!
//! **Work on the destination.** Each channel thread reads, checks and decompresses its stream
//! and writes the pages into guest RAM (filling missing pages with `UFFDIO_COPY` through its
//! own handle on the userfaultfd). Which pages it wrote and which came BROKEN are merged into
//! the load when it ends; the BROKEN ones are poisoned then, by the main thread.

use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Read, Write};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_stream::{channel_of, PageBytes, PageType, Record, StreamFlags, StreamHeader, StreamReader, StreamWriter};
use ferry_stream::{FORMAT_VERSION, PAGE_SIZE};
use ferry_vmm::dirty_log::Bitmap;
use ferry_vmm::memory::{GuestRam, RamRegion};
use ferry_vmm::poison::PoisonSet;
use ferry_vmm::uffd::Uffd;
use ferry_vmm::Vm;

use crate::destination::{apply_pages, IncomingError, PageTarget, ReceivePhase};
use crate::protocol::{ChannelHello, CHANNEL_HELLO_LEN};
use crate::source::{MigrateError, MigrateParams};
use crate::transport::{Conn, StallWatch, TransportError, SEND_POLL};

/// The stream writer of one connection.
pub(crate) type ConnWriter<'a> = StreamWriter<BufWriter<StallWatch<'a, Conn>>>;

/// What the senders of one migration did, summed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SentPages {
    pub(crate) normal: u64,
    pub(crate) zero: u64,
    pub(crate) broken: u64,
}

impl std::ops::AddAssign for SentPages {
    fn add_assign(&mut self, o: SentPages) {
        self.normal += o.normal;
        self.zero += o.zero;
        self.broken += o.broken;
    }
}

/// Copies the pages set in `bits` (bit `i` is page `first + i` of region `ri`) into page
/// batches of at most `batch_pages` entries on `w`. Pages that `data` (a hole probe of the
/// chunk starting at its second field; `GuestRam::data_pages`) does not hold are holes of the
/// memfd and go as ZERO without being read; broken pages go as BROKEN, never read. Each data
/// page is copied out of guest RAM once, into `pages_buf`, which then goes to the socket as it
/// is; a page the guest changes after its copy is dirty again and sent in a later pass.
/// `after_batch` runs after every batch written (pacing, the idle-class watch).
#[allow(clippy::too_many_arguments)]
pub(crate) fn send_pages<W: Write>(
    ram: &GuestRam,
    w: &mut StreamWriter<W>,
    pages_buf: &mut Vec<u8>,
    batch_pages: usize,
    ri: usize,
    first: u64,
    bits: &[u64],
    data: Option<(&Bitmap, u64)>,
    after_batch: &mut dyn FnMut(&mut StreamWriter<W>) -> Result<(), MigrateError>,
) -> Result<SentPages, MigrateError> {
    let region = ram.regions()[ri];
    // A page past the probed range (none is) counts as data: read, never assumed zero.
    let in_data = |page: u64| data.is_none_or(|(d, d0)| page < d0 || d.get(page - d0) || page - d0 >= d.npages());
    let mut entries: Vec<(u64, PageType)> = Vec::with_capacity(batch_pages);
    // The buffer keeps its size (zeroed once); `used` bytes of it from `base`, the first
    // page-aligned byte, hold this batch's pages (page_aligned_offset says why).
    pages_buf.resize(pages_buf.len().max(batch_pages * PAGE_SIZE + PAGE_SIZE), 0);
    let base = ferry_stream::page_aligned_offset(pages_buf);
    let mut used = 0usize;
    let mut out = SentPages::default();
    let pages = bits.iter().enumerate().flat_map(|(w, &word)| {
        (0..64u64).filter(move |b| word & (1 << b) != 0).map(move |b| first + w as u64 * 64 + b)
    });
    for page in pages {
        let gpa = region.gpa + page * PAGE_SIZE as u64;
        let gfn = gpa / PAGE_SIZE as u64;
        // A broken page is never read (a hole can be broken too); one that breaks while it is
        // copied is caught by the copy and joins the set (docs/poison.md).
        let ty = if in_data(page) || ram.is_poisoned(gpa) {
            let slot = &mut pages_buf[base + used..base + used + PAGE_SIZE];
            crate::source::copy_page(ram, gpa, slot).map_err(|source| MigrateError::Memory { gpa, source })?
        } else {
            PageType::Zero
        };
        if ty == PageType::Normal {
            used += PAGE_SIZE;
        }
        entries.push((gfn, ty));
        match ty {
            PageType::Normal => out.normal += 1,
            PageType::Broken => out.broken += 1,
            _ => out.zero += 1,
        }
        if entries.len() >= batch_pages {
            w.page_batch_packed(&entries, &pages_buf[base..base + used]).map_err(MigrateError::Send)?;
            entries.clear();
            used = 0;
            after_batch(w)?;
        }
    }
    if !entries.is_empty() {
        w.page_batch_packed(&entries, &pages_buf[base..base + used]).map_err(MigrateError::Send)?;
        after_batch(w)?;
    }
    Ok(out)
}

/// Sleeps as needed to keep `bytes` sent since `start` at `limit` bytes per second, in slices
/// of at most [`SEND_POLL`] so that a cancel ends the wait.
pub(crate) fn pace(
    limit: Option<NonZeroU64>,
    bytes: u64,
    start: Instant,
    cancel: &AtomicBool,
) -> Result<(), MigrateError> {
    let Some(limit) = limit else { return Ok(()) };
    let due = start + Duration::from_secs_f64(bytes as f64 / limit.get() as f64);
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(MigrateError::Cancelled);
        }
        let left = due.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(SEND_POLL));
    }
}

/// A pass as the channel threads see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pass {
    /// When it began (pacing counts from here).
    pub(crate) start: Instant,
    /// This channel's share of the bandwidth limit.
    pub(crate) limit: Option<NonZeroU64>,
    /// Whether the copy runs in the idle class now (copy_priority.rs).
    pub(crate) idle: bool,
    pub(crate) batch_pages: usize,
}

/// Work for a channel thread.
enum Work {
    /// Region `ri`'s pages set in each `(first page, words)` segment; the chunk's hole probe.
    Pages { ri: usize, segments: Vec<(u64, Vec<u64>)>, data: Option<(Arc<Bitmap>, u64)>, pass: Pass },
    /// The final re-check: these frames go as BROKEN.
    Broken(Vec<u64>),
    /// Flush and report.
    Sync,
    /// END, flush and report; the thread ends.
    End,
}

/// A channel thread's report: what it sent since its last report, and its totals.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Report {
    pub(crate) pages: SentPages,
    pub(crate) bytes: u64,
    pub(crate) page_bytes: PageBytes,
}

struct Worker {
    index: u32,
    work: SyncSender<Work>,
    reports: Receiver<Result<Report, MigrateError>>,
    /// For waiting until the destination read everything, and for shutting it on failure.
    conn: Conn,
    last: Report,
}

/// The source's extra channels (1 to count - 1) of one migration.
pub(crate) struct ChannelSet<'a> {
    count: u32,
    workers: Vec<Worker>,
    stall: Duration,
    cancel: &'a AtomicBool,
    /// Set by a channel thread when it fails: the main sender stops handing out work and
    /// fetches the error at once instead of at the end of the pass.
    failed: Arc<AtomicBool>,
}

/// Queued work items per channel: enough to keep a channel busy while the main sender
/// harvests the next chunk, few enough that a failure is seen soon.
const QUEUE: usize = 2;

impl<'a> ChannelSet<'a> {
    /// Opens channels 1 to `count - 1` of `session` to `params.to` and starts their threads in
    /// `scope`. The main stream's CHANNELS record must already be sent.
    pub(crate) fn open<'s: 'a>(
        scope: &'s std::thread::Scope<'s, '_>,
        vm: &'s Vm,
        params: &MigrateParams,
        cancel: &'s AtomicBool,
        count: u32,
        session: u64,
    ) -> Result<ChannelSet<'a>, MigrateError> {
        let failed = Arc::new(AtomicBool::new(false));
        let mut set =
            ChannelSet { count, workers: Vec::new(), stall: params.stall_timeout, cancel, failed: failed.clone() };
        let disk_threads = vm.disks().iter().map(|d| d.image().spec().busy_threads()).sum();
        for index in 1..count {
            let conn = Conn::connect_with(&params.to, params.stall_timeout, params.tls.as_deref())
                .map_err(|e| MigrateError::Channel { index, source: Box::new(e.into()) })?;
            let ch = (|| -> Result<(ConnWriter<'s>, Conn), MigrateError> {
                conn.set_read_timeout(Some(SEND_POLL)).map_err(TransportError::Setup)?;
                conn.set_write_timeout(Some(SEND_POLL)).map_err(TransportError::Setup)?;
                let keep = conn.try_clone().map_err(TransportError::Setup)?;
                let mut sw = StallWatch::to_destination(conn, cancel, params.stall_timeout);
                sw.write_all(&ChannelHello { session, index, count }.encode())
                    .map_err(|e| MigrateError::Send(ferry_stream::StreamError::Write(e)))?;
                let header = StreamHeader::new(StreamFlags::CHANNEL);
                let mut w =
                    StreamWriter::new(BufWriter::with_capacity(1 << 20, sw), &header).map_err(MigrateError::Send)?;
                if let Some(crate::source::Compression::Zstd { level }) = params.compress {
                    w.compress_pages(level).map_err(MigrateError::Compression)?;
                }
                Ok((w, keep))
            })();
            let (w, keep) = ch.map_err(|e| MigrateError::Channel { index, source: Box::new(e) })?;
            let (work_tx, work_rx) = sync_channel(QUEUE);
            let (report_tx, report_rx) = sync_channel(1);
            let ctx = ThreadCtx { ram: vm.ram(), vcpus: vm.vcpu_count(), disk_threads, cancel, failed: failed.clone() };
            let spawned = std::thread::Builder::new()
                .name(format!("channel-{index}"))
                .spawn_scoped(scope, move || channel_thread(ctx, w, work_rx, report_tx));
            if let Err(e) = spawned {
                keep.shutdown();
                return Err(MigrateError::Channel { index, source: Box::new(TransportError::Setup(e).into()) });
            }
            set.workers.push(Worker { index, work: work_tx, reports: report_rx, conn: keep, last: Report::default() });
        }
        Ok(set)
    }

    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// Splits a harvested chunk (`bits` from page `first` of region `ri`, whose frames start at
    /// `region_gfn`) by channel: queues each channel's segments and returns channel 0's.
    pub(crate) fn dispatch(
        &mut self,
        ri: usize,
        region_gfn: u64,
        first: u64,
        bits: &[u64],
        data: Option<&Bitmap>,
        pass: Pass,
    ) -> Result<Vec<(u64, Vec<u64>)>, MigrateError> {
        self.check()?;
        let mut per: Vec<Vec<(u64, Vec<u64>)>> = vec![Vec::new(); self.count as usize];
        // Segments of consecutive words on one channel. A word's 64 frames share a shard: the
        // chunk and the region start on 64-frame boundaries (checked here, not assumed).
        let aligned = (region_gfn + first).is_multiple_of(64);
        for (wi, &word) in bits.iter().enumerate() {
            if word == 0 {
                continue;
            }
            let page = first + wi as u64 * 64;
            if !aligned {
                // Page by page (no layout Ferry makes gets here).
                for b in (0..64).filter(|b| word & (1u64 << b) != 0) {
                    let c = channel_of(region_gfn + page + b, self.count) as usize;
                    per[c].push((page + b, vec![1]));
                }
                continue;
            }
            let c = channel_of(region_gfn + page, self.count) as usize;
            match per[c].last_mut() {
                Some((f, words)) if *f + words.len() as u64 * 64 == page => words.push(word),
                _ => per[c].push((page, vec![word])),
            }
        }
        let data = data.map(|d| (Arc::new(d.clone()), first));
        let mut own = Vec::new();
        for (c, segments) in per.into_iter().enumerate() {
            if c == 0 {
                own = segments;
                continue;
            }
            if segments.is_empty() {
                continue;
            }
            self.send(c - 1, Work::Pages { ri, segments, data: data.clone(), pass })?;
        }
        Ok(own)
    }

    /// Queues `work` for worker `i`, waiting while its queue is full (a cancel or a channel's
    /// failure ends the wait).
    fn send(&mut self, i: usize, mut work: Work) -> Result<(), MigrateError> {
        use std::sync::mpsc::TrySendError;
        loop {
            match self.workers[i].work.try_send(work) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(_)) => return Err(self.gone(i)),
                Err(TrySendError::Full(w)) => work = w,
            }
            if self.cancel.load(Ordering::SeqCst) {
                return Err(MigrateError::Cancelled);
            }
            if self.failed.load(Ordering::SeqCst) {
                return self.check();
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// A channel that failed: its error, fetched now.
    fn check(&mut self) -> Result<(), MigrateError> {
        if !self.failed.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Every thread answers a sync; the failed one with its error.
        self.collect(|| Work::Sync).map(|_| ())?;
        Err(MigrateError::ChannelGone)
    }

    /// Queues each frame of `gfns` on its channel as BROKEN; returns channel 0's.
    pub(crate) fn dispatch_broken(&mut self, gfns: &[u64]) -> Result<Vec<u64>, MigrateError> {
        self.check()?;
        let mut per: Vec<Vec<u64>> = vec![Vec::new(); self.count as usize];
        for &g in gfns {
            per[channel_of(g, self.count) as usize].push(g);
        }
        let own = std::mem::take(&mut per[0]);
        for (c, list) in per.into_iter().enumerate().skip(1) {
            if !list.is_empty() {
                self.send(c - 1, Work::Broken(list))?;
            }
        }
        Ok(own)
    }

    fn gone(&self, i: usize) -> MigrateError {
        MigrateError::Channel { index: self.workers[i].index, source: Box::new(MigrateError::ChannelGone) }
    }

    fn collect(&mut self, what: fn() -> Work) -> Result<SentPages, MigrateError> {
        use std::sync::mpsc::{RecvTimeoutError, TrySendError};
        // Every thread is asked before any answer is awaited (they flush in parallel); a full
        // queue is waited out (a cancel ends the wait, a failed thread drops its work).
        for i in 0..self.workers.len() {
            let mut work = what();
            loop {
                match self.workers[i].work.try_send(work) {
                    Ok(()) => break,
                    Err(TrySendError::Disconnected(_)) => return Err(self.gone(i)),
                    Err(TrySendError::Full(w)) => work = w,
                }
                if self.cancel.load(Ordering::SeqCst) {
                    return Err(MigrateError::Cancelled);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let mut sum = SentPages::default();
        let mut first_err = None;
        for i in 0..self.workers.len() {
            let index = self.workers[i].index;
            let r = loop {
                match self.workers[i].reports.recv_timeout(SEND_POLL) {
                    Ok(r) => break Some(r),
                    Err(RecvTimeoutError::Disconnected) => break None,
                    // The threads see a cancel themselves (their sends and pacing watch it).
                    Err(RecvTimeoutError::Timeout) => {}
                }
            };
            match r {
                Some(Ok(r)) => {
                    sum += r.pages;
                    self.workers[i].last = r;
                }
                Some(Err(MigrateError::ChannelGone)) if first_err.is_some() => {}
                Some(Err(e)) => {
                    first_err.get_or_insert(MigrateError::Channel { index, source: Box::new(e) });
                }
                None => {
                    first_err.get_or_insert(self.gone(i));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(sum),
        }
    }

    /// Every channel has written out what it was given: what they sent since the last sync.
    pub(crate) fn sync(&mut self) -> Result<SentPages, MigrateError> {
        self.collect(|| Work::Sync)
    }

    /// Every channel writes END: what they sent since the last sync.
    pub(crate) fn end(&mut self) -> Result<SentPages, MigrateError> {
        self.collect(|| Work::End)
    }

    /// Bytes the channels wrote, as of their last reports.
    pub(crate) fn bytes(&self) -> u64 {
        self.workers.iter().map(|w| w.last.bytes).sum()
    }

    /// Page data bytes, before and after compression, as of the channels' last reports.
    pub(crate) fn page_bytes(&self) -> PageBytes {
        self.workers.iter().fold(PageBytes::default(), |a, w| PageBytes {
            raw: a.raw + w.last.page_bytes.raw,
            wire: a.wire + w.last.page_bytes.wire,
        })
    }

    /// Bytes each channel wrote (1 to count - 1).
    pub(crate) fn bytes_by_channel(&self) -> Vec<u64> {
        self.workers.iter().map(|w| w.last.bytes).collect()
    }

    /// Waits until the destination has read everything sent on every channel.
    pub(crate) fn drain(&self, cancel: &AtomicBool) -> Result<(), MigrateError> {
        for w in &self.workers {
            crate::source::wait_read(&w.conn, self.stall, cancel)
                .map_err(|e| MigrateError::Channel { index: w.index, source: Box::new(e) })?;
        }
        Ok(())
    }
}

impl Drop for ChannelSet<'_> {
    /// Ends the threads (their queues close) and, unless every channel ended, shuts the
    /// connections so that the destination discards what it got.
    fn drop(&mut self) {
        for w in &self.workers {
            w.conn.shutdown();
        }
    }
}

/// What a channel thread works with.
struct ThreadCtx<'a> {
    ram: &'a GuestRam,
    vcpus: u32,
    disk_threads: u32,
    cancel: &'a AtomicBool,
    failed: Arc<AtomicBool>,
}

/// A channel thread: sends what it is given until END or its queue closes. After a failure it
/// takes no more work, says so (`failed`), and reports the failure at the next sync.
fn channel_thread(
    ctx: ThreadCtx<'_>,
    mut w: ConnWriter<'_>,
    work: Receiver<Work>,
    reports: SyncSender<Result<Report, MigrateError>>,
) {
    let ThreadCtx { ram, vcpus, disk_threads, cancel, failed: failed_flag } = ctx;
    let fail = |e: MigrateError| {
        failed_flag.store(true, Ordering::SeqCst);
        Some(e)
    };
    let mut idle: Option<crate::copy_priority::IdleCopy> = None;
    let mut failed: Option<MigrateError> = None;
    let mut pages_buf = Vec::new();
    let mut since = SentPages::default();
    // The pass being paced, and this channel's bytes when it began.
    let mut pacing: Option<(Instant, u64)> = None;
    let report = |w: &ConnWriter<'_>, since: &mut SentPages| Report {
        pages: std::mem::take(since),
        bytes: w.bytes_written(),
        page_bytes: w.page_bytes(),
    };
    while let Ok(item) = work.recv() {
        match item {
            Work::Pages { .. } | Work::Broken(_) if failed.is_some() => {}
            Work::Pages { ri, segments, data, pass } => {
                match (pass.idle, idle.is_some()) {
                    (true, false) => idle = Some(crate::copy_priority::IdleCopy::enter(vcpus, disk_threads)),
                    (false, true) => idle = None,
                    _ => {}
                }
                let (start, b0) = match pacing {
                    Some((s, b)) if s == pass.start => (s, b),
                    _ => (pass.start, w.bytes_written()),
                };
                pacing = Some((start, b0));
                let mut after = |w: &mut ConnWriter<'_>| {
                    if let Some(i) = idle.as_mut() {
                        i.watch();
                    }
                    pace(pass.limit, w.bytes_written().saturating_sub(b0), start, cancel)
                };
                let d = data.as_ref().map(|(b, f)| (&**b, *f));
                for (first, words) in &segments {
                    match send_pages(ram, &mut w, &mut pages_buf, pass.batch_pages, ri, *first, words, d, &mut after) {
                        Ok(s) => since += s,
                        Err(e) => {
                            failed = fail(e);
                            break;
                        }
                    }
                }
            }
            Work::Broken(gfns) => {
                for chunk in gfns.chunks(ferry_stream::MAX_BATCH_PAGES as usize) {
                    let entries: Vec<(u64, PageType)> = chunk.iter().map(|&g| (g, PageType::Broken)).collect();
                    if let Err(e) = w.page_batch_packed(&entries, &[]) {
                        failed = fail(MigrateError::Send(e));
                        break;
                    }
                }
            }
            Work::Sync | Work::End => {
                let end = matches!(item, Work::End);
                let r = match failed.take() {
                    Some(e) => Err(e),
                    None => (|| {
                        if end {
                            w.end().map_err(MigrateError::Send)?;
                        }
                        w.flush().map_err(MigrateError::Send)?;
                        Ok(report(&w, &mut since))
                    })(),
                };
                if r.is_err() {
                    // Reported once; anything after it fails too.
                    failed = fail(MigrateError::ChannelGone);
                }
                if reports.send(r).is_err() || end {
                    break;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The destination's side.

/// Where a destination takes its channel connections from (the listener the main connection
/// came in on, and who may connect).
pub struct ChannelListener<'a> {
    pub listener: &'a crate::transport::Listener,
    pub uri: &'a crate::transport::Uri,
    pub admit: &'a crate::transport::Admission,
    /// Bytes read on every channel (the main connection's stall watch counts them as life).
    pub activity: Arc<AtomicU64>,
}

/// What one channel brought, merged into the load when it ends.
pub(crate) struct ChannelOut {
    pub(crate) index: u32,
    pub(crate) bytes: u64,
    pub(crate) normal: u64,
    pub(crate) zero: u64,
    pub(crate) broken_entries: u64,
    /// Per region: pages this channel wrote.
    pub(crate) written: Vec<Bitmap>,
    /// Frames that came BROKEN (poisoned by the main thread at the merge).
    pub(crate) broken: Vec<u64>,
}

/// A channel's share of the incoming machine: the frames of its shard. Its region addresses
/// point into guest RAM that the load keeps mapped until every channel thread has been joined
/// (`ChannelsIn` is joined, or dropped, before the machine is used or dropped); it writes only
/// the frames of its own shard, which no other thread writes, and no vCPU runs before the load
/// ends.
struct ChannelTarget {
    regions: Vec<RamRegion>,
    written: Vec<Bitmap>,
    uffd: Option<Uffd>,
    poison: Arc<PoisonSet>,
    broken: HashSet<u64>,
    index: u32,
    count: u32,
}

impl PageTarget for ChannelTarget {
    fn locate(&self, gfn: u64) -> Result<(*mut u8, usize, u64), IncomingError> {
        if channel_of(gfn, self.count) != self.index {
            return Err(IncomingError::WrongChannel { gfn, channel: self.index, count: self.count });
        }
        let gpa = gfn.checked_mul(PAGE_SIZE as u64).ok_or(IncomingError::PageOutside(gfn))?;
        let (ri, r) = self
            .regions
            .iter()
            .enumerate()
            .find(|(_, r)| gpa >= r.gpa && gpa - r.gpa < r.size)
            .ok_or(IncomingError::PageOutside(gfn))?;
        let off = gpa - r.gpa;
        Ok(((r.host_addr + off) as *mut u8, ri, off / PAGE_SIZE as u64))
    }

    fn is_broken(&self, gfn: u64) -> bool {
        self.broken.contains(&gfn) || self.poison.contains(gfn)
    }

    fn fill_state(&mut self, ri: usize) -> (&mut Bitmap, Option<&Uffd>) {
        (&mut self.written[ri], self.uffd.as_ref())
    }

    fn mark_broken(&mut self, gfn: u64) -> Result<(), IncomingError> {
        let (_, ri, page) = self.locate(gfn)?;
        self.broken.insert(gfn);
        self.written[ri].clear(page);
        Ok(())
    }
}

/// A channel connection's reads: waits out quiet spells (a channel may have nothing to carry
/// for a whole pass while the main connection works) until told to stop; counts what arrives.
struct ChannelRead {
    conn: Conn,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    /// All channels' bytes (ChannelListener::activity).
    activity: Arc<AtomicU64>,
}

impl Read for ChannelRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::ErrorKind;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                // Not Interrupted: the stream reader retries that.
                return Err(std::io::Error::new(ErrorKind::ConnectionAborted, "the load ended"));
            }
            match self.conn.read(buf) {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Ok(n) => {
                    self.progress.fetch_add(n as u64, Ordering::Relaxed);
                    self.activity.fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

struct Running {
    index: u32,
    conn: Conn,
    progress: Arc<AtomicU64>,
    done: Receiver<()>,
    handle: std::thread::JoinHandle<Result<ChannelOut, IncomingError>>,
}

/// The destination's channel threads of one load. Dropping it stops and joins them.
pub(crate) struct ChannelsIn {
    pub(crate) count: u32,
    stop: Arc<AtomicBool>,
    running: Vec<Running>,
    stall: Duration,
}

impl ChannelsIn {
    /// Accepts the `count - 1` channel connections of `session` (waiting at most `stall` for
    /// each) and starts a thread for each, writing into `ram`. A connection that is not one of
    /// them is closed with a warning and the wait goes on. `main` is shut if a channel fails,
    /// so that the load stops at once.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn accept(
        from: &ChannelListener<'_>,
        count: u32,
        session: u64,
        ram: &GuestRam,
        uffd: Option<&Uffd>,
        main: Conn,
        stall: Duration,
        copy: CopyClass,
    ) -> Result<ChannelsIn, IncomingError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut set = ChannelsIn { count, stop: stop.clone(), running: Vec::new(), stall };
        let mut taken = vec![false; count as usize];
        taken[0] = true;
        let mut got = 1;
        // Non-blocking while the channels come in: a refused peer (another uid, a bad TLS
        // handshake) must not leave the wait blocked past its deadline.
        from.listener.set_nonblocking(true).map_err(IncomingError::ChannelAccept)?;
        struct Blocking<'l>(&'l crate::transport::Listener);
        impl Drop for Blocking<'_> {
            fn drop(&mut self) {
                let _ = self.0.set_nonblocking(false);
            }
        }
        let _blocking = Blocking(from.listener);
        while got < count {
            let deadline = Instant::now() + stall;
            let conn = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let ready = from.listener.wait_readable(left).map_err(IncomingError::ChannelAccept)?;
                if !ready {
                    return Err(IncomingError::ChannelsMissing { got, count, secs: stall.as_secs_f64() });
                }
                let mut conn = match from.listener.accept_with(from.uri, from.admit) {
                    Ok(c) => c,
                    Err(crate::transport::TransportError::Accept { source, .. })
                        if source.kind() == std::io::ErrorKind::WouldBlock =>
                    {
                        continue;
                    }
                    Err(e) => return Err(IncomingError::ChannelConnect(e)),
                };
                conn.set_read_timeout(Some(SEND_POLL)).map_err(IncomingError::Reply)?;
                let mut hello = [0u8; CHANNEL_HELLO_LEN];
                let read = StallWatch::from_source(&mut conn, stall).read_exact(&mut hello);
                let checked = read
                    .map_err(crate::protocol::ProtocolError::Io)
                    .and_then(|()| ChannelHello::decode(&hello, session, count));
                match checked {
                    Ok(h) if !taken[h.index as usize] => {
                        taken[h.index as usize] = true;
                        break (conn, h.index);
                    }
                    Ok(h) => tracing::warn!(
                        "refused a second connection for channel {} of this migration; still waiting",
                        h.index
                    ),
                    Err(e) => tracing::warn!("refused a connection on {}: {e}; still waiting", from.uri),
                }
                conn.shutdown();
            };
            let (conn, index) = conn;
            let target = ChannelTarget {
                regions: ram.regions().to_vec(),
                written: ram.regions().iter().map(|r| Bitmap::new(r.size / PAGE_SIZE as u64, false)).collect(),
                uffd: match uffd {
                    Some(u) => Some(u.try_clone_for_copy().map_err(IncomingError::Uffd)?),
                    None => None,
                },
                poison: ram.poison().clone(),
                broken: HashSet::new(),
                index,
                count,
            };
            let progress = Arc::new(AtomicU64::new(0));
            let reader = ChannelRead {
                conn: conn.try_clone().map_err(IncomingError::Reply)?,
                stop: stop.clone(),
                progress: progress.clone(),
                activity: from.activity.clone(),
            };
            let main = main.try_clone().map_err(IncomingError::Reply)?;
            let (done_tx, done) = sync_channel(1);
            let copy = copy.clone();
            let handle = std::thread::Builder::new()
                .name(format!("channel-in-{index}"))
                .spawn(move || {
                    let r = receive_channel(reader, target, &copy);
                    if r.as_ref().err().is_some_and(is_own_failure) {
                        // The main stream's reader stops at once; the load reports this error
                        // (and its NACK still goes out on the main connection). A channel that
                        // merely ended early leaves that to the main connection: a source that
                        // gives up closes them all, and its own reason comes on the main one.
                        main.shutdown_read();
                    }
                    let _ = done_tx.send(());
                    r
                })
                .map_err(IncomingError::Reply)?;
            set.running.push(Running { index, conn, progress, done, handle });
            got += 1;
        }
        Ok(set)
    }

    /// Waits for every channel to reach its END (failing one that brings nothing for the
    /// stall time), and returns what they brought.
    pub(crate) fn join(mut self) -> Result<Vec<ChannelOut>, IncomingError> {
        let mut outs = Vec::new();
        let running = std::mem::take(&mut self.running);
        let mut iter = running.into_iter();
        while let Some(r) = iter.next() {
            let (mut last, mut since) = (r.progress.load(Ordering::Relaxed), Instant::now());
            loop {
                match r.done.recv_timeout(SEND_POLL) {
                    Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        let now = r.progress.load(Ordering::Relaxed);
                        if now != last {
                            (last, since) = (now, Instant::now());
                        } else if since.elapsed() >= self.stall {
                            // Put it back so that the drop stops and joins it.
                            self.running.push(r);
                            self.running.extend(iter);
                            return Err(IncomingError::ChannelStalled {
                                channel: self.running[0].index,
                                secs: self.stall.as_secs_f64(),
                            });
                        }
                    }
                }
            }
            let index = r.index;
            match r.handle.join() {
                Ok(Ok(out)) => outs.push(out),
                Ok(Err(e)) => {
                    self.running.extend(iter);
                    return Err(IncomingError::Channel { index, source: Box::new(e) });
                }
                Err(_) => {
                    self.running.extend(iter);
                    return Err(IncomingError::ChannelPanicked(index));
                }
            }
        }
        Ok(outs)
    }

    /// After the main stream failed: stops every channel and returns the first channel error,
    /// which explains the failure better than the main stream's (a channel that failed shut
    /// the main connection).
    pub(crate) fn first_error(mut self) -> Option<IncomingError> {
        self.stop_all();
        let mut first = None;
        for r in std::mem::take(&mut self.running) {
            if let Ok(Err(e)) = r.handle.join() {
                if first.is_none() && is_own_failure(&e) {
                    first = Some(IncomingError::Channel { index: r.index, source: Box::new(e) });
                }
            }
        }
        first
    }

    fn stop_all(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for r in &self.running {
            r.conn.shutdown();
        }
    }
}

impl Drop for ChannelsIn {
    fn drop(&mut self) {
        self.stop_all();
        for r in std::mem::take(&mut self.running) {
            let _ = r.handle.join();
        }
    }
}

/// The scheduling class of a destination's channel threads: as the main reader's
/// (copy_priority.rs), the idle class while [`ReceivePhase::idle_ok`].
#[derive(Clone)]
pub(crate) struct CopyClass {
    pub(crate) phase: Arc<ReceivePhase>,
    pub(crate) vcpus: u32,
    pub(crate) disk_threads: u32,
}

/// Whether a channel's error is its own (a bad record, a frame on the wrong channel, a page
/// that cannot be written), not the connection ending or the load stopping it.
fn is_own_failure(e: &IncomingError) -> bool {
    use ferry_stream::StreamError as S;
    !matches!(
        e,
        IncomingError::ChannelStopped
            | IncomingError::Load(crate::records::LoadError::Stream(
                S::Read { .. } | S::TruncatedRecord { .. } | S::MissingEnd { .. } | S::TruncatedHeader(_)
            ))
    )
}

/// Reads one channel's stream to its END into `t`.
fn receive_channel(reader: ChannelRead, mut t: ChannelTarget, copy: &CopyClass) -> Result<ChannelOut, IncomingError> {
    let mut idle = copy.phase.idle_ok().then(|| crate::copy_priority::IdleCopy::enter(copy.vcpus, copy.disk_threads));
    let stop = reader.stop.clone();
    let stopped = |e: ferry_stream::StreamError| {
        if stop.load(Ordering::SeqCst) {
            IncomingError::ChannelStopped
        } else {
            IncomingError::Load(e.into())
        }
    };
    let mut r = StreamReader::new(BufReader::with_capacity(64 << 10, reader)).map_err(stopped)?;
    let h = *r.header();
    if h.flags != StreamFlags::CHANNEL || h.format_version != FORMAT_VERSION {
        return Err(IncomingError::Unexpected(
            "a channel stream without the CHANNEL flag or of another format version",
        ));
    }
    let mut stats = crate::destination::IncomingStats::default();
    loop {
        match r.next_record().map_err(stopped)? {
            Record::PageBatch(b) => {
                copy.phase.received(b.len() as u64);
                if !copy.phase.idle_ok() {
                    idle = None;
                }
                if let Some(i) = idle.as_mut() {
                    i.watch();
                }
                apply_pages(&mut t, &mut stats, b.iter())?;
            }
            Record::End => break,
            Record::SkippedOptional { .. } | Record::Heartbeat => {}
            _ => return Err(IncomingError::Unexpected("a record other than page batches on a page channel")),
        }
    }
    Ok(ChannelOut {
        index: t.index,
        bytes: r.bytes_read(),
        normal: stats.normal_pages,
        zero: stats.zero_pages,
        broken_entries: stats.broken_pages,
        written: t.written,
        broken: t.broken.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(ram: &GuestRam, index: u32, count: u32) -> ChannelTarget {
        ChannelTarget {
            regions: ram.regions().to_vec(),
            written: ram.regions().iter().map(|r| Bitmap::new(r.size / PAGE_SIZE as u64, false)).collect(),
            uffd: None,
            poison: ram.poison().clone(),
            broken: HashSet::new(),
            index,
            count,
        }
    }

    #[test]
    fn a_channel_writes_its_own_shard_and_refuses_a_frame_of_another() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let mut t = target(&ram, 1, 2);
        let mut stats = crate::destination::IncomingStats::default();
        let data = vec![0x5au8; PAGE_SIZE];
        // Frames 0x200-0x3ff are shard 1: channel 1 of 2 writes them.
        apply_pages(&mut t, &mut stats, [(0x201, PageType::Normal, Some(data.as_slice()))].into_iter()).unwrap();
        let mut back = vec![0u8; PAGE_SIZE];
        ram.read(0x201 * PAGE_SIZE as u64, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(t.written[0].get(0x201));
        // Frame 0x10 is shard 0: it belongs to the main connection.
        let e = apply_pages(&mut t, &mut stats, [(0x10, PageType::Normal, Some(data.as_slice()))].into_iter());
        assert!(matches!(e, Err(IncomingError::WrongChannel { gfn: 0x10, channel: 1, count: 2 })), "{e:?}");
        // BROKEN: recorded for the merge, and no data may follow it on this channel.
        apply_pages(&mut t, &mut stats, [(0x202, PageType::Broken, None)].into_iter()).unwrap();
        let e = apply_pages(&mut t, &mut stats, [(0x202, PageType::Normal, Some(data.as_slice()))].into_iter());
        assert!(matches!(e, Err(IncomingError::DataForBroken(0x202))), "{e:?}");
        assert_eq!(t.broken.iter().copied().collect::<Vec<_>>(), [0x202]);
    }

    #[test]
    fn a_chunk_is_split_by_2_mib_shards_and_channel_0_keeps_its_own() {
        // 1024 pages from page 0 of a region at frame 0: shard 0 (pages 0-511) stays here,
        // shard 1 (512-1023) is channel 1's. Without channel threads, dispatch of a shard of
        // channel 1 would fail: only check the split of what stays.
        let never = AtomicBool::new(false);
        let failed = Arc::new(AtomicBool::new(false));
        let mut set =
            ChannelSet { count: 1, workers: Vec::new(), stall: Duration::from_secs(1), cancel: &never, failed };
        let bits = vec![u64::MAX; 16];
        let pass = Pass { start: Instant::now(), limit: None, idle: false, batch_pages: 64 };
        let own = set.dispatch(0, 0, 0, &bits, None, pass).unwrap();
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].0, 0);
        assert_eq!(own[0].1.len(), 16);
        set.count = 2;
        let bits: Vec<u64> = (0..16).map(|i| if i < 8 { 1 } else { 0 }).collect();
        let own = set.dispatch(0, 0, 0, &bits, None, pass).unwrap();
        assert_eq!(own, vec![(0, vec![1, 1, 1, 1, 1, 1, 1, 1])]);
    }
}
