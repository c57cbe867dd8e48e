//! A polled virtio-blk driver over virtio-mmio (virtio 1.x, modern transport only).
//!
//! Everything runs in ring 3: boot.s identity-maps the low 4 GiB user-accessible, so the MMIO
//! window is reachable with plain loads and stores (each one a VM exit, ~100 µs on KVM-PVM) and
//! the rings are statics whose addresses are also their guest-physical addresses. Interrupts stay
//! off: the avail ring asks for none and the driver polls the used ring in memory, so the only MMIO
//! access in the steady state is one QueueNotify write per batch of submitted requests.

use core::cell::UnsafeCell;
use core::sync::atomic::{fence, Ordering};

use crate::config::{Config, MmioDevice};
use crate::out;

/// A static the device or lane 0 alone accesses, through raw pointers only.
pub struct Shared<T>(UnsafeCell<T>);

// SAFETY: every `Shared` is used by lane 0 only (and by the device, through DMA); the accessors
// hand out raw pointers and the callers uphold exclusivity.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub const fn new(v: T) -> Self {
        Shared(UnsafeCell::new(v))
    }
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

const MAGIC: u32 = 0x7472_6976; // "virt"
const DEVICE_ID_BLOCK: u32 = 2;

// Register offsets (virtio-mmio, version 2).
const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_DEVICE_FEATURES: u64 = 0x010;
const R_DEVICE_FEATURES_SEL: u64 = 0x014;
const R_DRIVER_FEATURES: u64 = 0x020;
const R_DRIVER_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_QUEUE_NOTIFY: u64 = 0x050;
const R_STATUS: u64 = 0x070;
const R_QUEUE_DESC_LOW: u64 = 0x080;
const R_QUEUE_DESC_HIGH: u64 = 0x084;
const R_QUEUE_DRIVER_LOW: u64 = 0x090;
const R_QUEUE_DRIVER_HIGH: u64 = 0x094;
const R_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const R_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const R_CONFIG_GENERATION: u64 = 0x0fc;
const R_CONFIG: u64 = 0x100;

// Device status bits.
const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 64;
const S_FAILED: u32 = 128;

// Feature bits.
const F_BLK_RO: u32 = 1 << 5;
const F_BLK_FLUSH: u32 = 1 << 9;
/// VIRTIO_F_VERSION_1 is bit 32: bit 0 of feature word 1.
const F_VERSION_1_HI: u32 = 1;

// Descriptor flags.
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Largest queue the driver sets up (the rings are statics of this size).
pub const QSIZE_MAX: usize = 256;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(4096))]
struct DescTable([Desc; QSIZE_MAX]);

#[repr(C, align(4096))]
struct AvailRing {
    flags: u16,
    idx: u16,
    ring: [u16; QSIZE_MAX],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4096))]
struct UsedRing {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QSIZE_MAX],
    avail_event: u16,
}

static DESCS: Shared<DescTable> = Shared::new(DescTable([Desc { addr: 0, len: 0, flags: 0, next: 0 }; QSIZE_MAX]));
static AVAIL: Shared<AvailRing> = Shared::new(AvailRing { flags: 0, idx: 0, ring: [0; QSIZE_MAX], used_event: 0 });
static USED: Shared<UsedRing> =
    Shared::new(UsedRing { flags: 0, idx: 0, ring: [UsedElem { id: 0, len: 0 }; QSIZE_MAX], avail_event: 0 });

/// The registers of one virtio-mmio transport.
#[derive(Clone, Copy)]
struct Regs(u64);

impl Regs {
    fn r(self, off: u64) -> u32 {
        // SAFETY: `self.0` is the base of a virtio-mmio window of at least 0x108 bytes below
        // 4 GiB (identity mapped, user-accessible); registers are aligned 32-bit words.
        unsafe { ((self.0 + off) as *const u32).read_volatile() }
    }
    fn w(self, off: u64, v: u32) {
        // SAFETY: as in `r`.
        unsafe { ((self.0 + off) as *mut u32).write_volatile(v) }
    }
}

/// An initialised virtio-blk device with queue 0 live. Plain data, kept in guest memory (it
/// migrates with the guest, and the destination's device continues the same rings).
#[derive(Clone, Copy)]
pub struct Blk {
    pub base: u64,
    pub irq: u32,
    pub qsize: u16,
    /// In 512-byte sectors.
    pub capacity: u64,
    pub ro: bool,
    pub flush: bool,
    /// Next free avail ring position (the driver's copy of avail.idx).
    avail_idx: u16,
    /// Next used ring position to harvest.
    last_used: u16,
}

