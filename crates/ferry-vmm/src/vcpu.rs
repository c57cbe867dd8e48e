//! vCPU threads: each vCPU runs `KVM_RUN` on its own thread and can be paused, resumed and
//! stopped from another thread.
//!
//! Stopping a vCPU that is inside `KVM_RUN`: the controller sets the request, sets the vCPU's
//! `immediate_exit` flag and signals the thread (a handler without `SA_RESTART`). The vCPU
//! clears `immediate_exit` *before* it looks at the request, so a kick can never be lost between
//! the check and the next `KVM_RUN`.
//!
//! ```text
//!  controller: req = Pause ──▶ immediate_exit = 1 ──▶ pthread_kill
//!  vCPU:       immediate_exit = 0 ──▶ check req ──▶ KVM_RUN (returns EINTR at once if kicked)
//! ```

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::{IoAction, PioBus};
use crate::dirty_ring::DirtyRings;
use crate::memory::RamRegion;
use crate::poison::{PoisonCause, PoisonSet};

/// Errors of vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot install the SIGBUS handler (broken guest pages)")]
    Sigbus(#[source] std::io::Error),
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u32, #[source] std::io::Error),
    #[error("cannot signal the thread of vCPU {0}")]
    Kick(u32, #[source] vmm_sys_util::errno::Error),
    #[error("vCPU {0} control lock is poisoned (its thread panicked)")]
    Poisoned(u32),
}

/// Why a machine stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote its status to the shutdown port.
    GuestShutdown(u8),
    /// Triple fault or a KVM system event (reset/shutdown).
    GuestReset(String),
    /// KVM could not run the guest (e.g. an emulation failure).
    KvmError(String),
    /// Ferry was asked to stop (API `quit`, signal).
    Stopped,
    /// The machine moved away (migration completed).
    Migrated,
}

/// The vCPU kick signal.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + 1
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler and the SIGBUS handler (broken pages) once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    crate::poison::install_sigbus_handler().map_err(VcpuError::Sigbus)?;
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

/// What a vCPU needs to know about guest memory: where it is mapped and which pages are broken.
#[derive(Clone)]
pub struct GuestMemoryView {
    pub regions: Vec<RamRegion>,
    pub poison: Arc<PoisonSet>,
    /// The vCPUs' MCG_CAP (0: KVM here delivers no machine checks).
    pub mcg_cap: u64,
}

impl GuestMemoryView {
    fn is_ram(&self, gpa: u64) -> bool {
        self.regions.iter().any(|r| gpa >= r.gpa && gpa < r.gpa + r.size)
    }
    fn gpa_of_hva(&self, hva: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| hva >= r.host_addr && hva < r.host_addr + r.size)
            .map(|r| r.gpa + (hva - r.host_addr))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Quit,
}

struct CtlState {
    req: Request,
    paused: bool,
    exited: bool,
    /// Held out of KVM_RUN until then (a dirty-rate limit, docs/migration.md), while running.
    hold_until: Option<std::time::Instant>,
    /// Time spent held, in total.
    held: std::time::Duration,
}

struct Control {
    m: Mutex<CtlState>,
    cv: Condvar,
}

/// Where vCPU threads report that the machine should stop.
pub struct ExitSink {
    m: Mutex<Option<ExitReason>>,
    cv: Condvar,
}

