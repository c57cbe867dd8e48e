//! Snapshots: a machine written to a file in the migration stream format, and restored from it.
//!
//! A snapshot file (docs/snapshots.md) is a stream with header flag SNAPSHOT whose records
//! describe the machine (MACHINE_CONFIG, SNAPSHOT_INFO, one RAM_MAP per RAM region, VM_STATE,
//! VCPU_STATE…, DEVICE_STATE…, END) in a metadata area at the start of the file, followed by one
//! data area per region where page i lies at `data_offset + i * 4096` (QEMU's mapped-ram idea):
//! pages are written in place (a live snapshot rewrites a page the guest dirtied again), and a
//! restore reads (or could map) each region directly. Never-written and all-zero pages take no
//! space: the file is sparse.
//!
//! Incremental snapshots: after each snapshot Ferry keeps a dirty-log consumer (the *tracker*)
//! registered, holding every page written since. `--incremental-from P` (P must be the last
//! snapshot this process took) writes only those pages; pages it does not carry come from the
//! parent, named in SNAPSHOT_INFO by path, id and metadata checksum. The tracker's harvested
//! bits are given back if the snapshot fails, so the next snapshot still holds every page
//! dirtied before the failure.
//!
//! A snapshot is written to `PATH.partial`, synced, then renamed: a failed snapshot leaves no
//! file at PATH.

use ferry_stream::fault;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_stream::{
    CpuModel, MachineConfig, PageBatch, RamMap, SnapshotInfo, SnapshotKind, StreamError, StreamFlags, StreamHeader,
    StreamReader, StreamWriter, PAGE_SIZE, SNAPSHOT_ID_LEN,
};
use ferry_vmm::devices::disk_dirty::BlockConsumer;
use ferry_vmm::devices::disk_image::DiskImage;
use ferry_vmm::devices::serial::SerialSink;
use ferry_vmm::devices::virtio_blk::StartMode;
use ferry_vmm::dirty_log::{Bitmap, ConsumerId, Initial};
use ferry_vmm::machine_state::MachineState;
use ferry_vmm::memory::GuestRam;
use ferry_vmm::vm::{create_machine, create_vcpu, DirtyTracking, Vm};
use serde::Serialize;

use crate::records::{load_records, write_sections, LoadError, LoadOptions, RecordSink, StreamKind};
use crate::source::is_zero;

mod restore;
pub use restore::{chain, read_meta, restore, verify_data, RestoreMode, RestoreStats, SnapshotMeta, VerifiedData};

const PAGE: u64 = PAGE_SIZE as u64;
/// Longest chain of incremental snapshots followed on restore.
const MAX_CHAIN: usize = 64;
/// Live snapshot: stop iterating once the rest is estimated to take less than this.
const LIVE_TARGET: Duration = Duration::from_millis(20);
/// Live snapshot: most passes while the guest runs.
const LIVE_MAX_PASSES: u32 = 10;
/// Pages per pwrite at most (a run of consecutive pages is one write).
const MAX_RUN_PAGES: u64 = 512;

