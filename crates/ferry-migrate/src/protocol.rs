//! The return path and the commit message.
//!
//! After END the destination answers on the same connection with one frame
//! `type u32 | length u32 | body`: ACK (body: load_us u64, restore_us u64, and disk_replay u64
//! only when it is not 0, so that sources from before disks keep reading it) once it has loaded
//! everything, or NACK (body: UTF-8 message) when it refuses. The source then sends the 8 bytes
//! `FERRYCMT`; only then does the destination resume the guest. Little-endian throughout.

use std::io::{Read, Write};

pub const FRAME_ACK: u32 = 1;
pub const FRAME_NACK: u32 = 2;
/// What the source sends to hand the guest over.
pub const COMMIT: &[u8; 8] = b"FERRYCMT";
/// Longest NACK message accepted.
const MAX_NACK: u32 = 4096;

/// Errors of the return path.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the connection failed on the return path")]
    Io(#[from] std::io::Error),
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("unexpected return-path frame type {0}")]
    BadFrame(u32),
    #[error("return-path frame of {0} bytes is too long")]
    TooLong(u32),
    #[error("expected the commit message, got {0:?}")]
    BadCommit([u8; 8]),
}

/// What the destination reports with its ACK.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ack {
    /// Microseconds from END received to the machine ready (state restored).
    pub load_us: u64,
    /// Of which restoring KVM state.
    pub restore_us: u64,
    /// In-flight disk requests the destination will execute again.
    pub disk_replay: u64,
}

pub fn send_ack(w: &mut impl Write, a: Ack) -> std::io::Result<()> {
    // Without disk replays the body stays the 16 bytes every Ferry reads (older sources too).
    let len: u32 = if a.disk_replay == 0 { 16 } else { 24 };
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&FRAME_ACK.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&a.load_us.to_le_bytes());
    b.extend_from_slice(&a.restore_us.to_le_bytes());
    if a.disk_replay != 0 {
        b.extend_from_slice(&a.disk_replay.to_le_bytes());
    }
    w.write_all(&b)?;
    w.flush()
}

pub fn send_nack(w: &mut impl Write, msg: &str) -> std::io::Result<()> {
    let m = &msg.as_bytes()[..msg.len().min(MAX_NACK as usize)];
    let mut b = Vec::with_capacity(8 + m.len());
    b.extend_from_slice(&FRAME_NACK.to_le_bytes());
    b.extend_from_slice(&(m.len() as u32).to_le_bytes());
    b.extend_from_slice(m);
    w.write_all(&b)?;
    w.flush()
}

/// Reads the destination's answer.
pub fn read_answer(r: &mut impl Read) -> Result<Ack, ProtocolError> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h)?;
    let t = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_NACK {
        return Err(ProtocolError::TooLong(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    match t {
        FRAME_ACK if len == 16 || len == 24 => {
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&body[i * 8..i * 8 + 8]);
                u64::from_le_bytes(w)
            };
            let disk_replay = if len == 24 { word(2) } else { 0 };
            Ok(Ack { load_us: word(0), restore_us: word(1), disk_replay })
        }
        FRAME_NACK => Err(ProtocolError::Refused(String::from_utf8_lossy(&body).into_owned())),
        other => Err(ProtocolError::BadFrame(other)),
    }
}

pub fn send_commit(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(COMMIT)?;
    w.flush()
}

pub fn read_commit(r: &mut impl Read) -> Result<(), ProtocolError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    if &b != COMMIT {
        return Err(ProtocolError::BadCommit(b));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_round_trips() {
        let mut buf = Vec::new();
        send_ack(&mut buf, Ack { load_us: 7, restore_us: 3, disk_replay: 5 }).unwrap();

        let a = read_answer(&mut buf.as_slice()).unwrap();

        assert_eq!(a, Ack { load_us: 7, restore_us: 3, disk_replay: 5 });
    }

    #[test]
    fn ack_without_disk_replays_keeps_the_16_byte_body_older_sources_read() {
        let mut buf = Vec::new();
        send_ack(&mut buf, Ack { load_us: 7, restore_us: 3, disk_replay: 0 }).unwrap();

        assert_eq!(buf.len(), 8 + 16);
        assert_eq!(&buf[4..8], &16u32.to_le_bytes());
        assert_eq!(read_answer(&mut buf.as_slice()).unwrap(), Ack { load_us: 7, restore_us: 3, disk_replay: 0 });
    }

    #[test]
    fn nack_becomes_a_refusal_carrying_the_message() {
        let mut buf = Vec::new();
        send_nack(&mut buf, "memory size differs").unwrap();

        let e = read_answer(&mut buf.as_slice()).unwrap_err().to_string();

        assert!(e.contains("memory size differs"), "{e}");
    }

    #[test]
    fn truncated_answer_is_an_error() {
        let mut buf = Vec::new();
        send_ack(&mut buf, Ack::default()).unwrap();

        assert!(read_answer(&mut &buf[..10]).is_err());
    }
}
