//! The KV cache: per layer a K and a V tensor `[n_embd_kv, capacity]` (one row per cached token, V not
//! transposed so it can be quantized row by row), each in its own backend buffer.
//!
//! Only this module knows strides, offsets and cell indices. Graph code asks for "the K view of layer
//! i" and "a node that stores these rows"; every cell keeps the absolute position its token had when
//! it was stored (RoPE is applied before K is stored).

mod evict;
mod layout;
mod prefix_copy;
mod recent;
mod rotation;

pub use evict::EvictionPolicy;
pub use layout::{Half, KvLayout, LayerTypes};
pub use recent::StepMasks;
pub use rotation::{hadamard_matrix, rotate_heads, Rotation};

use std::ops::Range;

use ggml::{Context, Tensor, TensorId, TensorStore};

use crate::error::{Error, Result};
use crate::placement::Placement;
use crate::CacheType;

/// Rows converted at a time by `quantize` (bounds its f32 scratch memory).
const CONVERT_ROWS: usize = 256;

/// What a live conversion did to the cache's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct QuantizeReport {
    /// Bytes of the cache's buffers (recent window included) before the conversion.
    pub bytes_before: usize,
    /// Bytes of the cache's buffers after it.
    pub bytes_after: usize,
    /// Most K/V buffer bytes alive at once during the conversion (old layers not yet converted plus
    /// the tensor being written).
    pub peak_bytes: usize,
}

/// The smallest capacity a cache is shrunk to (by the memory optimizer or a plan).
pub const MIN_CELLS: usize = 16;

/// Granularity of the attention window of single-token steps (see `KvCache::decode_window`).
pub const DECODE_WINDOW: usize = 256;

/// Shape and types of a cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Layers, each with one K and one V tensor.
    pub n_layer: usize,
    /// Width of one K/V head.
    pub head_dim: usize,
    /// K/V heads per layer; a row (one token) is `head_dim * n_head_kv` values.
    pub n_head_kv: usize,
    /// Cells allocated per layer.
    pub capacity: usize,
    // The types are set only through the constructors, so `k_type`/`v_type` are always layer 0's.
    /// The K type of every layer, unless `layout` gives each layer its own (then layer 0's).
    k_type: CacheType,
    /// The V type, on the same terms.
    v_type: CacheType,
    /// Per-layer types (a mixed-precision cache); `None`: every layer is `k_type`/`v_type`.
    layout: Option<KvLayout>,
    /// Cells of the recent window kept in f16 beside the typed rows (0: none; see `recent`).
    pub recent: usize,
}

impl KvCacheConfig {
    /// A cache whose every layer stores K as `k_type` and V as `v_type`.
    pub fn uniform(n_layer: usize, head_dim: usize, n_head_kv: usize, capacity: usize, k_type: CacheType, v_type: CacheType) -> Self {
        KvCacheConfig { n_layer, head_dim, n_head_kv, capacity, k_type, v_type, layout: None, recent: 0 }
    }

    /// This shape with each layer typed by `layout` (checked by `validate`: one entry per layer).
    pub fn with_layout(self, layout: KvLayout) -> Self {
        let first = layout.layers().first().copied().unwrap_or(LayerTypes::new(self.k_type, self.v_type));
        KvCacheConfig { k_type: first.k, v_type: first.v, layout: Some(layout), ..self }
    }

    /// This shape with `cells` cells per layer.
    pub fn with_capacity(self, cells: usize) -> Self {
        KvCacheConfig { capacity: cells, ..self }
    }

    /// Layer 0's K type (every layer's, for a uniform cache).
    pub fn k_type(&self) -> CacheType {
        self.k_type
    }

    /// Layer 0's V type (every layer's, for a uniform cache).
    pub fn v_type(&self) -> CacheType {
        self.v_type
    }

    /// The per-layer types, when the layers differ (or were given one by one).
    pub fn layout(&self) -> Option<&KvLayout> {
        self.layout.as_ref()
    }