impl ExitSink {
    pub fn new() -> Arc<Self> {
        Arc::new(ExitSink { m: Mutex::new(None), cv: Condvar::new() })
    }
    /// Records the first exit reason.
    pub fn set(&self, r: ExitReason) {
        if let Ok(mut g) = self.m.lock() {
            if g.is_none() {
                *g = Some(r);
            }
            self.cv.notify_all();
        }
    }
    /// Waits for an exit reason.
    pub fn wait(&self) -> ExitReason {
        let mut g = match self.m.lock() {
            Ok(g) => g,
            Err(_) => return ExitReason::KvmError("exit lock poisoned".into()),
        };
        loop {
            if let Some(r) = g.clone() {
                return r;
            }
            g = match self.cv.wait(g) {
                Ok(g) => g,
                Err(_) => return ExitReason::KvmError("exit lock poisoned".into()),
            };
        }
    }
    pub fn get(&self) -> Option<ExitReason> {
        self.m.lock().ok().and_then(|g| g.clone())
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    id: u32,
    fd: Arc<Mutex<VcpuFd>>,
    ctl: Arc<Control>,
    kvm_run: usize,
    thread: Option<JoinHandle<()>>,
}

/// Pointer to a vCPU's `kvm_run` page, shared with the controller for `immediate_exit`.
#[derive(Clone, Copy)]
struct RunPtr(usize);

impl RunPtr {
    fn set_immediate_exit(self, v: u8) {
        // SAFETY: the pointer is the vCPU's mmapped kvm_run structure, valid as long as the
        // VcpuFd lives; VcpuHandle owns an Arc of the VcpuFd and joins the thread before drop.
        // A single-byte volatile store is what KVM expects for immediate_exit.
        unsafe {
            let run = self.0 as *mut kvm_bindings::kvm_run;
            std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(v);
        }
    }
}

impl VcpuHandle {
    /// Starts the thread of `fd` (already configured or restored), initially running.
    pub fn spawn(
        id: u32,
        fd: VcpuFd,
        bus: Arc<PioBus>,
        exit: Arc<ExitSink>,
        rings: Option<Arc<DirtyRings>>,
        memory: GuestMemoryView,
        start_paused: bool,
    ) -> Result<Self, VcpuError> {
        let mut fd = fd;
        let kvm_run = fd.get_kvm_run() as *mut kvm_bindings::kvm_run as usize;
        let fd = Arc::new(Mutex::new(fd));
        let ctl = Arc::new(Control {
            m: Mutex::new(CtlState {
                req: if start_paused { Request::Pause } else { Request::Run },
                paused: false,
                exited: false,
                hold_until: None,
                held: std::time::Duration::ZERO,
            }),
            cv: Condvar::new(),
        });
        let thread = {
            let fd = fd.clone();
            let ctl = ctl.clone();
            std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    crate::poison::mark_vcpu_thread();
                    crate::seccomp::install_or_warn(crate::seccomp::ThreadKind::Vcpu);
                    let env = VcpuEnv { id, bus, rings, memory };
                    vcpu_loop(&env, fd, ctl, RunPtr(kvm_run), exit)
                })
                .map_err(|e| VcpuError::Spawn(id, e))?
        };
        Ok(VcpuHandle { id, fd, ctl, kvm_run, thread: Some(thread) })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    fn request(&self, r: Request) -> Result<(), VcpuError> {
        {
            let mut g = self.ctl.m.lock().map_err(|_| VcpuError::Poisoned(self.id))?;
            if g.exited {
                return Ok(());
            }
            g.req = r;
            self.ctl.cv.notify_all();
        }
        if r != Request::Run {
            RunPtr(self.kvm_run).set_immediate_exit(1);
            if let Some(t) = &self.thread {
                t.kill(kick_signal()).map_err(|e| VcpuError::Kick(self.id, e))?;
            }
        }
        Ok(())
    }

    /// Asks the vCPU to pause (does not wait).
    pub fn request_pause(&self) -> Result<(), VcpuError> {
        self.request(Request::Pause)
    }

    /// Waits until the vCPU is paused (or its thread ended).
    pub fn wait_paused(&self) -> Result<(), VcpuError> {
        let mut g = self.ctl.m.lock().map_err(|_| VcpuError::Poisoned(self.id))?;
        while !(g.paused || g.exited) {
            g = self.ctl.cv.wait(g).map_err(|_| VcpuError::Poisoned(self.id))?;
        }
        Ok(())
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.request(Request::Run)
    }

    /// Keeps a running vCPU out of `KVM_RUN` until `until` (a later hold extends it; an earlier
    /// one changes nothing): it leaves `KVM_RUN` at once (a kick) and waits on its thread. A
    /// pause or stop request ends the wait as usual; the hold lasts through a pause.
    pub fn hold(&self, until: std::time::Instant) -> Result<(), VcpuError> {
        {
            let mut g = self.ctl.m.lock().map_err(|_| VcpuError::Poisoned(self.id))?;
            if g.exited || g.hold_until.is_some_and(|h| h >= until) {
                return Ok(());
            }
            g.hold_until = Some(until);
        }
        RunPtr(self.kvm_run).set_immediate_exit(1);
        if let Some(t) = &self.thread {
            t.kill(kick_signal()).map_err(|e| VcpuError::Kick(self.id, e))?;
        }
        Ok(())
    }

    /// How long this vCPU has been held ([`VcpuHandle::hold`]) in total.
    pub fn held(&self) -> std::time::Duration {
        self.ctl.m.lock().map(|g| g.held).unwrap_or_default()
    }

