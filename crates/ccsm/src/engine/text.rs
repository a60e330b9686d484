//! The text engine: Llama weights shared by every sequence, steps over many sequences at once.

use ggml::{Backend, ComputeBuffer, Context, DType, Graph, NodeTime, ReusableGraph, Tensor};

use crate::attention::{BatchInputs, BuildScope};
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, KvCacheConfig, Rotation};
use crate::llama::LlamaModel;
use crate::{CacheType, Logits};

/// Graph nodes each sequence of a batched step adds per block, at most.
pub(crate) const PER_SEQUENCE_NODES: usize = 64;

/// One sequence's part of a step: its cache, the tokens that follow what it holds, and which logits
/// it wants back.
pub struct SequenceStep<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// The graph of a step whose sequences each run one token, kept while the same caches take steps
/// with the same attention windows.
struct KeptStep {
    /// (cache id, attention window) per sequence, in order.
    key: Vec<(u64, usize)>,
    track_attention: bool,
    graph: ReusableGraph,
}

/// A Llama model's weights with the backend and compute memory its steps use.
pub struct TextEngine {
    model: LlamaModel,
    compute: ComputeBuffer,
    backend: Backend,
    kept: Option<KeptStep>,
    reuse_kept: bool,
    /// While profiling: every computed node's time, in order.
    profile: Option<Vec<NodeTime>>,
}

/// The typed inputs and output of one step's graph.
struct StepTensors<'c> {
    tokens: Tensor<'c>,
    inputs: BatchInputs<'c>,
    output_rows: Option<Tensor<'c>>,
    logits: Tensor<'c>,
    attention_mass: Option<Tensor<'c>>,
}

/// What a step's graph computes for one sequence: `n` rows over its first `n_kv` cells, logits per `which`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SequenceShape {
    n: usize,
    n_kv: usize,
    which: Logits,
}

impl SequenceShape {
    fn outputs(self) -> usize {
        match self.which {
            Logits::All => self.n,
            Logits::Last => 1,
        }
    }
}

impl TextEngine {
    pub fn new(model: LlamaModel, n_threads: usize) -> Result<Self> {
        Ok(TextEngine {
            model,
            compute: ComputeBuffer::new()?,
            backend: Backend::cpu(n_threads)?,
            kept: None,
            reuse_kept: true,
            profile: None,
        })
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The weights back, dropping the runtime state.
    pub fn into_model(self) -> LlamaModel {
        self.model
    }

    /// The layout of a cache of `capacity` cells for this model.
    pub fn cache_config(&self, capacity: usize, k_type: CacheType, v_type: CacheType) -> KvCacheConfig {
        let c = self.model.config();
        KvCacheConfig::uniform(c.n_layer, c.head_dim, c.n_head_kv, capacity, k_type, v_type)
    }

    /// A new empty cache for one sequence (quantized halves rotated, as by default).
    pub fn new_cache(&self, capacity: usize, k_type: CacheType, v_type: CacheType) -> Result<KvCache> {
        KvCache::with_rotation(self.cache_config(capacity, k_type, v_type), Rotation::default())
    }

    /// A cache of `config` (its shape must be this model's), rotated by default.
    pub fn new_cache_with(&self, config: KvCacheConfig) -> Result<KvCache> {
        let c = self.model().config();
        if (config.n_layer, config.head_dim, config.n_head_kv) != (c.n_layer, c.head_dim, c.n_head_kv) {
            return Err(Error::Input(format!(
                "a cache of shape {config:?} for a model of {} layers x {} x {}",
                c.n_layer, c.n_head_kv, c.head_dim
            )));
        }
        KvCache::with_rotation(config, Rotation::default())
    }

    /// Whether one-token steps reuse a kept graph (default) or build a graph per step.
    pub fn set_reuse_kept_graph(&mut self, reuse: bool) {
        self.reuse_kept = reuse;
        self.kept = None;
    }

    /// Drops the kept graph (after a change its key cannot see, such as the attention kernel).
    pub fn forget_kept_graph(&mut self) {
        self.kept = None;
    }

    /// Starts (or stops) timing every node of the following steps (collected until `take_profile`).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Vec::new);
    }

