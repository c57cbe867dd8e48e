//! The virtio-blk device state section ("virtio-blk", one instance per disk, version 1).
//!
//! Body: state_codec fields (docs/machine-state.md), all little-endian:
//! - tag 1 CONFIG: sectors u64, readonly u32, reserved u32 (0)
//! - tag 2 TRANSPORT: status u32, device_features_sel u32, driver_features_sel u32, queue_sel u32,
//!   interrupt_status u32, config_generation u32, driver_features u64
//! - tag 3 QUEUE: max_size u16, size u16, next_avail u16, next_used u16, ready u32, event_idx u32,
//!   desc_table u64, avail_ring u64, used_ring u64
//! - tag 4 IN_FLIGHT: count u32, reserved u32, then per request in the order the device took
//!   them from the avail ring: head u16, reserved u16, kind u32, sector u64, status_gpa u64,
//!   segments u32, reserved u32, then per segment gpa u64, len u32, writable u32 (0/1)
//!
//! The in-flight requests are the ones the device had popped and not yet put on the used ring
//! when it quiesced, whether or not they finished since: the destination executes them again.

use virtio_queue::QueueState;

use crate::persist::SectionState;
use crate::state_codec::{Decoder, Encoder, StateCodecError};

/// Version of the virtio-blk state section.
pub const BLOCK_STATE_VERSION: u32 = 1;
/// Section id of a virtio-blk device in a stream (the instance is the disk's index).
pub const BLOCK_SECTION_ID: &str = "virtio-blk";
/// Most segments one request may have (a 256-entry queue cannot chain more).
pub const MAX_SEGMENTS: usize = 256;
/// Most in-flight requests (the queue's largest size).
pub const MAX_IN_FLIGHT: usize = 256;

const TAG_CONFIG: u32 = 1;
const TAG_TRANSPORT: u32 = 2;
const TAG_QUEUE: u32 = 3;
const TAG_IN_FLIGHT: u32 = 4;

/// Errors of decoding the section.
#[derive(Debug, thiserror::Error)]
pub enum BlockStateError {
    #[error("malformed virtio-blk state section")]
    Codec(#[from] StateCodecError),
    #[error("virtio-blk state field {0} has the wrong length {1}")]
    Length(&'static str, usize),
    #[error("virtio-blk state lists {0} in-flight requests, more than a queue holds")]
    TooManyInFlight(usize),
    #[error("virtio-blk in-flight request has {0} segments, more than a queue can chain")]
    TooManySegments(usize),
    #[error("virtio-blk state field {0} has non-zero reserved bytes")]
    Reserved(&'static str),
}

/// The transport registers of a virtio-mmio device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub driver_features: u64,
}

/// One data segment of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    pub len: u32,
    /// The device writes it (a read request's buffer).
    pub writable: bool,
}

/// A request as the device parsed it from its descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: u16,
    pub kind: u32,
    pub sector: u64,
    pub status_gpa: u64,
    pub segments: Vec<Segment>,
}

impl Request {
    pub fn data_len(&self) -> u64 {
        self.segments.iter().map(|s| s.len as u64).sum()
    }
}

/// Everything a virtio-blk device needs to continue elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockState {
    pub sectors: u64,
    pub readonly: bool,
    pub transport: TransportState,
    pub queue: QueueState,
    pub in_flight: Vec<Request>,
}

struct Rd<'a>(&'a [u8], &'static str);
impl Rd<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], BlockStateError> {
        if self.0.len() < N {
            return Err(BlockStateError::Length(self.1, self.0.len()));
        }
        let mut a = [0u8; N];
        a.copy_from_slice(&self.0[..N]);
        self.0 = &self.0[N..];
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, BlockStateError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, BlockStateError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, BlockStateError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn zero32(&mut self) -> Result<(), BlockStateError> {
        match self.u32()? {
            0 => Ok(()),
            _ => Err(BlockStateError::Reserved(self.1)),
        }
    }
    fn zero16(&mut self) -> Result<(), BlockStateError> {
        match self.u16()? {
            0 => Ok(()),
            _ => Err(BlockStateError::Reserved(self.1)),
        }
    }
    fn done(&self) -> Result<(), BlockStateError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(BlockStateError::Length(self.1, n)),
        }
    }
}

