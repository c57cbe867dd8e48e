//! A running machine: KVM VM, guest RAM, devices and vCPU threads.

use std::sync::{Arc, Mutex};

use ferry_stream::CpuModel;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, BootEntry, BootError};
use crate::cpu::{self, CpuModelError};
use crate::devices::disk_image::DiskImage;
use crate::devices::serial::{SerialDevice, SerialSink, PARTIAL_LINE_DELAY};
use crate::devices::virtio_blk::state::BlockState;
use crate::devices::virtio_blk::{self, BlockArgs, BlockDevice, BlockError, BlockStats, StartMode};
use crate::devices::{PioBus, COM1_GSI};
use crate::dirty_log::{
    ConsumerId, DirtyLog, DirtyLogError, DirtySource, GuestDirty, Initial, DEFAULT_CLEAR_CHUNK_PAGES,
};
use crate::dirty_ring::{self, DirtyRingError, DirtyRings, RingSource, RingStats};
use crate::kvm_ext::{self, KvmDirty};
use crate::machine_state::{MachineState, MachineStateError};
use crate::memory::PAGE_SIZE;
use crate::memory::{GuestRam, MemoryError};
use crate::persist::Persist;
pub use crate::vcpu::ExitReason;
use crate::vcpu::{install_kick_handler, ExitSink, GuestMemoryView, VcpuError, VcpuHandle};
use crate::vcpu_state::{msrs_to_save, probe_msrs, KvmVcpu};
use crate::vm_state::KvmVm;

/// Most vCPUs Ferry gives a guest.
pub const MAX_VCPUS: u32 = 8;
/// Smallest guest RAM Ferry accepts.
pub const MIN_MEMORY: u64 = 16 << 20;

