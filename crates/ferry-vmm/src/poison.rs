//! Broken guest pages: the poison set, the copy that survives touching one, and what a SIGBUS
//! means in each of Ferry's threads.
//!
//! A page with an uncorrectable memory error must never be read: on real hardware reading it
//! raises a machine check that can kill Ferry or the host. Guest memory owns a [`PoisonSet`]:
//! every broken page and how that became known. Every reader of guest memory consults it and
//! skips what it lists; the one copy that reads guest memory for moving it,
//! [`copy_recoverable`], is written so that a page that breaks *while* it is copied does not
//! kill Ferry: the copy is one `rep movsb` whose fault the SIGBUS handler turns into an error
//! return (the kernel's exception-table idea), and the caller marks the page broken.
//!
//! SIGBUS, by thread:
//! - inside [`copy_recoverable`]: recovered, the copy returns the faulting address;
//! - on a vCPU thread with `BUS_MCEERR_AR`: the guest touched a broken page. `KVM_RUN` returns
//!   EINTR; the vCPU loop takes the address ([`take_vcpu_fault`]), marks the page and injects a
//!   machine check into the guest;
//! - `BUS_MCEERR_AO` (the kernel found an error in our memory without us touching it): queued,
//!   and marked at the next look at the set ([`take_async_faults`]);
//! - anything else: the handler Ferry replaced (Rust's, or the default) runs, and Ferry dies as
//!   it would have without this module. [`SigbusStats::unexpected`] counts those that got this
//!   far, for tests.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// `si_code` of an action-required memory error (the access hit poisoned memory).
const BUS_MCEERR_AR: i32 = 4;
/// `si_code` of an action-optional memory error (found by the kernel, not by an access).
const BUS_MCEERR_AO: i32 = 5;

/// How Ferry learned that a page is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoisonCause {
    /// `ferry debug poison` (the page was then poisoned for real).
    Injected,
    /// A vCPU touched it: SIGBUS `BUS_MCEERR_AR`.
    GuestAccess,
    /// A vCPU in emulated code touched it: an MMIO exit inside RAM.
    GuestAccessEmulated,
    /// The kernel reported it: SIGBUS `BUS_MCEERR_AO`.
    HostReport,
    /// Ferry's own copy of it faulted (recovered).
    CopyFault,
    /// The incoming stream (or snapshot) said it was broken on the source.
    Stream,
}

/// The broken pages of a machine's guest memory, by guest frame number.
#[derive(Debug, Default)]
pub struct PoisonSet {
    pages: Mutex<BTreeMap<u64, PoisonCause>>,
    /// Pages in `pages`, readable without the lock (the common case is none).
    count: AtomicUsize,
}

impl PoisonSet {
    pub fn new() -> Self {
        PoisonSet::default()
    }

    /// Records `gfn` as broken; returns whether it is new. The first cause stays.
    pub fn mark(&self, gfn: u64, cause: PoisonCause) -> bool {
        let Ok(mut p) = self.pages.lock() else { return false };
        if p.contains_key(&gfn) {
            return false;
        }
        p.insert(gfn, cause);
        self.count.store(p.len(), Ordering::Release);
        true
    }

    /// Whether `gfn` is broken.
    pub fn contains(&self, gfn: u64) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.pages.lock().map(|p| p.contains_key(&gfn)).unwrap_or(true)
    }

    /// Whether any frame of `first..=last` is broken (one lookup, whatever the range's size).
    pub fn any_in(&self, first: u64, last: u64) -> bool {
        if self.count.load(Ordering::Acquire) == 0 || first > last {
            return false;
        }
        self.pages.lock().map(|p| p.range(first..=last).next().is_some()).unwrap_or(true)
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every broken page with its cause, in frame order.
    pub fn list(&self) -> Vec<(u64, PoisonCause)> {
        self.pages.lock().map(|p| p.iter().map(|(&g, &c)| (g, c)).collect()).unwrap_or_default()
    }
}

// The recoverable copy: `rep movsb` at a known address. A fault there (SIGBUS on a poisoned
// source page) resumes at the fixup label with rcx = bytes not copied.
std::arch::global_asm!(
    ".pushsection .text.ferry_copy_mc, \"ax\"",
    ".globl ferry_copy_mc",
    ".p2align 4",
    "ferry_copy_mc:",
    "    mov rcx, rdx",
    ".globl ferry_copy_mc_insn",
    "ferry_copy_mc_insn:",
    "    rep movsb",
    ".globl ferry_copy_mc_fixup",
    "ferry_copy_mc_fixup:",
    "    mov rax, rcx",
    "    ret",
    ".popsection",
);

