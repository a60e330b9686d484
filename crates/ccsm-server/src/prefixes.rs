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
        if shape.recent > 0 {
            eprintln!("prefix cache off: sessions with an f16 recent window (--kv-recent) do not start from copied rows");
            return None;
        }
        let store = options.store_type.map(|t| LayerTypes::new(t, t));
        let mut prefixes = Prefixes { cache: PrefixCache::new(budget.total, store), dir: None };
        if let Some(dir) = &options.dir {
            let opened = model_identity(&options.model).and_then(|identity| PrefixDir::new(dir, identity));
            match opened {
                Ok(folder) => {
                    match folder.load_into(&mut prefixes.cache, budget, shape) {
                        Ok(found) => {
                            for why in &found.refused {
                                eprintln!("prefix cache: {why}");
                            }
                            metrics.prefix.files_refused.fetch_add(found.refused.len() as u64, std::sync::atomic::Ordering::Relaxed);
                            eprintln!(
                                "prefix cache: {} prefixes loaded from {} ({:.1} MiB)",
                                found.loaded,
                                dir.display(),
                                prefixes.cache.bytes() as f64 / (1 << 20) as f64
                            );
                        }
                        Err(e) => eprintln!("prefix cache: cannot read {}: {e}", dir.display()),
                    }
                    prefixes.dir = Some(folder);
                }
                Err(e) => eprintln!("prefix cache: not kept on disk: {e}"),
            }
        }
        prefixes.publish(metrics);
        Some(prefixes)
    }

    /// The longest cached prefix of a prompt (counted as a hit or a miss).
    pub fn find(&mut self, keys: &[u64], metrics: &Metrics) -> Option<PrefixHit> {
        let hit = self.cache.longest(keys);
        self.publish(metrics);
        hit
    }

    /// The cache itself (to restore a hit into a session).
    pub fn cache(&mut self) -> &mut PrefixCache {
        &mut self.cache
    }

    /// Bytes the entries hold (inside the budget).
    pub fn bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Evicts entries until `bytes` fit beside the sessions (sessions come first).
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
