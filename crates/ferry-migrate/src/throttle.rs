//! vCPU throttling for migrations that cannot converge otherwise (QEMU calls it auto-converge).
//!
//! A guest that dirties memory faster than the link sends it never lets the dirty set shrink.
//! The throttle takes the vCPUs off the CPU for `percent`% of every period: each period it pauses
//! them, sleeps, and resumes them. The guest then dirties proportionally less, the dirty set
//! shrinks, and the final pause becomes short. The price is visible to the guest as pauses of at
//! most `percent`% of [`PERIOD`] each, which is why the period is short. It is on by default
//! and only ever applied to a dirty set that stopped shrinking; `ferry migrate
//! --no-auto-converge` turns it off.
//!
//! The throttle runs on its own thread and is stopped (vCPUs left running) before the final pass
//! and whenever the migration ends: a failed migration never leaves the guest throttled.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_vmm::Vm;

/// One throttle cycle: the vCPUs are paused for `percent`% of it.
pub const PERIOD: Duration = Duration::from_millis(5);
/// First throttle step, and the step added for every further stalled iteration.
pub const INITIAL_PERCENT: u32 = 50;
pub const STEP_PERCENT: u32 = 15;
/// Most the guest is throttled.
pub const MAX_PERCENT: u32 = 95;

/// A running throttle.
pub struct Throttle<'a> {
    vm: &'a Vm,
    percent: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    /// Stop with the vCPUs paused (the final pass follows at once).
    end_paused: Arc<AtomicBool>,
    thread: Option<std::thread::ScopedJoinHandle<'a, ()>>,
}

/// Starts a throttle thread (at 0%) in `scope`.
pub fn start<'scope>(scope: &'scope std::thread::Scope<'scope, '_>, vm: &'scope Vm) -> Throttle<'scope> {
    let percent = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let end_paused = Arc::new(AtomicBool::new(false));
    let (p, s, e) = (percent.clone(), stop.clone(), end_paused.clone());
    let thread = std::thread::Builder::new()
        .name("migration-throttle".into())
        .spawn_scoped(scope, move || {
            // Sleeps are parks, so that a stop (which unparks) takes effect at once: the
            // switch-over waits for this thread.
            while !s.load(Ordering::SeqCst) {
                let pct = p.load(Ordering::SeqCst).min(MAX_PERCENT);
                if pct == 0 {
                    std::thread::park_timeout(PERIOD);
                    continue;
                }
                let off = PERIOD * pct / 100;
                if vm.pause().is_err() {
                    break;
                }
                std::thread::park_timeout(off);
                if s.load(Ordering::SeqCst) && e.load(Ordering::SeqCst) {
                    break;
                }
                if vm.resume().is_err() {
                    break;
                }
                std::thread::park_timeout(PERIOD - off);
            }
        })
        .ok();
    Throttle { vm, percent, stop, end_paused, thread }
}

impl Throttle<'_> {
    /// Whether it can throttle harder (its thread runs and it is below the maximum).
    pub fn can_step_up(&self) -> bool {
        self.thread.is_some() && self.percent() < MAX_PERCENT
    }

    /// The throttle now in force.
    pub fn percent(&self) -> u32 {
        self.percent.load(Ordering::SeqCst)
    }

    /// Throttles harder (first step, then by steps up to the maximum). Returns the new value,
    /// or None when already at the maximum or when the throttle thread could not start.
    pub fn step_up(&self) -> Option<u32> {
        let cur = self.percent();
        if self.thread.is_none() || cur >= MAX_PERCENT {
            return None;
        }
        let next = if cur == 0 { INITIAL_PERCENT } else { (cur + STEP_PERCENT).min(MAX_PERCENT) };
        self.percent.store(next, Ordering::SeqCst);
        Some(next)
    }

    /// Stops throttling and leaves the vCPUs paused, without letting them run a slice in
    /// between: the switch-over's pause follows.
    pub fn stop_paused(&mut self) -> Result<(), ferry_vmm::vm::VmError> {
        self.end_paused.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.vm.pause()
    }

    /// Stops throttling and waits until the vCPUs run freely again.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        let _ = self.vm.resume();
    }
}

impl Drop for Throttle<'_> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}