    /// This cache with a recent window of `cells` f16 cells (0: none).
    pub fn with_recent(self, cells: usize) -> Self {
        KvCacheConfig { recent: cells, ..self }
    }

    /// This shape with every layer stored as `k_type`/`v_type`.
    pub fn with_types(self, k_type: CacheType, v_type: CacheType) -> Self {
        KvCacheConfig { k_type, v_type, layout: None, ..self }
    }

    /// This shape with every layer's types replaced by `f(type)`.
    pub fn map_types(self, f: impl Fn(CacheType) -> CacheType) -> Self {
        match &self.layout {
            Some(layout) => {
                let mapped = layout.map(f);
                self.with_layout(mapped)
            }
            None => {
                let (k, v) = (f(self.k_type), f(self.v_type));
                self.with_types(k, v)
            }
        }
    }

    /// The types of layer `layer`.
    pub fn types(&self, layer: usize) -> LayerTypes {
        match &self.layout {
            Some(layout) => layout.layers()[layer],
            None => LayerTypes::new(self.k_type, self.v_type),
        }
    }

    /// Every layer's types.
    pub fn kv_layout(&self) -> KvLayout {
        self.layout.clone().unwrap_or_else(|| KvLayout::uniform(self.n_layer, self.k_type, self.v_type))
    }

    /// The types every layer shares, if they all agree.
    pub fn uniform_types(&self) -> Option<LayerTypes> {
        match &self.layout {
            Some(layout) => layout.uniform_types(),
            None => Some(LayerTypes::new(self.k_type, self.v_type)),
        }
    }

    /// Every (layer, half, type) the cache stores.
    fn halves(&self) -> impl Iterator<Item = CacheType> + '_ {
        (0..self.n_layer).flat_map(move |l| Half::BOTH.map(|h| self.types(l).get(h)))
    }

    /// Width of a row (one token across the KV heads), when it fits in `usize`.
    pub fn n_embd_kv(&self) -> Result<usize> {
        self.head_dim.checked_mul(self.n_head_kv).ok_or_else(|| self.overflow())
    }

    fn overflow(&self) -> Error {
        Error::CacheLayout { k: self.k_type, v: self.v_type, why: format!("the size of {self:?} overflows") }
    }

    /// Refuses type/shape combinations ggml cannot store or attend over, and sizes that overflow.
    pub fn validate(&self) -> Result<()> {
        let refuse = |why: String| Err(Error::CacheLayout { k: self.k_type, v: self.v_type, why });
        if self.n_layer == 0 || self.head_dim == 0 || self.n_head_kv == 0 {
            return refuse(format!("empty shape {self:?}"));
        }
        if self.capacity == 0 {
            return refuse("capacity 0".into());
        }
        if let Some(layout) = self.layout.as_ref().filter(|l| l.len() != self.n_layer) {
            return refuse(format!("a layout of {} layers for a cache of {}", layout.len(), self.n_layer));
        }
        // The distinct types (a uniform cache names two, whatever its layer count).
        let mut types: Vec<CacheType> = match &self.layout {
            Some(layout) => layout.layers().iter().flat_map(|t| [t.k, t.v]).collect(),
            None => vec![self.k_type, self.v_type],
        };
        types.sort_by_key(|t| t.name());
        types.dedup();
        for t in types {
            let block = t.dtype().block_size();
            // Each head's slice of a row must be whole blocks for the per-head attention views.
            if !self.head_dim.is_multiple_of(block) {
                return refuse(format!(
                    "{t} stores blocks of {block} elements, and a head of {} elements (rows of {}) is not a multiple of {block}",
                    self.head_dim,
                    self.head_dim.saturating_mul(self.n_head_kv)
                ));
            }
        }
        self.checked_bytes().map(|_| ())
    }

    fn checked_bytes(&self) -> Result<usize> {
        let width = self.n_embd_kv()?;
        let row = |t: CacheType| t.dtype().row_size(width).map_err(|_| self.overflow());
        let mut per_cell = 0usize;
        if self.layout.is_none() {
            // Every layer alike: one multiplication (also bounds n_layer's share of an overflow).
            let layer = row(self.k_type)?.checked_add(row(self.v_type)?);
            per_cell = layer.and_then(|c| c.checked_mul(self.n_layer)).ok_or_else(|| self.overflow())?;
        } else {
            for t in self.halves() {
                per_cell = per_cell.checked_add(row(t)?).ok_or_else(|| self.overflow())?;
            }
        }
        let ring = self.checked_recent_bytes()?;
        per_cell.checked_mul(self.capacity).and_then(|b| b.checked_add(ring)).ok_or_else(|| self.overflow())
    }

    fn checked_recent_bytes(&self) -> Result<usize> {
        let row = recent::RING_TYPE.dtype().row_size(self.n_embd_kv()?).map_err(|_| self.overflow())?;
        row.checked_mul(2 * self.n_layer).and_then(|b| b.checked_mul(self.recent)).ok_or_else(|| self.overflow())
    }

    /// Bytes of the recent window's f16 rings (every layer's K and V).
    pub fn recent_bytes(&self) -> Result<usize> {
        self.validate()?;
        self.checked_recent_bytes()
    }

    /// Bytes of one cell in every layer's K and V (the recent window, a fixed cost, left out).
    pub fn cell_bytes(&self) -> Result<usize> {
        KvCacheConfig { capacity: 1, recent: 0, ..self.clone() }.bytes()
    }

    /// Bytes the cache allocates: 2 tensors per layer, rows sized by each type's block math.
    pub fn bytes(&self) -> Result<usize> {
        self.validate()?;
        self.checked_bytes()
    }
}

