//! seccomp filters per thread kind (built with rust-vmm's `seccompiler`).
//!
//! Ferry installs one process-wide filter at start (every thread inherits it: the API, the
//! migration, snapshot, replication and update threads), and each thread that the guest can
//! drive adds a tighter one of its own as its first step: the vCPU threads (the guest's
//! instructions become their exits) and the disks' device and I/O threads (the guest's
//! descriptor rings become their requests). Filters stack: a thread is held to the
//! intersection of its own and the process-wide one. A call outside them kills the process
//! (`kill`, the default), is logged by the kernel and allowed (`log`: for finding what a new
//! code path needs; `dmesg` shows `type=1326 … comm="vcpu0" … syscall=N`), or nothing is
//! installed (`off`). docs/security.md lists what each kind may do.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// What a call outside a thread's filter does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Log,
    Kill,
}

/// The kinds of threads with filters of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The process-wide filter: everything Ferry does anywhere (API, migration, snapshots,
    /// replication, live update, post-copy, serial output).
    Process,
    /// A vCPU: KVM ioctls on its fds, the serial and eventfd writes its exits cause.
    Vcpu,
    /// A disk's device thread and its I/O threads: reads and writes of the image, eventfds.
    Device,
}

/// Errors of seccomp.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0:?} seccomp filter")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    #[error("cannot install the {0:?} seccomp filter")]
    Install(ThreadKind, #[source] seccompiler::Error),
}

/// 0 off, 1 log, 2 kill; set once at start, read by every thread that installs its filter.
static MODE: AtomicU8 = AtomicU8::new(0);

/// The mode the threads started from now on install their filters in.
pub fn set_mode(m: Mode) {
    MODE.store(
        match m {
            Mode::Off => 0,
            Mode::Log => 1,
            Mode::Kill => 2,
        },
        Ordering::SeqCst,
    );
}

pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        1 => Mode::Log,
        2 => Mode::Kill,
        _ => Mode::Off,
    }
}

/// What every thread does: memory, locks, signals, time, its own end.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_tgkill,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_writev,
];

/// The process-wide filter, besides [`COMMON`].
const PROCESS: &[i64] = &[
    // Files, images, snapshots, the memfd.
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_flock,
    libc::SYS_fcntl,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_memfd_create,
    libc::SYS_mincore,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_close_range,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    // KVM, userfaultfd.
    libc::SYS_ioctl,
    libc::SYS_userfaultfd,
    // Sockets: the API, migration, replication, TLS.
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    // Threads, the live update's exec and child, signals.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_vfork,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_set_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_prctl,
    // A vCPU or device thread stacks its own filter (a filter can only be tightened).
    libc::SYS_seccomp,
    libc::SYS_arch_prctl,
    libc::SYS_membarrier,
    // Scheduling (the copy's idle class, the throttle).
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    // Identity and limits.
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getppid,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_prlimit64,
    libc::SYS_getrlimit,
    libc::SYS_getrusage,
    libc::SYS_times,
];

/// A vCPU thread, besides [`COMMON`] (its `ioctl`s are KVM's only: type 0xAE).
const VCPU: &[i64] = &[];

/// A disk's device and I/O threads, besides [`COMMON`].
const DEVICE: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_readv,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_lseek,
    // O_NONBLOCK on the queue's eventfds, the image's lock state at a quiesce.
    libc::SYS_fcntl,
];

fn filter(kind: ThreadKind, m: Mode) -> Result<BpfProgram, SeccompError> {
    let err = |e| SeccompError::Build(kind, e);
    let extra = match kind {
        ThreadKind::Process => PROCESS,
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Device => DEVICE,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON.iter().chain(extra).map(|&s| (s, Vec::new())).collect();
    if kind == ThreadKind::Vcpu {
        // KVM's ioctls only (type 0xAE in bits 8..16 of the request).
        let kvm =
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(0xff00), 0xae00).map_err(err)?;
        rules.insert(libc::SYS_ioctl, vec![SeccompRule::new(vec![kvm]).map_err(err)?]);
    }
    let mismatch = match m {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let arch = std::env::consts::ARCH.try_into().map_err(err)?;
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch).and_then(BpfProgram::try_from).map_err(err)
}

/// Installs the filter of `kind` on the calling thread (for [`ThreadKind::Process`]: on every
/// thread of the process, with TSYNC; threads started later inherit it; not again over one
/// inherited through exec), in the mode set by [`set_mode`]. Nothing with `off`.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let m = mode();
    if m == Mode::Off || (kind == ThreadKind::Process && filtered()) {
        return Ok(());
    }
    let prog = filter(kind, m)?;
    match kind {
        ThreadKind::Process => seccompiler::apply_filter_all_threads(&prog),
        _ => seccompiler::apply_filter(&prog),
    }
    .map_err(|e| SeccompError::Install(kind, e))
}

/// A thread's first step (vCPU, device): its filter, or, if that fails, the thread carries on
/// under the process-wide one and says so.
pub fn install_or_warn(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        tracing::warn!("{e}: the thread runs under the process-wide filter only");
    }
}

/// Whether this thread runs under a seccomp filter already (a Ferry exec'd by a live update
/// inherits its predecessor's process-wide filter: it is the same list, not stacked again).
pub fn filtered() -> bool {
    // SAFETY: PR_GET_SECCOMP takes no further arguments and only reads the thread's mode.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP) == 2 }
}

/// Makes, from a new thread of `kind` (its filter installed, under the process-wide one), a
/// call that kind may not make: for a vCPU or device thread `socket()`, which the process-wide
/// filter allows and theirs do not; for the process-wide filter `acct(NULL)`, which Ferry never
/// makes. With `kill` the process ends there (SIGSYS); with `log` the call goes through and
/// the kernel logs it. Returns the call's result. For the tests of the filters (the API's
/// `seccomp-probe`).
pub fn probe(kind: ThreadKind) -> std::io::Result<i64> {
    let t = std::thread::Builder::new().name(format!("probe-{kind:?}").to_lowercase()).spawn(move || {
        if kind == ThreadKind::Process {
            // SAFETY: acct(NULL) turns process accounting off (or fails); no memory is passed.
            return unsafe { libc::syscall(libc::SYS_acct, 0usize) };
        }
        install_or_warn(kind);
        // SAFETY: socket() with constant arguments; the descriptor is closed at once.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: closing the descriptor just made.
            unsafe { libc::close(fd) };
        }
        fd as i64
    })?;
    t.join().map_err(|_| std::io::Error::other("the probe thread panicked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds_in_both_modes() {
        for kind in [ThreadKind::Process, ThreadKind::Vcpu, ThreadKind::Device] {
            for m in [Mode::Log, Mode::Kill] {
                let p = filter(kind, m).unwrap();
                assert!(!p.is_empty(), "{kind:?} {m:?}");
            }
        }
    }

    #[test]
    fn the_thread_filters_are_tighter_than_the_process_one() {
        for s in VCPU.iter().chain(DEVICE) {
            assert!(PROCESS.contains(s) || COMMON.contains(s), "syscall {s} is in a thread filter only");
        }
        assert!(!COMMON.contains(&libc::SYS_socket) && !DEVICE.contains(&libc::SYS_socket));
        assert!(!COMMON.contains(&libc::SYS_execve) && !COMMON.contains(&libc::SYS_ioctl));
        assert!(!PROCESS.contains(&libc::SYS_acct), "the probe's call must be refused everywhere");
    }
}
