//! Per-vCPU dirty-rate limit (QEMU's dirty-limit idea), the alternative to the whole-machine
//! throttle of [`crate::throttle`] when the machine runs with the dirty ring.
//!
//! With the dirty ring, KVM logs each dirtied page on the ring of the vCPU that dirtied it, so
//! each vCPU's own dirty rate is known. Once pre-copy stalls (the same trigger as auto-converge),
//! a limiter thread collects the rings every [`PERIOD`] (5 ms) and keeps a token bucket per
//! vCPU: it earns `limit` pages per second (at most [`BURST`] worth saved up, and at most as
//! much debt) and spends one per page the vCPU dirtied. A vCPU in debt is held out of
//! `KVM_RUN` for as long as the limit takes to pay the debt back, but never for more than
//! [`MAX_HOLD`] of a period ([`ferry_vmm::Vm::hold_vcpu`]): it runs at least 1 % of every 5 ms,
//! so the guest sees its vCPU stop for at most about 5 ms at a time, not for the whole debt
//! (the first version held a debt off in one piece: 450 ms gaps in the guest's heartbeat over
//! the 32 MiB/s link). The price: a vCPU that dirties more than 100 times the limit when it
//! runs is held to 1 % of its rate, not to the limit (as auto-converge stops at 99 %). A vCPU
//! that dirties less than the limit is never held: a guest's vCPUs that compute or serve
//! without writing much run at full speed while the one filling memory is slowed.
//!
//! The limiter only collects the rings (which the dirty log's sync would do anyway, see
//! `ferry_vmm::dirty_ring`) and holds vCPUs; stopping it leaves at most one hold of
//! [`MAX_HOLD`] to run out. A failed migration never leaves the guest limited.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_vmm::Vm;
use serde::Serialize;

/// How often the rings are collected and the buckets settled.
pub const PERIOD: Duration = Duration::from_millis(5);
/// Longest hold per period: the vCPU runs at least the rest (1 %).
pub const MAX_HOLD: Duration = Duration::from_micros(4950);
/// Credit a vCPU may save up, and debt it may run up, in time at the limit: a vCPU idle for a
/// while may then dirty this much at once without being held, and one held as hard as it can
/// be is forgiven what it dirtied beyond this.
pub const BURST: Duration = Duration::from_millis(100);

/// Errors of the dirty-rate limit.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLimitError {
    #[error(
        "--dirty-limit needs the dirty ring, which tells each vCPU's dirty pages apart; this machine tracks dirty \
         pages with a bitmap (start it with ferry run --dirty-tracking ring)"
    )]
    NoRing,
    #[error("cannot start the dirty-limit thread")]
    Thread(#[source] std::io::Error),
}

/// What the limit did, per vCPU (in the migration summary).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DirtyLimitStats {
    /// The limit, MiB/s per vCPU.
    pub limit_mib_s: u64,
    /// The pass before which the limit took effect (0: it never had to).
    pub engaged_at_iteration: u32,
    /// Time each vCPU was held, ms.
    pub held_ms: Vec<f64>,
    /// Pages each vCPU dirtied while the limit was in effect.
    pub dirtied_pages: Vec<u64>,
    /// Each vCPU's dirty rate while the limit was in effect, MiB/s.
    pub dirty_rate_mib_s: Vec<f64>,
}

/// A vCPU's token bucket, in pages, and its dirty rate while it runs.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    credit: f64,
    /// Pages per second of running, as last seen.
    rate: f64,
    /// The hold the last settle asked for (the vCPU did not run then).
    last_hold: Duration,
}

impl Bucket {
    pub fn new() -> Self {
        Bucket { credit: 0.0, rate: 0.0, last_hold: Duration::ZERO }
    }

    /// Settles the last `dt` at `limit` pages/s against the `dirtied` pages, and returns how
    /// long to hold the vCPU at the start of the next period. The hold leaves it the running
    /// time that, at its dirty rate while running, spends what it has earned by the period's
    /// end (so the bucket settles at zero instead of swinging between debt and credit), at
    /// least 1 % of the period.
    pub fn settle(&mut self, dt: Duration, limit: f64, dirtied: u64) -> Duration {
        let cap = limit * BURST.as_secs_f64();
        self.credit = ((self.credit + limit * dt.as_secs_f64()).min(cap) - dirtied as f64).max(-cap);
        let ran = dt.saturating_sub(self.last_hold).as_secs_f64();
        if ran > 0.0 {
            self.rate = dirtied as f64 / ran;
        }
        let p = PERIOD.as_secs_f64();
        let hold = if limit <= 0.0 {
            0.0
        } else if self.rate > 0.0 {
            let may_run = (self.credit + limit * p) / self.rate;
            (p - may_run).clamp(0.0, MAX_HOLD.as_secs_f64())
        } else if self.credit < 0.0 {
            (-self.credit / limit).min(MAX_HOLD.as_secs_f64())
        } else {
            0.0
        };
        self.last_hold = Duration::from_secs_f64(hold);
        self.last_hold
    }
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket::new()
    }
}

