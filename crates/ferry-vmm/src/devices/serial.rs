//! COM1: `vm-superio`'s 16550 with its interrupt wired to an irqfd and its output to a sink.

use std::io::Write;
use std::time::{Duration, Instant};

use vm_superio::serial::NoEvents;
pub use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::persist::{Persist, SectionState};
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

/// How long output without a newline (a prompt, say) may wait before it is passed on anyway.
pub const PARTIAL_LINE_DELAY: Duration = Duration::from_millis(10);

/// The UART's output side: passes bytes on a line at a time.
///
/// vm-superio writes and flushes its sink for every byte the guest sends, and KVM exits once per
/// byte even for a `rep outsb`. Passing each byte on as its own write(2), with a wake-up of
/// whoever reads the console, kept the vCPU out of the guest for that long on every byte (a
/// 150-byte line cost ~150 system calls). Bytes are collected here and written when a line
/// ends, when [`LINE_MAX`] are pending, or when [`SerialDevice::flush_output`] is called (the
/// machine's output thread does so for bytes older than [`PARTIAL_LINE_DELAY`]; pause, stop and
/// drop do too, so nothing is lost or held across a migration).
struct LineOut {
    out: SerialSink,
    pending: Vec<u8>,
    /// When the oldest pending byte arrived.
    since: Option<Instant>,
    /// A partial line is held for the state (a live update): not passed on until released.
    hold: bool,
}

/// Pending bytes that are written even without a newline.
const LINE_MAX: usize = 4096;

impl LineOut {
    fn emit(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.since = None;
        let r = self.out.write_all(&self.pending).and_then(|_| self.out.flush());
        self.pending.clear();
        r
    }
}

impl Write for LineOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        self.since.get_or_insert_with(Instant::now);
        if buf.contains(&b'\n') || self.pending.len() >= LINE_MAX {
            self.emit()?;
        }
        Ok(buf.len())
    }

    /// Deferred: vm-superio flushes after every byte (see the type's comment).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineOut {
    fn drop(&mut self) {
        let _ = self.emit();
    }
}

/// COM1.
pub struct SerialDevice {
    inner: Serial<IrqTrigger, NoEvents, LineOut>,
}

fn line_out(out: SerialSink) -> LineOut {
    LineOut { out, pending: Vec::with_capacity(256), since: None, hold: false }
}

impl SerialDevice {
    /// A freshly reset UART.
    pub fn new(irq: EventFd, out: SerialSink) -> Self {
        SerialDevice { inner: Serial::new(IrqTrigger(irq), line_out(out)) }
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // A failing sink (closed stdout) must not stop the guest: the byte is dropped.
        let _ = self.inner.write(offset, value);
    }

    /// Passes on output still waiting for its newline (unless held).
    pub fn flush_output(&mut self) {
        if self.inner.writer().hold {
            return;
        }
        // A failing sink drops the bytes, as for a complete line.
        let _ = self.inner.writer_mut().emit();
    }

    /// Holds (or releases) output waiting for its newline: while held, nothing passes on a
    /// partial line, so the state can carry it (the guest is paused meanwhile).
    pub fn hold_output(&mut self, hold: bool) {
        let w = self.inner.writer_mut();
        w.hold = hold;
        if !hold && !w.pending.is_empty() {
            // The partial line's wait starts again now that the guest can finish it.
            w.since = Some(Instant::now());
        }
    }

    /// When the oldest output byte still waiting for its newline arrived.
    pub fn output_pending_since(&self) -> Option<Instant> {
        self.inner.writer().since
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }
}

/// Errors of the serial state section.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    #[error("malformed serial state section")]
    Codec(#[from] StateCodecError),
    #[error(
        "serial state section has {0} bytes of buffered input or output, more than the UART or its line buffer holds"
    )]
    InputTooLong(usize),
    #[error("cannot rebuild the UART from its state: {0}")]
    Rebuild(String),
}

const TAG_REGS: u32 = 1;
const TAG_INPUT: u32 = 2;
/// Optional: output bytes the guest wrote after the last complete line, not passed on yet (a
/// live update carries a line cut by its pause whole to the next process).
const TAG_PENDING_OUTPUT: u32 = crate::state_codec::OPTIONAL_TAG | 3;

