//! The disk workload and its verifier: lane 0 only, polled from lane 0's main loop.
//!
//! The disk region (`disk_mib`, from sector 0) is cut into 4 KiB blocks. `disk_qd` slots each own
//! the blocks `b` with `b % qd == slot` and have at most one request in flight, so two requests in
//! flight never touch the same block (the contract Ferry relies on to replay in-flight requests
//! after a migration). A slot cycles: WRITE block b with the next generation, READ it back and
//! verify, READ a random other block of the slot and verify, next b; every 16th write of a slot is
//! followed by a FLUSH when the device offers it. Each slot alternates between two fixed
//! descriptor triples, so a completion for a head that is not in flight (a request completed
//! twice) is seen, and a request in flight for more than 3 s is reported as stuck (a lost
//! completion). Blocks carry a header `[block, generation, checksum, DISK_MAGIC ^ block]` and a
//! body derived from (block, generation); a generation table in guest memory says which
//! generation each block must hold (0: never written, must read as zeros). All of this state is
//! in statics, so it migrates with the guest at any instant.

use crate::clock::Clock;
use crate::config::Config;
use crate::out;
use crate::virtio::{self, Blk, Shared, DESC_NEXT, DESC_WRITE};

const BLOCK_WORDS: usize = 512;
const BLOCK_BYTES: u32 = 4096;
const SECTORS_PER_BLOCK: u64 = 8;
const HEADER_WORDS: usize = 4;
const DISK_MAGIC: u64 = 0xD15C_B10C_0000_0000;
/// Largest region: 1024 MiB of 4 KiB blocks.
const MAX_BLOCKS: usize = 1024 * 256;
pub const MAX_QD: usize = 32;
/// Two descriptor triples per slot.
const TRIPLES: usize = MAX_QD * 2;
/// DISK-FAIL lines printed at most (errors keep counting).
const MAX_FAIL_LINES: u64 = 32;
/// A request in flight longer than this (in guest running time) is reported as stuck.
const STUCK_MS: u64 = 3000;
/// Longest step of the running-time clock per poll: a longer gap is the guest being stopped
/// (paused for a migration or a snapshot), during which the device is stopped too.
const MAX_STEP_MS: u64 = 100;
/// Generation-table bit marking a block found bad on a read-only device (it cannot be rewritten,
/// so it is not verified again: each corruption counts once).
const POISON: u32 = 1 << 31;

// virtio-blk request types and statuses.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const ST_OK: u8 = 0;
/// Written before a request is submitted: a device that completes without a status is seen.
const ST_NONE: u8 = 0xff;

// What a slot does next (also the kind of a request).
const K_WRITE: u8 = 1;
const K_FLUSH: u8 = 2;
const K_READBACK: u8 = 3;
const K_READOTHER: u8 = 4;

#[repr(C, align(4096))]
struct Bufs([[u64; BLOCK_WORDS]; TRIPLES]);

#[repr(C)]
#[derive(Clone, Copy)]
struct ReqHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

#[repr(C, align(64))]
struct Headers([ReqHeader; TRIPLES]);

#[repr(C, align(64))]
struct Statuses([u8; TRIPLES]);

static BUFS: Shared<Bufs> = Shared::new(Bufs([[0; BLOCK_WORDS]; TRIPLES]));
static HEADERS: Shared<Headers> = Shared::new(Headers([ReqHeader { kind: 0, reserved: 0, sector: 0 }; TRIPLES]));
static STATUSES: Shared<Statuses> = Shared::new(Statuses([0; TRIPLES]));
/// Generation of each block (0 = never written).
static GENS: Shared<[u32; MAX_BLOCKS]> = Shared::new([0; MAX_BLOCKS]);

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    /// Triple (0/1) the next request uses.
    next_triple: u8,
    phase: u8,
    /// Index of the current block among the slot's blocks (block = slot + cursor * qd).
    cursor: u32,
    /// Block the current cycle writes and reads back (the cursor's block, or one being healed).
    target: u32,
    writes: u32,
}

#[derive(Clone, Copy)]
struct Req {
    inflight: bool,
    stuck: bool,
    kind: u8,
    block: u32,
    want_gen: u32,
    /// TSC at submission (latency).
    t_submit: u64,
    /// Running-time clock at submission (stuck detection).
    a_submit: u64,
}

