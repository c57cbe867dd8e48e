//! The handshake, the return path and the commit message.
//!
//! A migration connection opens with a handshake (format version 2 on): the source sends HELLO
//! (32 bytes: magic `FERRYHLO`, min_format u32, max_format u32, features u64, Ferry version
//! u16×3, reserved u16), the destination answers with its own HELLO, or with a NACK frame when
//! no stream format is readable by both (naming both ranges). Only then does the stream start.
//! A source from before the handshake starts with the stream header (`FERRYMIG`); the
//! destination takes that as a stream of that source's version, so older sources still
//! migrate here. An older destination reads HELLO as a bad stream magic and NACKs; the source
//! says so.
//!
//! After END the destination answers on the same connection with one frame
//! `type u32 | length u32 | body`: ACK (body: load_us u64, restore_us u64, and disk_replay u64
//! only when it is not 0, so that sources from before disks keep reading it) once it has loaded
//! everything, or NACK (body: UTF-8 message) when it refuses. The source then sends the 8 bytes
//! `FERRYCMT`. When both HELLOs have the COMMIT_CONFIRM feature and the migration is not a
//! post-copy, the destination then takes the disks' image locks and answers COMMITTED (an empty
//! frame) before it resumes the guest; a source that sent COMMIT but gets no COMMITTED knows the
//! handover may have failed and finds out who holds the guest (docs/migration.md, "After
//! COMMIT"). Otherwise the destination resumes the guest at COMMIT. Little-endian throughout.

use std::io::{Read, Write};

use ferry_stream::{FORMAT_VERSION, MIN_FORMAT_VERSION};

pub const FRAME_ACK: u32 = 1;
pub const FRAME_NACK: u32 = 2;
/// Replication: the standby has applied a checkpoint (body: sequence u64).
pub const FRAME_CHECKPOINT_ACK: u32 = 3;
/// Post-copy, destination to source: pages a vCPU (or a device) waits for (body: count u32,
/// reserved u32, count × frame u64; count ≤ [`MAX_REQUEST_PAGES`]).
pub const FRAME_PAGE_REQUEST: u32 = 4;
/// Post-copy, destination to source: every page is in place (body: [`PostcopyDone`]).
pub const FRAME_POSTCOPY_DONE: u32 = 5;
/// Post-copy recovery, destination to source on a new connection: the session and the pages it
/// still lacks (body: session u64, count u32, reserved u32, count × (first frame u64, frames u64)).
pub const FRAME_POSTCOPY_RESUME: u32 = 6;
/// Post-copy, destination to source during pre-copy: the pages of a POSTCOPY record that came
/// before the final pass are dropped here (body: session u64); the source may pause now.
pub const FRAME_POSTCOPY_LISTED: u32 = 7;
/// Destination to source after COMMIT (COMMIT_CONFIRM): the destination holds the disks' image
/// locks and runs the guest from now on (empty body).
pub const FRAME_COMMITTED: u32 = 8;
/// Most frames in one PAGE_REQUEST.
pub const MAX_REQUEST_PAGES: usize = 256;
/// Longest POSTCOPY_RESUME body (every run of a fragmented 1 TiB guest fits).
const MAX_RESUME: u32 = 64 << 20;
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
    #[error(
        "no stream format both sides read: the source writes format versions {source_min} to {source_max}, the \
         destination reads {dest_min} to {dest_max}"
    )]
    Incompatible { source_min: u32, source_max: u32, dest_min: u32, dest_max: u32 },
    #[error(
        "the destination does not speak Ferry's handshake (a Ferry older than format version 2?); it answered: {0}"
    )]
    NoHandshake(String),
    #[error("the peer's handshake has non-zero reserved bytes")]
    HelloReserved,
    #[error("not a page channel of this migration: {0}")]
    NotOurChannel(String),
}

/// Magic of a HELLO.
pub const HELLO_MAGIC: &[u8; 8] = b"FERRYHLO";
/// Size of a HELLO.
pub const HELLO_LEN: usize = 32;

