//! The memory optimizer: fits a model's KV caches into a byte budget by the seed's strategy.
//!
//! With r = budget / current bytes: r ≥ 1 → nothing; 0.5 ≤ r < 1 → resize (evicting by the policy);
//! 0.25 ≤ r < 0.5 → Q8_0, then resize if still over; r < 0.25 → Q4_0, then prune (evict and resize)
//! if still over. Only caches that persist across steps are resized or pruned (for CSM the backbone;
//! the decoder's is reset every frame); all are quantized.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::kv_cache::{EvictionPolicy, KvCache};
use crate::CacheType;

/// The smallest capacity a resizable cache is shrunk to.
pub const MIN_CELLS: usize = 16;

/// Which branch of the strategy a budget ratio selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Nothing,
    Resize,
    Q8ThenResize,
    Q4ThenPrune,
}

impl Strategy {
    /// The seed's thresholds on r = budget / current bytes.
    pub fn for_ratio(r: f64) -> Strategy {
        if r >= 1.0 {
            Strategy::Nothing
        } else if r >= 0.5 {
            Strategy::Resize
        } else if r >= 0.25 {
            Strategy::Q8ThenResize
        } else {
            Strategy::Q4ThenPrune
        }
    }
}

/// A cache the optimizer may act on.
pub struct ManagedCache<'a> {
    pub name: &'static str,
    pub cache: &'a mut KvCache,
    /// Whether its capacity may change (false for CSM's per-frame decoder cache).
    pub resizable: bool,
}

/// What the optimizer did.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    pub budget_bytes: usize,
    pub ratio: f64,
    pub strategy: Strategy,
    pub actions: Vec<String>,
    /// (cache, bytes) before and after.
    pub before: Vec<(&'static str, usize)>,
    pub after: Vec<(&'static str, usize)>,
}

impl MemoryReport {
    pub fn bytes_after(&self) -> usize {
        self.after.iter().map(|(_, b)| b).sum()
    }
}

fn total(caches: &[ManagedCache<'_>]) -> usize {
    caches.iter().map(|c| c.cache.memory_usage()).sum()
}

/// Bytes one more cell costs in `cache` at its current types.
fn bytes_per_cell(cache: &KvCache) -> usize {
    cache.memory_usage() / cache.capacity()
}

/// The least memory the caches can be brought to: fixed caches at q4_0, resizable ones at q4_0 with
/// `MIN_CELLS` cells.
pub fn minimum_bytes(caches: &[ManagedCache<'_>]) -> Result<usize> {
    caches
        .iter()
        .map(|c| {
            let mut config = *c.cache.config();
            (config.k_type, config.v_type) = (CacheType::Q4_0, CacheType::Q4_0);
            if c.resizable {
                config.capacity = config.capacity.min(MIN_CELLS);
            }
            config.bytes()
        })
        .sum()
}

/// Applies the strategy for `budget` bytes to `caches`.
pub fn optimize(mut caches: Vec<ManagedCache<'_>>, budget: usize, policy: EvictionPolicy) -> Result<MemoryReport> {
    let before: Vec<_> = caches.iter().map(|c| (c.name, c.cache.memory_usage())).collect();
    let current = total(&caches);
    let ratio = budget as f64 / current as f64;
    let strategy = Strategy::for_ratio(ratio);
    let minimum = minimum_bytes(&caches)?;
    if budget < minimum {
        return Err(Error::Input(format!(
            "a KV budget of {budget} bytes cannot hold even a minimal cache ({minimum} bytes: q4_0, {MIN_CELLS} cells)"
        )));
    }
    let mut actions = Vec::new();
    let quantize_to = match strategy {
        Strategy::Q8ThenResize => Some(CacheType::Q8_0),
        Strategy::Q4ThenPrune => Some(CacheType::Q4_0),
        _ => None,
    };
    if let Some(t) = quantize_to {
        for c in caches.iter_mut() {
            // Only narrow: a cache already at or below the target's bits stays as it is.
            let narrower = |from: CacheType| if from.dtype().bits_per_element() > t.dtype().bits_per_element() { t } else { from };
            let (k, v) = (narrower(c.cache.k_type()), narrower(c.cache.v_type()));
            if (k, v) != (c.cache.k_type(), c.cache.v_type()) {
                c.cache.quantize(k, v)?;
                actions.push(format!("{}: quantized to {k}/{v}", c.name));
            }
        }
    }
    if strategy != Strategy::Nothing && total(&caches) > budget {
        let fixed: usize = caches.iter().filter(|c| !c.resizable).map(|c| c.cache.memory_usage()).sum();
        let resizable: Vec<usize> = (0..caches.len()).filter(|&i| caches[i].resizable).collect();
        // Share what the fixed caches leave in proportion to each resizable cache's current size.
        let room = budget.saturating_sub(fixed);
        let sizes: usize = resizable.iter().map(|&i| caches[i].cache.memory_usage()).sum();
        for &i in &resizable {
            let c = &mut caches[i];
            let share = room as f64 * c.cache.memory_usage() as f64 / sizes as f64;
            let cells = ((share as usize) / bytes_per_cell(c.cache)).clamp(MIN_CELLS.min(c.cache.capacity()), c.cache.capacity());
            let (len, from) = (c.cache.len(), c.cache.capacity());
            if strategy == Strategy::Q4ThenPrune && len > cells {
                let evicted = c.cache.prune(cells, policy)?;
                actions.push(format!("{}: pruned {evicted} of {len} cells ({policy:?})", c.name));
            }
            c.cache.resize(cells, policy)?;
            actions.push(format!("{}: resized from {from} to {cells} cells", c.name));
        }
    }
    let after: Vec<_> = caches.iter().map(|c| (c.name, c.cache.memory_usage())).collect();
    Ok(MemoryReport { budget_bytes: budget, ratio, strategy, actions, before, after })
}

/// Makes room for `needed` more cells in a full cache by evicting down to three quarters of its
/// capacity (so compaction happens every quarter of the capacity, not every token).
pub fn make_room(cache: &mut KvCache, needed: usize, policy: EvictionPolicy) -> Result<usize> {
    if cache.len() + needed <= cache.capacity() {
        return Ok(0);
    }
    let keep = (cache.capacity() * 3 / 4).min(cache.capacity().saturating_sub(needed));
    if keep < policy.sinks().min(cache.len()) || needed > cache.capacity() {
        return Err(Error::CacheFull { needed, capacity: cache.capacity() });
    }
    cache.prune(keep, policy)
}
