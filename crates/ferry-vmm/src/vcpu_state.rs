//! Everything KVM holds for one vCPU, saved as a section and restored by construction order.
//!
//! Save order (as Firecracker): MP state first (`KVM_GET_MP_STATE` may accept pending LAPIC
//! events and so change other state), then events, registers, FPU/XSAVE, XCRs, debug registers,
//! LAPIC, MSRs. Restore order: MP state, regs, sregs (CR4/EFER/APIC base before anything that
//! depends on them), XSAVE, XCRs, debug registers, LAPIC (after the APIC base), MSRs (TSC and
//! kvmclock after the mode is set), vCPU events last (pending exceptions and NMIs apply to the
//! final state).

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, kvm_xsave2, Msrs, Xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vmm_sys_util::fam::FamStruct;

use crate::cpu::LEGACY_XSAVE_SIZE;
use crate::persist::{Persist, SectionState};
use crate::state_codec::{Decoder, Encoder, StateCodecError};

/// Version of the vCPU state section this Ferry writes. Version 2: the XSAVE area has the size
/// KVM_CAP_XSAVE2 gives (at least 4096 bytes); version 1 held the legacy 4096-byte area only.
pub const VCPU_STATE_VERSION: u32 = 2;

/// Most bytes of XSAVE state accepted (the architectural maximum is about 11 KiB today, more
/// with AMX tiles).
const MAX_XSAVE_BYTES: usize = 64 << 10;

const TAG_MP_STATE: u32 = 1;
const TAG_REGS: u32 = 2;
const TAG_SREGS: u32 = 3;
const TAG_FPU: u32 = 4;
const TAG_XSAVE: u32 = 5;
const TAG_XCRS: u32 = 6;
const TAG_DEBUGREGS: u32 = 7;
const TAG_LAPIC: u32 = 8;
const TAG_MSRS: u32 = 9;
const TAG_EVENTS: u32 = 10;

