//! The dirty log, shared by several consumers without losing a write.
//!
//! KVM runs in manual-protect mode (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): `KVM_GET_DIRTY_LOG`
//! copies KVM's bitmap without clearing it, and `KVM_CLEAR_DIRTY_LOG` clears (re-protects) the
//! bits it is given. Clearing a bit that Ferry did not know to be dirty in KVM makes the next
//! write to that page invisible (seed 002): a page goes stale on the destination.
//!
//! So the log keeps, per memory slot, a **KVM cache**: the bits synced from KVM and not yet
//! cleared in KVM. Every consumer (migration, snapshots, the dirty-rate monitor) has its own
//! bitmap. A sync merges KVM's new bits into the cache and into *every* consumer. When a
//! consumer harvests a range, the log clears in KVM only `harvested ∩ cache`, and removes those
//! bits from the cache; a second consumer harvesting the same bit later finds it gone from the
//! cache and clears nothing, so a write that happened after the first clear stays set in KVM and
//! reaches everyone at the next sync. The clear happens *before* the harvest returns, so the
//! consumer's read of the page comes after the re-protection and sees every earlier write.
//!
//! Harvested bits belong to the consumer until it says the page is handled; on failure it gives
//! them back (merged, never dropped). Ferry's own writes into guest memory are not seen by KVM:
//! they are recorded with [`DirtyLog::mark_vmm_dirty`] and merged into every consumer at the next
//! sync.
//!
//! ```text
//!   KVM bitmap ──GET──▶ cache |= new ──▶ consumer A |= new, consumer B |= new, …
//!   harvest(A, range): bits = A[range]; A[range] = 0; CLEAR(bits ∩ cache); cache -= bits ∩ cache
//! ```

/// Number of bits per bitmap word.
const WORD_BITS: u64 = 64;

/// What the log needs from KVM (a trait so the interleavings can be tested against a double).
pub trait DirtySource {
    /// Copies KVM's dirty bitmap of `slot` (`npages` bits). In manual-protect mode this does not
    /// clear anything.
    fn get_dirty_log(&self, slot: u32, npages: u64) -> Result<Vec<u64>, DirtyLogError>;
    /// Clears the set bits of `bitmap` (bit i = page `first_page + i`) in KVM's log of `slot`
    /// and write-protects those pages again. `first_page` is a multiple of 64.
    fn clear_dirty_log(&self, slot: u32, first_page: u64, num_pages: u64, bitmap: &[u64]) -> Result<(), DirtyLogError>;
    /// Whether fetching already re-protects the fetched pages in KVM (classic get-and-clear, the
    /// dirty ring's collect-and-reset): then no bit is left to clear and none is cached.
    fn protects_on_get(&self) -> bool;
}

/// Errors of the dirty log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("KVM_GET_DIRTY_LOG failed on slot {slot}")]
    Get {
        slot: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM_CLEAR_DIRTY_LOG failed on slot {slot} (pages {first}+{count})")]
    Clear {
        slot: u32,
        first: u64,
        count: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot switch dirty logging on slot {slot}")]
    Toggle {
        slot: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("dirty ring")]
    Ring(#[source] std::io::Error),
    #[error("no memory slot {0} in the dirty log")]
    NoSlot(u32),
    #[error("no dirty-log consumer with id {0}")]
    NoConsumer(usize),
    #[error("range {first}+{count} is outside slot index {slot_index}")]
    Range { slot_index: usize, first: u64, count: u64 },
}

/// A consumer's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerId(pub usize);

/// How a consumer's bitmap starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initial {
    /// Every page dirty (a migration or full snapshot needs everything once).
    AllDirty,
    /// Nothing dirty (a monitor or an incremental snapshot starting now).
    Clean,
}

/// A bitmap of pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    npages: u64,
}

