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
/// machine's output thread does so for bytes older than [`PARTIAL_LINE_DELAY`]; a pause, stop and
/// drop do too). A pause that keeps output ([`SerialDevice::hold_output`]: a migration's
/// switch-over, a live update, a checkpoint) leaves a partial line in the state instead, so
/// that the process that runs the guest next writes the whole line.
struct LineOut {
    out: SerialSink,
    pending: Vec<u8>,
    /// When the oldest pending byte arrived.
    since: Option<Instant>,
    /// A partial line is held for the state (a live update): not passed on until released.
    hold: bool,
    /// Output commit (replication): complete output is held here until the checkpoint that
    /// covers it is acknowledged, instead of going out.
    commit: Option<Committed>,
}

/// Output held for output commit (docs/ha.md).
#[derive(Default)]
struct Committed {
    held: Vec<u8>,
    /// Bytes of `held` that the last checkpoint covers.
    barrier: usize,
}

/// Pending bytes that are written even without a newline.
const LINE_MAX: usize = 4096;

impl LineOut {
    fn emit(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.since = None;
        if let Some(c) = self.commit.as_mut() {
            c.held.extend_from_slice(&self.pending);
            self.pending.clear();
            return Ok(());
        }
        let r = self.out.write_all(&self.pending).and_then(|_| self.out.flush());
        self.pending.clear();
        r
    }

    /// Writes `n` held bytes out and drops them from the held buffer.
    fn release(&mut self, n: usize) -> std::io::Result<()> {
        let Some(c) = self.commit.as_mut() else { return Ok(()) };
        let n = n.min(c.held.len());
        if n == 0 {
            return Ok(());
        }
        let r = self.out.write_all(&c.held[..n]).and_then(|_| self.out.flush());
        c.held.drain(..n);
        c.barrier = c.barrier.saturating_sub(n);
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
        // Held output (output commit) is not released here: it belongs to a checkpoint nobody
        // acknowledged, and the backup that takes over releases it. Nor is a partial line held
        // for the state: the state carried it to the process that runs the guest now (a
        // migration's destination), which finishes it; written here too, it would come out
        // twice, the first time cut.
        if self.commit.is_none() && !self.hold {
            let _ = self.emit();
        }
    }
}

/// COM1.
pub struct SerialDevice {
    inner: Serial<IrqTrigger, NoEvents, LineOut>,
}

