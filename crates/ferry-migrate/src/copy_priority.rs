//! Keeping the bulk copy off the guest's CPUs.
//!
//! On a host with a CPU to spare beyond the guest's vCPUs, the threads that move memory (the
//! source's sender, the destination's receiver) run as `SCHED_IDLE` during the bulk first pass:
//! they then use only CPU time no vCPU wants, so the copy never takes a vCPU's CPU away (on a
//! 2-CPU host the copy at full speed otherwise stalled a 1-vCPU guest for 15–25 ms at a time).
//! The source keeps its sender there through the later passes too (at normal priority a
//! throttled flat-out guest saw 8–11 ms gaps in every iteration, none in the idle class),
//! unless an iteration's bandwidth falls below half the first pass's: then other load has
//! taken the spare CPUs and the sender returns to normal priority rather than starve. The
//! destination's receiver stays there until the final pass when the source is on the same
//! host (a UNIX socket or loopback: its guest shares these CPUs), else for the first pass only.
//! Without a spare CPU nothing changes: an idle-class copy could starve behind busy vCPUs and
//! never converge. The guard restores the thread's normal class when dropped.
//!
//! The spare CPU can also be taken by something outside this machine: another guest or job on
//! the host. The idle class then gets almost nothing (measured: a 768 MiB first pass beside
//! another busy guest on this 2-CPU host ran at 1 MB/s and took 612 s). So the copy watches
//! itself ([`IdleCopy::watch`]): when the thread spent most of a 100 ms window runnable but
//! not running (the kernel's per-thread run delay, `/proc/thread-self/schedstat`), it returns
//! to normal priority for good.
//!
//! Leaving `SCHED_IDLE` needs CAP_SYS_NICE or an RLIMIT_NICE that allows the thread's nice
//! value: Ferry tries it once on a throwaway thread and, where it fails, never enters the idle
//! class (a receiver stuck in it would hand it to the vCPU threads it starts).

/// While alive, the calling thread runs in the idle scheduling class (if it applied).
pub struct IdleCopy {
    applied: bool,
    /// Start of the current watch window and the thread's run delay (ns) then.
    window: Option<(std::time::Instant, u64)>,
    /// Not Send: `watch` and `Drop` act on the calling thread, which must be the one that
    /// entered.
    _thread: std::marker::PhantomData<*const ()>,
}

/// Length of a starvation watch window.
const WATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);
/// Share of a window spent waiting for a CPU that counts as starved. Two copy threads sharing
/// one spare CPU wait about half the time each; a starved one waits nearly all of it.
const STARVED_SHARE: f64 = 0.8;

impl IdleCopy {
    /// Applies to the calling thread when the host has more CPUs than the machine has threads
    /// that may be busy while it runs: `vcpus`, plus each disk's device thread and I/O threads
    /// (`disk_threads`). Otherwise the idle-class copy could starve behind them (measured: a
    /// guest doing disk I/O took 2.6x as long to migrate).
    pub fn enter(vcpus: u32, disk_threads: u32) -> Self {
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        if cpus <= vcpus + disk_threads || !can_leave_idle() {
            return IdleCopy { applied: false, window: None, _thread: std::marker::PhantomData };
        }
        let applied = set_policy(libc::SCHED_IDLE);
        IdleCopy {
            applied,
            window: run_delay_ns().map(|d| (std::time::Instant::now(), d)),
            _thread: std::marker::PhantomData,
        }
    }

