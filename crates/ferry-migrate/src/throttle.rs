//! vCPU throttling for migrations that cannot converge otherwise (QEMU calls it auto-converge).
//!
//! A guest that dirties memory faster than the link sends it never lets the dirty set shrink.
//! The throttle takes the vCPUs off the CPU for `percent`% of the time: it lets them run a short
//! slice, pauses them, and keeps them paused for as long as the slice *really* lasted times
//! `percent / (100 - percent)`. The off time follows the measured run time, not the planned one,
//! so a throttle thread that wakes late (a busy host) or a slow pause lengthens the off time with
//! it and the guest still gets no more than its share. The guest then dirties proportionally less,
//! the dirty set shrinks, and the final pause becomes short. The price is visible to the guest as
//! pauses of a few ms each (at most [`MAX_OFF`]). It is on by default and only ever applied to a
//! dirty set that stopped shrinking; `ferry migrate --no-auto-converge` turns it off.
//!
//! How hard to throttle is chosen per stalled iteration by [`next_percent`]: at least the next
//! step of a fixed schedule, and more when the measured dirty rate says the step cannot be enough.
//!
//! The throttle runs on its own thread and is stopped (vCPUs left running) before the final pass
//! and whenever the migration ends: a failed migration never leaves the guest throttled.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_vmm::Vm;

/// Planned length of one throttle cycle (run slice plus off time).
pub const PERIOD: Duration = Duration::from_millis(5);
/// First throttle step, and the step added for every further stalled iteration.
pub const INITIAL_PERCENT: u32 = 50;
pub const STEP_PERCENT: u32 = 15;
/// Most the guest is throttled (QEMU's default `max-cpu-throttle` too).
pub const MAX_PERCENT: u32 = 99;
/// Longest single off time, however long a run slice turned out.
pub const MAX_OFF: Duration = Duration::from_millis(100);
/// Dirty rate aimed at when the throttle is chosen from measurements, as a share of the rate the
/// link sends at: at half, each iteration leaves about half as much dirty as it sent.
const TARGET_DIRTY_SHARE: f64 = 0.5;

/// The throttle for the iteration after a stalled one.
///
/// `current` is the throttle the stalled iteration ran under, `dirty_pages_s` the rate at which
/// it saw new pages dirtied and `send_pages_s` the rate at which the link sent pages. The guest's
/// dirty rate is taken as proportional to its run share (`100 - percent`): the result is the
/// next step of the schedule (50, then +15) or, if more, the share that brings the dirty rate to
/// half the send rate, never above [`MAX_PERCENT`] and always above `current` below it. A
/// guest that re-dirties its whole working set every iteration shows a dirty rate capped by the
/// set's size, so the measured rate can only understate the need: the schedule's step is the
/// floor.
pub fn next_percent(current: u32, dirty_pages_s: f64, send_pages_s: f64) -> u32 {
    let current = current.min(MAX_PERCENT);
    let scheduled = if current == 0 { INITIAL_PERCENT } else { current + STEP_PERCENT };
    let measured = if dirty_pages_s > 0.0 && send_pages_s > 0.0 && dirty_pages_s.is_finite() {
        let run_share = f64::from(100 - current) / 100.0;
        let wanted = run_share * (TARGET_DIRTY_SHARE * send_pages_s / dirty_pages_s).min(1.0);
        // Rounded up: throttle at least as hard as computed.
        (100.0 - wanted * 100.0).ceil().clamp(0.0, 100.0) as u32
    } else {
        0
    };
    scheduled.max(measured).min(MAX_PERCENT)
}

/// Run slice planned for `percent` (its share of [`PERIOD`]).
fn run_slice(percent: u32) -> Duration {
    PERIOD * (100 - percent.min(MAX_PERCENT)) / 100
}

/// Off time owed for a run slice that lasted `ran` under `percent`: `ran * percent / (100 -
/// percent)`, at most [`MAX_OFF`].
pub fn off_time(ran: Duration, percent: u32) -> Duration {
    let p = percent.min(MAX_PERCENT);
    (ran * p / (100 - p)).min(MAX_OFF)
}

/// Parks until `deadline` or until `stop` is set (a stop unparks).
fn park_until(deadline: Instant, stop: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= deadline || stop.load(Ordering::SeqCst) {
            return;
        }
        std::thread::park_timeout(deadline - now);
    }
}

/// A running throttle.
pub struct Throttle<'a> {
    vm: &'a Vm,
    percent: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    /// Stop with the vCPUs paused (the final pass follows at once).
    end_paused: Arc<AtomicBool>,
    /// Total time the throttle has held the vCPUs paused, in ns.
    off_ns: Arc<AtomicU64>,
    thread: Option<std::thread::ScopedJoinHandle<'a, ()>>,
}

