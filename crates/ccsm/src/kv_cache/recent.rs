//! The recent window (KIVI's residual): the newest cells also kept in f16, so each query reads the
//! cells nearest to it at full precision and the rest as the cache's type stores them.
//!
//! Every row is stored in the cache's own type at its step, as without a window; the window is a
//! ring of `cells` f16 rows per layer and half beside it, slot `c % cells` holding cell `c`. A cell
//! ages out when a newer cell takes its slot, and from then on is read from its quantized row, so
//! aging costs no conversion. Cells that moved (pruning, resizing) keep their ring rows when they are
//! still among the newest; a slot whose cell was dropped or overwritten holds nothing.
//!
//! Which copy a query reads (`KvCache::step_masks`): the newest `cells` cells up to and including
//! its own come from this step's rows as computed (f32) or from the ring; every other visible cell
//! from the cache's rows.

use std::ops::Range;

use ggml::{Context, Tensor, TensorId, TensorStore};

use super::{single_tensor_store, Half, KvCache};
use crate::error::{Error, Result};
use crate::CacheType;

/// The type the rings store their rows in.
pub(super) const RING_TYPE: CacheType = CacheType::F16;

pub(super) struct RecentWindow {
    /// Per layer the f16 K and V rings `[n_embd_kv, cells]`.
    layers: Vec<(TensorStore, TensorStore)>,
    tensor: TensorId,
    /// The cell each slot holds (one slot per cell of the window).
    owner: Vec<Option<usize>>,
}

impl RecentWindow {
    pub(super) fn new(n_layer: usize, n_embd_kv: usize, cells: usize) -> Result<Self> {
        let mut layers = Vec::with_capacity(n_layer);
        let mut tensor = None;
        for l in 0..n_layer {
            let (k, id) = single_tensor_store(&format!("recent_k.{l}"), RING_TYPE, n_embd_kv, cells, &crate::Placement::Cpu)?;
            let (v, _) = single_tensor_store(&format!("recent_v.{l}"), RING_TYPE, n_embd_kv, cells, &crate::Placement::Cpu)?;
            tensor = Some(id);
            layers.push((k, v));
        }
        let tensor = tensor.ok_or(Error::EmptyInput("a recent window over no layers"))?;
        Ok(RecentWindow { layers, tensor, owner: vec![None; cells] })
    }

    pub(super) fn cells(&self) -> usize {
        self.owner.len()
    }

    /// Whether the ring holds cell `cell`.
    pub(super) fn holds(&self, cell: usize) -> bool {
        self.owner[cell % self.cells()] == Some(cell)
    }

    /// The cells of a step over `cells` that go to the ring: its newest `cells` at most.
    pub(super) fn stored_cells(&self, cells: Range<usize>) -> Range<usize> {
        cells.end.saturating_sub(self.cells()).max(cells.start)..cells.end
    }

    pub(super) fn on_append(&mut self, cells: Range<usize>) {
        let n = self.cells();
        for c in self.stored_cells(cells) {
            self.owner[c % n] = Some(c);
        }
    }

    /// Forgets cells from `len` on (their slots' older cells were overwritten: those stay quantized).
    pub(super) fn on_truncate(&mut self, len: usize) {
        self.owner.iter_mut().filter(|o| o.is_some_and(|c| c >= len)).for_each(|o| *o = None);
    }

    pub(super) fn clear(&mut self) {
        self.owner.iter_mut().for_each(|o| *o = None);
    }

    pub(super) fn tensor(&self, layer: usize, half: Half) -> Tensor<'_> {
        let (k, v) = &self.layers[layer];
        match half {
            Half::K => k.get(self.tensor),
            Half::V => v.get(self.tensor),
        }
    }

    /// Bytes of every ring (ggml_nbytes of each).
    pub(super) fn memory_usage(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.get(self.tensor).nbytes() + v.get(self.tensor).nbytes()).sum()
    }

    /// After the cache kept `kept` (old cell indices, ascending, now cells 0..): each held cell still
    /// among the newest moves to its new slot; the others age out.
    pub(super) fn remap(&mut self, kept: &[usize], row_bytes: usize) -> Result<()> {
        let len = kept.len();
        // (new cell, old slot) of each held cell that stays among the newest.
        let moves: Vec<(usize, usize)> = kept
            .iter()
            .enumerate()
            .filter(|&(to, &from)| to + self.cells() >= len && self.holds(from))
            .map(|(to, &from)| (to, from % self.cells()))
            .collect();
        // Only rows that change slot are copied (all read first: a slot may be another's source).
        let moved = moves.iter().any(|&(to, from)| to % self.cells() != from);
        for l in (0..self.layers.len()).filter(|_| moved) {
            for half in Half::BOTH {
                let t = self.tensor(l, half);
                let old = t.read_bytes()?;
                let mut new = old.clone();
                for &(to, from) in &moves {
                    let slot = to % self.cells();
                    new[slot * row_bytes..(slot + 1) * row_bytes].copy_from_slice(&old[from * row_bytes..(from + 1) * row_bytes]);
                }
                t.write_bytes_at(0, &new)?;
            }
        }
        let mut owner = vec![None; self.cells()];
        for &(to, _) in &moves {
            owner[to % self.cells()] = Some(to);
        }
        self.owner = owner;
        Ok(())
    }

    /// Rotates (or un-rotates: H undoes itself) every head of `layer`'s `half` ring, in place.
    pub(super) fn rotate(&self, layer: usize, half: Half, n_embd: usize, head_dim: usize) -> Result<()> {
        let t = self.tensor(layer, half);
        super::convert_rows(t, t, RING_TYPE, RING_TYPE, n_embd, self.cells(), Some(head_dim))
    }
}

