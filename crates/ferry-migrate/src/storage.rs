//! Disks in the stream: the source side's sending of a machine's disk blocks (a storage
//! migration, `ferry migrate --copy-storage`, and replication) and the receiving side's writing
//! of them into its own images.
//!
//! The first pass sends every block of each image: ranges the file system reports as holes go as
//! zero extents without being read, data ranges are read and their all-zero blocks go as zero
//! extents too. Later passes send the blocks the guest wrote since (the disk's dirty-block log,
//! one consumer per sender). A pass that fails gives its harvested blocks back, so nothing the
//! guest wrote is lost for a retry (docs/virtio-blk.md, "Storage in the stream").

use std::io::Write;

use ferry_stream::{DiskBlocks, DiskConfig, StreamWriter};
use ferry_vmm::devices::disk_dirty::{BlockConsumer, DiskDirtyError, DIRTY_BLOCK};
use ferry_vmm::devices::disk_image::{DiskImage, SECTOR_SIZE};
use ferry_vmm::Vm;

/// Bytes read from an image at a time (and the most data one DISK_BLOCKS record carries here).
const CHUNK: u64 = 1 << 20;

/// Errors of sending or receiving disk blocks.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot read disk {disk} ({path}) at byte {offset}")]
    Read {
        disk: usize,
        path: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write disk {disk} ({path}) at byte {offset}")]
    Write {
        disk: usize,
        path: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("sending disk blocks failed")]
    Send(#[source] ferry_stream::StreamError),
    #[error("the dirty-block log of disk {0}")]
    Dirty(usize, #[source] DiskDirtyError),
    #[error(
        "the stream carries {there} disk(s) but this Ferry was given {here} (--disk): each disk of the source needs \
         its own image here"
    )]
    DiskCount { there: usize, here: usize },
    #[error(
        "disk {disk} ({path}) has {here} sectors here but {there} on the source (the images must be the same size)"
    )]
    DiskSize { disk: usize, path: String, here: u64, there: u64 },
    #[error("disk {disk} ({path}) is read-only here: it cannot take the source's blocks")]
    ReadOnly { disk: usize, path: String },
    #[error("DISK_BLOCKS for disk {disk} before the stream's DISK_CONFIG, or for a disk it does not have")]
    NoDisk { disk: u32 },
    #[error("DISK_BLOCKS extent of {len} bytes at {offset} lies outside disk {disk} ({size} bytes)")]
    Outside { disk: u32, offset: u64, len: u64, size: u64 },
}

/// What a pass sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StorageCounts {
    /// Blocks harvested (every block in the first pass).
    pub blocks: u64,
    /// Bytes of data sent.
    pub data_bytes: u64,
    /// Bytes sent as zero extents (no data).
    pub zero_bytes: u64,
}

impl std::ops::AddAssign for StorageCounts {
    fn add_assign(&mut self, o: StorageCounts) {
        self.blocks += o.blocks;
        self.data_bytes += o.data_bytes;
        self.zero_bytes += o.zero_bytes;
    }
}

/// The disks of a machine as DISK_CONFIG describes them.
pub fn disk_config(vm: &Vm) -> DiskConfig {
    DiskConfig { sectors: vm.disks().iter().map(|d| d.image().sectors()).collect() }
}

/// A sender's view of a machine's disks: one dirty-block consumer per disk, unregistered on
/// drop (the other consumers keep their bits).
pub struct StorageSender<'a> {
    vm: &'a Vm,
    consumers: Vec<BlockConsumer>,
    first_pass: bool,
}

impl Drop for StorageSender<'_> {
    fn drop(&mut self) {
        for (d, c) in self.vm.disks().iter().zip(&self.consumers) {
            d.dirty_blocks().unregister(*c);
        }
    }
}

