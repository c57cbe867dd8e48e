//! COM1: `vm-superio`'s 16550 with its interrupt wired to an irqfd and its output to a sink.

use std::io::Write;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Version of the serial device state section.
pub const SERIAL_STATE_VERSION: u32 = 1;
/// Section id of the serial device in a stream.
pub const SERIAL_SECTION_ID: &str = "serial";

/// Raises the serial interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Where serial output goes.
pub type SerialSink = Box<dyn Write + Send>;

/// COM1.
pub struct SerialDevice {
    inner: Serial<IrqTrigger, NoEvents, SerialSink>,
}

impl SerialDevice {
    /// A freshly reset UART.
    pub fn new(irq: EventFd, out: SerialSink) -> Self {
        SerialDevice { inner: Serial::new(IrqTrigger(irq), out) }
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // A failing sink (closed stdout) must not stop the guest: the byte is dropped.
        let _ = self.inner.write(offset, value);
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    pub fn state(&self) -> SerialState {
        self.inner.state()
    }
}
