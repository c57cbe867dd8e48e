//! Guest RAM: one `memfd` mapped shared into Ferry and registered with KVM as user memory slots.
//!
//! The memfd is what later lets another process (a live update) take the guest's memory over
//! without copying. The layout leaves a hole below 4 GiB for MMIO (local APIC, IOAPIC, virtio):
//! RAM is `[0, min(size, 3 GiB))` and the rest, if any, starts at 4 GiB.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::dirty_log::Bitmap;
use crate::poison::{PoisonCause, PoisonSet};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// Pages `GuestRam::data_pages` asks `mincore` about per call (64 MiB, about 1 ms here).
const PROBE_CHUNK_PAGES: usize = 16384;

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} is not a positive multiple of 2 MiB")]
    BadSize(u64),
    #[error("cannot create the memfd for guest RAM")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size the guest RAM memfd to {size} bytes")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("cannot register guest RAM slot {slot} with KVM")]
    RegisterSlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot map a file over guest RAM region {region}")]
    MapFile {
        region: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot allocate guest RAM up front (region at {gpa:#x}, {size} bytes): is there enough host memory?")]
    Prefault {
        gpa: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find which pages of guest RAM region {region} hold data")]
    Probe {
        region: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot drop guest pages from {gpa:#x}")]
    Punch {
        gpa: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest address range {gpa:#x}+{len:#x} is not RAM")]
    OutOfRange { gpa: u64, len: u64 },
    #[error("guest page {gpa:#x} is broken (machine-check poisoned): it is never read")]
    Poisoned { gpa: u64 },
    #[error("cannot poison guest page {gpa:#x}")]
    Poison {
        gpa: u64,
        #[source]
        source: crate::uffd::UffdError,
    },
    #[error(
        "cannot poison guest page {gpa:#x}: this kernel has neither userfaultfd's UFFDIO_POISON nor \
         MADV_HWPOISON (CONFIG_MEMORY_FAILURE)"
    )]
    NoPoison { gpa: u64 },
    #[error("cannot copy guest RAM region {region}'s pages into its memfd (at page {page})")]
    CopyToMemfd {
        region: usize,
        page: u64,
        #[source]
        source: std::io::Error,
    },
}

/// One RAM region: a contiguous guest-physical range backed by part of the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// KVM slot number.
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of this region in the memfd.
    pub file_offset: u64,
    /// Where Ferry mapped it.
    pub host_addr: u64,
}

/// The guest's RAM.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<RamRegion>,
    memfd: File,
    size: u64,
    /// Per region: the memfd holds its pages (false once a file is mapped over it).
    memfd_backed: Vec<AtomicBool>,
    /// Per region: the file mapped over it and the offset it starts at, while it is.
    mapped_files: std::sync::Mutex<Vec<Option<(File, u64)>>>,
    /// The broken pages (shared with the vCPU threads and devices).
    poison: std::sync::Arc<PoisonSet>,
}

/// Deallocates `len` bytes at `offset` of `file` (`fallocate(PUNCH_HOLE | KEEP_SIZE)`): they
/// read as zeros (or, for a memfd under userfaultfd, as missing) and take no space.
pub fn punch_hole(file: &impl AsRawFd, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an open descriptor with plain integer arguments; no memory of ours
    // is touched (pages of the file that are mapped are unmapped by the kernel).
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The RAM layout for `size` bytes: `(gpa, len)` pairs.
pub fn layout(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut v = vec![(0, low)];
    if size > low {
        v.push((MMIO_HOLE_END, size - low));
    }
    v
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM in a fresh memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(size));
        }
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"ferry-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(size).map_err(|source| MemoryError::Truncate { size, source })?;
        Self::from_memfd(memfd, size)
    }

    /// Maps an existing memfd holding `size` bytes of guest RAM (laid out by [`layout`]).
    pub fn from_memfd(memfd: File, size: u64) -> Result<Self, MemoryError> {
        let mut ranges = Vec::new();
        let mut offset = 0u64;
        for (gpa, len) in layout(size) {
            let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
            ranges.push((GuestAddress(gpa), len as usize, Some(FileOffset::new(file, offset))));
            offset += len;
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for (slot, r) in mem.iter().enumerate() {
            let gpa = r.start_addr().0;
            let size = r.len();
            let host_addr = r.as_ptr() as u64;
            regions.push(RamRegion { slot: slot as u32, gpa, size, file_offset: offset, host_addr });
            offset += size;
        }
        let memfd_backed = regions.iter().map(|_| AtomicBool::new(true)).collect();
        let mapped_files = std::sync::Mutex::new(regions.iter().map(|_| None).collect());
        let poison = std::sync::Arc::new(PoisonSet::new());
        Ok(GuestRam { mem, regions, memfd, size, memfd_backed, mapped_files, poison })
    }

    /// Allocates every page of guest RAM now (`--prefault`), so that neither the guest nor an
    /// incoming migration pays for page allocation later. Only for fresh RAM that nothing runs
    /// on yet: the fallback touch reads and rewrites one byte per page.
    pub fn prefault(&self) -> Result<(), MemoryError> {
        for r in &self.regions {
            // SAFETY: madvise on a range Ferry mapped (host_addr, size) and keeps mapped; the
            // advice only populates page tables, it never changes contents.
            let rc =
                unsafe { libc::madvise(r.host_addr as *mut libc::c_void, r.size as usize, libc::MADV_POPULATE_WRITE) };
            if rc == 0 {
                continue;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(MemoryError::Prefault { gpa: r.gpa, size: r.size, source: e });
            }
            // A kernel without MADV_POPULATE_WRITE (before 5.14): touch each page. A failed
            // allocation here is SIGBUS, as it would be for the guest later.
            for off in (0..r.size).step_by(PAGE_SIZE as usize) {
                let p = (r.host_addr + off) as *mut u8;
                // SAFETY: p lies inside the mapping; no vCPU or device uses this RAM yet, so
                // rewriting the byte read keeps the contents.
                unsafe { p.write_volatile(p.read_volatile()) };
            }
        }
        Ok(())
    }

    /// Registers every region with KVM (optionally with dirty logging on).
    pub fn register(&self, vm: &VmFd, log_dirty: bool) -> Result<(), MemoryError> {
        for r in &self.regions {
            let region = kvm_userspace_memory_region {
                slot: r.slot,
                flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.host_addr,
            };
            // SAFETY: the host range [host_addr, host_addr+size) is a live mapping owned by
            // self.mem, which lives as long as the VM that uses it (Vm drops the VmFd first).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|source| MemoryError::RegisterSlot { slot: r.slot, source })?;
        }
        Ok(())
    }

    /// Switches KVM's dirty logging on or off for every region.
    pub fn set_dirty_logging(&self, vm: &VmFd, on: bool) -> Result<(), MemoryError> {
        self.register(vm, on)
    }

    /// Whether the memfd holds region `i`'s pages (its holes are then never-written zero pages).
    pub fn memfd_backs(&self, i: usize) -> bool {
        self.memfd_backed.get(i).is_some_and(|b| b.load(Ordering::Acquire))
    }

    /// Which of the `count` pages of region `i` from page `first` may hold data: page `k` of the
    /// result is set unless page `first + k` is a hole of the memfd, a zero
    /// page the guest never wrote, which can be sent or stored as zero without being read
    /// (reading would allocate it). A region the memfd does not back has no holes.
    ///
    /// `mincore` tells which pages are in memory; a page it reports absent may still be swapped
    /// out, so every absent run is confirmed with `SEEK_DATA` (a swapped page is data). Both
    /// calls cost in proportion to the pages asked about and return between chunks, unlike
    /// `SEEK_HOLE`, which walks the page cache to the end of the data run, however far: over
    /// 768 MiB of data one such call took 9.5 ms in the kernel, and the guest stalled meanwhile.
    /// Call it only after the range's dirty bits were cleared in KVM, so that a hole the guest
    /// fills after the probe is dirty again.
    pub fn data_pages(&self, i: usize, first: u64, count: u64) -> Result<Bitmap, MemoryError> {
        let r = *self
            .regions
            .get(i)
            .ok_or(MemoryError::Probe { region: i, source: std::io::Error::other("no such region") })?;
        if first.saturating_add(count) > r.size / PAGE_SIZE {
            return Err(MemoryError::OutOfRange { gpa: r.gpa + first * PAGE_SIZE, len: count * PAGE_SIZE });
        }
        if !self.memfd_backs(i) {
            return Ok(Bitmap::new(count, true));
        }
        let mut bits = Bitmap::new(count, false);
        // One mincore per 64 MiB at most, so that no single call holds the CPU for long.
        let mut resident = vec![0u8; count as usize];
        for (c, part) in resident.chunks_mut(PROBE_CHUNK_PAGES).enumerate() {
            let at = r.host_addr + (first + (c * PROBE_CHUNK_PAGES) as u64) * PAGE_SIZE;
            // SAFETY: [at, at + part.len() pages) lies inside region i's live mapping (the
            // whole range was checked above) and `part` has one byte per page of it.
            let rc =
                unsafe { libc::mincore(at as *mut libc::c_void, part.len() * PAGE_SIZE as usize, part.as_mut_ptr()) };
            if rc != 0 {
                return Err(MemoryError::Probe { region: i, source: std::io::Error::last_os_error() });
            }
        }
        let off = |k: u64| r.file_offset + (first + k) * PAGE_SIZE;
        let mut k = 0;
        // Set once SEEK_DATA said no data lies at or after some offset: the rest are holes.
        let mut no_more_data = false;
        while k < count {
            if resident[k as usize] & 1 != 0 {
                bits.set(k);
                k += 1;
                continue;
            }
            // An absent run [k, end): holes except where the memfd still holds data (swapped
            // out), found by SEEK_DATA from each point not yet known.
            let end = (k..count).find(|&j| resident[j as usize] & 1 != 0).unwrap_or(count);
            while k < end && !no_more_data {
                // SAFETY: lseek on the memfd this GuestRam owns; no memory is touched.
                let d = unsafe { libc::lseek(self.memfd.as_raw_fd(), off(k) as libc::off_t, libc::SEEK_DATA) };
                if d < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::ENXIO) {
                        return Err(MemoryError::Probe { region: i, source: e });
                    }
                    no_more_data = true;
                    break;
                }
                let next_data = ((d as u64).saturating_sub(r.file_offset) / PAGE_SIZE).saturating_sub(first);
                if next_data == k {
                    // Absent from memory but data (swapped out).
                    bits.set(k);
                    k += 1;
                } else {
                    k = next_data.clamp(k, end);
                }
            }
            k = end;
        }
        Ok(bits)
    }

    /// Maps `len` bytes of `file` at `offset` copy-on-write over region `i`, from the region's
    /// start: the guest then reads the file's pages (page cache, loaded on first touch) and its
    /// writes stay private. Only before KVM uses the memory. Afterwards the memfd no longer holds
    /// this region ([`GuestRam::memfd_backs`]).
    pub fn map_file_private(&mut self, i: usize, file: &File, offset: u64) -> Result<(), MemoryError> {
        let r = *self
            .regions
            .get(i)
            .ok_or(MemoryError::MapFile { region: i, source: std::io::Error::other("no such region") })?;
        // SAFETY: MAP_FIXED replaces exactly the region's own mapping [host_addr, +size), which
        // this GuestRam owns and nothing uses yet (no vCPU exists); the file is open.
        let p = unsafe {
            libc::mmap(
                r.host_addr as *mut libc::c_void,
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED || p as u64 != r.host_addr {
            return Err(MemoryError::MapFile { region: i, source: std::io::Error::last_os_error() });
        }
        self.memfd_backed[i].store(false, Ordering::Release);
        // Kept to find the file's data when the region moves into the memfd (a live update).
        let f = file.try_clone().map_err(|source| MemoryError::MapFile { region: i, source })?;
        if let Ok(mut m) = self.mapped_files.lock() {
            m[i] = Some((f, offset));
        }
        Ok(())
    }

    /// The pages of region `i` that may hold something other than zero. For a memfd-backed
    /// region, [`Self::data_pages`]. For one mapped from a file: the file's data (`SEEK_DATA`
    /// / `SEEK_HOLE`; its holes read zero) and every page the guest or a device wrote since
    /// (copy-on-write pages: present or swapped in `/proc/self/pagemap` and not the file's).
    /// Neither reads a page, so that a large sparse snapshot is not read into memory to find
    /// its zeros. Call it after the range's dirty bits were taken, so that a page written
    /// afterwards is dirty again.
    pub fn content_pages(&self, i: usize) -> Result<Bitmap, MemoryError> {
        let r = *self.regions.get(i).ok_or(MemoryError::OutOfRange { gpa: 0, len: 0 })?;
        let npages = r.size / PAGE_SIZE;
        let mapped = {
            let m = self.mapped_files.lock().map_err(|_| MemoryError::Probe {
                region: i,
                source: std::io::Error::other("the mapped-file table's lock is poisoned"),
            })?;
            match m.get(i).and_then(Option::as_ref) {
                Some((f, off)) => {
                    Some((f.try_clone().map_err(|source| MemoryError::Probe { region: i, source })?, *off))
                }
                None => None,
            }
        };
        let Some((file, base)) = mapped else {
            return self.data_pages(i, 0, npages);
        };
        let probe = |source| MemoryError::Probe { region: i, source };
        let mut bits = Bitmap::new(npages, false);
        // The file's data runs within [base, base + size).
        let end = base + r.size;
        let mut at = base;
        while at < end {
            // SAFETY: lseek on an open descriptor we own a duplicate of; plain integers.
            let d = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
            if d < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return Err(probe(e));
            }
            let d = d as u64;
            if d >= end {
                break;
            }
            // SAFETY: as above.
            let h = unsafe { libc::lseek(file.as_raw_fd(), d as libc::off_t, libc::SEEK_HOLE) };
            if h < 0 {
                return Err(probe(std::io::Error::last_os_error()));
            }
            let h = (h as u64).min(end);
            for p in (d - base) / PAGE_SIZE..(h - base).div_ceil(PAGE_SIZE) {
                bits.set(p);
            }
            at = h.max(d + 1);
        }
        // The pages written since the file was mapped: anonymous now.
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE_OR_SHARED: u64 = 1 << 61;
        let pagemap = File::open("/proc/self/pagemap").map_err(probe)?;
        let chunk = PROBE_CHUNK_PAGES as u64;
        let mut buf = vec![0u8; PROBE_CHUNK_PAGES * 8];
        let mut p = 0u64;
        while p < npages {
            let n = chunk.min(npages - p);
            let b = &mut buf[..(n * 8) as usize];
            std::os::unix::fs::FileExt::read_exact_at(&pagemap, b, (r.host_addr / PAGE_SIZE + p) * 8).map_err(probe)?;
            for (k, e) in b.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                if (e & PRESENT != 0 && e & FILE_OR_SHARED == 0) || e & SWAPPED != 0 {
                    bits.set(p + k as u64);
                }
            }
            p += n;
        }
        Ok(bits)
    }

    /// Copies `pages` (indices within region `i`, ascending) from the guest's mapping into the
    /// memfd, where a region mapped from a snapshot file moves to. Each page is read with the
    /// recoverable copy ([`Self::copy_out`]): a broken page is never read, and one that breaks
    /// under the copy is added to the broken set instead of killing Ferry; both are skipped
    /// ([`Self::map_memfd_back`] breaks them again). With `skip_zero`, a page that reads all
    /// zero is not written: the memfd's page there is still a hole, which reads zero (only right
    /// where nothing was written to the memfd before). Returns the pages written.
    pub fn copy_pages_to_memfd(
        &self,
        i: usize,
        pages: impl Iterator<Item = u64>,
        skip_zero: bool,
    ) -> Result<u64, MemoryError> {
        const BATCH: usize = 64;
        let r = *self.regions.get(i).ok_or(MemoryError::OutOfRange { gpa: 0, len: 0 })?;
        let npages = r.size / PAGE_SIZE;
        let ps = PAGE_SIZE as usize;
        let mut buf = vec![0u8; BATCH * ps];
        let mut written = 0u64;
        // A run of consecutive pages in `buf`: (first page, pages).
        let mut run: Option<(u64, usize)> = None;
        let flush = |buf: &[u8], (first, n): (u64, usize)| -> Result<(), MemoryError> {
            let off = r.file_offset + first * PAGE_SIZE;
            std::os::unix::fs::FileExt::write_all_at(&self.memfd, &buf[..n * ps], off)
                .map_err(|source| MemoryError::CopyToMemfd { region: i, page: first, source })
        };
        for page in pages.filter(|&p| p < npages) {
            let slot = match run {
                Some((f, n)) if f + n as u64 == page && n < BATCH => n,
                Some(prev) => {
                    flush(&buf, prev)?;
                    run = None;
                    0
                }
                None => 0,
            };
            let dst = &mut buf[slot * ps..(slot + 1) * ps];
            match self.copy_out(r.gpa + page * PAGE_SIZE, dst) {
                Ok(()) => {}
                // Broken: never copied (it is in the broken set now, if it was not before).
                Err(MemoryError::Poisoned { .. }) => {
                    if let Some(prev) = run.take() {
                        flush(&buf, prev)?;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            if skip_zero && dst.iter().all(|&b| b == 0) {
                if let Some(prev) = run.take() {
                    flush(&buf, prev)?;
                }
                continue;
            }
            written += 1;
            run = Some(match run {
                Some((f, n)) => (f, n + 1),
                None => (page, 1),
            });
        }
        if let Some(prev) = run {
            flush(&buf, prev)?;
        }
        Ok(written)
    }

    /// Drops whatever region `i`'s pages hold in the memfd (a move into it that failed part
    /// way: the next one starts again from holes, which its first round relies on).
    pub fn forget_memfd_copy(&self, i: usize) -> Result<(), MemoryError> {
        let r = *self.regions.get(i).ok_or(MemoryError::OutOfRange { gpa: 0, len: 0 })?;
        punch_hole(&self.memfd, r.file_offset, r.size).map_err(|source| MemoryError::Punch { gpa: r.gpa, source })
    }

    /// Maps the memfd back over region `i` (shared, at the same host address, so KVM's slot and
    /// every device's view stay valid): the region's RAM is the memfd's from then on. Only with
    /// the vCPUs paused and the devices quiesced, once every page that differs from the memfd
    /// was copied there ([`Self::copy_pages_to_memfd`]). The region's broken pages are broken
    /// again in the new mapping.
    pub fn map_memfd_back(&self, i: usize) -> Result<(), MemoryError> {
        let r = *self.regions.get(i).ok_or(MemoryError::OutOfRange { gpa: 0, len: 0 })?;
        // SAFETY: MAP_FIXED replaces exactly region i's own mapping [host_addr, +size), which
        // this GuestRam owns; the caller has paused every user of it, and KVM follows the new
        // pages by address (its MMU notifier drops the old ones).
        let p = unsafe {
            libc::mmap(
                r.host_addr as *mut libc::c_void,
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                self.memfd.as_raw_fd(),
                r.file_offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED || p as u64 != r.host_addr {
            return Err(MemoryError::MapFile { region: i, source: std::io::Error::last_os_error() });
        }
        self.memfd_backed[i].store(true, Ordering::Release);
        if let Ok(mut m) = self.mapped_files.lock() {
            m[i] = None;
        }
        let (first, last) = (r.gpa / PAGE_SIZE, (r.gpa + r.size) / PAGE_SIZE - 1);
        if self.poison.any_in(first, last) {
            for (gfn, _) in self.poison.list().into_iter().filter(|(g, _)| (first..=last).contains(g)) {
                self.poison_host_page(gfn * PAGE_SIZE, None)?;
            }
        }
        Ok(())
    }

    /// Region index and page index within it of a guest-physical address.
    pub fn page_location(&self, gpa: u64) -> Option<(usize, u64)> {
        self.regions
            .iter()
            .position(|r| gpa >= r.gpa && gpa < r.gpa + r.size)
            .map(|i| (i, (gpa - self.regions[i].gpa) / PAGE_SIZE))
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RAM regions.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The vm-memory view (for loaders).
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The backing memfd.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Raw fd of the memfd.
    pub fn memfd_raw(&self) -> i32 {
        self.memfd.as_raw_fd()
    }

    /// Copies guest memory out.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem.read_slice(buf, GuestAddress(gpa)).map_err(|_| MemoryError::OutOfRange { gpa, len: buf.len() as u64 })
    }

    /// Writes into guest memory. Ferry's own writes are not seen by KVM's dirty log: callers on a
    /// migration path must report them to the dirty log themselves.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.mem.write_slice(buf, GuestAddress(gpa)).map_err(|_| MemoryError::OutOfRange { gpa, len: buf.len() as u64 })
    }

    /// Copies guest memory out while the guest may be running and writing it (migration and
    /// snapshot passes): a plain memcpy through raw pointers, never a Rust reference to the
    /// guest's bytes. A copy torn by a concurrent guest write is harmless to its callers: that
    /// write marks the page dirty again and the page is copied again later. `read` is the
    /// checked, volatile copy; this one runs at memcpy speed for the hot path.
    ///
    /// A page in the poison set is not read ([`MemoryError::Poisoned`]); a page that breaks
    /// while it is copied (the copy faults) is added to the set, and the copy fails the same
    /// way instead of killing Ferry (`poison::copy_recoverable`).
    pub fn copy_out(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = buf.len();
        // SAFETY: `host` is the start of [gpa, gpa+len), which `guarded` checked lies in one
        // live RAM mapping owned by self; `buf` is a distinct, exclusively borrowed allocation
        // of len bytes.
        self.guarded(gpa, len, |host| unsafe { crate::poison::copy_recoverable(buf.as_mut_ptr(), host, len) })
    }

    /// Writes into guest memory on Ferry's behalf, never into a broken page: one in the set is
    /// refused, and one that breaks under the write is recovered from and marked, like
    /// [`GuestRam::copy_out`]. (Ferry's own writes are not in KVM's dirty log: see `write`.)
    pub fn copy_in(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        // SAFETY: as in copy_out, with `data` the source.
        self.guarded(gpa, data.len(), |host| unsafe {
            crate::poison::copy_recoverable(host, data.as_ptr(), data.len())
        })
    }

    /// Runs a recoverable copy `op` on the host address of `[gpa, gpa+len)`, unless a page of it
    /// is broken; a fault in the copy marks its page broken. Both are [`MemoryError::Poisoned`].
    fn guarded(&self, gpa: u64, len: usize, op: impl FnOnce(*mut u8) -> Result<(), u64>) -> Result<(), MemoryError> {
        let host = self.host_ptr(gpa, len as u64)?;
        self.take_async_reports();
        let first = gpa / PAGE_SIZE;
        let last = (gpa + len.max(1) as u64 - 1) / PAGE_SIZE;
        if let Some(g) = (first..=last).find(|&g| self.poison.contains(g)) {
            return Err(MemoryError::Poisoned { gpa: g * PAGE_SIZE });
        }
        op(host).map_err(|hva| {
            let gpa = self.gpa_of_hva(hva).unwrap_or(gpa) & !(PAGE_SIZE - 1);
            self.poison.mark(gpa / PAGE_SIZE, PoisonCause::CopyFault);
            MemoryError::Poisoned { gpa }
        })
    }

    /// The broken pages.
    pub fn poison(&self) -> &std::sync::Arc<PoisonSet> {
        &self.poison
    }

    /// Whether the page holding `gpa` is broken.
    pub fn is_poisoned(&self, gpa: u64) -> bool {
        self.take_async_reports();
        self.poison.contains(gpa / PAGE_SIZE)
    }

    /// Marks the pages the kernel reported broken in the background (SIGBUS `BUS_MCEERR_AO`).
    fn take_async_reports(&self) {
        for hva in crate::poison::take_async_faults() {
            if let Some(gpa) = self.gpa_of_hva(hva) {
                self.poison.mark(gpa / PAGE_SIZE, PoisonCause::HostReport);
            }
        }
    }

    /// The guest-physical address Ferry maps at host address `hva`, if it is guest RAM.
    pub fn gpa_of_hva(&self, hva: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| hva >= r.host_addr && hva < r.host_addr + r.size)
            .map(|r| r.gpa + (hva - r.host_addr))
    }

    /// Breaks the page holding `gpa` for real (tests, `ferry debug poison`; and the
    /// destination of a stream that says the page is broken): its contents are dropped from
    /// Ferry's mapping and a poison marker put there with `UFFDIO_POISON`, so that a vCPU
    /// touching it gets what hardware poison gives (SIGBUS `BUS_MCEERR_AR`, turned into a
    /// machine check for the guest) and no stale data is ever read. `uffd` is a userfaultfd
    /// whose registered ranges hold the page (the incoming side's); without one, a new one is
    /// registered on that page alone. This does not touch the poison set.
    pub fn poison_host_page(&self, gpa: u64, uffd: Option<&crate::uffd::Uffd>) -> Result<(), MemoryError> {
        let page = gpa & !(PAGE_SIZE - 1);
        let hva = self.host_ptr(page, PAGE_SIZE)? as u64;
        if let Some((ri, _)) = self.page_location(page) {
            if !self.memfd_backs(ri) {
                // A snapshot file mapped copy-on-write: userfaultfd cannot poison a regular
                // file's page. An anonymous page in its place can (the page's data is dropped,
                // which is the point).
                // SAFETY: MAP_FIXED over one page of a mapping Ferry made and owns; nothing
                // holds references into that page, and KVM follows the new page by address.
                let p = unsafe {
                    libc::mmap(
                        hva as *mut libc::c_void,
                        PAGE_SIZE as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(MemoryError::MapFile { region: ri, source: std::io::Error::last_os_error() });
                }
            }
        }
        let own;
        let u = match uffd {
            Some(u) => u,
            None => {
                let mut u = crate::uffd::Uffd::new().map_err(|source| MemoryError::Poison { gpa: page, source })?;
                u.register(hva, PAGE_SIZE).map_err(|source| MemoryError::Poison { gpa: page, source })?;
                own = u;
                &own
            }
        };
        if !u.can_poison() {
            // A kernel without UFFDIO_POISON: real hardware poisoning, where the kernel has
            // CONFIG_MEMORY_FAILURE (it poisons the physical page for every mapping).
            // SAFETY: MADV_HWPOISON on one page of guest RAM that Ferry mapped; the kernel marks
            // the page poisoned, which is what was asked.
            let rc = unsafe { libc::madvise(hva as *mut libc::c_void, PAGE_SIZE as usize, libc::MADV_HWPOISON) };
            return if rc == 0 { Ok(()) } else { Err(MemoryError::NoPoison { gpa: page }) };
        }
        // Drop the page from this mapping (a memfd keeps its data in the page cache: the
        // marker goes in this mapping's page table, which is the one KVM uses), then put the
        // marker there. A vCPU touching the page in between maps it again: try again.
        for _ in 0..100 {
            // SAFETY: MADV_DONTNEED on one page of guest RAM that Ferry mapped; it drops the
            // page-table entry only.
            unsafe { libc::madvise(hva as *mut libc::c_void, PAGE_SIZE as usize, libc::MADV_DONTNEED) };
            if u.poison(hva).map_err(|source| MemoryError::Poison { gpa: page, source })? {
                return Ok(());
            }
        }
        Err(MemoryError::Poison {
            gpa: page,
            source: crate::uffd::UffdError::Ioctl {
                what: "poison (the page kept being mapped again)",
                source: std::io::Error::from_raw_os_error(libc::EEXIST),
            },
        })
    }

    /// Drops the data of the pages `[gpa, gpa+len)` (page aligned, one memfd-backed region)
    /// from the memfd: they read as missing again (a registered userfaultfd sees a fault
    /// there), as zero otherwise. The post-copy destination does this to pages whose data it
    /// got before the source's guest changed them again.
    pub fn punch(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let (ri, page) = self.page_location(gpa).ok_or(MemoryError::OutOfRange { gpa, len })?;
        let r = self.regions[ri];
        if !gpa.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || page * PAGE_SIZE + len > r.size
            || !self.memfd_backs(ri)
        {
            return Err(MemoryError::OutOfRange { gpa, len });
        }
        // Frees those pages of the memfd and unmaps them from every mapping (KVM follows
        // through its MMU notifier).
        punch_hole(&self.memfd, r.file_offset + page * PAGE_SIZE, len)
            .map_err(|source| MemoryError::Punch { gpa, source })
    }

    /// Host address of a guest-physical page range, if it lies inside one region.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        for r in &self.regions {
            if gpa >= r.gpa && gpa.saturating_add(len) <= r.gpa + r.size {
                return Ok((r.host_addr + (gpa - r.gpa)) as *mut u8);
            }
        }
        Err(MemoryError::OutOfRange { gpa, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages_of(bits: &Bitmap) -> Vec<u64> {
        bits.iter_set().collect()
    }

    #[test]
    fn data_pages_reports_written_pages_and_skips_holes() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let r = ram.regions()[0];
        for (page, byte) in [(0u64, 1u8), (5, 7), (63, 9), (64, 0), (200, 3), (1023, 4)] {
            // A page written with zeros still holds data (the memfd allocated it).
            ram.write(r.gpa + page * PAGE_SIZE, &[byte; 8]).unwrap();
        }
        // A page written through the memfd, not the mapping: in the page cache, not mapped.
        // SAFETY: pwrite of 8 bytes from a live buffer into the memfd this test owns.
        let n = unsafe { libc::pwrite(ram.memfd_raw(), [1u8; 8].as_ptr().cast(), 8, (700 * PAGE_SIZE) as i64) };
        assert_eq!(n, 8);
        assert_eq!(pages_of(&ram.data_pages(0, 0, 1024).unwrap()), vec![0, 5, 63, 64, 200, 700, 1023]);
        // A sub-range: bit k is page first + k.
        assert_eq!(pages_of(&ram.data_pages(0, 60, 10).unwrap()), vec![3, 4]);
        assert_eq!(pages_of(&ram.data_pages(0, 201, 400).unwrap()), Vec::<u64>::new());
        assert!(ram.data_pages(0, 1000, 100).is_err(), "a range past the region is refused");
    }

    /// A region mapped from a (sparse) file moves into the memfd: only the file's data and the
    /// pages written since the mapping are copied, zero pages stay holes, and after the remap
    /// the region reads the same and the file never saw the guest's writes.
    #[test]
    fn a_file_mapped_region_moves_into_the_memfd_with_every_page_it_holds() {
        let path = std::env::temp_dir().join(format!("ferry-memfd-move-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        file.set_len(4 << 20).unwrap();
        for (page, byte) in [(3u64, 0x33u8), (100, 0x64)] {
            std::os::unix::fs::FileExt::write_all_at(&file, &[byte; 4096], page * PAGE_SIZE).unwrap();
        }
        let mut ram = GuestRam::new(4 << 20).unwrap();
        ram.map_file_private(0, &file, 0).unwrap();
        assert!(!ram.memfd_backs(0));
        let gpa = ram.regions()[0].gpa;
        // The guest writes a page that was a hole and one that was data (copy-on-write), and
        // reads one that was a hole (mapped from the file, still zero).
        ram.write(gpa + 10 * PAGE_SIZE, &[0x10; 16]).unwrap();
        ram.write(gpa + 100 * PAGE_SIZE, &[0x99; 16]).unwrap();
        let mut b = [0u8; 16];
        ram.read(gpa + 50 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0; 16]);

        // A hole read through a private mapping may map the shared zero page, which pagemap
        // does not call the file's: such a page may be listed, and reads zero (not copied).
        let content = ram.content_pages(0).unwrap();
        let listed = pages_of(&content);
        assert!([3, 10, 100].iter().all(|p| listed.contains(p)), "{listed:?}");
        assert!(listed.iter().all(|p| [3, 10, 50, 100].contains(p)), "{listed:?}");
        // A move that fails part way leaves holes behind for the next one.
        assert_eq!(ram.copy_pages_to_memfd(0, content.iter_set(), true).unwrap(), 3);
        ram.forget_memfd_copy(0).unwrap();
        let mut m = [0u8; 16];
        std::os::unix::fs::FileExt::read_exact_at(ram.memfd(), &mut m, 3 * PAGE_SIZE).unwrap();
        assert_eq!(m, [0; 16], "the failed move's copy is still in the memfd");
        assert_eq!(ram.copy_pages_to_memfd(0, content.iter_set(), true).unwrap(), 3);
        ram.map_memfd_back(0).unwrap();

        assert!(ram.memfd_backs(0));
        assert_eq!(pages_of(&ram.data_pages(0, 0, 1024).unwrap()), vec![3, 10, 100]);
        // Memfd-backed now: its content is the memfd's data (before anything reads a hole,
        // which would allocate it).
        assert_eq!(pages_of(&ram.content_pages(0).unwrap()), vec![3, 10, 100]);
        for (page, want) in [(3u64, 0x33u8), (10, 0x10), (100, 0x99), (50, 0)] {
            ram.read(gpa + page * PAGE_SIZE, &mut b).unwrap();
            assert_eq!(b, [want; 16], "page {page}");
        }
        let mut f = [0u8; 16];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut f, 10 * PAGE_SIZE).unwrap();
        assert_eq!(f, [0; 16], "the guest's write reached the snapshot file");
    }

    #[test]
    fn data_pages_counts_swapped_out_pages_as_data() {
        let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
        if swaps.lines().count() < 2 {
            eprintln!("SKIPPED: no swap is active on this host, so no page can be swapped out to test with");
            return;
        }
        let ram = GuestRam::new(4 << 20).unwrap();
        let r = ram.regions()[0];
        for page in 0..512u64 {
            ram.write(r.gpa + page * PAGE_SIZE, &[0xa5; 16]).unwrap();
        }
        // SAFETY: MADV_PAGEOUT over the first 2 MiB of this test's own mapping; it only asks
        // the kernel to reclaim the pages (their contents stay).
        let rc = unsafe { libc::madvise(r.host_addr as *mut libc::c_void, 2 << 20, libc::MADV_PAGEOUT) };
        assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
        let mut resident = vec![0u8; 512];
        // SAFETY: the same 2 MiB, one byte per page.
        unsafe { libc::mincore(r.host_addr as *mut libc::c_void, 2 << 20, resident.as_mut_ptr()) };
        let out = resident.iter().filter(|&&b| b & 1 == 0).count();
        if out == 0 {
            eprintln!("SKIPPED: MADV_PAGEOUT moved no page to swap here");
            return;
        }
        eprintln!("{out} of 512 written pages are swapped out");
        assert_eq!(pages_of(&ram.data_pages(0, 0, 1024).unwrap()), (0..512).collect::<Vec<_>>());
    }
}