impl SectionState for BlockState {
    const NAME: &'static str = BLOCK_SECTION_ID;
    const VERSION: u32 = BLOCK_STATE_VERSION;
    /// Version 1 is the first: there is no previous one.
    const READS: &'static [u32] = &[1];
    type Error = BlockStateError;

    fn encode(&self) -> Vec<u8> {
        let mut cfg = Vec::with_capacity(16);
        cfg.extend_from_slice(&self.sectors.to_le_bytes());
        cfg.extend_from_slice(&(self.readonly as u32).to_le_bytes());
        cfg.extend_from_slice(&0u32.to_le_bytes());
        let t = &self.transport;
        let mut tr = Vec::with_capacity(32);
        for v in [t.status, t.device_features_sel, t.driver_features_sel, t.queue_sel, t.interrupt_status] {
            tr.extend_from_slice(&v.to_le_bytes());
        }
        tr.extend_from_slice(&t.config_generation.to_le_bytes());
        tr.extend_from_slice(&t.driver_features.to_le_bytes());
        let q = &self.queue;
        let mut qb = Vec::with_capacity(40);
        for v in [q.max_size, q.size, q.next_avail, q.next_used] {
            qb.extend_from_slice(&v.to_le_bytes());
        }
        qb.extend_from_slice(&(q.ready as u32).to_le_bytes());
        qb.extend_from_slice(&(q.event_idx_enabled as u32).to_le_bytes());
        for v in [q.desc_table, q.avail_ring, q.used_ring] {
            qb.extend_from_slice(&v.to_le_bytes());
        }
        let mut fl = Vec::new();
        fl.extend_from_slice(&(self.in_flight.len() as u32).to_le_bytes());
        fl.extend_from_slice(&0u32.to_le_bytes());
        for r in &self.in_flight {
            fl.extend_from_slice(&r.head.to_le_bytes());
            fl.extend_from_slice(&0u16.to_le_bytes());
            fl.extend_from_slice(&r.kind.to_le_bytes());
            fl.extend_from_slice(&r.sector.to_le_bytes());
            fl.extend_from_slice(&r.status_gpa.to_le_bytes());
            fl.extend_from_slice(&(r.segments.len() as u32).to_le_bytes());
            fl.extend_from_slice(&0u32.to_le_bytes());
            for s in &r.segments {
                fl.extend_from_slice(&s.gpa.to_le_bytes());
                fl.extend_from_slice(&s.len.to_le_bytes());
                fl.extend_from_slice(&(s.writable as u32).to_le_bytes());
            }
        }
        Encoder::new()
            .field(TAG_CONFIG, &cfg)
            .field(TAG_TRANSPORT, &tr)
            .field(TAG_QUEUE, &qb)
            .field(TAG_IN_FLIGHT, &fl)
            .finish()
    }