/// Errors of taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot write snapshot file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read snapshot file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot file {path} is not valid")]
    Stream {
        path: PathBuf,
        #[source]
        source: StreamError,
    },
    #[error("snapshot file {path} cannot be loaded")]
    Load {
        path: PathBuf,
        #[source]
        source: LoadError,
    },
    #[error("{path} is a migration stream, not a snapshot file (no SNAPSHOT flag)")]
    NotSnapshot { path: PathBuf },
    #[error("snapshot file {path} is incomplete: {what}")]
    Incomplete { path: PathBuf, what: String },
    #[error("page {page} of region {region} in {path} is corrupt (checksum {stored:#010x}, data {computed:#010x})")]
    PageChecksum { path: PathBuf, region: u32, page: u64, stored: u32, computed: u32 },
    #[error("{0} exists and is not a regular file (a socket, a directory, a device): a snapshot never replaces it")]
    NotAFile(PathBuf),
    #[error("block {block} of disk {disk} in {path} is corrupt (checksum {stored:#010x}, data {computed:#010x})")]
    BlockChecksum { path: PathBuf, disk: u32, block: u64, stored: u32, computed: u32 },
    #[error("parent snapshot {parent} of {child} is missing")]
    MissingParent {
        parent: PathBuf,
        child: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{parent} is not the parent of {child}: {what}")]
    WrongParent { parent: PathBuf, child: PathBuf, what: String },
    #[error("snapshot chain from {0} is longer than {MAX_CHAIN} or loops")]
    ChainTooLong(PathBuf),
    #[error("{0} does not match the snapshot's machine: {1}")]
    Mismatch(PathBuf, String),
    #[error(
        "an incremental snapshot needs the last snapshot this Ferry took as its parent; {asked} is not it{}",
        last.as_ref().map(|p| format!(" (the last one is {})", p.display())).unwrap_or_else(|| " (none was taken)".into())
    )]
    NotTracked { asked: PathBuf, last: Option<PathBuf> },
    #[error("--live cannot be combined with --incremental-from yet")]
    LiveIncremental,
    #[error("cannot read disk {disk} ({path}) for the snapshot")]
    DiskRead {
        disk: usize,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write disk {disk} ({path}) from the snapshot")]
    DiskWrite {
        disk: usize,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the dirty-block log of disk {0}")]
    DiskDirty(usize, #[source] ferry_vmm::devices::disk_dirty::DiskDirtyError),
    #[error("the snapshot was cancelled")]
    Cancelled,
    #[error("snapshot metadata of {0} bytes does not fit the {1} bytes reserved for it")]
    MetadataTooLarge(u64, u64),
    #[error("rebuilding the machine failed")]
    Restore(#[source] ferry_vmm::vm::VmError),
    #[error("the machine")]
    Vm(#[from] ferry_vmm::vm::VmError),
    #[error("guest memory")]
    Memory(#[from] ferry_vmm::memory::MemoryError),
}

/// What to take.
#[derive(Debug, Clone)]
pub struct SnapshotParams {
    pub path: PathBuf,
    /// Pre-copy into the file while the guest runs; pause only for the last pass.
    pub live: bool,
    /// Leave the guest paused afterwards.
    pub stop: bool,
    /// Only the pages dirtied since this snapshot (the last one this process took).
    pub incremental_from: Option<PathBuf>,
}

/// The dirty pages since the last snapshot, for the next incremental one.
pub struct Tracker {
    consumer: ConsumerId,
    /// Each disk's blocks written since.
    blocks: Vec<BlockConsumer>,
    id: [u8; SNAPSHOT_ID_LEN],
    meta_crc: u32,
    path: PathBuf,
}

impl Tracker {
    /// Unregisters the tracker's consumer (the VM stops tracking for incrementals).
    pub fn release(self, vm: &Vm) {
        let _ = vm.dirty_unregister(self.consumer);
        for (d, c) in vm.disks().iter().zip(&self.blocks) {
            d.dirty_blocks().unregister(*c);
        }
    }
}

/// What a snapshot did.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    pub path: String,
    pub kind: &'static str,
    pub id: String,
    pub parent: Option<String>,
    pub total_ms: f64,
    /// Guest paused (ms): everything for a plain snapshot, the last pass for a live one.
    pub pause_ms: f64,
    pub passes: u32,
    /// Pages whose data is in the file.
    pub data_pages: u64,
    pub zero_pages: u64,
    /// Pages left to the parent (incremental).
    pub parent_pages: u64,
    /// Bytes of page data written (a live snapshot rewrites re-dirtied pages).
    pub data_bytes_written: u64,
    /// Disks in the snapshot, and their blocks with data in this file.
    pub disks: u64,
    pub disk_data_blocks: u64,
    pub metadata_bytes: u64,
    /// Bytes the file occupies on disk (it is sparse).
    pub allocated_bytes: u64,
    /// Apparent file size.
    pub file_bytes: u64,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn new_id() -> [u8; SNAPSHOT_ID_LEN] {
    let mut id = [0u8; SNAPSHOT_ID_LEN];
    let ok = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut id)).is_ok();
    if !ok {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        id[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
        id[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    id
}

/// Pages of one region as the snapshot records them.
struct RegionMap {
    present: Vec<u64>,
    zero: Vec<u64>,
    /// Per page (dense), valid where present.
    crcs: Vec<u32>,
}

impl RegionMap {
    fn new(npages: u64) -> Self {
        let n = npages.div_ceil(64) as usize;
        RegionMap { present: vec![0; n], zero: vec![0; n], crcs: vec![0; npages as usize] }
    }
    fn is_present(&self, page: u64) -> bool {
        self.present[(page / 64) as usize] & (1 << (page % 64)) != 0
    }
    fn set(&mut self, page: u64, data_crc: Option<u32>) {
        let (w, b) = ((page / 64) as usize, 1u64 << (page % 64));
        match data_crc {
            Some(c) => {
                self.present[w] |= b;
                self.zero[w] &= !b;
                self.crcs[page as usize] = c;
            }
            None => {
                self.present[w] &= !b;
                self.zero[w] |= b;
            }
        }
    }
    /// A broken page: neither data nor zero in this snapshot (BROKEN_PAGES lists it).
    fn set_broken(&mut self, page: u64) {
        let (w, b) = ((page / 64) as usize, 1u64 << (page % 64));
        self.present[w] &= !b;
        self.zero[w] &= !b;
    }
    fn to_record(&self, region: u32, gpa: u64, npages: u64, data_offset: u64) -> RamMap {
        let crcs = (0..npages).filter(|&p| self.present[(p / 64) as usize] & (1 << (p % 64)) != 0);
        RamMap {
            region,
            gpa,
            npages,
            data_offset,
            present: self.present.clone(),
            zero: self.zero.clone(),
            crcs: crcs.map(|p| self.crcs[p as usize]).collect(),
        }
    }
}

/// The file being written.
struct Out<'a> {
    vm: &'a Vm,
    file: File,
    path: PathBuf,
    /// File offset of each region's data area.
    data_offsets: Vec<u64>,
    maps: Vec<RegionMap>,
    /// File offset of each disk's data area, and its block map.
    disk_offsets: Vec<u64>,
    disk_maps: Vec<RegionMap>,
    bytes: u64,
    /// Buffer of the run of pages being gathered.
    run: Vec<u8>,
}

impl Out<'_> {
    fn werr(&self, source: std::io::Error) -> SnapshotError {
        SnapshotError::Write { path: self.path.clone(), source }
    }

    /// Writes the pages set in `bits` (pages `first + i` of region `ri`): data pages in place,
    /// zero pages as zero bits. Each page is copied out of guest RAM once
    /// (`GuestRam::copy_out`), and its checksum and the bytes written are of that copy, so they
    /// always match.
    fn write_pages(&mut self, ri: usize, first: u64, bits: &[u64], probe_holes: bool) -> Result<(), SnapshotError> {
        let ram = self.vm.ram();
        let region = ram.regions()[ri];
        let count = bits.len() as u64 * 64;
        let data = if probe_holes && ram.memfd_backs(ri) {
            Some(ram.data_pages(ri, first, count.min(region.size / PAGE - first))?)
        } else {
            None
        };
        // A page past the probed range (none is) counts as data: read, never assumed zero.
        let in_data = |page: u64| data.as_ref().is_none_or(|d| d.get(page - first) || page - first >= d.npages());
        let pages = bits.iter().enumerate().flat_map(|(w, &word)| {
            (0..64u64).filter(move |b| word & (1 << b) != 0).map(move |b| first + w as u64 * 64 + b)
        });
        // Runs of consecutive data pages are gathered and go out in one pwrite. Each page is
        // copied straight to its place in the run, which starts on a page boundary
        // (ferry_stream::page_aligned_offset says why).
        let mut run = std::mem::take(&mut self.run);
        run.resize(run.len().max((MAX_RUN_PAGES as usize + 1) * PAGE_SIZE), 0);
        let base = ferry_stream::page_aligned_offset(&run);
        let mut len = 0usize;
        let mut run_start = 0u64;
        for page in pages {
            let contiguous = run_start + (len / PAGE_SIZE) as u64 == page;
            if len > 0 && (!contiguous || len as u64 >= MAX_RUN_PAGES * PAGE) {
                self.flush_run(ri, run_start, &run[base..base + len])?;
                len = 0;
            }
            let slot = &mut run[base + len..base + len + PAGE_SIZE];
            let gpa = region.gpa + page * PAGE;
            // A broken page is never read; one that breaks under the copy is caught by it.
            let mut broken = ram.is_poisoned(gpa);
            let data = !broken
                && in_data(page)
                && match ram.copy_out(gpa, slot) {
                    Ok(()) => !is_zero(slot),
                    Err(ferry_vmm::memory::MemoryError::Poisoned { .. }) => {
                        broken = true;
                        false
                    }
                    Err(e) => return Err(e.into()),
                };
            if broken {
                if self.maps[ri].is_present(page) {
                    self.punch(ri, page)?;
                }
                self.maps[ri].set_broken(page);
            } else if data {
                self.maps[ri].set(page, Some(crc32c::crc32c(slot)));
                if len == 0 {
                    run_start = page;
                }
                len += PAGE_SIZE;
            } else {
                if self.maps[ri].is_present(page) {
                    // Written with data by an earlier pass: drop those bytes, so that a restore
                    // mapping this file sees zeros there too.
                    self.punch(ri, page)?;
                }
                self.maps[ri].set(page, None);
            }
        }
        if len > 0 {
            self.flush_run(ri, run_start, &run[base..base + len])?;
        }
        self.run = run;
        Ok(())
    }

    fn flush_run(&mut self, ri: usize, start: u64, data: &[u8]) -> Result<(), SnapshotError> {
        let off = self.data_offsets[ri] + start * PAGE;
        if let Some(e) = fault::take_io(true) {
            return Err(self.werr(e));
        }
        self.file.write_all_at(data, off).map_err(|e| self.werr(e))?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Writes the blocks set in `bits` of disk `di` in place in its data area: blocks with data
    /// (read from the image, checksummed), all-zero blocks as zero bits. `data` lists the image's
    /// byte ranges that may hold data (outside them it is not read).
    fn write_blocks(&mut self, di: usize, bits: &Bitmap, data: &[(u64, u64)]) -> Result<(), SnapshotError> {
        let img = self.vm.disks()[di].image();
        let size = img.bytes();
        let mut buf = vec![0u8; PAGE_SIZE];
        for b in bits.iter_set() {
            let off = b * PAGE;
            if off >= size {
                continue;
            }
            let len = (size - off).min(PAGE) as usize;
            let has_data = data.iter().any(|&(a, e)| a < off + len as u64 && e > off);
            let is_data = has_data && {
                // A short last block is padded with zeros (its checksum covers the padding).
                buf.fill(0);
                img.read_at(off, &mut buf[..len]).map_err(|source| SnapshotError::DiskRead {
                    disk: di,
                    path: img.path().display().to_string(),
                    source,
                })?;
                !is_zero(&buf)
            };
            if is_data {
                self.disk_maps[di].set(b, Some(crc32c::crc32c(&buf)));
                self.file.write_all_at(&buf, self.disk_offsets[di] + off).map_err(|e| self.werr(e))?;
                self.bytes += PAGE;
            } else {
                if self.disk_maps[di].is_present(b) {
                    self.punch_at(self.disk_offsets[di] + off)?;
                }
                self.disk_maps[di].set(b, None);
            }
        }
        Ok(())
    }

    /// Deallocates one page of a region's data area (it reads as zeros afterwards).
    fn punch(&self, ri: usize, page: u64) -> Result<(), SnapshotError> {
        self.punch_at(self.data_offsets[ri] + page * PAGE)
    }

    /// Deallocates the 4 KiB at `off` of the file.
    fn punch_at(&self, off: u64) -> Result<(), SnapshotError> {
        if ferry_vmm::memory::punch_hole(&self.file, off, PAGE).is_err() {
            // Without hole punching, write the zeros.
            self.file.write_all_at(&[0u8; PAGE_SIZE], off).map_err(|e| self.werr(e))?;
        }
        Ok(())
    }
}

/// Pages harvested from a consumer, kept until the snapshot is safely written; given back on
/// failure.
struct Harvested<'a> {
    vm: &'a Vm,
    consumer: ConsumerId,
    /// (region, bits from page 0)
    bits: Vec<(usize, Vec<u64>)>,
    keep: bool,
}

impl<'a> Harvested<'a> {
    fn take(vm: &'a Vm, consumer: ConsumerId) -> Result<Self, SnapshotError> {
        let mut h = Harvested { vm, consumer, bits: Vec::new(), keep: false };
        for (ri, r) in vm.ram().regions().iter().enumerate() {
            let b = vm.dirty_harvest(consumer, ri, 0, r.size / PAGE)?;
            h.bits.push((ri, b));
        }
        Ok(h)
    }
}

impl Drop for Harvested<'_> {
    fn drop(&mut self) {
        if !self.keep {
            for (ri, b) in &self.bits {
                let _ = self.vm.dirty_give_back(self.consumer, *ri, 0, b);
            }
        }
    }
}

/// Resumes on drop unless told to stay paused.
struct Paused<'a> {
    vm: &'a Vm,
    resume: bool,
    since: Instant,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if self.resume {
            let _ = self.vm.resume();
        }
    }
}

/// The disks' quiesce, undone on drop (held requests complete to the guest then).
struct DisksQuiesced<'a>(&'a Vm);

