//! Reading a stream: validate everything, trust no length, never panic.

use std::io::Read;

use crate::{pad_len, record_crc, rtype, MachineConfig, PageType, StreamError, StreamFlags, StreamHeader};
use crate::{RamMap, SnapshotInfo};
use crate::{HEADER_LEN, MAX_BATCH_PAGES, MAX_RECORD_BODY, MAX_REGIONS, OPTIONAL, PAGE_SIZE};

/// One decoded record. Borrowed data points into the reader's buffer until the next call.
#[derive(Debug)]
pub enum Record<'a> {
    MachineConfig(MachineConfig),
    PageBatch(PageBatch<'a>),
    VcpuState {
        id: u32,
        version: u32,
        data: &'a [u8],
    },
    VmState {
        version: u32,
        data: &'a [u8],
    },
    DeviceState {
        id: String,
        instance: u32,
        version: u32,
        data: &'a [u8],
    },
    /// A consistent state ends here (its epoch already checked against the record, format
    /// version 3 on).
    Checkpoint(u64),
    /// The disks whose blocks follow (format version 3 on).
    DiskConfig(crate::DiskConfig),
    /// One extent of a disk.
    DiskBlocks(DiskBlocks<'a>),
    /// The writer is alive (optional; checkpointed streams).
    Heartbeat,
    /// The guest's CPU (format version 2 on).
    CpuModel(crate::CpuModel),
    /// Broken guest frames (snapshot files).
    BrokenPages(Vec<u64>),
    /// Post-copy: the session, and the runs `(first frame, frames)` whose data comes after the
    /// switch-over (none: every page is here, only the state was sent at the switch).
    Postcopy {
        session: u64,
        runs: Vec<(u64, u64)>,
    },
    /// Page data also comes on `count - 1` more connections of `session` (migration streams,
    /// format version 3 on).
    Channels {
        count: u32,
        session: u64,
    },
    /// A RAM region handed over in place (handover streams only).
    RamReference(crate::RamReference),
    /// Optional marker: the source paused the guest, the final pass follows (migration streams).
    FinalPass,
    /// Snapshot files only.
    SnapshotInfo(SnapshotInfo),
    /// Snapshot files only.
    RamMap(RamMap),
    /// Snapshot files only: where a disk's blocks are (RAM_MAP's body: `region` is the disk's
    /// index, `gpa` its size in bytes, a "page" a 4 KiB block).
    DiskMap(RamMap),
    End,
    /// An optional record of a type this Ferry does not know, skipped.
    SkippedOptional {
        rtype: u32,
        len: u32,
    },
}

/// A decoded page batch.
#[derive(Debug)]
pub struct PageBatch<'a> {
    entries: Vec<(u64, PageType)>,
    data: &'a [u8],
    /// PAGE_BATCH_ZSTD: the bytes of the zstd frame the data came from.
    compressed: Option<usize>,
}

impl<'a> PageBatch<'a> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn entries(&self) -> &[(u64, PageType)] {
        &self.entries
    }
    /// For a PAGE_BATCH_ZSTD record, the size of its zstd frame (the data pages are already
    /// decompressed).
    pub fn compressed_bytes(&self) -> Option<usize> {
        self.compressed
    }
    /// `(frame, type, data)` for each entry; data only for NORMAL pages.
    pub fn iter(&self) -> impl Iterator<Item = (u64, PageType, Option<&'a [u8]>)> + '_ {
        let data = self.data;
        let mut next = 0usize;
        self.entries.iter().map(move |&(gfn, t)| {
            if t == PageType::Normal {
                let d = data.get(next..next + PAGE_SIZE);
                next += PAGE_SIZE;
                (gfn, t, d)
            } else {
                (gfn, t, None)
            }
        })
    }
}

/// One extent of a disk: `len` bytes at byte `offset`, either `data` or zeros.
#[derive(Debug)]
pub struct DiskBlocks<'a> {
    pub disk: u32,
    pub offset: u64,
    pub len: u64,
    /// `None`: the extent is zeros.
    pub data: Option<&'a [u8]>,
}

