//! Attention over a KV cache as graph nodes: this step's K/V rows stored into the cache, then flash
//! attention of the queries over the cache's first cells under the step's mask. Shared by every
//! transformer of the engine (the Llama stacks, Mimi's decoder transformer); the blocks around it
//! (norms, projections, RoPE, residuals) are each model's own.

mod recent;

use std::ops::Range;

use ggml::{Context, DType, Graph, Slot, StepGraph, Tensor, TensorStore};

use crate::error::Result;
use crate::kv_cache::{Half, KvCache};

/// Per-step inputs shared by every block (filled after the graph is allocated).
#[derive(Clone, Copy)]
pub struct StepInputs<'c> {
    /// I32 `[n]`: absolute position of each new row.
    pub positions: Tensor<'c>,
    /// I64 `[n]`: cache cell each new row's K/V goes to.
    pub cells: Tensor<'c>,
    /// F16 `[n_kv, n]`: additive attention mask over the first `n_kv` cells.
    pub mask: Tensor<'c>,
    /// F32 `[rope_dims / 2]`: RoPE frequency divisors, when the model scales RoPE.
    pub freq_factors: Option<Tensor<'c>>,
}

/// One sequence of a batched step: its cache, which of the step's rows are its, and where they go.
#[derive(Clone, Copy)]
pub struct SequenceInputs<'c> {
    /// The sequence's own KV cache, which its rows are stored in and attend over.
    pub cache: &'c KvCache,
    /// First row of the step that is this sequence's.
    pub first_row: usize,
    /// How many of the step's rows, from `first_row` on, are this sequence's.
    pub n_rows: usize,
    /// I64 `[n_rows]`: the cells of `cache` the rows' K/V go to.
    pub cells: Tensor<'c>,
    /// F16 `[n_kv, n_rows]`: the rows' additive mask over the cache's first `n_kv` cells.
    pub mask: Tensor<'c>,
    /// When the cache keeps a recent window: where the rows go in it, and what each row reads there.
    pub recent: Option<RecentInputs<'c>>,
}

/// The inputs of a step over a cache with a recent window (see `KvCache::step_masks`).
#[derive(Clone, Copy)]
pub struct RecentInputs<'c> {
    /// I64 `[m]`: the ring slots of the step's last `m` rows.
    pub slots: Tensor<'c>,
    /// F16 `[n_rows, n_rows]`: each row's mask over the step's own rows.
    pub step_mask: Tensor<'c>,
    /// F16 `[recent cells, n_rows]`: each row's mask over the ring.
    pub ring_mask: Tensor<'c>,
}

impl<'c> RecentInputs<'c> {
    /// New inputs for `rows` rows over `cache`.
    fn new(ctx: &'c Context, cache: &KvCache, rows: usize) -> Result<Option<Self>> {
        let cells = cache.recent_cells();
        if cells == 0 {
            return Ok(None);
        }
        let input = |t: DType, shape: &[i64]| -> Result<Tensor<'c>> { Ok(ctx.new_tensor(t, shape)?.set_input()) };
        Ok(Some(RecentInputs {
            slots: input(DType::I64, &[rows.min(cells) as i64])?,
            step_mask: input(DType::F16, &[rows as i64, rows as i64])?,
            ring_mask: input(DType::F16, &[cells as i64, rows as i64])?,
        }))
    }
}

/// One sequence's shape in a batched step: its new rows, attending over its cache's first `n_kv` cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequencePart {
    /// Rows the sequence runs in the step.
    pub rows: usize,
    /// Cells of its cache the rows attend over (the mask's width).
    pub n_kv: usize,
}

/// The inputs of a step over several sequences: every row's position, each sequence's cells and mask.
pub struct BatchInputs<'c> {
    /// I32 `[total rows]`: absolute position of every row of the step, sequence after sequence.
    pub positions: Tensor<'c>,
    /// F32 `[rope_dims / 2]`: RoPE frequency divisors, when the model scales RoPE.
    pub freq_factors: Option<Tensor<'c>>,
    /// Per sequence: its cache, rows, cells `[n_rows]`, mask `[n_kv, n_rows]` and, over a recent
    /// window, its inputs.
    pub sequences: Vec<SequenceInputs<'c>>,
}