    /// Call often (every batch) from the thread that entered: once a watch window has passed,
    /// leaves the idle class if the thread was starved in it. Cheap between windows (one clock
    /// read). Returns whether it left. Without schedstat it never leaves.
    pub fn watch(&mut self) -> bool {
        let Some((start, delay0)) = self.window.filter(|_| self.applied) else {
            return false;
        };
        let elapsed = start.elapsed();
        if elapsed < WATCH_WINDOW {
            return false;
        }
        let Some(delay) = run_delay_ns() else {
            self.window = None;
            return false;
        };
        self.window = Some((std::time::Instant::now(), delay));
        let waited = delay.saturating_sub(delay0) as f64 / 1e9;
        if !starved(waited, elapsed.as_secs_f64()) {
            return false;
        }
        if set_policy(libc::SCHED_OTHER) {
            self.applied = false;
            // The run delay is charged when the thread next runs, so it can cover more than the
            // window (a wait that began before it): what is said is the share of the window.
            let share = (waited / elapsed.as_secs_f64()).min(1.0);
            tracing::info!(
                "the copy in the idle scheduling class spent {:.0} % of the last {:.0} ms waiting for a CPU (other load took the spare one): copying at normal priority",
                share * 100.0,
                elapsed.as_secs_f64() * 1e3
            );
            return true;
        }
        false
    }

    /// Whether the calling thread runs in the idle class because of this guard.
    pub fn applied(&self) -> bool {
        self.applied
    }
}

/// Whether a thread of this process can switch back from `SCHED_IDLE` to `SCHED_OTHER`. The
/// kernel's rule involves CAP_SYS_NICE in the initial user namespace, RLIMIT_NICE, the nice
/// value and security modules (root in a container often cannot), so it is tried once, on a
/// throwaway thread, instead of modelled.
fn can_leave_idle() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        std::thread::Builder::new()
            .name("ferry-sched-probe".into())
            .spawn(|| set_policy(libc::SCHED_IDLE) && set_policy(libc::SCHED_OTHER))
            .ok()
            .and_then(|h| h.join().ok())
            .unwrap_or(false)
    })
}

/// Whether a thread that waited `waited` s for a CPU in a window of `window` s was starved.
fn starved(waited: f64, window: f64) -> bool {
    window > 0.0 && waited / window >= STARVED_SHARE
}

/// The calling thread's total time runnable but not running, in ns (second field of
/// `/proc/thread-self/schedstat`), if the kernel keeps it.
fn run_delay_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().nth(1)?.parse().ok()
}

fn set_policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(0, ...) changes the calling thread's policy; `param` is a valid
    // struct for the call's duration.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

