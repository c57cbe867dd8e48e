//! Ferry's migration stream: the one format for live migration, snapshots and live update.
//!
//! This crate owns the wire format (spec: `docs/stream-format.md`): a 32-byte header, then
//! records `type u32 | body_length u32 | body | pad to 8 | crc32c u32 | reserved u32`. It has no
//! KVM dependency and never trusts a length: a declared length is checked against its maximum
//! before anything is allocated or read, and no input makes the reader panic.
//!
//! Writers emit the current format version; readers accept every version from
//! [`MIN_FORMAT_VERSION`] to [`FORMAT_VERSION`] (older ones through explicit upgrade code).

mod cpu_model;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
mod inspect;
mod reader;
mod snapshot;
mod writer;

pub use cpu_model::{CpuModel, CpuidEntry, MAX_CPUID_ENTRIES};
pub use inspect::{inspect, InspectSummary};
pub use reader::{DiskBlocks, PageBatch, Record, StreamReader};
pub use snapshot::{RamMap, SnapshotInfo, SnapshotKind, MAX_PARENT_PATH, SNAPSHOT_ID_LEN};
pub use writer::{PageBytes, StreamWriter};

/// Guest page size carried by streams of this version.
pub const PAGE_SIZE: usize = 4096;
/// Magic at the start of every stream.
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// Format version this Ferry writes (3: checkpointed streams with an epoch check, disks in the
/// stream).
pub const FORMAT_VERSION: u32 = 3;
/// Oldest format version this Ferry reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Largest record body accepted.
pub const MAX_RECORD_BODY: u32 = 64 << 20;
/// Most pages in one PAGE_BATCH record.
pub const MAX_BATCH_PAGES: u32 = 1024;
/// Size of the stream header.
pub const HEADER_LEN: usize = 32;
/// Bit 31 of a record type: the record is optional (an unknown optional record is skipped).
pub const OPTIONAL: u32 = 1 << 31;

/// Record types.
pub mod rtype {
    pub const MACHINE_CONFIG: u32 = 1;
    pub const PAGE_BATCH: u32 = 2;
    pub const VCPU_STATE: u32 = 3;
    pub const VM_STATE: u32 = 4;
    pub const DEVICE_STATE: u32 = 5;
    pub const CHECKPOINT: u32 = 6;
    pub const END: u32 = 7;
    pub const SNAPSHOT_INFO: u32 = 8;
    pub const RAM_MAP: u32 = 9;
    /// Optional: the source has paused the guest; the final pass follows. Readers that do not
    /// know it skip it.
    pub const FINAL_PASS: u32 = super::OPTIONAL | 0xa;
    /// The guest's CPU (format version 2 on): CPUID, TSC rate, XSAVE size.
    pub const CPU_MODEL: u32 = 0xb;
    /// Guest frames that are broken (machine-check poisoned): snapshot files, whose pages are
    /// not in page batches.
    pub const BROKEN_PAGES: u32 = 0xc;
    /// A RAM region handed over in place (live update): the memory is not in the stream, the
    /// receiving process already holds the file descriptor it lives in.
    pub const RAM_REFERENCE: u32 = 0xd;
    /// The disks whose blocks the stream carries (format version 3 on): count and sizes.
    pub const DISK_CONFIG: u32 = 0xe;
    /// One extent of a disk: data, or zeros (format version 3 on).
    pub const DISK_BLOCKS: u32 = 0xf;
    /// Optional, empty: the writer is alive (checkpointed streams, between epochs).
    pub const HEARTBEAT: u32 = super::OPTIONAL | 0x10;
    /// A disk's blocks in a snapshot file (format version 3 on): RAM_MAP's body, for a disk.
    pub const DISK_MAP: u32 = 0x11;
    /// Post-copy (format version 3 on, to destinations that announce post-copy): the runs of
    /// guest frames whose current data is not in this stream; they come after the switch-over
    /// in a page stream of their own (header flag POSTCOPY).
    pub const POSTCOPY: u32 = 0x12;
    /// A page batch whose data pages are one zstd frame (format version 3 on, to receivers
    /// that announce it; migration and checkpointed streams only).
    pub const PAGE_BATCH_ZSTD: u32 = 0x13;
    /// Page channels (format version 3 on, to destinations that announce them; migration
    /// streams only): page data also comes on `count - 1` more connections of this session,
    /// each a stream of its own (header flag CHANNEL) carrying the pages of its shard.
    pub const CHANNELS: u32 = 0x14;