impl Bitmap {
    pub fn new(npages: u64, set: bool) -> Self {
        let n = npages.div_ceil(WORD_BITS) as usize;
        let mut b = Bitmap { words: vec![if set { !0 } else { 0 }; n], npages };
        b.trim();
        b
    }
    fn trim(&mut self) {
        let rem = self.npages % WORD_BITS;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }
    pub fn npages(&self) -> u64 {
        self.npages
    }
    pub fn words(&self) -> &[u64] {
        &self.words
    }
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }
    pub fn into_words(self) -> Vec<u64> {
        self.words
    }
    pub fn get(&self, page: u64) -> bool {
        page < self.npages && self.words[(page / WORD_BITS) as usize] & (1 << (page % WORD_BITS)) != 0
    }
    pub fn set(&mut self, page: u64) {
        if page < self.npages {
            self.words[(page / WORD_BITS) as usize] |= 1 << (page % WORD_BITS);
        }
    }
    pub fn clear(&mut self, page: u64) {
        if page < self.npages {
            self.words[(page / WORD_BITS) as usize] &= !(1 << (page % WORD_BITS));
        }
    }
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
    /// ORs `other` (same size) in.
    pub fn or_words(&mut self, other: &[u64]) {
        for (a, b) in self.words.iter_mut().zip(other) {
            *a |= *b;
        }
        self.trim();
    }
    /// Set pages, in order.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * WORD_BITS + b)
            })
        })
    }
}

/// One memory slot's part of the log.
#[derive(Debug)]
struct SlotLog {
    slot: u32,
    npages: u64,
    /// Bits synced from KVM and not yet cleared in KVM.
    kvm_cache: Bitmap,
    /// Ferry's own writes since the last sync.
    vmm_dirty: Bitmap,
}

#[derive(Debug)]
struct Consumer {
    name: String,
    bits: Vec<Bitmap>,
}

/// The clearing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearPolicy {
    /// Clear exactly the bits that are both harvested and in the KVM cache (Ferry's design).
    CacheGuarded,
    /// Clear whatever a consumer harvested. **Loses writes** with several consumers (seed 002);
    /// exists only so a test can show the race on the naive design.
    NaiveForTests,
}

/// Counters of the log's own work.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirtyLogStats {
    pub syncs: u64,
    pub clear_ioctls: u64,
    pub pages_cleared: u64,
}

/// The dirty log of one VM.
#[derive(Debug)]
pub struct DirtyLog {
    slots: Vec<SlotLog>,
    consumers: Vec<Option<Consumer>>,
    clear_chunk_pages: u64,
    policy: ClearPolicy,
    stats: DirtyLogStats,
}

/// Default granularity of `KVM_CLEAR_DIRTY_LOG` calls: 64 MiB of guest memory.
pub const DEFAULT_CLEAR_CHUNK_PAGES: u64 = 16384;

impl DirtyLog {
    /// A log over slots given as `(slot number, pages)`.
    pub fn new(slots: &[(u32, u64)], clear_chunk_pages: u64) -> Self {
        Self::with_policy(slots, clear_chunk_pages, ClearPolicy::CacheGuarded)
    }

