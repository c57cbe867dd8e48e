//! Devices on the port-I/O bus: COM1 (16550, from `vm-superio`) and Ferry's shutdown port.
//!
//! Every device can report its state for a migration stream and be rebuilt from it.

pub mod disk_dirty;
pub mod disk_image;
pub mod serial;
pub mod virtio_blk;

pub use serial::SerialDevice;

/// Port of the shutdown device: a byte written here ends the VM with that exit status. It is the
/// default port of QEMU's `isa-debug-exit`, so the built-in guest can end itself under both.
pub const SHUTDOWN_PORT: u16 = 0x501;
/// COM1 base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1 interrupt line (GSI).
pub const COM1_GSI: u32 = 4;

/// What a port access asks the machine to do beyond the device's own effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    None,
    /// The guest asked to shut down with this status.
    Shutdown(u8),
}

/// The port-I/O bus of a machine, and its MMIO devices.
pub struct PioBus {
    pub serial: std::sync::Mutex<SerialDevice>,
    /// virtio-mmio disks, disk `i` at `virtio_blk::mmio_base(i)`.
    pub disks: Vec<virtio_blk::BlockDevice>,
}

impl PioBus {
    /// Handles an `out`; unclaimed ports are ignored like on a PC.
    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        match port {
            COM1_BASE..=0x3ff => {
                if let (Some(&b), Ok(mut s)) = (data.first(), self.serial.lock()) {
                    s.write((port - COM1_BASE) as u8, b);
                }
                IoAction::None
            }
            SHUTDOWN_PORT => IoAction::Shutdown(data.first().copied().unwrap_or(0)),
            _ => IoAction::None,
        }
    }

    /// The disk whose MMIO window holds `gpa`, with the offset in it.
    fn disk_at(&self, gpa: u64) -> Option<(&virtio_blk::BlockDevice, u64)> {
        let rel = gpa.checked_sub(virtio_blk::VIRTIO_MMIO_BASE)?;
        let d = self.disks.get((rel / virtio_blk::VIRTIO_MMIO_SIZE) as usize)?;
        Some((d, rel % virtio_blk::VIRTIO_MMIO_SIZE))
    }

    /// Handles an MMIO read; unclaimed addresses read as all ones.
    pub fn mmio_read(&self, gpa: u64, data: &mut [u8]) {
        match self.disk_at(gpa) {
            Some((d, off)) => d.mmio_read(off, data),
            None => data.fill(0xff),
        }
    }

    /// Handles an MMIO write; unclaimed addresses ignore it.
    pub fn mmio_write(&self, gpa: u64, data: &[u8]) {
        if let Some((d, off)) = self.disk_at(gpa) {
            d.mmio_write(off, data);
        }
    }

    /// Handles an `in`; unclaimed ports read as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=0x3ff => {
                if let Ok(mut s) = self.serial.lock() {
                    let v = s.read((port - COM1_BASE) as u8);
                    data.fill(0);
                    if let Some(d) = data.first_mut() {
                        *d = v;
                    }
                }
            }
            _ => data.fill(0xff),
        }
    }
}