struct State {
    enabled: bool,
    blk: Blk,
    qd: u32,
    blocks: u32,
    hz: u64,
    /// TSC cycles per written block at disk_rate; 0 = unlimited.
    cycles_per_block: u64,
    rate_t0: u64,
    rate_done: u64,
    /// Running-time clock (TSC cycles, gaps longer than MAX_STEP_MS count as MAX_STEP_MS).
    active: u64,
    last_poll: u64,
    max_step: u64,
    stuck_cycles: u64,
    rng: u64,
    /// First slot looked at by the next poll.
    scan: u32,
    written: u64,
    verified: u64,
    errors: u64,
    ioerr: u64,
    flushes: u64,
    fail_lines: u64,
    inflight: u32,
    /// Data requests completed OK and the largest latency since the last report.
    ops: u64,
    max_lat: u64,
    last_report: u64,
    slots: [Slot; MAX_QD],
    reqs: [Req; TRIPLES],
}

// SAFETY: State is plain integers and booleans (Blk too), for which all-zero is a valid value.
static STATE: Shared<State> = Shared::new(unsafe { core::mem::zeroed() });

#[inline(always)]
fn disk_word(block: u64, gen: u64, i: usize) -> u64 {
    let x = block.wrapping_mul(0xD6E8_FEB8_6659_FD93)
        ^ gen.wrapping_mul(0xA076_1D64_78BD_642F)
        ^ (i as u64).wrapping_mul(0xE703_7ED1_A0B4_28DB)
        ^ 0x5DEE_CE66_D1CE_4E5B;
    x ^ (x >> 29)
}

fn buf_ptr(t: usize) -> *mut u64 {
    // SAFETY: t < TRIPLES; only the address is computed.
    unsafe { core::ptr::addr_of_mut!((*BUFS.get()).0[t]) as *mut u64 }
}

fn gen_ptr(block: u32) -> *mut u32 {
    // SAFETY: block < blocks <= MAX_BLOCKS; only the address is computed.
    unsafe { core::ptr::addr_of_mut!((*GENS.get())[block as usize]) }
}

fn fill_block(p: *mut u64, block: u64, gen: u64) {
    let mut sum = 0u64;
    for i in HEADER_WORDS..BLOCK_WORDS {
        let w = disk_word(block, gen, i);
        sum = sum.wrapping_add(w).rotate_left(7);
        // SAFETY: p is a 4 KiB request buffer not in flight.
        unsafe { p.add(i).write_volatile(w) };
    }
    // SAFETY: as above; header words.
    unsafe {
        p.write_volatile(block);
        p.add(1).write_volatile(gen);
        p.add(2).write_volatile(sum);
        p.add(3).write_volatile(DISK_MAGIC ^ block);
    }
}

/// Checks a block read into `p` against generation `want`: Err((what, got_gen)).
fn check_block(p: *const u64, block: u64, want: u64) -> Result<(), (&'static str, u64)> {
    // SAFETY: p is a 4 KiB request buffer whose read has completed.
    let w = |i: usize| unsafe { p.add(i).read_volatile() };
    let (h0, h1, h2, h3) = (w(0), w(1), w(2), w(3));
    if want == 0 {
        if (0..BLOCK_WORDS).any(|i| w(i) != 0) {
            return Err(("zero", h1));
        }
        return Ok(());
    }
    if h0 != block || h3 != DISK_MAGIC ^ block {
        return Err(("header", h1));
    }
    if h1 != want {
        return Err(("generation", h1));
    }
    let mut sum = 0u64;
    for i in HEADER_WORDS..BLOCK_WORDS {
        let x = w(i);
        if x != disk_word(block, h1, i) {
            return Err(("body", h1));
        }
        sum = sum.wrapping_add(x).rotate_left(7);
    }
    if sum != h2 {
        return Err(("checksum", h1));
    }
    Ok(())
}

