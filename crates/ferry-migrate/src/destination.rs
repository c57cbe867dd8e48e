//! The incoming side: read a stream into fresh guest RAM, rebuild the machine from its state
//! sections, acknowledge, and start it only when the source commits.
//!
//! Nothing runs before COMMIT: on any error the destination answers NACK (when it still can),
//! drops everything it built and the caller exits with the error.

use std::io::BufReader;
use std::time::{Duration, Instant};

use ferry_stream::{PageType, Record, StreamReader, PAGE_SIZE};
use ferry_vmm::devices::disk_image::DiskImage;
use ferry_vmm::devices::serial::{decode_state, SerialDevice, SerialSink, SERIAL_SECTION_ID};
use ferry_vmm::devices::virtio_blk::StartMode;
use ferry_vmm::devices::virtio_blk_state::{BlockState, BLOCK_SECTION_ID, BLOCK_STATE_VERSION};
use ferry_vmm::dirty_log::Bitmap;
use ferry_vmm::memory::GuestRam;
use ferry_vmm::uffd::{CopyOutcome, Uffd};
use ferry_vmm::vcpu_state::VcpuState;
use ferry_vmm::vm::{create_machine, create_vcpu, DirtyTracking, DiskSetup, Vm};
use ferry_vmm::vm_state::VmState;

use crate::protocol::{self, Ack, ProtocolError};
use crate::transport::Conn;

