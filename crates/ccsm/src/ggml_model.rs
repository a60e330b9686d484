//! `GGMLModel`: a Llama text model with one session's state (its KV cache), behind the `Model` trait.

use ggml::NodeTime;

use crate::cache_role::CacheRole;
use crate::engine::{SequenceStep, TextEngine};
use crate::error::{Error, Result};
use crate::kv_cache::{EvictionPolicy, KvCache, KvLayout, QuantizeReport, Rotation};
use crate::kv_plan::{KvPlan, SensitivityProfile};
use crate::llama::LlamaModel;
use crate::memory::{self, make_room, ManagedCache, MemoryReport};
use crate::model::{keep_count, CacheReport, Logits, Model, ModelOptions};
use crate::trained_context::TrainedContext;
use crate::CacheType;

/// A Llama text model ready to run: the engine with one session's cache (the one-sequence case of
/// `engine::TextEngine`'s batched steps).
pub struct GGMLModel {
    engine: TextEngine,
    cache: KvCache,
    n_batch: usize,
    track_attention: bool,
    evict: Option<EvictionPolicy>,
    trained: TrainedContext,
}

impl GGMLModel {
    /// An engine with one cache of `options`' cells and types.
    pub fn new(model: LlamaModel, options: ModelOptions) -> Result<Self> {
        options.check(None)?;
        let trained = TrainedContext::new(model.config().n_ctx_train);
        let engine = TextEngine::new(model, options.n_threads)?;
        let cache = engine.new_cache(options.n_ctx, options.k_type, options.v_type)?;
        Ok(GGMLModel { engine, cache, n_batch: options.n_batch, track_attention: false, evict: None, trained })
    }

    /// The weights.
    pub fn model(&self) -> &LlamaModel {
        self.engine.model()
    }

    /// The weights back, dropping the runtime state (to run them again with other options).
    pub fn into_model(self) -> LlamaModel {
        self.engine.into_model()
    }

    /// The engine, to run other sequences beside this model's own.
    pub fn engine_mut(&mut self) -> &mut TextEngine {
        &mut self.engine
    }

    /// Resumes from a prompt cache file: the cache takes the longest start of `prompt` the file holds.
    pub fn resume_prompt(&mut self, file: &crate::prefix_cache::file::PromptFile, prompt: &[u32]) -> crate::prefix_cache::file::Resumed {
        self.cache.clear();
        file.resume(&mut self.cache, prompt)
    }

    /// Keeps the first `len` cached tokens and forgets the rest (the next token follows them).
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len.min(self.cache.len()));
    }

    /// Converts the cache, with its cached tokens, to per-layer types (`quantize_kv_cache` for one
    /// type per half).
    pub fn quantize_kv_layout(&mut self, layout: KvLayout) -> Result<QuantizeReport> {
        self.cache.quantize_layout(layout)
    }

    /// Fits the cache into `max_bytes` by the planner's per-layer types (`memory::optimize_planned`).
    pub fn optimize_memory_planned(
        &mut self,
        max_bytes: usize,
        policy: EvictionPolicy,
        profile: &SensitivityProfile,
    ) -> Result<MemoryReport> {
        memory::optimize_planned(
            ManagedCache { role: CacheRole::Text, cache: &mut self.cache, resizable: true },
            max_bytes,
            policy,
            profile,
        )
    }

    /// Gives the cache a plan's layout and capacity (evicting by `policy` if it holds more cells).
    pub fn apply_kv_plan(&mut self, plan: &KvPlan, policy: EvictionPolicy) -> Result<()> {
        memory::apply_plan(&mut self.cache, CacheRole::Text, plan, policy).map(|_| ())
    }

    /// The cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Keeps the newest `cells` cells also in f16 (`KvCache::set_recent`; 0 turns the window off).
    pub fn set_kv_recent(&mut self, cells: usize) -> Result<()> {
        self.cache.set_recent(cells)
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
        self.engine.set_profiling(on);
    }

    /// The node times collected since profiling started (empty when it is off).
    pub fn take_profile(&mut self) -> Vec<NodeTime> {
        self.engine.take_profile()
    }

    /// Which attention kernels the steps run (auto by default; one path to compare them).
    pub fn set_attention(&mut self, choice: crate::attention::AttentionChoice) {
        self.engine.set_attention(choice);
    }

    /// Whether single-token steps reuse one kept graph (default) or build a graph per token.
    pub fn set_reuse_decode_graph(&mut self, reuse: bool) {
        self.engine.set_reuse_kept_graph(reuse);
    }

    /// Bytes of the compute buffer (grows to the largest step so far).
    pub fn compute_buffer_bytes(&self) -> usize {
        self.engine.compute_buffer_bytes()
    }

    /// Runs `tokens` after the cached ones; returns logits per `which` (`[n][vocab]` for `All`).
    pub fn eval(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::EmptyInput("no tokens"));
        }
        let vocab = self.model().vocab_size();
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
            let wanted = if which == Logits::All || last { which } else { Logits::Last };
            let mut sequence = [SequenceStep { cache: &mut self.cache, tokens: chunk, logits: wanted }];
            let out = self.engine.step(&mut sequence, self.track_attention)?;
            if which == Logits::All || last {
                logits.extend(out.into_iter().flatten());
            }
        }
        self.trained.observe(self.cache.next_position(), "token");
        Ok(logits)
    }
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
        Ok(vec![CacheReport { cache: CacheRole::Text, report: self.cache.quantize(k_type, v_type)? }])
    }

    fn optimize_memory(&mut self, max_bytes: usize, policy: EvictionPolicy) -> Result<MemoryReport> {
        memory::optimize(vec![ManagedCache { role: CacheRole::Text, cache: &mut self.cache, resizable: true }], max_bytes, policy)
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
        self.cache.set_rotation(rotation)?;
        Ok(())
    }
}
