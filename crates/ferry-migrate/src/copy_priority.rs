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
//! Leaving `SCHED_IDLE` needs root or CAP_SYS_NICE, or an RLIMIT_NICE that allows the thread's
//! nice value: where that is not so, the idle class is never entered (a receiver stuck in it
//! would hand it to the vCPU threads it starts).

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

/// Whether this thread could switch back from `SCHED_IDLE` to `SCHED_OTHER` (the kernel's
/// rule: privileged, or the nice value within RLIMIT_NICE).
fn can_leave_idle() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) } != 0 {
        return false;
    }
    // SAFETY: getpriority has no preconditions. Its error value (-1) reads as nice -1, which
    // only makes the check below stricter.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    lim.rlim_cur >= (20 - nice.clamp(-20, 19)) as libc::rlim_t
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