struct LayerCache {
    k: TensorStore,
    v: TensorStore,
}

/// A per-transformer KV cache.
pub struct KvCache {
    config: KvCacheConfig,
    layers: Vec<LayerCache>,
    tensor: TensorId,
    /// Absolute position of the token in each live cell; cell i is row i of every layer.
    positions: Vec<i32>,
    next_position: i32,
    /// Attention mass each cell has received (kept only while the attention policy tracks it).
    scores: Vec<f32>,
    rotation: Rotation,
    /// The F32 `[head_dim, head_dim]` Hadamard matrix graphs rotate with, while a half is rotated.
    hadamard: Option<(TensorStore, TensorId)>,
    /// The newest cells again in f16, when the config asks for a window.
    recent: Option<recent::RecentWindow>,
    /// Unique among the caches of this process (kept graphs are keyed by it).
    id: u64,
    /// Bumped by every change a built graph could not see (types, rotation, the recent window), so
    /// kept graphs keyed by (id, version) are rebuilt after one.
    version: u64,
    /// Where the rows live (the engine's placement: its graphs read them there).
    placement: Placement,
}

/// The id the next cache gets.
static NEXT_CACHE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn single_tensor_store(
    name: &str,
    t: CacheType,
    n_embd_kv: usize,
    capacity: usize,
    placement: &Placement,
) -> Result<(TensorStore, TensorId)> {
    let mut store = TensorStore::new(1)?;
    let id = store.add(name, t.dtype(), &[n_embd_kv as i64, capacity as i64])?;
    placement.allocate(&mut store)?;
    Ok((store, id))
}

fn hadamard_store(head_dim: usize, placement: &Placement) -> Result<(TensorStore, TensorId)> {
    let (store, id) = single_tensor_store("cache_rotation", CacheType::F32, head_dim, head_dim, placement)?;
    store.get(id).write_f32(&hadamard_matrix(head_dim))?;
    Ok((store, id))
}