struct Shared {
    stop: AtomicBool,
    /// 0 until the limit is engaged, then the pass it was engaged before.
    engaged: AtomicU32,
    dirtied: Mutex<Vec<u64>>,
    active: Mutex<Duration>,
}

/// The limiter thread of one migration.
pub struct DirtyLimiter<'a> {
    vm: &'a Vm,
    limit_mib_s: u64,
    shared: Arc<Shared>,
    held0: Vec<Duration>,
    thread: Option<std::thread::ScopedJoinHandle<'a, ()>>,
}

impl<'a> DirtyLimiter<'a> {
    /// Starts the thread for `vm`, idle until [`DirtyLimiter::engage`]. The machine must run
    /// with the dirty ring.
    pub fn start(
        scope: &'a std::thread::Scope<'a, '_>,
        vm: &'a Vm,
        limit_mib_s: u64,
    ) -> Result<DirtyLimiter<'a>, DirtyLimitError> {
        let Some(stats) = vm.dirty_ring_stats() else {
            return Err(DirtyLimitError::NoRing);
        };
        let n = stats.per_vcpu.len();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            engaged: AtomicU32::new(0),
            dirtied: Mutex::new(vec![0; n]),
            active: Mutex::new(Duration::ZERO),
        });
        let limit_pages_s = (limit_mib_s as f64) * 256.0;
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("dirty-limit".into())
            .spawn_scoped(scope, move || {
                let mut buckets = vec![Bucket::new(); n];
                let mut last: Option<(Instant, Vec<u64>)> = None;
                while !sh.stop.load(Ordering::SeqCst) {
                    std::thread::park_timeout(PERIOD);
                    if sh.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if sh.engaged.load(Ordering::SeqCst) == 0 {
                        continue;
                    }
                    // What each vCPU dirtied up to now (a collect re-protects the pages, as a
                    // sync does).
                    if vm.dirty_ring_collect().is_err() {
                        break;
                    }
                    let Some(now_counts) = vm.dirty_ring_stats().map(|s| s.per_vcpu) else { break };
                    let now = Instant::now();
                    if let Some((t, before)) = &last {
                        let dt = now - *t;
                        if let Ok(mut a) = sh.active.lock() {
                            *a += dt;
                        }
                        for (v, b) in buckets.iter_mut().enumerate() {
                            let dirtied = now_counts.get(v).copied().unwrap_or(0).saturating_sub(before[v]);
                            if let Ok(mut d) = sh.dirtied.lock() {
                                d[v] += dirtied;
                            }
                            let hold = b.settle(dt, limit_pages_s, dirtied);
                            if !hold.is_zero() && vm.hold_vcpu(v, now + hold).is_err() {
                                return;
                            }
                        }
                    }
                    last = Some((now, now_counts));
                }
            })
            .map_err(DirtyLimitError::Thread)?;
        Ok(DirtyLimiter { vm, limit_mib_s, shared, held0: vm.vcpus_held(), thread: Some(thread) })
    }

    /// Whether the limit is in effect.
    pub fn engaged(&self) -> bool {
        self.shared.engaged.load(Ordering::SeqCst) != 0
    }

    /// Puts the limit in effect (before pass `iteration`); later calls change nothing.
    pub fn engage(&self, iteration: u32) {
        let _ = self.shared.engaged.compare_exchange(0, iteration.max(1), Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Stops the thread (the last hold runs out by itself, within [`MAX_HOLD`]) and returns
    /// what the limit did.
    pub fn stop(&mut self) -> DirtyLimitStats {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.stats()
    }

    /// What the limit did so far.
    pub fn stats(&self) -> DirtyLimitStats {
        let held: Vec<f64> = self
            .vm
            .vcpus_held()
            .iter()
            .zip(self.held0.iter().copied().chain(std::iter::repeat(Duration::ZERO)))
            .map(|(h, h0)| h.saturating_sub(h0).as_secs_f64() * 1000.0)
            .collect();
        let dirtied = self.shared.dirtied.lock().map(|d| d.clone()).unwrap_or_default();
        let active = self.shared.active.lock().map(|a| a.as_secs_f64()).unwrap_or(0.0);
        DirtyLimitStats {
            limit_mib_s: self.limit_mib_s,
            engaged_at_iteration: self.shared.engaged.load(Ordering::SeqCst),
            held_ms: held,
            dirty_rate_mib_s: dirtied
                .iter()
                .map(|&p| if active > 0.0 { p as f64 / 256.0 / active } else { 0.0 })
                .collect(),
            dirtied_pages: dirtied,
        }
    }
}

impl Drop for DirtyLimiter<'_> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: f64 = 256.0 * 8.0; // 8 MiB/s in pages

    #[test]
    fn a_vcpu_under_the_limit_is_never_held() {
        let mut b = Bucket::new();
        for _ in 0..100 {
            // 5 ms at 8 MiB/s earns 10.24 pages; 10 dirtied.
            assert_eq!(b.settle(PERIOD, LIMIT, 10), Duration::ZERO);
        }
    }

    #[test]
    fn a_vcpu_at_twice_the_limit_is_held_about_half_of_each_period() {
        let mut b = Bucket::new();
        // The first period shows the rate; from then on each hold leaves it half the period.
        let mut holds = Vec::new();
        let mut run = PERIOD.as_secs_f64();
        for _ in 0..40 {
            let h = b.settle(PERIOD, LIMIT, (LIMIT * 2.0 * run).round() as u64);
            run = PERIOD.as_secs_f64() - h.as_secs_f64();
            holds.push(h.as_secs_f64() / PERIOD.as_secs_f64());
        }
        // Whole pages make each hold a little off; on average, half.
        let late = &holds[20..];
        let mean = late.iter().sum::<f64>() / late.len() as f64;
        assert!((mean - 0.5).abs() < 0.03 && late.iter().all(|&h| (h - 0.5).abs() < 0.1), "holds: {late:?}");
    }

    #[test]
    fn credit_and_debt_are_capped_at_the_burst() {
        let mut b = Bucket::new();
        // A long idle time saves only BURST (100 ms) worth: 204.8 pages.
        assert_eq!(b.settle(Duration::from_secs(10), LIMIT, 0), Duration::ZERO);
        assert_eq!(b.settle(Duration::ZERO, LIMIT, 204), Duration::ZERO);
        assert!(!b.settle(Duration::ZERO, LIMIT, 2).is_zero());
        // A huge burst of dirtying leaves at most 204.8 pages of debt: paid off in 100 ms.
        let mut b = Bucket::new();
        let _ = b.settle(PERIOD, LIMIT, 1_000_000);
        let mut periods = 0;
        while !b.settle(PERIOD, LIMIT, 0).is_zero() {
            periods += 1;
        }
        assert!((19..=21).contains(&periods), "{periods} periods to pay the debt");
    }

    /// A vCPU that dirties `factor` times the limit whenever it runs (whole pages), settled
    /// every period and held as told: the share of the time it ran, and the rate it dirtied at
    /// over the limit.
    fn run_share(factor: f64) -> (f64, f64) {
        let mut b = Bucket::new();
        let p = PERIOD.as_secs_f64();
        let (mut ran, mut t, mut hold, mut pages) = (0.0f64, 0.0f64, 0.0f64, 0u64);
        while t < 60.0 {
            // Held for `hold` at the start of this period, running the rest.
            let run = p - hold;
            ran += run;
            t += p;
            let dirtied = (LIMIT * factor * run).round() as u64;
            pages += dirtied;
            hold = b.settle(PERIOD, LIMIT, dirtied).as_secs_f64();
        }
        (ran / t, pages as f64 / t / LIMIT)
    }

    #[test]
    fn held_time_over_a_long_run_brings_the_rate_to_the_limit() {
        for factor in [2.0, 10.0, 50.0] {
            let (share, rate) = run_share(factor);
            assert!((rate - 1.0).abs() < 0.03, "{factor}x the limit: dirtied at {rate:.3}x the limit ({share:.4} run)");
        }
    }

    #[test]
    fn a_vcpu_far_over_the_limit_still_runs_one_percent_of_the_time() {
        let (share, _) = run_share(1000.0);
        assert!((share - 0.01).abs() < 0.001, "ran {share:.4} of the time");
    }
}