extern "C" {
    /// Copies `len` bytes from `src` to `dst`; returns the bytes not copied (0 unless a SIGBUS
    /// cut it short).
    fn ferry_copy_mc(dst: *mut u8, src: *const u8, len: usize) -> usize;
    static ferry_copy_mc_insn: u8;
    static ferry_copy_mc_fixup: u8;
}

thread_local! {
    /// Address of the last recovered fault in this thread's copy.
    static COPY_FAULT: Cell<u64> = const { Cell::new(0) };
    /// This thread runs a vCPU.
    static IS_VCPU: Cell<bool> = const { Cell::new(false) };
    /// Host address of a broken page this vCPU touched, not yet handled (0: none).
    static VCPU_FAULT: Cell<u64> = const { Cell::new(0) };
}

/// Action-optional reports waiting to be marked (host addresses; 0 = free slot).
static ASYNC_FAULTS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
/// Reports put in `ASYNC_FAULTS` and not taken yet: the common case (none) costs one load.
static ASYNC_PENDING: AtomicUsize = AtomicUsize::new(0);

static RECOVERED_COPIES: AtomicU64 = AtomicU64::new(0);
static VCPU_FAULTS: AtomicU64 = AtomicU64::new(0);
static ASYNC_REPORTS: AtomicU64 = AtomicU64::new(0);
static UNEXPECTED: AtomicU64 = AtomicU64::new(0);

/// The action SIGBUS had before Ferry's (called for any SIGBUS Ferry does not handle).
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Counts of what SIGBUS did in this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SigbusStats {
    /// Copies of guest memory cut short by a broken page and recovered.
    pub recovered_copies: u64,
    /// Broken pages touched by a vCPU (each injected into the guest as a machine check).
    pub vcpu_faults: u64,
    /// Action-optional reports from the kernel.
    pub async_reports: u64,
    /// Any other SIGBUS (passed on to the previous handler: normally fatal).
    pub unexpected: u64,
}