impl<'c> BatchInputs<'c> {
    /// New input tensors for sequences shaped `parts` over `caches`, and the scope's view of them.
    pub fn new(
        ctx: &'c Context,
        freq_factors: Option<Tensor<'c>>,
        caches: &[&'c KvCache],
        parts: &[SequencePart],
    ) -> Result<(Self, Vec<SequenceInputs<'c>>)> {
        let total: usize = parts.iter().map(|p| p.rows).sum();
        let positions = ctx.new_tensor(DType::I32, &[total as i64])?.set_input();
        let mut sequences = Vec::with_capacity(parts.len());
        let mut first_row = 0;
        for (cache, &SequencePart { rows, n_kv }) in caches.iter().zip(parts) {
            let cells = ctx.new_tensor(DType::I64, &[rows as i64])?.set_input();
            let mask = ctx.new_tensor(DType::F16, &[n_kv as i64, rows as i64])?.set_input();
            let recent = RecentInputs::new(ctx, cache, rows)?;
            sequences.push(SequenceInputs { cache, first_row, n_rows: rows, cells, mask, recent });
            first_row += rows;
        }
        Ok((BatchInputs { positions, freq_factors, sequences: sequences.clone() }, sequences))
    }

    /// Their slots, to fill once the graph is allocated (fresh or kept).
    pub fn slots(&self) -> BatchSlots {
        BatchSlots {
            positions: self.positions.slot(),
            freq_factors: self.freq_factors.map(Tensor::slot),
            window: usize::MAX,
            sequences: self
                .sequences
                .iter()
                .map(|seq| SequenceSlots {
                    cells: seq.cells.slot(),
                    mask: seq.mask.slot(),
                    recent: seq.recent.map(|r| [r.slots.slot(), r.step_mask.slot(), r.ring_mask.slot()]),
                })
                .collect(),
        }
    }
}

/// One sequence's inputs of a built step: cells, mask and, over a recent window, its ring slots, step
/// mask and ring mask.
#[derive(Clone, Debug)]
pub struct SequenceSlots {
    cells: Slot,
    mask: Slot,
    recent: Option<[Slot; 3]>,
}

/// The slots of a built step's `BatchInputs`.
#[derive(Clone, Debug)]
pub struct BatchSlots {
    positions: Slot,
    freq_factors: Option<Slot>,
    /// Each query sees at most this many of the latest positions (itself included).
    window: usize,
    sequences: Vec<SequenceSlots>,
}

impl BatchSlots {
    /// These inputs with every query seeing only the `window` latest positions (Mimi's causal window).
    pub fn windowed(mut self, window: usize) -> Self {
        self.window = window;
        self
    }

    /// Fills them for rows stored at `cells[i]` of `caches[i]` (`freq_factors`: the stack's RoPE divisors).
    pub fn write(&self, graph: StepGraph<'_>, freq_factors: Option<&[f32]>, caches: &[&KvCache], cells: &[Range<usize>]) -> Result<()> {
        let mut positions = Vec::new();
        for ((cache, cells), seq) in caches.iter().zip(cells).zip(&self.sequences) {
            let p = &cache.positions()[cells.clone()];
            positions.extend_from_slice(p);
            graph.at(seq.cells)?.write_i64(&KvCache::cell_indices(cells.clone()))?;
            let mask = graph.at(seq.mask)?;
            match seq.recent {
                Some([slots, step_mask, ring_mask]) => {
                    let masks = cache.step_masks(cells.clone(), mask.ne(0) as usize);
                    mask.write_f32(&masks.cache)?;
                    graph.at(step_mask)?.write_f32(&masks.step)?;
                    graph.at(ring_mask)?.write_f32(&masks.ring)?;
                    graph.at(slots)?.write_i64(&cache.recent_slots(cells.clone()))?;
                }
                None => mask.write_f32(&cache.windowed_attention_mask(p, mask.ne(0) as usize, self.window))?,
            }
        }
        graph.at(self.positions)?.write_i32(&positions)?;
        if let (Some(t), Some(f)) = (self.freq_factors, freq_factors) {
            graph.at(t)?.write_f32(f)?;
        }
        Ok(())
    }
}

/// What one graph needs from its surroundings.
pub struct BuildScope<'c, 'g> {
    /// The context the graph's nodes are created in.
    pub(crate) ctx: &'c Context,
    /// The graph being built; cache stores are expanded into it before the attention that reads them.
    pub(crate) graph: &'g mut Graph<'c>,
    /// The model's weights.
    pub(crate) weights: &'c TensorStore,
    /// The step's KV cache (in a batched step, the first sequence's; each has its own in `sequences`).
    pub(crate) cache: &'c KvCache,
    /// The step's inputs; with several sequences `cells` and `mask` are the first sequence's (each
    /// sequence's own are in `sequences`).
    pub(crate) inputs: StepInputs<'c>,
    /// With more than one entry, a batched step: rows of several sequences, projections and MLPs run over
    /// all of them at once, attention per sequence over its own cache.
    pub(crate) sequences: Vec<SequenceInputs<'c>>,
    /// I32 `[n_out]`: the rows the last block keeps when only some rows' outputs are wanted (each
    /// sequence's last row); `None` keeps the very last row.
    pub(crate) output_rows: Option<Tensor<'c>>,
    /// Also compute the attention mass each cell receives (summed over layers, heads and queries)
    /// as the output "attn_mass" `[n_kv]`, for the attention eviction policy.
    pub(crate) track_attention: bool,
    /// Which kernels the step's attention runs (the engine's choice).
    pub(crate) kernels: AttentionChoice,
    attention_mass: Option<Tensor<'c>>,
}

impl<'c, 'g> BuildScope<'c, 'g> {
    /// A scope for a step of one sequence over `cache`: no output rows chosen, no tracking, `Auto` kernels.
    pub fn new(ctx: &'c Context, graph: &'g mut Graph<'c>, weights: &'c TensorStore, cache: &'c KvCache, inputs: StepInputs<'c>) -> Self {
        BuildScope {
            ctx,
            graph,
            weights,
            cache,
            inputs,
            sequences: Vec::new(),
            output_rows: None,
            track_attention: false,
            kernels: AttentionChoice::Auto,
            attention_mass: None,
        }
    }

