//! `GGMLModel`: a Llama text model with its mutable state (KV cache, compute buffer, backend),
//! behind the `Model` trait.

use std::ops::Range;

use ggml::{Backend, ComputeBuffer, Context, DType, Graph, NodeTime, ReusableGraph, Tensor};

use crate::attention::{BuildScope, StepInputs};
use crate::error::{Error, Result};
use crate::kv_cache::{EvictionPolicy, KvCache, KvCacheConfig, QuantizeReport, Rotation};
use crate::llama::LlamaModel;
use crate::memory::{self, make_room, ManagedCache, MemoryReport};
use crate::CacheType;

/// Which positions of a step return logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's, `[n_tokens][vocab]` (perplexity, tests).
    All,
}

/// The interface every model of the engine offers.
pub trait Model {
    type Input: ?Sized;
    type Output;

    /// Forgets all cached state; the next input starts at position 0.
    fn reset(&mut self);

    /// Runs the next input after everything cached.
    fn forward(&mut self, input: &Self::Input) -> Result<Self::Output>;

    /// Exact bytes of all KV caches.
    fn kv_memory_usage(&self) -> usize;

    /// Converts every KV cache, with all its cached tokens, to these types; generation continues
    /// from the same history.
    fn quantize_kv_cache(&mut self, k_type: CacheType, v_type: CacheType) -> Result<Vec<CacheReport>>;

    /// Fits the KV caches into `max_bytes` by the seed's strategy (see `memory`).
    fn optimize_memory(&mut self, max_bytes: usize, policy: EvictionPolicy) -> Result<MemoryReport>;

    /// Keeps `fraction` (0..=1) of the cached tokens of the persistent cache, chosen by `policy`;
    /// returns how many were evicted.
    fn prune_caches(&mut self, fraction: f64, policy: EvictionPolicy) -> Result<usize>;

    /// When the cache is full, evict by `policy` instead of failing (`None`: fail).
    fn set_eviction(&mut self, policy: Option<EvictionPolicy>);

    /// Which cache rows are stored Hadamard-rotated (default: the quantized halves); rows already
    /// cached are converted.
    fn set_kv_rotation(&mut self, rotation: Rotation) -> Result<()>;
}

/// The number of cells `fraction` of `len` keeps.
pub(crate) fn keep_count(len: usize, fraction: f64) -> Result<usize> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(Error::Input(format!("prune fraction {fraction} must be within 0..=1")));
    }
    Ok((len as f64 * fraction).round() as usize)
}

/// Notices when positions pass the context a model was trained for. Only a memory budget lets that
/// happen (full caches evict instead of failing); generation goes on, with one warning per run, since
/// RoPE positions beyond the trained range may degrade the output.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TrainedContext {
    limit: usize,
    passed: bool,
}

impl TrainedContext {
    pub(crate) fn new(limit: usize) -> Self {
        TrainedContext { limit, passed: false }
    }

    /// Records the next position of a cache; warns the first time it passes the limit.
    pub(crate) fn observe(&mut self, next_position: i32, what: &str) {
        if !self.passed && next_position as usize > self.limit {
            self.passed = true;
            tracing::warn!(
                "{what} positions passed the model's trained context of {} (the memory budget evicts instead of stopping); output may degrade from here",
                self.limit
            );
        }
    }

    pub(crate) fn passed(&self) -> bool {
        self.passed
    }

    pub(crate) fn reset(&mut self) {
        self.passed = false;
    }
}

/// What happened to one of a model's caches.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct CacheReport {
    /// "text" for a Llama model; "backbone" or "decoder" for CSM.
    pub cache: &'static str,
    pub report: QuantizeReport,
}

/// Runtime settings of a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelOptions {
    /// KV cache cells (the context size).
    pub n_ctx: usize,
    pub k_type: CacheType,
    pub v_type: CacheType,
    pub n_threads: usize,
    /// Most tokens evaluated in one graph; longer inputs are split.
    pub n_batch: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions { n_ctx: 2048, k_type: CacheType::F16, v_type: CacheType::F16, n_threads: 2, n_batch: 512 }
    }
}

