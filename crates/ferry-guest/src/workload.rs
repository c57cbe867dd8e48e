//! The workload and its verifier, one lane per CPU, all in ring 3.
//!
//! Every page of the working set carries a header `[page number, generation, checksum, magic]`
//! and a body derived from (page number, generation). A generation table (one u32 per page, in
//! guest memory, so it migrates too) says which generation each page must hold. A lane writes its
//! own pages at the configured rate and, between writes, verifies its pages one after another:
//! header, generation against the table, checksum and every body word. At the end of each full
//! pass it cross-checks the table itself: the sum of its lane's generations must equal a counter
//! kept in another page, so a lost write to the table is caught too, not only a lost data page.
//! A page found bad is reported once (`VERIFY-FAIL`) and rewritten, so `errors=` counts events.
//!
//! Broken pages: a machine check (the VMM's, when a lane touched a page whose memory is broken)
//! arrives in [`machine_check`] with the page's address. The page is printed once
//! (`MCE gpa=0x…`), counted (`broken=`), never touched again, and left out of verification and
//! of the table cross-check; the lane then resumes its loop (what it was doing with that page
//! is dropped).

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};

use crate::clock::Clock;
use crate::config::{Config, Pattern, StartInfo};
use crate::out;
use crate::MAX_CPUS;

const PAGE: u64 = 4096;
const WORDS: usize = 512;
const HEADER_WORDS: usize = 4;
const MAGIC: u64 = 0xF3EE_7A6E_0000_0000;
/// VERIFY-FAIL lines printed per lane at most (errors keep counting).
const MAX_FAIL_LINES: u64 = 32;

extern "C" {
    static __image_end: u8;
}