    /// A scope over several sequences' rows (`positions` and `freq_factors` cover every row, in order).
    pub fn batched(
        ctx: &'c Context,
        graph: &'g mut Graph<'c>,
        weights: &'c TensorStore,
        positions: Tensor<'c>,
        freq_factors: Option<Tensor<'c>>,
        sequences: Vec<SequenceInputs<'c>>,
    ) -> Result<Self> {
        let first = *sequences.first().ok_or(crate::Error::EmptyInput("a step over no sequences"))?;
        let inputs = StepInputs { positions, cells: first.cells, mask: first.mask, freq_factors };
        let mut scope = Self::new(ctx, graph, weights, first.cache, inputs);
        scope.sequences = sequences;
        Ok(scope)
    }

    /// `x` `[ne0, n]` cut to the rows the last block keeps: `output_rows`, or the last row.
    pub fn kept_rows(&self, x: Tensor<'c>) -> Result<Tensor<'c>> {
        match self.output_rows {
            Some(ids) => Ok(self.ctx.get_rows(x, ids)?),
            None => {
                let row = x.strides()[1];
                Ok(self.ctx.cont(self.ctx.view(x, &[x.ne(0), 1], &[row], (x.ne(1) as usize - 1) * row)?)?)
            }
        }
    }

    /// Keeps only `rows` (I32 `[n_out]`) in the last block: each sequence's last row, when only those
    /// rows' outputs are wanted.
    pub fn with_output_rows(mut self, rows: Option<Tensor<'c>>) -> Self {
        self.output_rows = rows;
        self
    }

    /// Runs the step's attention with `kernels`.
    pub fn with_kernels(mut self, kernels: AttentionChoice) -> Self {
        self.kernels = kernels;
        self
    }

    /// Also sums the attention mass each cell receives when `on` (see `track_attention`).
    pub fn tracking_attention(mut self, on: bool) -> Self {
        self.track_attention = on;
        self
    }

    /// The summed attention mass, once every layer is built (None unless tracking).
    pub fn take_attention_mass(&mut self) -> Option<Tensor<'c>> {
        self.attention_mass.take()
    }

    /// softmax(K·Q) of one layer, summed per cell, added to the running total.
    fn add_attention_mass(&mut self, keys: Tensor<'c>, queries: Tensor<'c>, mask: Tensor<'c>, scale: f32) -> Result<()> {
        let ctx = self.ctx;
        let scores = ctx.soft_max_ext(ctx.mul_mat(keys, queries)?, Some(mask), scale)?;
        let [n_kv, n, heads, _] = scores.shape();
        let per_query = ctx.cont(ctx.transpose(ctx.reshape(scores, &[n_kv, n * heads])?)?)?;
        let mass = ctx.reshape(ctx.sum_rows(per_query)?, &[n_kv])?;
        self.attention_mass = Some(match self.attention_mass {
            Some(total) => ctx.add(total, mass)?,
            None => mass,
        });
        Ok(())
    }
}

/// Heads of one attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Width of one head.
    pub head_dim: usize,
    /// Query heads.
    pub n_head: usize,
    /// K/V heads; each serves `n_head / n_head_kv` query heads.
    pub n_head_kv: usize,
}