/// A Llama text model ready to run.
pub struct GGMLModel {
    model: LlamaModel,
    cache: KvCache,
    compute: ComputeBuffer,
    backend: Backend,
    n_batch: usize,
    /// The single-token step graph, kept across decode steps, with its attention window and
    /// whether it tracks attention.
    decode_graph: Option<(usize, bool, ReusableGraph)>,
    reuse_decode_graph: bool,
    track_attention: bool,
    evict: Option<EvictionPolicy>,
    trained: TrainedContext,
    /// While profiling: every computed node's time, in order.
    profile: Option<Vec<NodeTime>>,
}

impl GGMLModel {
    pub fn new(model: LlamaModel, options: ModelOptions) -> Result<Self> {
        let c = model.config();
        if options.n_ctx == 0 {
            return Err(Error::Input("context size must be at least 1".into()));
        }
        if options.n_batch == 0 {
            return Err(Error::Input("batch size must be at least 1".into()));
        }
        let cache = KvCache::with_rotation(
            KvCacheConfig {
                n_layer: c.n_layer,
                head_dim: c.head_dim,
                n_head_kv: c.n_head_kv,
                capacity: options.n_ctx,
                k_type: options.k_type,
                v_type: options.v_type,
            },
            Rotation::default(),
        )?;
        let trained = TrainedContext::new(c.n_ctx_train);
        Ok(GGMLModel {
            model,
            cache,
            compute: ComputeBuffer::new()?,
            backend: Backend::cpu(options.n_threads)?,
            n_batch: options.n_batch,
            decode_graph: None,
            reuse_decode_graph: true,
            track_attention: false,
            evict: None,
            trained,
            profile: None,
        })
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The weights back, dropping the runtime state (to run them again with other options).
    pub fn into_model(self) -> LlamaModel {
        self.model
    }

    /// Keeps the first `len` cached tokens and forgets the rest (the next token follows them).
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len.min(self.cache.len()));
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Computes, per cached cell, the attention mass it receives (for the attention eviction policy).
    /// Costs one extra score computation per layer while on.
    pub fn set_track_attention(&mut self, on: bool) {
        self.track_attention = on;
    }

    /// Whether positions went past the model's trained context since the last reset (only possible
    /// with eviction; warned once on the `ccsm` log).
    pub fn past_trained_context(&self) -> bool {
        self.trained.passed()
    }

    /// Whether full caches evict instead of failing.
    pub fn evicts(&self) -> bool {
        self.evict.is_some()
    }