/// Errors of vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("KVM cannot {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM read {got} of {want} MSRs (first missing: {missing:#x})")]
    MsrsShort { got: usize, want: usize, missing: u32 },
    #[error("KVM accepted {got} of {want} MSRs (refused: {refused:#x})")]
    MsrsRefused { got: usize, want: usize, refused: u32 },
    #[error("too many MSRs for one call")]
    MsrList,
    #[error("malformed vCPU state section")]
    Codec(#[from] StateCodecError),
    #[error("vCPU state section lists {0} MSR bytes, not a multiple of 16")]
    MsrBytes(usize),
    #[error("the XSAVE area is {0} bytes: a version {1} section holds {2}")]
    XsaveBytes(usize, u32, &'static str),
    #[error("the host's CPU facts")]
    Host(#[source] Box<crate::cpu::CpuModelError>),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// The complete state of one vCPU.
#[derive(Clone)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    /// The XSAVE area (KVM_GET_XSAVE2's size; 4096 bytes where the kernel lacks it).
    pub xsave: Vec<u8>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState").field("rip", &self.regs.rip).field("msrs", &self.msrs.len()).finish()
    }
}

impl PartialEq for VcpuState {
    fn eq(&self, o: &Self) -> bool {
        self.encode() == o.encode()
    }
}

/// Architectural and paravirtual MSRs Ferry migrates, when KVM offers them.
const CANDIDATE_MSRS: &[u32] = &[
    0x10, // IA32_TSC
    0x3b, // IA32_TSC_ADJUST
    0x174,
    0x175,
    0x176, // SYSENTER_CS/ESP/EIP
    0x17a,
    0x17b, // MCG_STATUS, MCG_CTL
    0x1a0, // IA32_MISC_ENABLE
    0x277, // IA32_PAT
    0x2ff, // MTRRdefType
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207,
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f, // variable MTRRs
    0x250,
    0x258,
    0x259,
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f, // fixed MTRRs
    0x6e0, // TSC_DEADLINE
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084, // STAR, LSTAR, CSTAR, SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x11,
    0x12, // KVM legacy wall clock / system time
    0x4b56_4d00,
    0x4b56_4d01,
    0x4b56_4d02,
    0x4b56_4d03,
    0x4b56_4d04,
    0x4b56_4d05,
    0x4b56_4d06, // KVM PV MSRs
];

/// The candidate MSRs KVM lists and can read back on `scratch` (a vCPU that is not running).
pub fn probe_msrs(kvm_sys: &Kvm, scratch: &VcpuFd) -> Result<Vec<u32>, VcpuStateError> {
    let listed = kvm_sys.get_msr_index_list().map_err(kvm("list its MSRs"))?;
    let listed = listed.as_slice();
    let mut keep = Vec::new();
    for &idx in CANDIDATE_MSRS.iter().filter(|i| listed.contains(i)) {
        let mut m = Msrs::from_entries(&[kvm_msr_entry { index: idx, ..Default::default() }])
            .map_err(|_| VcpuStateError::MsrList)?;
        if scratch.get_msrs(&mut m) == Ok(1) {
            keep.push(idx);
        }
    }
    Ok(keep)
}

/// The MSRs to migrate on this host (probed once per process).
pub fn msrs_to_save(kvm_sys: &Kvm) -> Result<Vec<u32>, VcpuStateError> {
    Ok(crate::cpu::host_facts(kvm_sys).map_err(|e| VcpuStateError::Host(Box::new(e)))?.msrs.clone())
}

/// An XSAVE area of `bytes` for KVM_GET/SET_XSAVE2.
fn xsave2_buffer(bytes: usize) -> Result<Xsave, VcpuStateError> {
    let extra = bytes.saturating_sub(std::mem::size_of::<kvm_xsave>());
    let n = extra.div_ceil(std::mem::size_of::<<kvm_xsave2 as FamStruct>::Entry>());
    Xsave::new(n).map_err(|_| VcpuStateError::XsaveBytes(bytes, VCPU_STATE_VERSION, "at most 64 KiB"))
}

impl VcpuState {
    /// Saves the state of a vCPU that is not running; `xsave_size` is the VM's XSAVE size
    /// (`cpu::xsave_size`).
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32], xsave_size: u32) -> Result<Self, VcpuStateError> {
        let mp_state = vcpu.get_mp_state().map_err(kvm("read the MP state"))?;
        let mut events = vcpu.get_vcpu_events().map_err(kvm("read vCPU events"))?;
        // Without KVM_CAP_EXCEPTION_PAYLOAD KVM reports a pending exception as injected as well,
        // and drops `pending` when the events are set back (no KVM_VCPUEVENT_VALID_PAYLOAD): the
        // injected bit carries the exception. Saved as it restores, so that a restored guest
        // saves the same state (a snapshot caught a vCPU with a #UD pending: its restored copy
        // saved it injected only, and the state no longer compared equal).
        if events.flags & kvm_bindings::KVM_VCPUEVENT_VALID_PAYLOAD == 0 && events.exception.injected != 0 {
            events.exception.pending = 0;
        }
        let regs = vcpu.get_regs().map_err(kvm("read registers"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("read special registers"))?;
        let fpu = vcpu.get_fpu().map_err(kvm("read the FPU"))?;
        let xsave: Vec<u8> = if xsave_size > LEGACY_XSAVE_SIZE {
            let mut x = xsave2_buffer(xsave_size as usize)?;
            // SAFETY: `x` was allocated with the size KVM_CAP_XSAVE2 reported for this VM, which
            // is what KVM_GET_XSAVE2 writes; Ferry enables no XSTATE feature with arch_prctl.
            unsafe { vcpu.get_xsave2(&mut x) }.map_err(kvm("read XSAVE state (XSAVE2)"))?;
            let fam = x.as_fam_struct_ref();
            let words = fam.xsave.region.iter().chain(x.as_slice().iter());
            words.flat_map(|w| w.to_le_bytes()).take(xsave_size as usize).collect()
        } else {
            let raw = vcpu.get_xsave().map_err(kvm("read XSAVE state"))?;
            raw.region.iter().flat_map(|w| w.to_le_bytes()).collect()
        };
        let xcrs = vcpu.get_xcrs().map_err(kvm("read XCRs"))?;
        let debugregs = vcpu.get_debug_regs().map_err(kvm("read debug registers"))?;
        let lapic = vcpu.get_lapic().map_err(kvm("read the LAPIC"))?;
        let entries: Vec<kvm_msr_entry> =
            msr_indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut m = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::MsrList)?;
        let n = vcpu.get_msrs(&mut m).map_err(kvm("read MSRs"))?;
        if n != entries.len() {
            return Err(VcpuStateError::MsrsShort { got: n, want: entries.len(), missing: entries[n].index });
        }
        let msrs = m.as_slice().iter().map(|e| (e.index, e.data)).collect();
        Ok(VcpuState { mp_state, regs, sregs, fpu, xsave, xcrs, debugregs, lapic, msrs, events })
    }

    /// Puts this state into a freshly created vCPU (its CPUID already set).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        vcpu.set_mp_state(self.mp_state).map_err(kvm("set the MP state"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("set registers"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("set special registers"))?;
        vcpu.set_fpu(&self.fpu).map_err(kvm("set the FPU"))?;
        let load = |x: &[u8], what: &'static str| match set_xsave(vcpu, x) {
            Ok(()) => Ok(()),
            Err(XsaveLoad::Size(e)) => Err(e),
            Err(XsaveLoad::Kvm(e)) => Err(kvm(what)(e)),
        };
        match set_xsave(vcpu, &self.xsave) {
            // KVM saves PKRU (XSAVE component 9) on a host with protection keys whether or not
            // the guest uses them, and a host without them refuses the component. With CR4.PKE
            // clear, PKRU has no effect on the guest: it is left out (an init PKRU) and the
            // state loads. A guest that uses protection keys is refused by the CPU model check
            // before its state gets here.
            Err(XsaveLoad::Kvm(e))
                if e.errno() == libc::EINVAL
                    && self.sregs.cr4 & CR4_PKE == 0
                    && xstate_bv(&self.xsave) & XFEATURE_PKRU != 0 =>
            {
                let mut x = self.xsave.clone();
                let bv = xstate_bv(&x) & !XFEATURE_PKRU;
                x[XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8].copy_from_slice(&bv.to_le_bytes());
                load(&x, "set XSAVE state (PKRU left out)")?;
            }
            Err(XsaveLoad::Size(e)) => return Err(e),
            Err(XsaveLoad::Kvm(e)) => return Err(kvm("set XSAVE state")(e)),
            Ok(()) => {}
        }
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("set XCRs"))?;
        vcpu.set_debug_regs(&self.debugregs).map_err(kvm("set debug registers"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("set the LAPIC"))?;
        let entries: Vec<kvm_msr_entry> =
            self.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let m = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::MsrList)?;
        let n = vcpu.set_msrs(&m).map_err(kvm("set MSRs"))?;
        if n != entries.len() {
            return Err(VcpuStateError::MsrsRefused { got: n, want: entries.len(), refused: entries[n].index });
        }
        vcpu.set_vcpu_events(&self.events).map_err(kvm("set vCPU events"))?;
        Ok(())
    }

    /// Reads a body of either version. Version 1 is upgraded explicitly: its XSAVE area is
    /// the legacy 4096 bytes, which is a valid version 2 area as it stands.
    fn decode_body(version: u32, b: &[u8]) -> Result<Self, VcpuStateError> {
        let mut d = Decoder::parse(b)?;
        let raw = d.require(TAG_MSRS)?;
        if raw.len() % 16 != 0 {
            return Err(VcpuStateError::MsrBytes(raw.len()));
        }
        let msrs = raw
            .chunks_exact(16)
            .map(|c| {
                let mut a = [0u8; 8];
                let mut v = [0u8; 8];
                a.copy_from_slice(&c[..8]);
                v.copy_from_slice(&c[8..]);
                (u64::from_le_bytes(a) as u32, u64::from_le_bytes(v))
            })
            .collect();
        let x = d.require(TAG_XSAVE)?;
        let xsave = match version {
            1 if x.len() != LEGACY_XSAVE_SIZE as usize => {
                return Err(VcpuStateError::XsaveBytes(x.len(), 1, "exactly 4096"));
            }
            1 => upgrade_v1_xsave(x),
            _ if x.len() < LEGACY_XSAVE_SIZE as usize || x.len() > MAX_XSAVE_BYTES || x.len() % 4 != 0 => {
                return Err(VcpuStateError::XsaveBytes(x.len(), version, "4096 to 65536, a multiple of 4"));
            }
            _ => x.to_vec(),
        };
        let s = VcpuState {
            mp_state: d.require_pod(TAG_MP_STATE)?,
            regs: d.require_pod(TAG_REGS)?,
            sregs: d.require_pod(TAG_SREGS)?,
            fpu: d.require_pod(TAG_FPU)?,
            xsave,
            xcrs: d.require_pod(TAG_XCRS)?,
            debugregs: d.require_pod(TAG_DEBUGREGS)?,
            lapic: d.require_pod(TAG_LAPIC)?,
            msrs,
            events: d.require_pod(TAG_EVENTS)?,
        };
        d.finish()?;
        Ok(s)
    }
}