/// Probes the virtio-mmio devices of the command line, initialises the first block device,
/// prints `DISK-INFO` and, with `disk=1`, sets up the workload. Fatal if `disk=1` and no usable
/// device exists.
pub fn init(cfg: &Config, clock: &Clock) {
    let blk = virtio::probe(cfg);
    let Some(blk) = blk else {
        if cfg.disk {
            crate::fatal(format_args!(
                "GUEST-ERROR disk=1 but no usable virtio-blk device ({} virtio_mmio.device= on the command line)",
                cfg.mmio_count
            ));
        }
        return;
    };
    let (mut qd, mut blocks) = (0u32, 0u32);
    if cfg.disk {
        blocks = (cfg.disk_mib * 256).min(blk.capacity / SECTORS_PER_BLOCK).min(MAX_BLOCKS as u64) as u32;
        qd = cfg.disk_qd.min(blocks).min(blk.qsize as u32 / 6).min(MAX_QD as u32);
    }
    out::line(format_args!(
        "DISK-INFO capacity_sectors={} ro={} flush={} qsize={} base={:#x} irq={} qd={} blocks={}",
        blk.capacity, blk.ro as u8, blk.flush as u8, blk.qsize, blk.base, blk.irq, qd, blocks
    ));
    if !cfg.disk {
        return;
    }
    if blocks == 0 {
        crate::fatal(format_args!("GUEST-ERROR disk=1 but the disk holds no 4 KiB block"));
    }
    if qd == 0 {
        crate::fatal(format_args!("GUEST-ERROR disk=1 but the queue ({} entries) is too small", blk.qsize));
    }
    // SAFETY: lane 0 only, before the workload starts; no other reference to STATE exists.
    let s = unsafe { &mut *STATE.get() };
    let now = clock.now();
    s.blk = blk;
    s.qd = qd;
    s.blocks = blocks;
    s.hz = clock.hz;
    s.cycles_per_block = if cfg.disk_rate > 0 { (clock.hz / (cfg.disk_rate * 256)).max(1) } else { 0 };
    s.rate_t0 = now;
    s.last_poll = now;
    s.max_step = clock.ms_to_cycles(MAX_STEP_MS);
    s.stuck_cycles = clock.ms_to_cycles(STUCK_MS);
    s.last_report = now;
    s.rng = 0x9E37_79B9_7F4A_7C15 ^ now;
    for q in 0..qd {
        let count = s.slot_blocks(q);
        let start = (s.next_rand() % count as u64) as u32;
        s.slots[q as usize] =
            Slot { busy: false, next_triple: 0, phase: K_WRITE, cursor: start, target: q + start * qd, writes: 0 };
    }
    s.enabled = true;
}

/// One step of the disk workload: harvest completions, then submit what is due, then one
/// QueueNotify if anything was submitted. Never blocks.
pub fn poll(clock: &Clock) {
    // SAFETY: lane 0 only; the reference lives for this call and no other one exists meanwhile.
    let s = unsafe { &mut *STATE.get() };
    if !s.enabled {
        return;
    }
    let now = clock.now();
    s.active += now.saturating_sub(s.last_poll).min(s.max_step);
    s.last_poll = now;

    while let Some(id) = s.blk.pop() {
        s.complete(id, now);
    }

    for t in 0..(s.qd as usize * 2) {
        let r = &mut s.reqs[t];
        if r.inflight && !r.stuck && s.active.saturating_sub(r.a_submit) > s.stuck_cycles {
            r.stuck = true;
            let (block, want) = (r.block, r.want_gen);
            s.fail(block, want, 0, "stuck");
        }
    }

    // Slots in turn from a rotating start, so with disk_rate the write tokens go round.
    let mut submitted = false;
    s.scan = (s.scan + 1) % s.qd;
    for i in 0..s.qd {
        let q = (s.scan + i) % s.qd;
        if !s.slots[q as usize].busy && s.submit(q, now) {
            submitted = true;
        }
    }
    if submitted {
        s.blk.publish();
    }
}

/// The REPORT line's disk suffix (empty without the disk workload). Resets the interval figures.
pub fn report_suffix(now: u64) -> Suffix {
    // SAFETY: lane 0 only (the reporter runs there, between polls).
    let s = unsafe { &mut *STATE.get() };
    if !s.enabled {
        return Suffix(None);
    }
    let dt = now.saturating_sub(s.last_report).max(1);
    let iops = (s.ops as u128 * s.hz as u128 / dt as u128) as u64;
    // MiB/s with one decimal: 256 blocks per MiB.
    let tenths = (s.ops as u128 * 10 * s.hz as u128 / dt as u128 / 256) as u64;
    let max_lat_us = (s.max_lat as u128 * 1_000_000 / s.hz.max(1) as u128) as u64;
    s.ops = 0;
    s.max_lat = 0;
    s.last_report = now;
    Suffix(Some(SuffixData {
        written: s.written,
        verified: s.verified,
        errors: s.errors,
        ioerr: s.ioerr,
        flushes: s.flushes,
        inflight: s.inflight,
        iops,
        tenths,
        max_lat_us,
    }))
}

