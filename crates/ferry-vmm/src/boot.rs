//! PVH boot: load an ELF kernel with an `XEN_ELFNOTE_PHYS32_ENTRY` note, write `hvm_start_info`
//! (memory map and command line) and put the boot vCPU at the 32-bit entry point, as the PVH
//! spec (xenbits `docs/misc/pvh.pandoc`) asks and as QEMU's `-kernel` does for such images.
//!
//! Low memory used by the loader: start info at 0x6000, memory map at 0x7000, command line at
//! 0x20000. The guest owns everything else.

use std::fs::File;
use std::io::{Cursor, Read};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::GuestAddress;

use crate::memory::{GuestRam, MMIO_HOLE_END};

const START_INFO_ADDR: u64 = 0x6000;
const MEMMAP_ADDR: u64 = 0x7000;
const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line Ferry passes (bytes, without the NUL).
pub const CMDLINE_MAX: usize = 4095;
const HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// End of conventional low memory (the EBDA/VGA area above it is reserved on a PC).
const LOW_RAM_END: u64 = 0xA_0000;
const HIGH_RAM_START: u64 = 0x10_0000;

/// Errors of kernel loading.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read the kernel image")]
    Read(#[source] std::io::Error),
    #[error("kernel image is not an ELF file")]
    NotElf,
    #[error("cannot load the ELF kernel into guest memory (is guest memory large enough?)")]
    Load(#[source] linux_loader::loader::Error),
    #[error("ELF kernel has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY note): Ferry boots PVH kernels only")]
    NoPvhNote,
    #[error("kernel command line is {0} bytes long, the limit is {CMDLINE_MAX}")]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write the PVH start info into guest memory")]
    StartInfo(#[source] linux_loader::configurator::Error),
    #[error("cannot write the command line into guest memory")]
    Cmdline(#[source] crate::memory::MemoryError),
    #[error("cannot set initial register state of the boot vCPU")]
    Regs(#[source] kvm_ioctls::Error),
}

/// Where the kernel starts.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// 32-bit PVH entry point.
    pub entry: u64,
    /// Guest-physical address of `hvm_start_info` (passed in ebx).
    pub start_info: u64,
}

/// Loads `image` (an ELF with a PVH note) and writes the start info. The image bytes come from a
/// file or from the embedded guest.
pub fn load_pvh(ram: &GuestRam, image: &[u8], cmdline: &str) -> Result<BootEntry, BootError> {
    if image.len() < 4 || &image[..4] != b"\x7fELF" {
        return Err(BootError::NotElf);
    }
    if cmdline.len() > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut cursor = Cursor::new(image);
    let loaded =
        Elf::load(ram.mem(), None, &mut cursor, Some(GuestAddress(HIGH_RAM_START))).map_err(BootError::Load)?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => a.0,
        _ => return Err(BootError::NoPvhNote),
    };

    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    ram.write(CMDLINE_ADDR, &c).map_err(BootError::Cmdline)?;

    let memmap = memory_map(ram);
    let start_info = hvm_start_info {
        magic: HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams(&params, ram.mem()).map_err(BootError::StartInfo)?;
    Ok(BootEntry { entry, start_info: START_INFO_ADDR })
}

/// Reads a kernel image file.
pub fn read_image(path: &std::path::Path) -> Result<Vec<u8>, BootError> {
    let mut v = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut v)).map_err(BootError::Read)?;
    Ok(v)
}

/// The E820-style memory map the guest sees.
pub fn memory_map(ram: &GuestRam) -> Vec<hvm_memmap_table_entry> {
    let e = |addr, size, type_| hvm_memmap_table_entry { addr, size, type_, reserved: 0 };
    let mut v = vec![e(0, LOW_RAM_END, E820_RAM), e(LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, E820_RESERVED)];
    for r in ram.regions() {
        let start = r.gpa.max(HIGH_RAM_START);
        let end = r.gpa + r.size;
        if end > start {
            v.push(e(start, end - start, E820_RAM));
        }
    }
    debug_assert!(v.iter().all(|x| x.addr < 3 << 30 || x.addr >= MMIO_HOLE_END));
    v
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the boot vCPU at the PVH entry: 32-bit protected mode, paging off, flat segments,
/// ebx = start info.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: &BootEntry) -> Result<(), BootError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(BootError::Regs)?;
    sregs.cs = flat_segment(0x08, 0xb);
    let data = flat_segment(0x10, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment { base: 0, limit: 0x67, selector: 0x18, type_: 0xb, present: 1, s: 0, g: 0, db: 0, ..data };
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(BootError::Regs)?;
    let regs = kvm_regs { rflags: 0x2, rip: entry.entry, rbx: entry.start_info, ..Default::default() };
    vcpu.set_regs(&regs).map_err(BootError::Regs)?;
    Ok(())
}

/// What every vCPU gets at power-on besides KVM's reset state: FPU control words, the boot MSRs
/// and the local APIC's LINT pins (ExtINT and NMI), as on a PC.
pub fn setup_vcpu_common(vcpu: &VcpuFd) -> Result<(), BootError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(BootError::Regs)?;
    let entries = [
        (0x174u32, 0u64),       // IA32_SYSENTER_CS
        (0x175, 0),             // IA32_SYSENTER_ESP
        (0x176, 0),             // IA32_SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0082, 0),       // LSTAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ];
    let list: Vec<kvm_msr_entry> =
        entries.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    if let Ok(msrs) = Msrs::from_entries(&list) {
        // Hosts may refuse some of these (e.g. MTRRs); what they take is enough to boot.
        let _ = vcpu.set_msrs(&msrs);
    }
    let mut lapic = vcpu.get_lapic().map_err(BootError::Regs)?;
    set_lapic_reg(&mut lapic, 0x350, 0x700); // LVT LINT0: ExtINT
    set_lapic_reg(&mut lapic, 0x360, 0x400); // LVT LINT1: NMI
    vcpu.set_lapic(&lapic).map_err(BootError::Regs)?;
    Ok(())
}

fn set_lapic_reg(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}
