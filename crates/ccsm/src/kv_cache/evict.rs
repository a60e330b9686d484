//! Making room: pruning cells by a policy, and resizing the allocated capacity. Kept cells keep their
//! absolute positions (RoPE is already in K) and their order; new tokens continue at the next
//! position, so masks stay causal.

use ggml::Tensor;

use super::{single_tensor_store, KvCache, KvCacheConfig};
use crate::error::{Error, Result};

/// Which cells to keep when the cache must shed some.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionPolicy {
    /// The first `sinks` tokens (attention sinks) and the most recent ones (StreamingLLM).
    SinkRecent {
        /// Leading cells never evicted.
        sinks: usize,
    },
    /// The first `sinks` tokens and those that received the most attention so far (H2O); the
    /// model must track attention (`GGMLModel::set_track_attention`) for the scores to mean anything.
    Attention {
        /// Leading cells never evicted.
        sinks: usize,
    },
}

impl Default for EvictionPolicy {
    fn default() -> Self {
        EvictionPolicy::SinkRecent { sinks: 4 }
    }
}

impl EvictionPolicy {
    /// Leading cells the policy never evicts.
    pub fn sinks(self) -> usize {
        match self {
            EvictionPolicy::SinkRecent { sinks } | EvictionPolicy::Attention { sinks } => sinks,
        }
    }

    /// Whether the policy needs the attention mass each cell receives (H2O does).
    pub fn tracks_attention(self) -> bool {
        matches!(self, EvictionPolicy::Attention { .. })
    }
}

impl KvCache {
    /// Attention mass received per live cell (zeros unless tracked).
    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    /// Adds per-cell attention mass (one value per live cell, in cell order).
    pub fn add_scores(&mut self, mass: &[f32]) {
        for (s, m) in self.scores.iter_mut().zip(mass) {
            *s += m;
        }
    }

    /// The cells `policy` keeps out of the live ones when only `keep` may stay, ascending.
    pub fn cells_to_keep(&self, keep: usize, policy: EvictionPolicy) -> Vec<usize> {
        let len = self.len();
        if keep >= len {
            return (0..len).collect();
        }
        // Cells are in position order (appends only, compaction keeps order): sinks come first.
        let sinks = policy.sinks().min(keep);
        let mut kept: Vec<usize> = (0..sinks).collect();
        let rest = keep - sinks;
        match policy {
            EvictionPolicy::SinkRecent { .. } => kept.extend(len - rest..len),
            EvictionPolicy::Attention { .. } => {
                let mut candidates: Vec<usize> = (sinks..len).collect();
                // Most attention first; ties favour the more recent cell.
                candidates.sort_by(|&a, &b| self.scores[b].total_cmp(&self.scores[a]).then(b.cmp(&a)));
                candidates.truncate(rest);
                candidates.sort_unstable();
                kept.extend(candidates);
            }
        }
        kept
    }

    /// Keeps at most `keep` cells, chosen by `policy`, compacted to the front; returns how many were
    /// evicted. Capacity and types are unchanged.
    pub fn prune(&mut self, keep: usize, policy: EvictionPolicy) -> Result<usize> {
        let kept = self.cells_to_keep(keep, policy);
        let evicted = self.len() - kept.len();
        if evicted == 0 {
            return Ok(0);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let (k_row, v_row) = self.row_bytes(l)?;
            let (k, v) = (layer.k.get(self.tensor), layer.v.get(self.tensor));
            // kept[i] >= i, so moving rows forward in cell order never overwrites a row still needed.
            for (to, &from) in kept.iter().enumerate().filter(|(to, from)| to != *from) {
                move_row(k, from, to, k_row)?;
                move_row(v, from, to, v_row)?;
            }
        }
        self.keep_metadata(&kept)?;
        Ok(evicted)
    }

    /// Changes the allocated capacity, keeping the type. Shrinking below `len()` evicts by `policy`
    /// first. One layer at a time (new buffers, kept rows copied, old freed).
    pub fn resize(&mut self, capacity: usize, policy: EvictionPolicy) -> Result<()> {
        if capacity == 0 {
            return Err(Error::CacheLayout { k: self.config.k_type, v: self.config.v_type, why: "capacity 0".into() });
        }
        if capacity == self.config.capacity {
            return Ok(());
        }
        KvCacheConfig { capacity, ..self.config.clone() }.validate()?;
        let kept = self.cells_to_keep(capacity, policy);
        let n_embd = self.width();
        for l in 0..self.layers.len() {
            let types = self.config.types(l);
            let (k_row, v_row) = self.row_bytes(l)?;
            let (k_store, k_id) = single_tensor_store(&format!("cache_k.{l}"), types.k, n_embd, capacity, &self.placement)?;
            let (v_store, v_id) = single_tensor_store(&format!("cache_v.{l}"), types.v, n_embd, capacity, &self.placement)?;
            let (old_k, old_v) = (self.layers[l].k.get(self.tensor), self.layers[l].v.get(self.tensor));
            for (to, &from) in kept.iter().enumerate() {
                copy_row(old_k, k_store.get(k_id), from, to, k_row)?;
                copy_row(old_v, v_store.get(v_id), from, to, v_row)?;
            }
            self.layers[l].k = k_store;
            self.layers[l].v = v_store;
        }
        self.config.capacity = capacity;
        self.keep_metadata(&kept)
    }

    /// Bytes of one row of layer `layer`'s K and V.
    fn row_bytes(&self, layer: usize) -> Result<(usize, usize)> {
        let (n, types) = (self.width(), self.config.types(layer));
        Ok((types.k.dtype().row_size(n)?, types.v.dtype().row_size(n)?))
    }

    /// Positions and scores of the kept cells, in order (the next position is unchanged), and the
    /// recent window's rows of those still among the newest.
    fn keep_metadata(&mut self, kept: &[usize]) -> Result<()> {
        self.positions = kept.iter().map(|&c| self.positions[c]).collect();
        self.scores = kept.iter().map(|&c| self.scores[c]).collect();
        let row = super::recent::RING_TYPE.dtype().row_size(self.width())?;
        match self.recent.as_mut() {
            Some(r) => r.remap(kept, row),
            None => Ok(()),
        }
    }
}

fn move_row(t: Tensor<'_>, from: usize, to: usize, row: usize) -> Result<()> {
    copy_row(t, t, from, to, row)
}

fn copy_row(src: Tensor<'_>, dst: Tensor<'_>, from: usize, to: usize, row: usize) -> Result<()> {
    let bytes = src.read_bytes_at(from * row, row)?;
    Ok(dst.write_bytes_at(to * row, &bytes)?)
}