    pub fn take_profile(&mut self) -> Vec<NodeTime> {
        self.profile.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Bytes of the compute memory (grows to the largest step so far).
    pub fn compute_buffer_bytes(&self) -> usize {
        self.compute.size() + self.kept.as_ref().map_or(0, |k| k.graph.buffer_size())
    }

    /// Runs each sequence's tokens after what its cache holds, all in one graph: projections and
    /// MLPs over every row at once, attention per sequence over its own cache. Returns per sequence
    /// its logits (`[n][vocab]` for `All`, `[vocab]` for `Last`). On error no cache changes.
    /// `track_attention` (one sequence only) adds each cell's attention mass to its cache's scores.
    pub fn step(&mut self, sequences: &mut [SequenceStep<'_>], track_attention: bool) -> Result<Vec<Vec<f32>>> {
        if sequences.is_empty() {
            return Err(Error::EmptyInput("a step over no sequences"));
        }
        if track_attention && sequences.len() > 1 {
            return Err(Error::Input("attention tracking runs one sequence per step".into()));
        }
        let vocab = self.model.vocab_size();
        for seq in sequences.iter() {
            if seq.tokens.is_empty() {
                return Err(Error::EmptyInput("no tokens"));
            }
            if let Some(&id) = seq.tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::TokenOutOfRange { id, vocab });
            }
            let needed = seq.cache.len() + seq.tokens.len();
            if needed > seq.cache.capacity() {
                return Err(Error::CacheFull { needed, capacity: seq.cache.capacity() });
            }
        }
        let starts: Vec<usize> = sequences.iter().map(|s| s.cache.len()).collect();
        let result = self.step_appended(sequences, track_attention);
        if result.is_err() {
            for (seq, &start) in sequences.iter_mut().zip(&starts) {
                seq.cache.truncate(start);
            }
        }
        result
    }

    fn step_appended(&mut self, sequences: &mut [SequenceStep<'_>], track: bool) -> Result<Vec<Vec<f32>>> {
        let mut cells = Vec::with_capacity(sequences.len());
        for seq in sequences.iter_mut() {
            cells.push(seq.cache.append(seq.tokens.len())?);
        }
        // A one-token row attends over its cache's decode window whether or not the step is all decode
        // rows: the window's padding is masked, but the attention kernel splits its cells by the window,
        // so the same window gives the same sums as a step of that sequence alone.
        let one_token = |s: &SequenceStep<'_>| self.reuse_kept && s.tokens.len() == 1 && s.logits == Logits::Last;
        let decode = sequences.iter().all(one_token);
        let shapes: Vec<SequenceShape> = sequences
            .iter()
            .map(|s| SequenceShape {
                n: s.tokens.len(),
                n_kv: if one_token(s) { s.cache.decode_window() } else { s.cache.len() },
                which: s.logits,
            })
            .collect();
        let caches: Vec<&KvCache> = sequences.iter().map(|s| &*s.cache).collect();
        let tokens: Vec<u32> = sequences.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let ranges: Vec<(usize, usize)> = cells.iter().map(|r| (r.start, r.end)).collect();
        let (logits, mass) = if decode {
            self.run_kept(&caches, &shapes, &tokens, &ranges, track)?
        } else {
            self.run_fresh(&caches, &shapes, &tokens, &ranges, track)?
        };
        if let Some(mass) = mass {
            sequences[0].cache.add_scores(&mass);
        }
        let vocab = self.model.vocab_size();
        let mut per_sequence = Vec::with_capacity(shapes.len());
        let mut offset = 0;
        for shape in &shapes {
            let len = shape.outputs() * vocab;
            per_sequence.push(logits[offset..offset + len].to_vec());
            offset += len;
        }
        Ok(per_sequence)
    }

    /// Builds, allocates and computes a graph for this step alone.
    fn run_fresh(
        &mut self,
        caches: &[&KvCache],
        shapes: &[SequenceShape],
        tokens: &[u32],
        cells: &[(usize, usize)],
        track: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let max_nodes = self.max_nodes(caches.len());
        let ctx = self.compute.context(max_nodes + 16, max_nodes)?;
        let mut graph = ctx.new_graph(max_nodes)?;
        let step = build_step(&self.model, caches, &ctx, &mut graph, shapes, track)?;
        ctx.allocate(&graph)?;
        step.write_inputs(&self.model, caches, shapes, tokens, cells)?;
        match self.profile.as_mut() {
            Some(times) => times.extend(self.backend.profile(&graph)?),
            None => self.backend.compute(&graph)?,
        }
        step.outputs()
    }

    /// One token per sequence through the kept graph, rebuilt when the caches, their attention windows
    /// or their buffers change.
    fn run_kept(
        &mut self,
        caches: &[&KvCache],
        shapes: &[SequenceShape],
        tokens: &[u32],
        cells: &[(usize, usize)],
        track: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let key: Vec<(u64, usize)> = caches.iter().zip(shapes).map(|(c, s)| (c.id(), s.n_kv)).collect();
        let current = self.kept.as_ref().is_some_and(|k| k.key == key && k.track_attention == track && k.graph.is_current());
        if !current {
            self.kept = None;
            let max_nodes = self.max_nodes(caches.len());
            let graph = ReusableGraph::new(max_nodes + 16, max_nodes)?;
            let mut building = graph.context().new_graph(max_nodes)?;
            build_step(&self.model, caches, graph.context(), &mut building, shapes, track)?;
            graph.finish(building.seal())?;
            self.kept = Some(KeptStep { key, track_attention: track, graph });
        }
        let graph = &self.kept.as_ref().expect("set above").graph;
        let step = StepTensors::lookup(graph, caches, self.model.transformer.freq_factors().is_some(), shapes, track)?;
        step.write_inputs(&self.model, caches, shapes, tokens, cells)?;
        match self.profile.as_mut() {
            Some(times) => times.extend(graph.profile(&self.backend)?),
            None => graph.compute(&self.backend)?,
        }
        step.outputs()
    }

    fn max_nodes(&self, sequences: usize) -> usize {
        // Per sequence and block up to about 30 attention nodes more (column views, stores, cache views,
        // permutes, the two kernel nodes, a join, and 12 for a rotated cache).
        self.model.transformer.max_nodes() + PER_SEQUENCE_NODES * sequences * self.model.config().n_layer + 16
    }
}

/// Whether the last block must pick output rows (more than the very last row is wanted, or a row
/// other than the last).
fn needs_output_rows(shapes: &[SequenceShape]) -> bool {
    let total: usize = shapes.iter().map(|s| s.n).sum();
    let outputs: usize = shapes.iter().map(|s| s.outputs()).sum();
    shapes.len() > 1 && outputs < total
}

/// The rows of the step whose logits are wanted, in order.
fn output_row_indices(shapes: &[SequenceShape]) -> Vec<i32> {
    let mut rows = Vec::new();
    let mut first = 0;
    for s in shapes {
        match s.which {
            Logits::All => rows.extend((first..first + s.n).map(|r| r as i32)),
            Logits::Last => rows.push((first + s.n - 1) as i32),
        }
        first += s.n;
    }
    rows
}

/// The graph of one step over `caches[i]` with `shapes[i]`.
fn build_step<'c>(
    model: &'c LlamaModel,
    caches: &[&'c KvCache],
    ctx: &'c Context,
    graph: &mut Graph<'c>,
    shapes: &[SequenceShape],
    track: bool,
) -> Result<StepTensors<'c>> {
    let transformer = &model.transformer;
    let total: usize = shapes.iter().map(|s| s.n).sum();
    let tokens = ctx.new_tensor(DType::I32, &[total as i64])?.set_input().set_name("tokens");
    let parts: Vec<(usize, usize)> = shapes.iter().map(|s| (s.n, s.n_kv)).collect();
    let (inputs, sequences) = BatchInputs::new(ctx, transformer.freq_factor_input(ctx)?, caches, &parts)?;
    let output_rows = if needs_output_rows(shapes) {
        let n_out = output_row_indices(shapes).len() as i64;
        Some(ctx.new_tensor(DType::I32, &[n_out])?.set_input().set_name("output_rows"))
    } else {
        None
    };
    // The last block runs over every row when every row's logits are wanted, else over the picked
    // rows (`output_rows`) or, for one sequence, its last.
    let outputs: usize = shapes.iter().map(|s| s.outputs()).sum();
    let which = if outputs == total { Logits::All } else { Logits::Last };
    let x = ctx.get_rows(model.weights.get(model.token_embd), tokens)?;
    let mut scope =
        BuildScope::batched(ctx, graph, &model.weights, inputs.positions, inputs.freq_factors, sequences)?.tracking_attention(track);
    scope.output_rows = output_rows;
    let hidden = transformer.build(&mut scope, x, which)?;
    let logits = ctx.mul_mat(model.weights.get(model.output), hidden)?.set_name("logits").set_output();
    graph.expand(logits)?;
    let attention_mass = graph.find("attn_mass");
    Ok(StepTensors { tokens, inputs, output_rows, logits, attention_mass })
}