/// Queries `[head_dim, n_head, n]` and this step's keys `[head_dim, n_head_kv, n]` (RoPE applied) and
/// values `[head_dim · n_head_kv, n]` of cache layer `layer` → attention output `[head_dim · n_head, n]`.
/// The step's K/V rows are stored in the cache first; softmax scale 1/√head_dim.
pub fn over_cache<'c>(
    s: &mut BuildScope<'c, '_>,
    layer: usize,
    shape: AttentionShape,
    q: Tensor<'c>,
    k: Tensor<'c>,
    v: Tensor<'c>,
) -> Result<Tensor<'c>> {
    if s.sequences.len() <= 1 {
        let recent = s.sequences.first().and_then(|seq| seq.recent);
        let seq =
            SequenceInputs { cache: s.cache, first_row: 0, n_rows: q.ne(2) as usize, cells: s.inputs.cells, mask: s.inputs.mask, recent };
        return over_one_cache(s, seq, layer, shape, [q, k, v]);
    }
    // A batched step: each sequence's columns of q, k and v attend over its own cache; the outputs
    // are joined back in row order.
    let ctx = s.ctx;
    let mut joined: Option<Tensor<'c>> = None;
    for seq in s.sequences.clone() {
        // q and k are `[head_dim, heads, n]`, v is `[width, n]`: the view keeps the sequence's columns.
        let cols = |t: Tensor<'c>, dims: usize| -> Result<Tensor<'c>> {
            let strides = &t.strides()[1..dims];
            let mut ne = t.shape()[..dims].to_vec();
            ne[dims - 1] = seq.n_rows as i64;
            Ok(ctx.view(t, &ne, strides, seq.first_row * strides[dims - 2])?)
        };
        let out = over_one_cache(s, seq, layer, shape, [cols(q, 3)?, cols(k, 3)?, cols(v, 2)?])?;
        joined = Some(match joined {
            Some(prev) => ctx.concat(prev, out, 1)?,
            None => out,
        });
    }
    joined.ok_or(crate::Error::EmptyInput("a step over no sequences"))
}

/// `over_cache` for the rows of one sequence: stores them in its cache at its cells, then attends
/// under its mask.
fn over_one_cache<'c>(
    s: &mut BuildScope<'c, '_>,
    seq: SequenceInputs<'c>,
    layer: usize,
    shape: AttentionShape,
    [q, k, v]: [Tensor<'c>; 3],
) -> Result<Tensor<'c>> {
    let (ctx, cache, cells, mask) = (s.ctx, seq.cache, seq.cells, seq.mask);
    let (hd, n_head, n_head_kv) = (shape.head_dim as i64, shape.n_head as i64, shape.n_head_kv as i64);
    let n = q.ne(2);

    // A rotated cache stores H·k and H·v per head: queries rotate with the keys (scores keep q·k),
    // and the attention output comes back through H (see kv_cache::rotation).
    let hadamard = cache.hadamard_tensor();
    let rotate = |t: Tensor<'c>, on: bool| -> Result<Tensor<'c>> {
        match (hadamard, on) {
            (Some(h), true) => {
                let t = if t.is_contiguous() { t } else { ctx.cont(t)? };
                Ok(ctx.reshape(ctx.mul_mat(h, ctx.reshape(t, &[hd, t.nelements() / hd])?)?, &t.shape()[..t.n_dims()])?)
            }
            _ => Ok(t),
        }
    };
    let (rotate_k, rotate_v) = (cache.rotates(layer, Half::K), cache.rotates(layer, Half::V));
    let q = rotate(q, rotate_k)?;
    let k = rotate(k, rotate_k)?;
    let v = rotate(v, rotate_v)?;

    // The stores run before the attention reads the cache: they enter the graph first.
    let k_rows = ctx.reshape(if k.is_contiguous() { k } else { ctx.cont(k)? }, &[hd * n_head_kv, n])?;
    s.graph.expand(cache.store_k(ctx, layer, k_rows, cells)?)?;
    s.graph.expand(cache.store_v(ctx, layer, v, cells)?)?;
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    if cache.recent_cells() > 0 {
        let recent = seq.recent.ok_or_else(|| crate::Error::Invariant("a step over a recent window without its inputs".into()))?;
        if s.track_attention {
            return Err(crate::Error::Input("attention tracking (the attention eviction policy) does not cover a recent window".into()));
        }
        let v_rows = if v.is_contiguous() { v } else { ctx.cont(v)? };
        let attended = recent::attend(ctx, s.graph, cache, layer, recent, q, [k_rows, v_rows], mask, scale)?;
        return Ok(ctx.reshape(rotate(attended, rotate_v)?, &[hd * n_head, n])?);
    }

    let n_kv = mask.ne(0) as usize;
    let path = s.kernels.resolve_for(ctx.builds_for_device())?;
    let (k_view, v_view) = (cache.k_tensor(ctx, layer, n_kv)?, cache.v_tensor(ctx, layer, n_kv)?);
    let (k_view, v_view) = match path {
        // The stored rows in f32 (ggml's dequantizing copy), so flash attention takes its tiled path.
        AttentionPath::Dequantized => (
            ctx.cpy(k_view, ctx.new_tensor(DType::F32, &k_view.shape()[..3])?)?,
            ctx.cpy(v_view, ctx.new_tensor(DType::F32, &v_view.shape()[..3])?)?,
        ),
        _ => (k_view, v_view),
    };
    let keys = ctx.permute(k_view, [0, 2, 1, 3])?;
    let values = ctx.permute(v_view, [0, 2, 1, 3])?;
    let queries = ctx.permute(q, [0, 2, 1, 3])?;
    if s.track_attention {
        s.add_attention_mass(keys, queries, mask, scale)?;
    }
    let attended = match path {
        AttentionPath::Split => ctx.split_attention(queries, keys, values, mask, scale)?,
        AttentionPath::Direct | AttentionPath::Dequantized => ctx.flash_attn_ext(queries, keys, values, Some(mask), scale)?,
    };
    Ok(ctx.reshape(rotate(attended, rotate_v)?, &[hd * n_head, n])?)
}

