//! Post-copy: the destination runs the guest before all of its memory has arrived.
//!
//! At the switch the source stops the guest, sends the disks' last blocks, the broken pages, a
//! POSTCOPY record listing the pages still dirty (their data stays here), the machine state
//! and END, and commits as in pre-copy. From then on the guest runs on the destination and this
//! side only serves memory: a post-copy page stream (header flag POSTCOPY) on the same
//! connection carries the listed pages, the ones a destination vCPU waits for first (PAGE_REQUEST
//! frames on the return path), the others in order behind them, with little in flight so that a
//! requested page never waits behind much of the background push. The destination fills pages
//! with `UFFDIO_COPY` as they come, answers faults on pages it already has from its own memory
//! (holes: zeros), and says POSTCOPY_DONE once every listed page is in place.
//!
//! **Recovery.** If the link fails, neither side gives up the guest: the destination's vCPUs
//! that touch a missing page wait, its listener takes a new connection, and the source keeps
//! its memory and the set of pages it still owes ([`PostcopySource`]) until
//! `ferry migrate-resume --to URI` connects again. The destination opens the new connection
//! with POSTCOPY_RESUME (the session and the pages it lacks, which include any that were lost
//! in flight), and the page stream starts again for those. See docs/migration.md, "Post-copy".

use std::collections::HashMap;
use std::io::{BufWriter, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_stream::{PageType, StreamFlags, StreamHeader, StreamReader, StreamWriter, PAGE_SIZE};
use ferry_vmm::dirty_log::Bitmap;
use ferry_vmm::memory::RamRegion;
use ferry_vmm::poison::{PoisonCause, PoisonSet};
use ferry_vmm::uffd::{CopyOutcome, Uffd};
use ferry_vmm::Vm;
use serde::Serialize;

use crate::protocol::{self, PostcopyDone, PostcopyFrame, ProtocolError};
use crate::transport::{Conn, Listener, StallWatch, TransportError, Uri, SEND_POLL};

/// When a migration switches to post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostcopyMode {
    /// After this many pre-copy passes (1: right after the first), unless the pause of a
    /// plain switch-over would be tiny by then.
    After(u32),
    /// When pre-copy is seen not to converge: a pass leaves most of what it sent dirty again
    /// with the pause still over the limit, or the pass limit is reached.
    Auto,
}

/// Page-stream bytes the source lets sit unread in the socket before the next background
/// batch, at most: a requested page waits behind no more than this much plus a batch. On TCP
/// the bound follows the link ([`backlog_limit`]).
const IN_FLIGHT: u64 = 256 << 10;
/// The least the bound goes down to.
const MIN_IN_FLIGHT: u64 = 32 << 10;
/// Queueing the bound allows on top of the link's round trip.
const QUEUE_TIME: Duration = Duration::from_millis(2);
/// Pages per background batch, at most (fewer on a slow link: half the backlog bound).
const PUSH_PAGES: usize = 32;
/// How often the bound is recomputed.
const BACKLOG_EVERY: Duration = Duration::from_millis(50);

/// The backlog bound for a link that delivers `rate` bytes/s with a lowest round trip of
/// `min_rtt_us`: what keeps it busy (its bandwidth-delay product) plus [`QUEUE_TIME`] of
/// queue, so that a requested page waits behind about 2 ms of push on a slow link instead of
/// 256 KiB (8 ms at 32 MiB/s), and a long link still gets its round trip's worth in flight.
/// Without a measurement (a UNIX socket): [`IN_FLIGHT`].
fn backlog_limit(link: Option<(u64, u32)>) -> u64 {
    match link {
        Some((rate, min_rtt_us)) if rate > 0 && min_rtt_us > 0 => {
            let t = f64::from(min_rtt_us) / 1e6 + QUEUE_TIME.as_secs_f64();
            ((rate as f64 * t) as u64).clamp(MIN_IN_FLIGHT, IN_FLIGHT)
        }
        _ => IN_FLIGHT,
    }
}

/// Pages per background batch under backlog bound `limit`.
fn batch_pages(limit: u64) -> usize {
    ((limit / 2) as usize / PAGE_SIZE).clamp(4, PUSH_PAGES)
}
/// How often the source reports post-copy progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Errors of post-copy, either side.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error(
        "the post-copy link failed with {left} page(s) still at the source; the guest runs on the destination and \
         its vCPUs wait for them: resume with `ferry migrate-resume --to URI`"
    )]
    Interrupted {
        left: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot reach the destination")]
    Transport(#[from] TransportError),
    #[error("the handshake failed")]
    Handshake(#[source] ProtocolError),
    #[error(
        "the destination at {to} is not the one this post-copy started with (session {theirs:#x}, ours {ours:#x})"
    )]
    WrongSession { to: String, ours: u64, theirs: u64 },
    #[error("the destination lacks frame {0:#x}, which is not guest RAM")]
    BadFrame(u64),
    #[error("reading guest memory at {gpa:#x} failed")]
    Memory {
        gpa: u64,
        #[source]
        source: ferry_vmm::memory::MemoryError,
    },
    #[error("the page stream")]
    Stream(#[source] ferry_stream::StreamError),
    #[error("the post-copy stream is not a page stream (header flags {0:#x})")]
    NotPageStream(u32),
    #[error("page frame {0:#x} is outside guest RAM")]
    PageOutside(u64),
    #[error("the source ended the post-copy stream with {0} page(s) still missing")]
    EndedEarly(u64),
    #[error("filling guest memory failed")]
    Uffd(#[source] ferry_vmm::uffd::UffdError),
    #[error("cannot mark page frame {gfn:#x} broken")]
    MarkBroken {
        gfn: u64,
        #[source]
        source: ferry_vmm::uffd::UffdError,
    },
    #[error(
        "the source never came back: {left} page(s) of the guest are lost ({waited:.0} s without a link; the guest \
         cannot continue)"
    )]
    Lost { left: u64, waited: f64 },
    #[error("the source did not confirm the post-copy (no link to it)")]
    NoLink(#[source] std::io::Error),
}

/// A random session id (a resumed post-copy must reach the destination it started with).
pub(crate) fn new_session() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Not secret, only distinct: the time will do.
        return Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    }
    u64::from_le_bytes(b)
}

