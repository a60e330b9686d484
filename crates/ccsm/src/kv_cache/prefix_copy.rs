//! Copying the first rows of one cache into another: how a session starts from a cached prefix, and how
//! a prefix is kept (a cache of its own, sized to its rows, in the types the prefix cache stores).
//! Rows of the same type and rotation are copied byte for byte (the session then holds exactly what
//! prefilling them would have stored); otherwise they are converted through f32, rotated or
//! un-rotated on the way.

use super::{convert_rows, Half, KvCache, KvCacheConfig, Rotation};
use crate::error::{Error, Result};

impl KvCache {
    /// A new cache holding the first `rows` cells of this one (their positions too), sized to them,
    /// in `config`'s types under `rotation` (the shape must be this cache's; capacity is set to `rows`).
    /// The copy is in host memory whatever this cache's placement: kept prefixes do not take a
    /// device's scarcer memory, and go back into a device cache by `copy_prefix_from`.
    pub fn snapshot(&self, rows: usize, config: KvCacheConfig, rotation: Rotation) -> Result<KvCache> {
        let mut copy = KvCache::with_rotation(config.with_capacity(rows.max(1)).with_recent(0), rotation)?;
        copy.copy_prefix_from(self, rows)?;
        Ok(copy)
    }

    /// Replaces this cache's contents with the first `rows` cells of `src` and their positions. The two
    /// caches must have the same shape (layers, heads, head width) and neither a recent window.
    pub fn copy_prefix_from(&mut self, src: &KvCache, rows: usize) -> Result<()> {
        let (a, b) = (&self.config, &src.config);
        if (a.n_layer, a.head_dim, a.n_head_kv) != (b.n_layer, b.head_dim, b.n_head_kv) {
            return Err(Error::Input(format!(
                "a prefix of {} layers × {} heads × {} cannot go into a cache of {} × {} × {}",
                b.n_layer, b.n_head_kv, b.head_dim, a.n_layer, a.n_head_kv, a.head_dim
            )));
        }
        if self.recent.is_some() || src.recent.is_some() {
            return Err(Error::Input("a cache with an f16 recent window neither gives nor takes a copied prefix".into()));
        }
        if rows > src.len() || rows > self.capacity() {
            return Err(Error::CacheFull { needed: rows, capacity: src.len().min(self.capacity()) });
        }
        let n_embd = self.width();
        let mut same = Vec::new();
        for layer in 0..self.config.n_layer {
            for half in Half::BOTH {
                let (from, to) = (src.config.types(layer).get(half), self.config.types(layer).get(half));
                let (s, d) = (half_of(src, layer, half), half_of(self, layer, half));
                let rotate = src.rotates(layer, half) != self.rotates(layer, half);
                if from == to && !rotate {
                    same.push(ggml::ByteCopy { src: s, dst: d, len: from.dtype().row_size(n_embd)? * rows });
                } else {
                    convert_rows(s, d, from, to, n_embd, rows, rotate.then_some(self.config.head_dim))?;
                }
            }
        }
        ggml::copy_bytes(&same, std::thread::available_parallelism().map_or(1, |n| n.get()))?;
        self.positions = src.positions[..rows].to_vec();
        self.next_position = self.positions.last().map_or(0, |&p| p + 1);
        self.scores = src.scores.get(..rows).map_or_else(|| vec![0.0; rows], <[f32]>::to_vec);
        self.version += 1;
        Ok(())
    }
}

impl KvCache {
    /// The stored bytes of the first `rows` cells of one layer's half (in its type, rotated as stored):
    /// what a prefix file keeps.
    pub fn stored_rows(&self, layer: usize, half: Half, rows: usize) -> Result<Vec<u8>> {
        if layer >= self.config.n_layer || rows > self.len() {
            return Err(Error::Input(format!(
                "rows {rows} of layer {layer}: the cache has {} rows of {} layers",
                self.len(),
                self.config.n_layer
            )));
        }
        let bytes = self.config.types(layer).get(half).dtype().row_size(self.width())? * rows;
        Ok(half_of(self, layer, half).read_bytes_at(0, bytes)?)
    }

    /// A cache sized to `positions.len()` rows holding `stored[layer] = (k, v)` bytes as `stored_rows`
    /// gave them (in `config`'s types under `rotation`), at `positions`. Every length is checked.
    pub fn from_stored_rows(
        config: KvCacheConfig,
        rotation: Rotation,
        stored: &[(Vec<u8>, Vec<u8>)],
        positions: Vec<i32>,
    ) -> Result<KvCache> {
        let rows = positions.len();
        let mut cache = KvCache::with_rotation(config.with_capacity(rows.max(1)).with_recent(0), rotation)?;
        if stored.len() != cache.config.n_layer {
            return Err(Error::Input(format!("{} layers of rows for a cache of {}", stored.len(), cache.config.n_layer)));
        }
        let n_embd = cache.width();
        for (layer, (k, v)) in stored.iter().enumerate() {
            for (half, bytes) in [(Half::K, k), (Half::V, v)] {
                let want = cache.config.types(layer).get(half).dtype().row_size(n_embd)? * rows;
                if bytes.len() != want {
                    return Err(Error::Input(format!("layer {layer} {half:?}: {} bytes where {rows} rows take {want}", bytes.len())));
                }
                half_of(&cache, layer, half).write_bytes_at(0, bytes)?;
            }
        }
        cache.next_position = positions.last().map_or(0, |&p| p + 1);
        cache.scores = vec![0.0; rows];
        cache.positions = positions;
        Ok(cache)
    }
}

fn half_of(cache: &KvCache, layer: usize, half: Half) -> ggml::Tensor<'_> {
    match half {
        Half::K => cache.k(layer),
        Half::V => cache.v(layer),
    }
}