    /// Starts (or, with false, stops) timing every graph node of the following steps; the times
    /// are collected until `take_profile`. Profiled steps run one node at a time (slower).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Vec::new);
    }

    /// The node times collected since profiling started (empty when it is off).
    pub fn take_profile(&mut self) -> Vec<NodeTime> {
        self.profile.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Which attention kernels the steps run (auto by default; one path to compare them).
    pub fn set_attention(&mut self, choice: crate::attention::AttentionChoice) {
        self.cache.set_attention(choice);
        self.decode_graph = None;
    }

    /// Whether single-token steps reuse one kept graph (default) or build a graph per token.
    pub fn set_reuse_decode_graph(&mut self, reuse: bool) {
        self.reuse_decode_graph = reuse;
        self.decode_graph = None;
    }

    /// Bytes of the compute buffer (grows to the largest step so far).
    pub fn compute_buffer_bytes(&self) -> usize {
        self.compute.size() + self.decode_graph.as_ref().map_or(0, |(_, _, g)| g.buffer_size())
    }

    /// Runs `tokens` after the cached ones; returns logits per `which` (`[n][vocab]` for `All`).
    pub fn eval(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::EmptyInput("no tokens"));
        }
        let vocab = self.model.vocab_size();
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::TokenOutOfRange { id, vocab });
        }
        if self.evict.is_none() && self.cache.len() + tokens.len() > self.cache.capacity() {
            return Err(Error::CacheFull { needed: self.cache.len() + tokens.len(), capacity: self.cache.capacity() });
        }
        // With eviction, steps stay within a quarter of the capacity so room can always be made.
        let step = match self.evict {
            Some(_) => self.n_batch.min((self.cache.capacity() / 4).max(1)),
            None => self.n_batch,
        };
        let mut logits = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(step).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            if let Some(policy) = self.evict {
                make_room(&mut self.cache, chunk.len(), policy)?;
            }
            let last = i + 1 == chunks.len();
            let out = self.eval_chunk(chunk, if which == Logits::All || last { which } else { Logits::Last })?;
            if which == Logits::All || last {
                logits.extend(out);
            }
        }
        self.trained.observe(self.cache.next_position(), "token");
        Ok(logits)
    }

    fn eval_chunk(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let start = self.cache.len();
        let cells = self.cache.append(tokens.len())?;
        let result = if tokens.len() == 1 && which == Logits::Last && self.reuse_decode_graph {
            self.decode_step(tokens[0], cells)
        } else {
            self.compute_step(tokens, cells, which)
        };
        if result.is_err() {
            self.cache.truncate(start);
        }
        result
    }

    /// Builds, allocates and computes one step's graph over cells already appended to the cache.
    fn compute_step(&mut self, tokens: &[u32], cells: Range<usize>, which: Logits) -> Result<Vec<f32>> {
        let (model, cache) = (&self.model, &self.cache);
        let max_nodes = model.transformer.max_nodes();
        let ctx = self.compute.context(max_nodes + 16, max_nodes)?;
        let mut graph = ctx.new_graph(max_nodes)?;
        let track = self.track_attention;
        let shape = StepShape { n: tokens.len(), n_kv: cache.len(), which, track_attention: track };
        let step = build_step(model, cache, &ctx, &mut graph, shape)?;
        ctx.allocate(&graph)?;
        step.write_inputs(model, cache, tokens, cells)?;
        match self.profile.as_mut() {
            Some(times) => times.extend(self.backend.profile(&graph)?),
            None => self.backend.compute(&graph)?,
        }
        let mass = if track {
            Some(
                graph
                    .find("attn_mass")
                    .ok_or(Error::Invariant("the step tracks attention but its graph has no attn_mass".into()))?
                    .read_f32()?,
            )
        } else {
            None
        };
        let logits = step.logits.read_f32()?;
        if let Some(mass) = mass {
            drop(ctx);
            self.cache.add_scores(&mass);
        }
        Ok(logits)
    }

    /// One token through the kept decode graph, rebuilt only when the attention window grows or
    /// the cache's buffers change.
    fn decode_step(&mut self, token: u32, cells: Range<usize>) -> Result<Vec<f32>> {
        let n_kv = self.cache.decode_window();
        let track = self.track_attention;
        let kept = matches!(&self.decode_graph, Some((window, tracked, g)) if *window == n_kv && *tracked == track && g.is_current());
        if !kept {
            self.decode_graph = None;
            let max_nodes = self.model.transformer.max_nodes();
            let graph = ReusableGraph::new(max_nodes + 16, max_nodes)?;
            let mut building = graph.context().new_graph(max_nodes)?;
            let shape = StepShape { n: 1, n_kv, which: Logits::Last, track_attention: track };
            build_step(&self.model, &self.cache, graph.context(), &mut building, shape)?;
            let sealed = building.seal();
            graph.finish(sealed)?;
            self.decode_graph = Some((n_kv, track, graph));
        }
        let (_, _, graph) = self.decode_graph.as_ref().expect("set above");
        let step = StepTensors::lookup(graph, self.model.transformer.freq_factors().is_some())?;
        step.write_inputs(&self.model, &self.cache, &[token], cells)?;
        match self.profile.as_mut() {
            Some(times) => times.extend(graph.profile(&self.backend)?),
            None => graph.compute(&self.backend)?,
        }
        let logits = step.logits.read_f32()?;
        if track {
            let mass = graph.tensor("attn_mass")?.read_f32()?;
            self.cache.add_scores(&mass);
        }
        Ok(logits)
    }
}

/// The input and output tensors of one step's graph.
struct StepTensors<'c> {
    tokens: Tensor<'c>,
    inputs: StepInputs<'c>,
    logits: Tensor<'c>,
}

impl<'c> StepTensors<'c> {
    /// Finds the named inputs and outputs of a kept graph.
    fn lookup(graph: &'c ReusableGraph, has_freq_factors: bool) -> Result<Self> {
        Ok(StepTensors {
            tokens: graph.tensor("tokens")?,
            inputs: StepInputs {
                positions: graph.tensor("positions")?,
                cells: graph.tensor("cells")?,
                mask: graph.tensor("mask")?,
                freq_factors: if has_freq_factors { Some(graph.tensor("rope_freq_factors")?) } else { None },
            },
            logits: graph.tensor("logits")?,
        })
    }