/// Runs `(first frame, frames)` of the set pages of per-region bitmaps.
pub(crate) fn runs_of(regions: &[RamRegion], maps: &[Bitmap]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (r, m) in regions.iter().zip(maps) {
        let base = r.gpa / PAGE_SIZE as u64;
        for p in m.iter_set() {
            match runs.last_mut() {
                Some((f, n)) if *f + *n == base + p => *n += 1,
                _ => runs.push((base + p, 1)),
            }
        }
    }
    runs
}

/// Region index and page of frame `gfn`.
fn locate(regions: &[RamRegion], gfn: u64) -> Option<(usize, u64)> {
    let gpa = gfn.checked_mul(PAGE_SIZE as u64)?;
    regions
        .iter()
        .position(|r| gpa >= r.gpa && gpa < r.gpa + r.size)
        .map(|i| (i, (gpa - regions[i].gpa) / PAGE_SIZE as u64))
}

/// What a post-copy moved, both sides' figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostcopyStats {
    /// Pages whose data was still here at the switch.
    pub pages_at_switch: u64,
    /// Sent in order behind the requested ones.
    pub pushed_pages: u64,
    /// Sent because the destination asked (a vCPU or device waited on them).
    pub requested_pages: u64,
    pub bytes: u64,
    /// Switch-over (COMMIT) to POSTCOPY_DONE.
    pub duration_ms: f64,
    /// Links that failed and were resumed.
    pub recoveries: u32,
    /// The destination's own figures (fault counts and latency).
    pub destination: PostcopyDone,
}

/// The source's side of a post-copy: the pages it still owes. It outlives a failed link, so
/// that `migrate-resume` can finish over a new one.
#[derive(Debug)]
pub struct PostcopySource {
    pub(crate) session: u64,
    pub(crate) remaining: Vec<Bitmap>,
    pub(crate) left: u64,
    /// Where the background push goes on: region and page.
    cursor: (usize, u64),
    pub stats: PostcopyStats,
    t_switch: Instant,
    stall: Duration,
    /// Bytes per second the background push keeps to (`--max-bandwidth`); requested pages go
    /// at once.
    limit: Option<std::num::NonZeroU64>,
}

/// Post-copy progress.
#[derive(Debug, Clone, Serialize)]
pub struct PostcopyProgress {
    pub remaining_pages: u64,
    pub pushed_pages: u64,
    pub requested_pages: u64,
}

impl PostcopySource {
    pub(crate) fn new(
        session: u64,
        remaining: Vec<Bitmap>,
        stall: Duration,
        limit: Option<std::num::NonZeroU64>,
    ) -> Self {
        let left = remaining.iter().map(Bitmap::count).sum();
        PostcopySource {
            session,
            remaining,
            left,
            cursor: (0, 0),
            stats: PostcopyStats { pages_at_switch: left, ..Default::default() },
            t_switch: Instant::now(),
            stall,
            limit,
        }
    }

