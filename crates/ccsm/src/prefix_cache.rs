//! Cached prompt prefixes: the K/V rows of prompts already run (a voice's context, a system prompt, a
//! conversation so far), kept so a session whose prompt starts the same way starts from them and
//! prefills only the rest.
//!
//! A prefix is keyed by its rows (one `u64` per row: a token id, or a hash of a CSM row's codes and
//! text) and found by chained hashes of whole blocks of `BLOCK_ROWS` rows, so the longest cached prefix
//! of a new prompt is one hash-map probe per block; a match is then checked row by row (a hash never
//! decides it) and extended into the entry's last partial block. Each entry is a `KvCache` of its own,
//! sized to its rows, in the types the cache was told to store (default: the session's own). A session
//! starts from an entry by copying its rows (`KvCache::copy_prefix_from`): byte for byte when the types
//! and rotation agree, so the session then holds exactly what prefilling them stores. Copying rather
//! than sharing keeps every session's cache one contiguous tensor per layer, which the attention
//! kernels and the kept graphs rely on; it costs one memcpy per layer and half.
//!
//! Entries count against a byte capacity, or against a server's one memory budget beside its sessions
//! (`insert_within`, `make_room_in`: sessions come first); the least recently used entry that no
//! session is starting from is evicted first. `file` keeps entries on disk.

pub mod file;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, LayerTypes, Rotation};
use crate::memory::Budget;

/// Rows per hashed block.
pub const BLOCK_ROWS: usize = 16;

/// One cached prefix's handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryId(u64);

/// The longest cached prefix of a prompt: `rows` rows of `entry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixHit {
    /// The entry holding the prefix.
    pub entry: EntryId,
    /// Rows of the prompt it covers.
    pub rows: usize,
}

/// Lookups and what became of entries, since the cache was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Lookups that found a prefix.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
    /// Rows sessions did not prefill, over all hits.
    pub rows_reused: u64,
    /// Entries cached.
    pub insertions: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
}

struct Entry {
    rows: Vec<u64>,
    cache: KvCache,
    bytes: usize,
    last_used: u64,
    /// Sessions starting from this entry now (never evicted while above 0).
    pins: usize,
}

/// Cached prefixes within a byte capacity.
pub struct PrefixCache {
    entries: HashMap<EntryId, Entry>,
    /// Chained hash of an entry's first k blocks → the entries with those rows.
    blocks: HashMap<u64, Vec<EntryId>>,
    capacity: usize,
    bytes: usize,
    store_types: Option<LayerTypes>,
    clock: u64,
    next_id: u64,
    stats: PrefixStats,
    /// Entries dropped (evicted, or subsumed by a longer one) since `take_evicted` was last called:
    /// whoever keeps entries on disk forgets them.
    evicted: Vec<Vec<u64>>,
}