    /// Fills the inputs for `tokens` stored at `cells`.
    fn write_inputs(&self, model: &LlamaModel, cache: &KvCache, tokens: &[u32], cells: Range<usize>) -> Result<()> {
        let positions = &cache.positions()[cells.clone()];
        self.tokens.write_i32(&tokens.iter().map(|&t| t as i32).collect::<Vec<_>>())?;
        self.inputs.positions.write_i32(positions)?;
        self.inputs.cells.write_i64(&KvCache::cell_indices(cells))?;
        self.inputs.mask.write_f32(&cache.attention_mask(positions, self.inputs.mask.ne(0) as usize))?;
        if let (Some(t), Some(f)) = (self.inputs.freq_factors, model.transformer.freq_factors()) {
            t.write_f32(f)?;
        }
        Ok(())
    }
}

/// What one step's graph computes: `n` new tokens attending over the first `n_kv` cache cells.
#[derive(Clone, Copy)]
struct StepShape {
    n: usize,
    n_kv: usize,
    which: Logits,
    track_attention: bool,
}

/// The graph of one step.
fn build_step<'c>(
    model: &'c LlamaModel,
    cache: &'c KvCache,
    ctx: &'c Context,
    graph: &mut Graph<'c>,
    shape: StepShape,
) -> Result<StepTensors<'c>> {
    let StepShape { n, n_kv, which, track_attention } = shape;
    let transformer = &model.transformer;
    let n = n as i64;
    let tokens = ctx.new_tensor(DType::I32, &[n])?.set_input().set_name("tokens");
    let inputs = StepInputs {
        positions: ctx.new_tensor(DType::I32, &[n])?.set_input().set_name("positions"),
        cells: ctx.new_tensor(DType::I64, &[n])?.set_input().set_name("cells"),
        mask: ctx.new_tensor(DType::F16, &[n_kv as i64, n])?.set_input().set_name("mask"),
        freq_factors: transformer.freq_factor_input(ctx)?,
    };
    let x = ctx.get_rows(model.weights.get(model.token_embd), tokens)?;
    let mut scope = BuildScope::new(ctx, graph, &model.weights, cache, inputs).tracking_attention(track_attention);
    let hidden = transformer.build(&mut scope, x, which)?;
    let logits = ctx.mul_mat(model.weights.get(model.output), hidden)?.set_name("logits").set_output();
    graph.expand(logits)?;
    Ok(StepTensors { tokens, inputs, logits })
}

impl Model for GGMLModel {
    type Input = [u32];
    type Output = Vec<f32>;

    fn reset(&mut self) {
        self.cache.clear();
        self.trained.reset();
    }

    /// Logits of the last token of `input`.
    fn forward(&mut self, input: &[u32]) -> Result<Vec<f32>> {
        self.eval(input, Logits::Last)
    }

    fn kv_memory_usage(&self) -> usize {
        self.cache.memory_usage()
    }

    fn quantize_kv_cache(&mut self, k_type: CacheType, v_type: CacheType) -> Result<Vec<CacheReport>> {
        // The kept decode graph reads the old buffers; drop it before they are replaced.
        self.decode_graph = None;
        Ok(vec![CacheReport { cache: "text", report: self.cache.quantize(k_type, v_type)? }])
    }

    fn optimize_memory(&mut self, max_bytes: usize, policy: EvictionPolicy) -> Result<MemoryReport> {
        self.decode_graph = None;
        memory::optimize(vec![ManagedCache { name: "text", cache: &mut self.cache, resizable: true }], max_bytes, policy)
    }

    fn prune_caches(&mut self, fraction: f64, policy: EvictionPolicy) -> Result<usize> {
        let keep = keep_count(self.cache.len(), fraction)?;
        self.cache.prune(keep, policy)
    }

    fn set_eviction(&mut self, policy: Option<EvictionPolicy>) {
        self.evict = policy;
        self.track_attention = policy.is_some_and(EvictionPolicy::tracks_attention);
    }

    fn set_kv_rotation(&mut self, rotation: Rotation) -> Result<()> {
        self.decode_graph = None;
        self.cache.set_rotation(rotation)?;
        Ok(())
    }
}