/// What a side serves, in a HELLO's feature bits.
pub mod features {
    /// CPU_MODEL records: the destination checks the guest's CPU before loading.
    pub const CPU_MODEL: u64 = 1 << 0;
    /// The optional FINAL_PASS record.
    pub const FINAL_PASS: u64 = 1 << 1;
    /// Disk requests in flight replayed by the destination (the ACK reports how many).
    pub const DISK_REPLAY: u64 = 1 << 2;
    /// Post-copy: the POSTCOPY record, the post-copy page stream and its return-path frames.
    pub const POSTCOPY: u64 = 1 << 3;
    /// The destination confirms COMMIT with a COMMITTED frame once it holds the disks' locks.
    pub const COMMIT_CONFIRM: u64 = 1 << 4;
    /// PAGE_BATCH_ZSTD records: page data as zstd frames (`ferry migrate --compress zstd`).
    pub const ZSTD_PAGES: u64 = 1 << 5;
    /// Page data over several connections: the CHANNELS record and channel connections
    /// (`ferry migrate --channels N`).
    pub const CHANNELS: u64 = 1 << 6;
    /// Everything this Ferry serves.
    pub const ALL: u64 = CPU_MODEL | FINAL_PASS | DISK_REPLAY | POSTCOPY | COMMIT_CONFIRM | ZSTD_PAGES | CHANNELS;
}

/// One side's HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub min_format: u32,
    pub max_format: u32,
    pub features: u64,
    pub ferry_version: (u16, u16, u16),
}

impl Hello {
    /// This Ferry's HELLO.
    pub fn ours() -> Hello {
        let h = ferry_stream::StreamHeader::new(ferry_stream::StreamFlags::empty());
        Hello {
            min_format: MIN_FORMAT_VERSION,
            max_format: FORMAT_VERSION,
            features: features::ALL,
            ferry_version: h.writer_version,
        }
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(HELLO_MAGIC);
        b[8..12].copy_from_slice(&self.min_format.to_le_bytes());
        b[12..16].copy_from_slice(&self.max_format.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..26].copy_from_slice(&self.ferry_version.0.to_le_bytes());
        b[26..28].copy_from_slice(&self.ferry_version.1.to_le_bytes());
        b[28..30].copy_from_slice(&self.ferry_version.2.to_le_bytes());
        b
    }

    /// Decodes the 24 bytes after the magic.
    pub fn decode_after_magic(b: &[u8; HELLO_LEN - 8]) -> Result<Hello, ProtocolError> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        if u16_at(22) != 0 {
            return Err(ProtocolError::HelloReserved);
        }
        let mut f = [0u8; 8];
        f.copy_from_slice(&b[8..16]);
        Ok(Hello {
            min_format: u32_at(0),
            max_format: u32_at(4),
            features: u64::from_le_bytes(f),
            ferry_version: (u16_at(16), u16_at(18), u16_at(20)),
        })
    }
}

/// The format version a source writing `ours.max_format` can use with a destination that
/// answered `theirs` (a source writes only its own current version).
pub fn agree_as_source(ours: &Hello, theirs: &Hello) -> Result<u32, ProtocolError> {
    if (theirs.min_format..=theirs.max_format).contains(&ours.max_format) {
        Ok(ours.max_format)
    } else {
        Err(ProtocolError::Incompatible {
            source_min: ours.max_format,
            source_max: ours.max_format,
            dest_min: theirs.min_format,
            dest_max: theirs.max_format,
        })
    }
}

/// Whether a destination of `ours` reads a stream from a source that offers `theirs`.
pub fn agree_as_destination(ours: &Hello, theirs: &Hello) -> Result<(), ProtocolError> {
    let lo = ours.min_format.max(theirs.min_format);
    let hi = ours.max_format.min(theirs.max_format);
    if lo > hi || !(ours.min_format..=ours.max_format).contains(&theirs.max_format) {
        return Err(ProtocolError::Incompatible {
            source_min: theirs.min_format,
            source_max: theirs.max_format,
            dest_min: ours.min_format,
            dest_max: ours.max_format,
        });
    }
    Ok(())
}