impl Drop for DisksQuiesced<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.resume_disks() {
            tracing::warn!("after the snapshot: {}", crate::destination::ErrorChain(&e));
        }
    }
}

/// One dirty-block consumer per disk, unregistered on drop unless kept.
struct BlockConsumers<'a> {
    vm: &'a Vm,
    ids: Vec<BlockConsumer>,
    keep: bool,
}

impl<'a> BlockConsumers<'a> {
    fn register(vm: &'a Vm, name: &str, all_dirty: bool) -> Result<Self, SnapshotError> {
        let mut c = BlockConsumers { vm, ids: Vec::new(), keep: false };
        for (i, d) in vm.disks().iter().enumerate() {
            c.ids.push(d.dirty_blocks().register(name, all_dirty).map_err(|e| SnapshotError::DiskDirty(i, e))?);
        }
        Ok(c)
    }
}

impl Drop for BlockConsumers<'_> {
    fn drop(&mut self) {
        if !self.keep {
            for (d, c) in self.vm.disks().iter().zip(&self.ids) {
                d.dirty_blocks().unregister(*c);
            }
        }
    }
}

/// Blocks harvested from consumers, given back on drop unless kept (the snapshot landed).
struct BlocksHarvested<'a> {
    vm: &'a Vm,
    ids: Vec<BlockConsumer>,
    bits: Vec<Bitmap>,
    keep: bool,
}