/// Version 1 → 2: the legacy area is the first 4096 bytes of any XSAVE2 area, and KVM reads
/// the components beyond it only where XSTATE_BV says they are present.
fn upgrade_v1_xsave(legacy: &[u8]) -> Vec<u8> {
    legacy.to_vec()
}

impl SectionState for VcpuState {
    const NAME: &'static str = "vcpu";
    const VERSION: u32 = VCPU_STATE_VERSION;
    const READS: &'static [u32] = &[2, 1];
    type Error = VcpuStateError;

    fn encode(&self) -> Vec<u8> {
        let mut msrs = Vec::with_capacity(self.msrs.len() * 16);
        for &(i, v) in &self.msrs {
            msrs.extend_from_slice(&(i as u64).to_le_bytes());
            msrs.extend_from_slice(&v.to_le_bytes());
        }
        Encoder::new()
            .pod(TAG_MP_STATE, &self.mp_state)
            .pod(TAG_REGS, &self.regs)
            .pod(TAG_SREGS, &self.sregs)
            .pod(TAG_FPU, &self.fpu)
            .field(TAG_XSAVE, &self.xsave)
            .pod(TAG_XCRS, &self.xcrs)
            .pod(TAG_DEBUGREGS, &self.debugregs)
            .pod(TAG_LAPIC, &self.lapic)
            .field(TAG_MSRS, &msrs)
            .pod(TAG_EVENTS, &self.events)
            .finish()
    }