    /// The vCPU fd, for state save/restore. Only call while the vCPU is paused: the vCPU thread
    /// holds this lock while it runs.
    pub fn fd(&self) -> Result<MutexGuard<'_, VcpuFd>, VcpuError> {
        self.fd.lock().map_err(|_| VcpuError::Poisoned(self.id))
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.request(Request::Quit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a vCPU thread's exits are handled with.
struct VcpuEnv {
    id: u32,
    bus: Arc<PioBus>,
    rings: Option<Arc<DirtyRings>>,
    memory: GuestMemoryView,
}

fn vcpu_loop(env: &VcpuEnv, fd: Arc<Mutex<VcpuFd>>, ctl: Arc<Control>, run: RunPtr, exit: Arc<ExitSink>) {
    let finish = |ctl: &Control| {
        if let Ok(mut g) = ctl.m.lock() {
            g.exited = true;
            ctl.cv.notify_all();
        }
    };
    loop {
        run.set_immediate_exit(0);
        fence(Ordering::SeqCst);
        {
            let mut g = match ctl.m.lock() {
                Ok(g) => g,
                Err(_) => break,
            };
            loop {
                match g.req {
                    Request::Run => {
                        let now = std::time::Instant::now();
                        match g.hold_until {
                            Some(until) if until > now => {
                                // Held: wait it out (a pause or stop request wakes this).
                                g = match ctl.cv.wait_timeout(g, until - now) {
                                    Ok((g, _)) => g,
                                    Err(_) => return,
                                };
                                g.held += now.elapsed();
                            }
                            Some(_) => {
                                g.hold_until = None;
                                break;
                            }
                            None => break,
                        }
                    }
                    Request::Quit => {
                        drop(g);
                        finish(&ctl);
                        return;
                    }
                    Request::Pause => {
                        if !g.paused {
                            // KVM finishes an exit's pending work (e.g. the rest of a `rep outsb`)
                            // only on the next KVM_RUN: re-enter once with immediate_exit so the
                            // saved state is consistent and nothing is replayed after a restore.
                            run.set_immediate_exit(1);
                            if let Ok(mut v) = fd.lock() {
                                for _ in 0..64 {
                                    match run_once(&mut v, env) {
                                        Step::Continue => continue,
                                        Step::Interrupted => break,
                                        Step::Stop(r) => {
                                            exit.set(r);
                                            break;
                                        }
                                    }
                                }
                            }
                            run.set_immediate_exit(0);
                            g.paused = true;
                            ctl.cv.notify_all();
                        }
                        g = match ctl.cv.wait(g) {
                            Ok(g) => g,
                            Err(_) => return,
                        };
                    }
                }
            }
            g.paused = false;
        }
        let mut vcpu = match fd.lock() {
            Ok(v) => v,
            Err(_) => break,
        };
        let stop = match run_once(&mut vcpu, env) {
            Step::Continue | Step::Interrupted => None,
            Step::Stop(r) => Some(r),
        };
        drop(vcpu);
        if let Some(r) = stop {
            exit.set(r);
            break;
        }
    }
    finish(&ctl);
}

/// The guest touched the broken page at `gpa`: it joins the poison set, and the guest gets an
/// action-required machine check naming it (docs/poison.md).
fn machine_check(vcpu: &VcpuFd, env: &VcpuEnv, gpa: u64, cause: PoisonCause) -> Option<ExitReason> {
    let page = gpa & !0xfff;
    env.memory.poison.mark(page / 4096, cause);
    if env.memory.mcg_cap == 0 {
        return Some(ExitReason::KvmError(format!(
            "vCPU {}: the guest touched broken page {page:#x} and KVM here cannot deliver machine checks",
            env.id
        )));
    }
    match crate::kvm_ext::inject_srar(vcpu, env.memory.mcg_cap, page) {
        Ok(()) => None,
        Err(e) => Some(ExitReason::KvmError(format!(
            "vCPU {}: cannot deliver the machine check for broken page {page:#x}: {e}",
            env.id
        ))),
    }
}

/// What one KVM_RUN led to.
enum Step {
    Continue,
    /// KVM_RUN returned EINTR/EAGAIN (a kick or immediate_exit).
    Interrupted,
    Stop(ExitReason),
}

/// vCPU exits of this process by kind (port I/O, MMIO, halt or interrupt, other), for metrics.
static EXITS: [std::sync::atomic::AtomicU64; 4] = [const { std::sync::atomic::AtomicU64::new(0) }; 4];

/// vCPU exits so far: (port I/O, MMIO, halt/interrupted, other).
pub fn exit_counts() -> [u64; 4] {
    EXITS.each_ref().map(|a| a.load(Ordering::Relaxed))
}

/// Runs the vCPU once and handles the exit.
fn run_once(vcpu: &mut VcpuFd, env: &VcpuEnv) -> Step {
    let (id, bus) = (env.id, &*env.bus);
    // A broken page the guest touched: (guest-physical address, how it showed).
    let mut broken: Option<(u64, PoisonCause)> = None;
    let exit = vcpu.run();
    let kind = match &exit {
        Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::IoIn(..)) => 0,
        Ok(VcpuExit::MmioRead(..)) | Ok(VcpuExit::MmioWrite(..)) => 1,
        Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Err(_) => 2,
        Ok(_) => 3,
    };
    EXITS[kind].fetch_add(1, Ordering::Relaxed);
    let r = match exit {
        // Emulated (ring-0) guest code touching a broken page exits as MMIO inside RAM: the
        // read gets zeros, never the page's data, and the guest a machine check.
        Ok(VcpuExit::MmioRead(gpa, data)) if env.memory.is_ram(gpa) => {
            data.fill(0);
            broken = Some((gpa, PoisonCause::GuestAccessEmulated));
            None
        }
        Ok(VcpuExit::MmioWrite(gpa, _)) if env.memory.is_ram(gpa) => {
            broken = Some((gpa, PoisonCause::GuestAccessEmulated));
            None
        }
        Ok(VcpuExit::IoOut(port, data)) => match bus.write(port, data) {
            IoAction::None => None,
            IoAction::Shutdown(code) => Some(ExitReason::GuestShutdown(code)),
        },
        Ok(VcpuExit::IoIn(port, data)) => {
            bus.read(port, data);
            None
        }
        Ok(VcpuExit::MmioRead(gpa, data)) => {
            bus.mmio_read(gpa, data);
            None
        }
        Ok(VcpuExit::MmioWrite(gpa, data)) => {
            bus.mmio_write(gpa, data);
            None
        }
        Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => None,
        Ok(VcpuExit::Shutdown) => Some(ExitReason::GuestReset(format!("vCPU {id}: triple fault"))),
        Ok(VcpuExit::SystemEvent(t, _)) => Some(ExitReason::GuestReset(format!("vCPU {id}: KVM system event {t}"))),
        Ok(VcpuExit::InternalError) => {
            let internal = {
                let r = vcpu.get_kvm_run();
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the `internal` member of the union is
                // the valid one.
                let i = unsafe { r.__bindgen_anon_1.internal };
                (i.suberror, i.ndata, i.data)
            };
            Some(ExitReason::KvmError(format!(
                "vCPU {id}: KVM internal error, suberror {} data {:x?}",
                internal.0,
                &internal.2[..(internal.1 as usize).min(internal.2.len())]
            )))
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => {
            Some(ExitReason::KvmError(format!("vCPU {id}: VM entry failed, reason {reason:#x} on host CPU {cpu}")))
        }
        // The vCPU's dirty ring is full: collect every ring (which resets them) before running
        // again; the pages wait in the rings' bitmaps for the dirty log's next sync.
        Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match &env.rings {
            Some(r) => match r.collect_full() {
                Ok(_) => None,
                Err(e) => Some(ExitReason::KvmError(format!("vCPU {id}: cannot collect the full dirty ring: {e}"))),
            },
            None => Some(ExitReason::KvmError(format!("vCPU {id}: dirty ring full without a dirty ring"))),
        },
        Ok(other) => Some(ExitReason::KvmError(format!("vCPU {id}: unexpected exit {other:?}"))),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            // Native (ring-3) guest code touching a broken page: SIGBUS BUS_MCEERR_AR on this
            // thread, and KVM_RUN returns EINTR; running again without a machine check would
            // fault again forever.
            match crate::poison::take_vcpu_fault() {
                Some(hva) => match env.memory.gpa_of_hva(hva) {
                    Some(gpa) => {
                        broken = Some((gpa, PoisonCause::GuestAccess));
                        None
                    }
                    None => Some(ExitReason::KvmError(format!(
                        "vCPU {id}: memory failure at host address {hva:#x}, outside guest RAM"
                    ))),
                },
                None => return Step::Interrupted,
            }
        }
        Err(e) => Some(ExitReason::KvmError(format!("vCPU {id}: KVM_RUN failed: {e}"))),
    };
    let r = match (r, broken) {
        (None, Some((gpa, cause))) => machine_check(vcpu, env, gpa, cause),
        (r, _) => r,
    };
    match r {
        Some(reason) => Step::Stop(reason),
        None => Step::Continue,
    }
}
