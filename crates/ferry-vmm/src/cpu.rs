//! The guest's CPU model: the CPUID Ferry gives its vCPUs, the TSC rate they count at and the
//! size of their XSAVE state; what this host can give; and the check that a destination can
//! run a guest before it loads anything (Cloud Hypervisor checks CPUID the same way in its
//! config step).
//!
//! A guest keeps its CPU model for life: a restored or migrated machine gets the CPUID it was
//! booted with (vCPU 0's, with each vCPU's APIC id put back), not the destination's. The check
//! compares every feature register of the guest's CPUID with the CPUID this host would give a
//! fresh guest of the same vCPU count; a bit the guest has and the host lacks refuses the move,
//! naming the first one.
//!
//! TSC: the rate is the host's (no TSC scaling on the development hosts: KVM_CAP_TSC_CONTROL is
//! absent); a destination whose rate differs by more than [`TSC_TOLERANCE_PPM`] refuses unless
//! KVM can scale the guest's TSC to its old rate, which Ferry then does.

use std::sync::OnceLock;

use ferry_stream::{CpuModel, CpuidEntry};
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

/// Largest TSC rate difference accepted without scaling, in parts per million (QEMU's
/// tolerance for the same check).
pub const TSC_TOLERANCE_PPM: u64 = 250;
/// Size of the legacy XSAVE area (what KVM_GET_XSAVE moves).
pub const LEGACY_XSAVE_SIZE: u32 = 4096;

/// Errors of the CPU model.
#[derive(Debug, thiserror::Error)]
pub enum CpuModelError {
    #[error("KVM cannot {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(
        "this host cannot run the guest's CPU: it lacks {name} (CPUID leaf {leaf:#x} subleaf {subleaf} {reg} bit {bit})"
    )]
    MissingFeature { leaf: u32, subleaf: u32, reg: &'static str, bit: u32, name: String },
    #[error(
        "the guest's TSC runs at {guest_khz} kHz and this host's at {host_khz} kHz, and KVM here cannot scale \
         it (no KVM_CAP_TSC_CONTROL): the guest's clock would change speed"
    )]
    TscRate { guest_khz: u32, host_khz: u32 },
    #[error("the guest's XSAVE state is {guest} bytes, more than the {host} bytes this host's KVM handles")]
    XsaveSize { guest: u32, host: u32 },
    #[error("the guest's CPU model has {0} CPUID entries, more than KVM takes")]
    TooManyEntries(usize),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuModelError {
    move |source| CpuModelError::Kvm { what, source }
}

/// Facts about this host's KVM that do not change while Ferry runs, probed once on a scratch
/// VM.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// The TSC rate KVM gives a new vCPU, in kHz.
    pub tsc_khz: u32,
    /// Bytes of XSAVE state per vCPU (KVM_CAP_XSAVE2; the legacy 4096 without it).
    pub xsave_size: u32,
    /// Whether KVM can set a vCPU's TSC rate (KVM_CAP_TSC_CONTROL).
    pub tsc_control: bool,
    /// The MSRs Ferry migrates here (`vcpu_state::probe_msrs`).
    pub msrs: Vec<u32>,
}

static HOST: OnceLock<HostFacts> = OnceLock::new();

/// This host's facts (probed on first use).
pub fn host_facts(kvm: &Kvm) -> Result<&'static HostFacts, CpuModelError> {
    if let Some(f) = HOST.get() {
        return Ok(f);
    }
    let vm = kvm.create_vm().map_err(kvm_err("create a scratch VM"))?;
    vm.create_irq_chip().map_err(kvm_err("create a scratch irqchip"))?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("create a scratch vCPU"))?;
    let tsc_khz = vcpu.get_tsc_khz().map_err(kvm_err("report the TSC rate"))?;
    let msrs = crate::vcpu_state::probe_msrs(kvm, &vcpu)
        .map_err(|_| CpuModelError::Kvm { what: "list its MSRs", source: kvm_ioctls::Error::new(libc::EINVAL) })?;
    let facts =
        HostFacts { tsc_khz, xsave_size: xsave_size(&vm), tsc_control: kvm.check_extension(Cap::TscControl), msrs };
    Ok(HOST.get_or_init(|| facts))
}

/// Bytes of XSAVE state per vCPU of `vm`.
pub fn xsave_size(vm: &VmFd) -> u32 {
    match vm.check_extension_int(Cap::Xsave2) {
        n if n > LEGACY_XSAVE_SIZE as i32 => n as u32,
        _ => LEGACY_XSAVE_SIZE,
    }
}