    fn decode(version: u32, body: &[u8]) -> Result<Self, VcpuStateError> {
        VcpuState::decode_body(version, body)
    }
}

/// A vCPU as KVM holds it, with what saving it needs.
pub struct KvmVcpu<'a> {
    pub fd: &'a VcpuFd,
    pub msrs: &'a [u32],
    pub xsave_size: u32,
}

impl<'a> Persist for KvmVcpu<'a> {
    type State = VcpuState;
    /// A freshly created vCPU with the guest's CPUID set, and the MSR list and XSAVE size.
    type ConstructorArgs<'b> = KvmVcpu<'a>;
    type Error = VcpuStateError;

    fn save(&self) -> Result<VcpuState, VcpuStateError> {
        VcpuState::save(self.fd, self.msrs, self.xsave_size)
    }

    fn restore(fresh: KvmVcpu<'a>, state: &VcpuState) -> Result<Self, VcpuStateError> {
        state.restore(fresh.fd)?;
        Ok(fresh)
    }
}

/// CR4.PKE: protection keys on.
const CR4_PKE: u64 = 1 << 22;
/// XSAVE component 9, PKRU.
const XFEATURE_PKRU: u64 = 1 << 9;
/// Where the XSAVE header's XSTATE_BV is in the (standard-format) area.
const XSTATE_BV_OFFSET: usize = 512;

/// The XSTATE_BV of a saved XSAVE area (0 when the area is too short to have one).
fn xstate_bv(xsave: &[u8]) -> u64 {
    xsave.get(XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8).map_or(0, |b| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    })
}

/// Why a saved XSAVE area did not load.
enum XsaveLoad {
    Size(VcpuStateError),
    Kvm(kvm_ioctls::Error),
}