struct SuffixData {
    written: u64,
    verified: u64,
    errors: u64,
    ioerr: u64,
    flushes: u64,
    inflight: u32,
    iops: u64,
    tenths: u64,
    max_lat_us: u64,
}

pub struct Suffix(Option<SuffixData>);

impl core::fmt::Display for Suffix {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let Some(d) = &self.0 else { return Ok(()) };
        write!(
            f,
            " DISK written={} verified={} errors={} ioerr={} flushes={} inflight={} iops={} mib_s={}.{} max_lat_us={}",
            d.written,
            d.verified,
            d.errors,
            d.ioerr,
            d.flushes,
            d.inflight,
            d.iops,
            d.tenths / 10,
            d.tenths % 10,
            d.max_lat_us
        )
    }
}

impl State {
    fn next_rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// Number of blocks slot `q` owns.
    fn slot_blocks(&self, q: u32) -> u32 {
        (self.blocks - q).div_ceil(self.qd)
    }

    fn fail(&mut self, block: u32, want: u32, got: u64, what: &str) {
        self.errors += 1;
        self.fail_lines += 1;
        if self.fail_lines <= MAX_FAIL_LINES {
            out::line(format_args!("DISK-FAIL block={block} want_gen={want} got_gen={got} what={what}"));
        }
    }

    /// May a write start now (disk_rate)? Takes a token if so. No bursts to catch up after a
    /// stop: at most `qd` tokens are saved up.
    fn take_write_token(&mut self, now: u64) -> bool {
        if self.cycles_per_block == 0 {
            return true;
        }
        let allowed = now.saturating_sub(self.rate_t0) / self.cycles_per_block;
        let burst = self.qd as u64;
        if allowed > self.rate_done + burst {
            self.rate_done = allowed - burst;
        }
        if self.rate_done < allowed {
            self.rate_done += 1;
            true
        } else {
            false
        }
    }

    /// Submits slot `q`'s next request (pushed, not yet published). False if it is not due.
    fn submit(&mut self, q: u32, now: u64) -> bool {
        let sl = self.slots[q as usize];
        let kind = sl.phase;
        if kind == K_WRITE && !self.take_write_token(now) {
            return false;
        }
        let t = q as usize * 2 + sl.next_triple as usize;
        let head = (t * 3) as u16;
        let buf = buf_ptr(t);
        let (block, want_gen, rtype) = match kind {
            K_WRITE => {
                let b = sl.target;
                // SAFETY: b < blocks; the generation table is lane 0's.
                let gen = (unsafe { gen_ptr(b).read_volatile() } & !POISON) + 1;
                fill_block(buf, b as u64, gen as u64);
                (b, gen, T_OUT)
            }
            K_FLUSH => (sl.target, 0, T_FLUSH),
            _ => {
                let b = if kind == K_READBACK {
                    sl.target
                } else {
                    let count = self.slot_blocks(q);
                    let own = (sl.target - q) / self.qd;
                    let k = if count > 1 {
                        (own + 1 + (self.next_rand() % (count as u64 - 1)) as u32) % count
                    } else {
                        own
                    };
                    q + k * self.qd
                };
                // Poison the buffer so a read that completes without data is seen.
                for i in 0..BLOCK_WORDS {
                    // SAFETY: buf is a 4 KiB request buffer not in flight.
                    unsafe { buf.add(i).write_volatile(0xBAD0_BAD0_BAD0_BAD0) };
                }
                // SAFETY: b < blocks.
                (b, unsafe { gen_ptr(b).read_volatile() }, T_IN)
            }
        };
        // SAFETY: header and status of triple t, not in flight.
        let (hdr, status) = unsafe {
            let hdr = core::ptr::addr_of_mut!((*HEADERS.get()).0[t]);
            let sector = if rtype == T_FLUSH { 0 } else { block as u64 * SECTORS_PER_BLOCK };
            hdr.write_volatile(ReqHeader { kind: rtype, reserved: 0, sector });
            let status = core::ptr::addr_of_mut!((*STATUSES.get()).0[t]);
            status.write_volatile(ST_NONE);
            (hdr as u64, status as u64)
        };
        let blk = &self.blk;
        if rtype == T_FLUSH {
            blk.set_desc(head, hdr, 16, DESC_NEXT, head + 2);
        } else {
            blk.set_desc(head, hdr, 16, DESC_NEXT, head + 1);
            let wflag = if rtype == T_IN { DESC_WRITE } else { 0 };
            blk.set_desc(head + 1, buf as u64, BLOCK_BYTES, DESC_NEXT | wflag, head + 2);
        }
        blk.set_desc(head + 2, status, 1, DESC_WRITE, 0);
        self.reqs[t] =
            Req { inflight: true, stuck: false, kind, block, want_gen, t_submit: now, a_submit: self.active };
        let sl = &mut self.slots[q as usize];
        sl.busy = true;
        sl.next_triple ^= 1;
        self.inflight += 1;
        self.blk.push(head);
        true
    }