impl Drop for IdleCopy {
    fn drop(&mut self) {
        if self.applied && !set_policy(libc::SCHED_OTHER) {
            tracing::warn!("cannot leave the idle scheduling class: {}", std::io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starved_only_when_most_of_the_window_was_spent_waiting() {
        assert!(starved(0.099, 0.1));
        assert!(starved(0.085, 0.1));
        // Two copy threads sharing one spare CPU: about half each.
        assert!(!starved(0.05, 0.1));
        assert!(!starved(0.0, 0.1));
        assert!(!starved(0.0, 0.0));
    }

    /// The schedstat tests load the CPUs; they must not overlap.
    static CPU_LOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn run_delay_is_read_and_grows_while_waiting_for_a_cpu() {
        let _serial = CPU_LOAD.lock().unwrap_or_else(|e| e.into_inner());
        let Some(d0) = run_delay_ns() else {
            eprintln!("SKIPPED: this kernel keeps no schedstat (CONFIG_SCHED_INFO): the starvation watch is off here");
            return;
        };
        // Twice as many spinning threads as CPUs: this thread must wait for one.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let spinners: Vec<_> = (0..cpus * 2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || while !stop.load(std::sync::atomic::Ordering::Relaxed) {})
            })
            .collect();
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(300) {
            std::hint::spin_loop();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinners.into_iter().for_each(|h| h.join().unwrap());
        let d1 = run_delay_ns().unwrap();
        assert!(d1 > d0, "run delay did not grow with {} spinners on {cpus} CPUs", cpus * 2);
    }

    /// This thread's CPU time (s): an account of starvation independent of schedstat.
    fn thread_cpu_secs() -> f64 {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we pass, valid for the call.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
    }

    /// Pins the calling thread to `cpu`; returns the affinity it had.
    fn pin_to(cpu: usize) -> libc::cpu_set_t {
        // SAFETY: cpu_set_t is plain data; zeroed is a valid (empty) set.
        let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: sched_getaffinity(0) fills a cpu_set_t of the size passed.
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) };
        // SAFETY: as above.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE (it came from sched_getcpu).
        unsafe { libc::CPU_SET(cpu, &mut one) };
        // SAFETY: sched_setaffinity(0) reads a cpu_set_t of the size passed.
        assert_eq!(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) }, 0);
        old
    }

    /// Gives the thread back the affinity it had when dropped.
    struct Affinity(libc::cpu_set_t);

    impl Drop for Affinity {
        fn drop(&mut self) {
            // SAFETY: sched_setaffinity(0) reads the cpu_set_t saved by pin_to.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
        }
    }

    /// Stops the spinner threads when dropped, even if the test fails midway.
    struct Spinners(std::sync::Arc<std::sync::atomic::AtomicBool>, Vec<std::thread::JoinHandle<()>>);

    impl Drop for Spinners {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            self.1.drain(..).for_each(|h| {
                let _ = h.join();
            });
        }
    }

    /// The watch itself, on an idle-class thread pinned to one CPU: alone there it stays
    /// (several windows pass); beside one normal-priority spinner pinned to the same CPU it gets
    /// almost no CPU, and must notice within a few windows and return to normal priority. Load
    /// from outside the test that starves the thread in the first half is told apart by the
    /// thread's own CPU time, and skips rather than fails.
    #[test]
    fn watch_leaves_the_idle_class_when_starved_and_only_then() {
        let _serial = CPU_LOAD.lock().unwrap_or_else(|e| e.into_inner());
        if run_delay_ns().is_none() {
            eprintln!("SKIPPED: this kernel keeps no schedstat (CONFIG_SCHED_INFO): the starvation watch is off here");
            return;
        }
        // SAFETY: sched_getcpu takes no arguments.
        let cpu = unsafe { libc::sched_getcpu() };
        assert!(cpu >= 0);
        let _affinity = Affinity(pin_to(cpu as usize));
        let mut idle = IdleCopy::enter(0, 0);
        if !idle.applied() {
            eprintln!("SKIPPED: this thread cannot enter and leave SCHED_IDLE here (no CAP_SYS_NICE or RLIMIT_NICE)");
            return;
        }
        // SAFETY: sched_getscheduler(0) only reads the calling thread's policy.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_IDLE);
        let (t, c0) = (std::time::Instant::now(), thread_cpu_secs());
        // Four windows judged (each judgement starts a new window), or it left.
        let (mut left_alone, mut judged) = (false, 0);
        let mut start = idle.window.map(|w| w.0);
        while !left_alone && judged < 4 && t.elapsed() < std::time::Duration::from_secs(10) {
            left_alone = idle.watch();
            if idle.window.map(|w| w.0) != start {
                (judged, start) = (judged + 1, idle.window.map(|w| w.0));
            }
        }
        assert!(left_alone || judged == 4, "the watch judged {judged} windows in {:?}", t.elapsed());
        if left_alone {
            let share = (thread_cpu_secs() - c0) / t.elapsed().as_secs_f64();
            if share < STARVED_SHARE {
                eprintln!(
                    "SKIPPED: other load on CPU {cpu} starved this thread (it ran {:.0} % of the time)",
                    share * 100.0
                );
                return;
            }
            panic!("left the idle class although this thread ran {:.0} % of the time", share * 100.0);
        }
        assert!(idle.applied());

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_to(cpu as usize);
                // A new thread inherits this one's idle class.
                assert!(set_policy(libc::SCHED_OTHER));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {}
            })
        };
        let spinners = Spinners(stop, vec![spinner]);
        let t = std::time::Instant::now();
        let mut left = false;
        while !left && t.elapsed() < std::time::Duration::from_secs(3) {
            left = idle.watch();
        }
        drop(spinners);
        assert!(left, "still in the idle class after {:?} beside a spinner on CPU {cpu}", t.elapsed());
        assert!(!idle.applied());
        // SAFETY: as above.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }
}