    fn decode(_version: u32, b: &[u8]) -> Result<Self, BlockStateError> {
        let mut d = Decoder::parse(b)?;
        let mut c = Rd(d.require(TAG_CONFIG)?, "config");
        let sectors = c.u64()?;
        let readonly = c.u32()? != 0;
        c.zero32()?;
        c.done()?;
        let mut t = Rd(d.require(TAG_TRANSPORT)?, "transport");
        let transport = TransportState {
            status: t.u32()?,
            device_features_sel: t.u32()?,
            driver_features_sel: t.u32()?,
            queue_sel: t.u32()?,
            interrupt_status: t.u32()?,
            config_generation: t.u32()?,
            driver_features: t.u64()?,
        };
        t.done()?;
        let mut q = Rd(d.require(TAG_QUEUE)?, "queue");
        let (max_size, size, next_avail, next_used) = (q.u16()?, q.u16()?, q.u16()?, q.u16()?);
        let (ready, event_idx_enabled) = (q.u32()? != 0, q.u32()? != 0);
        let queue = QueueState {
            max_size,
            size,
            next_avail,
            next_used,
            ready,
            event_idx_enabled,
            desc_table: q.u64()?,
            avail_ring: q.u64()?,
            used_ring: q.u64()?,
        };
        q.done()?;
        let mut f = Rd(d.require(TAG_IN_FLIGHT)?, "in-flight");
        let n = f.u32()? as usize;
        f.zero32()?;
        if n > MAX_IN_FLIGHT {
            return Err(BlockStateError::TooManyInFlight(n));
        }
        let mut in_flight = Vec::with_capacity(n);
        for _ in 0..n {
            let head = f.u16()?;
            f.zero16()?;
            let kind = f.u32()?;
            let sector = f.u64()?;
            let status_gpa = f.u64()?;
            let nseg = f.u32()? as usize;
            f.zero32()?;
            if nseg > MAX_SEGMENTS {
                return Err(BlockStateError::TooManySegments(nseg));
            }
            let mut segments = Vec::with_capacity(nseg);
            for _ in 0..nseg {
                segments.push(Segment { gpa: f.u64()?, len: f.u32()?, writable: f.u32()? != 0 });
            }
            in_flight.push(Request { head, kind, sector, status_gpa, segments });
        }
        f.done()?;
        d.finish()?;
        Ok(BlockState { sectors, readonly, transport, queue, in_flight })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BlockState {
        BlockState {
            sectors: 524288,
            readonly: false,
            transport: TransportState {
                status: 15,
                device_features_sel: 1,
                driver_features_sel: 0,
                queue_sel: 0,
                interrupt_status: 1,
                config_generation: 0,
                driver_features: (1 << 32) | (1 << 9),
            },
            queue: QueueState {
                max_size: 256,
                size: 64,
                next_avail: 65530,
                next_used: 65527,
                ready: true,
                event_idx_enabled: false,
                desc_table: 0x10_0000,
                avail_ring: 0x10_1000,
                used_ring: 0x10_2000,
            },
            in_flight: vec![
                Request {
                    head: 3,
                    kind: 1,
                    sector: 80,
                    status_gpa: 0x20_0010,
                    segments: vec![Segment { gpa: 0x30_0000, len: 4096, writable: false }],
                },
                Request { head: 9, kind: 4, sector: 0, status_gpa: 0x20_0020, segments: vec![] },
            ],
        }
    }

    #[test]
    fn state_round_trips_with_its_in_flight_requests_in_order() {
        let s = sample();
        assert_eq!(<BlockState as SectionState>::decode(1, &s.encode()).unwrap(), s);
    }

    #[test]
    fn golden_v1_section_is_what_this_version_writes_and_reads_back() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1-virtio-blk-state.bin");
        let written = sample().encode();
        if std::env::var("FERRY_BLESS").is_ok() {
            std::fs::write(path, &written).unwrap();
        }
        let fixture = std::fs::read(path).unwrap();

        let decoded = <BlockState as SectionState>::decode(1, &fixture).unwrap();

        assert_eq!(written, fixture, "the encoder no longer produces the v1 section byte for byte");
        assert_eq!(decoded, sample());
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let b = sample().encode();
        for n in 0..b.len() {
            assert!(<BlockState as SectionState>::decode(1, &b[..n]).is_err(), "truncated to {n} decoded");
        }
    }

    #[test]
    fn an_absurd_in_flight_count_is_refused_before_allocating() {
        let mut s = sample();
        s.in_flight.clear();
        let mut b = s.encode();
        // The IN_FLIGHT field is last: its body starts with the count.
        let at = b.len() - 8;
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(<BlockState as SectionState>::decode(1, &b), Err(BlockStateError::TooManyInFlight(_))));
    }
}
