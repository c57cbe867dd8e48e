//! Keeping the bulk copy off the guest's CPUs.
//!
//! On a host with a CPU to spare beyond the guest's vCPUs, the threads that move memory (the
//! source's sender, the destination's receiver) run as `SCHED_IDLE` during the bulk first pass:
//! they then use only CPU time no vCPU wants, so the copy never takes a vCPU's CPU away (on a
//! 2-CPU host the copy at full speed otherwise stalled a 1-vCPU guest for 15–25 ms at a time).
//! Later passes race the guest's dirtying and run at normal priority. Without a spare CPU
//! nothing changes: an idle-class copy could starve behind busy vCPUs and never converge. The
//! guard restores the thread's normal class when dropped.

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
        if cpus <= vcpus + disk_threads {
            return IdleCopy { applied: false };
        }
        IdleCopy { applied: set_policy(libc::SCHED_IDLE) }
    }
}

fn set_policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(0, ...) changes the calling thread's policy; `param` is a valid
    // struct for the call's duration.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

impl Drop for IdleCopy {
    fn drop(&mut self) {
        if self.applied {
            set_policy(libc::SCHED_OTHER);
        }
    }
}
