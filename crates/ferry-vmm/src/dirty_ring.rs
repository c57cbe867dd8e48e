//! The dirty-ring backend of the dirty log (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`).
//!
//! With a dirty ring, KVM pushes one entry `(slot, page)` per newly dirtied page onto a per-vCPU
//! ring shared with Ferry (an mmap of the vCPU fd), instead of setting a bit in a per-slot
//! bitmap. Ferry *collects* entries (acquire-load the flags, read slot and offset, release-store
//! RESET) and then calls `KVM_RESET_DIRTY_RINGS`, which re-protects exactly the collected pages.
//! So a collect is GET and CLEAR in one step, and it never clears a page Ferry did not see:
//! there is no KVM cache to keep, and [`crate::dirty_log::DirtyLog`] never issues a clear for
//! this backend ([`DirtySource::protects_on_get`]).
//!
//! Collected pages wait in per-slot bitmaps here until the dirty log's next sync takes them, so
//! a collect can happen at any time on any thread: when a vCPU exits with
//! `KVM_EXIT_DIRTY_RING_FULL` its own thread collects all rings before it runs again.
//!
//! Why nothing is lost: a page's write after a reset makes a new entry; a write between the push
//! of its entry and the reset is not logged again, but the page's bit reaches consumers only at
//! a sync after that reset, and a consumer reads the page only after that, so it sees the write.
//!
//! Signals are blocked while `KVM_RESET_DIRTY_RINGS` runs ([`SignalsBlocked`]). On recent
//! kernels (the 2025 commit "KVM: Bail from the dirty ring reset flow if a signal is pending";
//! this host runs 6.18) the reset stops at a pending signal *after* it has marked the batch of
//! harvested entries it was gathering (up to 64 pages) as reset, but before it write-protects
//! their pages, and the ioctl still returns the positive count it reached, not `-EINTR`. Those
//! pages stay writable in KVM: the guest's later writes to them are never logged again, and a
//! migration leaves them stale on the destination. Ferry's own kicks (the throttle pauses the
//! vCPUs every 5 ms) land on a vCPU thread that is resetting after a ring-full exit: in a traced
//! run, each of the two resets the kick handler ran during left pages KVM never logged again,
//! and those were the destination's stale pages. A blocked signal is only queued, so the reset
//! runs to its end; the kick is delivered when the mask is restored (`immediate_exit` is already
//! set, so none is lost). Some things still make a signal pending during a reset: `SIGSTOP`,
//! `SIGKILL` and other job-control or ptrace stops, the cgroup freezer, and glibc's internal
//! cancel/set*id signals (never blocked by its `pthread_sigmask`; Ferry does not use either).
//! Stopping or freezing Ferry while it resets can still lose pages on such a kernel.
//!
//! This host's KVM (PVM) overflows small rings when emulated ring-0 code writes (it runs up to
//! 1024 instructions before checking the ring): use a large ring (the default is 65536 entries).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVMIO, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use crate::dirty_log::{Bitmap, DirtyLogError, DirtySource};

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Entry flag: KVM wrote this entry (the page is dirty).
const GFN_DIRTY: u32 = 1;
/// Entry flag: Ferry collected this entry; KVM may reuse it after `KVM_RESET_DIRTY_RINGS`.
const GFN_RESET: u32 = 2;
/// Most KVM_RESET_DIRTY_RINGS calls one collect makes (each resets what is harvested).
const MAX_RESET_ROUNDS: u32 = 64;

/// Default ring size per vCPU, in entries (16 bytes each: 1 MiB).
pub const DEFAULT_RING_ENTRIES: u32 = 65536;

