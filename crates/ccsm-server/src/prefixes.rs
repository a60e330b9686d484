//! The engine thread's cached prefixes (`ccsm::prefix_cache`) inside the one memory budget: a request
//! whose prompt starts with a cached prefix starts from a copy of its rows and prefills only the rest;
//! a finished request's rows (prompt and what it generated) are cached for the next one. Sessions
//! come first: before a session waits or is narrowed, prefixes are evicted, least recently used
//! first. Rows are copied into a session's own cache at admission, so no entry is ever in use once
//! admission is over. With `--cache-dir` the entries are kept on disk too.

use std::path::PathBuf;

use ccsm::kv_cache::{KvCache, KvCacheConfig, LayerTypes};
use ccsm::memory::Budget;
use ccsm::prefix_cache::file::{model_identity, PrefixDir};
use ccsm::prefix_cache::{PrefixCache, PrefixHit};
use ccsm::CacheType;

use crate::metrics::Metrics;

/// How the server caches prefixes.
#[derive(Clone, Debug)]
pub struct PrefixOptions {
    /// Off: every request prefills its whole prompt.
    pub enabled: bool,
    /// The type cached rows are stored in (None: the session's own).
    pub store_type: Option<CacheType>,
    /// A folder the entries are written to and loaded from at start-up.
    pub dir: Option<PathBuf>,
    /// The model file (its identity names the files it may load).
    pub model: PathBuf,
}

/// The cache, its folder, and what it publishes.
pub struct Prefixes {
    cache: PrefixCache,
    dir: Option<PrefixDir>,
}

impl Prefixes {
    /// The loop's prefix cache (None when off), with the folder's files loaded within `budget`;
    /// `shape` is a full session's cache (files of other shapes are refused).
    pub fn start(options: &PrefixOptions, shape: &KvCacheConfig, budget: &mut Budget, metrics: &Metrics) -> Option<Prefixes> {
        if !options.enabled {
            return None;
        }
        let store = options.store_type.map(|t| LayerTypes::new(t, t));
        let mut prefixes = Prefixes { cache: PrefixCache::new(budget.total, store), dir: None };
        if let Some(dir) = &options.dir {
            match model_identity(&options.model).and_then(|identity| PrefixDir::new(dir, identity)) {
                Ok(folder) => prefixes.load(folder, dir, budget, shape, metrics),
                Err(e) => eprintln!("prefix cache: not kept on disk: {e}"),
            }
        }
        prefixes.publish(metrics);
        Some(prefixes)
    }

