//! VM-wide state: the in-kernel PIC pair and IOAPIC, the PIT, and kvmclock.
//!
//! Restore order (as Firecracker): PIT, clock, then the three irqchips.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use crate::persist::{Persist, SectionState};
use crate::state_codec::{Decoder, Encoder, StateCodecError};

/// Version of the VM state section.
pub const VM_STATE_VERSION: u32 = 1;

const TAG_PIC_MASTER: u32 = 1;
const TAG_PIC_SLAVE: u32 = 2;
const TAG_IOAPIC: u32 = 3;
const TAG_PIT: u32 = 4;
const TAG_CLOCK: u32 = 5;

/// Errors of VM-wide state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("KVM cannot {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("malformed VM state section")]
    Codec(#[from] StateCodecError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { what, source }
}

/// The VM-wide state KVM holds.
#[derive(Clone)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState").field("clock_ns", &self.clock.clock).finish()
    }
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, VmStateError> {
    let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
    vm.get_irqchip(&mut c).map_err(kvm("read an irqchip"))?;
    Ok(c)
}

impl VmState {
    pub fn save(vm: &VmFd) -> Result<Self, VmStateError> {
        Ok(VmState {
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
            clock: vm.get_clock().map_err(kvm("read kvmclock"))?,
        })
    }

    /// Puts this state into a VM created with an in-kernel irqchip and PIT.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        vm.set_pit2(&self.pit).map_err(kvm("set the PIT"))?;
        // Only the clock value is meaningful to KVM_SET_CLOCK; flags describe the source host.
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        vm.set_clock(&clock).map_err(kvm("set kvmclock"))?;
        vm.set_irqchip(&self.pic_master).map_err(kvm("set the master PIC"))?;
        vm.set_irqchip(&self.pic_slave).map_err(kvm("set the slave PIC"))?;
        vm.set_irqchip(&self.ioapic).map_err(kvm("set the IOAPIC"))?;
        Ok(())
    }
}

impl SectionState for VmState {
    const NAME: &'static str = "vm";
    const VERSION: u32 = VM_STATE_VERSION;
    /// Version 1 is the first: there is no previous one.
    const READS: &'static [u32] = &[1];
    type Error = VmStateError;

    fn encode(&self) -> Vec<u8> {
        Encoder::new()
            .pod(TAG_PIC_MASTER, &self.pic_master)
            .pod(TAG_PIC_SLAVE, &self.pic_slave)
            .pod(TAG_IOAPIC, &self.ioapic)
            .pod(TAG_PIT, &self.pit)
            .pod(TAG_CLOCK, &self.clock)
            .finish()
    }

    fn decode(_version: u32, b: &[u8]) -> Result<Self, VmStateError> {
        let mut d = Decoder::parse(b)?;
        let s = VmState {
            pic_master: d.require_pod(TAG_PIC_MASTER)?,
            pic_slave: d.require_pod(TAG_PIC_SLAVE)?,
            ioapic: d.require_pod(TAG_IOAPIC)?,
            pit: d.require_pod(TAG_PIT)?,
            clock: d.require_pod(TAG_CLOCK)?,
        };
        d.finish()?;
        Ok(s)
    }
}

/// The VM-wide state KVM holds for a VM.
pub struct KvmVm<'a>(pub &'a VmFd);

impl<'a> Persist for KvmVm<'a> {
    type State = VmState;
    /// A freshly created VM with its in-kernel irqchip and PIT.
    type ConstructorArgs<'b> = KvmVm<'a>;
    type Error = VmStateError;

    fn save(&self) -> Result<VmState, VmStateError> {
        VmState::save(self.0)
    }

    fn restore(fresh: KvmVm<'a>, state: &VmState) -> Result<Self, VmStateError> {
        state.restore(fresh.0)?;
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
    use kvm_ioctls::Kvm;

    fn vm(kvm: &Kvm) -> VmFd {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() }).unwrap();
        vm
    }

    #[test]
    fn vm_state_survives_a_round_trip_into_a_second_vm() {
        let Some(kvm) = crate::testing::kvm_or_skip("vm_state_survives_a_round_trip_into_a_second_vm") else {
            return;
        };
        let a = vm(&kvm);
        let mut pit = a.get_pit2().unwrap();
        pit.channels[0].count = 0x1234;
        pit.channels[0].mode = 2;
        a.set_pit2(&pit).unwrap();
        let mut io = chip(&a, KVM_IRQCHIP_IOAPIC).unwrap();
        // SAFETY: (test) the ioapic member of the union is the one KVM_IRQCHIP_IOAPIC uses.
        unsafe { io.chip.ioapic.redirtbl[3].bits = 0x0001_0000_0000_0031 };
        a.set_irqchip(&io).unwrap();
        let saved = VmState::save(&a).unwrap();

        let b = vm(&kvm);
        <VmState as SectionState>::decode(1, &saved.encode()).unwrap().restore(&b).unwrap();
        let again = VmState::save(&b).unwrap();

        assert_eq!(again.pit.channels[0].count, 0x1234);
        assert_eq!(again.pit.channels[0].mode, 2);
        // SAFETY: (test) as above.
        let bits = unsafe { again.ioapic.chip.ioapic.redirtbl[3].bits };
        assert_eq!(bits, 0x0001_0000_0000_0031);
        assert!(again.clock.clock >= saved.clock.clock);
    }
}