/// Per-lane counters, each lane on its own cache line. They live in guest memory and keep
/// counting across migrations.
#[repr(C, align(64))]
struct Lane {
    written: AtomicU64,
    verified: AtomicU64,
    errors: AtomicU64,
    max_gap: AtomicU64,
    /// Sum of this lane's generation-table entries as the lane believes it to be.
    gen_sum: AtomicU64,
    fail_lines: AtomicU64,
    passes: AtomicU64,
    /// Next page (lane-relative) the fill writes; the fill is done at the lane's page count.
    fill_next: AtomicU64,
    /// A page of this lane's generation table broke: take the next cross-check's sum as is.
    resync: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const LANE_INIT: Lane = Lane {
    written: AtomicU64::new(0),
    verified: AtomicU64::new(0),
    errors: AtomicU64::new(0),
    max_gap: AtomicU64::new(0),
    gen_sum: AtomicU64::new(0),
    fail_lines: AtomicU64::new(0),
    passes: AtomicU64::new(0),
    fill_next: AtomicU64::new(0),
    resync: AtomicBool::new(false),
};
static LANES: [Lane; MAX_CPUS] = [LANE_INIT; MAX_CPUS];

/// Shared setup published by the bootstrap processor; `GO` (lane count) is set last.
static GO: AtomicU32 = AtomicU32::new(0);
static WS_BASE: AtomicU64 = AtomicU64::new(0);
static TABLE_BASE: AtomicU64 = AtomicU64::new(0);
static WS_PAGES: AtomicU64 = AtomicU64::new(0);
static CLOCK_HZ: AtomicU64 = AtomicU64::new(0);
static CLOCK_T0: AtomicU64 = AtomicU64::new(0);
static CFG_RATE: AtomicU64 = AtomicU64::new(0);
static CFG_PATTERN: AtomicU32 = AtomicU32::new(0);
static CFG_HB_US: AtomicU64 = AtomicU64::new(0);
static CFG_REPORT_MS: AtomicU64 = AtomicU64::new(0);

/// Guest frames below 4 GiB that are broken (one bit each); the working set lies there.
const FRAMES: usize = 1 << 20;
static BROKEN: [AtomicU64; FRAMES / 64] = [const { AtomicU64::new(0) }; FRAMES / 64];
/// Pages seen broken (each once).
static BROKEN_COUNT: AtomicU64 = AtomicU64::new(0);

fn is_broken(addr: u64) -> bool {
    let f = (addr / PAGE) as usize;
    f < FRAMES && BROKEN[f / 64].load(Relaxed) & (1 << (f % 64)) != 0
}

/// Marks the frame holding `addr` broken; returns whether it was not already.
fn mark_broken(addr: u64) -> bool {
    let f = (addr / PAGE) as usize;
    f < FRAMES && BROKEN[f / 64].fetch_or(1 << (f % 64), AcqRel) & (1 << (f % 64)) == 0
}

struct Geometry {
    ws_base: u64,
    table_base: u64,
    /// First page (global page number) and count of this lane.
    first: u64,
    count: u64,
}

pub fn bsp_main(cfg: Config, info: &StartInfo, clock: Clock, lanes: usize) -> ! {
    // Working set: generation table then pages, in the RAM region holding the image end.
    // SAFETY: __image_end is a linker symbol; only its address is used.
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let pages = cfg.mib * 256;
    let table_bytes = (pages * 4).div_ceil(PAGE) * PAGE;
    let table_base = image_end.div_ceil(2 << 20) * (2 << 20);
    let ws_base = table_base + table_bytes;
    let ws_end = ws_base + pages * PAGE;
    let region = info.ram[..info.ram_count].iter().find(|&&(a, s)| a <= image_end && image_end < a + s);
    let ram_top = match region {
        Some(&(a, s)) => (a + s).min(4 << 30),
        None => crate::fatal(format_args!("GUEST-ERROR no RAM region holds the guest image")),
    };
    if ws_end > ram_top {
        crate::fatal(format_args!(
            "GUEST-ERROR working set of {} MiB does not fit: {} MiB of RAM free above the image",
            cfg.mib,
            ram_top.saturating_sub(ws_base) >> 20
        ));
    }
    out::line(format_args!(
        "BOOT ferry-guest lanes={} mib={} rate={} pattern={} hb_us={} report_ms={} tsc_khz={} ws={:#x}-{:#x}",
        lanes,
        cfg.mib,
        cfg.rate,
        cfg.pattern.name(),
        cfg.hb_us,
        cfg.report_ms,
        clock.hz / 1000,
        ws_base,
        ws_end
    ));
    if cfg.word_bits < 64 {
        out::line(format_args!("CONFIG word_bits={}", cfg.word_bits));
        WORD_MASK.store((1u64 << cfg.word_bits) - 1, Relaxed);
    }
    WS_BASE.store(ws_base, Relaxed);
    TABLE_BASE.store(table_base, Relaxed);
    WS_PAGES.store(pages, Relaxed);
    CLOCK_HZ.store(clock.hz, Relaxed);
    CLOCK_T0.store(clock.t0, Relaxed);
    CFG_RATE.store(cfg.rate as u64, Relaxed);
    CFG_PATTERN.store(cfg.pattern as u32, Relaxed);
    CFG_HB_US.store(cfg.hb_us, Relaxed);
    CFG_REPORT_MS.store(cfg.report_ms, Relaxed);
    crate::disk::init(&cfg, &clock);
    crate::hostile::init(&cfg, &clock);
    GO.store(lanes as u32, Release);
    run_lane(0, lanes, cfg, clock)
}

/// The configuration every lane runs with (lane 0 also prints heartbeats and reports).
fn lane_config(lane: usize) -> (Config, Clock) {
    let clock = Clock { hz: CLOCK_HZ.load(Relaxed), t0: CLOCK_T0.load(Relaxed) };
    let pattern = match CFG_PATTERN.load(Relaxed) {
        1 => Pattern::Random,
        2 => Pattern::Hot,
        _ => Pattern::Seq,
    };
    let (hb_us, report_ms) = if lane == 0 { (CFG_HB_US.load(Relaxed), CFG_REPORT_MS.load(Relaxed)) } else { (0, 0) };
    let cfg = Config {
        mib: WS_PAGES.load(Relaxed) / 256,
        rate: CFG_RATE.load(Relaxed) as i64,
        pattern,
        hb_us,
        report_ms,
        ..Config::defaults()
    };
    (cfg, clock)
}

/// The machine check of CPU `cpu`: it touched the broken page at `gpa`. The page is printed
/// and counted once and never used again; the lane resumes its loop.
pub fn machine_check(cpu: usize, gpa: u64) -> ! {
    let page_addr = gpa & !(PAGE - 1);
    let lanes = GO.load(Acquire) as usize;
    if gpa == 0 {
        out::line(format_args!("MCE gpa=unknown cpu={cpu}"));
    } else if mark_broken(page_addr) {
        BROKEN_COUNT.fetch_add(1, Relaxed);
        out::line(format_args!("MCE gpa={page_addr:#x}"));
        let (ws_base, table_base, pages) = (WS_BASE.load(Relaxed), TABLE_BASE.load(Relaxed), WS_PAGES.load(Relaxed));
        if lanes > 0 && page_addr >= ws_base && page_addr < ws_base + pages * PAGE {
            // A data page: its lane's table sum no longer counts it.
            let page = (page_addr - ws_base) / PAGE;
            let lane = ((page + 1) * lanes as u64 - 1) / pages;
            let entry = table_base + page * 4;
            if !is_broken(entry) {
                // SAFETY: the page's table entry, in a table page that is not broken.
                let gen = unsafe { (entry as *const u32).read_volatile() } as u64;
                LANES[lane.min(lanes as u64 - 1) as usize].gen_sum.fetch_sub(gen, Relaxed);
            }
        } else if lanes > 0 && page_addr >= table_base && page_addr < ws_base {
            // A page of the generation table: the lanes it serves recount at their next pass.
            for l in &LANES[..lanes] {
                l.resync.store(true, Relaxed);
            }
        }
    }
    if lanes == 0 || cpu >= lanes {
        // Not running a lane (yet): nothing to resume.
        loop {
            core::hint::spin_loop();
        }
    }
    let (cfg, clock) = lane_config(cpu);
    run_lane(cpu, lanes, cfg, clock)
}

pub fn ap_main(cpu: usize) -> ! {
    let lanes = loop {
        let g = GO.load(Acquire);
        if g != 0 {
            break g as usize;
        }
        core::hint::spin_loop();
    };
    if cpu >= lanes {
        // Came up too late to get a lane: stay out of the way.
        loop {
            core::hint::spin_loop();
        }
    }
    let (cfg, clock) = lane_config(cpu);
    run_lane(cpu, lanes, cfg, clock)
}

/// The bits of a body word that carry data (`word_bits`; the others are zero).
static WORD_MASK: AtomicU64 = AtomicU64::new(u64::MAX);

#[inline(always)]
fn body_word(page: u64, gen: u64, i: usize, mask: u64) -> u64 {
    let x = page.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ gen.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (i as u64).wrapping_mul(0x1656_67B1_9E37_79F9);
    (x ^ (x >> 31)) & mask
}

impl Geometry {
    fn page_ptr(&self, page: u64) -> *mut u64 {
        (self.ws_base + page * PAGE) as *mut u64
    }
    fn gen_ptr(&self, page: u64) -> *mut u32 {
        (self.table_base + page * 4) as *mut u32
    }
    /// Neither the page nor its table entry is broken.
    fn usable(&self, page: u64) -> bool {
        !is_broken(self.ws_base + page * PAGE) && !is_broken(self.table_base + page * 4)
    }
}

fn write_page(g: &Geometry, page: u64, gen: u64) {
    let p = g.page_ptr(page);
    let mask = WORD_MASK.load(Relaxed);
    let mut sum = 0u64;
    for i in HEADER_WORDS..WORDS {
        let w = body_word(page, gen, i, mask);
        sum = sum.wrapping_add(w).rotate_left(7);
        // SAFETY: p points to a page of the working set, owned by this lane.
        unsafe { p.add(i).write_volatile(w) };
    }
    // SAFETY: as above; header words.
    unsafe {
        p.write_volatile(page);
        p.add(1).write_volatile(gen);
        p.add(2).write_volatile(sum);
        p.add(3).write_volatile(MAGIC ^ page);
    }
}

/// What was wrong with a page.
struct Fail {
    what: &'static str,
    got_gen: u64,
    offset: usize,
}

fn check_page(g: &Geometry, page: u64, want_gen: u64) -> Result<(), Fail> {
    let p = g.page_ptr(page);
    // SAFETY: p points to a page of the working set, owned by this lane.
    let (h0, h1, h2, h3) =
        unsafe { (p.read_volatile(), p.add(1).read_volatile(), p.add(2).read_volatile(), p.add(3).read_volatile()) };
    if h0 != page || h3 != MAGIC ^ page {
        return Err(Fail { what: "header", got_gen: h1, offset: 0 });
    }
    if h1 != want_gen {
        return Err(Fail { what: "generation", got_gen: h1, offset: 8 });
    }
    let mask = WORD_MASK.load(Relaxed);
    let mut sum = 0u64;
    for i in HEADER_WORDS..WORDS {
        // SAFETY: as above.
        let w = unsafe { p.add(i).read_volatile() };
        if w != body_word(page, h1, i, mask) {
            return Err(Fail { what: "body", got_gen: h1, offset: i * 8 });
        }
        sum = sum.wrapping_add(w).rotate_left(7);
    }
    if sum != h2 {
        return Err(Fail { what: "checksum", got_gen: h1, offset: 16 });
    }
    Ok(())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Lane 0's printing duties.
struct Reporter {
    hb_cycles: u64,
    report_cycles: u64,
    next_hb: u64,
    next_report: u64,
    last_written: u64,
    last_t: u64,
    lanes: usize,
}

static HB_SEQ: AtomicU64 = AtomicU64::new(0);

impl Reporter {
    fn poll(&mut self, now: u64, clock: &Clock) {
        if now >= self.next_hb {
            let seq = HB_SEQ.fetch_add(1, Relaxed);
            out::line(format_args!("HB {seq}"));
            self.next_hb = now + self.hb_cycles;
        }
        if now >= self.next_report {
            self.report(now, clock);
            self.next_report = now + self.report_cycles;
        }
    }

    fn report(&mut self, now: u64, clock: &Clock) {
        let (mut w, mut v, mut e, mut gap) = (0u64, 0u64, 0u64, 0u64);
        for l in &LANES[..self.lanes] {
            w += l.written.load(Relaxed);
            v += l.verified.load(Relaxed);
            e += l.errors.load(Relaxed);
            gap = gap.max(l.max_gap.swap(0, Relaxed));
        }
        let dt = now.saturating_sub(self.last_t).max(1);
        let dw = w.saturating_sub(self.last_written);
        // MiB/s with one decimal: pages * 4096 / 2^20 = pages / 256.
        let tenths = (dw as u128 * 10 * clock.hz as u128 / dt as u128 / 256) as u64;
        self.last_t = now;
        self.last_written = w;
        let mut lanes_buf = LaneList { lanes: self.lanes };
        out::line(format_args!(
            "REPORT t_ms={} written={} verified={} errors={} broken={} rate_mib_s={}.{} max_gap_us={} lanes={}{}{}",
            clock.ms_since_boot(),
            w,
            v,
            e,
            BROKEN_COUNT.load(Relaxed),
            tenths / 10,
            tenths % 10,
            clock.cycles_to_us(gap),
            self.lanes,
            LaneFmt(&mut lanes_buf),
            crate::disk::report_suffix(now)
        ));
    }
}

struct LaneList {
    lanes: usize,
}
struct LaneFmt<'a>(&'a mut LaneList);
impl core::fmt::Display for LaneFmt<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, l) in LANES[..self.0.lanes].iter().enumerate() {
            write!(
                f,
                " lane{}={}/{}/{}",
                i,
                l.written.load(Relaxed),
                l.verified.load(Relaxed),
                l.errors.load(Relaxed)
            )?;
        }
        Ok(())
    }
}

