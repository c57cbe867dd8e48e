//! The live-update handover: a machine passed from one Ferry process to the next on the same
//! host with its memory in place (seed 003). The stream is the migration stream with
//! RAM_REFERENCE records instead of page data (header flag HANDOVER): the receiving process
//! already holds the guest RAM's memfd, so only the machine's state crosses, and its size does
//! not grow with the guest's.
//!
//! ```text
//!   header (HANDOVER) MACHINE_CONFIG RAM_REFERENCE×regions CPU_MODEL
//!   PAGE_BATCH (BROKEN entries only: the poison set) VM_STATE VCPU_STATE… DEVICE_STATE… END
//! ```
//!
//! This module writes and reads that stream; passing the descriptors and replacing the process
//! is the binary's (`crates/ferry/src/update.rs`, docs/live-update.md).

use std::fs::File;
use std::io::Read;
use std::time::{Duration, Instant};

use ferry_stream::{
    CpuModel, MachineConfig, PageBatch, PageType, RamMap, RamReference, SnapshotInfo, StreamFlags, StreamHeader,
    StreamReader, StreamWriter, PAGE_SIZE,
};
use ferry_vmm::devices::disk_image::DiskImage;
use ferry_vmm::devices::serial::SerialSink;
use ferry_vmm::devices::virtio_blk::StartMode;
use ferry_vmm::memory::GuestRam;
use ferry_vmm::vm::{create_machine, create_vcpu, DirtyTracking, MachineParts, Vm};

use crate::records::{load_records, write_sections, LoadError, LoadOptions, RecordSink, StreamKind};

