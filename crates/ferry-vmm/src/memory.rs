//! Guest RAM: one `memfd` mapped shared into Ferry and registered with KVM as user memory slots.
//!
//! The memfd is what later lets another process (a live update) take the guest's memory over
//! without copying. The layout leaves a hole below 4 GiB for MMIO (local APIC, IOAPIC, virtio):
//! RAM is `[0, min(size, 3 GiB))` and the rest, if any, starts at 4 GiB.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;

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
    #[error("guest address range {gpa:#x}+{len:#x} is not RAM")]
    OutOfRange { gpa: u64, len: u64 },
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
    memfd_backed: Vec<bool>,
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
        let memfd_backed = vec![true; regions.len()];
        Ok(GuestRam { mem, regions, memfd, size, memfd_backed })
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
        self.memfd_backed.get(i).copied().unwrap_or(false)
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
        self.memfd_backed[i] = false;
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
    pub fn copy_out(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let src = self.host_ptr(gpa, buf.len() as u64)?;
        // SAFETY: host_ptr checked that [src, src+len) lies in one live RAM mapping owned by
        // self; `buf` is a distinct, exclusively borrowed allocation of len bytes.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
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