/// Loads a saved XSAVE area into `vcpu` (KVM_SET_XSAVE2 when it is larger than the legacy 4 KiB).
fn set_xsave(vcpu: &VcpuFd, xsave: &[u8]) -> Result<(), XsaveLoad> {
    let words = || xsave.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    if xsave.len() > LEGACY_XSAVE_SIZE as usize {
        let mut x = xsave2_buffer(xsave.len()).map_err(XsaveLoad::Size)?;
        let legacy = x.as_fam_struct_ref().xsave.region.len();
        let mut words = words();
        // SAFETY: only the fixed legacy region is written; the FAM length field, which the
        // wrapper's invariants depend on, is left as Xsave::new set it.
        let fixed = unsafe { x.as_mut_fam_struct() };
        for (w, v) in fixed.xsave.region.iter_mut().zip(words.by_ref().take(legacy)) {
            *w = v;
        }
        for (w, v) in x.as_mut_slice().iter_mut().zip(words) {
            *w = v;
        }
        // SAFETY: `x` holds the whole saved area, whose size the CPU model check found no
        // larger than this host's KVM_CAP_XSAVE2 size, so KVM reads only what `x` holds.
        unsafe { vcpu.set_xsave2(&x) }.map_err(XsaveLoad::Kvm)
    } else {
        let mut buf = kvm_xsave::default();
        for (w, v) in buf.region.iter_mut().zip(words()) {
            *w = v;
        }
        // SAFETY: `buf` is a complete legacy kvm_xsave (its 4 KiB region), which is all
        // KVM_SET_XSAVE reads for a VM without XSAVE2.
        unsafe { vcpu.set_xsave(&buf) }.map_err(XsaveLoad::Kvm)
    }
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::Kvm;

    use super::*;
    use crate::testing::kvm_or_skip;

    fn vcpu(kvm: &Kvm) -> (kvm_ioctls::VmFd, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let v = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        v.set_cpuid2(&cpuid).unwrap();
        (vm, v)
    }

    #[test]
    fn vcpu_state_survives_save_encode_decode_restore_into_a_fresh_vcpu() {
        let Some(kvm) = kvm_or_skip("vcpu_state_survives_save_encode_decode_restore_into_a_fresh_vcpu") else {
            return;
        };
        let msrs = msrs_to_save(&kvm).unwrap();
        let xs = crate::cpu::host_facts(&kvm).unwrap().xsave_size;
        let (_vm1, a) = vcpu(&kvm);
        let mut regs = a.get_regs().unwrap();
        regs.rax = 0x1234;
        regs.rip = 0xfff0;
        a.set_regs(&regs).unwrap();
        let m = Msrs::from_entries(&[kvm_msr_entry { index: 0xc000_0102, data: 0xdead_b000, ..Default::default() }])
            .unwrap();
        a.set_msrs(&m).unwrap();
        let saved = VcpuState::save(&a, &msrs, xs).unwrap();

        let decoded = <VcpuState as SectionState>::decode(VCPU_STATE_VERSION, &saved.encode()).unwrap();
        let (_vm2, b) = vcpu(&kvm);
        decoded.restore(&b).unwrap();
        let again = VcpuState::save(&b, &msrs, xs).unwrap();

        assert!(msrs.contains(&0x10) && msrs.contains(&0xc000_0102), "{msrs:x?}");
        assert_eq!(again.regs.rax, 0x1234);
        assert!(again.msrs.contains(&(0xc000_0102, 0xdead_b000)));
        assert_eq!(again.sregs.cr0, saved.sregs.cr0);
        assert_eq!(&again.lapic.regs[..], &saved.lapic.regs[..]);
    }

    #[test]
    fn truncated_vcpu_state_is_refused_at_every_length() {
        let Some(kvm) = kvm_or_skip("truncated_vcpu_state_is_refused_at_every_length") else {
            return;
        };
        let (_vm, a) = vcpu(&kvm);
        let b = VcpuState::save(&a, &[0x10], 4096).unwrap().encode();

        for n in (0..b.len()).step_by(7) {
            assert!(<VcpuState as SectionState>::decode(2, &b[..n]).is_err(), "prefix {n}");
        }
    }
}