    /// Pages still owed.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Serves the page stream on `conn` until the destination has every page (POSTCOPY_DONE).
    /// A failed link is [`PostcopyError::Interrupted`], with `self` keeping what is still owed.
    pub(crate) fn serve(
        &mut self,
        vm: &Vm,
        conn: Conn,
        progress: &mut dyn FnMut(&PostcopyProgress),
    ) -> Result<(), PostcopyError> {
        let reply = conn.try_clone().map_err(TransportError::Setup)?;
        let shut = conn.try_clone().map_err(TransportError::Setup)?;
        // Requests come whenever a destination vCPU faults, so silence is normal: the reader
        // waits without a stall limit, but in SEND_POLL steps (a TLS session's reader must let
        // the writer in between) until the push is over.
        reply.set_read_timeout(Some(SEND_POLL)).map_err(TransportError::Setup)?;
        conn.set_write_timeout(Some(SEND_POLL)).map_err(TransportError::Setup)?;
        let (tx, rx) = mpsc::channel::<Result<PostcopyFrame, ProtocolError>>();
        let over = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let over = &over;
            scope.spawn(move || {
                let mut r = StallWatch::to_destination(reply, over, Duration::from_secs(1 << 40));
                loop {
                    let f = protocol::read_postcopy_frame(&mut r);
                    let end = !matches!(f, Ok(PostcopyFrame::Request(_)));
                    if tx.send(f).is_err() || end {
                        return;
                    }
                }
            });
            let r = self.push(vm, conn, &rx, progress);
            // Ends the reader (done or failed, the link is finished with).
            over.store(true, Ordering::SeqCst);
            shut.shutdown();
            r
        })
    }

    fn push(
        &mut self,
        vm: &Vm,
        conn: Conn,
        rx: &mpsc::Receiver<Result<PostcopyFrame, ProtocolError>>,
        progress: &mut dyn FnMut(&PostcopyProgress),
    ) -> Result<(), PostcopyError> {
        let never = AtomicBool::new(false);
        let watched = StallWatch::to_destination(conn, &never, self.stall);
        let header = StreamHeader::new(StreamFlags::POSTCOPY);
        let interrupted =
            |left: u64, e: Box<dyn std::error::Error + Send + Sync>| PostcopyError::Interrupted { left, source: e };
        let mut w = StreamWriter::new(BufWriter::with_capacity(PUSH_PAGES * PAGE_SIZE * 2, watched), &header)
            .map_err(|e| interrupted(self.left, Box::new(e)))?;
        let mut urgent: Vec<u64> = Vec::new();
        let mut done: Option<PostcopyDone> = None;
        let mut last_progress = Instant::now();
        // The backlog's last fall: one that stops draining for the stall timeout is a dead link.
        let (mut last_queued, mut queued_since) = (u64::MAX, Instant::now());
        let mut buf = vec![0u8; PUSH_PAGES * PAGE_SIZE];
        let b0 = w.bytes_written();
        let t0 = Instant::now();
        let mut limit = backlog_limit(w.get_mut().get_ref().conn.tcp_link());
        let mut limit_at = Instant::now();
        let take = |f: Result<PostcopyFrame, ProtocolError>,
                    urgent: &mut Vec<u64>,
                    done: &mut Option<PostcopyDone>,
                    left: u64|
         -> Result<(), PostcopyError> {
            match f {
                Ok(PostcopyFrame::Request(g)) => urgent.extend(g),
                Ok(PostcopyFrame::Done(d)) => *done = Some(d),
                Ok(PostcopyFrame::Resume { .. }) => {
                    return Err(interrupted(left, Box::new(ProtocolError::BadFrame(protocol::FRAME_POSTCOPY_RESUME))))
                }
                Err(e) => return Err(interrupted(left, Box::new(e))),
            }
            Ok(())
        };
        while self.left > 0 {
            while let Ok(f) = rx.try_recv() {
                take(f, &mut urgent, &mut done, self.left)?;
            }
            if !urgent.is_empty() {
                let regions = vm.ram().regions();
                let pages = std::mem::take(&mut urgent)
                    .into_iter()
                    .map(|g| locate(regions, g).ok_or(PostcopyError::BadFrame(g)))
                    .collect::<Result<Vec<_>, _>>()?;
                // The push goes on from the last page asked for: a guest that touches memory
                // in order finds the next pages on their way.
                if let Some(&(ri, page)) = pages.last() {
                    self.cursor = (ri, page + 1);
                }
                let n = self.send_pages(vm, &mut w, &mut buf, pages.into_iter())?;
                self.stats.requested_pages += n;
                w.flush().map_err(|e| interrupted(self.left, Box::new(e)))?;
                continue;
            }
            if limit_at.elapsed() >= BACKLOG_EVERY {
                limit = backlog_limit(w.get_mut().get_ref().conn.tcp_link());
                limit_at = Instant::now();
            }
            let queued = w.get_mut().get_ref().conn.unread_bytes().map_err(|e| interrupted(self.left, Box::new(e)))?;
            // Ahead of the bandwidth cap: wait (for a request, at most until due).
            let ahead = self.limit.map_or(Duration::ZERO, |l| {
                Duration::from_secs_f64((w.bytes_written() - b0) as f64 / l.get() as f64).saturating_sub(t0.elapsed())
            });
            if queued < last_queued || queued <= limit {
                (last_queued, queued_since) = (queued, Instant::now());
            } else if queued_since.elapsed() >= self.stall {
                return Err(interrupted(
                    self.left,
                    format!("the destination took no data for {:.1} s", self.stall.as_secs_f64()).into(),
                ));
            }
            if queued > limit || !ahead.is_zero() {
                let wait =
                    if ahead.is_zero() { Duration::from_micros(200) } else { ahead.min(Duration::from_millis(5)) };
                match rx.recv_timeout(wait) {
                    Ok(f) => take(f, &mut urgent, &mut done, self.left)?,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(interrupted(self.left, "the return path closed".into()))
                    }
                }
                continue;
            }
            let batch = self.next_background(batch_pages(limit));
            let n = self.send_pages(vm, &mut w, &mut buf, batch.into_iter())?;
            self.stats.pushed_pages += n;
            w.flush().map_err(|e| interrupted(self.left, Box::new(e)))?;
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                progress(&PostcopyProgress {
                    remaining_pages: self.left,
                    pushed_pages: self.stats.pushed_pages,
                    requested_pages: self.stats.requested_pages,
                });
            }
        }
        w.end().map_err(|e| interrupted(0, Box::new(e)))?;
        w.flush().map_err(|e| interrupted(0, Box::new(e)))?;
        self.stats.bytes += w.bytes_written() - b0;
        // Every page is sent; the destination confirms it has them all.
        let deadline = Instant::now() + self.stall;
        while done.is_none() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(f) => take(f, &mut urgent, &mut done, 0)?,
                Err(_) => return Err(interrupted(0, "no POSTCOPY_DONE from the destination".into())),
            }
        }
        if let Some(d) = done {
            self.stats.destination = d;
        }
        self.stats.duration_ms = self.t_switch.elapsed().as_secs_f64() * 1000.0;
        Ok(())
    }

    /// Up to `n` owed pages `(region, page)` from the cursor on.
    fn next_background(&mut self, n: usize) -> Vec<(usize, u64)> {
        let mut out = Vec::with_capacity(n);
        // The cursor follows requests forward, so it wraps around (once a call) for what it
        // jumped over.
        let mut wrapped = false;
        while out.len() < n && (out.len() as u64) < self.left {
            if self.cursor.0 >= self.remaining.len() {
                if wrapped {
                    break;
                }
                wrapped = true;
                self.cursor = (0, 0);
                continue;
            }
            let (ri, page) = self.cursor;
            let m = &self.remaining[ri];
            if page >= m.npages() {
                self.cursor = (ri + 1, 0);
                continue;
            }
            // Whole empty words at a time.
            let w = m.words()[(page / 64) as usize] >> (page % 64);
            if w == 0 {
                self.cursor.1 = (page / 64 + 1) * 64;
                continue;
            }
            let at = page + w.trailing_zeros() as u64;
            out.push((ri, at));
            self.cursor.1 = at + 1;
        }
        out
    }

    /// Sends the owed pages among `pages` (`(region, page)`); returns how many were owed.
    fn send_pages<W: std::io::Write>(
        &mut self,
        vm: &Vm,
        w: &mut StreamWriter<W>,
        buf: &mut [u8],
        pages: impl Iterator<Item = (usize, u64)>,
    ) -> Result<u64, PostcopyError> {
        let ram = vm.ram();
        let regions = ram.regions();
        let mut entries: Vec<(u64, PageType)> = Vec::with_capacity(PUSH_PAGES);
        let mut used = 0usize;
        let mut sent = 0;
        let mut flush = |entries: &mut Vec<(u64, PageType)>, used: &mut usize, buf: &[u8], left: u64| {
            if entries.is_empty() {
                return Ok(());
            }
            let r = w.page_batch_packed(entries, &buf[..*used]);
            entries.clear();
            *used = 0;
            r.map_err(|e| PostcopyError::Interrupted { left, source: Box::new(e) })
        };
        for (ri, page) in pages {
            if ri >= self.remaining.len() || !self.remaining[ri].get(page) {
                continue;
            }
            let gpa = regions[ri].gpa + page * PAGE_SIZE as u64;
            let slot = &mut buf[used..used + PAGE_SIZE];
            let ty =
                crate::source::copy_page(ram, gpa, slot).map_err(|source| PostcopyError::Memory { gpa, source })?;
            if ty == PageType::Normal {
                used += PAGE_SIZE;
            }
            entries.push((gpa / PAGE_SIZE as u64, ty));
            self.remaining[ri].clear(page);
            self.left -= 1;
            sent += 1;
            if entries.len() >= PUSH_PAGES {
                flush(&mut entries, &mut used, buf, self.left)?;
            }
        }
        flush(&mut entries, &mut used, buf, self.left)?;
        Ok(sent)
    }

    /// Takes the destination's list of what it lacks (a resumed link): that is what is owed now
    /// (pages lost in flight included).
    pub(crate) fn owe_exactly(&mut self, regions: &[RamRegion], runs: &[(u64, u64)]) -> Result<(), PostcopyError> {
        let mut maps: Vec<Bitmap> = regions.iter().map(|r| Bitmap::new(r.size / PAGE_SIZE as u64, false)).collect();
        let mut left = 0;
        for &(first, n) in runs {
            for g in first..first.saturating_add(n) {
                let (ri, page) = locate(regions, g).ok_or(PostcopyError::BadFrame(g))?;
                if !maps[ri].get(page) {
                    maps[ri].set(page);
                    left += 1;
                }
            }
        }
        self.remaining = maps;
        self.left = left;
        self.cursor = (0, 0);
        Ok(())
    }
}

