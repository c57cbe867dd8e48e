//! COM1: `vm-superio`'s 16550 with its interrupt wired to an irqfd and its output to a sink.

use std::io::Write;

use vm_superio::serial::NoEvents;
pub use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::state_codec::{Decoder, Encoder, StateCodecError};

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

    /// Rebuilds the UART from saved state.
    pub fn from_state(state: &SerialState, irq: EventFd, out: SerialSink) -> Result<Self, SerialStateError> {
        let inner = Serial::from_state(state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| SerialStateError::Rebuild(format!("{e:?}")))?;
        Ok(SerialDevice { inner })
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

/// Errors of the serial state section.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    #[error("malformed serial state section")]
    Codec(#[from] StateCodecError),
    #[error("serial state section has {0} bytes of buffered input, more than the UART holds")]
    InputTooLong(usize),
    #[error("cannot rebuild the UART from its state: {0}")]
    Rebuild(String),
}

const TAG_REGS: u32 = 1;
const TAG_INPUT: u32 = 2;

/// Encodes the UART state (registers, then buffered input).
pub fn encode_state(s: &SerialState) -> Vec<u8> {
    let regs = [
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ];
    let mut e = Encoder::new();
    e.field(TAG_REGS, &regs);
    e.field(TAG_INPUT, &s.in_buffer);
    e.finish()
}

/// Decodes [`encode_state`]'s output.
pub fn decode_state(bytes: &[u8]) -> Result<SerialState, SerialStateError> {
    let mut d = Decoder::parse(bytes)?;
    let regs = d.require(TAG_REGS)?;
    let input = d.require(TAG_INPUT)?;
    d.finish()?;
    if regs.len() != 9 {
        return Err(SerialStateError::Codec(StateCodecError::Length { tag: TAG_REGS, want: 9, got: regs.len() }));
    }
    if input.len() > 64 {
        return Err(SerialStateError::InputTooLong(input.len()));
    }
    Ok(SerialState {
        baud_divisor_low: regs[0],
        baud_divisor_high: regs[1],
        interrupt_enable: regs[2],
        interrupt_identification: regs[3],
        line_control: regs[4],
        line_status: regs[5],
        modem_control: regs[6],
        modem_status: regs[7],
        scratch: regs[8],
        in_buffer: input.to_vec(),
    })
}