/// Errors of building or running a machine.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM cannot {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0} vCPUs requested; Ferry supports 1 to {MAX_VCPUS}")]
    BadVcpuCount(u32),
    #[error("guest memory of {0} bytes is too small (at least {MIN_MEMORY} bytes)")]
    MemoryTooSmall(u64),
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("cannot boot the kernel")]
    Boot(#[from] BootError),
    #[error("vCPU control")]
    Vcpu(#[from] VcpuError),
    #[error("dirty log")]
    DirtyLog(#[from] DirtyLogError),
    #[error("dirty log lock is poisoned")]
    DirtyLogPoisoned,
    #[error("dirty ring")]
    DirtyRing(#[from] DirtyRingError),
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("disk")]
    Disk(#[from] BlockError),
    #[error("{0} disks requested; Ferry supports at most {max}", max = virtio_blk::MAX_DISKS)]
    TooManyDisks(usize),
    #[error("cannot start the console output thread")]
    Thread(#[source] std::io::Error),
    #[error("the guest's CPU model")]
    Cpu(#[from] CpuModelError),
    #[error("machine state")]
    State(#[from] MachineStateError),
    #[error("cannot save the state of vCPU {0}")]
    SaveVcpu(u32, #[source] crate::vcpu_state::VcpuStateError),
    #[error("cannot save the VM-wide state")]
    SaveVm(#[source] crate::vm_state::VmStateError),
    #[error("cannot save the state of disk {0}")]
    SaveDisk(usize, #[source] BlockError),
    #[error("the serial device's lock is poisoned")]
    SerialPoisoned,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// What to build.
pub struct VmConfig {
    pub memory: u64,
    pub vcpus: u32,
    /// ELF image with a PVH note.
    pub kernel: Vec<u8>,
    pub cmdline: String,
    pub serial_out: SerialSink,
    pub dirty_tracking: DirtyTracking,
    /// Disk images (locked), attached as virtio-mmio block devices and announced to the guest
    /// on its command line.
    pub disks: Vec<DiskImage>,
    /// Allocate all guest RAM before the guest starts (`--prefault`).
    pub prefault: bool,
}

/// A disk to attach when a machine starts: fresh or from migrated state.
pub struct DiskSetup {
    pub image: DiskImage,
    pub state: Option<BlockState>,
    pub mode: StartMode,
}

/// How KVM reports the pages the guest writes (chosen per VM, before its vCPUs exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyTracking {
    /// Per-slot bitmap in manual-protect mode, cleared in chunks of this many pages.
    Bitmap { clear_chunk_pages: u64 },
    /// Per-vCPU dirty ring of this many entries.
    Ring { entries: u32 },
}

impl Default for DirtyTracking {
    fn default() -> Self {
        DirtyTracking::Bitmap { clear_chunk_pages: DEFAULT_CLEAR_CHUNK_PAGES }
    }
}

impl DirtyTracking {
    /// The dirty ring with its default size.
    pub fn ring() -> Self {
        DirtyTracking::Ring { entries: dirty_ring::DEFAULT_RING_ENTRIES }
    }
}

/// The KVM-level pieces of a machine before its vCPUs run: shared by boot and restore.
pub struct MachineParts {
    pub kvm: Kvm,
    pub vm_fd: VmFd,
    pub ram: GuestRam,
    pub serial_irq: EventFd,
    /// Manual dirty-log protection flags in force (0: classic get-and-clear, or the ring).
    pub manual_protect: u32,
    pub dirty_tracking: DirtyTracking,
}

/// Creates the KVM VM with in-kernel irqchip and PIT, and registers `ram`.
pub fn create_machine(ram: GuestRam, dirty_tracking: DirtyTracking) -> Result<MachineParts, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let vm_fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    let manual_protect = match dirty_tracking {
        DirtyTracking::Bitmap { .. } => {
            kvm_ext::enable_manual_protect(&vm_fd).map_err(kvm_err("enable manual dirty-log protection"))?
        }
        DirtyTracking::Ring { entries } => {
            dirty_ring::enable(&vm_fd, entries)?;
            0
        }
    };
    // The memory slots before the irqchip and the PIT: measured on this host, a slot
    // registered after them costs 4-7 ms (a KVM grace period then waits), before them 0.6-0.9
    // ms. A live update's pause holds this.
    ram.register(&vm_fd, false)?;
    vm_fd.set_tss_address(0xfffb_d000).map_err(kvm_err("set the TSS address"))?;
    vm_fd.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm_fd.create_pit2(pit).map_err(kvm_err("create the in-kernel PIT"))?;
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd.register_irqfd(&serial_irq, COM1_GSI).map_err(kvm_err("register the serial irqfd"))?;
    Ok(MachineParts { kvm, vm_fd, ram, serial_irq, manual_protect, dirty_tracking })
}

/// Creates vCPU `id` of `count` with the guest's CPU model: its CPUID (the vCPU's own APIC
/// id put in) and, where KVM can scale it, its TSC rate.
pub fn create_vcpu(parts: &MachineParts, id: u32, count: u32, model: &CpuModel) -> Result<VcpuFd, VmError> {
    let vcpu = parts.vm_fd.create_vcpu(id as u64).map_err(kvm_err("create a vCPU"))?;
    let cpuid = cpu::vcpu_cpuid(&model.cpuid, id, count)?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set the vCPU's CPUID"))?;
    // Machine checks (broken guest pages, docs/poison.md): the banks, then every bank and
    // MCG_CTL enabled, as firmware leaves them.
    let mcg_cap = kvm_ext::setup_mce(&parts.vm_fd, &vcpu).map_err(kvm_err("set up machine checks"))?;
    let banks = mcg_cap & 0xff;
    if banks > 0 {
        let mut entries = vec![kvm_bindings::kvm_msr_entry { index: 0x17b, data: !0, ..Default::default() }];
        entries.extend((0..banks as u32).map(|i| kvm_bindings::kvm_msr_entry {
            index: 0x400 + 4 * i,
            data: !0,
            ..Default::default()
        }));
        let msrs = kvm_bindings::Msrs::from_entries(&entries).map_err(|_| VmError::Kvm {
            what: "set the machine-check MSRs",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        vcpu.set_msrs(&msrs).map_err(kvm_err("set the machine-check MSRs"))?;
    }
    cpu::apply_tsc(&parts.kvm, &vcpu, model)?;
    Ok(vcpu)
}

/// A machine whose vCPUs run on their own threads.
pub struct Vm {
    parts: MachineParts,
    dirty: Arc<Mutex<DirtyLog>>,
    /// The vCPUs' dirty rings (ring tracking only); vCPU threads collect them when full.
    rings: Option<Arc<DirtyRings>>,
    bus: Arc<PioBus>,
    vcpus: Vec<VcpuHandle>,
    exit: Arc<ExitSink>,
    vcpu_count: u32,
    /// The guest's CPU model, kept for life across moves.
    cpu: CpuModel,
    /// The MSRs saved with each vCPU (probed on first save).
    msrs: std::sync::OnceLock<Vec<u32>>,
    /// Pages to break when a migration's final pass begins (`ferry debug poison
    /// --at-final-pass`, for tests of that corner): (gpa, announce).
    final_pass_poison: Mutex<Vec<(u64, bool)>>,
}

impl Vm {
    /// Builds a machine and boots `cfg.kernel` by PVH.
    pub fn boot(cfg: VmConfig) -> Result<Vm, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmError::BadVcpuCount(cfg.vcpus));
        }
        if cfg.memory < MIN_MEMORY {
            return Err(VmError::MemoryTooSmall(cfg.memory));
        }
        if cfg.disks.len() > virtio_blk::MAX_DISKS {
            return Err(VmError::TooManyDisks(cfg.disks.len()));
        }
        let mut cmdline = cfg.cmdline.clone();
        for i in 0..cfg.disks.len() {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&virtio_blk::cmdline_token(i));
        }
        let ram = GuestRam::new(cfg.memory)?;
        if cfg.prefault {
            ram.prefault()?;
        }
        let entry: BootEntry = boot::load_pvh(&ram, &cfg.kernel, &cmdline)?;
        let parts = create_machine(ram, cfg.dirty_tracking)?;
        let model = cpu::new_guest_model(&parts.kvm)?;
        let mut fds = Vec::new();
        for id in 0..cfg.vcpus {
            let fd = create_vcpu(&parts, id, cfg.vcpus, &model)?;
            boot::setup_vcpu_common(&fd)?;
            if id == 0 {
                boot::setup_boot_vcpu(&fd, &entry)?;
            }
            fds.push(fd);
        }
        let irq = parts.serial_irq.try_clone().map_err(VmError::EventFd)?;
        let serial = SerialDevice::new(irq, cfg.serial_out);
        let disks =
            cfg.disks.into_iter().map(|image| DiskSetup { image, state: None, mode: StartMode::Running }).collect();
        Vm::start(parts, serial, disks, fds, false, model)
    }

    /// Builds a machine from its saved state: `parts` (guest RAM already filled) and `fds`
    /// (created with the guest's CPU model by [`create_vcpu`]) take the VM-wide and vCPU state,
    /// the devices are constructed from theirs, and the vCPU threads start (paused if asked).
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        parts: MachineParts,
        fds: Vec<VcpuFd>,
        model: CpuModel,
        state: &MachineState,
        serial_out: SerialSink,
        disks: Vec<DiskImage>,
        disk_mode: StartMode,
        paused: bool,
    ) -> Result<Vm, VmError> {
        if fds.len() != state.vcpus.len() {
            return Err(MachineStateError::VcpuCount { fds: fds.len(), states: state.vcpus.len() }.into());
        }
        if disks.len() != state.disks.len() {
            return Err(MachineStateError::DiskCount { source_disks: state.disks.len(), local: disks.len() }.into());
        }
        KvmVm::restore(KvmVm(&parts.vm_fd), &state.vm).map_err(MachineStateError::VmState)?;
        let xsave_size = cpu::xsave_size(&parts.vm_fd);
        for (id, (st, fd)) in state.vcpus.iter().zip(&fds).enumerate() {
            // A restore puts back the MSRs the state lists (its own list, not this host's probe).
            KvmVcpu::restore(KvmVcpu { fd, msrs: &[], xsave_size }, st)
                .map_err(|e| MachineStateError::VcpuState(id as u32, e))?;
        }
        let irq = parts.serial_irq.try_clone().map_err(VmError::EventFd)?;
        let serial = match &state.serial {
            Some(s) => SerialDevice::restore((irq, serial_out), s).map_err(MachineStateError::Serial)?,
            None => SerialDevice::new(irq, serial_out),
        };
        let disks = disks
            .into_iter()
            .zip(&state.disks)
            .map(|(image, st)| DiskSetup { image, state: Some(st.clone()), mode: disk_mode })
            .collect();
        Vm::start(parts, serial, disks, fds, paused, model)
    }

    /// The machine's state outside guest RAM (vCPUs paused, disks quiesced).
    pub fn save_state(&self) -> Result<MachineState, VmError> {
        let vm = KvmVm(&self.parts.vm_fd).save().map_err(VmError::SaveVm)?;
        // The MSRs to save, probed once on this machine's own (paused) vCPU 0: reading them is
        // harmless, and a scratch VM would cost the pause ~10 ms in a fresh process (a live
        // update's successor saves state in its first minutes).
        let msrs = match self.msrs.get() {
            Some(m) => m.clone(),
            None => {
                let m = match self.vcpus.first() {
                    Some(v) => probe_msrs(&self.parts.kvm, &*v.fd()?).map_err(|e| VmError::SaveVcpu(0, e))?,
                    None => msrs_to_save(&self.parts.kvm).map_err(|e| VmError::SaveVcpu(0, e))?,
                };
                self.msrs.get_or_init(|| m).clone()
            }
        };
        let xsave_size = cpu::xsave_size(&self.parts.vm_fd);
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let fd = v.fd()?;
            vcpus.push(KvmVcpu { fd: &fd, msrs: &msrs, xsave_size }.save().map_err(|e| VmError::SaveVcpu(v.id(), e))?);
        }
        let serial = self.bus.serial.lock().map_err(|_| VmError::SerialPoisoned)?.save();
        let serial = Some(serial.map_err(|e| VmError::State(MachineStateError::Serial(e)))?);
        let disks = self
            .disks()
            .iter()
            .map(|d| d.save().map_err(|e| VmError::SaveDisk(d.index(), e)))
            .collect::<Result<_, _>>()?;
        Ok(MachineState { vm, vcpus, serial, disks })
    }

    /// The guest's CPU model.
    pub fn cpu_model(&self) -> &CpuModel {
        &self.cpu
    }

    /// Breaks the guest page at `gpa` for real (`ferry debug poison`): announced, the poison
    /// set learns it first (as when the host reports an error); unannounced, only an access
    /// finds it (the guest's, which gets a machine check, or Ferry's own copy, which recovers
    /// and marks it). Returns the page's address.
    pub fn poison_gpa(&self, gpa: u64, announce: bool) -> Result<u64, VmError> {
        let page = gpa & !(PAGE_SIZE - 1);
        self.parts.ram.host_ptr(page, PAGE_SIZE)?;
        if announce {
            self.parts.ram.poison().mark(page / PAGE_SIZE, crate::poison::PoisonCause::Injected);
        }
        self.parts.ram.poison_host_page(page, None)?;
        Ok(page)
    }

    /// Arms `gpa` to break when the next migration's final pass begins (guest paused).
    pub fn poison_at_final_pass(&self, gpa: u64, announce: bool) -> Result<u64, VmError> {
        let page = gpa & !(PAGE_SIZE - 1);
        self.parts.ram.host_ptr(page, PAGE_SIZE)?;
        if let Ok(mut v) = self.final_pass_poison.lock() {
            v.push((page, announce));
        }
        Ok(page)
    }

    /// Breaks the pages armed by [`Vm::poison_at_final_pass`] (the migration engine calls this
    /// once the guest is paused for the final pass). Returns how many.
    pub fn poison_armed_pages(&self) -> Result<usize, VmError> {
        let armed = self.final_pass_poison.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        for &(gpa, announce) in &armed {
            self.poison_gpa(gpa, announce)?;
        }
        Ok(armed.len())
    }

    /// Starts vCPU threads on prepared parts (used by boot and by restore).
    fn start(
        parts: MachineParts,
        serial: SerialDevice,
        disks: Vec<DiskSetup>,
        fds: Vec<VcpuFd>,
        paused: bool,
        cpu: CpuModel,
    ) -> Result<Vm, VmError> {
        install_kick_handler()?;
        if disks.len() > virtio_blk::MAX_DISKS {
            return Err(VmError::TooManyDisks(disks.len()));
        }
        let exit = ExitSink::new();
        let vcpu_count = fds.len() as u32;
        let slots: Vec<(u32, u64)> = parts.ram.regions().iter().map(|r| (r.slot, r.size / PAGE_SIZE)).collect();
        let (rings, chunk) = match parts.dirty_tracking {
            DirtyTracking::Bitmap { clear_chunk_pages } => (None, clear_chunk_pages),
            DirtyTracking::Ring { entries } => {
                (Some(Arc::new(DirtyRings::map(&parts.vm_fd, &fds, entries, &slots)?)), DEFAULT_CLEAR_CHUNK_PAGES)
            }
        };
        let dirty = Arc::new(Mutex::new(DirtyLog::new(&slots, chunk)));
        let marker = GuestDirty::new(dirty.clone(), parts.ram.regions().iter().map(|r| (r.gpa, r.size)).collect());
        let mut devs = Vec::new();
        for (i, d) in disks.into_iter().enumerate() {
            let args = BlockArgs {
                index: i,
                image: d.image,
                mode: d.mode,
                vm: &parts.vm_fd,
                mem: parts.ram.mem().clone(),
                dirty: marker.clone(),
                poison: parts.ram.poison().clone(),
            };
            devs.push(match &d.state {
                Some(st) => BlockDevice::restore(args, st)?,
                None => BlockDevice::new(args)?,
            });
        }
        let bus = Arc::new(PioBus { serial: Mutex::new(serial), disks: devs });
        spawn_serial_flusher(Arc::downgrade(&bus))?;
        let memory = GuestMemoryView {
            regions: parts.ram.regions().to_vec(),
            poison: parts.ram.poison().clone(),
            mcg_cap: kvm_ext::mcg_cap(&parts.vm_fd),
        };
        let mut vcpus = Vec::new();
        for (id, fd) in fds.into_iter().enumerate() {
            vcpus.push(VcpuHandle::spawn(
                id as u32,
                fd,
                bus.clone(),
                exit.clone(),
                rings.clone(),
                memory.clone(),
                paused,
            )?);
        }
        Ok(Vm {
            parts,
            dirty,
            rings,
            bus,
            vcpus,
            exit,
            vcpu_count,
            cpu,
            msrs: std::sync::OnceLock::new(),
            final_pass_poison: Mutex::new(Vec::new()),
        })
    }

    pub fn ram(&self) -> &GuestRam {
        &self.parts.ram
    }

    /// The descriptors of the KVM VM and its vCPUs (a live update keeps them open across its
    /// exec, so that tearing the old VM down happens after the new one runs, not in the pause).
    pub fn kvm_fds(&self) -> Vec<i32> {
        use std::os::fd::AsRawFd;
        let mut v = vec![self.parts.vm_fd.as_raw_fd()];
        v.extend(self.vcpus.iter().filter_map(|c| c.fd().ok().map(|f| f.as_raw_fd())));
        v
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.parts.vm_fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.parts.kvm
    }

    pub fn bus(&self) -> &PioBus {
        &self.bus
    }

    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    /// How this VM tracks dirty pages.
    pub fn dirty_tracking(&self) -> DirtyTracking {
        self.parts.dirty_tracking
    }

    /// Entries each vCPU's dirty ring has delivered (ring tracking only).
    /// Collects every vCPU's dirty ring now (ring tracking), so that [`Vm::dirty_ring_stats`]
    /// counts what each vCPU dirtied up to this moment. None without rings.
    pub fn dirty_ring_collect(&self) -> Result<Option<u64>, VmError> {
        match &self.rings {
            Some(r) => Ok(Some(r.collect()?)),
            None => Ok(None),
        }
    }

    /// Keeps vCPU `index` out of the guest until `until` (a per-vCPU dirty-rate limit).
    pub fn hold_vcpu(&self, index: usize, until: std::time::Instant) -> Result<(), VmError> {
        match self.vcpus.get(index) {
            Some(v) => Ok(v.hold(until)?),
            None => Ok(()),
        }
    }

    /// How long each vCPU has been held ([`Vm::hold_vcpu`]).
    pub fn vcpus_held(&self) -> Vec<std::time::Duration> {
        self.vcpus.iter().map(VcpuHandle::held).collect()
    }

    pub fn dirty_ring_stats(&self) -> Option<RingStats> {
        self.rings.as_ref().map(|r| r.stats())
    }

    /// Runs `f` with KVM's dirty log as a [`DirtySource`] (bitmap or ring).
    fn with_dirty_source<R>(&self, f: impl FnOnce(&dyn DirtySource) -> R) -> R {
        match &self.rings {
            Some(r) => f(&RingSource(r)),
            None => f(&KvmDirty { vm: &self.parts.vm_fd, manual_protect: self.parts.manual_protect != 0 }),
        }
    }

    fn dirty_lock(&self) -> Result<std::sync::MutexGuard<'_, DirtyLog>, VmError> {
        self.dirty.lock().map_err(|_| VmError::DirtyLogPoisoned)
    }

    /// Registers a dirty-log consumer, switching KVM's dirty logging on for the first one.
    pub fn dirty_register(&self, name: &str, initial: Initial) -> Result<ConsumerId, VmError> {
        let mut d = self.dirty_lock()?;
        if !d.active() {
            self.parts.ram.set_dirty_logging(&self.parts.vm_fd, true)?;
        }
        Ok(d.register(name, initial))
    }

    /// Registers a consumer that is unregistered when the returned guard drops (however the
    /// work that uses it ends).
    pub fn dirty_consumer(&self, name: &str, initial: Initial) -> Result<RegisteredConsumer<'_>, VmError> {
        Ok(RegisteredConsumer { vm: self, id: self.dirty_register(name, initial)? })
    }

    /// Unregisters a consumer, switching dirty logging off after the last one.
    pub fn dirty_unregister(&self, id: ConsumerId) -> Result<(), VmError> {
        let mut d = self.dirty_lock()?;
        d.unregister(id);
        if !d.active() {
            self.parts.ram.set_dirty_logging(&self.parts.vm_fd, false)?;
        }
        Ok(())
    }

    /// Syncs KVM's dirty bitmaps into every consumer; returns pages dirty in KVM.
    pub fn dirty_sync(&self) -> Result<u64, VmError> {
        let mut d = self.dirty_lock()?;
        Ok(self.with_dirty_source(|src| d.sync(src))?)
    }

    /// Harvests a consumer's bits of a range (see [`DirtyLog::harvest`]).
    pub fn dirty_harvest(
        &self,
        id: ConsumerId,
        slot_index: usize,
        first: u64,
        count: u64,
    ) -> Result<Vec<u64>, VmError> {
        let mut d = self.dirty_lock()?;
        Ok(self.with_dirty_source(|src| d.harvest(src, id, slot_index, first, count))?)
    }

    /// Gives harvested bits back to a consumer.
    pub fn dirty_give_back(&self, id: ConsumerId, slot_index: usize, first: u64, bits: &[u64]) -> Result<(), VmError> {
        Ok(self.dirty_lock()?.give_back(id, slot_index, first, bits)?)
    }

    /// Pages a consumer has pending.
    pub fn dirty_pending(&self, id: ConsumerId) -> Result<u64, VmError> {
        Ok(self.dirty_lock()?.pending(id)?)
    }

    /// Writes guest memory on Ferry's behalf and records the pages as dirty for every consumer.
    pub fn write_guest(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.parts.ram.copy_in(gpa, data)?;
        let mut d = self.dirty_lock()?;
        let mut p = gpa & !(PAGE_SIZE - 1);
        while p < gpa + data.len() as u64 {
            if let Some((i, page)) = self.parts.ram.page_location(p) {
                d.mark_vmm_dirty(i, page, 1);
            }
            p += PAGE_SIZE;
        }
        Ok(())
    }

    /// Pauses every vCPU and waits until all are out of `KVM_RUN`.
    pub fn pause(&self) -> Result<(), VmError> {
        self.pause_keep_output()?;
        if let Ok(mut s) = self.bus.serial.lock() {
            s.hold_output(false);
            s.flush_output();
        }
        Ok(())
    }

    /// Pauses every vCPU and leaves console output that waits for its newline where it is (a
    /// live update carries it in the serial section, so that a line the pause cut comes out
    /// whole from the next process).
    pub fn pause_keep_output(&self) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.request_pause()?;
        }
        for v in &self.vcpus {
            v.wait_paused()?;
        }
        if let Ok(mut s) = self.bus.serial.lock() {
            s.hold_output(true);
        }
        Ok(())
    }

    /// Output commit (replication, docs/ha.md): while on, console output is held until
    /// [`Self::release_output`]; turning it off writes out everything held.
    pub fn set_output_commit(&self, on: bool) {
        if let Ok(mut s) = self.bus.serial.lock() {
            s.set_output_commit(on);
        }
    }

    /// The checkpoint being taken covers the output held so far (guest paused, state saved).
    pub fn output_barrier(&self) {
        if let Ok(mut s) = self.bus.serial.lock() {
            s.output_barrier();
        }
    }

    /// The last checkpoint was acknowledged: the output it covers goes out.
    pub fn release_output(&self) {
        if let Ok(mut s) = self.bus.serial.lock() {
            s.release_output();
        }
    }

    /// Bytes of console output held back by output commit.
    pub fn held_output(&self) -> usize {
        self.bus.serial.lock().map(|s| s.held_output()).unwrap_or(0)
    }

    /// Passes on console output still waiting for its newline.
    fn flush_serial(&self) {
        if let Ok(mut s) = self.bus.serial.lock() {
            s.flush_output();
        }
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) -> Result<(), VmError> {
        if let Ok(mut s) = self.bus.serial.lock() {
            s.hold_output(false);
        }
        for v in &self.vcpus {
            v.resume()?;
        }
        Ok(())
    }

    /// Waits until the machine must stop and returns why.
    pub fn wait_exit(&self) -> ExitReason {
        self.exit.wait()
    }

    /// Ends the machine's run with `reason` (wakes `wait_exit`).
    pub fn request_exit(&self, reason: ExitReason) {
        self.exit.set(reason);
    }

    /// Why the machine stopped, if it did.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.get()
    }

    /// The machine's disks.
    pub fn disks(&self) -> &[BlockDevice] {
        &self.bus.disks
    }

    /// Moves guest RAM that is mapped from a snapshot file (`--restore-mode mmap`) into the
    /// machine's memfd, with the guest running: every page that holds data is copied once, then
    /// the pages the guest or a device changed meanwhile (the shared dirty log, a consumer of its
    /// own) again, round after round, until few are left ([`MEMFD_MOVE_LAST_PAGES`], or after
    /// [`MEMFD_MOVE_ROUNDS`] rounds); then, with the vCPUs paused and the disks quiesced, the
    /// last ones, and the memfd is mapped back over each region at the same host address.
    /// Afterwards the machine is as one restored with `--restore-mode read`: a live update can
    /// hand its memfd over. `user_paused`: the guest is paused already (it stays paused).
    /// Returns None when no region is file-mapped. On an error the guest runs on as before,
    /// its RAM where it was (a region already moved holds every page).
    pub fn move_ram_into_memfd(&self, user_paused: bool) -> Result<Option<MemfdMove>, VmError> {
        let ram = &self.parts.ram;
        let file_mapped: Vec<usize> = (0..ram.regions().len()).filter(|&i| !ram.memfd_backs(i)).collect();
        if file_mapped.is_empty() {
            return Ok(None);
        }
        let r = self.move_file_regions(&file_mapped, user_paused);
        if r.is_err() {
            // What was copied of a region still mapped from its file goes: a next move's first
            // round skips zero pages, which is only right over holes.
            for &i in &file_mapped {
                if !ram.memfd_backs(i) {
                    let _ = ram.forget_memfd_copy(i);
                }
            }
        }
        r.map(Some)
    }

    /// [`Vm::move_ram_into_memfd`] of regions `file_mapped`.
    fn move_file_regions(&self, file_mapped: &[usize], user_paused: bool) -> Result<MemfdMove, VmError> {
        let ram = &self.parts.ram;
        let n = ram.regions().len();
        let started = std::time::Instant::now();
        let consumer = self.dirty_consumer("memfd-move", Initial::AllDirty)?;
        let id = consumer.id();
        let mut stats = MemfdMove::default();
        // One round: every region's bits taken (those of memfd-backed regions dropped: their
        // pages are in the memfd already), the file-mapped ones' pages copied.
        let round = |first: bool| -> Result<u64, VmError> {
            self.dirty_sync()?;
            let mut copied = 0;
            for i in 0..n {
                let pages = ram.regions()[i].size / PAGE_SIZE;
                let bits = self.dirty_harvest(id, i, 0, pages)?;
                if !file_mapped.contains(&i) {
                    continue;
                }
                let mut set = crate::dirty_log::Bitmap::new(pages, false);
                set.or_words(&bits);
                if first {
                    // Every page is dirty at first: only those that can hold something are
                    // copied (a sparse snapshot's holes are not read).
                    let content = ram.content_pages(i)?;
                    for (a, b) in set.words_mut().iter_mut().zip(content.words()) {
                        *a &= *b;
                    }
                }
                match ram.copy_pages_to_memfd(i, set.iter_set(), first) {
                    Ok(c) => copied += c,
                    Err(e) => {
                        // Not copied: the bits go back (the consumer is dropped anyway).
                        let _ = self.dirty_give_back(id, i, 0, &bits);
                        return Err(e.into());
                    }
                }
            }
            Ok(copied)
        };
        let mut first = true;
        loop {
            let c = round(first)?;
            first = false;
            stats.rounds += 1;
            stats.bytes_copied += c * PAGE_SIZE;
            if c <= MEMFD_MOVE_LAST_PAGES || stats.rounds >= MEMFD_MOVE_ROUNDS {
                break;
            }
        }
        // The last pages, with nothing running that writes guest memory.
        let paused_at = std::time::Instant::now();
        if !user_paused {
            self.pause()?;
        }
        let last = self.quiesce_disks().and_then(|_| {
            let c = round(false)?;
            // Unmapping the file's pages (and freeing those the guest had written since the
            // restore) is most of the pause: 24 ms for 270 MiB written here.
            for &i in file_mapped {
                ram.map_memfd_back(i)?;
            }
            Ok(c)
        });
        let resumed = self.resume_disks();
        let running = if user_paused { Ok(()) } else { self.resume() };
        stats.pause = paused_at.elapsed();
        let c = last?;
        resumed?;
        running?;
        stats.rounds += 1;
        stats.bytes_copied += c * PAGE_SIZE;
        stats.total = started.elapsed();
        Ok(stats)
    }

    /// Quiesces every disk (vCPUs paused); returns the requests in flight.
    pub fn quiesce_disks(&self) -> Result<u64, VmError> {
        let mut n = 0;
        for d in self.disks() {
            n += d.quiesce()?;
        }
        Ok(n)
    }

    /// Undoes [`Vm::quiesce_disks`] (a failed migration): held requests complete once, here.
    /// Every disk is resumed; the first error (a lost image lock) is returned.
    pub fn resume_disks(&self) -> Result<(), VmError> {
        let mut first = Ok(());
        for d in self.disks() {
            if let Err(e) = d.resume() {
                if first.is_ok() {
                    first = Err(e.into());
                }
            }
        }
        first
    }

    /// Counters of every disk.
    pub fn disk_stats(&self) -> Vec<BlockStats> {
        self.disks().iter().map(|d| d.stats()).collect()
    }

    /// Requests finished since the quiesce, not completed to the guest: (all, writes).
    pub fn disks_held(&self) -> (u64, u64) {
        let held = self.disks().iter().map(|d| d.held()).sum();
        let writes = self.disk_stats().iter().map(|s| s.writes_completed_after_quiesce).sum();
        (held, writes)
    }

    /// Destination at COMMIT: lets every disk take its lock and replay. Returns the requests
    /// to replay.
    pub fn disks_handover(&self) -> Result<u64, VmError> {
        let mut n = 0;
        for d in self.disks() {
            n += d.handover()?;
        }
        Ok(n)
    }

    /// Destination after COMMIT (COMMIT_CONFIRM): hands every disk over and waits until it
    /// holds its image lock, one disk after the other in order. The first writable disk's lock
    /// (the token) decides who holds the guest (see [`Vm::disks_take_back_token`]): it is taken
    /// before anything of a later disk, and only before `deadline` (after it the source may
    /// have taken it back and let it go again). Once the token is held the guest is ours, and
    /// the later disks are waited for without a bound (the source lets them go once its last
    /// requests finish, or when it exits). `source_gone` says whether the source ended the
    /// connection: a source that did so and still holds the token took the guest back.
    pub fn disks_handover_in_order(
        &self,
        deadline: std::time::Instant,
        source_gone: &dyn Fn() -> bool,
    ) -> Result<u64, VmError> {
        let mut n = 0;
        let mut token_held = false;
        for d in self.disks() {
            if !token_held && std::time::Instant::now() > deadline {
                return Err(crate::devices::virtio_blk::BlockError::CommitTooLate(d.index()).into());
            }
            n += d.handover()?;
            d.await_lock(if token_held { None } else { Some(deadline) }, source_gone)?;
            token_held |= !d.image().readonly();
        }
        Ok(n)
    }

    /// Destination before its ACK: whether it sees the source's lock on the token image (the
    /// first writable disk's). `None` without a writable disk.
    pub fn disks_token_lock_seen(&self) -> Option<bool> {
        let d = self.disks().iter().find(|d| !d.image().readonly())?;
        Some(d.image().locked_elsewhere())
    }

    /// Source after COMMIT with no COMMITTED (COMMIT_CONFIRM): tries to take the token (the
    /// first writable disk's image lock) back. `Some(true)`: taken, so the destination never
    /// will and must not run the guest; `Some(false)`: the destination holds it and runs the
    /// guest; `None`: no writable disk, or the lock failed otherwise, so no lock tells.
    pub fn disks_take_back_token(&self) -> Option<bool> {
        let d = self.disks().iter().find(|d| !d.image().readonly())?;
        match d.image().lock() {
            Ok(()) => Some(true),
            Err(crate::devices::disk_image::DiskImageError::Locked { .. }) => Some(false),
            Err(_) => None,
        }
    }

    /// Source before COMMIT: releases the lock of every disk with nothing executing. Returns
    /// whether all were released.
    pub fn disks_try_release(&self) -> bool {
        // Every disk is tried (no short circuit).
        self.disks().iter().map(|d| d.try_release()).filter(|r| !r).count() == 0
    }

    /// Source after COMMIT: releases every disk's lock once its requests stopped executing.
    pub fn disks_release_when_idle(&self, timeout: std::time::Duration) -> bool {
        let end = std::time::Instant::now() + timeout;
        let left = || end.saturating_duration_since(std::time::Instant::now());
        self.disks().iter().map(|d| d.release_when_idle(left())).filter(|r| !r).count() == 0
    }

    /// Stops all vCPU threads.
    pub fn stop(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
        self.flush_serial();
    }
}

