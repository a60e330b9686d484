//! What every model of the engine offers (`Model`) and the types its interface speaks: which logits a
//! step returns, what happened to a cache, the runtime settings.

use crate::cache_role::CacheRole;
use crate::error::{Error, Result};
use crate::kv_cache::{EvictionPolicy, QuantizeReport, Rotation};
use crate::memory::MemoryReport;
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
    /// What a step takes (tokens, or CSM's rows).
    type Input: ?Sized;
    /// What a step returns (logits).
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

/// What happened to one of a model's caches.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct CacheReport {
    /// Which cache.
    pub cache: CacheRole,
    /// Its bytes before, after and at the peak of the conversion.
    pub report: QuantizeReport,
}

/// Runtime settings of a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelOptions {
    /// KV cache cells (the context size).
    pub n_ctx: usize,
    /// K cache type.
    pub k_type: CacheType,
    /// V cache type.
    pub v_type: CacheType,
    /// ggml threads (fewer for graphs too small to share).
    pub n_threads: usize,
    /// Most tokens evaluated in one graph; longer inputs are split.
    pub n_batch: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions { n_ctx: 2048, k_type: CacheType::F16, v_type: CacheType::F16, n_threads: 2, n_batch: 512 }
    }
}

impl ModelOptions {
    /// Refuses options no model can run: no cells, no rows per graph, or (with `n_ctx_train`) more
    /// cells than the model was trained for.
    pub fn check(&self, n_ctx_train: Option<usize>) -> Result<()> {
        if self.n_ctx == 0 {
            return Err(Error::Input("context size must be at least 1".into()));
        }
        if let Some(limit) = n_ctx_train.filter(|&l| self.n_ctx > l) {
            return Err(Error::ContextOutOfRange { requested: self.n_ctx, max: limit });
        }
        if self.n_batch == 0 {
            return Err(Error::Input("batch size must be at least 1".into()));
        }
        Ok(())
    }
}