/// Finishes an interrupted post-copy over a new connection to `to` (`ferry migrate-resume`).
pub fn resume(
    vm: &Vm,
    pc: &mut PostcopySource,
    to: &Uri,
    tls: Option<&crate::tls::Tls>,
    progress: &mut dyn FnMut(&PostcopyProgress),
) -> Result<(), PostcopyError> {
    let mut conn = Conn::connect_with(to, pc.stall, tls)?;
    conn.set_read_timeout(Some(SEND_POLL)).map_err(TransportError::Setup)?;
    conn.set_write_timeout(Some(SEND_POLL)).map_err(TransportError::Setup)?;
    let never = AtomicBool::new(false);
    let mut watched = StallWatch::to_destination(&mut conn, &never, pc.stall);
    protocol::source_handshake(&mut watched).map_err(PostcopyError::Handshake)?;
    let (session, runs) = match protocol::read_postcopy_frame(&mut watched) {
        Ok(PostcopyFrame::Resume { session, runs }) => (session, runs),
        Ok(_) => return Err(PostcopyError::Handshake(ProtocolError::BadFrame(0))),
        Err(e) => return Err(PostcopyError::Handshake(e)),
    };
    if session != pc.session {
        return Err(PostcopyError::WrongSession { to: to.to_string(), ours: pc.session, theirs: session });
    }
    pc.owe_exactly(vm.ram().regions(), &runs)?;
    pc.stats.recoveries += 1;
    tracing::info!(pages = pc.left, "post-copy resumed over a new connection to {to}");
    pc.serve(vm, conn, progress)
}