/// Ferry's CPUID for vCPU `id` of `count`: `base` (the guest's model, or KVM's supported set
/// for a new guest) with the vCPU's APIC id and the processor count put in.
pub fn vcpu_cpuid(base: &[CpuidEntry], id: u32, count: u32) -> Result<CpuId, CpuModelError> {
    let entries: Vec<kvm_cpuid_entry2> = base
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    let mut cpuid = CpuId::from_entries(&entries).map_err(|_| CpuModelError::TooManyEntries(entries.len()))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC id, logical processor count, HTT when more than one.
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count & 0xff) << 16);
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    Ok(cpuid)
}

fn entries_of(c: &CpuId) -> Vec<CpuidEntry> {
    c.as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// The CPU model this host gives a new guest: KVM's supported CPUID, this host's TSC rate and
/// XSAVE size. This is the model Ferry *sets*; it is not read back with KVM_GET_CPUID2, which on
/// some hosts (KVM-PVM) reports host bits the guest was never given (SSE3, XSAVE, AVX-512 with
/// KVM_GET_SUPPORTED_CPUID clearing them), and would make a guest look unable to run on the
/// host it runs on.
pub fn new_guest_model(kvm: &Kvm) -> Result<CpuModel, CpuModelError> {
    let facts = host_facts(kvm)?;
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("report its supported CPUID"))?;
    Ok(CpuModel { tsc_khz: facts.tsc_khz, xsave_size: facts.xsave_size, cpuid: entries_of(&supported) })
}

/// Sets a new vCPU's TSC rate to the guest's where it differs from the rate KVM gave it and KVM
/// can scale it (the check has refused a difference KVM cannot scale). Cheap: no scratch VM.
pub fn apply_tsc(kvm: &Kvm, vcpu: &VcpuFd, model: &CpuModel) -> Result<(), CpuModelError> {
    let here = vcpu.get_tsc_khz().map_err(kvm_err("report the vCPU's TSC rate"))?;
    if !tsc_close(model.tsc_khz, here) && kvm.check_extension(Cap::TscControl) {
        vcpu.set_tsc_khz(model.tsc_khz).map_err(kvm_err("set the guest's TSC rate"))?;
    }
    Ok(())
}

fn tsc_close(a: u32, b: u32) -> bool {
    (a as u64).abs_diff(b as u64) * 1_000_000 <= TSC_TOLERANCE_PPM * b.max(1) as u64
}

/// What this host can give a guest of a given vCPU count.
#[derive(Debug, Clone)]
pub struct HostCpu {
    /// Ferry's CPUID for a new guest's vCPU 0 here.
    cpuid: Vec<CpuidEntry>,
    pub tsc_khz: u32,
    pub xsave_size: u32,
    pub tsc_control: bool,
}

/// The feature registers the check compares: (leaf, subleaf, register, bits that describe the
/// guest's state rather than the CPU's features and are never compared).
const FEATURE_REGS: &[(u32, u32, Reg, u32)] = &[
    // OSXSAVE (ecx 27) mirrors CR4.OSXSAVE; HTT (edx 28) follows the vCPU count.
    (1, 0, Reg::Ecx, 1 << 27),
    (1, 0, Reg::Edx, 1 << 28),
    // OSPKE (ecx 4) mirrors CR4.PKE.
    (7, 0, Reg::Ebx, 0),
    (7, 0, Reg::Ecx, 1 << 4),
    (7, 0, Reg::Edx, 0),
    (7, 1, Reg::Eax, 0),
    // The XSAVE components the guest may enable (XCR0), and XSAVEOPT/XSAVEC/XGETBV1/XSAVES.
    (0xd, 0, Reg::Eax, 0),
    (0xd, 0, Reg::Edx, 0),
    (0xd, 1, Reg::Eax, 0),
    (0x8000_0001, 0, Reg::Ecx, 0),
    (0x8000_0001, 0, Reg::Edx, 0),
    (0x8000_0008, 0, Reg::Ebx, 0),
    // KVM's paravirtual features (kvmclock, async PF, PV EOI...).
    (0x4000_0001, 0, Reg::Eax, 0),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        }
    }
    fn of(self, e: &CpuidEntry) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }
    fn of_mut(self, e: &mut CpuidEntry) -> &mut u32 {
        match self {
            Reg::Eax => &mut e.eax,
            Reg::Ebx => &mut e.ebx,
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
        }
    }

    /// Parses "eax".."edx" (any case).
    pub fn parse(s: &str) -> Option<Reg> {
        match s.to_ascii_lowercase().as_str() {
            "eax" => Some(Reg::Eax),
            "ebx" => Some(Reg::Ebx),
            "ecx" => Some(Reg::Ecx),
            "edx" => Some(Reg::Edx),
            _ => None,
        }
    }
}

