//! The records of snapshot files: SNAPSHOT_INFO (identity and parent) and RAM_MAP (where a RAM
//! region's pages lie in the file). Spec: docs/stream-format.md, "Snapshot files".

use crate::reader::{u32_at, u64_at};
use crate::{StreamError, PAGE_SIZE};

/// Length of a snapshot id.
pub const SNAPSHOT_ID_LEN: usize = 16;
/// Longest parent path stored in SNAPSHOT_INFO.
pub const MAX_PARENT_PATH: usize = 4096;

/// Whether a snapshot holds every page or only those dirtied since its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    Full = 0,
    Incremental = 1,
}

/// Identity of a snapshot file and of its parent (incremental snapshots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: [u8; SNAPSHOT_ID_LEN],
    /// All zero for a full snapshot.
    pub parent_id: [u8; SNAPSHOT_ID_LEN],
    /// crc32c of the parent's metadata (its stream from byte 0 to the end of its END record).
    pub parent_meta_crc: u32,
    pub kind: SnapshotKind,
    pub created_unix_ms: u64,
    /// Where the parent was written, as given to `--incremental-from` (empty for a full one).
    pub parent_path: String,
}

/// Where one RAM region's pages are in a snapshot file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamMap {
    pub region: u32,
    pub gpa: u64,
    pub npages: u64,
    /// File offset of page 0 of the region (a multiple of 4096); page i is at
    /// `data_offset + i * 4096` when it is present.
    pub data_offset: u64,
    /// Pages whose data is in this file.
    pub present: Vec<u64>,
    /// Pages that are zero in this snapshot (no data). Neither bit: the page is the parent's.
    pub zero: Vec<u64>,
    /// crc32c of each present page, in page order.
    pub crcs: Vec<u32>,
}

fn words(npages: u64) -> usize {
    npages.div_ceil(64) as usize
}

impl SnapshotInfo {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, StreamError> {
        if self.parent_path.len() > MAX_PARENT_PATH {
            return Err(StreamError::Invalid(format!("parent path of {} bytes", self.parent_path.len())));
        }
        let mut b = Vec::with_capacity(56 + self.parent_path.len());
        b.extend_from_slice(&self.id);
        b.extend_from_slice(&self.parent_id);
        b.extend_from_slice(&self.parent_meta_crc.to_le_bytes());
        b.extend_from_slice(&(self.kind as u32).to_le_bytes());
        b.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        b.extend_from_slice(&(self.parent_path.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(self.parent_path.as_bytes());
        Ok(b)
    }

    /// Decodes a body; `Err` carries what is wrong.
    pub(crate) fn decode(body: &[u8]) -> Result<Self, String> {
        if body.len() < 56 {
            return Err(format!("body of {} bytes, need at least 56", body.len()));
        }
        let mut id = [0u8; SNAPSHOT_ID_LEN];
        id.copy_from_slice(&body[..16]);
        let mut parent_id = [0u8; SNAPSHOT_ID_LEN];
        parent_id.copy_from_slice(&body[16..32]);
        let kind = match u32_at(body, 36) {
            0 => SnapshotKind::Full,
            1 => SnapshotKind::Incremental,
            k => return Err(format!("unknown snapshot kind {k}")),
        };
        let path_len = u32_at(body, 48) as usize;
        if u32_at(body, 52) != 0 {
            return Err("non-zero reserved field".into());
        }
        if path_len > MAX_PARENT_PATH || body.len() != 56 + path_len {
            return Err(format!("parent path of {path_len} bytes in a body of {} bytes", body.len()));
        }
        let parent_path = String::from_utf8(body[56..].to_vec()).map_err(|_| "parent path is not UTF-8".to_string())?;
        let has_parent = parent_id != [0; SNAPSHOT_ID_LEN];
        if has_parent != (kind == SnapshotKind::Incremental) {
            return Err("a full snapshot has no parent and an incremental one has one".into());
        }
        Ok(SnapshotInfo {
            id,
            parent_id,
            parent_meta_crc: u32_at(body, 32),
            kind,
            created_unix_ms: u64_at(body, 40),
            parent_path,
        })
    }
}

impl RamMap {
    /// Whether page `p` has data in this file.
    pub fn is_present(&self, p: u64) -> bool {
        p < self.npages && self.present[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Whether page `p` is zero in this snapshot.
    pub fn is_zero(&self, p: u64) -> bool {
        p < self.npages && self.zero[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Present pages.
    pub fn present_count(&self) -> u64 {
        self.present.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, StreamError> {
        let n = words(self.npages);
        if self.present.len() != n || self.zero.len() != n || self.crcs.len() as u64 != self.present_count() {
            return Err(StreamError::Invalid("RAM_MAP bitmaps or checksums do not match its page count".into()));
        }
        if !self.data_offset.is_multiple_of(PAGE_SIZE as u64) {
            return Err(StreamError::Invalid(format!(
                "RAM_MAP data offset {:#x} is not page-aligned",
                self.data_offset
            )));
        }
        let mut b = Vec::with_capacity(32 + 16 * n + 4 * self.crcs.len());
        b.extend_from_slice(&self.region.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.gpa.to_le_bytes());
        b.extend_from_slice(&self.npages.to_le_bytes());
        b.extend_from_slice(&self.data_offset.to_le_bytes());
        for w in self.present.iter().chain(&self.zero) {
            b.extend_from_slice(&w.to_le_bytes());
        }
        for c in &self.crcs {
            b.extend_from_slice(&c.to_le_bytes());
        }
        Ok(b)
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, String> {
        if body.len() < 32 {
            return Err(format!("body of {} bytes, need at least 32", body.len()));
        }
        if u32_at(body, 4) != 0 {
            return Err("non-zero reserved field".into());
        }
        let npages = u64_at(body, 16);
        let n = words(npages);
        let maps_end = n.checked_mul(16).and_then(|x| x.checked_add(32)).filter(|&e| e <= body.len());
        let maps_end = maps_end.ok_or_else(|| format!("{npages} pages do not fit a body of {} bytes", body.len()))?;
        let word = |i: usize| u64_at(body, 32 + 8 * i);
        let present: Vec<u64> = (0..n).map(word).collect();
        let zero: Vec<u64> = (n..2 * n).map(word).collect();
        let tail_mask = if npages.is_multiple_of(64) { !0u64 } else { (1u64 << (npages % 64)) - 1 };
        for (i, (p, z)) in present.iter().zip(&zero).enumerate() {
            let mask = if i + 1 == n { tail_mask } else { !0 };
            if p & z != 0 || (p | z) & !mask != 0 {
                return Err(format!("bitmaps overlap or mark pages beyond {npages} (word {i})"));
            }
        }
        let count: u64 = present.iter().map(|w| w.count_ones() as u64).sum();
        if body.len() as u64 != maps_end as u64 + 4 * count {
            return Err(format!("{count} present pages need {} checksum bytes", 4 * count));
        }
        let crcs = (0..count as usize).map(|i| u32_at(body, maps_end + 4 * i)).collect();
        let data_offset = u64_at(body, 24);
        if !data_offset.is_multiple_of(PAGE_SIZE as u64) {
            return Err(format!("data offset {data_offset:#x} is not page-aligned"));
        }
        Ok(RamMap { region: u32_at(body, 0), gpa: u64_at(body, 8), npages, data_offset, present, zero, crcs })
    }
}