/// The destination's pages during post-copy, shared by the fault handler and the page-stream
/// receiver.
struct DestPages {
    /// Per region: pages whose data is still at the source.
    missing: Vec<Bitmap>,
    left: u64,
    /// Frames asked for and not yet in place, with when the first fault on them was seen.
    requested: HashMap<u64, Instant>,
    /// Requests not yet sent (no link at the moment, or before COMMIT).
    unsent: Vec<u64>,
    latencies_us: Vec<u32>,
    done: PostcopyDone,
}

struct Dest {
    uffd: Uffd,
    regions: Vec<RamRegion>,
    poison: Arc<PoisonSet>,
    pages: Mutex<DestPages>,
    /// The return path of the current link, where requests go (None: no link).
    reply: Mutex<Option<Conn>>,
    finished: AtomicBool,
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

impl Dest {
    fn lock(&self) -> std::sync::MutexGuard<'_, DestPages> {
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn host(&self, ri: usize, page: u64) -> u64 {
        self.regions[ri].host_addr + page * PAGE_SIZE as u64
    }

    /// The fault handler: pages still at the source are asked for, others (holes) filled with
    /// zeros here.
    fn handle_faults(&self) {
        let mut faults = Vec::new();
        while !self.finished.load(Ordering::SeqCst) {
            faults.clear();
            if let Err(e) = self.uffd.read_faults(&mut faults, Duration::from_millis(50)) {
                tracing::error!("post-copy fault handler: {}", crate::destination::ErrorChain(&e));
                return;
            }
            if faults.is_empty() {
                continue;
            }
            let now = Instant::now();
            let mut ask = Vec::new();
            {
                let mut p = self.lock();
                for &hva in &faults {
                    let Some(ri) = self.regions.iter().position(|r| hva >= r.host_addr && hva < r.host_addr + r.size)
                    else {
                        continue;
                    };
                    let page = (hva - self.regions[ri].host_addr) / PAGE_SIZE as u64;
                    let gfn = (self.regions[ri].gpa + page * PAGE_SIZE as u64) / PAGE_SIZE as u64;
                    if p.missing[ri].get(page) {
                        if let std::collections::hash_map::Entry::Vacant(v) = p.requested.entry(gfn) {
                            v.insert(now);
                            p.done.remote_faults += 1;
                            ask.push(gfn);
                        }
                        continue;
                    }
                    // SAFETY: one page of a registered range of guest RAM; the source is a
                    // static page of zeros.
                    match unsafe { self.uffd.copy(hva, ZERO_PAGE.as_ptr(), PAGE_SIZE as u64) } {
                        Ok(CopyOutcome::Copied) => p.done.zero_faults += 1,
                        // Filled meanwhile: wake whoever still waits.
                        Ok(CopyOutcome::Exists) => {
                            let _ = self.uffd.wake(hva, PAGE_SIZE as u64);
                        }
                        Err(e) => {
                            // Never leave the faulting thread waiting: it faults again and the
                            // next try fills the page.
                            tracing::warn!("post-copy: zero fill: {}", crate::destination::ErrorChain(&e));
                            let _ = self.uffd.wake(hva, PAGE_SIZE as u64);
                        }
                    }
                }
                if !ask.is_empty() {
                    p.unsent.append(&mut ask);
                    ask = std::mem::take(&mut p.unsent);
                }
            }
            if !ask.is_empty() {
                self.send_requests(ask);
            }
        }
    }

    /// Sends requests on the current link; kept for the next one when there is none.
    fn send_requests(&self, gfns: Vec<u64>) {
        let mut reply = self.reply.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = reply.as_mut() {
            if gfns.chunks(protocol::MAX_REQUEST_PAGES).try_for_each(|g| protocol::send_page_request(c, g)).is_ok() {
                return;
            }
            // The link failed (or a request stood for the stall timeout): the receiver sees
            // it shut and waits for a new one.
            c.shutdown();
            *reply = None;
        }
        drop(reply);
        self.lock().unsent.extend(gfns);
    }