/// Source: sends our HELLO and reads the destination's answer.
pub fn source_handshake(c: &mut (impl Read + Write)) -> Result<Hello, ProtocolError> {
    let ours = Hello::ours();
    c.write_all(&ours.encode())?;
    c.flush()?;
    let mut head = [0u8; 8];
    c.read_exact(&mut head)?;
    if &head == HELLO_MAGIC {
        let mut rest = [0u8; HELLO_LEN - 8];
        c.read_exact(&mut rest)?;
        let theirs = Hello::decode_after_magic(&rest)?;
        agree_as_source(&ours, &theirs)?;
        return Ok(theirs);
    }
    // Not a HELLO: a refusal frame (from a destination that does speak the handshake, or from
    // one that took our HELLO for a bad stream header).
    match read_answer(&mut head.as_slice().chain(c)) {
        Err(ProtocolError::Refused(m)) if m.contains("FERRYHLO") || m.contains("not a Ferry stream") => {
            Err(ProtocolError::NoHandshake(m))
        }
        Err(e) => Err(e),
        Ok(_) => Err(ProtocolError::BadFrame(FRAME_ACK)),
    }
}

/// Magic of a CHANNEL_HELLO, the first bytes of a page channel's connection.
pub const CHANNEL_HELLO_MAGIC: &[u8; 8] = b"FERRYCHN";
/// Size of a CHANNEL_HELLO.
pub const CHANNEL_HELLO_LEN: usize = 32;

/// The opening of a page channel (`--channels`): magic `FERRYCHN`, session u64, index u32
/// (1 to count - 1; 0 is the main connection), count u32, reserved u64. The channel's stream
/// (header flag CHANNEL) follows. No answer: the destination closes a connection it does not
/// take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelHello {
    pub session: u64,
    pub index: u32,
    pub count: u32,
}