impl<'c> StepTensors<'c> {
    /// Finds the named inputs and outputs of a kept graph.
    fn lookup(
        graph: &'c ReusableGraph,
        caches: &[&KvCache],
        has_freq_factors: bool,
        shapes: &[SequenceShape],
        track: bool,
    ) -> Result<Self> {
        Ok(StepTensors {
            tokens: graph.tensor("tokens")?,
            inputs: BatchInputs::lookup(graph, caches, has_freq_factors)?,
            output_rows: if needs_output_rows(shapes) { Some(graph.tensor("output_rows")?) } else { None },
            logits: graph.tensor("logits")?,
            attention_mass: if track { Some(graph.tensor("attn_mass")?) } else { None },
        })
    }

    /// The computed logits and, when tracked, the attention mass.
    fn outputs(&self) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let mass = self.attention_mass.map(|t| t.read_f32()).transpose()?;
        Ok((self.logits.read_f32()?, mass))
    }

    /// Fills the inputs: the tokens, their positions, each sequence's cells and mask.
    fn write_inputs(
        &self,
        model: &LlamaModel,
        caches: &[&KvCache],
        shapes: &[SequenceShape],
        tokens: &[u32],
        cells: &[(usize, usize)],
    ) -> Result<()> {
        self.tokens.write_i32(&tokens.iter().map(|&t| t as i32).collect::<Vec<_>>())?;
        let ranges: Vec<std::ops::Range<usize>> = cells.iter().map(|&(start, end)| start..end).collect();
        self.inputs.write(model.transformer.freq_factors(), caches, &ranges)?;
        if let Some(t) = self.output_rows {
            t.write_i32(&output_row_indices(shapes))?;
        }
        Ok(())
    }
}