    /// Puts the pages of one batch in place.
    fn apply<'d>(&self, pages: impl Iterator<Item = (u64, PageType, Option<&'d [u8]>)>) -> Result<(), PostcopyError> {
        let mut p = self.lock();
        for (gfn, ty, data) in pages {
            let (ri, page) = locate(&self.regions, gfn).ok_or(PostcopyError::PageOutside(gfn))?;
            p.done.pages += 1;
            if !p.missing[ri].get(page) {
                // Sent twice (a request and the push crossed, or a resumed link): the first won.
                continue;
            }
            let hva = self.host(ri, page);
            match (ty, data) {
                (PageType::Broken, _) => {
                    self.poison.mark(gfn, PoisonCause::Stream);
                    if self.uffd.can_poison() {
                        self.uffd.poison(hva).map_err(|source| PostcopyError::MarkBroken { gfn, source })?;
                    } else {
                        // A kernel without UFFDIO_POISON: a page in place, then real hardware
                        // poisoning (CONFIG_MEMORY_FAILURE), as GuestRam::poison_host_page does.
                        // SAFETY: as for a zero page below.
                        unsafe { self.uffd.copy(hva, ZERO_PAGE.as_ptr(), PAGE_SIZE as u64) }
                            .map_err(|source| PostcopyError::MarkBroken { gfn, source })?;
                        // SAFETY: MADV_HWPOISON on one page of guest RAM that Ferry mapped.
                        let rc = unsafe { libc::madvise(hva as *mut libc::c_void, PAGE_SIZE, libc::MADV_HWPOISON) };
                        if rc != 0 {
                            return Err(PostcopyError::MarkBroken {
                                gfn,
                                source: ferry_vmm::uffd::UffdError::Ioctl {
                                    what: "MADV_HWPOISON",
                                    source: std::io::Error::last_os_error(),
                                },
                            });
                        }
                    }
                }
                (PageType::Normal, Some(d)) => {
                    // SAFETY: `d` is one page; `hva` is a missing page of a registered range.
                    match unsafe { self.uffd.copy(hva, d.as_ptr(), PAGE_SIZE as u64) } {
                        Ok(CopyOutcome::Copied) => {}
                        Ok(CopyOutcome::Exists) => return Err(PostcopyError::EndedEarly(p.left)),
                        Err(e) => return Err(PostcopyError::Uffd(e)),
                    }
                }
                _ => {
                    // SAFETY: as above, from the static zero page.
                    match unsafe { self.uffd.copy(hva, ZERO_PAGE.as_ptr(), PAGE_SIZE as u64) } {
                        Ok(_) => {}
                        Err(e) => return Err(PostcopyError::Uffd(e)),
                    }
                }
            }
            p.missing[ri].clear(page);
            p.left -= 1;
            if let Some(t) = p.requested.remove(&gfn) {
                let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                p.latencies_us.push(us);
            }
        }
        Ok(())
    }

    fn left(&self) -> u64 {
        self.lock().left
    }
}

/// How the destination takes a new link after a failed one.
pub struct Recover {
    pub listener: Listener,
    pub uri: Uri,
    /// Who may come back (the same as the first connection).
    pub admit: crate::transport::Admission,
    /// How long to wait for the source to come back before the guest is given up.
    pub timeout: Duration,
}

/// Default for [`Recover::timeout`].
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(600);

/// The destination's side of a running post-copy.
pub struct PostcopyIncoming {
    dest: Arc<Dest>,
    session: u64,
    faults: Option<std::thread::JoinHandle<()>>,
    pub pages_at_switch: u64,
}

/// The destination's result once every page is in place.
#[derive(Debug, Clone, Copy)]
pub struct IncomingPostcopyStats {
    pub done: PostcopyDone,
    pub duration: Duration,
    pub recoveries: u32,
}

impl PostcopyIncoming {
    /// Starts the fault handler over `uffd` (registered on all of guest RAM) with `missing`
    /// (per region) still to come: from here any touch of a missing page waits for it.
    pub(crate) fn start(
        uffd: Uffd,
        regions: Vec<RamRegion>,
        poison: Arc<PoisonSet>,
        missing: Vec<Bitmap>,
        session: u64,
    ) -> Result<Self, std::io::Error> {
        let left = missing.iter().map(Bitmap::count).sum();
        let dest = Arc::new(Dest {
            uffd,
            regions,
            poison,
            pages: Mutex::new(DestPages {
                missing,
                left,
                requested: HashMap::new(),
                unsent: Vec::new(),
                latencies_us: Vec::new(),
                done: PostcopyDone::default(),
            }),
            reply: Mutex::new(None),
            finished: AtomicBool::new(false),
        });
        let d = dest.clone();
        let faults = std::thread::Builder::new().name("postcopy-faults".into()).spawn(move || d.handle_faults())?;
        Ok(PostcopyIncoming { dest, session, faults: Some(faults), pages_at_switch: left })
    }

    /// Pages still at the source.
    pub fn left(&self) -> u64 {
        self.dest.left()
    }