impl<'a> BlocksHarvested<'a> {
    fn take(vm: &'a Vm, ids: &[BlockConsumer]) -> Result<Self, SnapshotError> {
        let mut h = BlocksHarvested { vm, ids: ids.to_vec(), bits: Vec::new(), keep: false };
        for (i, (d, c)) in vm.disks().iter().zip(ids).enumerate() {
            h.bits.push(d.dirty_blocks().harvest(*c).map_err(|e| SnapshotError::DiskDirty(i, e))?);
        }
        Ok(h)
    }
}

impl Drop for BlocksHarvested<'_> {
    fn drop(&mut self) {
        if !self.keep {
            for ((d, c), b) in self.vm.disks().iter().zip(&self.ids).zip(&self.bits) {
                let _ = d.dirty_blocks().give_back(*c, b);
            }
        }
    }
}

/// Unregisters a consumer on drop unless kept.
struct NewConsumer<'a> {
    vm: &'a Vm,
    id: ConsumerId,
    keep: bool,
}

impl Drop for NewConsumer<'_> {
    fn drop(&mut self) {
        if !self.keep {
            let _ = self.vm.dirty_unregister(self.id);
        }
    }
}

/// The file's layout: metadata reserve, each RAM region's data area, each disk's data area.
fn layout(vm: &Vm) -> (u64, Vec<u64>, Vec<u64>) {
    let regions = vm.ram().regions();
    let map_bytes = |pages: u64| 64 + pages.div_ceil(64) * 16 + pages * 4;
    let disk_blocks: Vec<u64> = vm.disks().iter().map(|d| d.image().bytes().div_ceil(PAGE)).collect();
    let index: u64 = regions.iter().map(|r| map_bytes(r.size / PAGE)).sum::<u64>()
        + disk_blocks.iter().map(|&b| map_bytes(b)).sum::<u64>();
    let state = 64 * 1024 * (vm.vcpu_count() as u64 + 2) + 64 * 1024 * (1 + vm.disks().len() as u64);
    let meta = (index + state + (1 << 20)).next_multiple_of(1 << 21);
    let mut offs = Vec::new();
    let mut o = meta;
    for r in regions {
        offs.push(o);
        o += r.size;
    }
    let mut disk_offs = Vec::new();
    for b in disk_blocks {
        disk_offs.push(o);
        o += b * PAGE;
    }
    (meta, offs, disk_offs)
}