pub fn sigbus_stats() -> SigbusStats {
    SigbusStats {
        recovered_copies: RECOVERED_COPIES.load(Ordering::Relaxed),
        vcpu_faults: VCPU_FAULTS.load(Ordering::Relaxed),
        async_reports: ASYNC_REPORTS.load(Ordering::Relaxed),
        unexpected: UNEXPECTED.load(Ordering::Relaxed),
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t and ucontext_t to an SA_SIGINFO handler; only
    // plain loads and stores, atomics and const-initialised thread-locals are used here (all
    // async-signal-safe).
    unsafe {
        let addr = (*info).si_addr() as u64;
        let code = (*info).si_code;
        let uc = ctx as *mut libc::ucontext_t;
        let rip = &mut (*uc).uc_mcontext.gregs[libc::REG_RIP as usize];
        if *rip as u64 == std::ptr::addr_of!(ferry_copy_mc_insn) as u64 {
            COPY_FAULT.with(|c| c.set(addr));
            RECOVERED_COPIES.fetch_add(1, Ordering::Relaxed);
            *rip = std::ptr::addr_of!(ferry_copy_mc_fixup) as i64;
            return;
        }
        if code == BUS_MCEERR_AR && IS_VCPU.with(|v| v.get()) {
            VCPU_FAULT.with(|c| c.set(addr));
            VCPU_FAULTS.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if code == BUS_MCEERR_AO {
            ASYNC_REPORTS.fetch_add(1, Ordering::Relaxed);
            for slot in &ASYNC_FAULTS {
                if slot.compare_exchange(0, addr.max(1), Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    ASYNC_PENDING.fetch_add(1, Ordering::AcqRel);
                    break;
                }
            }
            return;
        }
        UNEXPECTED.fetch_add(1, Ordering::Relaxed);
        // Not ours: put the previous action back; the faulting instruction runs again and gets
        // it (for a fault the process cannot survive, that ends the process, as before).
        match PREVIOUS.get() {
            Some(prev) => {
                libc::sigaction(sig, prev, std::ptr::null_mut());
            }
            None => {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// Installs Ferry's SIGBUS handler (once per process).
pub fn install_sigbus_handler() -> std::io::Result<()> {
    static DONE: OnceLock<std::io::Result<()>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        // SAFETY: sigaction with a zeroed struct filled in below; the handler is an
        // extern "C" fn that lives for the whole process.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, &mut old) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let _ = PREVIOUS.set(old);
        }
        Ok(())
    });
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
    }
}

/// Marks the calling thread as a vCPU thread (its action-required SIGBUS is the guest's).
pub fn mark_vcpu_thread() {
    IS_VCPU.with(|v| v.set(true));
}

/// The host address of a broken page this vCPU thread touched since the last call.
pub fn take_vcpu_fault() -> Option<u64> {
    match VCPU_FAULT.with(|c| c.replace(0)) {
        0 => None,
        a => Some(a),
    }
}

/// Host addresses the kernel reported broken (action optional) since the last call.
pub fn take_async_faults() -> Vec<u64> {
    if ASYNC_PENDING.load(Ordering::Acquire) == 0 {
        return Vec::new();
    }
    let taken: Vec<u64> =
        ASYNC_FAULTS.iter().filter_map(|s| Some(s.swap(0, Ordering::AcqRel)).filter(|&a| a != 0)).collect();
    ASYNC_PENDING.fetch_sub(taken.len(), Ordering::AcqRel);
    taken
}

/// Copies `len` bytes from `src` to `dst` so that a broken source page does not kill Ferry:
/// returns `Err(address)` of the fault if one cut the copy short (the rest of `dst` is
/// unspecified). [`install_sigbus_handler`] must have run.
///
/// # Safety
/// `src` must be readable and `dst` writable for `len` bytes (mapped; the source may be
/// poisoned), and the ranges must not overlap.
pub unsafe fn copy_recoverable(dst: *mut u8, src: *const u8, len: usize) -> Result<(), u64> {
    // SAFETY: per this function's contract; the assembly copies exactly `len` bytes forward
    // and touches nothing else (rdi, rsi, rcx, rax are its clobbers under the C ABI).
    let left = unsafe { ferry_copy_mc(dst, src, len) };
    if left == 0 {
        return Ok(());
    }
    Err(COPY_FAULT.with(|c| c.replace(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recoverable_copy_copies_like_memcpy() {
        install_sigbus_handler().unwrap();
        let src: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut dst = vec![0u8; 10_000];
        // SAFETY: two distinct live buffers of 10 000 bytes.
        unsafe { copy_recoverable(dst.as_mut_ptr(), src.as_ptr(), src.len()) }.unwrap();
        assert_eq!(dst, src);
    }

    #[test]
    fn a_poisoned_source_page_ends_the_copy_with_its_address_instead_of_killing_the_process() {
        install_sigbus_handler().unwrap();
        // Two pages of a private anonymous mapping, the second poisoned with userfaultfd.
        // SAFETY: a fresh anonymous mapping of two pages, ours alone.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as u64;
        assert_ne!(base as *mut libc::c_void, libc::MAP_FAILED);
        // SAFETY: the first page of that mapping.
        unsafe { std::ptr::write_bytes(base as *mut u8, 7, 4096) };
        let mut u = match crate::uffd::Uffd::new() {
            Ok(u) if u.can_poison() => u,
            _ => {
                eprintln!("SKIPPED: no userfaultfd with UFFDIO_POISON here, so no page can be poisoned to test with");
                return;
            }
        };
        u.register(base + 4096, 4096).unwrap();
        assert!(u.poison(base + 4096).unwrap());
        let before = sigbus_stats().recovered_copies;
        let mut dst = vec![0u8; 8192];

        // SAFETY: both pages are mapped (the second poisoned), dst is distinct.
        let r = unsafe { copy_recoverable(dst.as_mut_ptr(), base as *const u8, 8192) };

        assert_eq!(r, Err(base + 4096));
        assert_eq!(&dst[..4096], &[7u8; 4096][..]);
        assert_eq!(sigbus_stats().recovered_copies, before + 1);
        // SAFETY: unmapping what this test mapped.
        unsafe { libc::munmap(base as *mut libc::c_void, 8192) };
    }

    #[test]
    fn the_set_keeps_the_first_cause_and_lists_in_frame_order() {
        let s = PoisonSet::new();
        assert!(!s.contains(5));
        assert!(s.mark(9, PoisonCause::Stream));
        assert!(s.mark(5, PoisonCause::Injected));
        assert!(!s.mark(9, PoisonCause::CopyFault));
        assert!(s.contains(5) && s.contains(9) && !s.contains(6));
        assert_eq!(s.list(), vec![(5, PoisonCause::Injected), (9, PoisonCause::Stream)]);
    }
}
