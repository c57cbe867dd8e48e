//! The hostile driver (`hostile=1`): lane 0 attacks the virtio-blk device instead of running the
//! disk workload, while every lane's memory workload and verifier go on. It tests the VMM, not
//! the guest: whatever the driver does to its own device, the VMM must stay up and bounded, fail
//! the device (NEEDS_RESET) or the request (IOERR), and affect nothing else (the memory verifier
//! stays clean, heartbeats keep coming).
//!
//! One attack runs per step (every [`STEP_MS`]); each is published on the live queue (or is a
//! burst of register writes) and then watched for up to [`WATCH_MS`]: completed (the device put
//! the chain in the used ring), NEEDS_RESET set, or neither. After an attack that broke the
//! device, and after register garbage, the driver resets the device and sets it up again, as a
//! real driver recovering would; a device that does not come back ends the guest
//! (`GUEST-ERROR hostile: …`). After the last kind of a round, a `FLOOD` line (4000 bytes) and a
//! `HOSTILE` line with the counts so far (docs/guest.md).

use crate::clock::Clock;
use crate::config::{Config, MmioDevice};
use crate::out;
use crate::virtio::{self, Blk, Shared, DESC_NEXT, DESC_WRITE};

/// Time between attacks.
const STEP_MS: u64 = 20;
/// How long an attack's outcome is watched for at most: a device answers in about a
/// millisecond; the margin covers a host that stalls the device thread for a while (this one
/// stalls every CPU for tens of milliseconds after a large free), so that "ignored" means the
/// device never answered.
const WATCH_MS: u64 = 250;
/// Attack kinds, in the order a round runs them.
const KINDS: u32 = 9;
/// Guest-physical addresses far outside any RAM Ferry gives (the top of the 52-bit space).
const NOWHERE: u64 = 0x000F_FFFF_FFFF_F000;

/// A page for the attacks' headers and buffers (the device may write into it; nothing reads it).
#[repr(C, align(4096))]
struct Scratch([u8; 8192]);
static SCRATCH: Shared<Scratch> = Shared::new(Scratch([0; 8192]));

struct State {
    on: bool,
    blk: Option<Blk>,
    dev: MmioDevice,
    step_cycles: u64,
    watch_cycles: u64,
    next_step: u64,
    kind: u32,
    round: u64,
    rng: u64,
    sent: u64,
    completed: u64,
    needs_reset: u64,
    ignored: u64,
    reinit: u64,
    mmio_writes: u64,
}

static STATE: Shared<State> = Shared::new(State {
    on: false,
    blk: None,
    dev: MmioDevice { base: 0, size: 0, irq: 0 },
    step_cycles: 0,
    watch_cycles: 0,
    next_step: 0,
    kind: 0,
    round: 0,
    rng: 0,
    sent: 0,
    completed: 0,
    needs_reset: 0,
    ignored: 0,
    reinit: 0,
    mmio_writes: 0,
});

/// Sets the hostile driver up (lane 0, before the workload). Fatal if no virtio-blk device is
/// usable: the mode needs one to attack.
pub fn init(cfg: &Config, clock: &Clock) {
    if !cfg.hostile {
        return;
    }
    let Some(blk) = virtio::probe(cfg) else {
        crate::fatal(format_args!("GUEST-ERROR hostile=1 needs a virtio-blk device"));
    };
    // SAFETY: lane 0 only, before the workload starts.
    let s = unsafe { &mut *STATE.get() };
    s.dev = MmioDevice { base: blk.base, size: 0x200, irq: blk.irq };
    s.blk = Some(blk);
    s.step_cycles = clock.ms_to_cycles(STEP_MS);
    s.watch_cycles = clock.ms_to_cycles(WATCH_MS);
    s.next_step = clock.now() + s.step_cycles;
    s.rng = 0x5DEE_CE66_D1CE_4E5B ^ clock.now();
    s.on = true;
}

/// One step of the attacks, when due (lane 0's loop).
pub fn poll(clock: &Clock) {
    // SAFETY: lane 0 only; the reference lives for this call.
    let s = unsafe { &mut *STATE.get() };
    if !s.on || clock.now() < s.next_step {
        return;
    }
    let kind = s.kind;
    s.kind = (s.kind + 1) % KINDS;
    let broke = if kind == KINDS - 1 { s.mmio_garbage() } else { s.bad_chain(kind, clock) };
    if broke {
        s.recover();
    }
    if s.kind == 0 {
        s.round += 1;
        flood();
        out::line(format_args!(
            "HOSTILE round={} sent={} completed={} needs_reset={} ignored={} reinit={} mmio_writes={}",
            s.round, s.sent, s.completed, s.needs_reset, s.ignored, s.reinit, s.mmio_writes
        ));
    }
    s.next_step = clock.now() + s.step_cycles;
}

/// A 4000-byte line on the serial port.
fn flood() {
    let mut line = [b'x'; 4007];
    line[..6].copy_from_slice(b"FLOOD ");
    line[4006] = b'\n';
    out::raw(&line);
}