impl<'a> StorageSender<'a> {
    /// Registers `name` on every disk of `vm`, every block dirty (the first pass sends all).
    pub fn start(vm: &'a Vm, name: &str) -> Result<StorageSender<'a>, StorageError> {
        let mut consumers = Vec::new();
        for (i, d) in vm.disks().iter().enumerate() {
            match d.dirty_blocks().register(name, true) {
                Ok(c) => consumers.push(c),
                Err(e) => {
                    for (d, c) in vm.disks().iter().zip(&consumers) {
                        d.dirty_blocks().unregister(*c);
                    }
                    return Err(StorageError::Dirty(i, e));
                }
            }
        }
        Ok(StorageSender { vm, consumers, first_pass: true })
    }

    /// Dirty blocks still to send, all disks.
    pub fn pending(&self) -> u64 {
        self.vm.disks().iter().zip(&self.consumers).map(|(d, c)| d.dirty_blocks().pending(*c).unwrap_or(0)).sum()
    }

    /// Harvests and sends every dirty block of every disk. A disk whose blocks could not all be
    /// sent gets its harvest back.
    pub fn send<W: Write>(&mut self, w: &mut StreamWriter<W>) -> Result<StorageCounts, StorageError> {
        let vm = self.vm;
        let mut total = StorageCounts::default();
        for (i, (d, c)) in vm.disks().iter().zip(&self.consumers).enumerate() {
            let log = d.dirty_blocks();
            let bits = log.harvest(*c).map_err(|e| StorageError::Dirty(i, e))?;
            let data = if self.first_pass { d.image().data_ranges() } else { vec![(0, d.image().bytes())] };
            match send_blocks(i, d.image(), &bits, &data, w) {
                Ok(n) => total += n,
                Err(e) => {
                    let _ = log.give_back(*c, &bits);
                    return Err(e);
                }
            }
        }
        self.first_pass = false;
        Ok(total)
    }
}

/// Sends the blocks set in `bits` of disk `index`; `data` lists the byte ranges that may hold
/// data (outside them the image reads as zeros and is not read).
fn send_blocks<W: Write>(
    index: usize,
    img: &DiskImage,
    bits: &ferry_vmm::dirty_log::Bitmap,
    data: &[(u64, u64)],
    w: &mut StreamWriter<W>,
) -> Result<StorageCounts, StorageError> {
    let size = img.bytes();
    let mut counts = StorageCounts { blocks: bits.count(), ..Default::default() };
    let mut zero_run: Option<(u64, u64)> = None;
    let mut buf = vec![0u8; CHUNK as usize];
    let disk = index as u32;
    let send_err = StorageError::Send;
    let flush_zero = |w: &mut StreamWriter<W>, run: &mut Option<(u64, u64)>, counts: &mut StorageCounts| {
        if let Some((off, len)) = run.take() {
            counts.zero_bytes += len;
            w.disk_blocks(disk, off, len, None).map_err(send_err)?;
        }
        Ok::<(), StorageError>(())
    };
    let mut blocks = bits.iter_set().peekable();
    while let Some(first) = blocks.next() {
        // A run of consecutive dirty blocks, cut into chunks.
        let mut last = first;
        while blocks.peek() == Some(&(last + 1)) && (last + 1 - first) * DIRTY_BLOCK < CHUNK {
            last += 1;
            blocks.next();
        }
        let start = first * DIRTY_BLOCK;
        let end = ((last + 1) * DIRTY_BLOCK).min(size);
        if start >= end {
            continue;
        }
        let has_data = data.iter().any(|&(a, b)| a < end && b > start);
        if !has_data {
            match &mut zero_run {
                Some((off, len)) if *off + *len == start => *len += end - start,
                _ => {
                    flush_zero(w, &mut zero_run, &mut counts)?;
                    zero_run = Some((start, end - start));
                }
            }
            continue;
        }
        let chunk = &mut buf[..(end - start) as usize];
        img.read_at(start, chunk).map_err(|source| StorageError::Read {
            disk: index,
            path: img.path().display().to_string(),
            offset: start,
            source,
        })?;
        // Split into runs of data blocks and zero blocks.
        let mut pos = 0usize;
        while pos < chunk.len() {
            let blk = (chunk.len() - pos).min(DIRTY_BLOCK as usize);
            let zero = crate::source::is_zero(&chunk[pos..pos + blk]);
            let mut run_end = pos + blk;
            while run_end < chunk.len() {
                let n = (chunk.len() - run_end).min(DIRTY_BLOCK as usize);
                if crate::source::is_zero(&chunk[run_end..run_end + n]) != zero {
                    break;
                }
                run_end += n;
            }
            let off = start + pos as u64;
            let len = (run_end - pos) as u64;
            if zero {
                match &mut zero_run {
                    Some((o, l)) if *o + *l == off => *l += len,
                    _ => {
                        flush_zero(w, &mut zero_run, &mut counts)?;
                        zero_run = Some((off, len));
                    }
                }
            } else {
                flush_zero(w, &mut zero_run, &mut counts)?;
                w.disk_blocks(disk, off, len, Some(&chunk[pos..run_end])).map_err(StorageError::Send)?;
                counts.data_bytes += len;
            }
            pos = run_end;
        }
    }
    flush_zero(w, &mut zero_run, &mut counts)?;
    Ok(counts)
}

/// The receiving side's disks: checks DISK_CONFIG against them and writes extents.
pub struct StorageReceiver<'a> {
    disks: &'a [DiskImage],
    configured: bool,
}

impl<'a> StorageReceiver<'a> {
    pub fn new(disks: &'a [DiskImage]) -> Self {
        StorageReceiver { disks, configured: false }
    }

    /// Whether the stream carried DISK_CONFIG (its disks are this side's own copies).
    pub fn configured(&self) -> bool {
        self.configured
    }

    /// Checks the stream's disks against ours: same count, same sizes, writable.
    pub fn config(&mut self, c: &DiskConfig) -> Result<(), StorageError> {
        if c.sectors.len() != self.disks.len() {
            return Err(StorageError::DiskCount { there: c.sectors.len(), here: self.disks.len() });
        }
        for (i, (img, &there)) in self.disks.iter().zip(&c.sectors).enumerate() {
            let path = img.path().display().to_string();
            if img.sectors() != there {
                return Err(StorageError::DiskSize { disk: i, path, here: img.sectors(), there });
            }
            if img.readonly() {
                return Err(StorageError::ReadOnly { disk: i, path });
            }
        }
        self.configured = true;
        Ok(())
    }

    /// Checks an extent against the disks (before it is staged or written).
    pub fn check(&self, disk: u32, offset: u64, len: u64) -> Result<&'a DiskImage, StorageError> {
        let img = self.disks.get(disk as usize).filter(|_| self.configured).ok_or(StorageError::NoDisk { disk })?;
        let size = img.sectors() * SECTOR_SIZE;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(StorageError::Outside { disk, offset, len, size });
        }
        Ok(img)
    }

    /// Writes an extent into its disk.
    pub fn apply(&self, b: &DiskBlocks<'_>) -> Result<(), StorageError> {
        let img = self.check(b.disk, b.offset, b.len)?;
        let r = match b.data {
            Some(d) => img.write_at(b.offset, d),
            None => img.zero_range(b.offset, b.len),
        };
        r.map_err(|source| StorageError::Write {
            disk: b.disk as usize,
            path: img.path().display().to_string(),
            offset: b.offset,
            source,
        })
    }
}