fn run_lane(lane: usize, lanes: usize, cfg: Config, clock: Clock) -> ! {
    let pages = WS_PAGES.load(Relaxed);
    let first = pages * lane as u64 / lanes as u64;
    let last = pages * (lane as u64 + 1) / lanes as u64;
    let g =
        Geometry { ws_base: WS_BASE.load(Relaxed), table_base: TABLE_BASE.load(Relaxed), first, count: last - first };
    let st = &LANES[lane];
    let mut rep = if lane == 0 {
        let now = clock.now();
        Some(Reporter {
            hb_cycles: clock.us_to_cycles(cfg.hb_us),
            report_cycles: clock.ms_to_cycles(cfg.report_ms),
            next_hb: now,
            next_report: now + clock.ms_to_cycles(cfg.report_ms),
            last_written: 0,
            last_t: now,
            lanes,
        })
    } else {
        None
    };

    // Fill: every page written once with non-zero data, generation 1 (resumed where it was
    // after a machine check).
    loop {
        let i = st.fill_next.load(Relaxed);
        if i >= g.count {
            break;
        }
        let page = g.first + i;
        if g.usable(page) {
            write_page(&g, page, 1);
            // SAFETY: the table entry of a page of this lane.
            unsafe { g.gen_ptr(page).write_volatile(1) };
            st.gen_sum.fetch_add(1, Relaxed);
            st.written.fetch_add(1, Relaxed);
        }
        st.fill_next.store(i + 1, Relaxed);
        if i.is_multiple_of(32) {
            if let Some(r) = rep.as_mut() {
                r.poll(clock.now(), &clock);
            }
        }
    }

    // Writes due per cycle: rate MiB/s shared by the lanes (256 pages per MiB).
    let cycles_per_page = if cfg.rate > 0 {
        let pps = (cfg.rate as u64 * 256 / lanes as u64).max(1);
        (clock.hz / pps).max(1)
    } else {
        0
    };
    let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ ((lane as u64 + 1) << 32) ^ clock.now());
    let mut write_cursor = 0u64;
    let mut verify_cursor = 0u64;
    let mut rate_t0 = clock.now();
    let mut rate_done = 0u64;
    let mut last = clock.now();
    loop {
        let now = clock.now();
        let gap = now.saturating_sub(last);
        if gap > st.max_gap.load(Relaxed) {
            st.max_gap.store(gap, Relaxed);
        }
        last = now;
        if let Some(r) = rep.as_mut() {
            r.poll(now, &clock);
            crate::disk::poll(&clock);
            crate::hostile::poll(&clock);
        }

        let mut to_write = match cfg.rate {
            -1 => 0,
            0 => 8,
            _ => {
                let due = (now - rate_t0) / cycles_per_page;
                if due > rate_done + 4096 {
                    // We were stopped (e.g. paused for migration): do not burst to catch up.
                    rate_t0 = now;
                    rate_done = 0;
                    0
                } else {
                    (due - rate_done.min(due)).min(64)
                }
            }
        };
        rate_done += to_write;
        while to_write > 0 {
            let i = match cfg.pattern {
                Pattern::Seq => {
                    write_cursor = (write_cursor + 1) % g.count;
                    write_cursor
                }
                Pattern::Random => rng.next() % g.count,
                Pattern::Hot => {
                    let r = rng.next();
                    if !r.is_multiple_of(10) {
                        (r >> 8) % (g.count / 10).max(1)
                    } else {
                        (r >> 8) % g.count
                    }
                }
            };
            let page = g.first + i;
            to_write -= 1;
            if !g.usable(page) {
                continue;
            }
            // SAFETY: the table entry of a page of this lane.
            let gen = unsafe { g.gen_ptr(page).read_volatile() } as u64 + 1;
            write_page(&g, page, gen);
            // SAFETY: as above.
            unsafe { g.gen_ptr(page).write_volatile(gen as u32) };
            st.gen_sum.fetch_add(1, Relaxed);
            st.written.fetch_add(1, Relaxed);
        }

        // Verify a few pages.
        for _ in 0..4 {
            let page = g.first + verify_cursor;
            let want = if g.usable(page) {
                // SAFETY: the table entry of a page of this lane.
                (unsafe { g.gen_ptr(page).read_volatile() }) as u64
            } else {
                0
            };
            if want == 0 {
                // Broken (or its table entry is): not verified, not counted.
            } else if let Err(f) = check_page(&g, page, want) {
                st.errors.fetch_add(1, Relaxed);
                if st.fail_lines.fetch_add(1, Relaxed) < MAX_FAIL_LINES {
                    out::line(format_args!(
                        "VERIFY-FAIL page={} want_gen={} got_gen={} lane={} what={} offset={}",
                        page, want, f.got_gen, lane, f.what, f.offset
                    ));
                }
                // Heal it so each corruption counts once.
                let gen = want + 1;
                write_page(&g, page, gen);
                // SAFETY: as above.
                unsafe { g.gen_ptr(page).write_volatile(gen as u32) };
                st.gen_sum.fetch_add(1, Relaxed);
            }
            if want != 0 {
                st.verified.fetch_add(1, Relaxed);
            }
            verify_cursor += 1;
            if verify_cursor == g.count {
                // Table cross-check. Writes during the pass changed entries already summed, so
                // compare against a fresh sum now (cheap: one u32 per page).
                let mut sum = 0u64;
                for i in 0..g.count {
                    if g.usable(g.first + i) {
                        // SAFETY: the table entries of this lane.
                        sum += unsafe { g.gen_ptr(g.first + i).read_volatile() } as u64;
                    }
                }
                let want = st.gen_sum.load(Relaxed);
                if st.resync.swap(false, Relaxed) {
                    // A table page broke: what it held is gone; count from what is left.
                    st.gen_sum.store(sum, Relaxed);
                } else if sum != want {
                    st.errors.fetch_add(1, Relaxed);
                    if st.fail_lines.fetch_add(1, Relaxed) < MAX_FAIL_LINES {
                        out::line(format_args!(
                            "VERIFY-FAIL page=table want_gen={} got_gen={} lane={} what=table-sum offset=0",
                            want, sum, lane
                        ));
                    }
                    st.gen_sum.store(sum, Relaxed);
                }
                st.passes.fetch_add(1, Relaxed);
                verify_cursor = 0;
            }
        }
    }
}