    /// A record type's name for messages.
    pub fn name(t: u32) -> &'static str {
        match t & !super::OPTIONAL {
            MACHINE_CONFIG => "MACHINE_CONFIG",
            PAGE_BATCH => "PAGE_BATCH",
            VCPU_STATE => "VCPU_STATE",
            VM_STATE => "VM_STATE",
            DEVICE_STATE => "DEVICE_STATE",
            CHECKPOINT => "CHECKPOINT",
            END => "END",
            SNAPSHOT_INFO => "SNAPSHOT_INFO",
            RAM_MAP => "RAM_MAP",
            0xa => "FINAL_PASS",
            CPU_MODEL => "CPU_MODEL",
            BROKEN_PAGES => "BROKEN_PAGES",
            RAM_REFERENCE => "RAM_REFERENCE",
            DISK_CONFIG => "DISK_CONFIG",
            DISK_BLOCKS => "DISK_BLOCKS",
            0x10 => "HEARTBEAT",
            DISK_MAP => "DISK_MAP",
            POSTCOPY => "POSTCOPY",
            PAGE_BATCH_ZSTD => "PAGE_BATCH_ZSTD",
            CHANNELS => "CHANNELS",
            _ => "unknown",
        }
    }
}

/// What a page in a batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageType {
    /// Carries 4096 bytes of data.
    Normal,
    /// All zero; no data.
    Zero,
    /// Machine-check poisoned on the source: never read; mark broken on the destination.
    Broken,
    /// Discarded by the guest (balloon, free page hinting): no data, contents undefined.
    Discarded,
}

impl PageType {
    pub fn to_u8(self) -> u8 {
        match self {
            PageType::Normal => 0,
            PageType::Zero => 1,
            PageType::Broken => 2,
            PageType::Discarded => 3,
        }
    }
    pub fn from_u8(v: u8) -> Option<PageType> {
        match v {
            0 => Some(PageType::Normal),
            1 => Some(PageType::Zero),
            2 => Some(PageType::Broken),
            3 => Some(PageType::Discarded),
            _ => None,
        }
    }
}

/// Header flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamFlags(pub u32);

impl StreamFlags {
    /// The stream carries checkpoints: the receiver buffers until each CHECKPOINT record and
    /// only a complete checkpoint is a consistent state.
    pub const CHECKPOINTED: StreamFlags = StreamFlags(1);
    /// A snapshot file: RAM lives in page-aligned data areas of the file named by RAM_MAP
    /// records, not in PAGE_BATCH records.
    pub const SNAPSHOT: StreamFlags = StreamFlags(2);
    /// A live-update handover between two Ferry processes on one host: RAM comes as
    /// RAM_REFERENCE records naming file descriptors, never over a network.
    pub const HANDOVER: StreamFlags = StreamFlags(4);
    /// A post-copy page stream: after a migration stream's switch-over, the pages its POSTCOPY
    /// record listed, in PAGE_BATCH records only, then END.
    pub const POSTCOPY: StreamFlags = StreamFlags(8);
    /// A page channel of a migration (its main stream's CHANNELS record): page batches of the
    /// channel's shard only, then END.
    pub const CHANNEL: StreamFlags = StreamFlags(16);
    /// Every flag this version knows.
    pub const KNOWN: u32 = 31;

    pub fn empty() -> StreamFlags {
        StreamFlags(0)
    }
    pub fn contains(self, f: StreamFlags) -> bool {
        self.0 & f.0 == f.0
    }
}

/// The stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    pub format_version: u32,
    pub flags: StreamFlags,
    pub page_size: u32,
    /// Ferry version of the writer (major, minor, patch).
    pub writer_version: (u16, u16, u16),
}

impl StreamHeader {
    /// A header for a stream written by this Ferry.
    pub fn new(flags: StreamFlags) -> Self {
        let v = |s: &str| s.parse::<u16>().unwrap_or(0);
        StreamHeader {
            format_version: FORMAT_VERSION,
            flags,
            page_size: PAGE_SIZE as u32,
            writer_version: (
                v(env!("CARGO_PKG_VERSION_MAJOR")),
                v(env!("CARGO_PKG_VERSION_MINOR")),
                v(env!("CARGO_PKG_VERSION_PATCH")),
            ),
        }
    }