    /// As [`DirtyLog::new`] with an explicit clearing policy.
    pub fn with_policy(slots: &[(u32, u64)], clear_chunk_pages: u64, policy: ClearPolicy) -> Self {
        DirtyLog {
            slots: slots
                .iter()
                .map(|&(slot, npages)| SlotLog {
                    slot,
                    npages,
                    kvm_cache: Bitmap::new(npages, false),
                    vmm_dirty: Bitmap::new(npages, false),
                })
                .collect(),
            consumers: Vec::new(),
            clear_chunk_pages: clear_chunk_pages.max(WORD_BITS).next_multiple_of(WORD_BITS),
            policy,
            stats: DirtyLogStats::default(),
        }
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Pages of slot index `i`.
    pub fn slot_pages(&self, i: usize) -> u64 {
        self.slots.get(i).map(|s| s.npages).unwrap_or(0)
    }

    pub fn stats(&self) -> DirtyLogStats {
        self.stats
    }

    /// Whether any consumer is registered (dirty logging must be on in KVM).
    pub fn active(&self) -> bool {
        self.consumers.iter().any(Option::is_some)
    }

    /// Registers a consumer.
    pub fn register(&mut self, name: &str, initial: Initial) -> ConsumerId {
        let bits = self.slots.iter().map(|s| Bitmap::new(s.npages, initial == Initial::AllDirty)).collect();
        let c = Consumer { name: name.to_string(), bits };
        if let Some(i) = self.consumers.iter().position(Option::is_none) {
            self.consumers[i] = Some(c);
            ConsumerId(i)
        } else {
            self.consumers.push(Some(c));
            ConsumerId(self.consumers.len() - 1)
        }
    }

    /// Removes a consumer; when none is left, the caches are reset (logging goes off).
    pub fn unregister(&mut self, id: ConsumerId) {
        if let Some(c) = self.consumers.get_mut(id.0) {
            *c = None;
        }
        if !self.active() {
            for s in &mut self.slots {
                s.kvm_cache = Bitmap::new(s.npages, false);
                s.vmm_dirty = Bitmap::new(s.npages, false);
            }
        }
    }

    /// Names of the registered consumers.
    pub fn consumer_names(&self) -> Vec<String> {
        self.consumers.iter().flatten().map(|c| c.name.clone()).collect()
    }

    /// Records a write by Ferry itself to pages `[first, first+count)` of slot index `i`.
    pub fn mark_vmm_dirty(&mut self, i: usize, first: u64, count: u64) {
        if let Some(s) = self.slots.get_mut(i) {
            for p in first..(first + count).min(s.npages) {
                s.vmm_dirty.set(p);
            }
        }
    }

    /// Fetches KVM's bitmaps and merges new bits into the cache and every consumer. Returns the
    /// number of pages dirty in KVM (not yet cleared) across all slots.
    pub fn sync(&mut self, src: &dyn DirtySource) -> Result<u64, DirtyLogError> {
        let mut total = 0;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let kvm = src.get_dirty_log(s.slot, s.npages)?;
            if !src.protects_on_get() {
                s.kvm_cache.or_words(&kvm);
            }
            total += kvm.iter().map(|w| w.count_ones() as u64).sum::<u64>();
            for c in self.consumers.iter_mut().flatten() {
                c.bits[i].or_words(&kvm);
                c.bits[i].or_words(s.vmm_dirty.words());
            }
            s.vmm_dirty = Bitmap::new(s.npages, false);
        }
        self.stats.syncs += 1;
        Ok(total)
    }

    /// Pages a consumer has pending (dirty and not yet harvested).
    pub fn pending(&self, id: ConsumerId) -> Result<u64, DirtyLogError> {
        let c = self.consumer(id)?;
        Ok(c.bits.iter().map(Bitmap::count).sum())
    }

    fn consumer(&self, id: ConsumerId) -> Result<&Consumer, DirtyLogError> {
        self.consumers.get(id.0).and_then(Option::as_ref).ok_or(DirtyLogError::NoConsumer(id.0))
    }

    /// Takes the consumer's bits of pages `[first, first+count)` of slot index `i` (first a
    /// multiple of 64) and clears in KVM the ones still in the cache. Returns the bitmap of the
    /// range (bit j = page first+j). The caller must read the pages only after this returns.
    pub fn harvest(
        &mut self,
        src: &dyn DirtySource,
        id: ConsumerId,
        i: usize,
        first: u64,
        count: u64,
    ) -> Result<Vec<u64>, DirtyLogError> {
        let s = self.slots.get_mut(i).ok_or(DirtyLogError::Range { slot_index: i, first, count })?;
        if !first.is_multiple_of(WORD_BITS) || first >= s.npages {
            return Err(DirtyLogError::Range { slot_index: i, first, count });
        }
        let count = count.min(s.npages - first);
        let w0 = (first / WORD_BITS) as usize;
        let nw = count.div_ceil(WORD_BITS) as usize;
        let c = self.consumers.get_mut(id.0).and_then(Option::as_mut).ok_or(DirtyLogError::NoConsumer(id.0))?;
        let mine = &mut c.bits[i].words[w0..w0 + nw];
        let taken: Vec<u64> = mine.to_vec();
        mine.iter_mut().for_each(|w| *w = 0);
        // What to clear in KVM.
        let cache = &mut s.kvm_cache.words[w0..w0 + nw];
        let to_clear: Vec<u64> = match self.policy {
            ClearPolicy::CacheGuarded => taken.iter().zip(cache.iter()).map(|(t, c)| t & c).collect(),
            ClearPolicy::NaiveForTests => taken.clone(),
        };
        // Clear in chunks; on failure put back what was not cleared and give the bits back.
        let chunk_words = (self.clear_chunk_pages / WORD_BITS) as usize;
        let mut off = 0usize;
        while off < nw {
            let n = chunk_words.min(nw - off);
            let part = &to_clear[off..off + n];
            if part.iter().any(|&w| w != 0) {
                let first_page = first + off as u64 * WORD_BITS;
                let num = (n as u64 * WORD_BITS).min(s.npages - first_page);
                if let Err(e) = src.clear_dirty_log(s.slot, first_page, num, part) {
                    for (w, t) in c.bits[i].words[w0..w0 + nw].iter_mut().zip(&taken) {
                        *w |= *t;
                    }
                    return Err(e);
                }
                self.stats.clear_ioctls += 1;
                self.stats.pages_cleared += part.iter().map(|w| w.count_ones() as u64).sum::<u64>();
                for (c, t) in cache[off..off + n].iter_mut().zip(part) {
                    *c &= !t;
                }
            }
            off += n;
        }
        Ok(taken)
    }