/// Starts the thread that passes on console output left without a newline for
/// [`PARTIAL_LINE_DELAY`] (complete lines go out at once, from the vCPU thread). It ends with
/// the machine's device bus.
fn spawn_serial_flusher(bus: std::sync::Weak<PioBus>) -> Result<(), VmError> {
    std::thread::Builder::new()
        .name("serial-out".into())
        .spawn(move || loop {
            std::thread::sleep(PARTIAL_LINE_DELAY);
            let Some(bus) = bus.upgrade() else { return };
            let Ok(mut s) = bus.serial.lock() else { return };
            if s.output_pending_since().is_some_and(|t| t.elapsed() >= PARTIAL_LINE_DELAY) {
                s.flush_output();
            }
        })
        .map(drop)
        .map_err(VmError::Thread)
}

/// A dirty-log consumer, unregistered on drop.
/// Rounds of copying with the guest running before [`Vm::move_ram_into_memfd`] pauses it.
pub const MEMFD_MOVE_ROUNDS: u32 = 8;
/// Pages a round may leave for the paused last one (4 MiB).
pub const MEMFD_MOVE_LAST_PAGES: u64 = 1024;

/// What [`Vm::move_ram_into_memfd`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemfdMove {
    /// Bytes copied into the memfd, every round's.
    pub bytes_copied: u64,
    /// Rounds, the paused last one included.
    pub rounds: u32,
    /// How long the guest was paused (the last round and the remapping).
    pub pause: std::time::Duration,
    /// The whole move.
    pub total: std::time::Duration,
}

pub struct RegisteredConsumer<'a> {
    vm: &'a Vm,
    id: ConsumerId,
}

impl RegisteredConsumer<'_> {
    pub fn id(&self) -> ConsumerId {
        self.id
    }
}

impl Drop for RegisteredConsumer<'_> {
    fn drop(&mut self) {
        let _ = self.vm.dirty_unregister(self.id);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