/// Reads records from `R`.
pub struct StreamReader<R: Read> {
    r: R,
    header: StreamHeader,
    buf: Vec<u8>,
    offset: u64,
    index: u64,
    ended: bool,
    /// The kind of the record last returned (its `read.<KIND>.after` fault point is hit when the
    /// caller asks for the next one).
    applied: Option<&'static str>,
    /// Records read since the last CHECKPOINT (or the header), and the crc32c over their
    /// stored checksums: what the next CHECKPOINT must state.
    epoch_records: u32,
    epoch_crc: u32,
    /// For PAGE_BATCH_ZSTD records: made at the first one, and the pages it decompressed.
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    zbuf: Vec<u8>,
}

/// Fills `buf` completely; `Ok(n)` with n < len means EOF after n bytes.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    if let Some(e) = crate::fault::take_io(false) {
        return Err(e);
    }
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Little-endian u32 at `o` (callers check the length first).
pub(crate) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Little-endian u64 at `o` (callers check the length first).
pub(crate) fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl<R: Read> StreamReader<R> {
    /// Reads and validates the header.
    pub fn new(mut r: R) -> Result<Self, StreamError> {
        let mut h = [0u8; HEADER_LEN];
        let n = read_full(&mut r, &mut h).map_err(|source| StreamError::Read { offset: 0, source })?;
        if n < HEADER_LEN {
            if n >= 8 && h[..8] != crate::MAGIC {
                return Err(StreamError::BadMagic(h[..8].try_into().unwrap_or([0; 8])));
            }
            return Err(StreamError::TruncatedHeader(n as u64));
        }
        let header = StreamHeader::decode(&h)?;
        Ok(StreamReader {
            r,
            header,
            buf: Vec::new(),
            offset: HEADER_LEN as u64,
            index: 0,
            ended: false,
            applied: None,
            epoch_records: 0,
            epoch_crc: 0,
            zstd: None,
            zbuf: Vec::new(),
        })
    }

    /// The reader the stream came from, positioned right after the last record read (a
    /// post-copy page stream follows a migration stream's END on the same connection).
    pub fn into_inner(self) -> R {
        self.r
    }

    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.offset
    }

    /// Index of the next record.
    pub fn record_index(&self) -> u64 {
        self.index
    }

    /// The next record. After END, returns END again without reading.
    pub fn next_record(&mut self) -> Result<Record<'_>, StreamError> {
        if let Some(done) = self.applied.take() {
            // The caller asks for the next record once it has applied the last one.
            crate::fault::hit_record("read", done, "after");
        }
        if self.ended {
            return Ok(Record::End);
        }
        let start = self.offset;
        let index = self.index;
        let mut head = [0u8; 8];
        let n = read_full(&mut self.r, &mut head).map_err(|source| StreamError::Read { offset: start, source })?;
        if n == 0 {
            return Err(StreamError::MissingEnd { index, offset: start });
        }
        if n < 8 {
            return Err(StreamError::TruncatedRecord { index, name: "record header", offset: start });
        }
        let t = u32_at(&head, 0);
        let len = u32_at(&head, 4);
        let name = rtype::name(t);
        crate::fault::hit_record("read", name, "before");
        if len > MAX_RECORD_BODY {
            return Err(StreamError::TooLong { index, offset: start, len, max: MAX_RECORD_BODY });
        }
        let total = len as usize + pad_len(len) + 8;
        // The buffer grows with the bytes that arrive, 1 MiB at a time, not with what the
        // header claims: a truncated or lying record costs what was actually sent.
        let mut n = 0;
        while n < total {
            let want = (total - n).min(1 << 20);
            if self.buf.len() < n + want {
                self.buf.resize(n + want, 0);
            }
            let got = read_full(&mut self.r, &mut self.buf[n..n + want])
                .map_err(|source| StreamError::Read { offset: start + 8 + n as u64, source })?;
            n += got;
            if got < want {
                break;
            }
        }
        if n < total {
            return Err(StreamError::TruncatedRecord { index, name, offset: start });
        }
        self.offset += 8 + total as u64;
        self.index += 1;
        let body_end = len as usize;
        let buf = &self.buf[..total];
        let stored = u32_at(buf, total - 8);
        let computed = record_crc(t, len, &[&buf[..body_end]]);
        if stored != computed {
            return Err(StreamError::Checksum { index, name, offset: start, stored, computed });
        }
        if buf[body_end..total - 8].iter().any(|&b| b != 0) {
            return Err(StreamError::Reserved { what: "record padding", offset: start + 8 + body_end as u64 });
        }
        if u32_at(buf, total - 4) != 0 {
            return Err(StreamError::Reserved { what: "record trailer", offset: start + 8 + total as u64 - 4 });
        }
        let body = &buf[..body_end];
        if t != rtype::CHECKPOINT {
            self.epoch_records = self.epoch_records.wrapping_add(1);
            self.epoch_crc = crc32c::crc32c_append(self.epoch_crc, &stored.to_le_bytes());
        }
        let malformed = |what: String| StreamError::Malformed { index, name, offset: start, what };
        let need = |n: usize| -> Result<(), StreamError> {
            if body.len() < n {
                Err(StreamError::Malformed {
                    index,
                    name,
                    offset: start,
                    what: format!("body of {} bytes, need at least {n}", body.len()),
                })
            } else {
                Ok(())
            }
        };
        if self.header.flags.contains(StreamFlags::POSTCOPY)
            && t & OPTIONAL == 0
            && t != rtype::PAGE_BATCH
            && t != rtype::END
        {
            return Err(malformed("a post-copy page stream carries only PAGE_BATCH and END".into()));
        }
        if self.header.flags.contains(StreamFlags::CHANNEL)
            && t & OPTIONAL == 0
            && t != rtype::PAGE_BATCH
            && t != rtype::PAGE_BATCH_ZSTD
            && t != rtype::END
        {
            return Err(malformed("a page channel carries only page batches and END".into()));
        }
        self.applied = Some(name);
        match t {
            rtype::MACHINE_CONFIG => {
                need(16)?;
                let count = u32_at(body, 12);
                if count > MAX_REGIONS || body.len() != 16 + 16 * count as usize {
                    return Err(malformed(format!("{count} regions in a body of {} bytes", body.len())));
                }
                let regions =
                    (0..count as usize).map(|i| (u64_at(body, 16 + 16 * i), u64_at(body, 24 + 16 * i))).collect();
                Ok(Record::MachineConfig(MachineConfig {
                    memory_bytes: u64_at(body, 0),
                    vcpus: u32_at(body, 8),
                    regions,
                }))
            }
            rtype::PAGE_BATCH_ZSTD if self.header.format_version < 3 => {
                Err(malformed("PAGE_BATCH_ZSTD needs format version 3 or later".into()))
            }
            rtype::PAGE_BATCH_ZSTD
                if self.header.flags.0
                    & (StreamFlags::SNAPSHOT.0 | StreamFlags::HANDOVER.0 | StreamFlags::POSTCOPY.0)
                    != 0 =>
            {
                Err(malformed("only migration and checkpointed streams carry compressed page batches".into()))
            }
            rtype::PAGE_BATCH | rtype::PAGE_BATCH_ZSTD => {
                need(8)?;
                let count = u32_at(body, 0);
                if u32_at(body, 4) != 0 {
                    return Err(StreamError::Reserved { what: "page batch header", offset: start + 12 });
                }
                if count == 0 || count > MAX_BATCH_PAGES {
                    return Err(malformed(format!("{count} pages (1 to {MAX_BATCH_PAGES} allowed)")));
                }
                let ents_end = 8 + 8 * count as usize;
                need(ents_end)?;
                let mut entries = Vec::with_capacity(count as usize);
                let mut normal = 0usize;
                for i in 0..count as usize {
                    let e = u64_at(body, 8 + 8 * i);
                    let gfn = e & ((1 << 52) - 1);
                    if (e >> 52) & 0xff != 0 {
                        return Err(StreamError::Reserved { what: "page entry", offset: start + 16 + 8 * i as u64 });
                    }
                    let ptype = (e >> 60) as u8;
                    let t = PageType::from_u8(ptype).ok_or(StreamError::UnknownPageType { ptype, gfn, index })?;
                    if t == PageType::Normal {
                        normal += 1;
                    }
                    entries.push((gfn, t));
                }
                if t == rtype::PAGE_BATCH_ZSTD {
                    // The frame must decompress to exactly the NORMAL pages: the buffer holds
                    // no more, so a frame that claims more fails rather than allocating.
                    let want = normal * PAGE_SIZE;
                    let frame = &body[ents_end..];
                    if want == 0 || frame.is_empty() {
                        return Err(malformed(format!(
                            "{normal} NORMAL pages and a zstd frame of {} bytes (both must be present)",
                            frame.len()
                        )));
                    }
                    if self.zstd.is_none() {
                        self.zstd = Some(zstd::bulk::Decompressor::new().map_err(StreamError::Zstd)?);
                    }
                    let Some(z) = self.zstd.as_mut() else {
                        return Err(malformed("no zstd decompressor".into()));
                    };
                    if self.zbuf.len() < want {
                        self.zbuf.resize(want, 0);
                    }
                    let got = z.decompress_to_buffer(frame, &mut self.zbuf[..want]).map_err(|e| {
                        malformed(format!("its zstd frame of {} bytes does not decompress: {e}", frame.len()))
                    })?;
                    if got != want {
                        return Err(malformed(format!(
                            "its zstd frame holds {got} bytes, {count} entries with {normal} NORMAL pages need {want}"
                        )));
                    }
                    return Ok(Record::PageBatch(PageBatch {
                        entries,
                        data: &self.zbuf[..want],
                        compressed: Some(frame.len()),
                    }));
                }
                let want = ents_end + normal * PAGE_SIZE;
                if body.len() != want {
                    return Err(malformed(format!(
                        "{count} entries with {normal} NORMAL pages need {want} bytes, body has {}",
                        body.len()
                    )));
                }
                Ok(Record::PageBatch(PageBatch { entries, data: &body[ents_end..], compressed: None }))
            }
            rtype::VCPU_STATE => {
                need(8)?;
                Ok(Record::VcpuState { id: u32_at(body, 0), version: u32_at(body, 4), data: &body[8..] })
            }
            rtype::VM_STATE => {
                need(8)?;
                if u32_at(body, 4) != 0 {
                    return Err(StreamError::Reserved { what: "VM_STATE header", offset: start + 12 });
                }
                Ok(Record::VmState { version: u32_at(body, 0), data: &body[8..] })
            }
            rtype::DEVICE_STATE => {
                need(24)?;
                let raw = &body[..16];
                let n = raw.iter().position(|&b| b == 0).unwrap_or(16);
                if raw[n..].iter().any(|&b| b != 0) || n == 0 || !raw[..n].iter().all(|b| b.is_ascii_graphic()) {
                    return Err(malformed("device section id is not NUL-padded ASCII".into()));
                }
                let id = String::from_utf8_lossy(&raw[..n]).into_owned();
                Ok(Record::DeviceState { id, instance: u32_at(body, 16), version: u32_at(body, 20), data: &body[24..] })
            }
            rtype::CHECKPOINT if self.header.format_version < 3 => {
                if body.len() != 8 {
                    return Err(malformed(format!("body of {} bytes, want 8", body.len())));
                }
                Ok(Record::Checkpoint(u64_at(body, 0)))
            }
            rtype::CHECKPOINT => {
                // Version 3: sequence u64, records u32, crc u32 of the epoch it ends.
                if body.len() != 16 {
                    return Err(malformed(format!("body of {} bytes, want 16", body.len())));
                }
                let seq = u64_at(body, 0);
                let (want_records, want_crc) = (u32_at(body, 8), u32_at(body, 12));
                let (got_records, got_crc) = (self.epoch_records, self.epoch_crc);
                self.epoch_records = 0;
                self.epoch_crc = 0;
                if (want_records, want_crc) != (got_records, got_crc) {
                    return Err(StreamError::EpochMismatch { seq, want_records, want_crc, got_records, got_crc });
                }
                Ok(Record::Checkpoint(seq))
            }
            rtype::DISK_CONFIG => {
                need(8)?;
                let count = u32_at(body, 0);
                if count == 0 || count > crate::MAX_DISKS || body.len() != 8 + 8 * count as usize {
                    return Err(malformed(format!("{count} disks in a body of {} bytes", body.len())));
                }
                if u32_at(body, 4) != 0 {
                    return Err(StreamError::Reserved { what: "DISK_CONFIG header", offset: start + 12 });
                }
                let sectors: Vec<u64> = (0..count as usize).map(|i| u64_at(body, 8 + 8 * i)).collect();
                if sectors.contains(&0) {
                    return Err(malformed("a disk of 0 sectors".into()));
                }
                Ok(Record::DiskConfig(crate::DiskConfig { sectors }))
            }
            rtype::DISK_BLOCKS => {
                // disk u32, kind u32 (0 data, 1 zeros), offset u64, length u64, data.
                need(24)?;
                let (disk, kind, offset, len) = (u32_at(body, 0), u32_at(body, 4), u64_at(body, 8), u64_at(body, 16));
                let sector = crate::DISK_SECTOR;
                if len == 0
                    || !offset.is_multiple_of(sector)
                    || !len.is_multiple_of(sector)
                    || offset.checked_add(len).is_none()
                {
                    return Err(malformed(format!("extent of {len} bytes at {offset} is not whole sectors")));
                }
                let data = match kind {
                    0 if len <= crate::MAX_DISK_EXTENT && body.len() as u64 == 24 + len => Some(&body[24..]),
                    0 => return Err(malformed(format!("data extent of {len} bytes in a body of {}", body.len()))),
                    1 if body.len() == 24 => None,
                    1 => return Err(malformed(format!("zero extent with a body of {} bytes", body.len()))),
                    k => return Err(malformed(format!("unknown extent kind {k}"))),
                };
                Ok(Record::DiskBlocks(DiskBlocks { disk, offset, len, data }))
            }
            rtype::HEARTBEAT => {
                if !body.is_empty() {
                    return Err(malformed(format!("body of {} bytes, want 0", body.len())));
                }
                Ok(Record::Heartbeat)
            }
            rtype::FINAL_PASS => {
                if !body.is_empty() {
                    return Err(malformed(format!("body of {} bytes, want 0", body.len())));
                }
                Ok(Record::FinalPass)
            }
            rtype::CPU_MODEL => Ok(Record::CpuModel(crate::CpuModel::decode(body).map_err(malformed)?)),
            rtype::BROKEN_PAGES => {
                need(8)?;
                let count = u32_at(body, 0);
                if count > crate::MAX_BROKEN_PAGES || body.len() != 8 + 8 * count as usize {
                    return Err(malformed(format!("{count} frames in a body of {} bytes", body.len())));
                }
                if u32_at(body, 4) != 0 {
                    return Err(StreamError::Reserved { what: "BROKEN_PAGES header", offset: start + 12 });
                }
                Ok(Record::BrokenPages((0..count as usize).map(|i| u64_at(body, 8 + 8 * i)).collect()))
            }
            rtype::POSTCOPY if self.header.format_version < 3 => {
                Err(malformed("POSTCOPY needs format version 3 or later".into()))
            }
            rtype::POSTCOPY
                if self.header.flags.0
                    & (StreamFlags::SNAPSHOT.0
                        | StreamFlags::CHECKPOINTED.0
                        | StreamFlags::HANDOVER.0
                        | StreamFlags::POSTCOPY.0)
                    != 0 =>
            {
                Err(malformed("only a live migration stream carries POSTCOPY".into()))
            }
            rtype::POSTCOPY => {
                need(16)?;
                let count = u32_at(body, 8);
                if count > crate::MAX_POSTCOPY_RUNS || body.len() != 16 + 16 * count as usize {
                    return Err(malformed(format!("{count} runs in a body of {} bytes", body.len())));
                }
                if u32_at(body, 12) != 0 {
                    return Err(StreamError::Reserved { what: "POSTCOPY header", offset: start + 20 });
                }
                let runs: Vec<(u64, u64)> =
                    (0..count as usize).map(|i| (u64_at(body, 16 + 16 * i), u64_at(body, 24 + 16 * i))).collect();
                if let Some(&(first, n)) = runs.iter().find(|&&(f, n)| n == 0 || f.checked_add(n).is_none()) {
                    return Err(malformed(format!("run of {n} frames from {first:#x}")));
                }
                Ok(Record::Postcopy { session: u64_at(body, 0), runs })
            }
            rtype::CHANNELS if self.header.format_version < 3 => {
                Err(malformed("CHANNELS needs format version 3 or later".into()))
            }
            rtype::CHANNELS if self.header.flags.0 != 0 => {
                Err(malformed("only a live migration stream (no header flags) carries CHANNELS".into()))
            }
            rtype::CHANNELS => {
                if body.len() != 16 {
                    return Err(malformed(format!("body of {} bytes, want 16", body.len())));
                }
                if u32_at(body, 4) != 0 {
                    return Err(StreamError::Reserved { what: "CHANNELS header", offset: start + 12 });
                }
                let count = u32_at(body, 0);
                if !(2..=crate::MAX_CHANNELS).contains(&count) {
                    return Err(malformed(format!("{count} channels (2 to {} allowed)", crate::MAX_CHANNELS)));
                }
                Ok(Record::Channels { count, session: u64_at(body, 8) })
            }
            rtype::RAM_REFERENCE if !self.header.flags.contains(StreamFlags::HANDOVER) => Err(malformed(
                "a RAM reference is only valid in a local live-update handover (header flag HANDOVER), \
                 never in a migration stream or a file"
                    .into(),
            )),
            rtype::RAM_REFERENCE => Ok(Record::RamReference(crate::RamReference::decode(body).map_err(malformed)?)),
            rtype::SNAPSHOT_INFO | rtype::RAM_MAP | rtype::DISK_MAP
                if !self.header.flags.contains(StreamFlags::SNAPSHOT) =>
            {
                Err(malformed("only snapshot files (header flag SNAPSHOT) carry this record".into()))
            }
            rtype::SNAPSHOT_INFO => Ok(Record::SnapshotInfo(SnapshotInfo::decode(body).map_err(malformed)?)),
            rtype::RAM_MAP => Ok(Record::RamMap(RamMap::decode(body).map_err(malformed)?)),
            rtype::DISK_MAP => {
                let m = RamMap::decode(body).map_err(malformed)?;
                if m.npages != m.gpa.div_ceil(PAGE_SIZE as u64) || m.gpa % crate::DISK_SECTOR != 0 {
                    return Err(malformed(format!("{} blocks for a disk of {} bytes", m.npages, m.gpa)));
                }
                Ok(Record::DiskMap(m))
            }
            rtype::END => {
                if !body.is_empty() {
                    return Err(malformed(format!("body of {} bytes, want 0", body.len())));
                }
                self.ended = true;
                Ok(Record::End)
            }
            other if other & OPTIONAL != 0 => Ok(Record::SkippedOptional { rtype: other, len }),
            other => Err(StreamError::UnknownRecord { rtype: other, index, offset: start }),
        }
    }
}