/// Errors of a handover.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("writing the handover stream failed")]
    Write(#[source] ferry_stream::StreamError),
    #[error("the machine")]
    Vm(#[from] ferry_vmm::vm::VmError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("the handover names RAM in descriptor {0}, which this process was not given")]
    UnknownFd(u32),
    #[error("the handover's RAM references {0:?} do not match the layout of its machine")]
    Layout(Vec<(u64, u64, u64)>),
    #[error("the handover carries page data (frame {0:#x}); its RAM stays in place")]
    PageData(u64),
    #[error("guest memory")]
    Memory(#[from] ferry_vmm::memory::MemoryError),
    #[error("the handover stream has no {0}")]
    Missing(&'static str),
}

/// What the handover moved.
#[derive(Debug, Clone, Copy, Default)]
pub struct HandoverStats {
    /// Bytes of the stream: the machine's state, never its memory.
    pub stream_bytes: u64,
    /// Guest RAM handed over in place.
    pub ram_bytes: u64,
    pub broken_pages: u64,
    /// Building the VM (memory slots, vCPUs) from the handover's prefix.
    pub build: Duration,
    /// From the first state record to the machine ready.
    pub restore: Duration,
}

/// Writes the handover of `vm` (vCPUs paused, disks quiesced) to `w`. `ram_fd` is the number the
/// guest RAM's memfd has in the receiving process.
pub fn write_handover<W: std::io::Write>(vm: &Vm, w: W, ram_fd: u32) -> Result<W, HandoverError> {
    let mut w = write_handover_prefix(vm, w, ram_fd)?;
    write_handover_state(vm, &mut w)?;
    Ok(w.into_inner())
}

/// The part of a handover that does not change while the guest runs (the machine's
/// configuration, its RAM references and its CPU model): a receiver builds its VM from it
/// before the guest pauses (process mode prepared ahead). `vm` may be running.
pub fn write_handover_prefix<W: std::io::Write>(vm: &Vm, w: W, ram_fd: u32) -> Result<StreamWriter<W>, HandoverError> {
    let ram = vm.ram();
    let mut w = StreamWriter::new(w, &StreamHeader::new(StreamFlags::HANDOVER)).map_err(HandoverError::Write)?;
    w.machine_config(&MachineConfig {
        memory_bytes: ram.size(),
        vcpus: vm.vcpu_count(),
        regions: ram.regions().iter().map(|r| (r.gpa, r.size)).collect(),
    })
    .map_err(HandoverError::Write)?;
    for (i, r) in ram.regions().iter().enumerate() {
        let reference = RamReference { region: i as u32, fd: ram_fd, gpa: r.gpa, size: r.size, offset: r.file_offset };
        w.ram_reference(&reference).map_err(HandoverError::Write)?;
    }
    w.cpu_model(vm.cpu_model()).map_err(HandoverError::Write)?;
    w.flush().map_err(HandoverError::Write)?;
    Ok(w)
}

/// The rest of a handover, written with the guest paused and its disks quiesced: the broken
/// pages, the machine's state, END.
pub fn write_handover_state<W: std::io::Write>(vm: &Vm, w: &mut StreamWriter<W>) -> Result<(), HandoverError> {
    // The poison markers live in this process's page tables: the next one must set them again.
    let broken: Vec<(u64, PageType)> = vm.ram().poison().list().iter().map(|&(g, _)| (g, PageType::Broken)).collect();
    for chunk in broken.chunks(ferry_stream::MAX_BATCH_PAGES as usize) {
        w.page_batch_packed(chunk, &[]).map_err(HandoverError::Write)?;
    }
    write_sections(w, &vm.save_state()?.sections()).map_err(HandoverError::Write)?;
    w.end().map_err(HandoverError::Write)?;
    w.flush().map_err(HandoverError::Write)
}

/// The handover's own records: RAM references, and BROKEN entries.
struct HandoverSink<'a> {
    /// Descriptors this process was handed, by the number the stream names them with (the only
    /// ones a reference may name), each usable once.
    fds: Vec<(u32, Option<File>)>,
    dirty_tracking: DirtyTracking,
    config: Option<MachineConfig>,
    refs: Vec<RamReference>,
    machine: Option<MachineParts>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    broken: u64,
    started: Instant,
    built_in: Duration,
    state_at: Option<Instant>,
    /// Told once the VM is built (the guest may still run in the sender then).
    on_built: &'a mut dyn FnMut(),
}

impl RecordSink for HandoverSink<'_> {
    type Error = HandoverError;

    fn machine_config(&mut self, c: &MachineConfig) -> Result<(), HandoverError> {
        self.config = Some(c.clone());
        Ok(())
    }

    fn ram_reference(&mut self, r: RamReference) -> Result<(), HandoverError> {
        if !self.fds.iter().any(|(n, _)| *n == r.fd) {
            return Err(HandoverError::UnknownFd(r.fd));
        }
        self.refs.push(r);
        Ok(())
    }

    /// Every reference has come: map the memory, build the machine and its vCPUs.
    fn cpu_model(&mut self, m: &CpuModel) -> Result<(), HandoverError> {
        let c = self.config.as_ref().ok_or(HandoverError::Missing("MACHINE_CONFIG"))?;
        let fd = self.refs.first().ok_or(HandoverError::Missing("RAM_REFERENCE"))?.fd;
        let memfd = self
            .fds
            .iter_mut()
            .find(|(n, _)| *n == fd)
            .and_then(|(_, f)| f.take())
            .ok_or(HandoverError::UnknownFd(fd))?;
        let ram = GuestRam::from_memfd(memfd, c.memory_bytes)?;
        let laid: Vec<(u64, u64, u64)> = ram.regions().iter().map(|r| (r.gpa, r.size, r.file_offset)).collect();
        let given: Vec<(u64, u64, u64)> = self.refs.iter().map(|r| (r.gpa, r.size, r.offset)).collect();
        if laid != given || self.refs.iter().any(|r| r.fd != fd) {
            return Err(HandoverError::Layout(given));
        }
        let machine = create_machine(ram, self.dirty_tracking)?;
        self.vcpus = (0..c.vcpus).map(|id| create_vcpu(&machine, id, c.vcpus, m)).collect::<Result<Vec<_>, _>>()?;
        self.machine = Some(machine);
        self.built_in = self.started.elapsed();
        (self.on_built)();
        Ok(())
    }

    fn page_batch(&mut self, b: PageBatch<'_>) -> Result<(), HandoverError> {
        let machine = self.machine.as_ref().ok_or(HandoverError::Missing("CPU_MODEL before its pages"))?;
        for (gfn, ty, _) in b.iter() {
            if ty != PageType::Broken {
                return Err(HandoverError::PageData(gfn));
            }
            // Broken in the previous process: broken here again, for real.
            if machine.ram.poison().mark(gfn, ferry_vmm::poison::PoisonCause::Stream) {
                machine.ram.poison_host_page(gfn * PAGE_SIZE as u64, None)?;
            }
            self.broken += 1;
        }
        Ok(())
    }

    fn snapshot_info(&mut self, _: SnapshotInfo) -> Result<(), HandoverError> {
        Err(LoadError::Unexpected("SNAPSHOT_INFO", "handover").into())
    }

    fn ram_map(&mut self, _: RamMap) -> Result<(), HandoverError> {
        Err(LoadError::Unexpected("RAM_MAP", "handover").into())
    }

    fn broken_pages(&mut self, _: Vec<u64>) -> Result<(), HandoverError> {
        Err(LoadError::Unexpected("BROKEN_PAGES", "handover").into())
    }

    fn final_pass(&mut self) {}

    fn state_begins(&mut self) {
        self.state_at = Some(Instant::now());
    }
}

/// Rebuilds the machine a previous Ferry handed over: `stream` is the handover, `fds` the
/// descriptors this process was given (guest RAM among them) by the number the stream names
/// them with, `disks` the inherited images.
/// The machine starts with its vCPUs paused and its disks replaying what was in flight; the
/// caller resumes it. `on_built` is called once the VM exists (with nothing of the guest's
/// state in it yet): a receiver prepared ahead tells the sender it can pause the guest.
pub fn receive_handover(
    stream: impl Read,
    fds: Vec<(u32, File)>,
    serial_out: SerialSink,
    dirty_tracking: DirtyTracking,
    disks: Vec<DiskImage>,
    on_built: &mut dyn FnMut(),
) -> Result<(Vm, HandoverStats), HandoverError> {
    let mut r = StreamReader::new(std::io::BufReader::new(stream)).map_err(LoadError::Stream)?;
    let mut sink = HandoverSink {
        fds: fds.into_iter().map(|(n, f)| (n, Some(f))).collect(),
        dirty_tracking,
        config: None,
        refs: Vec::new(),
        machine: None,
        vcpus: Vec::new(),
        broken: 0,
        started: Instant::now(),
        built_in: Duration::ZERO,
        state_at: None,
        on_built,
    };
    let loaded = load_records(&mut r, StreamKind::Handover, &LoadOptions::default(), &mut sink)?;
    let t = sink.state_at.unwrap_or_else(Instant::now);
    let machine = sink.machine.take().ok_or(HandoverError::Missing("CPU_MODEL"))?;
    let ram_bytes = machine.ram.size();
    let vm = Vm::restore(
        machine,
        std::mem::take(&mut sink.vcpus),
        loaded.cpu,
        &loaded.state,
        serial_out,
        disks,
        StartMode::AwaitHandover,
        true,
    )?;
    // The images' locks never left (same open file descriptions); replay what was in flight.
    vm.disks_handover()?;
    Ok((
        vm,
        HandoverStats {
            stream_bytes: loaded.bytes,
            ram_bytes,
            broken_pages: sink.broken,
            build: sink.built_in,
            restore: t.elapsed(),
        },
    ))
}