fn line_out(out: SerialSink) -> LineOut {
    LineOut { out, pending: Vec::with_capacity(256), since: None, hold: false, commit: None }
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
        // Under output commit a partial line waits for its newline too: it stays in the state
        // of the checkpoint that cuts it, and a backup that takes over finishes it whole.
        if self.inner.writer().hold || self.inner.writer().commit.is_some() {
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

    /// Output commit on: from now on output is held until [`Self::release_output`]. Off:
    /// everything held goes out now, and output goes out as it comes again.
    pub fn set_output_commit(&mut self, on: bool) {
        let w = self.inner.writer_mut();
        match (on, w.commit.is_some()) {
            (true, false) => w.commit = Some(Committed::default()),
            (false, true) => {
                let n = w.commit.as_ref().map_or(0, |c| c.held.len());
                let _ = w.release(n);
                w.commit = None;
            }
            _ => {}
        }
    }

    /// Marks everything held so far as covered by the checkpoint being taken (call while the
    /// guest is paused, with the state saved).
    pub fn output_barrier(&mut self) {
        if let Some(c) = self.inner.writer_mut().commit.as_mut() {
            c.barrier = c.held.len();
        }
    }

    /// The checkpoint of the last barrier was acknowledged: its output goes out.
    pub fn release_output(&mut self) {
        let w = self.inner.writer_mut();
        let n = w.commit.as_ref().map_or(0, |c| c.barrier);
        // A failing sink drops the bytes, as for any output.
        let _ = w.release(n);
    }

    /// Bytes of output held back (output commit).
    pub fn held_output(&self) -> usize {
        self.inner.writer().commit.as_ref().map_or(0, |c| c.held.len())
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
/// Optional: complete output held back by output commit (replication): a backup that takes
/// over writes it out first, since the primary may not have.
const TAG_HELD_OUTPUT: u32 = crate::state_codec::OPTIONAL_TAG | 4;
/// Most held output a state section carries.
pub const MAX_HELD_OUTPUT: usize = 16 << 20;

/// The serial section: the UART's registers and buffered input, and output not yet passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialSection {
    pub uart: SerialState,
    /// At most one line's bytes (no newline among them); empty after a plain pause, which
    /// passes them on.
    pub pending_output: Vec<u8>,
    /// Output held back by output commit, not known to be out (replication checkpoints).
    pub held_output: Vec<u8>,
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
        if !self.held_output.is_empty() {
            e.field(TAG_HELD_OUTPUT, &self.held_output);
        }
        e.finish()
    }

    fn decode(_version: u32, bytes: &[u8]) -> Result<SerialSection, SerialStateError> {
        let mut d = Decoder::parse(bytes)?;
        let regs = d.require(TAG_REGS)?;
        let input = d.require(TAG_INPUT)?;
        let pending_output = d.get(TAG_PENDING_OUTPUT).unwrap_or_default().to_vec();
        let held_output = d.get(TAG_HELD_OUTPUT).unwrap_or_default().to_vec();
        d.finish()?;
        if held_output.len() > MAX_HELD_OUTPUT {
            return Err(SerialStateError::InputTooLong(held_output.len()));
        }
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
        Ok(SerialSection { uart, pending_output, held_output })
    }
}

impl Persist for SerialDevice {
    type State = SerialSection;
    /// The interrupt eventfd and where output goes.
    type ConstructorArgs<'a> = (EventFd, SerialSink);
    type Error = SerialStateError;

    fn save(&self) -> Result<SerialSection, SerialStateError> {
        let w = self.inner.writer();
        Ok(SerialSection {
            uart: self.inner.state(),
            pending_output: w.pending.clone(),
            held_output: w.commit.as_ref().map(|c| c.held.clone()).unwrap_or_default(),
        })
    }

    /// A machine restored from a checkpoint (a backup taking over) first writes out the output
    /// the primary held back: the primary may have died before it did (docs/ha.md).
    fn restore((irq, mut out): (EventFd, SerialSink), state: &SerialSection) -> Result<Self, SerialStateError> {
        if !state.held_output.is_empty() {
            // A failing sink drops the bytes, as for any output.
            let _ = out.write_all(&state.held_output).and_then(|_| out.flush());
        }
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
    fn output_commit_holds_lines_until_their_checkpoint_is_released_and_the_state_carries_them() {
        let (mut s, rec) = uart();
        s.set_output_commit(true);
        send(&mut s, b"HB 1\nHB 2\n");
        assert!(rec.0.lock().unwrap().is_empty(), "committed output went out before its checkpoint");
        // Checkpoint: the state carries the held lines; the barrier covers them.
        let st = s.save().unwrap();
        assert_eq!(st.held_output, b"HB 1\nHB 2\n");
        s.output_barrier();
        send(&mut s, b"HB 3\n");
        // The checkpoint is acknowledged: its lines go out, the later one stays held.
        s.release_output();
        assert_eq!(rec.0.lock().unwrap().concat(), b"HB 1\nHB 2\n");
        assert_eq!(s.held_output(), 5);
        // A backup restored from the checkpoint writes the held lines first.
        let rec2 = Record::default();
        let st = SerialSection::decode(1, &st.encode()).unwrap();
        let _b = SerialDevice::restore((EventFd::new(0).unwrap(), Box::new(rec2.clone())), &st).unwrap();
        assert_eq!(rec2.0.lock().unwrap().concat(), b"HB 1\nHB 2\n");
        // Off: what is held goes out, and nothing is held any more.
        s.set_output_commit(false);
        assert_eq!(rec.0.lock().unwrap().concat(), b"HB 1\nHB 2\nHB 3\n");
        send(&mut s, b"HB 4\n");
        assert_eq!(rec.0.lock().unwrap().last().unwrap(), b"HB 4\n");
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