impl State {
    fn next_rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Publishes one malformed chain of kind `kind` and watches what the device does. Returns
    /// whether the device must be reset (it set NEEDS_RESET, or the chain is still out).
    fn bad_chain(&mut self, kind: u32, clock: &Clock) -> bool {
        let Some(mut b) = self.blk else { return true };
        let q = b.qsize;
        let scratch = SCRATCH.get() as u64;
        let (hdr, data, status) = (scratch, scratch + 4096, scratch + 16);
        // A read request header (type 0 = IN, sector 0) at the start of the scratch page.
        // SAFETY: lane 0 owns SCRATCH; the device reads it only after publish.
        unsafe { core::ptr::write_bytes(SCRATCH.get().cast::<u8>(), 0, 16) };
        let head = match kind {
            // A chain that loops: descriptor 0 points at itself.
            0 => {
                b.set_desc(0, hdr, 16, DESC_NEXT, 0);
                0
            }
            // Buffers far outside guest memory.
            1 => {
                b.set_desc(0, NOWHERE, 16, DESC_NEXT, 1);
                b.set_desc(1, NOWHERE + 4096, 512, DESC_NEXT | DESC_WRITE, 2);
                b.set_desc(2, status, 1, DESC_WRITE, 0);
                0
            }
            // A data buffer of 4 GiB - 1.
            2 => {
                b.set_desc(0, hdr, 16, DESC_NEXT, 1);
                b.set_desc(1, data, u32::MAX, DESC_NEXT | DESC_WRITE, 2);
                b.set_desc(2, status, 1, DESC_WRITE, 0);
                0
            }
            // Every descriptor of the table in one chain that comes back to its start.
            3 => {
                for i in 0..q {
                    b.set_desc(i, data, 512, DESC_NEXT | DESC_WRITE, (i + 1) % q);
                }
                b.set_desc(0, hdr, 16, DESC_NEXT, 1);
                0
            }
            // A head beyond the descriptor table.
            4 => q + 7,
            // A header of 4 bytes (a request needs 16).
            5 => {
                b.set_desc(0, hdr, 4, DESC_NEXT, 1);
                b.set_desc(1, status, 1, DESC_WRITE, 0);
                0
            }
            // A next index beyond the table.
            6 => {
                b.set_desc(0, hdr, 16, DESC_NEXT, q + 100);
                0
            }
            // The avail index a thousand entries ahead of what was pushed.
            _ => {
                b.jump_avail(1000);
                b.publish();
                self.sent += 1;
                self.blk = Some(b);
                return self.watch(clock, None);
            }
        };
        b.push(head);
        b.publish();
        self.sent += 1;
        self.blk = Some(b);
        self.watch(clock, Some(head))
    }

    /// Watches the device after an attack: the chain completed, NEEDS_RESET, or neither.
    fn watch(&mut self, clock: &Clock, head: Option<u16>) -> bool {
        let end = clock.now() + self.watch_cycles;
        loop {
            if virtio::status(self.dev.base) & virtio::S_NEEDS_RESET != 0 {
                self.needs_reset += 1;
                return true;
            }
            if let (Some(h), Some(b)) = (head, self.blk.as_mut()) {
                if let Some(id) = b.pop() {
                    if id == h as u32 {
                        self.completed += 1;
                        return false;
                    }
                }
            }
            if clock.now() >= end {
                self.ignored += 1;
                return true;
            }
            core::hint::spin_loop();
        }
    }

    /// Writes random values to random registers of the transport (and reads some), then asks
    /// for a reset. Always true: the device's state is garbage now. The high halves of the
    /// queue's ring addresses are set non-zero first and left alone, so that a ring the garbage
    /// happens to make valid lies above 4 GiB, outside the guest's RAM: this attacks the VMM,
    /// not the guest's own memory (which its verifier checks).
    fn mmio_garbage(&mut self) -> bool {
        let base = self.dev.base;
        const HIGH: [u64; 3] = [0x084, 0x094, 0x0a4];
        // SAFETY: aligned 32-bit registers of the device's window (identity mapped,
        // user-accessible).
        unsafe {
            ((base + 0x030) as *mut u32).write_volatile(0);
            for off in HIGH {
                ((base + off) as *mut u32).write_volatile(0xdead);
            }
        }
        for _ in 0..32 {
            let r = self.next_rand();
            let off = (r % 0x140) & !3;
            if HIGH.contains(&off) {
                continue;
            }
            let v = (r >> 32) as u32;
            // SAFETY: an aligned 32-bit word of the device's register window (0x200 bytes,
            // identity mapped, user-accessible); the device decides what a write means.
            unsafe {
                if r & (1 << 20) != 0 {
                    let _ = ((base + off) as *const u32).read_volatile();
                } else {
                    ((base + off) as *mut u32).write_volatile(v);
                    self.mmio_writes += 1;
                }
            }
        }
        true
    }

    /// Resets the device and sets it up again; a device that does not come back ends the guest.
    fn recover(&mut self) {
        virtio::reset_rings();
        match virtio::init(&self.dev) {
            Ok(b) => {
                self.blk = Some(b);
                self.reinit += 1;
            }
            Err(what) => crate::fatal(format_args!(
                "GUEST-ERROR hostile: the device does not come back after a reset: {what} (round {})",
                self.round
            )),
        }
    }
}
