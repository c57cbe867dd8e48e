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
//! Leaving `SCHED_IDLE` needs CAP_SYS_NICE or an RLIMIT_NICE that allows the thread's nice
//! value: Ferry tries it once on a throwaway thread and, where it fails, never enters the idle
//! class (a receiver stuck in it would hand it to the vCPU threads it starts).

/// While alive, the calling thread runs in the idle scheduling class (if it applied).
pub struct IdleCopy {
    applied: bool,
}

impl IdleCopy {
    /// Applies to the calling thread when the host has more CPUs than the machine has threads
    /// that may be busy while it runs: `vcpus`, plus each disk's device thread and I/O threads
    /// (`disk_threads`). Otherwise the idle-class copy could starve behind them (measured: a
    /// guest doing disk I/O took 2.6x as long to migrate).
    pub fn enter(vcpus: u32, disk_threads: u32) -> Self {
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        if cpus <= vcpus + disk_threads || !can_leave_idle() {
            return IdleCopy { applied: false };
        }
        IdleCopy { applied: set_policy(libc::SCHED_IDLE) }
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

fn set_policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(0, ...) changes the calling thread's policy; `param` is a valid
    // struct for the call's duration.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

impl Drop for IdleCopy {
    fn drop(&mut self) {
        if self.applied && !set_policy(libc::SCHED_OTHER) {
            eprintln!("ferry: warning: cannot leave the idle scheduling class: {}", std::io::Error::last_os_error());
        }
    }
}