/// Names of the feature bits operators meet most.
fn feature_name(leaf: u32, subleaf: u32, reg: Reg, bit: u32) -> Option<&'static str> {
    let n = match (leaf, subleaf, reg, bit) {
        (1, 0, Reg::Ecx, 0) => "SSE3",
        (1, 0, Reg::Ecx, 1) => "PCLMULQDQ",
        (1, 0, Reg::Ecx, 9) => "SSSE3",
        (1, 0, Reg::Ecx, 12) => "FMA",
        (1, 0, Reg::Ecx, 13) => "CMPXCHG16B",
        (1, 0, Reg::Ecx, 19) => "SSE4.1",
        (1, 0, Reg::Ecx, 20) => "SSE4.2",
        (1, 0, Reg::Ecx, 21) => "x2APIC",
        (1, 0, Reg::Ecx, 22) => "MOVBE",
        (1, 0, Reg::Ecx, 23) => "POPCNT",
        (1, 0, Reg::Ecx, 24) => "TSC-deadline",
        (1, 0, Reg::Ecx, 25) => "AES-NI",
        (1, 0, Reg::Ecx, 26) => "XSAVE",
        (1, 0, Reg::Ecx, 28) => "AVX",
        (1, 0, Reg::Ecx, 29) => "F16C",
        (1, 0, Reg::Ecx, 30) => "RDRAND",
        (1, 0, Reg::Edx, 0) => "FPU",
        (1, 0, Reg::Edx, 4) => "TSC",
        (1, 0, Reg::Edx, 5) => "MSR",
        (1, 0, Reg::Edx, 6) => "PAE",
        (1, 0, Reg::Edx, 8) => "CMPXCHG8B",
        (1, 0, Reg::Edx, 9) => "APIC",
        (1, 0, Reg::Edx, 15) => "CMOV",
        (1, 0, Reg::Edx, 19) => "CLFLUSH",
        (1, 0, Reg::Edx, 23) => "MMX",
        (1, 0, Reg::Edx, 24) => "FXSR",
        (1, 0, Reg::Edx, 25) => "SSE",
        (1, 0, Reg::Edx, 26) => "SSE2",
        (7, 0, Reg::Ebx, 0) => "FSGSBASE",
        (7, 0, Reg::Ebx, 3) => "BMI1",
        (7, 0, Reg::Ebx, 5) => "AVX2",
        (7, 0, Reg::Ebx, 7) => "SMEP",
        (7, 0, Reg::Ebx, 8) => "BMI2",
        (7, 0, Reg::Ebx, 9) => "ERMS",
        (7, 0, Reg::Ebx, 10) => "INVPCID",
        (7, 0, Reg::Ebx, 16) => "AVX512F",
        (7, 0, Reg::Ebx, 18) => "RDSEED",
        (7, 0, Reg::Ebx, 19) => "ADX",
        (7, 0, Reg::Ebx, 20) => "SMAP",
        (7, 0, Reg::Ebx, 29) => "SHA",
        (7, 0, Reg::Ecx, 2) => "UMIP",
        (7, 0, Reg::Ecx, 22) => "RDPID",
        (7, 0, Reg::Edx, 4) => "FSRM",
        (0xd, 0, Reg::Eax, 1) => "XSAVE component SSE",
        (0xd, 0, Reg::Eax, 2) => "XSAVE component AVX",
        (0xd, 0, Reg::Eax, 5..=7) => "XSAVE components AVX-512",
        (0xd, 1, Reg::Eax, 0) => "XSAVEOPT",
        (0xd, 1, Reg::Eax, 1) => "XSAVEC",
        (0xd, 1, Reg::Eax, 3) => "XSAVES",
        (0x8000_0001, 0, Reg::Ecx, 0) => "LAHF/SAHF in 64-bit mode",
        (0x8000_0001, 0, Reg::Ecx, 5) => "LZCNT",
        (0x8000_0001, 0, Reg::Edx, 11) => "SYSCALL",
        (0x8000_0001, 0, Reg::Edx, 20) => "NX",
        (0x8000_0001, 0, Reg::Edx, 26) => "1 GiB pages",
        (0x8000_0001, 0, Reg::Edx, 27) => "RDTSCP",
        (0x8000_0001, 0, Reg::Edx, 29) => "long mode",
        (0x4000_0001, 0, Reg::Eax, 3) => "kvmclock (KVM_FEATURE_CLOCKSOURCE2)",
        _ => return None,
    };
    Some(n)
}

fn find(cpuid: &[CpuidEntry], leaf: u32, subleaf: u32) -> Option<&CpuidEntry> {
    cpuid.iter().find(|e| e.function == leaf && e.index == subleaf)
}

impl HostCpu {
    /// What this host gives a new guest of `vcpus` vCPUs.
    pub fn probe(kvm: &Kvm, vcpus: u32) -> Result<HostCpu, CpuModelError> {
        let facts = host_facts(kvm)?;
        let model = new_guest_model(kvm)?;
        let cpuid = entries_of(&vcpu_cpuid(&model.cpuid, 0, vcpus)?);
        Ok(HostCpu { cpuid, tsc_khz: facts.tsc_khz, xsave_size: facts.xsave_size, tsc_control: facts.tsc_control })
    }