/// Copies the first `rows` rows of `src` (type `from`) into `dst` (type `to`) through f32, rotating
/// each head (`Some(head_dim)`) on the way when the two sides differ in rotation (H undoes itself).
/// Blocks of rows are converted on every core (a prefix stored in q8_0 going into an f16 session).
fn convert_rows(
    src: Tensor<'_>,
    dst: Tensor<'_>,
    from: CacheType,
    to: CacheType,
    n_embd: usize,
    rows: usize,
    rotate: Option<usize>,
) -> Result<()> {
    let (src_row, dst_row) = (from.dtype().row_size(n_embd)?, to.dtype().row_size(n_embd)?);
    let bytes = src.read_bytes_at(0, rows * src_row)?;
    let convert = |block: &[u8]| -> Result<Vec<u8>> {
        let mut values = from.dtype().dequantize(block, block.len() / src_row * n_embd)?;
        if let Some(head_dim) = rotate {
            rotate_heads(&mut values, head_dim);
        }
        Ok(to.dtype().quantize(&values, n_embd)?)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows.div_ceil(CONVERT_ROWS)).max(1);
    let share = rows.div_ceil(threads).max(1) * src_row;
    let converted: Vec<Result<Vec<u8>>> = match threads {
        1 => vec![convert(&bytes)],
        _ => std::thread::scope(|scope| {
            let handles: Vec<_> = bytes.chunks(share).map(|block| scope.spawn(move || convert(block))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::Input("a row conversion thread panicked".into())))).collect()
        }),
    };
    let mut at = 0;
    for block in converted {
        let block = block?;
        dst.write_bytes_at(at, &block)?;
        at += block.len();
    }
    debug_assert_eq!(at, rows * dst_row);
    Ok(())
}

impl KvCache {
    /// A cache whose rows are stored as computed (no rotation).
    pub fn new(config: KvCacheConfig) -> Result<Self> {
        Self::with_rotation(config, Rotation::Off)
    }

    /// A cache that rotates its rows under `rotation` (see `Rotation`).
    pub fn with_rotation(config: KvCacheConfig, rotation: Rotation) -> Result<Self> {
        Self::placed(config, rotation, &Placement::Cpu)
    }

    /// `with_rotation`, its rows in `placement`'s memory; a device refuses types its attention does
    /// not take (`Placement::check_cache`).
    pub fn placed(config: KvCacheConfig, rotation: Rotation, placement: &Placement) -> Result<Self> {
        config.validate()?;
        placement.check_cache(&config)?;
        let mut layers = Vec::with_capacity(config.n_layer);
        let mut tensor = None;
        for l in 0..config.n_layer {
            let types = config.types(l);
            let (k, id) = single_tensor_store(&format!("cache_k.{l}"), types.k, config.n_embd_kv()?, config.capacity, placement)?;
            let (v, _) = single_tensor_store(&format!("cache_v.{l}"), types.v, config.n_embd_kv()?, config.capacity, placement)?;
            tensor = Some(id);
            layers.push(LayerCache { k, v });
        }
        let tensor = tensor.expect("n_layer > 0 was validated");
        let recent = match config.recent {
            0 => None,
            cells => Some(recent::RecentWindow::new(config.n_layer, config.n_embd_kv()?, cells)?),
        };
        let mut cache = KvCache {
            config,
            layers,
            tensor,
            positions: Vec::new(),
            next_position: 0,
            scores: Vec::new(),
            rotation,
            hadamard: None,
            recent,
            id: NEXT_CACHE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            version: 0,
            placement: placement.clone(),
        };
        cache.update_hadamard()?;
        Ok(cache)
    }

    fn update_hadamard(&mut self) -> Result<()> {
        match (&self.hadamard, self.is_rotated()) {
            (None, true) => self.hadamard = Some(hadamard_store(self.config.head_dim, &self.placement)?),
            (Some(_), false) => self.hadamard = None,
            _ => {}
        }
        Ok(())
    }

    /// Where the rows live.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// This cache's id, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How many changes graphs cannot see (types, rotation, the recent window) the cache has had.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When this cache's rows are Hadamard-rotated before they are stored.
    pub fn rotation(&self) -> Rotation {
        self.rotation
    }