impl ChannelHello {
    pub fn encode(&self) -> [u8; CHANNEL_HELLO_LEN] {
        let mut b = [0u8; CHANNEL_HELLO_LEN];
        b[..8].copy_from_slice(CHANNEL_HELLO_MAGIC);
        b[8..16].copy_from_slice(&self.session.to_le_bytes());
        b[16..20].copy_from_slice(&self.index.to_le_bytes());
        b[20..24].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    /// Decodes a CHANNEL_HELLO and checks it against the CHANNELS record of `session` with
    /// `count` channels.
    pub fn decode(b: &[u8; CHANNEL_HELLO_LEN], session: u64, count: u32) -> Result<ChannelHello, ProtocolError> {
        let bad = |m: String| Err(ProtocolError::NotOurChannel(m));
        if &b[..8] != CHANNEL_HELLO_MAGIC {
            return bad(format!("it starts with {:?}, not {:?}", String::from_utf8_lossy(&b[..8]), "FERRYCHN"));
        }
        if b[24..].iter().any(|&x| x != 0) {
            return bad("its reserved bytes are not zero".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[8..16]);
        let h = ChannelHello { session: u64::from_le_bytes(w), index: u32_at(16), count: u32_at(20) };
        if h.session != session {
            return bad(format!("session {:#018x}, this migration's is {session:#018x}", h.session));
        }
        if h.count != count || h.index == 0 || h.index >= count {
            return bad(format!("channel {} of {}, this migration has {count}", h.index, h.count));
        }
        Ok(h)
    }
}

/// What a destination found at the start of a connection.
pub enum Opening {
    /// A source with the handshake, answered: the stream follows.
    Hello(Hello),
    /// A source from before the handshake: these 8 bytes are the start of its stream header.
    Stream([u8; 8]),
}

/// Destination: reads the source's HELLO and answers it (NACK naming both ranges when no
/// format fits), or recognises a stream from a source without the handshake.
pub fn destination_handshake(c: &mut (impl Read + Write)) -> Result<Opening, ProtocolError> {
    let mut head = [0u8; 8];
    c.read_exact(&mut head)?;
    if &head != HELLO_MAGIC {
        return Ok(Opening::Stream(head));
    }
    let mut rest = [0u8; HELLO_LEN - 8];
    c.read_exact(&mut rest)?;
    let theirs = Hello::decode_after_magic(&rest)?;
    let ours = Hello::ours();
    if let Err(e) = agree_as_destination(&ours, &theirs) {
        let _ = send_nack(c, &e.to_string());
        return Err(e);
    }
    c.write_all(&ours.encode())?;
    c.flush()?;
    Ok(Opening::Hello(theirs))
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
    /// [`ACK_TOKEN_LOCK_SEEN`]; sent (a 32-byte body) only to a source with COMMIT_CONFIRM.
    pub flags: u64,
}

/// ACK flag: the destination sees the source's lock on the first writable disk's image, so the
/// two see each other's locks and that lock can settle who holds the guest after COMMIT.
pub const ACK_TOKEN_LOCK_SEEN: u64 = 1;

pub fn send_ack(w: &mut impl Write, a: Ack) -> std::io::Result<()> {
    // Without disk replays the body stays the 16 bytes every Ferry reads (older sources too);
    // flags go only to sources with COMMIT_CONFIRM, which read 32.
    let len: u32 = if a.flags != 0 {
        32
    } else if a.disk_replay == 0 {
        16
    } else {
        24
    };
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&FRAME_ACK.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&a.load_us.to_le_bytes());
    b.extend_from_slice(&a.restore_us.to_le_bytes());
    if len >= 24 {
        b.extend_from_slice(&a.disk_replay.to_le_bytes());
    }
    if len == 32 {
        b.extend_from_slice(&a.flags.to_le_bytes());
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

/// Reads one return-path frame: (type, body), the body at most [`MAX_NACK`] bytes (a
/// POSTCOPY_RESUME at most [`MAX_RESUME`]). A NACK is returned as the refusal it carries.
pub(crate) fn read_frame(r: &mut impl Read) -> Result<(u32, Vec<u8>), ProtocolError> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h)?;
    let t = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len > if t == FRAME_POSTCOPY_RESUME { MAX_RESUME } else { MAX_NACK } {
        return Err(ProtocolError::TooLong(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    if t == FRAME_NACK {
        return Err(ProtocolError::Refused(String::from_utf8_lossy(&body).into_owned()));
    }
    Ok((t, body))
}

/// Reads the destination's answer.
pub fn read_answer(r: &mut impl Read) -> Result<Ack, ProtocolError> {
    let (t, body) = read_frame(r)?;
    let len = body.len();
    match t {
        FRAME_ACK if len == 16 || len == 24 || len == 32 => {
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&body[i * 8..i * 8 + 8]);
                u64::from_le_bytes(w)
            };
            let disk_replay = if len >= 24 { word(2) } else { 0 };
            let flags = if len == 32 { word(3) } else { 0 };
            Ok(Ack { load_us: word(0), restore_us: word(1), disk_replay, flags })
        }
        other => Err(ProtocolError::BadFrame(other)),
    }
}

/// Standby: checkpoint `seq` is applied (the primary may release the output it covers).
pub fn send_checkpoint_ack(w: &mut impl Write, seq: u64) -> std::io::Result<()> {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&FRAME_CHECKPOINT_ACK.to_le_bytes());
    b[4..8].copy_from_slice(&8u32.to_le_bytes());
    b[8..].copy_from_slice(&seq.to_le_bytes());
    w.write_all(&b)?;
    w.flush()
}

/// Primary: the standby's acknowledgement of a checkpoint (or its refusal).
pub fn read_checkpoint_ack(r: &mut impl Read) -> Result<u64, ProtocolError> {
    match read_frame(r)? {
        (FRAME_CHECKPOINT_ACK, body) if body.len() == 8 => {
            let mut w = [0u8; 8];
            w.copy_from_slice(&body);
            Ok(u64::from_le_bytes(w))
        }
        (other, _) => Err(ProtocolError::BadFrame(other)),
    }
}

/// What the post-copy destination reports once every page is in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PostcopyDone {
    /// Pages that arrived in the post-copy page stream.
    pub pages: u64,
    /// Faults on pages that were still at the source (each one a request).
    pub remote_faults: u64,
    /// Faults on pages that were zero (filled here).
    pub zero_faults: u64,
    /// Fault to page in place, over the remote faults: median, 99th percentile, longest (µs).
    pub fault_p50_us: u64,
    pub fault_p99_us: u64,
    pub fault_max_us: u64,
}

impl PostcopyDone {
    const LEN: usize = 48;
    fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        let words =
            [self.pages, self.remote_faults, self.zero_faults, self.fault_p50_us, self.fault_p99_us, self.fault_max_us];
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(w)
}

fn send_frame(w: &mut impl Write, t: u32, body: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(8 + body.len());
    b.extend_from_slice(&t.to_le_bytes());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(body);
    w.write_all(&b)?;
    w.flush()
}