    /// Receives the page stream after COMMIT: `stream` continues the migration connection,
    /// `reply` is its return path. On a failed link, waits for the source on `recover` (if
    /// any). Returns once every page is in place (the userfaultfd is then unregistered and
    /// guest memory is ordinary again).
    pub fn run(
        mut self,
        stream: Box<dyn Read + Send>,
        reply: Conn,
        mut recover: Option<Recover>,
    ) -> Result<IncomingPostcopyStats, PostcopyError> {
        let t0 = Instant::now();
        let mut recoveries = 0;
        let mut link: Option<(Box<dyn Read + Send>, Conn)> = Some((stream, reply));
        let result = loop {
            let (stream, reply) = match link.take() {
                Some(l) => l,
                None => {
                    let left = self.left();
                    let Some(rc) = recover.as_mut() else {
                        break Err(PostcopyError::Lost { left, waited: 0.0 });
                    };
                    tracing::error!(
                        "post-copy: the link to the source failed with {left} page(s) still there; waiting up to {:.0} s \
                         on {} for `ferry migrate-resume`",
                        rc.timeout.as_secs_f64(),
                        rc.uri
                    );
                    match self.accept_resume(rc) {
                        Ok(l) => {
                            recoveries += 1;
                            l
                        }
                        Err(e) => break Err(e),
                    }
                }
            };
            // Requests go on this link from now on (those waiting first). A request that does
            // not go out within the stall timeout means the link is dead.
            let _ = reply.set_write_timeout(Some(Duration::from_secs(10)));
            let waiting: Vec<u64> = {
                let mut p = self.dest.lock();
                let mut w: Vec<u64> = p.requested.keys().copied().collect();
                w.sort_unstable();
                p.unsent.clear();
                w
            };
            *self.dest.reply.lock().unwrap_or_else(|p| p.into_inner()) = reply.try_clone().ok();
            if !waiting.is_empty() {
                self.dest.send_requests(waiting);
            }
            match self.receive(stream) {
                Ok(()) => break Ok(self.done(reply, t0, recoveries)),
                Err(e) => {
                    // Shut first: a request write stuck on the dead link holds the reply lock.
                    reply.shutdown();
                    *self.dest.reply.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    if self.left() == 0 {
                        // Every page came; only END (or the link after it) was lost.
                        tracing::warn!(
                            "post-copy link failed after the last page: {}",
                            crate::destination::ErrorChain(&e)
                        );
                        break Ok(self.done(reply, t0, recoveries));
                    }
                    // Whatever went wrong with this link (cut, silent, a stream that is not
                    // the page stream), the source may still come back with a good one.
                    tracing::warn!("post-copy link: {}", crate::destination::ErrorChain(&e));
                    if recover.is_none() {
                        break Err(e);
                    }
                }
            }
        };
        match &result {
            Ok(_) => self.finish(),
            // Pages only the source had are lost: the guest must never run on without them.
            // The userfaultfd stays registered (whoever waits on a missing page keeps waiting)
            // until the caller ends the process.
            Err(_) => std::mem::forget(self.dest.clone()),
        }
        result
    }