    /// Whether layer `layer`'s `half` is stored rotated (for K, queries must then be rotated too; for
    /// V, attention outputs rotated back).
    pub fn rotates(&self, layer: usize, half: Half) -> bool {
        self.rotation.applies(self.config.types(layer).get(half), self.config.head_dim)
    }

    /// Whether any layer's half is stored rotated.
    pub fn is_rotated(&self) -> bool {
        (0..self.config.n_layer).any(|l| Half::BOTH.into_iter().any(|h| self.rotates(l, h)))
    }

    /// The F32 `[head_dim, head_dim]` Hadamard matrix (symmetric), while a half is rotated.
    pub fn hadamard_tensor(&self) -> Option<Tensor<'_>> {
        self.hadamard.as_ref().map(|(store, id)| store.get(*id))
    }

    /// The cache's shape and types as they are now (conversions change them).
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// Width of a row; the config was validated, so the product fits.
    fn width(&self) -> usize {
        self.config.head_dim * self.config.n_head_kv
    }

    /// Live cells.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether no cell is live.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Allocated cells.
    pub fn capacity(&self) -> usize {
        self.config.capacity
    }

    /// Absolute positions of the live cells, in cell order.
    pub fn positions(&self) -> &[i32] {
        &self.positions
    }

    /// The position the next token gets.
    pub fn next_position(&self) -> i32 {
        self.next_position
    }

    /// The K type of every layer (layer 0's under a per-layer layout; see `layout`).
    pub fn k_type(&self) -> CacheType {
        self.config.k_type
    }

    /// The type of both halves of every layer, when they all agree.
    pub fn current_quantization_type(&self) -> Option<CacheType> {
        self.config.uniform_types().filter(|t| t.k == t.v).map(|t| t.k)
    }

    /// The V type of every layer (layer 0's under a per-layer layout; see `layout`).
    pub fn v_type(&self) -> CacheType {
        self.config.v_type
    }

    /// Every layer's types.
    pub fn layout(&self) -> KvLayout {
        self.config.kv_layout()
    }

    /// Whether layers differ in their types.
    pub fn is_mixed(&self) -> bool {
        self.config.uniform_types().is_none()
    }

    /// Forgets every cell (memory stays allocated); positions restart at 0.
    pub fn clear(&mut self) {
        self.positions.clear();
        self.scores.clear();
        self.next_position = 0;
        if let Some(r) = self.recent.as_mut() {
            r.clear();
        }
    }

    /// Exact bytes held by the K and V tensors of every layer and the recent window's rings
    /// (ggml_nbytes of each).
    pub fn memory_usage(&self) -> usize {
        let ring = self.recent.as_ref().map_or(0, |r| r.memory_usage());
        ring + self.layers.iter().map(|l| l.k.get(self.tensor).nbytes() + l.v.get(self.tensor).nbytes()).sum::<usize>()
    }

    /// Reserves the next `n` cells for tokens at the next `n` positions; returns the cell range.
    /// Roll back with `truncate` if the step that fills them fails.
    pub fn append(&mut self, n: usize) -> Result<Range<usize>> {
        let start = self.len();
        if start + n > self.capacity() {
            return Err(Error::CacheFull { needed: start + n, capacity: self.capacity() });
        }
        let first = self.next_position;
        self.positions.extend((0..n as i32).map(|i| first + i));
        self.scores.resize(self.positions.len(), 0.0);
        self.next_position = first + n as i32;
        if let Some(r) = self.recent.as_mut() {
            r.on_append(start..start + n);
        }
        Ok(start..start + n)
    }

    /// Drops cells from `len` on (undoing an `append`); the next position follows the last kept cell.
    pub fn truncate(&mut self, len: usize) {
        self.positions.truncate(len);
        self.scores.truncate(len);
        self.next_position = self.positions.last().map_or(0, |p| p + 1);
        if let Some(r) = self.recent.as_mut() {
            r.on_truncate(len);
        }
    }

    /// Cell indices of `cells` in the form `store_k`/`store_v` take them.
    pub fn cell_indices(cells: Range<usize>) -> Vec<i64> {
        cells.map(|c| c as i64).collect()
    }

    /// Cells attention covers for single-token steps: the live ones rounded up to a multiple of
    /// `DECODE_WINDOW` (at most the capacity), so consecutive steps share one graph shape.
    pub fn decode_window(&self) -> usize {
        self.len().div_ceil(DECODE_WINDOW).max(1).saturating_mul(DECODE_WINDOW).min(self.capacity())
    }

    /// Additive attention mask `[n_queries][n_kv]`: 0 where a live cell's position is at or before
    /// the query's position, −∞ elsewhere (causal over absolute positions, whatever the cell order)
    /// and for cells past `len()` up to `n_kv`.
    pub fn attention_mask(&self, query_positions: &[i32], n_kv: usize) -> Vec<f32> {
        self.windowed_attention_mask(query_positions, n_kv, usize::MAX)
    }

    /// `attention_mask`, but a query also sees only the `window` most recent positions, itself
    /// included (0 where q − window < p ≤ q).
    pub fn windowed_attention_mask(&self, query_positions: &[i32], n_kv: usize, window: usize) -> Vec<f32> {
        let mut mask = vec![f32::NEG_INFINITY; query_positions.len() * n_kv];
        for (row, &q) in mask.chunks_mut(n_kv).zip(query_positions) {
            for (m, &p) in row.iter_mut().zip(&self.positions) {
                if p <= q && ((q - p) as u64) < window as u64 {
                    *m = 0.0;
                }
            }
        }
        mask
    }

    /// Converts the live cache, every layer's K then V, to the given types, keeping every cached
    /// token. One tensor is converted at a time (new buffer, rows converted in chunks through f32,
    /// old buffer freed), so memory peaks at the old cache plus one layer's new tensor.
    pub fn quantize(&mut self, k_type: CacheType, v_type: CacheType) -> Result<QuantizeReport> {
        self.convert(self.config.clone().with_types(k_type, v_type), self.rotation)
    }

    /// `quantize`, layer by layer to each layer's types in `layout`.
    pub fn quantize_layout(&mut self, layout: KvLayout) -> Result<QuantizeReport> {
        self.convert(self.config.clone().with_layout(layout), self.rotation)
    }

    /// Changes the rotation policy, rotating (or un-rotating) the stored rows that it changes.
    pub fn set_rotation(&mut self, rotation: Rotation) -> Result<QuantizeReport> {
        self.convert(self.config.clone(), rotation)
    }

    fn convert(&mut self, target: KvCacheConfig, rotation: Rotation) -> Result<QuantizeReport> {
        target.validate()?;
        self.placement.check_cache(&target)?;
        self.version += 1;
        let hd = self.config.head_dim;
        let bytes_before = self.memory_usage();
        let mut live = bytes_before;
        let mut peak = live;
        let (n_embd, capacity, len) = (self.width(), self.config.capacity, self.len());
        for l in 0..self.layers.len() {
            for half in Half::BOTH {
                let (from, to) = (self.config.types(l).get(half), target.types(l).get(half));
                let rotate = self.rotation.applies(from, hd) != rotation.applies(to, hd);
                if from == to && !rotate {
                    continue;
                }
                let (store, id) = single_tensor_store(&format!("cache_{}.{l}", half.name()), to, n_embd, capacity, &self.placement)?;
                let new_bytes = store.get(id).nbytes();
                peak = peak.max(live + new_bytes);
                let slot = match half {
                    Half::K => &mut self.layers[l].k,
                    Half::V => &mut self.layers[l].v,
                };
                convert_rows(slot.get(self.tensor), store.get(id), from, to, n_embd, len, rotate.then_some(hd))
                    .map_err(|e| e.in_layer(l, half))?;
                if let Some(r) = self.recent.as_ref().filter(|_| rotate) {
                    r.rotate(l, half, n_embd, hd).map_err(|e| e.in_layer(l, half))?;
                }
                let old_bytes = slot.get(self.tensor).nbytes();
                *slot = store;
                live = live + new_bytes - old_bytes;
            }
        }
        self.config = target;
        self.rotation = rotation;
        self.update_hadamard()?;
        Ok(QuantizeReport { bytes_before, bytes_after: self.memory_usage(), peak_bytes: peak })
    }

    /// The live rows of layer `layer`'s `half` as f32 `[len][n_embd_kv]`, as stored (rotated heads
    /// stay rotated).
    pub fn rows_f32(&self, layer: usize, half: Half) -> Result<Vec<f32>> {
        if layer >= self.config.n_layer {
            return Err(Error::Input(format!("layer {layer} of a cache of {}", self.config.n_layer)));
        }
        let t = self.config.types(layer).get(half);
        let tensor = match half {
            Half::K => self.k(layer),
            Half::V => self.v(layer),
        };
        let bytes = tensor.read_bytes_at(0, self.len() * t.dtype().row_size(self.width())?)?;
        Ok(t.dtype().dequantize(&bytes, self.len() * self.width())?)
    }

    fn k(&self, layer: usize) -> Tensor<'_> {
        self.layers[layer].k.get(self.tensor)
    }

    fn v(&self, layer: usize) -> Tensor<'_> {
        self.layers[layer].v.get(self.tensor)
    }

    /// A node storing `rows` `[n_embd_kv, n]` (f32) into layer `layer`'s K at the I64 `cells`.
    pub fn store_k<'c>(&'c self, ctx: &'c Context, layer: usize, rows: Tensor<'c>, cells: Tensor<'c>) -> Result<Tensor<'c>> {
        Ok(ctx.set_rows(self.k(layer), rows, cells)?)
    }

    /// A node storing `rows` `[n_embd_kv, n]` (f32) into layer `layer`'s V at the I64 `cells`.
    pub fn store_v<'c>(&'c self, ctx: &'c Context, layer: usize, rows: Tensor<'c>, cells: Tensor<'c>) -> Result<Tensor<'c>> {
        Ok(ctx.set_rows(self.v(layer), rows, cells)?)
    }

    /// K of the first `n_kv` cells of `layer` (the live ones and, past `len()`, masked padding) as
    /// `[head_dim, n_head_kv, n_kv]`, in the cache's own type.
    pub fn k_tensor<'c>(&'c self, ctx: &'c Context, layer: usize, n_kv: usize) -> Result<Tensor<'c>> {
        self.live_view(ctx, self.k(layer), self.config.types(layer).k, n_kv)
    }

    /// V of the first `n_kv` cells of `layer` as `[head_dim, n_head_kv, n_kv]`, in the cache's own type.
    pub fn v_tensor<'c>(&'c self, ctx: &'c Context, layer: usize, n_kv: usize) -> Result<Tensor<'c>> {
        self.live_view(ctx, self.v(layer), self.config.types(layer).v, n_kv)
    }

    fn live_view<'c>(&'c self, ctx: &'c Context, t: Tensor<'c>, ty: CacheType, n_kv: usize) -> Result<Tensor<'c>> {
        let c = &self.config;
        if self.is_empty() || n_kv < self.len() || n_kv > self.capacity() {
            return Err(Error::Invariant(format!("attention over {n_kv} cells of a cache holding {} of {}", self.len(), self.capacity())));
        }
        let head_bytes = ty.dtype().row_size(c.head_dim)?;
        let row_bytes = ty.dtype().row_size(self.width())?;
        let shape = [c.head_dim as i64, c.n_head_kv as i64, n_kv as i64];
        Ok(ctx.view(t, &shape, &[head_bytes, row_bytes], 0)?)
    }
}

impl Error {
    /// This error, said of one layer's half of a KV cache.
    pub fn in_layer(self, layer: usize, half: Half) -> Error {
        Error::InLayer { layer, half: half.name(), source: Box::new(self) }
    }
}