    /// Loads the folder's files and keeps the folder in step from now on.
    fn load(&mut self, folder: PrefixDir, dir: &std::path::Path, budget: &mut Budget, shape: &KvCacheConfig, metrics: &Metrics) {
        match folder.load_into(&mut self.cache, budget, shape) {
            Ok(found) => {
                for why in &found.refused {
                    eprintln!("prefix cache: {why}");
                }
                metrics.prefix.files_refused.fetch_add(found.refused.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let mib = self.cache.bytes() as f64 / (1 << 20) as f64;
                eprintln!("prefix cache: {} prefixes loaded from {} ({mib:.1} MiB)", found.loaded, dir.display());
            }
            Err(e) => eprintln!("prefix cache: cannot read {}: {e}", dir.display()),
        }
        self.dir = Some(folder);
    }

    /// Makes room for a session of `bytes` whose prompt has `keys` (see `make_room`) and holds the
    /// longest cached prefix of that prompt against eviction until the session starts
    /// (`start_session`) or does not (`release`). With `spare`, that prefix is kept while others make
    /// room; without it (nothing else will free memory) it may make room too, and what is left is held.
    pub fn make_room_for(&mut self, budget: &mut Budget, bytes: usize, keys: &[u64], spare: bool, metrics: &Metrics) -> Option<PrefixHit> {
        let held = if spare { self.hold(keys) } else { None };
        self.make_room(budget, bytes, metrics);
        if spare {
            held
        } else {
            self.hold(keys)
        }
    }

    /// The longest cached prefix of `keys`, pinned; not counted until the session starts.
    fn hold(&mut self, keys: &[u64]) -> Option<PrefixHit> {
        let hit = self.cache.peek(keys)?;
        self.cache.pin(hit.entry);
        Some(hit)
    }

    /// Lets a held prefix go (its session did not start now).
    pub fn release(&mut self, hit: Option<PrefixHit>) {
        if let Some(hit) = hit {
            self.cache.unpin(hit.entry);
        }
    }

    /// Starts an admitted session from its held prefix (counted as a hit or a miss): `restore` copies
    /// the rows into the session. Returns the rows it holds: 0 without a prefix, or when the copy failed
    /// (`restore` must then leave the session empty: it prefills everything).
    pub fn start_session(
        &mut self,
        hit: Option<PrefixHit>,
        restore: impl FnOnce(&mut PrefixCache, PrefixHit) -> ccsm::Result<()>,
        metrics: &Metrics,
    ) -> usize {
        self.release(hit);
        self.cache.record(hit);
        self.publish(metrics);
        let Some(hit) = hit else { return 0 };
        match restore(&mut self.cache, hit) {
            Ok(()) => hit.rows,
            Err(e) => {
                tracing::warn!("a cached prefix could not be copied ({e}); prefilling the whole prompt");
                0
            }
        }
    }

    /// The cache itself (to restore a hit into a session).
    pub fn cache(&mut self) -> &mut PrefixCache {
        &mut self.cache
    }

    /// Bytes the entries hold (inside the budget).
    pub fn bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Evicts entries not held until `bytes` fit beside the sessions (sessions come first).
    pub fn make_room(&mut self, budget: &mut Budget, bytes: usize, metrics: &Metrics) {
        if !budget.fits(bytes) && self.cache.bytes() > 0 {
            self.cache.make_room_in(budget, bytes);
            self.sync(None);
            self.publish(metrics);
        }
    }

    /// Caches a finished session's rows (`keys` for the first `keys.len()` rows of `cache`) within what
    /// the sessions leave of the budget, and writes them to the folder.
    pub fn keep(&mut self, budget: &mut Budget, keys: &[u64], cache: &KvCache, metrics: &Metrics) {
        let keys = &keys[..keys.len().min(cache.len())];
        match self.cache.insert_within(budget, keys, cache) {
            Ok(id) => self.sync(id),
            Err(e) => tracing::warn!("a finished session's rows were not cached: {e}"),
        }
        self.publish(metrics);
    }

    fn sync(&mut self, id: Option<ccsm::prefix_cache::EntryId>) {
        match &self.dir {
            Some(dir) => {
                if let Err(e) = dir.sync(&mut self.cache, id) {
                    tracing::warn!("prefix cache: cannot write to disk: {e}");
                }
            }
            None => {
                self.cache.take_evicted();
            }
        }
    }

    fn publish(&self, metrics: &Metrics) {
        metrics.prefix.publish(&self.cache);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccsm::kv_cache::KvCacheConfig;

    fn filled(rows: usize) -> KvCache {
        let mut c = KvCache::new(KvCacheConfig::uniform(2, 64, 2, 64, CacheType::F16, CacheType::F16)).unwrap();
        c.append(rows).unwrap();
        c
    }

    #[test]
    fn a_session_keeps_the_prefix_it_starts_from_while_others_make_room() {
        let metrics = Metrics::default();
        let entry = filled(32).memory_usage() / 2; // 32 of 64 cells
        let mut budget = Budget::new(3 * entry);
        let options = PrefixOptions { enabled: true, store_type: None, dir: None, model: PathBuf::new() };
        let shape = filled(0).config().clone();
        let mut p = Prefixes::start(&options, &shape, &mut budget, &metrics).unwrap();
        let (older, newer): (Vec<u64>, Vec<u64>) = ((0..32).collect(), (100..132).collect());
        p.keep(&mut budget, &older, &filled(32), &metrics);
        p.keep(&mut budget, &newer, &filled(32), &metrics);
        assert_eq!(budget.used, 2 * entry);
        // A session of two entries' bytes whose prompt starts like the older (least recently used)
        // entry: with sessions running, the newer one makes room and the older is held for it.
        let prompt: Vec<u64> = (0..40).collect();
        let hit = p.make_room_for(&mut budget, 2 * entry, &prompt, true, &metrics).expect("the older entry is held");
        assert_eq!((hit.rows, budget.used, p.cache().len()), (32, entry, 1));
        assert_eq!(p.start_session(Some(hit), |_, _| Ok(()), &metrics), 32);
        assert_eq!(p.cache().stats().hits, 1);
        // With nothing running (nothing else will free memory) the prefix makes room itself.
        assert!(p.make_room_for(&mut budget, 3 * entry, &prompt, false, &metrics).is_none());
        assert_eq!((budget.used, p.cache().len()), (0, 0));
    }
}