/// Starts a throttle thread (at 0%) in `scope`.
pub fn start<'scope>(scope: &'scope std::thread::Scope<'scope, '_>, vm: &'scope Vm) -> Throttle<'scope> {
    let percent = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let end_paused = Arc::new(AtomicBool::new(false));
    let off_ns = Arc::new(AtomicU64::new(0));
    let (p, s, e, off_total) = (percent.clone(), stop.clone(), end_paused.clone(), off_ns.clone());
    let thread = std::thread::Builder::new()
        .name("migration-throttle".into())
        .spawn_scoped(scope, move || {
            // Sleeps are parks, so that a stop (which unparks) takes effect at once: the
            // switch-over waits for this thread. The vCPUs run whenever this loop is not in its
            // off time.
            while !s.load(Ordering::SeqCst) {
                let pct = p.load(Ordering::SeqCst).min(MAX_PERCENT);
                let t_run = Instant::now();
                if pct == 0 {
                    park_until(t_run + PERIOD, &s);
                    continue;
                }
                park_until(t_run + run_slice(pct), &s);
                if s.load(Ordering::SeqCst) && !e.load(Ordering::SeqCst) {
                    break;
                }
                // A partial console line stays where it is: the switch-over may follow.
                if vm.pause_keep_output().is_err() {
                    break;
                }
                // The guest ran from the start of the slice until the pause took effect.
                let t_off = Instant::now();
                park_until(t_off + off_time(t_off - t_run, pct), &s);
                if s.load(Ordering::SeqCst) && e.load(Ordering::SeqCst) {
                    break;
                }
                let resumed = vm.resume();
                let off = u64::try_from(t_off.elapsed().as_nanos()).unwrap_or(u64::MAX);
                off_total.fetch_add(off, Ordering::Relaxed);
                if resumed.is_err() {
                    break;
                }
            }
        })
        .ok();
    Throttle { vm, percent, stop, end_paused, off_ns, thread }
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

    /// Total time the vCPUs have been held paused by the throttle so far.
    pub fn off_total(&self) -> Duration {
        Duration::from_nanos(self.off_ns.load(Ordering::Relaxed))
    }

    /// Throttles harder after a stalled iteration (see [`next_percent`]). Returns the new value,
    /// or None when already at the maximum or when the throttle thread could not start.
    pub fn step_up(&self, dirty_pages_s: f64, send_pages_s: f64) -> Option<u32> {
        if !self.can_step_up() {
            return None;
        }
        let next = next_percent(self.percent(), dirty_pages_s, send_pages_s);
        self.percent.store(next, Ordering::SeqCst);
        Some(next)
    }

    /// Stops throttling and leaves the vCPUs paused, without letting them run a slice in
    /// between: the switch-over's pause follows. A console line the guest was printing stays
    /// held for the state ([`Vm::pause_keep_output`]).
    pub fn stop_paused(&mut self) -> Result<(), ferry_vmm::vm::VmError> {
        self.end_paused.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.vm.pause_keep_output()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saturated_dirty_set_gets_at_least_the_next_scheduled_step() {
        // The guest re-dirtied its whole set: the measured rate equals the send rate.
        assert_eq!(next_percent(0, 32_000.0, 32_000.0), 50);
        assert_eq!(next_percent(50, 32_000.0, 32_000.0), 75);
        // From 75 the measurement asks for 88, the schedule for 90: the schedule wins.
        assert_eq!(next_percent(75, 32_000.0, 32_000.0), 90);
    }

    #[test]
    fn a_guest_dirtying_far_faster_than_the_link_is_throttled_harder_than_the_schedule() {
        // At 50 % the guest still dirties 10x what the link sends: run share must fall from
        // 50 % to 2.5 %.
        assert_eq!(next_percent(50, 320_000.0, 32_000.0), 98);
        // From no throttle at 40x: the maximum.
        assert_eq!(next_percent(0, 1_280_000.0, 32_000.0), MAX_PERCENT);
    }

    #[test]
    fn the_throttle_never_exceeds_its_maximum_and_ignores_meaningless_rates() {
        assert_eq!(next_percent(95, 32_000.0, 32_000.0), MAX_PERCENT);
        assert_eq!(next_percent(MAX_PERCENT, 1e9, 1.0), MAX_PERCENT);
        assert_eq!(next_percent(50, 0.0, 32_000.0), 65);
        assert_eq!(next_percent(50, f64::INFINITY, 32_000.0), 65);
        assert_eq!(next_percent(50, 32_000.0, 0.0), 65);
    }

    #[test]
    fn off_time_follows_the_measured_run_slice() {
        // The planned slice at 80 % is 1 ms; off 4 ms keeps 80 %.
        assert_eq!(run_slice(80), Duration::from_millis(1));
        assert_eq!(off_time(Duration::from_millis(1), 80), Duration::from_millis(4));
        // A slice that ran 3 ms (the throttle thread woke late) is paid for in full.
        assert_eq!(off_time(Duration::from_millis(3), 80), Duration::from_millis(12));
        // At 99 % a 0.2 ms slice costs 19.8 ms off.
        assert_eq!(off_time(Duration::from_micros(200), 99), Duration::from_micros(19_800));
        // Never longer than MAX_OFF.
        assert_eq!(off_time(Duration::from_millis(50), 99), MAX_OFF);
    }
}