    /// Gives harvested bits back to a consumer (after a failure): merged, never dropped.
    pub fn give_back(&mut self, id: ConsumerId, i: usize, first: u64, bits: &[u64]) -> Result<(), DirtyLogError> {
        let c = self.consumers.get_mut(id.0).and_then(Option::as_mut).ok_or(DirtyLogError::NoConsumer(id.0))?;
        let b = c.bits.get_mut(i).ok_or(DirtyLogError::Range { slot_index: i, first, count: 0 })?;
        let w0 = (first / WORD_BITS) as usize;
        for (w, x) in b.words.iter_mut().skip(w0).zip(bits) {
            *w |= *x;
        }
        b.trim();
        Ok(())
    }

    /// A copy of a consumer's pending bits of slot index `i` (for inspection and tests).
    pub fn peek(&self, id: ConsumerId, i: usize) -> Result<Bitmap, DirtyLogError> {
        self.consumer(id)?.bits.get(i).cloned().ok_or(DirtyLogError::Range { slot_index: i, first: 0, count: 0 })
    }
}

/// Records guest-memory writes made by host threads (device backends) in a machine's dirty
/// log, which KVM does not see: every consumer finds those pages dirty at its next sync.
#[derive(Clone)]
pub struct GuestDirty {
    log: std::sync::Arc<std::sync::Mutex<DirtyLog>>,
    /// (guest-physical start, length) of each slot, in slot order.
    slots: std::sync::Arc<Vec<(u64, u64)>>,
}

impl GuestDirty {
    pub fn new(log: std::sync::Arc<std::sync::Mutex<DirtyLog>>, slots: Vec<(u64, u64)>) -> Self {
        GuestDirty { log, slots: std::sync::Arc::new(slots) }
    }