/// Post-copy destination: asks for `gfns` (at most [`MAX_REQUEST_PAGES`]).
pub fn send_page_request(w: &mut impl Write, gfns: &[u64]) -> std::io::Result<()> {
    let gfns = &gfns[..gfns.len().min(MAX_REQUEST_PAGES)];
    let mut b = Vec::with_capacity(8 + 8 * gfns.len());
    b.extend_from_slice(&(gfns.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for g in gfns {
        b.extend_from_slice(&g.to_le_bytes());
    }
    send_frame(w, FRAME_PAGE_REQUEST, &b)
}

pub fn send_postcopy_done(w: &mut impl Write, d: &PostcopyDone) -> std::io::Result<()> {
    send_frame(w, FRAME_POSTCOPY_DONE, &d.encode())
}

/// Post-copy recovery: the destination's session and the runs of pages it still lacks.
pub fn send_postcopy_resume(w: &mut impl Write, session: u64, runs: &[(u64, u64)]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(16 + 16 * runs.len());
    b.extend_from_slice(&session.to_le_bytes());
    b.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for &(f, n) in runs {
        b.extend_from_slice(&f.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
    }
    send_frame(w, FRAME_POSTCOPY_RESUME, &b)
}

pub fn send_postcopy_listed(w: &mut impl Write, session: u64) -> std::io::Result<()> {
    send_frame(w, FRAME_POSTCOPY_LISTED, &session.to_le_bytes())
}

/// Source: the destination dropped the pages of the POSTCOPY record of `session` (or refused).
pub fn read_postcopy_listed(r: &mut impl Read, session: u64) -> Result<(), ProtocolError> {
    match read_frame(r)? {
        (FRAME_POSTCOPY_LISTED, b) if b.len() == 8 && u64_at(&b, 0) == session => Ok(()),
        (t, _) => Err(ProtocolError::BadFrame(t)),
    }
}

/// A frame the post-copy source reads from its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostcopyFrame {
    Request(Vec<u64>),
    Done(PostcopyDone),
    Resume { session: u64, runs: Vec<(u64, u64)> },
}

/// Reads one post-copy return-path frame.
pub fn read_postcopy_frame(r: &mut impl Read) -> Result<PostcopyFrame, ProtocolError> {
    let (t, body) = read_frame(r)?;
    let bad = || ProtocolError::BadFrame(t);
    let counted = |hdr: usize, each: usize| -> Result<usize, ProtocolError> {
        if body.len() < hdr {
            return Err(bad());
        }
        let n = u32::from_le_bytes([body[hdr - 8], body[hdr - 7], body[hdr - 6], body[hdr - 5]]) as usize;
        if body[hdr - 4..hdr] != [0; 4] || body.len() != hdr + n * each {
            return Err(bad());
        }
        Ok(n)
    };
    match t {
        FRAME_PAGE_REQUEST => {
            let n = counted(8, 8)?;
            Ok(PostcopyFrame::Request((0..n).map(|i| u64_at(&body, 8 + 8 * i)).collect()))
        }
        FRAME_POSTCOPY_DONE if body.len() == PostcopyDone::LEN => Ok(PostcopyFrame::Done(PostcopyDone {
            pages: u64_at(&body, 0),
            remote_faults: u64_at(&body, 8),
            zero_faults: u64_at(&body, 16),
            fault_p50_us: u64_at(&body, 24),
            fault_p99_us: u64_at(&body, 32),
            fault_max_us: u64_at(&body, 40),
        })),
        FRAME_POSTCOPY_RESUME => {
            let n = counted(16, 16)?;
            let runs = (0..n).map(|i| (u64_at(&body, 16 + 16 * i), u64_at(&body, 24 + 16 * i))).collect();
            Ok(PostcopyFrame::Resume { session: u64_at(&body, 0), runs })
        }
        other => Err(ProtocolError::BadFrame(other)),
    }
}

pub fn send_commit(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(COMMIT)?;
    w.flush()
}

/// Destination, COMMIT_CONFIRM: the guest is ours now.
pub fn send_committed(w: &mut impl Write) -> std::io::Result<()> {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&FRAME_COMMITTED.to_le_bytes());
    w.write_all(&b)?;
    w.flush()
}

/// Source, COMMIT_CONFIRM: the destination's COMMITTED.
pub fn read_committed(r: &mut impl Read) -> Result<(), ProtocolError> {
    match read_frame(r)? {
        (FRAME_COMMITTED, body) if body.is_empty() => Ok(()),
        (t, _) => Err(ProtocolError::BadFrame(t)),
    }
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
    fn a_channel_hello_of_another_session_index_or_count_is_refused() {
        let ok = ChannelHello { session: 0xabcd, index: 2, count: 3 };
        assert_eq!(ChannelHello::decode(&ok.encode(), 0xabcd, 3).unwrap(), ok);
        let mut reserved = ok.encode();
        reserved[31] = 1;
        let mut magic = ok.encode();
        magic[..8].copy_from_slice(b"FERRYHLO");
        for (b, want) in [
            (ChannelHello { session: 0xabce, ..ok }.encode(), "session 0x000000000000abce"),
            (ChannelHello { index: 0, ..ok }.encode(), "channel 0 of 3"),
            (ChannelHello { index: 3, ..ok }.encode(), "channel 3 of 3"),
            (ChannelHello { count: 4, ..ok }.encode(), "this migration has 3"),
            (reserved, "reserved bytes"),
            (magic, "FERRYHLO"),
        ] {
            let e = ChannelHello::decode(&b, 0xabcd, 3).unwrap_err().to_string();
            assert!(e.contains("not a page channel of this migration") && e.contains(want), "want {want:?}: {e}");
        }
    }

    fn hello(min: u32, max: u32) -> Hello {
        Hello { min_format: min, max_format: max, features: features::ALL, ferry_version: (0, 1, 0) }
    }

    #[test]
    fn hello_round_trips() {
        let h = hello(1, 2);
        let b = h.encode();
        assert_eq!(&b[..8], HELLO_MAGIC);
        assert_eq!(Hello::decode_after_magic(b[8..].try_into().unwrap()).unwrap(), h);
    }

    #[test]
    fn a_destination_that_reads_only_newer_formats_is_refused_naming_both_ranges() {
        let e = agree_as_source(&hello(1, 2), &hello(7, 9)).unwrap_err().to_string();
        assert_eq!(
            e,
            "no stream format both sides read: the source writes format versions 2 to 2, the destination reads 7 to 9"
        );
    }

    #[test]
    fn a_destination_refuses_a_source_that_writes_a_format_it_does_not_read() {
        assert!(agree_as_destination(&hello(1, 2), &hello(1, 2)).is_ok());
        // An older source (writes 1) to this destination (reads 1 to 2): fine.
        assert!(agree_as_destination(&hello(1, 2), &hello(1, 1)).is_ok());
        let e = agree_as_destination(&hello(1, 2), &hello(3, 3)).unwrap_err().to_string();
        assert!(e.contains("source writes format versions 3 to 3") && e.contains("destination reads 1 to 2"), "{e}");
    }

    #[test]
    fn the_handshake_over_a_socket_pair_agrees_and_an_old_stream_is_recognised() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || destination_handshake(&mut b).map(|o| matches!(o, Opening::Hello(_))));
        let theirs = source_handshake(&mut a).unwrap();
        assert_eq!(theirs.max_format, FORMAT_VERSION);
        assert!(t.join().unwrap().unwrap());

        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.write_all(b"FERRYMIG").unwrap();
        assert!(matches!(destination_handshake(&mut b).unwrap(), Opening::Stream(h) if &h == b"FERRYMIG"));
    }

    #[test]
    fn ack_round_trips() {
        let mut buf = Vec::new();
        send_ack(&mut buf, Ack { load_us: 7, restore_us: 3, disk_replay: 5, flags: 0 }).unwrap();

        let a = read_answer(&mut buf.as_slice()).unwrap();

        assert_eq!(a, Ack { load_us: 7, restore_us: 3, disk_replay: 5, flags: 0 });
    }

    #[test]
    fn ack_without_disk_replays_keeps_the_16_byte_body_older_sources_read() {
        let mut buf = Vec::new();
        send_ack(&mut buf, Ack { load_us: 7, restore_us: 3, disk_replay: 0, flags: 0 }).unwrap();

        assert_eq!(buf.len(), 8 + 16);
        assert_eq!(&buf[4..8], &16u32.to_le_bytes());
        assert_eq!(
            read_answer(&mut buf.as_slice()).unwrap(),
            Ack { load_us: 7, restore_us: 3, disk_replay: 0, flags: 0 }
        );
    }

    #[test]
    fn nack_becomes_a_refusal_carrying_the_message() {
        let mut buf = Vec::new();
        send_nack(&mut buf, "memory size differs").unwrap();

        let e = read_answer(&mut buf.as_slice()).unwrap_err().to_string();

        assert!(e.contains("memory size differs"), "{e}");
    }

    #[test]
    fn postcopy_frames_round_trip_and_bad_counts_are_refused() {
        let mut buf = Vec::new();
        send_page_request(&mut buf, &[7, 0x1234]).unwrap();
        let done = PostcopyDone {
            pages: 9,
            remote_faults: 3,
            zero_faults: 2,
            fault_p50_us: 40,
            fault_p99_us: 90,
            fault_max_us: 120,
        };
        send_postcopy_done(&mut buf, &done).unwrap();
        send_postcopy_resume(&mut buf, 0xfeed, &[(0x10, 4), (0x100, 1)]).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(read_postcopy_frame(&mut r).unwrap(), PostcopyFrame::Request(vec![7, 0x1234]));
        assert_eq!(read_postcopy_frame(&mut r).unwrap(), PostcopyFrame::Done(done));
        assert_eq!(
            read_postcopy_frame(&mut r).unwrap(),
            PostcopyFrame::Resume { session: 0xfeed, runs: vec![(0x10, 4), (0x100, 1)] }
        );
        // A request whose count claims more frames than its body has.
        let mut bad = Vec::new();
        send_page_request(&mut bad, &[1]).unwrap();
        bad[8] = 2;
        assert!(matches!(read_postcopy_frame(&mut bad.as_slice()), Err(ProtocolError::BadFrame(FRAME_PAGE_REQUEST))));
        // The ACK is not a post-copy frame.
        let mut ack = Vec::new();
        send_ack(&mut ack, Ack::default()).unwrap();
        assert!(matches!(read_postcopy_frame(&mut ack.as_slice()), Err(ProtocolError::BadFrame(FRAME_ACK))));
    }

    #[test]
    fn ack_flags_go_in_a_32_byte_body_with_the_replay_count() {
        let mut buf = Vec::new();
        let a = Ack { load_us: 7, restore_us: 3, disk_replay: 0, flags: ACK_TOKEN_LOCK_SEEN };
        send_ack(&mut buf, a).unwrap();
        assert_eq!(&buf[4..8], &32u32.to_le_bytes());
        assert_eq!(read_answer(&mut buf.as_slice()).unwrap(), a);
    }

    #[test]
    fn committed_round_trips_and_anything_else_is_refused() {
        let mut buf = Vec::new();
        send_committed(&mut buf).unwrap();
        assert_eq!(buf, [8, 0, 0, 0, 0, 0, 0, 0]);
        read_committed(&mut buf.as_slice()).unwrap();
        let mut ack = Vec::new();
        send_ack(&mut ack, Ack::default()).unwrap();
        assert!(matches!(read_committed(&mut ack.as_slice()), Err(ProtocolError::BadFrame(FRAME_ACK))));
        let mut nack = Vec::new();
        send_nack(&mut nack, "no locks").unwrap();
        assert!(matches!(read_committed(&mut nack.as_slice()), Err(ProtocolError::Refused(m)) if m == "no locks"));
        // A COMMITTED with a body is not one.
        let long = [8u8, 0, 0, 0, 1, 0, 0, 0, 0];
        assert!(matches!(read_committed(&mut long.as_slice()), Err(ProtocolError::BadFrame(8))));
        assert!(matches!(read_committed(&mut [8u8, 0, 0].as_slice()), Err(ProtocolError::Io(_))));
    }

    #[test]
    fn truncated_answer_is_an_error() {
        let mut buf = Vec::new();
        send_ack(&mut buf, Ack::default()).unwrap();

        assert!(read_answer(&mut &buf[..10]).is_err());
    }
}