/// Errors of the dirty ring.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRingError {
    #[error("KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING); use --dirty-tracking bitmap")]
    Unsupported,
    #[error("a dirty ring of {entries} entries ({bytes} bytes) exceeds KVM's maximum of {max} bytes")]
    TooLarge { entries: u32, bytes: u64, max: u64 },
    #[error("dirty ring size {0} is not a power of two of at least 1024 entries")]
    BadSize(u32),
    #[error("cannot enable the dirty ring")]
    Enable(#[source] std::io::Error),
    #[error("cannot map the dirty ring of vCPU {vcpu}")]
    Map {
        vcpu: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Enables the dirty ring on a VM (before any vCPU exists). Prefers the acquire/release variant.
/// Returns the number of entries per vCPU.
pub fn enable(vm: &VmFd, entries: u32) -> Result<u32, DirtyRingError> {
    if entries < 1024 || !entries.is_power_of_two() {
        return Err(DirtyRingError::BadSize(entries));
    }
    let acq_rel = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL as _) > 0;
    let cap = if acq_rel { KVM_CAP_DIRTY_LOG_RING_ACQ_REL } else { KVM_CAP_DIRTY_LOG_RING };
    let max = vm.check_extension_raw(cap as _);
    if max <= 0 {
        return Err(DirtyRingError::Unsupported);
    }
    let bytes = entries as u64 * std::mem::size_of::<kvm_dirty_gfn>() as u64;
    if bytes > max as u64 {
        return Err(DirtyRingError::TooLarge { entries, bytes, max: max as u64 });
    }
    let mut c = kvm_enable_cap { cap, ..Default::default() };
    c.args[0] = bytes;
    vm.enable_cap(&c).map_err(|e| DirtyRingError::Enable(std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(entries)
}

/// One vCPU's ring mapping.
struct RingMap {
    ptr: *mut kvm_dirty_gfn,
    entries: u32,
}

// SAFETY: the mapping is plain shared memory; all access goes through `DirtyRings`' mutex and
// atomics on the flags word, as KVM's dirty-ring protocol requires.
unsafe impl Send for RingMap {}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in `DirtyRings::map`, unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>());
        }
    }
}

struct RingState {
    rings: Vec<RingMap>,
    /// Next entry to look at, per vCPU (free-running, taken modulo the ring size).
    fetch: Vec<u32>,
    /// Collected pages per slot index, not yet taken by a sync.
    pending: Vec<Bitmap>,
    /// Entries collected per vCPU since the VM started.
    per_vcpu: Vec<u64>,
    /// Collects that found the ring full (from `KVM_EXIT_DIRTY_RING_FULL`).
    full_exits: u64,
    /// Entries were collected but `KVM_RESET_DIRTY_RINGS` failed: their pages are not
    /// re-protected yet, so nothing may be taken until a reset succeeds.
    reset_owed: bool,
}

/// The dirty rings of a VM's vCPUs.
pub struct DirtyRings {
    vm_fd: i32,
    /// Slot number of each slot index.
    slots: Vec<u32>,
    state: Mutex<RingState>,
}

/// What the rings have collected so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Entries collected per vCPU since the VM started.
    pub per_vcpu: Vec<u64>,
    pub full_exits: u64,
}

