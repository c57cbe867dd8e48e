//! The dirty-block log of a disk: which blocks the guest wrote since each consumer last looked.
//!
//! The rules are the page dirty log's (docs/dirty-log.md): several consumers (a storage
//! migration, replication) each have their own bitmap; a write sets the block's bit in every
//! one; a consumer's bit is cleared only when that consumer harvests it, and a consumer that
//! could not use what it harvested gives it back. Nobody else's bits are ever touched.
//!
//! A write is marked after it has reached the image (and also when it failed part way: some
//! bytes may have landed), so a consumer that read a block while a write to it was executing
//! sees the block dirty again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::dirty_log::Bitmap;

/// Bytes per tracked block.
pub const DIRTY_BLOCK: u64 = 4096;

/// One consumer of a disk's dirty-block log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockConsumer(u64);

/// Errors of the dirty-block log.
#[derive(Debug, thiserror::Error)]
pub enum DiskDirtyError {
    #[error("no dirty-block consumer {0:?} on this disk")]
    NoConsumer(BlockConsumer),
    #[error("the dirty-block log's lock is poisoned")]
    Poisoned,
}

struct Consumer {
    id: BlockConsumer,
    name: String,
    bits: Bitmap,
}

struct Consumers {
    next: u64,
    list: Vec<Consumer>,
}

/// A disk's dirty-block log.
pub struct DiskDirty {
    blocks: u64,
    /// Registered consumers (a write with none costs one atomic load).
    active: AtomicUsize,
    c: Mutex<Consumers>,
}

impl DiskDirty {
    /// The log of a disk of `bytes`.
    pub fn new(bytes: u64) -> Self {
        DiskDirty {
            blocks: bytes.div_ceil(DIRTY_BLOCK),
            active: AtomicUsize::new(0),
            c: Mutex::new(Consumers { next: 1, list: Vec::new() }),
        }
    }

    /// Blocks tracked.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Consumers>, DiskDirtyError> {
        self.c.lock().map_err(|_| DiskDirtyError::Poisoned)
    }

    /// A new consumer; `all_dirty` starts it with every block dirty (a first pass).
    pub fn register(&self, name: &str, all_dirty: bool) -> Result<BlockConsumer, DiskDirtyError> {
        let mut c = self.lock()?;
        let id = BlockConsumer(c.next);
        c.next += 1;
        c.list.push(Consumer { id, name: name.to_string(), bits: Bitmap::new(self.blocks, all_dirty) });
        self.active.store(c.list.len(), Ordering::SeqCst);
        Ok(id)
    }

    /// Removes a consumer; the others keep their bits.
    pub fn unregister(&self, id: BlockConsumer) {
        if let Ok(mut c) = self.lock() {
            c.list.retain(|x| x.id != id);
            self.active.store(c.list.len(), Ordering::SeqCst);
        }
    }

    /// Names of the consumers (status).
    pub fn consumer_names(&self) -> Vec<String> {
        self.lock().map(|c| c.list.iter().map(|x| x.name.clone()).collect()).unwrap_or_default()
    }

    /// Records a write of `len` bytes at byte `offset`.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || self.active.load(Ordering::SeqCst) == 0 {
            return;
        }
        let first = offset / DIRTY_BLOCK;
        let last = ((offset + len - 1) / DIRTY_BLOCK).min(self.blocks.saturating_sub(1));
        // A poisoned lock means a panicked thread; the process is going down.
        if let Ok(mut c) = self.c.lock() {
            for x in c.list.iter_mut() {
                for b in first..=last {
                    x.bits.set(b);
                }
            }
        }
    }

    /// Takes the consumer's dirty blocks (its bits are clear afterwards).
    pub fn harvest(&self, id: BlockConsumer) -> Result<Bitmap, DiskDirtyError> {
        let mut c = self.lock()?;
        let x = c.list.iter_mut().find(|x| x.id == id).ok_or(DiskDirtyError::NoConsumer(id))?;
        Ok(std::mem::replace(&mut x.bits, Bitmap::new(self.blocks, false)))
    }

    /// Gives harvested blocks back (they were not delivered).
    pub fn give_back(&self, id: BlockConsumer, bits: &Bitmap) -> Result<(), DiskDirtyError> {
        let mut c = self.lock()?;
        let x = c.list.iter_mut().find(|x| x.id == id).ok_or(DiskDirtyError::NoConsumer(id))?;
        x.bits.or_words(bits.words());
        Ok(())
    }

    /// Dirty blocks the consumer has pending.
    pub fn pending(&self, id: BlockConsumer) -> Result<u64, DiskDirtyError> {
        let c = self.lock()?;
        c.list.iter().find(|x| x.id == id).map(|x| x.bits.count()).ok_or(DiskDirtyError::NoConsumer(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_consumer_keeps_its_own_bits_and_gets_back_what_it_could_not_use() {
        let log = DiskDirty::new(64 * DIRTY_BLOCK + 512);
        assert_eq!(log.blocks(), 65);
        // No consumer: nothing recorded, nothing to harvest.
        log.mark(0, 4096);
        let a = log.register("migration", false).unwrap();
        let b = log.register("replication", false).unwrap();
        // A write over a block boundary dirties both blocks; the partial last block counts.
        log.mark(DIRTY_BLOCK - 512, 1024);
        log.mark(64 * DIRTY_BLOCK, 512);
        let got: Vec<u64> = log.harvest(a).unwrap().iter_set().collect();
        assert_eq!(got, vec![0, 1, 64]);
        assert_eq!(log.pending(a).unwrap(), 0);
        // b's bits are untouched by a's harvest.
        assert_eq!(log.pending(b).unwrap(), 3);
        // a failed to deliver: its bits come back, merged with a new write.
        let h = log.harvest(b).unwrap();
        log.mark(10 * DIRTY_BLOCK, 1);
        log.give_back(b, &h).unwrap();
        assert_eq!(log.harvest(b).unwrap().iter_set().collect::<Vec<_>>(), vec![0, 1, 10, 64]);
        log.unregister(a);
        assert!(log.harvest(a).is_err());
        assert_eq!(log.consumer_names(), vec!["replication".to_string()]);
    }

    #[test]
    fn a_first_pass_consumer_starts_with_every_block() {
        let log = DiskDirty::new(10 * DIRTY_BLOCK);
        let a = log.register("m", true).unwrap();
        assert_eq!(log.pending(a).unwrap(), 10);
    }
}
