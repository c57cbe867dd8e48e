//! KVM ioctls that kvm-ioctls 0.25 lacks, wrapped once, with kvm-bindings' structs.

use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_x86_mce, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_MCE,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use crate::dirty_log::{DirtyLogError, DirtySource};

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_iow_nr!(KVM_X86_SETUP_MCE, KVMIO, 0x9c, u64);
ioctl_iow_nr!(KVM_X86_SET_MCE, KVMIO, 0x9e, kvm_x86_mce);

/// Machine-check banks Ferry gives a guest (QEMU's default too), if KVM has that many.
pub const MCE_BANKS: u64 = 10;
/// MCG_CAP: MCG_CTL present.
const MCG_CTL_P: u64 = 1 << 8;
/// MCG_CAP: software error recovery (SRAR/SRAO) supported.
const MCG_SER_P: u64 = 1 << 24;

/// Machine-check banks KVM can give a vCPU (0: no machine-check support).
pub fn mce_banks(vm: &VmFd) -> u64 {
    vm.check_extension_raw(KVM_CAP_MCE as _).max(0) as u64
}

/// The MCG_CAP Ferry gives the vCPUs of `vm`: [`MCE_BANKS`] banks (fewer if KVM has fewer),
/// MCG_CTL and software error recovery; 0 where KVM has no machine-check support (the guest
/// then gets no #MC, and a broken page it touches stops the machine).
pub fn mcg_cap(vm: &VmFd) -> u64 {
    match mce_banks(vm).min(MCE_BANKS) {
        0 => 0,
        banks => banks | MCG_CTL_P | MCG_SER_P,
    }
}

/// Gives a new vCPU its machine-check architecture ([`mcg_cap`]). Returns the MCG_CAP set.
pub fn setup_mce(vm: &VmFd, vcpu: &VcpuFd) -> Result<u64, kvm_ioctls::Error> {
    let cap = mcg_cap(vm);
    if cap == 0 {
        return Ok(0);
    }
    // SAFETY: KVM_X86_SETUP_MCE reads one u64 from the pointer, which lives across the call.
    let r = unsafe { ioctl_with_ref(vcpu, KVM_X86_SETUP_MCE(), &cap) };
    if r < 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(cap)
}

/// An uncorrected, action-required memory error at guest-physical `gpa` (the SRAR data-load
/// error a real CPU raises on touching poisoned memory), reported in the vCPU's last bank.
pub fn inject_srar(vcpu: &VcpuFd, mcg_cap: u64, gpa: u64) -> Result<(), kvm_ioctls::Error> {
    let banks = mcg_cap & 0xff;
    let mce = kvm_x86_mce {
        // VAL | UC | EN | MISCV | ADDRV | S | AR, MCA code 0x134 (data load, memory).
        status: 0xbd80_0000_0000_0134,
        addr: gpa & !0xfff,
        // Physical address, least significant valid bit 12.
        misc: 0x8c,
        // RIPV | EIPV | MCIP.
        mcg_status: 7,
        bank: banks.saturating_sub(1) as u8,
        ..Default::default()
    };
    // SAFETY: KVM_X86_SET_MCE reads one kvm_x86_mce from the pointer, which lives across the
    // call.
    let r = unsafe { ioctl_with_ref(vcpu, KVM_X86_SET_MCE(), &mce) };
    if r < 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(())
}

/// The manual-protect flags KVM offers (0 if none).
pub fn manual_protect_flags(vm: &VmFd) -> u32 {
    vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as _).max(0) as u32
}

/// Enables manual dirty-log protection (with "initially set" where offered). Returns the flags
/// enabled.
pub fn enable_manual_protect(vm: &VmFd) -> Result<u32, kvm_ioctls::Error> {
    let offered = manual_protect_flags(vm);
    let want = offered & (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
    if want & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
        return Ok(0);
    }
    let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
    cap.args[0] = want as u64;
    vm.enable_cap(&cap)?;
    Ok(want)
}

/// KVM's dirty log of a VM, seen through [`DirtySource`]. Without manual protect,
/// `KVM_GET_DIRTY_LOG` already clears and re-protects, so there is nothing left to clear.
pub struct KvmDirty<'a> {
    pub vm: &'a VmFd,
    pub manual_protect: bool,
}

impl DirtySource for KvmDirty<'_> {
    fn get_dirty_log(&self, slot: u32, npages: u64) -> Result<Vec<u64>, DirtyLogError> {
        self.vm
            .get_dirty_log(slot, (npages * 4096) as usize)
            .map_err(|e| DirtyLogError::Get { slot, source: std::io::Error::from_raw_os_error(e.errno()) })
    }

    fn clear_dirty_log(&self, slot: u32, first_page: u64, num_pages: u64, bitmap: &[u64]) -> Result<(), DirtyLogError> {
        if !self.manual_protect {
            return Ok(());
        }
        let mut arg = kvm_clear_dirty_log { slot, num_pages: num_pages as u32, first_page, ..Default::default() };
        arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
        // SAFETY: the VM fd is valid; `arg` points to a bitmap of at least num_pages bits that
        // lives across the call; KVM only reads it.
        let ret = unsafe { ioctl_with_ref(&RawVm(self.vm.as_raw_fd()), KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(DirtyLogError::Clear {
                slot,
                first: first_page,
                count: num_pages,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn protects_on_get(&self) -> bool {
        !self.manual_protect
    }
}

struct RawVm(i32);
impl AsRawFd for RawVm {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}