impl DirtyRings {
    /// Maps the ring of every vCPU. `slots` are `(slot number, pages)` per slot index.
    pub fn map(vm: &VmFd, vcpus: &[VcpuFd], entries: u32, slots: &[(u32, u64)]) -> Result<Self, DirtyRingError> {
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as libc::off_t;
        let mut rings = Vec::new();
        for (id, v) in vcpus.iter().enumerate() {
            // SAFETY: maps the vCPU fd's dirty-ring pages at the offset KVM documents; the
            // result is checked before use and unmapped in RingMap's Drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    v.as_raw_fd(),
                    KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * page,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(DirtyRingError::Map { vcpu: id as u32, source: std::io::Error::last_os_error() });
            }
            rings.push(RingMap { ptr: p.cast(), entries });
        }
        let n = rings.len();
        Ok(DirtyRings {
            vm_fd: vm.as_raw_fd(),
            slots: slots.iter().map(|s| s.0).collect(),
            state: Mutex::new(RingState {
                rings,
                fetch: vec![0; n],
                pending: slots.iter().map(|s| Bitmap::new(s.1, false)).collect(),
                per_vcpu: vec![0; n],
                full_exits: 0,
                reset_owed: false,
            }),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, RingState>, DirtyLogError> {
        self.state.lock().map_err(|_| DirtyLogError::Ring(std::io::Error::other("dirty ring lock is poisoned")))
    }

    /// Collects every vCPU's ring into the pending bitmaps and resets the rings in KVM.
    /// Returns the number of entries collected.
    pub fn collect(&self) -> Result<u64, DirtyLogError> {
        let mut st = self.lock()?;
        Self::collect_locked(&mut st, self.vm_fd, &self.slots, false)
    }

    /// As [`DirtyRings::collect`], called by a vCPU thread after `KVM_EXIT_DIRTY_RING_FULL`:
    /// always resets the rings.
    pub fn collect_full(&self) -> Result<u64, DirtyLogError> {
        let mut st = self.lock()?;
        st.full_exits += 1;
        Self::collect_locked(&mut st, self.vm_fd, &self.slots, true)
    }

    fn collect_locked(st: &mut RingState, vm_fd: i32, slots: &[u32], force: bool) -> Result<u64, DirtyLogError> {
        let mut total = 0u64;
        let RingState { rings, fetch, pending, per_vcpu, reset_owed, .. } = st;
        for (v, ring) in rings.iter().enumerate() {
            loop {
                let idx = (fetch[v] % ring.entries) as usize;
                // SAFETY: idx < entries, inside the mapping; the flags word is 4-byte aligned
                // and KVM accesses it atomically too (acquire here pairs with KVM's release).
                let e = unsafe { ring.ptr.add(idx) };
                // SAFETY: as above; AtomicU32 has the layout of u32.
                let flags = unsafe { &*(std::ptr::addr_of_mut!((*e).flags) as *const AtomicU32) };
                if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                    break;
                }
                // SAFETY: the entry is published (DIRTY seen with acquire), so slot and offset
                // are written; KVM does not touch it again until RESET and the reset ioctl.
                let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
                let slot_id = slot & 0xffff;
                if let Some(i) = slots.iter().position(|&s| s == slot_id) {
                    pending[i].set(offset);
                }
                flags.store(GFN_RESET, Ordering::Release);
                fetch[v] = fetch[v].wrapping_add(1);
                per_vcpu[v] += 1;
                total += 1;
            }
        }
        // After a ring-full exit the reset is due even if this collect found nothing new (a
        // concurrent collect harvested the entries): the vCPU only runs again once KVM has
        // reset them.
        if total > 0 || *reset_owed || force {
            // Owed until the reset completes (an error on the way keeps it owed).
            *reset_owed = true;
            reset_until_done(|| {
                // SAFETY: a VM-fd ioctl without arguments; vm_fd outlives the rings (Vm owns
                // both).
                let r = unsafe { ioctl(&RawFd(vm_fd), KVM_RESET_DIRTY_RINGS()) };
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(r)
                }
            })
            .map_err(DirtyLogError::Ring)?;
            *reset_owed = false;
        }
        Ok(total)
    }

    /// Takes the pending pages of slot number `slot`.
    fn take(&self, slot: u32) -> Result<Vec<u64>, DirtyLogError> {
        let mut st = self.lock()?;
        if st.reset_owed {
            return Err(DirtyLogError::Ring(std::io::Error::other(
                "collected pages are not re-protected yet (KVM_RESET_DIRTY_RINGS failed)",
            )));
        }
        let i = self.slots.iter().position(|&s| s == slot).ok_or(DirtyLogError::NoSlot(slot))?;
        let n = st.pending[i].npages();
        Ok(std::mem::replace(&mut st.pending[i], Bitmap::new(n, false)).into_words())
    }

    /// Counters since the VM started.
    pub fn stats(&self) -> RingStats {
        match self.state.lock() {
            Ok(st) => RingStats { per_vcpu: st.per_vcpu.clone(), full_exits: st.full_exits },
            Err(_) => RingStats::default(),
        }
    }
}

/// Runs `reset` (one `KVM_RESET_DIRTY_RINGS`, returning how many entries it reset) with every
/// signal blocked (see the module doc: a signal during the reset can leave pages unprotected),
/// until it resets nothing more (KVM may stop a reset early). `EINTR` (from a signal that
/// cannot be blocked) is retried.
fn reset_until_done(mut reset: impl FnMut() -> std::io::Result<i32>) -> std::io::Result<()> {
    let _blocked = SignalsBlocked::new()?;
    let mut rounds = 0;
    loop {
        match reset() {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) && rounds < MAX_RESET_ROUNDS => rounds += 1,
            Err(e) => return Err(e),
            Ok(r) => {
                rounds += 1;
                if r == 0 || rounds >= MAX_RESET_ROUNDS {
                    return Ok(());
                }
            }
        }
    }
}