    /// The encoded header (for tests that build streams by hand).
    pub fn encode_for_tests(&self) -> Vec<u8> {
        self.encode().to_vec()
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.page_size.to_le_bytes());
        // 20..24 reserved
        b[24..26].copy_from_slice(&self.writer_version.0.to_le_bytes());
        b[26..28].copy_from_slice(&self.writer_version.1.to_le_bytes());
        b[28..30].copy_from_slice(&self.writer_version.2.to_le_bytes());
        // 30..32 reserved
        b
    }

    pub(crate) fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, StreamError> {
        if b[..8] != MAGIC {
            return Err(StreamError::BadMagic(b[..8].try_into().unwrap_or([0; 8])));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let version = u32_at(8);
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(StreamError::UnsupportedVersion {
                found: version,
                min: MIN_FORMAT_VERSION,
                max: FORMAT_VERSION,
            });
        }
        let flags = u32_at(12);
        if flags & !StreamFlags::KNOWN != 0 {
            return Err(StreamError::UnknownFlags(flags & !StreamFlags::KNOWN));
        }
        // Checkpoints are only between like versions (seed 004: a receiver cannot know where an
        // older or newer writer's consistent states end), refused before anything is applied.
        if StreamFlags(flags).contains(StreamFlags::CHECKPOINTED) && version != FORMAT_VERSION {
            return Err(StreamError::CheckpointedVersion { found: version, ours: FORMAT_VERSION });
        }
        let page_size = u32_at(16);
        if page_size != PAGE_SIZE as u32 {
            return Err(StreamError::PageSize(page_size));
        }
        if u32_at(20) != 0 || u16_at(30) != 0 {
            return Err(StreamError::Reserved { what: "header", offset: 0 });
        }
        Ok(StreamHeader {
            format_version: version,
            flags: StreamFlags(flags),
            page_size,
            writer_version: (u16_at(24), u16_at(26), u16_at(28)),
        })
    }
}

/// Guest RAM layout and vCPU count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// (guest-physical address, size) of each RAM region.
    pub regions: Vec<(u64, u64)>,
}

/// A RAM region handed over in place: which region, the file descriptor (in the receiving
/// process) and offset it lives at, and where it is in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamReference {
    pub region: u32,
    pub fd: u32,
    pub gpa: u64,
    pub size: u64,
    pub offset: u64,
}

impl RamReference {
    /// Body: region u32, fd u32, gpa u64, size u64, offset u64 (32 bytes).
    pub(crate) fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&self.region.to_le_bytes());
        b[4..8].copy_from_slice(&self.fd.to_le_bytes());
        b[8..16].copy_from_slice(&self.gpa.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() != 32 {
            return Err(format!("body of {} bytes, want 32", b.len()));
        }
        let u64_at = |o: usize| reader::u64_at(b, o);
        Ok(RamReference {
            region: reader::u32_at(b, 0),
            fd: reader::u32_at(b, 4),
            gpa: u64_at(8),
            size: u64_at(16),
            offset: u64_at(24),
        })
    }
}

/// The disks a stream carries blocks of: each disk's size in 512-byte sectors, by index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub sectors: Vec<u64>,
}

/// Most disks a DISK_CONFIG may list.
pub const MAX_DISKS: u32 = 64;
/// Most data bytes one DISK_BLOCKS record carries.
pub const MAX_DISK_EXTENT: u64 = 4 << 20;
/// Disk extents are whole sectors.
pub const DISK_SECTOR: u64 = 512;

/// Most frames one BROKEN_PAGES record may list.
pub const MAX_BROKEN_PAGES: u32 = 1 << 20;
/// Most connections of one migration (the main one included): CHANNELS counts 2 to this.
pub const MAX_CHANNELS: u32 = 16;
/// Frames per shard of the page channels: shard `gfn >> CHANNEL_SHARD_SHIFT` (2 MiB of guest
/// frames) goes on channel `shard % count`, always, so a page's sends stay in order.
pub const CHANNEL_SHARD_SHIFT: u32 = 9;

/// The channel (0: the main connection) that carries frame `gfn` when a migration has `count`
/// channels.
pub fn channel_of(gfn: u64, count: u32) -> u32 {
    ((gfn >> CHANNEL_SHARD_SHIFT) % u64::from(count.max(1))) as u32
}

/// Most runs in one POSTCOPY record (its body stays under [`MAX_RECORD_BODY`]).
pub const MAX_POSTCOPY_RUNS: u32 = (MAX_RECORD_BODY - 16) / 16;

/// Most RAM regions a MACHINE_CONFIG may list.
pub const MAX_REGIONS: u32 = 64;

