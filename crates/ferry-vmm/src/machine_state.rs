//! The machine's state as a whole, and the one list of its parts.
//!
//! [`MachineState`] is everything a paused machine holds outside guest RAM: VM-wide KVM state,
//! each vCPU, and each device. It turns into [`Section`]s to write and is built back from the
//! sections read ([`StateBuilder`]), whatever the stream (migration, snapshot, later
//! replication and live update). This file is the only place that names the devices: adding a
//! device means a field here, its arm in [`StateBuilder::add`], its save in `Vm::save_state`
//! and its restore in `Vm::restore` — all in this crate; `ferry-migrate` only moves sections.

use crate::devices::serial::SerialSection;

use crate::devices::serial::SERIAL_SECTION_ID;
use crate::devices::virtio_blk::state::{BlockState, BLOCK_SECTION_ID};
use crate::devices::virtio_blk::MAX_DISKS;
use crate::persist::{decode_section, encode_section, Section, SectionError, SectionKey};
use crate::vcpu_state::VcpuState;
use crate::vm_state::VmState;

/// Errors of putting a machine's state together or back into a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineStateError {
    #[error("state section")]
    Section(#[from] SectionError),
    #[error("device section '{id}' (instance {instance}, version {version}) belongs to no device this Ferry has")]
    UnknownDevice { id: String, instance: u32, version: u32 },
    #[error("the stream carries state for vCPU {0}, which the machine does not have")]
    ExtraVcpu(u32),
    #[error("the stream carries {0} twice")]
    Duplicate(SectionKey),
    #[error("the stream ended without state for vCPU {0}")]
    MissingVcpu(u32),
    #[error("the stream ended without VM-wide state")]
    MissingVm,
    #[error("the stream carries state for disk {0} but not for disk {1}")]
    DiskGap(u32, u32),
    #[error("the stream carries state for disk {0}; Ferry supports at most {MAX_DISKS} disks")]
    TooManyDisks(u32),
    #[error(
        "the source machine has {source_disks} disk(s) but this destination was started with {local} \
         (give the same --disk images, in the same order)"
    )]
    DiskCount { source_disks: usize, local: usize },
    #[error("the machine has {fds} vCPUs but its state describes {states}")]
    VcpuCount { fds: usize, states: usize },
    #[error("cannot restore the VM-wide state")]
    VmState(#[source] crate::vm_state::VmStateError),
    #[error("cannot restore vCPU {0}")]
    VcpuState(u32, #[source] crate::vcpu_state::VcpuStateError),
    #[error("cannot restore the serial device")]
    Serial(#[source] crate::devices::serial::SerialStateError),
}

/// Everything a paused machine holds outside guest RAM.
#[derive(Debug, Clone)]
pub struct MachineState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    /// None in streams that lack it (the UART then starts reset).
    pub serial: Option<SerialSection>,
    /// One per disk, in disk order.
    pub disks: Vec<BlockState>,
}

impl MachineState {
    /// The sections to write, in stream order: VM-wide state, each vCPU, each device.
    pub fn sections(&self) -> Vec<Section> {
        let mut v = vec![encode_section(SectionKey::Vm, &self.vm)];
        v.extend(self.vcpus.iter().enumerate().map(|(i, s)| encode_section(SectionKey::Vcpu(i as u32), s)));
        if let Some(s) = &self.serial {
            v.push(encode_section(SectionKey::Device { id: SERIAL_SECTION_ID.into(), instance: 0 }, s));
        }
        v.extend(
            self.disks.iter().enumerate().map(|(i, s)| {
                encode_section(SectionKey::Device { id: BLOCK_SECTION_ID.into(), instance: i as u32 }, s)
            }),
        );
        v
    }
}

/// Puts a [`MachineState`] together from the sections of a stream, in any order, each once.
#[derive(Debug)]
pub struct StateBuilder {
    vm: Option<VmState>,
    vcpus: Vec<Option<VcpuState>>,
    serial: Option<SerialSection>,
    disks: Vec<Option<BlockState>>,
}

impl StateBuilder {
    /// For a machine of `vcpus` vCPUs.
    pub fn new(vcpus: u32) -> Self {
        StateBuilder { vm: None, vcpus: (0..vcpus).map(|_| None).collect(), serial: None, disks: Vec::new() }
    }

    /// Takes one section: its version is checked and its body decoded now, so a section this
    /// Ferry cannot read fails the load when it arrives.
    pub fn add(&mut self, key: SectionKey, version: u32, body: &[u8]) -> Result<(), MachineStateError> {
        fn put<T>(slot: &mut Option<T>, key: &SectionKey, v: T) -> Result<(), MachineStateError> {
            if slot.is_some() {
                return Err(MachineStateError::Duplicate(key.clone()));
            }
            *slot = Some(v);
            Ok(())
        }
        match &key {
            SectionKey::Vm => put(&mut self.vm, &key, decode_section(&key, version, body)?),
            SectionKey::Vcpu(id) => {
                let slot = self.vcpus.get_mut(*id as usize).ok_or(MachineStateError::ExtraVcpu(*id))?;
                put(slot, &key, decode_section(&key, version, body)?)
            }
            SectionKey::Device { id, instance: 0 } if id == SERIAL_SECTION_ID => {
                put(&mut self.serial, &key, decode_section(&key, version, body)?)
            }
            SectionKey::Device { id, instance } if id == BLOCK_SECTION_ID => {
                let i = *instance as usize;
                if i >= MAX_DISKS {
                    return Err(MachineStateError::TooManyDisks(*instance));
                }
                if self.disks.len() <= i {
                    self.disks.resize_with(i + 1, || None);
                }
                put(&mut self.disks[i], &key, decode_section(&key, version, body)?)
            }
            SectionKey::Device { id, instance } => {
                Err(MachineStateError::UnknownDevice { id: id.clone(), instance: *instance, version })
            }
        }
    }

    /// The machine's state, once every vCPU and the VM-wide state arrived.
    pub fn finish(self) -> Result<MachineState, MachineStateError> {
        let vm = self.vm.ok_or(MachineStateError::MissingVm)?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (i, v) in self.vcpus.into_iter().enumerate() {
            vcpus.push(v.ok_or(MachineStateError::MissingVcpu(i as u32))?);
        }
        let n = self.disks.len() as u32;
        let mut disks = Vec::with_capacity(self.disks.len());
        for (i, d) in self.disks.into_iter().enumerate() {
            disks.push(d.ok_or(MachineStateError::DiskGap(n - 1, i as u32))?);
        }
        Ok(MachineState { vm, vcpus, serial: self.serial, disks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::SectionState;

    fn serial() -> SerialSection {
        SerialSection { uart: uart(), pending_output: b"HB 12".to_vec(), held_output: Vec::new() }
    }

    fn uart() -> vm_superio::serial::SerialState {
        vm_superio::serial::SerialState {
            baud_divisor_low: 1,
            baud_divisor_high: 0,
            interrupt_enable: 2,
            interrupt_identification: 1,
            line_control: 3,
            line_status: 0x60,
            modem_control: 8,
            modem_status: 0xb0,
            scratch: 7,
            in_buffer: b"hi".to_vec(),
        }
    }

    fn serial_key() -> SectionKey {
        SectionKey::Device { id: SERIAL_SECTION_ID.into(), instance: 0 }
    }

    #[test]
    fn a_device_section_of_an_unknown_version_is_refused_naming_section_version_and_versions_read() {
        let mut b = StateBuilder::new(1);

        let e = b.add(serial_key(), 9, &serial().encode()).unwrap_err();

        let chain = format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
        assert!(
            chain.contains("device 'serial' instance 0 is section 'serial' version 9")
                && chain.contains("it reads versions 1"),
            "{chain}"
        );
    }

    #[test]
    fn a_vcpu_section_of_an_unknown_version_is_refused_before_its_body_is_read() {
        let mut b = StateBuilder::new(1);

        let e = b.add(SectionKey::Vcpu(0), 3, b"not a body").unwrap_err();

        assert!(
            matches!(&e, MachineStateError::Section(SectionError::Version { found: 3, supported: &[2, 1], .. })),
            "{e:?}"
        );
    }

    #[test]
    fn an_unknown_device_a_duplicate_and_a_missing_vcpu_are_each_named() {
        let mut b = StateBuilder::new(2);
        let e = b.add(SectionKey::Device { id: "virtio-net".into(), instance: 0 }, 1, b"").unwrap_err();
        assert_eq!(
            e.to_string(),
            "device section 'virtio-net' (instance 0, version 1) belongs to no device this Ferry has"
        );
        b.add(serial_key(), 1, &serial().encode()).unwrap();
        let e = b.add(serial_key(), 1, &serial().encode()).unwrap_err();
        assert_eq!(e.to_string(), "the stream carries device 'serial' instance 0 twice");
        assert!(matches!(b.add(SectionKey::Vcpu(2), 2, b""), Err(MachineStateError::ExtraVcpu(2))));
        assert!(matches!(b.finish(), Err(MachineStateError::MissingVm)));
    }
}
