//! Devices on the port-I/O bus: COM1 (16550, from `vm-superio`) and Ferry's shutdown port.
//!
//! Every device can report its state for a migration stream and be rebuilt from it.

pub mod serial;

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

/// The port-I/O bus of a machine.
pub struct PioBus {
    pub serial: std::sync::Mutex<SerialDevice>,
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