impl Blk {
    /// Writes descriptor `i` (not yet visible to the device until its head is published).
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        debug_assert!((i as usize) < self.qsize as usize);
        // SAFETY: i < qsize <= QSIZE_MAX; the descriptor is not in flight (the caller's contract),
        // so the device does not read it concurrently.
        unsafe {
            let d = core::ptr::addr_of_mut!((*DESCS.get()).0[i as usize]);
            d.write_volatile(Desc { addr, len, flags, next });
        }
    }

    /// Puts a chain head in the avail ring; `publish` makes it visible.
    pub fn push(&mut self, head: u16) {
        let slot = (self.avail_idx % self.qsize) as usize;
        // SAFETY: slot < qsize; the device only reads avail ring entries below avail.idx, and
        // this one is at or above it.
        unsafe { core::ptr::addr_of_mut!((*AVAIL.get()).ring[slot]).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes the pushed heads (avail.idx) and notifies the device: one MMIO write.
    pub fn publish(&mut self) {
        // Descriptors, buffers and ring entries before the index...
        fence(Ordering::SeqCst);
        // SAFETY: avail.idx is written by the driver only.
        unsafe { core::ptr::addr_of_mut!((*AVAIL.get()).idx).write_volatile(self.avail_idx) };
        // ...and the index before the notification.
        fence(Ordering::SeqCst);
        Regs(self.base).w(R_QUEUE_NOTIFY, 0);
    }

    /// Moves the driver's avail index `n` entries ahead without pushing anything (the hostile
    /// driver: an index no device can follow).
    pub fn jump_avail(&mut self, n: u16) {
        self.avail_idx = self.avail_idx.wrapping_add(n);
    }

    /// The next completed chain head, if any (plain memory reads of the used ring).
    pub fn pop(&mut self) -> Option<u32> {
        // SAFETY: used.idx is written by the device; a volatile read sees its latest value.
        let idx = unsafe { core::ptr::addr_of!((*USED.get()).idx).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        // The entry (and the buffers it describes) only after the index.
        fence(Ordering::Acquire);
        let slot = (self.last_used % self.qsize) as usize;
        // SAFETY: slot < qsize; the device wrote this entry before advancing used.idx past it.
        let e = unsafe { core::ptr::addr_of!((*USED.get()).ring[slot]).read_volatile() };
        self.last_used = self.last_used.wrapping_add(1);
        Some(e.id)
    }
}

/// Finds the first usable virtio-blk device among the command line's `virtio_mmio.device=`
/// windows and initialises it. Problems are printed as `GUEST-ERROR` lines; `None` if no device
/// is usable.
pub fn probe(cfg: &Config) -> Option<Blk> {
    for d in &cfg.mmio[..cfg.mmio_count] {
        if d.size < R_CONFIG + 8 {
            out::line(format_args!(
                "GUEST-ERROR virtio-mmio at {:#x}: window of {} bytes is too small",
                d.base, d.size
            ));
            continue;
        }
        if d.base.checked_add(d.size).is_none_or(|end| end > 4 << 30) || d.base % 4 != 0 {
            out::line(format_args!(
                "GUEST-ERROR virtio-mmio at {:#x}: not a 4-byte aligned window below 4 GiB",
                d.base
            ));
            continue;
        }
        let r = Regs(d.base);
        let magic = r.r(R_MAGIC);
        if magic != MAGIC {
            out::line(format_args!("GUEST-ERROR virtio-mmio at {:#x}: bad magic {magic:#x}", d.base));
            continue;
        }
        // Device ID 0: an empty transport (QEMU microvm has many). Not worth a message.
        let id = r.r(R_DEVICE_ID);
        if id == 0 {
            continue;
        }
        match r.r(R_VERSION) {
            2 => {}
            1 => {
                out::line(format_args!("GUEST-ERROR virtio-mmio at {:#x} is legacy (version 1)", d.base));
                continue;
            }
            v => {
                out::line(format_args!("GUEST-ERROR virtio-mmio at {:#x}: unknown version {v}", d.base));
                continue;
            }
        }
        if id != DEVICE_ID_BLOCK {
            continue;
        }
        match init(d) {
            Ok(b) => return Some(b),
            Err(what) => {
                r.w(R_STATUS, r.r(R_STATUS) | S_FAILED);
                out::line(format_args!("GUEST-ERROR virtio-blk at {:#x}: {what}", d.base));
            }
        }
    }
    None
}

/// The device status register of the transport at `base`.
pub fn status(base: u64) -> u32 {
    Regs(base).r(R_STATUS)
}

/// Zeroes the rings (the hostile driver, before it sets a reset device up again: a device
/// starts a queue at index 0 and reads the indices from memory).
pub fn reset_rings() {
    // SAFETY: lane 0 only, with the device reset (it no longer reads or writes the rings).
    unsafe {
        core::ptr::write_bytes(DESCS.get(), 0, 1);
        core::ptr::write_bytes(AVAIL.get(), 0, 1);
        core::ptr::write_bytes(USED.get(), 0, 1);
    }
    fence(Ordering::SeqCst);
}

/// Resets the device at `d` and sets queue 0 up on the (zeroed) rings.
pub fn init(d: &MmioDevice) -> Result<Blk, &'static str> {
    let r = Regs(d.base);
    r.w(R_STATUS, 0);
    let mut tries = 0;
    while r.r(R_STATUS) != 0 {
        tries += 1;
        if tries > 100 {
            return Err("device does not reset (status stays non-zero)");
        }
    }
    r.w(R_STATUS, S_ACKNOWLEDGE);
    r.w(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    r.w(R_DEVICE_FEATURES_SEL, 0);
    let lo = r.r(R_DEVICE_FEATURES);
    r.w(R_DEVICE_FEATURES_SEL, 1);
    let hi = r.r(R_DEVICE_FEATURES);
    if hi & F_VERSION_1_HI == 0 {
        return Err("device does not offer VIRTIO_F_VERSION_1");
    }
    let want_lo = lo & (F_BLK_RO | F_BLK_FLUSH);
    r.w(R_DRIVER_FEATURES_SEL, 0);
    r.w(R_DRIVER_FEATURES, want_lo);
    r.w(R_DRIVER_FEATURES_SEL, 1);
    r.w(R_DRIVER_FEATURES, F_VERSION_1_HI);
    r.w(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if r.r(R_STATUS) & S_FEATURES_OK == 0 {
        return Err("device refused the features (FEATURES_OK did not stick)");
    }

    r.w(R_QUEUE_SEL, 0);
    if r.r(R_QUEUE_READY) != 0 {
        return Err("queue 0 is already live after reset");
    }
    let max = r.r(R_QUEUE_NUM_MAX);
    if max == 0 {
        return Err("queue 0 is not available (QueueNumMax=0)");
    }
    let mut qsize = QSIZE_MAX as u32;
    while qsize > max {
        qsize >>= 1;
    }
    // The rings are zeroed statics (.bss); the device is asked never to interrupt.
    // SAFETY: the queue is not live yet; avail.flags is written by the driver only.
    unsafe { core::ptr::addr_of_mut!((*AVAIL.get()).flags).write_volatile(AVAIL_F_NO_INTERRUPT) };
    fence(Ordering::SeqCst);
    let (desc, avail, used) = (DESCS.get() as u64, AVAIL.get() as u64, USED.get() as u64);
    r.w(R_QUEUE_NUM, qsize);
    r.w(R_QUEUE_DESC_LOW, desc as u32);
    r.w(R_QUEUE_DESC_HIGH, (desc >> 32) as u32);
    r.w(R_QUEUE_DRIVER_LOW, avail as u32);
    r.w(R_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
    r.w(R_QUEUE_DEVICE_LOW, used as u32);
    r.w(R_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
    r.w(R_QUEUE_READY, 1);

    r.w(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    let st = r.r(R_STATUS);
    if st & (S_NEEDS_RESET | S_FAILED) != 0 || st & S_DRIVER_OK == 0 {
        return Err("device failed after DRIVER_OK");
    }

    // Capacity: a u64 in config space, read as two u32 under the config generation.
    let mut capacity = 0;
    for attempt in 0.. {
        let g1 = r.r(R_CONFIG_GENERATION);
        let c_lo = r.r(R_CONFIG);
        let c_hi = r.r(R_CONFIG + 4);
        if r.r(R_CONFIG_GENERATION) == g1 {
            capacity = (c_hi as u64) << 32 | c_lo as u64;
            break;
        }
        if attempt > 100 {
            return Err("config generation never settles");
        }
    }
    Ok(Blk {
        base: d.base,
        irq: d.irq,
        qsize: qsize as u16,
        capacity,
        ro: want_lo & F_BLK_RO != 0,
        flush: want_lo & F_BLK_FLUSH != 0,
        avail_idx: 0,
        last_used: 0,
    })
}