/// FNV-1a of `bytes`: stable across builds and machines, since keys and file names are written to disk.
pub(crate) fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, byte| (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The key of one row from a tag (what kind of row) and its words (a CSM row's token, or its codes).
pub fn row_key(tag: u32, words: &[u32]) -> u64 {
    fnv1a(std::iter::once(tag).chain(words.iter().copied()).flat_map(u32::to_le_bytes))
}

/// The keys of text tokens: the ids themselves.
pub fn token_keys(tokens: &[u32]) -> Vec<u64> {
    tokens.iter().map(|&t| u64::from(t)).collect()
}

/// Chained hashes of every whole block of `rows`: element k covers rows[..(k + 1) · BLOCK_ROWS].
fn block_hashes(rows: &[u64]) -> Vec<u64> {
    let mut chain = 0u64;
    rows.chunks_exact(BLOCK_ROWS)
        .map(|block| {
            let mut h = DefaultHasher::new();
            chain.hash(&mut h);
            block.hash(&mut h);
            chain = h.finish();
            chain
        })
        .collect()
}

impl PrefixCache {
    /// An empty cache of at most `capacity` bytes; entries stored in `store_types` (None: each in the
    /// types of the session it came from).
    pub fn new(capacity: usize, store_types: Option<LayerTypes>) -> Self {
        PrefixCache {
            entries: HashMap::new(),
            blocks: HashMap::new(),
            capacity,
            bytes: 0,
            store_types,
            clock: 0,
            next_id: 0,
            stats: PrefixStats::default(),
            evicted: Vec::new(),
        }
    }

    /// Bytes the entries hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Cached prefixes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The byte capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Counts so far.
    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    /// The longest cached prefix of `rows`, leaving at least one row to run (its logits are the
    /// next token's), at least one whole block; counted as a hit or a miss.
    pub fn longest(&mut self, rows: &[u64]) -> Option<PrefixHit> {
        let hit = self.peek(rows);
        self.record(hit);
        hit
    }

    /// `longest` without counting it or touching the entry (a lookup for a session that may not
    /// start yet; `record` counts it when it does).
    pub fn peek(&self, rows: &[u64]) -> Option<PrefixHit> {
        let usable = rows.len().saturating_sub(1);
        let mut best: Option<PrefixHit> = None;
        for (k, hash) in block_hashes(&rows[..usable]).into_iter().enumerate() {
            let Some(ids) = self.blocks.get(&hash) else { break };
            let whole = (k + 1) * BLOCK_ROWS;
            for &id in ids {
                let entry = &self.entries[&id];
                if entry.rows[..whole] != rows[..whole] {
                    continue; // a hash collision: rows decide
                }
                let more = entry.rows[whole..].iter().zip(&rows[whole..usable]).take_while(|(a, b)| a == b).count();
                if best.is_none_or(|b| whole + more > b.rows) {
                    best = Some(PrefixHit { entry: id, rows: whole + more });
                }
            }
        }
        best
    }

    /// Counts a lookup's outcome (a hit makes its entry the most recently used).
    pub fn record(&mut self, hit: Option<PrefixHit>) {
        match hit {
            Some(hit) => {
                self.stats.hits += 1;
                self.stats.rows_reused += hit.rows as u64;
                self.touch(hit.entry);
            }
            None => self.stats.misses += 1,
        }
    }

    /// Copies the hit's rows into `cache` (which it replaces the contents of).
    pub fn restore(&mut self, hit: PrefixHit, cache: &mut KvCache) -> Result<()> {
        let entry = self.entries.get(&hit.entry).ok_or_else(|| Error::Input("that cached prefix was evicted".into()))?;
        cache.copy_prefix_from(&entry.cache, hit.rows)?;
        self.touch(hit.entry);
        Ok(())
    }

    /// Keeps an entry from eviction while a session starts from it (`unpin` when it has).
    pub fn pin(&mut self, id: EntryId) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.pins += 1;
        }
    }

    /// Undoes one `pin`.
    pub fn unpin(&mut self, id: EntryId) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Caches the first `rows.len()` rows of `cache` under `rows`, evicting the least recently used
    /// entries to make room. Returns the entry, or None when it is not worth keeping: shorter than a
    /// block, already cached as a prefix of an entry, or larger than the room eviction can make.
    pub fn insert(&mut self, rows: &[u64], cache: &KvCache) -> Result<Option<EntryId>> {
        if rows.len() < BLOCK_ROWS || rows.len() > cache.len() || self.contains(rows) {
            return Ok(None);
        }
        let config = match self.store_types {
            Some(t) => cache.config().clone().with_types(t.k, t.v),
            None => cache.config().clone(),
        };
        let rotation = if self.store_types.is_some() { Rotation::default() } else { cache.rotation() };
        let snapshot = cache.snapshot(rows.len(), config, rotation)?;
        Ok(self.insert_snapshot(rows, snapshot))
    }

    /// Caches `snapshot` (a cache holding exactly `rows.len()` rows, as `insert` or a prefix file
    /// makes) under `rows`, as `insert` does.
    pub fn insert_snapshot(&mut self, rows: &[u64], snapshot: KvCache) -> Option<EntryId> {
        if rows.len() < BLOCK_ROWS || rows.len() != snapshot.len() || self.contains(rows) {
            return None;
        }
        self.drop_subsumed(rows);
        let hashes = block_hashes(rows);
        let bytes = snapshot.memory_usage();
        if !self.make_room(bytes) {
            return None;
        }
        let id = EntryId(self.next_id);
        self.next_id += 1;
        for hash in hashes {
            self.blocks.entry(hash).or_default().push(id);
        }
        self.clock += 1;
        self.entries.insert(id, Entry { rows: rows.to_vec(), cache: snapshot, bytes, last_used: self.clock, pins: 0 });
        self.bytes += bytes;
        self.stats.insertions += 1;
        Some(id)
    }

    /// Whether an entry already holds `rows` (as all or the start of its own).
    pub fn contains(&self, rows: &[u64]) -> bool {
        let Some(&last) = block_hashes(rows).last() else { return false };
        self.blocks.get(&last).into_iter().flatten().any(|id| {
            let e = &self.entries[id];
            e.rows.len() >= rows.len() && e.rows[..rows.len()] == *rows
        })
    }

    /// `insert` within a shared budget whose `used` counts this cache's bytes beside the sessions':
    /// an entry takes only what the sessions leave free (evicting older entries for it), and the
    /// budget's count follows the cache's bytes.
    pub fn insert_within(&mut self, budget: &mut Budget, rows: &[u64], cache: &KvCache) -> Result<Option<EntryId>> {
        self.within(budget, |prefixes| prefixes.insert(rows, cache))
    }

    /// `insert_snapshot` within a shared budget (see `insert_within`).
    pub fn insert_snapshot_within(&mut self, budget: &mut Budget, rows: &[u64], snapshot: KvCache) -> Option<EntryId> {
        self.within(budget, |prefixes| Ok(prefixes.insert_snapshot(rows, snapshot))).ok().flatten()
    }

    fn within<T>(&mut self, budget: &mut Budget, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let before = self.bytes;
        let sessions = budget.used.saturating_sub(before);
        self.capacity = budget.total.saturating_sub(sessions);
        let result = f(self);
        budget.used = sessions + self.bytes;
        result
    }

    /// Evicts entries (least recently used first, never one in use) until `bytes` more fit in
    /// `budget`, whose `used` counts this cache's bytes; whether they fit now.
    pub fn make_room_in(&mut self, budget: &mut Budget, bytes: usize) -> bool {
        while !budget.fits(bytes) {
            match self.evict_one() {
                Some(freed) => budget.give_back(freed),
                None => return false,
            }
        }
        true
    }

    /// The rows of the entries dropped since the last call (for whoever keeps entries on disk).
    pub fn take_evicted(&mut self) -> Vec<Vec<u64>> {
        std::mem::take(&mut self.evicted)
    }

    /// An entry's rows and cache (to write it to disk).
    pub fn entry(&self, id: EntryId) -> Option<(&[u64], &KvCache)> {
        self.entries.get(&id).map(|e| (e.rows.as_slice(), &e.cache))
    }

    /// Evicts least recently used unpinned entries until `needed` more bytes fit; false if they cannot.
    fn make_room(&mut self, needed: usize) -> bool {
        while self.bytes + needed > self.capacity {
            if self.evict_one().is_none() {
                return false;
            }
        }
        true
    }

    /// Frees at least `bytes` (for sessions under memory pressure), least recently used first, never
    /// an entry in use. Returns what was freed.
    pub fn shrink_by(&mut self, bytes: usize) -> usize {
        let mut freed = 0;
        while freed < bytes {
            match self.evict_one() {
                Some(b) => freed += b,
                None => break,
            }
        }
        freed
    }

    fn evict_one(&mut self) -> Option<usize> {
        let (&id, _) = self.entries.iter().filter(|(_, e)| e.pins == 0).min_by_key(|(_, e)| e.last_used)?;
        self.stats.evictions += 1;
        self.remove(id)
    }

    /// Drops an entry; returns its bytes.
    fn remove(&mut self, id: EntryId) -> Option<usize> {
        let entry = self.entries.remove(&id)?;
        for hash in block_hashes(&entry.rows) {
            if let Some(ids) = self.blocks.get_mut(&hash) {
                ids.retain(|&i| i != id);
                if ids.is_empty() {
                    self.blocks.remove(&hash);
                }
            }
        }
        self.bytes -= entry.bytes;
        self.evicted.push(entry.rows);
        Some(entry.bytes)
    }

    /// Drops the entries (not in use) whose rows begin `rows`: an entry for `rows` answers every
    /// lookup they would (a conversation's earlier turns, once its latest is cached).
    fn drop_subsumed(&mut self, rows: &[u64]) {
        let subsumed: Vec<EntryId> = block_hashes(rows)
            .iter()
            .filter_map(|h| self.blocks.get(h))
            .flatten()
            .copied()
            .filter(|id| {
                let e = &self.entries[id];
                e.pins == 0 && e.rows.len() <= rows.len() && e.rows[..] == rows[..e.rows.len()]
            })
            .collect::<std::collections::HashSet<_>>()
            .into_iter()
            .collect();
        for id in subsumed {
            self.remove(id);
        }
    }

    fn touch(&mut self, id: EntryId) {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&id) {
            e.last_used = self.clock;
        }
    }
}