    /// A completion for chain head `id`.
    fn complete(&mut self, id: u32, now: u64) {
        let t = (id / 3) as usize;
        if !id.is_multiple_of(3) || t >= self.qd as usize * 2 {
            self.fail(0, 0, 0, "dup");
            return;
        }
        let r = self.reqs[t];
        if !r.inflight {
            self.fail(r.block, r.want_gen, 0, "dup");
            return;
        }
        self.reqs[t].inflight = false;
        self.inflight -= 1;
        let q = (t / 2) as u32;
        self.slots[q as usize].busy = false;
        let lat = now.saturating_sub(r.t_submit);
        // SAFETY: the device wrote the status before publishing the used entry (read after it).
        let status = unsafe { core::ptr::addr_of!((*STATUSES.get()).0[t]).read_volatile() };
        let ok = status == ST_OK;
        if ok && r.kind != K_FLUSH {
            self.ops += 1;
            self.max_lat = self.max_lat.max(lat);
        }
        let ro = self.blk.ro;
        let b = r.block;
        match r.kind {
            K_WRITE => {
                self.slots[q as usize].writes += 1;
                if ok {
                    // SAFETY: b < blocks.
                    unsafe { gen_ptr(b).write_volatile(r.want_gen) };
                    self.written += 1;
                    if ro {
                        self.fail(b, r.want_gen - 1, r.want_gen as u64, "ro-write");
                    }
                } else {
                    self.ioerr += 1;
                    if !ro {
                        // The block's content is unknown now: write it again (heal).
                        self.fail(b, r.want_gen, 0, "ioerr");
                        return;
                    }
                }
                let sl = &mut self.slots[q as usize];
                sl.phase = if self.blk.flush && sl.writes.is_multiple_of(16) { K_FLUSH } else { K_READBACK };
            }
            K_FLUSH => {
                if ok {
                    self.flushes += 1;
                } else {
                    self.ioerr += 1;
                    if !ro {
                        self.fail(b, 0, 0, "ioerr");
                    }
                }
                self.slots[q as usize].phase = K_READBACK;
            }
            _ => {
                if !ok {
                    self.ioerr += 1;
                    self.fail(b, r.want_gen, 0, "ioerr");
                } else if r.want_gen & POISON == 0 {
                    self.verified += 1;
                    if let Err((what, got)) = check_block(buf_ptr(t), b as u64, r.want_gen as u64) {
                        self.fail(b, r.want_gen, got, what);
                        if ro {
                            // SAFETY: b < blocks.
                            unsafe { gen_ptr(b).write_volatile(r.want_gen | POISON) };
                        } else {
                            // Heal: rewrite it (new generation), read it back, then go on.
                            let sl = &mut self.slots[q as usize];
                            sl.target = b;
                            sl.phase = K_WRITE;
                            return;
                        }
                    }
                }
                let sl = &mut self.slots[q as usize];
                if r.kind == K_READBACK {
                    sl.phase = K_READOTHER;
                } else {
                    // End of the cycle: on to the next block, unless the cycle healed another.
                    let count = (self.blocks - q).div_ceil(self.qd);
                    if sl.target == q + sl.cursor * self.qd {
                        sl.cursor = (sl.cursor + 1) % count;
                    }
                    sl.target = q + sl.cursor * self.qd;
                    sl.phase = K_WRITE;
                }
            }
        }
    }
}