    /// Every page is in place: the destination's figures, told to the source.
    fn done(&self, reply: Conn, t0: Instant, recoveries: u32) -> IncomingPostcopyStats {
        let done = {
            let mut p = self.dest.lock();
            let mut l = std::mem::take(&mut p.latencies_us);
            l.sort_unstable();
            let pct = |q: f64| l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1)));
            let (p50, p99) = (pct(0.5).copied().unwrap_or(0), pct(0.99).copied().unwrap_or(0));
            p.done.fault_p50_us = p50 as u64;
            p.done.fault_p99_us = p99 as u64;
            p.done.fault_max_us = l.last().copied().unwrap_or(0) as u64;
            p.done
        };
        let mut r = reply;
        if let Err(e) = protocol::send_postcopy_done(&mut r, &done) {
            // Every page is here: the guest is whole whatever the source hears.
            tracing::warn!("post-copy: cannot tell the source it is done: {e}");
        }
        IncomingPostcopyStats { done, duration: t0.elapsed(), recoveries }
    }

    /// Reads one link's page stream to its END. A link failure is `Interrupted`.
    fn receive(&self, stream: Box<dyn Read + Send>) -> Result<(), PostcopyError> {
        let link = |e: ferry_stream::StreamError| PostcopyError::Interrupted { left: 0, source: Box::new(e) };
        let mut r = StreamReader::new(stream).map_err(link)?;
        if !r.header().flags.contains(StreamFlags::POSTCOPY) {
            return Err(PostcopyError::NotPageStream(r.header().flags.0));
        }
        loop {
            match r.next_record() {
                Ok(ferry_stream::Record::PageBatch(b)) => self.dest.apply(b.iter())?,
                Ok(ferry_stream::Record::End) => break,
                Ok(_) => {}
                Err(e) if is_link_error(&e) => return Err(link(e)),
                Err(e) => return Err(PostcopyError::Stream(e)),
            }
        }
        match self.left() {
            0 => Ok(()),
            n => Err(PostcopyError::EndedEarly(n)),
        }
    }

    /// Waits for the source to come back on `rc` and opens the new link: handshake, then
    /// POSTCOPY_RESUME with what is still missing.
    fn accept_resume(&self, rc: &Recover) -> Result<(Box<dyn Read + Send>, Conn), PostcopyError> {
        let t = Instant::now();
        loop {
            let left = self.left();
            let wait = rc.timeout.saturating_sub(t.elapsed());
            if wait.is_zero() {
                return Err(PostcopyError::Lost { left, waited: t.elapsed().as_secs_f64() });
            }
            match rc.listener.wait_readable(wait) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => return Err(PostcopyError::NoLink(e)),
            }
            let conn = match rc.listener.accept_with(&rc.uri, &rc.admit) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("post-copy: refused a connection: {}", crate::destination::ErrorChain(&e));
                    continue;
                }
            };
            match self.open_resumed(conn) {
                Ok(l) => return Ok(l),
                Err(e) => {
                    tracing::warn!("post-copy: a connection did not resume: {}", crate::destination::ErrorChain(&e))
                }
            }
        }
    }

    fn open_resumed(&self, conn: Conn) -> Result<(Box<dyn Read + Send>, Conn), PostcopyError> {
        let io = |e| PostcopyError::NoLink(e);
        conn.set_read_timeout(Some(SEND_POLL)).map_err(io)?;
        conn.set_write_timeout(Some(SEND_POLL)).map_err(io)?;
        let mut reply = conn.try_clone().map_err(io)?;
        let stall = Duration::from_secs(10);
        let mut watched = StallWatch::from_source(conn, stall);
        match protocol::destination_handshake(&mut watched) {
            Ok(protocol::Opening::Hello(h)) if h.features & protocol::features::POSTCOPY != 0 => {}
            Ok(protocol::Opening::Hello(_)) => {
                return Err(PostcopyError::Handshake(ProtocolError::NoHandshake("a source without post-copy".into())))
            }
            Ok(protocol::Opening::Stream(_)) => {
                return Err(PostcopyError::Handshake(ProtocolError::NoHandshake("a stream, not a resume".into())))
            }
            Err(e) => return Err(PostcopyError::Handshake(e)),
        }
        let runs = {
            let p = self.dest.lock();
            runs_of(&self.dest.regions, &p.missing)
        };
        reply.set_write_timeout(None).map_err(io)?;
        protocol::send_postcopy_resume(&mut reply, self.session, &runs).map_err(io)?;
        Ok((Box::new(std::io::BufReader::with_capacity(64 << 10, watched)), reply))
    }

    fn finish(&mut self) {
        self.dest.finished.store(true, Ordering::SeqCst);
        if let Some(t) = self.faults.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PostcopyIncoming {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Whether a stream error is the link's (the connection failed or went silent) rather than a
/// bad stream.
fn is_link_error(e: &ferry_stream::StreamError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        cur = c.source();
    }
    use ferry_stream::StreamError as E;
    // A stream cut short is a link that failed (the bytes that came were good).
    matches!(e, E::MissingEnd { .. } | E::TruncatedRecord { .. } | E::TruncatedHeader(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(gpa: u64, size: u64) -> RamRegion {
        RamRegion { slot: 0, gpa, size, file_offset: 0, host_addr: 0 }
    }

    #[test]
    fn runs_join_consecutive_frames_across_words_and_not_across_regions() {
        let regions = [region(0, 1 << 20), region(4 << 30, 1 << 20)];
        let mut a = Bitmap::new(256, false);
        for p in [3, 4, 63, 64, 65, 255] {
            a.set(p);
        }
        let mut b = Bitmap::new(256, false);
        b.set(0);
        let runs = runs_of(&regions, &[a, b]);
        assert_eq!(runs, vec![(3, 2), (63, 3), (255, 1), ((4 << 30) / 4096, 1)]);
    }

    /// `n` pages of the background push, taken as sending them does.
    fn push(pc: &mut PostcopySource, n: usize) -> Vec<(usize, u64)> {
        let got = pc.next_background(n);
        for &(ri, page) in &got {
            assert!(pc.remaining[ri].get(page), "({ri}, {page}) pushed twice");
            pc.remaining[ri].clear(page);
            pc.left -= 1;
        }
        got
    }

    #[test]
    fn the_backlog_bound_follows_the_link() {
        // 32 MiB/s, 50 µs round trip: 2.05 ms of it, about 67 KiB, in batches of 8 pages.
        let slow = backlog_limit(Some((32 << 20, 50)));
        assert!((66 << 10..=70 << 10).contains(&slow), "{slow}");
        assert_eq!(batch_pages(slow), 8);
        // A fast local link is capped; a long one gets its round trip's worth, capped too.
        assert_eq!(backlog_limit(Some((10 << 30, 30))), IN_FLIGHT);
        assert_eq!(backlog_limit(Some((1 << 20, 100))), MIN_IN_FLIGHT);
        // No measurement (UNIX socket, a fresh connection): the fixed bound.
        assert_eq!(backlog_limit(None), IN_FLIGHT);
        assert_eq!(backlog_limit(Some((0, 0))), IN_FLIGHT);
        assert_eq!(batch_pages(IN_FLIGHT), PUSH_PAGES);
        assert_eq!(batch_pages(MIN_IN_FLIGHT), 4);
    }

    #[test]
    fn the_background_push_visits_every_owed_page_once_in_order() {
        let mut a = Bitmap::new(200, false);
        for p in [0, 1, 70, 199] {
            a.set(p);
        }
        let mut b = Bitmap::new(64, false);
        b.set(5);
        let mut pc = PostcopySource::new(1, vec![a, b], Duration::from_secs(1), None);
        assert_eq!(pc.left(), 5);
        assert_eq!(push(&mut pc, 3), vec![(0, 0), (0, 1), (0, 70)]);
        assert_eq!(push(&mut pc, 10), vec![(0, 199), (1, 5)]);
        assert!(push(&mut pc, 10).is_empty());
        // A request moved the cursor past an owed page: the push comes back for it.
        let mut a = Bitmap::new(200, false);
        a.set(3);
        a.set(150);
        let mut pc = PostcopySource::new(1, vec![a], Duration::from_secs(1), None);
        pc.cursor = (0, 100);
        assert_eq!(push(&mut pc, 10), vec![(0, 150), (0, 3)]);
        assert_eq!(pc.left(), 0);
    }

    #[test]
    fn a_resumed_link_owes_exactly_what_the_destination_lacks() {
        let regions = [region(0, 1 << 20)];
        let mut a = Bitmap::new(256, false);
        a.set(9);
        let mut pc = PostcopySource::new(1, vec![a], Duration::from_secs(1), None);
        // Page 9 was sent but lost in flight; 10-12 too.
        pc.owe_exactly(&regions, &[(9, 4)]).unwrap();
        assert_eq!(pc.left(), 4);
        assert!(matches!(pc.owe_exactly(&regions, &[(1 << 40, 1)]), Err(PostcopyError::BadFrame(_))));
    }
}
