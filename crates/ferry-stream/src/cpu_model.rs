//! The CPU_MODEL record: the CPU the guest was given (its CPUID), the TSC rate it counts at and
//! the size of its XSAVE area. A destination checks it against what its own host can give
//! before it loads anything (docs/machine-state.md, "CPU model").

use crate::reader::u32_at;

/// Most CPUID entries one CPU_MODEL may carry (KVM itself allows 256).
pub const MAX_CPUID_ENTRIES: u32 = 256;
/// Size of the fixed part of the body.
const HEAD: usize = 16;
/// Size of one encoded CPUID entry.
const ENTRY: usize = 32;

/// One CPUID leaf (and subleaf) as KVM describes it (`kvm_cpuid_entry2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// KVM_CPUID_FLAG_* (bit 0: the subleaf index is significant).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The guest's CPU as the source ran it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuModel {
    /// The guest's TSC rate in kHz (KVM_GET_TSC_KHZ of vCPU 0).
    pub tsc_khz: u32,
    /// Bytes of XSAVE state per vCPU (KVM_CAP_XSAVE2, at least the legacy 4096).
    pub xsave_size: u32,
    /// vCPU 0's CPUID (the others differ only in their APIC ids, which Ferry derives).
    pub cpuid: Vec<CpuidEntry>,
}

impl CpuModel {
    /// Body: tsc_khz u32, xsave_size u32, count u32, reserved u32, then per entry function,
    /// index, flags, eax, ebx, ecx, edx, reserved (u32 each).
    pub(crate) fn encode(&self) -> Result<Vec<u8>, crate::StreamError> {
        if self.cpuid.len() > MAX_CPUID_ENTRIES as usize {
            return Err(crate::StreamError::Invalid(format!("{} CPUID entries", self.cpuid.len())));
        }
        let mut b = Vec::with_capacity(HEAD + ENTRY * self.cpuid.len());
        for v in [self.tsc_khz, self.xsave_size, self.cpuid.len() as u32, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for e in &self.cpuid {
            for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx, 0] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        Ok(b)
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < HEAD {
            return Err(format!("body of {} bytes, need at least {HEAD}", b.len()));
        }
        let count = u32_at(b, 8);
        if count > MAX_CPUID_ENTRIES || b.len() != HEAD + ENTRY * count as usize {
            return Err(format!("{count} CPUID entries in a body of {} bytes", b.len()));
        }
        if u32_at(b, 12) != 0 {
            return Err("non-zero reserved bytes in the header".into());
        }
        let mut cpuid = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let o = HEAD + ENTRY * i;
            if u32_at(b, o + 28) != 0 {
                return Err(format!("non-zero reserved bytes in CPUID entry {i}"));
            }
            cpuid.push(CpuidEntry {
                function: u32_at(b, o),
                index: u32_at(b, o + 4),
                flags: u32_at(b, o + 8),
                eax: u32_at(b, o + 12),
                ebx: u32_at(b, o + 16),
                ecx: u32_at(b, o + 20),
                edx: u32_at(b, o + 24),
            });
        }
        Ok(CpuModel { tsc_khz: u32_at(b, 0), xsave_size: u32_at(b, 4), cpuid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> CpuModel {
        CpuModel {
            tsc_khz: 2_000_000,
            xsave_size: 4096,
            cpuid: vec![
                CpuidEntry { function: 0, eax: 0xd, ebx: 1, ecx: 2, edx: 3, ..Default::default() },
                CpuidEntry { function: 7, index: 0, flags: 1, ebx: 0x29, ..Default::default() },
            ],
        }
    }

    #[test]
    fn cpu_model_round_trips() {
        let m = model();
        assert_eq!(CpuModel::decode(&m.encode().unwrap()).unwrap(), m);
    }

    #[test]
    fn every_truncation_and_a_set_reserved_byte_are_refused() {
        let b = model().encode().unwrap();
        for n in 0..b.len() {
            assert!(CpuModel::decode(&b[..n]).is_err(), "prefix {n}");
        }
        let mut bad = b.clone();
        bad[HEAD + ENTRY + 28] = 1;
        assert!(CpuModel::decode(&bad).unwrap_err().contains("reserved"));
    }
}