/// Errors reading or writing a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("writing the stream failed")]
    Write(#[source] std::io::Error),
    #[error("reading the stream failed at byte {offset}")]
    Read {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("not a Ferry stream: magic {0:02x?}, want \"FERRYMIG\"")]
    BadMagic([u8; 8]),
    #[error("stream format version {found} is not supported: this Ferry reads versions {min} to {max}")]
    UnsupportedVersion { found: u32, min: u32, max: u32 },
    #[error("stream header has unknown flags {0:#x}")]
    UnknownFlags(u32),
    #[error("stream page size {0} is not supported (only 4096)")]
    PageSize(u32),
    #[error("non-zero reserved bytes in {what} at byte offset {offset}")]
    Reserved { what: &'static str, offset: u64 },
    #[error("stream truncated in its header (byte {0})")]
    TruncatedHeader(u64),
    #[error("stream truncated in record {index} ({name}) at byte offset {offset}")]
    TruncatedRecord { index: u64, name: &'static str, offset: u64 },
    #[error("stream ended after record {index} at byte offset {offset} without an END record")]
    MissingEnd { index: u64, offset: u64 },
    #[error("record {index} at byte offset {offset} declares a body of {len} bytes, more than the {max} allowed")]
    TooLong { index: u64, offset: u64, len: u32, max: u32 },
    #[error("unknown mandatory record type {rtype:#x} (record {index} at byte offset {offset})")]
    UnknownRecord { rtype: u32, index: u64, offset: u64 },
    #[error("checksum mismatch in record {index} ({name}) at byte offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { index: u64, name: &'static str, offset: u64, stored: u32, computed: u32 },
    #[error("malformed {name} record {index} at byte offset {offset}: {what}")]
    Malformed { index: u64, name: &'static str, offset: u64, what: String },
    #[error("unknown page type {ptype} for frame {gfn:#x} in record {index}")]
    UnknownPageType { ptype: u8, gfn: u64, index: u64 },
    #[error("invalid record to write: {0}")]
    Invalid(String),
    #[error(
        "a checkpointed stream of format version {found}: checkpointed streams (replication) are only read \
         between equal versions, and this Ferry writes and reads version {ours}"
    )]
    CheckpointedVersion { found: u32, ours: u32 },
    #[error(
        "checkpoint {seq} does not match the epoch it ends: it counts {want_records} records with checksum \
         {want_crc:#010x}, the reader got {got_records} with {got_crc:#010x}"
    )]
    EpochMismatch { seq: u64, want_records: u32, want_crc: u32, got_records: u32, got_crc: u32 },
    #[error("zstd could not be set up")]
    Zstd(#[source] std::io::Error),
}

/// crc32c over the record type, length and body.
pub(crate) fn record_crc(rtype: u32, len: u32, body_parts: &[&[u8]]) -> u32 {
    let mut c = crc32c::crc32c(&rtype.to_le_bytes());
    c = crc32c::crc32c_append(c, &len.to_le_bytes());
    for p in body_parts {
        c = crc32c::crc32c_append(c, p);
    }
    c
}

/// How far into `buf` the first page-aligned byte lies (less than [`PAGE_SIZE`]). A sender
/// copies pages out of guest RAM into a buffer from that offset: on this project's reference
/// host (AMD EPYC, glibc's `rep movsb` memcpy) a 4 KiB copy from a page into a buffer 16 bytes
/// off a 64-byte boundary ran at 9 GB/s against 13 GB/s aligned, and about 4x slower than
/// aligned beside a running guest during a migration (docs/migration.md, "Where the time goes").
pub fn page_aligned_offset(buf: &[u8]) -> usize {
    (PAGE_SIZE - buf.as_ptr() as usize % PAGE_SIZE) % PAGE_SIZE
}

/// Padding after a body of `len` bytes.
pub(crate) fn pad_len(len: u32) -> usize {
    (8 - (len as usize % 8)) % 8
}

/// Encodes a page-batch entry.
pub(crate) fn entry(gfn: u64, t: PageType) -> u64 {
    (gfn & ((1 << 52) - 1)) | ((t.to_u8() as u64) << 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_aligned_offset_is_the_first_page_boundary_in_the_buffer() {
        let buf = vec![0u8; 3 * PAGE_SIZE];
        for start in [0, 1, 16, 64, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 24] {
            let s = &buf[start..];
            let off = page_aligned_offset(s);
            assert!(off < PAGE_SIZE, "start {start}: offset {off}");
            assert_eq!((s.as_ptr() as usize + off) % PAGE_SIZE, 0, "start {start}");
            assert!(
                (0..off).all(|o| !(s.as_ptr() as usize + o).is_multiple_of(PAGE_SIZE)),
                "start {start}: not the first"
            );
        }
    }
}