    /// Pretends this host lacks one feature bit (tests and `--debug-mask-cpuid`).
    pub fn mask_feature(&mut self, leaf: u32, subleaf: u32, reg: Reg, bit: u32) {
        for e in self.cpuid.iter_mut().filter(|e| e.function == leaf && e.index == subleaf) {
            *reg.of_mut(e) &= !(1u32 << (bit & 31));
        }
    }

    /// Whether this host can run a guest of `model` (of the same vCPU count); the first feature
    /// the host lacks is named.
    pub fn check(&self, model: &CpuModel) -> Result<(), CpuModelError> {
        for &(leaf, subleaf, reg, ignore) in FEATURE_REGS {
            let guest = find(&model.cpuid, leaf, subleaf).map_or(0, |e| reg.of(e)) & !ignore;
            let host = find(&self.cpuid, leaf, subleaf).map_or(0, |e| reg.of(e));
            let missing = guest & !host;
            if missing != 0 {
                let bit = missing.trailing_zeros();
                let name = feature_name(leaf, subleaf, reg, bit).map_or_else(|| format!("bit {bit}"), str::to_string);
                return Err(CpuModelError::MissingFeature { leaf, subleaf, reg: reg.name(), bit, name });
            }
        }
        if model.xsave_size > self.xsave_size {
            return Err(CpuModelError::XsaveSize { guest: model.xsave_size, host: self.xsave_size });
        }
        if !self.tsc_control && !tsc_close(model.tsc_khz, self.tsc_khz) {
            return Err(CpuModelError::TscRate { guest_khz: model.tsc_khz, host_khz: self.tsc_khz });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostCpu {
        HostCpu {
            cpuid: vec![
                CpuidEntry { function: 1, ecx: 0x0000_2201, edx: 0x0789_8371, ..Default::default() },
                CpuidEntry { function: 7, flags: 1, ebx: 0x29, ..Default::default() },
            ],
            tsc_khz: 2_000_000,
            xsave_size: 4096,
            tsc_control: false,
        }
    }

    fn guest_of(h: &HostCpu) -> CpuModel {
        CpuModel { tsc_khz: h.tsc_khz, xsave_size: h.xsave_size, cpuid: h.cpuid.clone() }
    }

    #[test]
    fn a_guest_made_here_runs_here() {
        let h = host();
        h.check(&guest_of(&h)).unwrap();
    }

    #[test]
    fn a_masked_feature_is_named_as_the_first_missing_one() {
        let guest = guest_of(&host());
        let mut h = host();
        h.mask_feature(7, 0, Reg::Ebx, 5);

        let e = h.check(&guest).unwrap_err().to_string();

        assert_eq!(e, "this host cannot run the guest's CPU: it lacks AVX2 (CPUID leaf 0x7 subleaf 0 EBX bit 5)");
    }

    #[test]
    fn bits_that_mirror_guest_state_are_not_features() {
        let h = host();
        let mut guest = guest_of(&h);
        guest.cpuid[0].ecx |= 1 << 27; // OSXSAVE: the guest set CR4.OSXSAVE
        guest.cpuid[0].edx |= 1 << 28; // HTT: a 2-vCPU guest
        h.check(&guest).unwrap();
    }

    #[test]
    fn another_tsc_rate_is_refused_without_scaling_and_accepted_within_tolerance() {
        let h = host();
        let mut guest = guest_of(&h);
        guest.tsc_khz = 2_000_400; // 200 ppm
        h.check(&guest).unwrap();
        guest.tsc_khz = 2_400_000;
        let e = h.check(&guest).unwrap_err().to_string();
        assert!(e.contains("2400000 kHz") && e.contains("2000000 kHz"), "{e}");
        let scaling = HostCpu { tsc_control: true, ..host() };
        scaling.check(&guest).unwrap();
    }

    #[test]
    fn a_larger_xsave_area_is_refused() {
        let h = host();
        let guest = CpuModel { xsave_size: 11008, ..guest_of(&h) };
        assert!(matches!(h.check(&guest), Err(CpuModelError::XsaveSize { guest: 11008, host: 4096 })));
    }

    #[test]
    fn the_per_vcpu_cpuid_carries_the_apic_id_and_the_count() {
        let base = host().cpuid;
        let c = vcpu_cpuid(&base, 1, 2).unwrap();
        let leaf1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 1);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 2);
        assert_ne!(leaf1.edx & (1 << 28), 0);
        // vCPU 0's CPUID (the model) patched for vCPU 1 gives vCPU 1's.
        let again = vcpu_cpuid(&entries_of(&vcpu_cpuid(&base, 0, 2).unwrap()), 1, 2).unwrap();
        assert_eq!(entries_of(&again), entries_of(&c));
    }
}