/// Errors of an incoming migration.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("reading the migration stream failed")]
    Stream(#[from] ferry_stream::StreamError),
    #[error("the stream has no MACHINE_CONFIG record before its first {0}")]
    NoConfig(&'static str),
    #[error("the stream describes {stream} bytes of guest memory but this destination was started with {local}")]
    MemoryMismatch { stream: u64, local: u64 },
    #[error("the stream has a second MACHINE_CONFIG record; a migration stream describes one machine")]
    DuplicateConfig,
    #[error("the stream's RAM layout {0:?} is not the one Ferry uses for that size")]
    Layout(Vec<(u64, u64)>),
    #[error("the stream describes {0} vCPUs; Ferry supports 1 to 8")]
    VcpuCount(u32),
    #[error("page frame {0:#x} is outside guest RAM")]
    PageOutside(u64),
    #[error("page frame {0:#x} is BROKEN (poisoned on the source); this Ferry cannot represent broken pages yet")]
    Broken(u64),
    #[error("the stream ended without state for vCPU {0}")]
    MissingVcpu(u32),
    #[error("the stream ended without VM-wide state")]
    MissingVmState,
    #[error("the stream carries state for vCPU {0}, which the machine does not have")]
    ExtraVcpu(u32),
    #[error("device section '{id}' version {version} is not known to this Ferry")]
    UnknownDevice { id: String, version: u32 },
    #[error("record {0} is not valid in a migration stream")]
    Unexpected(&'static str),
    #[error("cannot rebuild the machine")]
    Vm(#[from] ferry_vmm::vm::VmError),
    #[error("guest memory")]
    Memory(#[from] ferry_vmm::memory::MemoryError),
    #[error("vCPU {0} state is invalid")]
    VcpuState(u32, #[source] ferry_vmm::vcpu_state::VcpuStateError),
    #[error("VM-wide state is invalid")]
    VmState(#[source] ferry_vmm::vm_state::VmStateError),
    #[error("serial state is invalid")]
    Serial(#[source] ferry_vmm::devices::serial::SerialStateError),
    #[error("state of disk {0} is invalid")]
    DiskState(u32, #[source] ferry_vmm::devices::virtio_blk_state::BlockStateError),
    #[error(
        "the source machine has {source_disks} disk(s) but this destination was started with {local} \
         (give the same --disk images, in the same order)"
    )]
    DiskCount { source_disks: usize, local: usize },
    #[error("filling guest memory failed")]
    Uffd(#[source] ferry_vmm::uffd::UffdError),
    #[error("the source did not commit the handover")]
    Commit(#[source] ProtocolError),
    #[error("cannot answer the source")]
    Reply(#[source] std::io::Error),
    #[error("cannot start the machine's vCPUs")]
    Start(#[source] ferry_vmm::vm::VmError),
}

/// Timings of the load, reported in the ACK and to the caller.
#[derive(Debug, Clone, Copy, Default)]
pub struct IncomingStats {
    pub bytes: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub total: Duration,
    pub load: Duration,
    pub restore: Duration,
    /// In-flight disk requests re-executed here.
    pub disk_replayed: u64,
}

struct Pending {
    /// The machine is built as soon as the configuration arrives, so that the switch-over only
    /// has to put state into it.
    machine: ferry_vmm::vm::MachineParts,
    fds: Vec<kvm_ioctls::VcpuFd>,
    /// Pages written during this load (a ZERO page there must be cleared again).
    written: Vec<Bitmap>,
    /// Fills missing pages without zeroing them first (None: userfaultfd unavailable).
    uffd: Option<Uffd>,
}

impl Pending {
    /// Writes a run of `n` NORMAL pages starting at frame `gfn` from `data` (n pages).
    fn write_run(&mut self, gfn: u64, n: u64, data: &[u8]) -> Result<(), IncomingError> {
        let len = n * PAGE_SIZE as u64;
        let (host, ri, page) = self.page(gfn)?;
        // The run must lie in one region: check its last page too.
        let (_, ri_last, _) = self.page(gfn + n - 1)?;
        if ri_last != ri || data.len() as u64 != len {
            for i in 0..n {
                self.write_run(gfn + i, 1, &data[(i as usize) * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE])?;
            }
            return Ok(());
        }
        if let Some(u) = &self.uffd {
            let written = &mut self.written[ri];
            // Pages this load wrote already exist (later iterations resend dirtied pages): a
            // plain copy. Missing ones are filled with UFFDIO_COPY. Split the run where that
            // changes, so neither kind costs a failing ioctl per page.
            let mut i = 0;
            while i < n {
                let exists = written.get(page + i);
                let mut j = i + 1;
                while j < n && written.get(page + j) == exists {
                    j += 1;
                }
                let sub = &data[(i as usize) * PAGE_SIZE..(j as usize) * PAGE_SIZE];
                // SAFETY: `host` is the run's first page; the run lies in one region (checked
                // above), so the sub-run's pages are guest RAM too.
                let at = unsafe { host.add((i as usize) * PAGE_SIZE) };
                if exists {
                    // SAFETY: the pages exist (written earlier in this load), so the copy
                    // cannot fault on a missing registered page; no vCPU runs yet; `sub` has
                    // the sub-run's length.
                    unsafe { std::ptr::copy_nonoverlapping(sub.as_ptr(), at, sub.len()) };
                } else {
                    fill_missing(u, written, at, page + i, sub)?;
                }
                i = j;
            }
            return Ok(());
        }
        // No userfaultfd: every page is an ordinary mapping.
        // SAFETY: `host` points to `len` bytes of guest RAM no vCPU uses yet; `data` has `len`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, len as usize) };
        for i in 0..n {
            self.written[ri].set(page + i);
        }
        Ok(())
    }

    fn page(&mut self, gfn: u64) -> Result<(*mut u8, usize, u64), IncomingError> {
        let gpa = gfn * PAGE_SIZE as u64;
        let ram = &self.machine.ram;
        let (ri, page) = ram.page_location(gpa).ok_or(IncomingError::PageOutside(gfn))?;
        let p = ram.host_ptr(gpa, PAGE_SIZE as u64).map_err(|_| IncomingError::PageOutside(gfn))?;
        Ok((p, ri, page))
    }
}

/// Fills pages this load has not written (from `page` of `written`'s region, at `host`) with
/// `UFFDIO_COPY`; one that exists anyway (nothing but this load writes guest RAM before the
/// vCPUs run, so only if something else did) is copied into plainly.
fn fill_missing(u: &Uffd, written: &mut Bitmap, host: *mut u8, page: u64, data: &[u8]) -> Result<(), IncomingError> {
    let n = (data.len() / PAGE_SIZE) as u64;
    // SAFETY: `data` holds `n` pages; the destination range is guest RAM registered with
    // this userfaultfd, and no vCPU runs yet.
    match unsafe { u.copy(host as u64, data.as_ptr(), data.len() as u64) } {
        Ok(CopyOutcome::Copied) => {}
        Ok(CopyOutcome::Exists) if n > 1 => {
            for i in 0..n {
                let d = &data[(i as usize) * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE];
                // SAFETY: page `i` of the range checked by the caller.
                fill_missing(u, written, unsafe { host.add((i as usize) * PAGE_SIZE) }, page + i, d)?;
            }
            return Ok(());
        }
        Ok(CopyOutcome::Exists) => {
            // SAFETY: the page exists, so the copy cannot fault on a missing registered
            // page; no vCPU runs yet; `data` is one page.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, PAGE_SIZE) };
        }
        Err(e) => return Err(IncomingError::Uffd(e)),
    }
    for i in 0..n {
        written.set(page + i);
    }
    Ok(())
}

/// Where the incoming guest's RAM comes from.
pub enum IncomingRam {
    /// Created when the stream's MACHINE_CONFIG arrives, of the size it gives (checked against
    /// the size the user asked for, if any). Pages are filled with `UFFDIO_COPY`, so a page
    /// is allocated and written once, never zeroed first.
    Fresh(Option<u64>),
    /// Created and fully allocated before the stream was accepted (`--prefault`): the copy
    /// only writes into pages that exist.
    Prefaulted(GuestRam),
}

/// The stream connection with its silence bounded: a read that gets no byte for the stall
/// timeout fails with an error that says so (the source hung, was stopped, or the link died
/// without a reset), instead of waiting forever with nothing started.
struct QuietSource {
    conn: Conn,
    stall: Duration,
}

impl QuietSource {
    fn new(conn: Conn, stall: Duration) -> std::io::Result<Self> {
        conn.set_read_timeout(Some(stall))?;
        Ok(QuietSource { conn, stall })
    }
}

impl std::io::Read for QuietSource {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.conn.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the source sent no data for {:.1} s", self.stall.as_secs_f64()),
                    ));
                }
                r => return r,
            }
        }
    }
}

/// Receives a machine on `conn` into `ram`. Returns the running machine once the source
/// committed. A source that sends nothing for `stall` before the stream's END fails the load;
/// the wait for COMMIT after the ACK has no bound (see there).
pub fn receive(
    conn: Conn,
    ram: IncomingRam,
    serial_out: SerialSink,
    dirty_tracking: DirtyTracking,
    disks: Vec<DiskImage>,
    stall: Duration,
) -> Result<(Vm, IncomingStats), IncomingError> {
    let mut reply = conn.try_clone().map_err(IncomingError::Reply)?;
    let commit_conn = conn.try_clone().map_err(IncomingError::Reply)?;
    let t_start = Instant::now();
    // SO_RCVTIMEO is the socket's: the commit wait below clears it again.
    let conn = QuietSource::new(conn, stall).map_err(IncomingError::Reply)?;
    match load(conn, ram, serial_out, dirty_tracking, disks, t_start) {
        Ok(((machine, serial, fds), disks, stats)) => {
            // vCPU threads start paused; COMMIT resumes them. Their start counts as load time.
            let t = Instant::now();
            let replay: u64 = disks.iter().map(|d| d.state.as_ref().map_or(0, |s| s.in_flight.len() as u64)).sum();
            let vm = match Vm::start(machine, serial, disks, fds, true) {
                Ok(vm) => vm,
                Err(e) => {
                    let e = IncomingError::Start(e);
                    let _ = protocol::send_nack(&mut reply, &format!("{}", ErrorChain(&e)));
                    return Err(e);
                }
            };
            let stats = IncomingStats { load: stats.load + t.elapsed(), disk_replayed: replay, ..stats };
            protocol::send_ack(
                &mut reply,
                Ack {
                    load_us: stats.load.as_micros() as u64,
                    restore_us: stats.restore.as_micros() as u64,
                    disk_replay: replay,
                },
            )
            .map_err(IncomingError::Reply)?;
            // Once acknowledged, the handover is the source's decision: it sends COMMIT, or
            // closes the connection (on failure, or by dying). This wait has no bound, as a
            // timeout here could discard a guest the source has already let go of (its COMMIT
            // still in flight on a slow or retransmitting link).
            let mut c = commit_conn;
            c.set_read_timeout(None).map_err(IncomingError::Reply)?;
            protocol::read_commit(&mut c).map_err(IncomingError::Commit)?;
            // The disks take their image locks (once the source released them) and re-execute
            // the requests that were in flight at the stop, in order, before anything new.
            vm.disks_handover().map_err(IncomingError::Start)?;
            vm.resume().map_err(IncomingError::Start)?;
            Ok((vm, IncomingStats { total: t_start.elapsed(), ..stats }))
        }
        Err(e) => {
            let _ = protocol::send_nack(&mut reply, &format!("{}", ErrorChain(&e)));
            Err(e)
        }
    }
}

/// `error: cause: cause` on one line.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut s = self.0.source();
        while let Some(e) = s {
            write!(f, ": {e}")?;
            s = e.source();
        }
        Ok(())
    }
}

pub(crate) type Parts = (ferry_vmm::vm::MachineParts, SerialDevice, Vec<kvm_ioctls::VcpuFd>);

#[allow(clippy::type_complexity)]
fn load(
    conn: QuietSource,
    ram: IncomingRam,
    serial_out: SerialSink,
    dirty_tracking: DirtyTracking,
    disks: Vec<DiskImage>,
    t_start: Instant,
) -> Result<(Parts, Vec<DiskSetup>, IncomingStats), IncomingError> {
    let mut disk_states: Vec<Option<BlockState>> = disks.iter().map(|_| None).collect();
    let mut idle_copy: Option<crate::copy_priority::IdleCopy> = None;
    // Page entries still to come before the first pass (every page once) is complete.
    let mut first_pass_left = u64::MAX;
    let mut source_disks = 0usize;
    // A small buffer: a page batch's body is then mostly read straight into the reader's record
    // buffer (BufReader passes reads larger than its buffer through) instead of being copied
    // twice; small records still come many per read.
    // Whether the source (and so its running guest) shares this host's CPUs.
    let local = conn.conn.is_local();
    let mut r = StreamReader::new(BufReader::with_capacity(64 << 10, conn))?;
    let mut pending: Option<Pending> = None;
    let mut stats = IncomingStats::default();
    let mut vm_state: Option<VmState> = None;
    let mut vcpu_states: Vec<Option<VcpuState>> = Vec::new();
    let mut serial_state = None;
    let (memory, mut prefaulted) = match ram {
        IncomingRam::Fresh(m) => (m, None),
        IncomingRam::Prefaulted(r) => (Some(r.size()), Some(r)),
    };
    loop {
        match r.next_record()? {
            Record::MachineConfig(c) => {
                if let Some(m) = memory {
                    if m != c.memory_bytes {
                        return Err(IncomingError::MemoryMismatch { stream: c.memory_bytes, local: m });
                    }
                }
                if c.vcpus == 0 || c.vcpus > ferry_vmm::vm::MAX_VCPUS {
                    return Err(IncomingError::VcpuCount(c.vcpus));
                }
                if ferry_vmm::memory::layout(c.memory_bytes) != c.regions {
                    return Err(IncomingError::Layout(c.regions.clone()));
                }
                if pending.is_some() {
                    return Err(IncomingError::DuplicateConfig);
                }
                let (ram, uffd) = match prefaulted.take() {
                    // Every page exists: plain copies, no userfaultfd.
                    Some(ram) => (ram, None),
                    None => {
                        let ram = GuestRam::new(c.memory_bytes)?;
                        let uffd = Uffd::new().ok().and_then(|mut u| {
                            ram.regions().iter().try_for_each(|r| u.register(r.host_addr, r.size)).ok().map(|_| u)
                        });
                        (ram, uffd)
                    }
                };
                let written = ram.regions().iter().map(|r| Bitmap::new(r.size / PAGE_SIZE as u64, false)).collect();
                vcpu_states = (0..c.vcpus).map(|_| None).collect();
                // The source's guest runs while pre-copy arrives: stay off its CPU until every
                // page has come once, or until the final pass if the guest runs on this host.
                let disk_threads = disks.iter().map(|d| d.spec().busy_threads()).sum();
                drop(idle_copy.replace(crate::copy_priority::IdleCopy::enter(c.vcpus, disk_threads)));
                first_pass_left = c.memory_bytes / PAGE_SIZE as u64;
                let machine = create_machine(ram, dirty_tracking)?;
                let fds = (0..c.vcpus).map(|id| create_vcpu(&machine, id, c.vcpus)).collect::<Result<Vec<_>, _>>()?;
                pending = Some(Pending { machine, fds, written, uffd });
            }
            Record::PageBatch(batch) => {
                let p = pending.as_mut().ok_or(IncomingError::NoConfig("PAGE_BATCH"))?;
                first_pass_left = first_pass_left.saturating_sub(batch.len() as u64);
                if first_pass_left == 0 && !local {
                    drop(idle_copy.take());
                }
                if let Some(i) = idle_copy.as_mut() {
                    i.watch();
                }
                // Runs of NORMAL pages with consecutive frames have consecutive data: one copy.
                let mut run: Option<(u64, u64, &[u8])> = None;
                for (gfn, ty, data) in batch.iter() {
                    if let (PageType::Normal, Some(d)) = (ty, data) {
                        stats.normal_pages += 1;
                        match &mut run {
                            Some((start, n, buf)) if *start + *n == gfn && buf.as_ptr_range().end == d.as_ptr() => {
                                *n += 1;
                                // SAFETY: both slices come from the same record buffer and are
                                // adjacent (checked above), so the joined range is one slice.
                                *buf = unsafe { std::slice::from_raw_parts(buf.as_ptr(), buf.len() + d.len()) };
                                continue;
                            }
                            _ => {
                                if let Some((start, n, buf)) = run.take() {
                                    p.write_run(start, n, buf)?;
                                }
                                run = Some((gfn, 1, d));
                                continue;
                            }
                        }
                    }
                    if let Some((start, n, buf)) = run.take() {
                        p.write_run(start, n, buf)?;
                    }
                    match ty {
                        PageType::Zero | PageType::Discarded => {
                            let (host, ri, page) = p.page(gfn)?;
                            if p.written[ri].get(page) {
                                // SAFETY: the page exists (written earlier in this load) and no
                                // vCPU runs yet.
                                unsafe { std::ptr::write_bytes(host, 0, PAGE_SIZE) };
                            }
                            stats.zero_pages += 1;
                        }
                        PageType::Broken => return Err(IncomingError::Broken(gfn)),
                        PageType::Normal => return Err(IncomingError::Unexpected("NORMAL page without data")),
                    }
                }
                if let Some((start, n, buf)) = run.take() {
                    p.write_run(start, n, buf)?;
                }
            }
            Record::VmState { data, .. } => {
                // The final pass has begun (the source paused its guest): full priority.
                drop(idle_copy.take());
                vm_state = Some(VmState::decode(data).map_err(IncomingError::VmState)?);
            }
            Record::VcpuState { id, data, .. } => {
                let slot = vcpu_states.get_mut(id as usize).ok_or(IncomingError::ExtraVcpu(id))?;
                *slot = Some(VcpuState::decode(data).map_err(|e| IncomingError::VcpuState(id, e))?);
            }
            Record::DeviceState { id, instance, version, data } if id == BLOCK_SECTION_ID => {
                if version != BLOCK_STATE_VERSION {
                    return Err(IncomingError::UnknownDevice { id, version });
                }
                source_disks = source_disks.max(instance as usize + 1);
                let st = BlockState::decode(data).map_err(|e| IncomingError::DiskState(instance, e))?;
                match disk_states.get_mut(instance as usize) {
                    Some(slot) => *slot = Some(st),
                    None => return Err(IncomingError::DiskCount { source_disks, local: disks.len() }),
                }
            }
            Record::DeviceState { id, version, data, .. } => {
                if id != SERIAL_SECTION_ID || version != ferry_vmm::devices::serial::SERIAL_STATE_VERSION {
                    return Err(IncomingError::UnknownDevice { id, version });
                }
                serial_state = Some(decode_state(data).map_err(IncomingError::Serial)?);
            }
            // The source paused its guest: the final pass is the pause, at full priority.
            Record::FinalPass => drop(idle_copy.take()),
            Record::Checkpoint(_) => return Err(IncomingError::Unexpected("CHECKPOINT")),
            Record::SnapshotInfo(_) | Record::RamMap(_) => return Err(IncomingError::Unexpected("snapshot file")),
            Record::SkippedOptional { .. } => {}
            Record::End => break,
        }
    }
    stats.bytes = r.bytes_read();
    let t_end = Instant::now();
    let p = pending.ok_or(IncomingError::NoConfig("END"))?;
    if vcpu_states.iter().any(Option::is_none) {
        let id = vcpu_states.iter().position(Option::is_none).unwrap_or(0) as u32;
        return Err(IncomingError::MissingVcpu(id));
    }
    let vm_state = vm_state.ok_or(IncomingError::MissingVmState)?;
    if disk_states.iter().any(Option::is_none) {
        return Err(IncomingError::DiskCount { source_disks, local: disks.len() });
    }
    let disks: Vec<DiskSetup> = disks
        .into_iter()
        .zip(disk_states)
        .map(|(image, state)| DiskSetup { image, state, mode: StartMode::AwaitHandover })
        .collect();
    let t_restore = Instant::now();
    let mut p = p;
    if let Some(mut u) = p.uffd.take() {
        u.unregister_all().map_err(IncomingError::Uffd)?;
    }
    let parts = restore_state(p.machine, p.fds, &vm_state, &vcpu_states, serial_state, serial_out)?;
    stats.restore = t_restore.elapsed();
    stats.load = t_end.elapsed();
    let _ = t_start;
    Ok((parts, disks, stats))
}

/// Puts saved state into a built machine (RAM already filled): VM-wide state, every vCPU, the
/// serial device. Shared by the migration destination and snapshot restore.
pub(crate) fn restore_state(
    machine: ferry_vmm::vm::MachineParts,
    fds: Vec<kvm_ioctls::VcpuFd>,
    vm_state: &VmState,
    vcpu_states: &[Option<VcpuState>],
    serial_state: Option<ferry_vmm::devices::serial::SerialState>,
    serial_out: SerialSink,
) -> Result<Parts, IncomingError> {
    if fds.len() != vcpu_states.len() {
        return Err(IncomingError::MissingVcpu(fds.len().min(vcpu_states.len()) as u32));
    }
    vm_state.restore(&machine.vm_fd).map_err(IncomingError::VmState)?;
    for (id, (st, fd)) in vcpu_states.iter().zip(&fds).enumerate() {
        let st = st.as_ref().ok_or(IncomingError::MissingVcpu(id as u32))?;
        st.restore(fd).map_err(|e| IncomingError::VcpuState(id as u32, e))?;
    }
    let irq = machine.serial_irq.try_clone().map_err(|e| IncomingError::Vm(ferry_vmm::vm::VmError::EventFd(e)))?;
    let serial = match serial_state {
        Some(s) => SerialDevice::from_state(&s, irq, serial_out).map_err(IncomingError::Serial)?,
        None => SerialDevice::new(irq, serial_out),
    };
    Ok((machine, serial, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(ram: &GuestRam, page: u64) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE];
        ram.read(page * PAGE_SIZE as u64, &mut b).unwrap();
        b
    }

    /// A run over missing pages and one that exists although this load never wrote it: every
    /// page ends up holding the run's data and is marked written.
    #[test]
    fn fill_missing_fills_holes_and_copies_into_existing_pages() {
        let ram = GuestRam::new(4 << 20).unwrap();
        // Before registering: a registered missing page must never be touched.
        ram.write(2 * PAGE_SIZE as u64, &[0xee; PAGE_SIZE]).unwrap();
        let mut u = match Uffd::new() {
            Ok(u) => u,
            Err(e) => {
                eprintln!("SKIPPED: no userfaultfd here ({e}): the destination falls back to plain copies");
                return;
            }
        };
        let r = ram.regions()[0];
        u.register(r.host_addr, r.size).unwrap();
        let mut written = Bitmap::new(r.size / PAGE_SIZE as u64, false);
        let data: Vec<u8> = (0..6).flat_map(|p| vec![p as u8 + 1; PAGE_SIZE]).collect();
        // Pages 0..6: 2 exists, the others are holes.
        fill_missing(&u, &mut written, r.host_addr as *mut u8, 0, &data).unwrap();
        // A second run of holes only, further on.
        fill_missing(&u, &mut written, (r.host_addr + 10 * PAGE_SIZE as u64) as *mut u8, 10, &data[..PAGE_SIZE])
            .unwrap();
        u.unregister_all().unwrap();
        for p in 0..6 {
            assert_eq!(page_of(&ram, p), vec![p as u8 + 1; PAGE_SIZE], "page {p}");
            assert!(written.get(p), "page {p} not marked written");
        }
        assert_eq!(page_of(&ram, 10), vec![1; PAGE_SIZE]);
        assert!(written.get(10));
        assert_eq!(written.count(), 7);
        assert_eq!(page_of(&ram, 6), vec![0; PAGE_SIZE], "a page outside both runs changed");
    }
}