/// Which kernel a step's attention runs (`docs/attention.md` has the measurements behind the choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    /// ggml's flash attention over the cache as stored: its tiled path for f16/f32 caches and many
    /// queries, one query row at a time otherwise.
    Direct,
    /// The cache's rows copied to f32 first, for ggml's tiled flash attention.
    Dequantized,
    /// Our kernel split by cells (`ggml::Context::split_attention`): each block of cells decoded once
    /// for every query row and every query head of its KV head.
    Split,
}

/// The attention kernels a cache's steps run: chosen per step (`Auto`), or one for every step (to
/// measure and compare them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionChoice {
    /// The engine picks the kernel per step (see `resolve`).
    #[default]
    Auto,
    /// Every step runs this kernel.
    Only(AttentionPath),
}

impl AttentionChoice {
    /// The kernel a step runs. `Auto` is the split kernel for every step, every cache type and
    /// every batch size: measured on SmolLM2 it beat ggml's kernel (tiled for f16 prompts, one row at
    /// a time otherwise) and the f32 copy at every depth and batch size (`docs/attention.md`).
    pub fn resolve(self) -> AttentionPath {
        match self {
            AttentionChoice::Only(path) => path,
            AttentionChoice::Auto => AttentionPath::Split,
        }
    }
}

impl AttentionChoice {
    /// The kernel a step runs in a graph for a device (`on_device`) or the CPU: on a device `Auto`
    /// is ggml's flash attention over the cache as stored, and the split kernel (the CPU's) is refused.
    pub fn resolve_for(self, on_device: bool) -> Result<AttentionPath> {
        match (self, on_device) {
            (_, false) => Ok(self.resolve()),
            (AttentionChoice::Auto, true) => Ok(AttentionPath::Direct),
            (AttentionChoice::Only(AttentionPath::Split), true) => Err(crate::Error::Input(
                "the split attention kernel runs on the CPU only: use auto, direct or dequantized on a device".into(),
            )),
            (AttentionChoice::Only(path), true) => Ok(path),
        }
    }

    /// Every choice with its name on the command line and in reports.
    const NAMED: [(&'static str, AttentionChoice); 4] = [
        ("auto", AttentionChoice::Auto),
        ("direct", AttentionChoice::Only(AttentionPath::Direct)),
        ("dequantized", AttentionChoice::Only(AttentionPath::Dequantized)),
        ("split", AttentionChoice::Only(AttentionPath::Split)),
    ];

    /// The choice's name on the command line and in reports (`auto`, `direct`, `dequantized`, `split`).
    pub fn name(self) -> &'static str {
        Self::NAMED.iter().find(|(_, c)| *c == self).map_or("auto", |(n, _)| n)
    }
}

impl std::str::FromStr for AttentionChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::NAMED
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, c)| *c)
            .ok_or_else(|| format!("unknown attention path '{s}' (auto, direct, dequantized, split)"))
    }
}

impl std::fmt::Display for AttentionChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for AttentionChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}