/// The partial file's path.
fn partial(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Takes a snapshot of `vm`. `tracker` is the VM's incremental tracker (replaced on success);
/// `already_paused` says the API paused the guest (it then stays paused).
pub fn snapshot(
    vm: &Vm,
    params: &SnapshotParams,
    tracker: &mut Option<Tracker>,
    already_paused: bool,
    cancel: &AtomicBool,
) -> Result<SnapshotSummary, SnapshotError> {
    let t_start = Instant::now();
    fault::disarm();
    if params.live && params.incremental_from.is_some() {
        return Err(SnapshotError::LiveIncremental);
    }
    let parent = match &params.incremental_from {
        Some(p) => {
            let meta = read_meta(p)?;
            match tracker {
                Some(t) if t.id == meta.info.id && t.meta_crc == meta.meta_crc => {
                    Some((p.clone(), meta.info.id, meta.meta_crc, t.consumer))
                }
                _ => {
                    return Err(SnapshotError::NotTracked {
                        asked: p.clone(),
                        last: tracker.as_ref().map(|t| t.path.clone()),
                    })
                }
            }
        }
        None => None,
    };
    // A snapshot replaces only a regular file (an older snapshot): renaming over a socket (the
    // VM's own API socket, say), a directory or a device would take it away from its owner.
    if let Ok(m) = std::fs::symlink_metadata(&params.path) {
        if !m.file_type().is_file() {
            return Err(SnapshotError::NotAFile(params.path.clone()));
        }
    }
    let tmp = partial(&params.path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|source| SnapshotError::Write { path: tmp.clone(), source })?;
    let r = write_file(vm, params, tracker, parent, already_paused, cancel, file, &tmp, t_start);
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn write_file(
    vm: &Vm,
    params: &SnapshotParams,
    tracker: &mut Option<Tracker>,
    parent: Option<(PathBuf, [u8; SNAPSHOT_ID_LEN], u32, ConsumerId)>,
    already_paused: bool,
    cancel: &AtomicBool,
    file: File,
    tmp: &Path,
    t_start: Instant,
) -> Result<SnapshotSummary, SnapshotError> {
    let (meta_reserve, data_offsets, disk_offsets) = layout(vm);
    let end = match (disk_offsets.last(), vm.disks().last()) {
        (Some(&o), Some(d)) => o + d.image().bytes().div_ceil(PAGE) * PAGE,
        _ => {
            data_offsets.last().copied().unwrap_or(meta_reserve)
                + vm.ram().regions().last().map(|r| r.size).unwrap_or(0)
        }
    };
    file.set_len(end).map_err(|source| SnapshotError::Write { path: tmp.to_path_buf(), source })?;
    let maps = vm.ram().regions().iter().map(|r| RegionMap::new(r.size / PAGE)).collect();
    let disk_maps = vm.disks().iter().map(|d| RegionMap::new(d.image().bytes().div_ceil(PAGE))).collect();
    let mut out = Out {
        vm,
        file,
        path: tmp.to_path_buf(),
        data_offsets,
        maps,
        disk_offsets,
        disk_maps,
        bytes: 0,
        run: Vec::new(),
    };
    let whole = |d: &ferry_vmm::devices::virtio_blk::BlockDevice| vec![(0, d.image().bytes())];
    let mut passes = 0;

    // Live: pre-copy into the file while the guest runs.
    let live = if params.live {
        let reg = vm.dirty_consumer("snapshot-live", Initial::AllDirty)?;
        let blocks = BlockConsumers::register(vm, "snapshot-live", true)?;
        let mut last_pending = u64::MAX;
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err(SnapshotError::Cancelled);
            }
            vm.dirty_sync()?;
            let pending = vm.dirty_pending(reg.id())?;
            let secs = t_start.elapsed().as_secs_f64().max(1e-3);
            let rate = out.bytes as f64 / secs;
            let estimate = if rate > 0.0 { pending as f64 * PAGE as f64 / rate } else { f64::INFINITY };
            if passes > 0
                && (estimate < LIVE_TARGET.as_secs_f64()
                    || pending * 10 > last_pending * 7
                    || passes >= LIVE_MAX_PASSES)
            {
                break;
            }
            last_pending = pending;
            let h = Harvested::take(vm, reg.id())?;
            for (ri, b) in &h.bits {
                out.write_pages(*ri, 0, b, passes == 0)?;
            }
            let mut h = h;
            h.keep = true;
            let mut hb = BlocksHarvested::take(vm, &blocks.ids)?;
            for (di, (d, b)) in vm.disks().iter().zip(&hb.bits).enumerate() {
                let data = if passes == 0 { d.image().data_ranges() } else { whole(d) };
                out.write_blocks(di, b, &data)?;
            }
            hb.keep = true;
            passes += 1;
        }
        Some((reg, blocks))
    } else {
        None
    };

    // The stop.
    let paused_at = Instant::now();
    // The guard exists before the pause, so a pause that fails half-way still resumes; a failed
    // snapshot always leaves the guest as it found it (running unless the API had paused it).
    let paused = Paused { vm, resume: !already_paused, since: paused_at };
    if !already_paused {
        vm.pause()?;
    }
    // The disks stop taking and completing requests: what they wrote is in their logs, what is
    // in flight goes in their state (a restore re-executes it). Resumed when this goes.
    let disks_quiesced = DisksQuiesced(vm);
    vm.quiesce_disks()?;
    fault::hit("snapshot.paused");
    // The next incremental snapshot's tracker starts now: everything before is in this one.
    let fresh = vm.dirty_register("snapshot", Initial::Clean)?;
    let mut fresh = NewConsumer { vm, id: fresh, keep: false };
    let mut fresh_blocks = BlockConsumers::register(vm, "snapshot", false)?;
    vm.dirty_sync()?;
    let _in_this_snapshot = {
        let mut h = Harvested::take(vm, fresh.id)?;
        h.keep = true;
        h
    };
    let mut from_parent = None;
    let mut blocks_from_parent = None;
    match (&live, &parent) {
        (Some((reg, blocks)), _) => {
            let mut h = Harvested::take(vm, reg.id())?;
            for (ri, b) in &h.bits {
                out.write_pages(*ri, 0, b, false)?;
            }
            h.keep = true;
            let mut hb = BlocksHarvested::take(vm, &blocks.ids)?;
            for (di, (d, b)) in vm.disks().iter().zip(&hb.bits).enumerate() {
                out.write_blocks(di, b, &whole(d))?;
            }
            hb.keep = true;
            passes += 1;
        }
        (None, Some((_, _, _, consumer))) => {
            let h = Harvested::take(vm, *consumer)?;
            for (ri, b) in &h.bits {
                out.write_pages(*ri, 0, b, false)?;
            }
            // Given back unless the whole snapshot lands.
            from_parent = Some(h);
            let ids = tracker.as_ref().map(|t| t.blocks.clone()).unwrap_or_default();
            let hb = BlocksHarvested::take(vm, &ids)?;
            for (di, (d, b)) in vm.disks().iter().zip(&hb.bits).enumerate() {
                out.write_blocks(di, b, &whole(d))?;
            }
            blocks_from_parent = Some(hb);
            passes += 1;
        }
        (None, None) => {
            for (ri, r) in vm.ram().regions().iter().enumerate() {
                let all = vec![!0u64; (r.size / PAGE).div_ceil(64) as usize];
                out.write_pages(ri, 0, &all, true)?;
            }
            for (di, d) in vm.disks().iter().enumerate() {
                let all = Bitmap::new(d.image().bytes().div_ceil(PAGE), true);
                out.write_blocks(di, &all, &d.image().data_ranges())?;
            }
            passes += 1;
        }
    }

    // Metadata, captured while paused.
    let id = new_id();
    let ram = vm.ram();
    let info = SnapshotInfo {
        id,
        parent_id: parent.as_ref().map(|p| p.1).unwrap_or([0; SNAPSHOT_ID_LEN]),
        parent_meta_crc: parent.as_ref().map(|p| p.2).unwrap_or(0),
        kind: if parent.is_some() { SnapshotKind::Incremental } else { SnapshotKind::Full },
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        parent_path: parent.as_ref().map(|p| p.0.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let werr = |e: StreamError| SnapshotError::Stream { path: tmp.to_path_buf(), source: e };
    let mut w = StreamWriter::new(Vec::new(), &StreamHeader::new(StreamFlags::SNAPSHOT)).map_err(werr)?;
    w.machine_config(&MachineConfig {
        memory_bytes: ram.size(),
        vcpus: vm.vcpu_count(),
        regions: ram.regions().iter().map(|r| (r.gpa, r.size)).collect(),
    })
    .map_err(werr)?;
    w.cpu_model(vm.cpu_model()).map_err(werr)?;
    w.snapshot_info(&info).map_err(werr)?;
    let mut data_pages = 0;
    let mut zero_pages = 0;
    let mut parent_pages = 0;
    for (ri, r) in ram.regions().iter().enumerate() {
        let m = out.maps[ri].to_record(ri as u32, r.gpa, r.size / PAGE, out.data_offsets[ri]);
        let (d, z) = (m.present_count(), m.zero.iter().map(|x| x.count_ones() as u64).sum::<u64>());
        data_pages += d;
        zero_pages += z;
        parent_pages += m.npages - d - z;
        w.ram_map(&m).map_err(werr)?;
    }
    if !vm.disks().is_empty() {
        w.disk_config(&crate::storage::disk_config(vm)).map_err(werr)?;
    }
    let mut disk_data_blocks = 0;
    for (di, d) in vm.disks().iter().enumerate() {
        let bytes = d.image().bytes();
        let m = out.disk_maps[di].to_record(di as u32, bytes, bytes.div_ceil(PAGE), out.disk_offsets[di]);
        disk_data_blocks += m.present_count();
        w.disk_map(&m).map_err(werr)?;
    }
    // The broken pages (the set as it is now, the guest paused): neither data nor zero.
    let broken: Vec<u64> = ram.poison().list().iter().map(|&(g, _)| g).collect();
    if !broken.is_empty() {
        w.broken_pages(&broken).map_err(werr)?;
    }
    write_sections(&mut w, &vm.save_state()?.sections()).map_err(werr)?;
    w.end().map_err(werr)?;
    drop(disks_quiesced);
    let pause_ms = paused.since.elapsed().as_secs_f64() * 1000.0;
    // The guest runs on while the file is finished; with --stop it stays paused, but is resumed
    // if finishing the file fails.
    let stopped = if params.stop {
        Some(paused)
    } else {
        drop(paused);
        None
    };
    let meta = w.into_inner();
    if meta.len() as u64 > meta_reserve {
        return Err(SnapshotError::MetadataTooLarge(meta.len() as u64, meta_reserve));
    }
    fault::hit("snapshot.pages-written");
    if let Some(e) = fault::take_io(true) {
        return Err(out.werr(e));
    }
    out.file.write_all_at(&meta, 0).map_err(|e| out.werr(e))?;
    out.file.sync_all().map_err(|e| out.werr(e))?;
    fault::hit("snapshot.synced");
    std::fs::rename(tmp, &params.path).map_err(|source| SnapshotError::Write { path: params.path.clone(), source })?;
    fault::hit("snapshot.renamed");
    if let Some(dir) = params.path.parent() {
        if let Ok(d) = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
            let _ = d.sync_all();
        }
    }

    // Landed: the new tracker replaces the old one; bits taken from the old one are consumed.
    if let Some(mut p) = stopped {
        p.resume = false;
    }
    if let Some(mut h) = from_parent {
        h.keep = true;
    }
    if let Some(mut h) = blocks_from_parent {
        h.keep = true;
    }
    if let Some(old) = tracker.take() {
        old.release(vm);
    }
    fresh.keep = true;
    fresh_blocks.keep = true;
    *tracker = Some(Tracker {
        consumer: fresh.id,
        blocks: fresh_blocks.ids.clone(),
        id,
        meta_crc: crc32c::crc32c(&meta),
        path: params.path.clone(),
    });
    let st = std::fs::metadata(&params.path).ok();
    use std::os::unix::fs::MetadataExt;
    Ok(SnapshotSummary {
        path: params.path.display().to_string(),
        kind: if parent.is_some() {
            "incremental"
        } else if params.live {
            "live"
        } else {
            "full"
        },
        id: hex(&id),
        parent: parent.as_ref().map(|p| p.0.display().to_string()),
        total_ms: t_start.elapsed().as_secs_f64() * 1000.0,
        pause_ms,
        passes,
        data_pages,
        zero_pages,
        parent_pages,
        data_bytes_written: out.bytes,
        disks: vm.disks().len() as u64,
        disk_data_blocks,
        metadata_bytes: meta.len() as u64,
        allocated_bytes: st.as_ref().map(|m| m.blocks() * 512).unwrap_or(0),
        file_bytes: st.as_ref().map(|m| m.len()).unwrap_or(0),
    })
}
