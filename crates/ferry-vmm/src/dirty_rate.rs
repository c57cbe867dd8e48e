//! Measuring the guest's dirty rate while it runs (the analogue of QEMU's `calc-dirty-rate` in
//! dirty-bitmap mode), as one more consumer of the shared dirty log.
//!
//! The monitor registers a consumer that starts clean, syncs, harvests everything it was given
//! (which re-protects those pages in KVM), waits for the window, syncs again and counts its
//! pending pages: the distinct pages written during the window. It never disturbs another
//! consumer: a running migration keeps its own bits, and the log only ever clears bits it knows
//! are dirty (see [`crate::dirty_log`]). With the dirty ring, the per-vCPU entry counters give
//! the rate per vCPU as well.

use std::time::{Duration, Instant};

use crate::dirty_log::{ConsumerId, Initial};
use crate::memory::PAGE_SIZE;
use crate::vm::{DirtyTracking, Vm, VmError};

/// One measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DirtyRate {
    /// "bitmap" or "ring".
    pub tracking: &'static str,
    pub window_ms: f64,
    /// Distinct pages written during the window.
    pub pages: u64,
    pub pages_per_s: f64,
    pub mib_per_s: f64,
    /// Ring only: ring entries per second per vCPU. A page written by two vCPUs counts twice,
    /// and this host's KVM (PVM) may push a page more than once between resets.
    pub per_vcpu_pages_per_s: Option<Vec<f64>>,
    /// Time of the first sync plus the harvest (and clear) of everything it found, in ms: the
    /// cost of one sync + clear of all guest RAM.
    pub start_sync_clear_ms: f64,
    /// Pages the start harvest took (and re-protected).
    pub start_pages: u64,
    /// Time of the final sync, in ms.
    pub end_sync_ms: f64,
    /// What the final sync fetched: bits set in KVM's bitmap, or ring entries collected.
    pub end_fetched: u64,
    /// Ring only: `KVM_EXIT_DIRTY_RING_FULL` exits during the window (each collected all rings).
    pub ring_full_exits: Option<u64>,
}

/// Harvests (and so re-protects) every page `id` has pending; returns how many there were.
pub fn harvest_all(vm: &Vm, id: ConsumerId) -> Result<u64, VmError> {
    let mut n = 0;
    for (i, r) in vm.ram().regions().iter().enumerate() {
        let bits = vm.dirty_harvest(id, i, 0, r.size / PAGE_SIZE)?;
        n += bits.iter().map(|w| w.count_ones() as u64).sum::<u64>();
    }
    Ok(n)
}

/// Measures the dirty rate over `window` while the guest runs.
pub fn measure(vm: &Vm, window: Duration) -> Result<DirtyRate, VmError> {
    let registered = vm.dirty_consumer("dirty-rate", Initial::Clean)?;
    let id = registered.id();
    let t = Instant::now();
    vm.dirty_sync()?;
    let start_pages = harvest_all(vm, id)?;
    let start_sync_clear = t.elapsed();
    let ring0 = vm.dirty_ring_stats();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let ring_before_end = vm.dirty_ring_stats();
    let t = Instant::now();
    let kvm_bits = vm.dirty_sync()?;
    let end_sync = t.elapsed();
    let secs = t0.elapsed().as_secs_f64().max(1e-6);
    let pages = vm.dirty_pending(id)?;
    let ring1 = vm.dirty_ring_stats();
    let entries = |s: &Option<crate::dirty_ring::RingStats>| s.as_ref().map(|s| s.per_vcpu.iter().sum::<u64>());
    let end_fetched = match (entries(&ring_before_end), entries(&ring1)) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => kvm_bits,
    };
    let (per_vcpu, ring_full_exits) = match (ring0, ring1) {
        (Some(a), Some(b)) => (
            Some(b.per_vcpu.iter().zip(&a.per_vcpu).map(|(b, a)| b.saturating_sub(*a) as f64 / secs).collect()),
            Some(b.full_exits.saturating_sub(a.full_exits)),
        ),
        _ => (None, None),
    };
    let pages_per_s = pages as f64 / secs;
    Ok(DirtyRate {
        tracking: match vm.dirty_tracking() {
            DirtyTracking::Bitmap { .. } => "bitmap",
            DirtyTracking::Ring { .. } => "ring",
        },
        window_ms: secs * 1000.0,
        pages,
        pages_per_s,
        mib_per_s: pages_per_s * PAGE_SIZE as f64 / (1 << 20) as f64,
        per_vcpu_pages_per_s: per_vcpu,
        start_sync_clear_ms: start_sync_clear.as_secs_f64() * 1000.0,
        start_pages,
        end_sync_ms: end_sync.as_secs_f64() * 1000.0,
        end_fetched,
        ring_full_exits,
    })
}