/// Every signal that can be blocked is blocked on this thread while it lives; the thread's
/// previous mask comes back on drop (a signal that arrived meanwhile is delivered then).
pub(crate) struct SignalsBlocked {
    old: libc::sigset_t,
    /// A signal mask belongs to one thread: the guard must be dropped where it was made.
    _thread_bound: std::marker::PhantomData<*const ()>,
}

impl SignalsBlocked {
    pub(crate) fn new() -> std::io::Result<Self> {
        // SAFETY: sigset_t is plain data; both sets are initialised by sigfillset/pthread_sigmask
        // before they are read.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `all` is a valid sigset_t to fill.
        unsafe { libc::sigfillset(&mut all) };
        // SAFETY: valid pointers to two sigset_t; SIG_BLOCK only adds to this thread's mask.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) };
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        Ok(SignalsBlocked { old, _thread_bound: std::marker::PhantomData })
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`, on the same thread (the guard is not Send).
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

struct RawFd(i32);
impl AsRawFd for RawFd {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}

/// The rings seen as a [`DirtySource`]: a "get" collects the rings (which also re-protects the
/// pages in KVM) and takes the slot's collected pages.
pub struct RingSource<'a>(pub &'a DirtyRings);

impl DirtySource for RingSource<'_> {
    fn get_dirty_log(&self, slot: u32, _npages: u64) -> Result<Vec<u64>, DirtyLogError> {
        self.0.collect()?;
        self.0.take(slot)
    }

    fn clear_dirty_log(&self, _slot: u32, _first: u64, _num: u64, _bitmap: &[u64]) -> Result<(), DirtyLogError> {
        Ok(())
    }

    fn protects_on_get(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    static CAUGHT: AtomicU64 = AtomicU64::new(0);

    extern "C" fn count(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        CAUGHT.fetch_add(1, Ordering::SeqCst);
    }

    fn blocked(sig: i32) -> bool {
        // SAFETY: sigset_t is plain data, filled by pthread_sigmask before it is read.
        let mut cur: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: a null new set only queries this thread's mask into `cur`.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur) };
        // SAFETY: `cur` is an initialised set.
        unsafe { libc::sigismember(&cur, sig) == 1 }
    }

    /// Every KVM_RESET_DIRTY_RINGS call runs with the vCPU kick (and SIGINT) blocked, is
    /// repeated until it resets nothing, retries EINTR, and the thread's mask comes back after.
    #[test]
    fn every_reset_call_runs_with_signals_blocked_until_nothing_is_left() {
        let kick = crate::vcpu::kick_signal();
        assert!(!blocked(kick));
        let mut calls = Vec::new();
        let answers = [Ok(40), Err(std::io::Error::from_raw_os_error(libc::EINTR)), Ok(3), Ok(0), Ok(9)];
        let mut it = answers.into_iter();

        reset_until_done(|| {
            calls.push(blocked(kick) && blocked(libc::SIGINT));
            it.next().unwrap_or(Ok(0))
        })
        .unwrap();

        assert_eq!(calls, vec![true; 4], "calls (true: signals were blocked) until the first 0");
        assert!(!blocked(kick), "the thread's mask did not come back");
        let e = reset_until_done(|| Err(std::io::Error::from_raw_os_error(libc::EBADF))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        assert!(!blocked(kick), "the mask did not come back after an error");
    }

    /// The reset runs with signals blocked: a signal sent to the thread meanwhile (a vCPU kick)
    /// waits, and is delivered, not lost, once the guard goes; the old mask comes back.
    #[test]
    fn a_signal_during_the_guard_waits_and_is_delivered_after_it() {
        let sig = libc::SIGRTMIN() + 7;
        vmm_sys_util::signal::register_signal_handler(sig, count).unwrap();
        assert!(!blocked(sig));
        let before = CAUGHT.load(Ordering::SeqCst);
        {
            let _g = SignalsBlocked::new().unwrap();
            assert!(blocked(sig) && blocked(libc::SIGINT) && blocked(libc::SIGTERM));
            // SAFETY: signals this very thread.
            unsafe { libc::pthread_kill(libc::pthread_self(), sig) };
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(CAUGHT.load(Ordering::SeqCst), before, "a signal was handled inside the guard");
        }
        assert_eq!(CAUGHT.load(Ordering::SeqCst), before + 1, "the held signal was not delivered");
        assert!(!blocked(sig) && !blocked(libc::SIGINT), "the old mask did not come back");
    }
}
