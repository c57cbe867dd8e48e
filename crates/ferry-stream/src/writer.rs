//! Writing a stream.

use std::io::Write;

use crate::{entry, pad_len, record_crc, rtype, MachineConfig, PageType, StreamError, StreamHeader};
use crate::{MAX_BATCH_PAGES, MAX_RECORD_BODY, MAX_REGIONS, PAGE_SIZE};

/// Writes records to `W`, counting bytes.
pub struct StreamWriter<W: Write> {
    w: W,
    bytes: u64,
    /// A page batch's count and entries are assembled here (reused).
    scratch: Vec<u8>,
    /// The header's format version (a CHECKPOINT's body depends on it).
    version: u32,
    /// Records written since the last CHECKPOINT and the crc32c over their checksums.
    epoch_records: u32,
    epoch_crc: u32,
    /// Set by [`Self::compress_pages`]: data pages go zstd-compressed (PAGE_BATCH_ZSTD).
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// A compressed batch's frame (reused).
    zbuf: Vec<u8>,
    /// Data-page bytes given to page batches, and what they took on the wire.
    pages_raw: u64,
    pages_wire: u64,
}

/// Data-page bytes a writer was given and the bytes they took in the stream (less when
/// compressed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageBytes {
    pub raw: u64,
    pub wire: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Starts a stream: writes the header.
    pub fn new(mut w: W, header: &StreamHeader) -> Result<Self, StreamError> {
        w.write_all(&header.encode()).map_err(StreamError::Write)?;
        Ok(StreamWriter {
            w,
            bytes: crate::HEADER_LEN as u64,
            scratch: Vec::new(),
            version: header.format_version,
            epoch_records: 0,
            epoch_crc: 0,
            zstd: None,
            zbuf: Vec::new(),
            pages_raw: 0,
            pages_wire: 0,
        })
    }

    /// From now on, a page batch's data pages go as one zstd frame at `level` (a
    /// PAGE_BATCH_ZSTD record) whenever that is smaller than the pages; otherwise, and for
    /// batches without data pages, as a plain PAGE_BATCH. Only for a reader that said it reads
    /// PAGE_BATCH_ZSTD (a format-3 migration or checkpointed stream).
    pub fn compress_pages(&mut self, level: i32) -> Result<(), StreamError> {
        if self.version < 3 {
            return Err(StreamError::Invalid(format!("compressed page batches in a version {} stream", self.version)));
        }
        let mut z = zstd::bulk::Compressor::new(level).map_err(StreamError::Zstd)?;
        // The frame states its decompressed size; the reader checks it against the entries.
        z.include_contentsize(true).map_err(StreamError::Zstd)?;
        z.include_checksum(false).map_err(StreamError::Zstd)?;
        self.zstd = Some(z);
        Ok(())
    }

    /// Data-page bytes written so far, raw and as they went (see [`Self::compress_pages`]).
    pub fn page_bytes(&self) -> PageBytes {
        PageBytes { raw: self.pages_raw, wire: self.pages_wire }
    }

    /// Bytes written so far, header included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    fn put(&mut self, b: &[u8]) -> Result<(), StreamError> {
        if let Some(e) = crate::fault::take_io(true) {
            return Err(StreamError::Write(e));
        }
        self.w.write_all(b).map_err(StreamError::Write)?;
        self.bytes += b.len() as u64;
        Ok(())
    }

    /// Writes one record whose body is the concatenation of `parts`.
    fn record(&mut self, t: u32, parts: &[&[u8]]) -> Result<(), StreamError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_RECORD_BODY as usize {
            return Err(StreamError::Invalid(format!("{} body of {len} bytes", rtype::name(t))));
        }
        let len = len as u32;
        crate::fault::hit_record("write", rtype::name(t), "before");
        let crc = record_crc(t, len, parts);
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&t.to_le_bytes());
        head[4..].copy_from_slice(&len.to_le_bytes());
        self.put(&head)?;
        for p in parts {
            self.put(p)?;
        }
        self.put(&[0u8; 8][..pad_len(len)])?;
        let mut tail = [0u8; 8];
        tail[..4].copy_from_slice(&crc.to_le_bytes());
        self.put(&tail)?;
        if t != rtype::CHECKPOINT {
            self.epoch_records = self.epoch_records.wrapping_add(1);
            self.epoch_crc = crc32c::crc32c_append(self.epoch_crc, &crc.to_le_bytes());
        }
        crate::fault::hit_record("write", rtype::name(t), "after");
        Ok(())
    }

    pub fn machine_config(&mut self, c: &MachineConfig) -> Result<(), StreamError> {
        if c.regions.len() > MAX_REGIONS as usize {
            return Err(StreamError::Invalid(format!("{} RAM regions", c.regions.len())));
        }
        let mut b = Vec::with_capacity(16 + 16 * c.regions.len());
        b.extend_from_slice(&c.memory_bytes.to_le_bytes());
        b.extend_from_slice(&c.vcpus.to_le_bytes());
        b.extend_from_slice(&(c.regions.len() as u32).to_le_bytes());
        for &(gpa, size) in &c.regions {
            b.extend_from_slice(&gpa.to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes());
        }
        self.record(rtype::MACHINE_CONFIG, &[&b])
    }

    /// One batch: `entries` in order, and the data of each NORMAL entry in `data` (4096 bytes
    /// each, in entry order). The pages are copied into one record body first; a caller that
    /// already holds them packed uses [`Self::page_batch_packed`].
    pub fn page_batch(&mut self, entries: &[(u64, PageType)], data: &[&[u8]]) -> Result<(), StreamError> {
        if data.iter().any(|d| d.len() != PAGE_SIZE) {
            return Err(StreamError::Invalid(format!("a data page of a page batch is not {PAGE_SIZE} bytes")));
        }
        self.page_batch_packed(entries, &data.concat())
    }

    /// One batch whose NORMAL pages' data lie back to back in `data` (4096 bytes each, in entry
    /// order). The data goes out as it is, without another copy: the checksum covers exactly
    /// these bytes, so `data` must not change during the call (the sender copies pages out of a
    /// running guest before).
    pub fn page_batch_packed(&mut self, entries: &[(u64, PageType)], data: &[u8]) -> Result<(), StreamError> {
        if entries.is_empty() || entries.len() > MAX_BATCH_PAGES as usize {
            return Err(StreamError::Invalid(format!("page batch of {} entries", entries.len())));
        }
        let normal = entries.iter().filter(|e| e.1 == PageType::Normal).count();
        if normal * PAGE_SIZE != data.len() {
            return Err(StreamError::Invalid(format!(
                "{normal} NORMAL entries but {} bytes of page data (each page must be {PAGE_SIZE} bytes)",
                data.len()
            )));
        }
        if let Some(&(gfn, _)) = entries.iter().find(|e| e.0 >= 1 << 52) {
            return Err(StreamError::Invalid(format!("frame number {gfn:#x} does not fit in 52 bits")));
        }
        let mut head = std::mem::take(&mut self.scratch);
        head.clear();
        head.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        for &(gfn, t) in entries {
            head.extend_from_slice(&entry(gfn, t).to_le_bytes());
        }
        self.pages_raw += data.len() as u64;
        // A compressed frame no smaller than the pages does not go: the buffer holds less than
        // the pages, so zstd gives up with "destination too small" and they go as they are.
        // (The record's crc32c already covers every byte, so the frame carries no checksum.)
        let mut frame = std::mem::take(&mut self.zbuf);
        frame.clear();
        let compressed = match self.zstd.as_mut() {
            Some(z) if !data.is_empty() => {
                frame.reserve(data.len() - 1);
                z.compress_to_buffer(data, &mut frame).is_ok() && frame.len() < data.len()
            }
            _ => false,
        };
        let r = if compressed {
            self.pages_wire += frame.len() as u64;
            self.record(rtype::PAGE_BATCH_ZSTD, &[&head, &frame])
        } else {
            self.pages_wire += data.len() as u64;
            self.record(rtype::PAGE_BATCH, &[&head, data])
        };
        self.scratch = head;
        self.zbuf = frame;
        r
    }

    pub fn vcpu_state(&mut self, id: u32, version: u32, bytes: &[u8]) -> Result<(), StreamError> {
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&id.to_le_bytes());
        h[4..].copy_from_slice(&version.to_le_bytes());
        self.record(rtype::VCPU_STATE, &[&h, bytes])
    }

    pub fn vm_state(&mut self, version: u32, bytes: &[u8]) -> Result<(), StreamError> {
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&version.to_le_bytes());
        self.record(rtype::VM_STATE, &[&h, bytes])
    }

    /// A device section: `id` is ASCII, at most 16 bytes.
    pub fn device_state(&mut self, id: &str, instance: u32, version: u32, bytes: &[u8]) -> Result<(), StreamError> {
        if id.is_empty() || id.len() > 16 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(StreamError::Invalid(format!("device section id {id:?}")));
        }
        let mut h = [0u8; 24];
        h[..id.len()].copy_from_slice(id.as_bytes());
        h[16..20].copy_from_slice(&instance.to_le_bytes());
        h[20..24].copy_from_slice(&version.to_le_bytes());
        self.record(rtype::DEVICE_STATE, &[&h, bytes])
    }

    /// CPU_MODEL: the guest's CPU.
    pub fn cpu_model(&mut self, m: &crate::CpuModel) -> Result<(), StreamError> {
        let b = m.encode()?;
        self.record(rtype::CPU_MODEL, &[&b])
    }

    /// RAM_REFERENCE: a region handed over in place (handover streams).
    pub fn ram_reference(&mut self, r: &crate::RamReference) -> Result<(), StreamError> {
        self.record(rtype::RAM_REFERENCE, &[&r.encode()])
    }

    /// BROKEN_PAGES: broken guest frames (snapshot files).
    pub fn broken_pages(&mut self, gfns: &[u64]) -> Result<(), StreamError> {
        if gfns.len() > crate::MAX_BROKEN_PAGES as usize {
            return Err(StreamError::Invalid(format!("{} broken pages", gfns.len())));
        }
        let mut b = Vec::with_capacity(8 + 8 * gfns.len());
        b.extend_from_slice(&(gfns.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for g in gfns {
            b.extend_from_slice(&g.to_le_bytes());
        }
        self.record(rtype::BROKEN_PAGES, &[&b])
    }

    /// POSTCOPY: the post-copy session and the runs `(first frame, frames)` whose data comes
    /// after the switch-over.
    pub fn postcopy(&mut self, session: u64, runs: &[(u64, u64)]) -> Result<(), StreamError> {
        if runs.len() > crate::MAX_POSTCOPY_RUNS as usize || runs.iter().any(|&(_, n)| n == 0) {
            return Err(StreamError::Invalid(format!("{} post-copy runs (or an empty one)", runs.len())));
        }
        let mut b = Vec::with_capacity(16 + 16 * runs.len());
        b.extend_from_slice(&session.to_le_bytes());
        b.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for &(first, n) in runs {
            b.extend_from_slice(&first.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
        }
        self.record(rtype::POSTCOPY, &[&b])
    }

    /// CHANNELS: page data also comes on `count - 1` more connections of `session`.
    pub fn channels(&mut self, count: u32, session: u64) -> Result<(), StreamError> {
        if !(2..=crate::MAX_CHANNELS).contains(&count) {
            return Err(StreamError::Invalid(format!("{count} channels (2 to {} allowed)", crate::MAX_CHANNELS)));
        }
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&count.to_le_bytes());
        b[8..].copy_from_slice(&session.to_le_bytes());
        self.record(rtype::CHANNELS, &[&b])
    }

    /// FINAL_PASS (optional, empty): the guest is paused, the final pass follows.
    pub fn final_pass(&mut self) -> Result<(), StreamError> {
        self.record(rtype::FINAL_PASS, &[])
    }

    /// CHECKPOINT: a consistent state ends here. From format version 3 it states the count of
    /// records in the epoch it ends and the crc32c over their checksums.
    pub fn checkpoint(&mut self, seq: u64) -> Result<(), StreamError> {
        if self.version < 3 {
            return self.record(rtype::CHECKPOINT, &[&seq.to_le_bytes()]);
        }
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&seq.to_le_bytes());
        b[8..12].copy_from_slice(&self.epoch_records.to_le_bytes());
        b[12..16].copy_from_slice(&self.epoch_crc.to_le_bytes());
        self.record(rtype::CHECKPOINT, &[&b])?;
        self.epoch_records = 0;
        self.epoch_crc = 0;
        Ok(())
    }

    /// DISK_CONFIG: the disks whose blocks follow.
    pub fn disk_config(&mut self, c: &crate::DiskConfig) -> Result<(), StreamError> {
        if c.sectors.is_empty() || c.sectors.len() > crate::MAX_DISKS as usize || c.sectors.contains(&0) {
            return Err(StreamError::Invalid(format!("disk config {:?}", c.sectors)));
        }
        let mut b = Vec::with_capacity(8 + 8 * c.sectors.len());
        b.extend_from_slice(&(c.sectors.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for s in &c.sectors {
            b.extend_from_slice(&s.to_le_bytes());
        }
        self.record(rtype::DISK_CONFIG, &[&b])
    }

    /// DISK_BLOCKS: `len` bytes at byte `offset` of disk `disk`; `data` (of `len` bytes, at most
    /// [`crate::MAX_DISK_EXTENT`]) or zeros when `None`.
    pub fn disk_blocks(&mut self, disk: u32, offset: u64, len: u64, data: Option<&[u8]>) -> Result<(), StreamError> {
        let sector = crate::DISK_SECTOR;
        if len == 0 || !offset.is_multiple_of(sector) || !len.is_multiple_of(sector) {
            return Err(StreamError::Invalid(format!("disk extent of {len} bytes at {offset}")));
        }
        if data.is_some_and(|d| d.len() as u64 != len || len > crate::MAX_DISK_EXTENT) {
            return Err(StreamError::Invalid(format!("disk data extent of {len} bytes")));
        }
        let mut h = [0u8; 24];
        h[..4].copy_from_slice(&disk.to_le_bytes());
        h[4..8].copy_from_slice(&(data.is_none() as u32).to_le_bytes());
        h[8..16].copy_from_slice(&offset.to_le_bytes());
        h[16..24].copy_from_slice(&len.to_le_bytes());
        self.record(rtype::DISK_BLOCKS, &[&h, data.unwrap_or(&[])])
    }

    /// HEARTBEAT (optional, empty): the writer is alive.
    pub fn heartbeat(&mut self) -> Result<(), StreamError> {
        self.record(rtype::HEARTBEAT, &[])
    }

    /// SNAPSHOT_INFO (snapshot files).
    pub fn snapshot_info(&mut self, i: &crate::SnapshotInfo) -> Result<(), StreamError> {
        let b = i.encode()?;
        self.record(rtype::SNAPSHOT_INFO, &[&b])
    }

    /// DISK_MAP (snapshot files): RAM_MAP's body for disk `m.region`, `m.gpa` its size in bytes.
    pub fn disk_map(&mut self, m: &crate::RamMap) -> Result<(), StreamError> {
        let b = m.encode()?;
        self.record(rtype::DISK_MAP, &[&b])
    }

    /// RAM_MAP (snapshot files).
    pub fn ram_map(&mut self, m: &crate::RamMap) -> Result<(), StreamError> {
        let b = m.encode()?;
        self.record(rtype::RAM_MAP, &[&b])
    }

    pub fn end(&mut self) -> Result<(), StreamError> {
        self.record(rtype::END, &[])
    }

    /// A record of any type (for optional extensions and for tests of unknown records).
    pub fn raw_record(&mut self, t: u32, body: &[u8]) -> Result<(), StreamError> {
        self.record(t, &[body])
    }

    pub fn flush(&mut self) -> Result<(), StreamError> {
        self.w.flush().map_err(StreamError::Write)
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    pub fn into_inner(self) -> W {
        self.w
    }
}