    /// Marks the pages of `[gpa, gpa+len)` that are RAM.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let Ok(mut log) = self.log.lock() else { return };
        let ps = crate::memory::PAGE_SIZE;
        let (first, last) = (gpa / ps, gpa.saturating_add(len - 1) / ps);
        for (i, &(start, size)) in self.slots.iter().enumerate() {
            let (s0, s1) = (start / ps, (start + size) / ps);
            let (a, b) = (first.max(s0), (last + 1).min(s1));
            if a < b {
                log.mark_vmm_dirty(i, a - s0, b - a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use proptest::prelude::*;

    use super::*;

    /// A stand-in for KVM's dirty log with guest memory as page versions: manual-protect bitmap
    /// mode, or dirty-ring mode (a fetch collects the ring and re-protects what it collected;
    /// a ring-full exit collects early into pages that wait for the next fetch).
    struct FakeKvm {
        kvm_bits: RefCell<Bitmap>,
        collected: RefCell<Bitmap>,
        memory: RefCell<Vec<u64>>,
        ring: bool,
    }

    impl FakeKvm {
        fn new(npages: u64) -> Self {
            Self::with_mode(npages, false)
        }
        fn with_mode(npages: u64, ring: bool) -> Self {
            FakeKvm {
                kvm_bits: RefCell::new(Bitmap::new(npages, false)),
                collected: RefCell::new(Bitmap::new(npages, false)),
                memory: RefCell::new(vec![0; npages as usize]),
                ring,
            }
        }
        fn guest_write(&self, page: u64) {
            self.memory.borrow_mut()[page as usize] += 1;
            self.kvm_bits.borrow_mut().set(page);
        }
        fn read(&self, page: u64) -> u64 {
            self.memory.borrow()[page as usize]
        }
        /// Ring mode: collect and reset (what a vCPU does on KVM_EXIT_DIRTY_RING_FULL).
        fn ring_full(&self) {
            if self.ring {
                let mut k = self.kvm_bits.borrow_mut();
                self.collected.borrow_mut().or_words(k.words());
                *k = Bitmap::new(k.npages(), false);
            }
        }
    }

    impl DirtySource for FakeKvm {
        fn get_dirty_log(&self, _slot: u32, _npages: u64) -> Result<Vec<u64>, DirtyLogError> {
            if self.ring {
                self.ring_full();
                let mut c = self.collected.borrow_mut();
                let n = c.npages();
                return Ok(std::mem::replace(&mut *c, Bitmap::new(n, false)).into_words());
            }
            Ok(self.kvm_bits.borrow().words().to_vec())
        }
        fn clear_dirty_log(&self, _slot: u32, first: u64, num: u64, bitmap: &[u64]) -> Result<(), DirtyLogError> {
            let mut k = self.kvm_bits.borrow_mut();
            for j in 0..num {
                if bitmap[(j / 64) as usize] & (1 << (j % 64)) != 0 {
                    let p = first + j;
                    k.words[(p / 64) as usize] &= !(1 << (p % 64));
                }
            }
            Ok(())
        }
        fn protects_on_get(&self) -> bool {
            self.ring
        }
    }

    /// A consumer's copy of guest memory ("the destination").
    fn handle(log: &mut DirtyLog, kvm: &FakeKvm, id: ConsumerId, dest: &mut [u64], first: u64, count: u64) {
        let bits = log.harvest(kvm, id, 0, first, count).unwrap();
        for (w, word) in bits.iter().enumerate() {
            for b in 0..64 {
                if word & (1 << b) != 0 {
                    let p = first + w as u64 * 64 + b;
                    dest[p as usize] = kvm.read(p);
                }
            }
        }
    }

    /// Seed 002's eight steps: MIGRATION and VGA share one synced bitmap; page P is written,
    /// synced, harvested and sent by migration, written again, then harvested by VGA.
    fn replay_seed_race(policy: ClearPolicy) -> (u64, u64) {
        const P: u64 = 5;
        let kvm = FakeKvm::new(64);
        let mut log = DirtyLog::with_policy(&[(0, 64)], 64, policy);
        let migration = log.register("migration", Initial::Clean);
        let vga = log.register("vga", Initial::Clean);
        let mut dest = vec![0u64; 64];
        let mut vga_view = vec![0u64; 64];

        kvm.guest_write(P); // (1) P1
        log.sync(&kvm).unwrap(); // (2)+(3) both consumers get D
        handle(&mut log, &kvm, migration, &mut dest, 0, 64); // (4) clear D, send P1
        kvm.guest_write(P); // (5) P2, D set again in KVM
        handle(&mut log, &kvm, vga, &mut vga_view, 0, 64); // (6) VGA harvests its old D
        log.sync(&kvm).unwrap(); // (7)/(8) final pass
        handle(&mut log, &kvm, migration, &mut dest, 0, 64);

        (dest[P as usize], kvm.read(P))
    }

    #[test]
    fn naive_clear_of_harvested_bits_loses_the_second_write_of_the_seed_race() {
        let (dest, guest) = replay_seed_race(ClearPolicy::NaiveForTests);

        assert_eq!(guest, 2);
        assert_eq!(dest, 1, "the naive design must lose P2 (this test shows the trap is real)");
    }

    #[test]
    fn cache_guarded_clear_keeps_the_second_write_of_the_seed_race() {
        let (dest, guest) = replay_seed_race(ClearPolicy::CacheGuarded);

        assert_eq!(dest, guest);
    }

    #[test]
    fn bits_given_back_after_a_failure_are_harvested_again() {
        let kvm = FakeKvm::new(128);
        let mut log = DirtyLog::new(&[(0, 128)], 64);
        let c = log.register("m", Initial::Clean);
        kvm.guest_write(70);
        log.sync(&kvm).unwrap();

        let bits = log.harvest(&kvm, c, 0, 64, 64).unwrap();
        log.give_back(c, 0, 64, &bits).unwrap();

        assert!(log.peek(c, 0).unwrap().get(70));
        assert_eq!(log.pending(c).unwrap(), 1);
    }

    #[test]
    fn ferry_own_writes_reach_every_consumer_at_the_next_sync() {
        let kvm = FakeKvm::new(64);
        let mut log = DirtyLog::new(&[(0, 64)], 64);
        let a = log.register("a", Initial::Clean);
        let b = log.register("b", Initial::Clean);

        log.mark_vmm_dirty(0, 9, 1);
        log.sync(&kvm).unwrap();

        assert!(log.peek(a, 0).unwrap().get(9));
        assert!(log.peek(b, 0).unwrap().get(9));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64),
        Sync,
        Harvest { consumer: usize, chunk: u64 },
        HarvestThenFail { consumer: usize, chunk: u64 },
        VmmWrite(u64),
        RingFull,
    }

    const PAGES: u64 = 256;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..PAGES).prop_map(Op::Write),
            2 => Just(Op::Sync),
            3 => (0..4usize, 0..PAGES / 64).prop_map(|(consumer, chunk)| Op::Harvest { consumer, chunk }),
            1 => (0..4usize, 0..PAGES / 64).prop_map(|(consumer, chunk)| Op::HarvestThenFail { consumer, chunk }),
            1 => (0..PAGES).prop_map(Op::VmmWrite),
            1 => Just(Op::RingFull),
        ]
    }

    proptest! {
        /// Every write is eventually seen by every consumer, whatever the interleaving of
        /// guest writes, syncs, harvests (successful or failed), ring-full collects and Ferry's
        /// own writes, with the bitmap and with the ring backend.
        #[test]
        fn every_write_is_eventually_seen_by_every_consumer(
            ring in any::<bool>(),
            n in 2usize..5,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let kvm = FakeKvm::with_mode(PAGES, ring);
            let mut log = DirtyLog::new(&[(0, PAGES)], 64);
            let ids: Vec<ConsumerId> = (0..n).map(|i| log.register(&format!("c{i}"), Initial::AllDirty)).collect();
            let mut views = vec![vec![u64::MAX; PAGES as usize]; n];
            for o in ops {
                match o {
                    Op::Write(p) => kvm.guest_write(p),
                    Op::VmmWrite(p) => {
                        kvm.memory.borrow_mut()[p as usize] += 1;
                        log.mark_vmm_dirty(0, p, 1);
                    }
                    Op::Sync => { log.sync(&kvm).unwrap(); }
                    Op::RingFull => kvm.ring_full(),
                    Op::Harvest { consumer, chunk } => {
                        let c = consumer % n;
                        handle(&mut log, &kvm, ids[c], &mut views[c], chunk * 64, 64);
                    }
                    Op::HarvestThenFail { consumer, chunk } => {
                        let c = consumer % n;
                        let bits = log.harvest(&kvm, ids[c], 0, chunk * 64, 64).unwrap();
                        log.give_back(ids[c], 0, chunk * 64, &bits).unwrap();
                    }
                }
            }
            // Final pass: the guest is stopped; each consumer syncs and handles everything.
            log.sync(&kvm).unwrap();
            for c in 0..n {
                handle(&mut log, &kvm, ids[c], &mut views[c], 0, PAGES);
            }
            for (c, view) in views.iter().enumerate() {
                for (p, v) in view.iter().enumerate() {
                    prop_assert_eq!(*v, kvm.read(p as u64), "consumer {} page {}", c, p);
                }
            }
        }
    }
}