/// The three masks of a step over a cache with a recent window, each `[n_queries][n_cells]`.
pub struct StepMasks {
    /// Over the cache's first `n_kv` cells: visible cells the query does not read from elsewhere.
    pub cache: Vec<f32>,
    /// Over this step's own rows: those among the query's newest cells.
    pub step: Vec<f32>,
    /// Over the ring's slots: earlier steps' cells among the query's newest.
    pub ring: Vec<f32>,
}

impl KvCache {
    /// Cells the recent window keeps in f16 (0: no window).
    pub fn recent_cells(&self) -> usize {
        self.recent.as_ref().map_or(0, |r| r.cells())
    }

    /// Gives the cache a recent window of `cells` f16 cells (0: none), replacing any it had. The new
    /// window starts empty: cells already cached stay in the cache's type, newer ones fill it.
    pub fn set_recent(&mut self, cells: usize) -> Result<()> {
        let config = self.config.clone().with_recent(cells);
        config.validate()?;
        self.placement.check_cache(&config)?;
        self.recent = match cells {
            0 => None,
            n => Some(RecentWindow::new(config.n_layer, config.n_embd_kv()?, n)?),
        };
        self.config = config;
        self.version += 1;
        Ok(())
    }

    /// Whether the recent window holds cell `cell`.
    pub fn recent_holds(&self, cell: usize) -> bool {
        self.recent.as_ref().is_some_and(|r| r.holds(cell))
    }

    /// The cells of a step over `cells` whose rows go to the window: its newest `recent_cells()`.
    pub fn recent_stored_cells(&self, cells: Range<usize>) -> Range<usize> {
        match &self.recent {
            Some(r) => r.stored_cells(cells),
            None => cells.end..cells.end,
        }
    }

    /// The ring slots of `cells` in the form `store_recent` takes them.
    pub fn recent_slots(&self, cells: Range<usize>) -> Vec<i64> {
        let n = self.recent_cells().max(1);
        self.recent_stored_cells(cells).map(|c| (c % n) as i64).collect()
    }

    /// The rows the window holds of layer `layer`'s `half`, as f32 `[cells][n_embd_kv]` by slot.
    pub fn recent_rows_f32(&self, layer: usize, half: Half) -> Result<Vec<f32>> {
        let r = self.recent.as_ref().ok_or_else(|| Error::Input("the cache has no recent window".into()))?;
        if layer >= self.config.n_layer {
            return Err(Error::Input(format!("layer {layer} of a cache of {}", self.config.n_layer)));
        }
        Ok(RING_TYPE.dtype().dequantize(&r.tensor(layer, half).read_bytes()?, r.cells() * self.width())?)
    }

    /// A node storing `rows` `[n_embd_kv, m]` (f32) into layer `layer`'s `half` ring at the I64 `slots`.
    pub fn store_recent<'c>(
        &'c self,
        ctx: &'c Context,
        layer: usize,
        half: Half,
        rows: Tensor<'c>,
        slots: Tensor<'c>,
    ) -> Result<Tensor<'c>> {
        let r = self.recent.as_ref().ok_or_else(|| Error::Invariant("a recent-window store on a cache without one".into()))?;
        Ok(ctx.set_rows(r.tensor(layer, half), rows, slots)?)
    }

    /// Layer `layer`'s `half` ring as `[head_dim, n_head_kv, cells]` f16.
    pub fn recent_tensor<'c>(&'c self, ctx: &'c Context, layer: usize, half: Half) -> Result<Tensor<'c>> {
        let r = self.recent.as_ref().ok_or_else(|| Error::Invariant("a recent-window view of a cache without one".into()))?;
        let c = &self.config;
        let (head, row) = (RING_TYPE.dtype().row_size(c.head_dim)?, RING_TYPE.dtype().row_size(self.width())?);
        Ok(ctx.view(r.tensor(layer, half), &[c.head_dim as i64, c.n_head_kv as i64, r.cells() as i64], &[head, row], 0)?)
    }

    /// The masks of a step whose rows are `cells` (live, appended), over the cache's first `n_kv`
    /// cells. A query at cell `q` sees the cells at or before its position; of those, the newest
    /// `recent_cells()` (cells q − N < c ≤ q) come from this step's rows or the ring when either has
    /// them, each visible cell from exactly one source.
    pub fn step_masks(&self, cells: Range<usize>, n_kv: usize) -> StepMasks {
        let n_recent = self.recent_cells();
        let (n, ring) = (cells.len(), self.recent.as_ref());
        let mut masks = StepMasks {
            cache: vec![f32::NEG_INFINITY; n * n_kv],
            step: vec![f32::NEG_INFINITY; n * n],
            ring: vec![f32::NEG_INFINITY; n * n_recent],
        };
        for (i, query) in cells.clone().enumerate() {
            let q = self.positions[query];
            let recent = |c: usize| c <= query && query - c < n_recent;
            for (c, &p) in self.positions.iter().enumerate().take(n_kv) {
                if p > q {
                    continue;
                }
                if recent(c) && cells.contains(&c) {
                    masks.step[i * n + c - cells.start] = 0.0;
                } else if recent(c) && ring.is_some_and(|r| r.holds(c)) {
                    masks.ring[i * n_recent + c % n_recent] = 0.0;
                } else {
                    masks.cache[i * n_kv + c] = 0.0;
                }
            }
        }
        masks
    }
}