/// The serial section: the UART's registers and buffered input, and output not yet passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialSection {
    pub uart: SerialState,
    /// At most one line's bytes (no newline among them); empty after a plain pause, which
    /// passes them on.
    pub pending_output: Vec<u8>,
}

impl SectionState for SerialSection {
    const NAME: &'static str = SERIAL_SECTION_ID;
    const VERSION: u32 = SERIAL_STATE_VERSION;
    /// Version 1 is the first: there is no previous one.
    const READS: &'static [u32] = &[1];
    type Error = SerialStateError;

    /// Registers, then buffered input, then (only if any) pending output.
    fn encode(&self) -> Vec<u8> {
        let s = &self.uart;
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
        if !self.pending_output.is_empty() {
            e.field(TAG_PENDING_OUTPUT, &self.pending_output);
        }
        e.finish()
    }

    fn decode(_version: u32, bytes: &[u8]) -> Result<SerialSection, SerialStateError> {
        let mut d = Decoder::parse(bytes)?;
        let regs = d.require(TAG_REGS)?;
        let input = d.require(TAG_INPUT)?;
        let pending_output = d.get(TAG_PENDING_OUTPUT).unwrap_or_default().to_vec();
        d.finish()?;
        if pending_output.len() > LINE_MAX {
            return Err(SerialStateError::InputTooLong(pending_output.len()));
        }
        if regs.len() != 9 {
            return Err(SerialStateError::Codec(StateCodecError::Length { tag: TAG_REGS, want: 9, got: regs.len() }));
        }
        if input.len() > 64 {
            return Err(SerialStateError::InputTooLong(input.len()));
        }
        let uart = SerialState {
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
        };
        Ok(SerialSection { uart, pending_output })
    }
}

impl Persist for SerialDevice {
    type State = SerialSection;
    /// The interrupt eventfd and where output goes.
    type ConstructorArgs<'a> = (EventFd, SerialSink);
    type Error = SerialStateError;

    fn save(&self) -> Result<SerialSection, SerialStateError> {
        Ok(SerialSection { uart: self.inner.state(), pending_output: self.inner.writer().pending.clone() })
    }

    fn restore((irq, out): (EventFd, SerialSink), state: &SerialSection) -> Result<Self, SerialStateError> {
        let mut lines = line_out(out);
        if !state.pending_output.is_empty() {
            // Held until the guest runs again and can finish the line.
            lines.pending.extend_from_slice(&state.pending_output);
            lines.since = Some(Instant::now());
            lines.hold = true;
        }
        let inner = Serial::from_state(&state.uart, IrqTrigger(irq), NoEvents, lines)
            .map_err(|e| SerialStateError::Rebuild(format!("{e:?}")))?;
        Ok(SerialDevice { inner })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink that records each write it gets.
    #[derive(Clone, Default)]
    struct Record(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Record {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (SerialDevice, Record) {
        let rec = Record::default();
        let irq = EventFd::new(0).unwrap();
        (SerialDevice::new(irq, Box::new(rec.clone())), rec)
    }

    fn send(s: &mut SerialDevice, bytes: &[u8]) {
        for &b in bytes {
            s.write(0, b); // THR
        }
    }

    #[test]
    fn output_goes_out_a_line_at_a_time() {
        let (mut s, rec) = uart();
        send(&mut s, b"HB 1");
        assert!(rec.0.lock().unwrap().is_empty(), "a partial line was written byte by byte");
        assert!(s.output_pending_since().is_some());
        send(&mut s, b"\nHB 2\n");
        assert_eq!(*rec.0.lock().unwrap(), vec![b"HB 1\n".to_vec(), b"HB 2\n".to_vec()]);
        assert!(s.output_pending_since().is_none());
    }

    #[test]
    fn a_partial_line_is_not_lost() {
        let (mut s, rec) = uart();
        send(&mut s, b"login: ");
        s.flush_output();
        assert_eq!(*rec.0.lock().unwrap(), vec![b"login: ".to_vec()]);
        send(&mut s, b"tail without newline");
        drop(s);
        assert_eq!(rec.0.lock().unwrap().last().unwrap(), b"tail without newline");
    }

    #[test]
    fn a_long_line_is_written_once_the_buffer_is_full() {
        let (mut s, rec) = uart();
        send(&mut s, &[b'x'; LINE_MAX + 10]);
        let w = rec.0.lock().unwrap().clone();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].len(), LINE_MAX);
    }
}
