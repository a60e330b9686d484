//! Flags several commands share: logging, cache types and layouts, memory budgets, sampling's top-k.
//! Definitions only (clap), so every command can use them without importing another.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use ccsm::kv_cache::Rotation;
use ccsm::CacheType;

/// `--sample-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SampleFormatArg {
    S16,
    F32,
}

impl From<SampleFormatArg> for ccsm::wav::SampleFormat {
    fn from(f: SampleFormatArg) -> Self {
        match f {
            SampleFormatArg::S16 => ccsm::wav::SampleFormat::S16,
            SampleFormatArg::F32 => ccsm::wav::SampleFormat::F32,
        }
    }
}

/// How per-layer types are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanMode {
    /// The planner picks each layer's K and V types from the sensitivity profile.
    Auto,
}

/// Which memory optimizer strategy a budget runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MemoryStrategyArg {
    /// By the budget ratio: resize, then q8_0, then q4_0 and prune (`seed` names it too).
    #[value(alias = "seed")]
    Escalate,
    /// The planner: per-layer types of least predicted KLD within the budget (needs a profile).
    Plan,
}

#[derive(Args, Clone, Debug, Default)]
pub struct KvLayoutArgs {
    /// Per-layer K/V types (text models): comma-separated LAYERS:TYPES, LAYERS = `i`, `i-j` or `*`
    /// (the rest), TYPES = `k/v` or one type for both; e.g. `0:q8_0,1-3:q5_1/q5_0,*:iq4_nl`.
    /// Overrides --kv-quant/--ctk/--ctv.
    #[arg(long, value_name = "SPEC", conflicts_with = "kv_plan")]
    pub kv_layout: Option<String>,

    /// `auto`: the planner picks per-layer types from a sensitivity profile (`ccsm-infer calibrate`)
    /// to fit --kv-bits or --max-memory-mb with the least predicted KL divergence.
    #[arg(long, value_name = "PLAN", value_enum)]
    pub kv_plan: Option<PlanMode>,

    /// The sensitivity profile for --kv-plan (default: the one stored in the model's metadata).
    #[arg(long, value_name = "FILE")]
    pub kv_profile: Option<PathBuf>,

    /// --kv-plan's budget as mean bits per cached element (q4_0 = 4.5, q8_0 = 8.5, f16 = 16), the
    /// recent window included.
    #[arg(long, value_name = "B")]
    pub kv_bits: Option<f64>,

    /// Text models: keep each query's newest N cells also in f16 (KIVI's residual window) and read
    /// older ones in the cache's type. Costs N f16 rows per layer and half, counted in every budget.
    /// Without it, --kv-plan auto --kv-bits chooses the window too (none, or one the profile measured).
    #[arg(long, value_name = "N")]
    pub kv_recent: Option<usize>,
}

/// Which tokens eviction keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrunePolicy {
    /// The first tokens and the most recent ones (StreamingLLM).
    SinkRecent,
    /// The first tokens and those that received the most attention so far (H2O).
    Attention,
}

#[derive(Args, Clone)]
pub struct LogArgs {
    /// More logs on stderr (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Only errors on stderr (no summary).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// The KV cache types: `--kv-quant` for both halves, `--ctk`/`--ctv` overriding one half.
#[derive(Args, Clone, Debug)]
pub struct CacheArgs {
    /// KV cache type for K and V: f32, f16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl, mxfp4 [default: f16; f32 for
    /// --kl-base]. K-quants (q4_K …) store 256-element blocks, which a 64-wide head cannot be cut from.
    #[arg(long, value_name = "TYPE")]
    pub kv_quant: Option<CacheType>,

    /// K cache type (overrides --kv-quant for K). llama.cpp spells it -ctk; clap needs --ctk.
    #[arg(long = "cache-type-k", visible_alias = "ctk", value_name = "TYPE")]
    pub cache_type_k: Option<CacheType>,

    /// V cache type (overrides --kv-quant for V). llama.cpp spells it -ctv; clap needs --ctv.
    #[arg(long = "cache-type-v", visible_alias = "ctv", value_name = "TYPE")]
    pub cache_type_v: Option<CacheType>,

    /// Store quantized K/V rows Hadamard-rotated per head (`quantized`: same bytes, far less error
    /// for 4-bit types), as computed (`off`), or all rows rotated, f16/f32 too (`all`, a check).
    #[arg(long, value_name = "WHEN", default_value = "quantized")]
    pub kv_rotation: Rotation,

    #[command(flatten)]
    pub layers: KvLayoutArgs,
}

impl CacheArgs {
    /// The K type, falling back to --kv-quant, then to `default`.
    pub fn k_type(&self, default: CacheType) -> CacheType {
        self.cache_type_k.or(self.kv_quant).unwrap_or(default)
    }

    /// The V type, falling back to --kv-quant, then to `default`.
    pub fn v_type(&self, default: CacheType) -> CacheType {
        self.cache_type_v.or(self.kv_quant).unwrap_or(default)
    }

    /// Sets the rotation on a freshly made model (rows convert only where it changes something).
    pub fn apply_rotation(&self, model: &mut impl ccsm::Model) -> anyhow::Result<()> {
        Ok(model.set_kv_rotation(self.kv_rotation)?)
    }
}

/// Keeping the KV caches within a memory budget.
#[derive(Args, Clone, Debug)]
pub struct MemoryArgs {
    /// Keep the KV caches within N MiB for the whole run: the optimizer resizes, quantizes (q8_0, then
    /// q4_0) and prunes as the budget demands, and a full cache evicts instead of failing.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_memory_mb: Option<u32>,

    /// Which tokens to keep when evicting: sink-recent (first tokens + most recent, StreamingLLM) or
    /// attention (most attention received so far, H2O; costs an extra score pass per layer).
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = PrunePolicy::SinkRecent)]
    pub prune_policy: PrunePolicy,

    /// Tokens at the start that eviction always keeps (attention sinks).
    #[arg(long, value_name = "S", default_value_t = 4)]
    pub keep_sinks: usize,

    /// How --max-memory-mb is met: `escalate` (resize, q8_0, q4_0 + prune by the budget ratio; also `seed`) or `plan`
    /// (the planner's per-layer types; text models, needs a profile) [default: plan with --kv-plan].
    #[arg(long, value_name = "STRATEGY", value_enum)]
    pub memory_strategy: Option<MemoryStrategyArg>,
}

impl MemoryArgs {
    pub fn policy(&self) -> ccsm::kv_cache::EvictionPolicy {
        use ccsm::kv_cache::EvictionPolicy;
        match self.prune_policy {
            PrunePolicy::Attention => EvictionPolicy::Attention { sinks: self.keep_sinks },
            PrunePolicy::SinkRecent => EvictionPolicy::SinkRecent { sinks: self.keep_sinks },
        }
    }
}

pub fn default_threads() -> u32 {
    std::thread::available_parallelism().map_or(2, |n| n.get() as u32)
}

/// A `--top-k` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopK {
    All,
    Count(usize),
}

impl TopK {
    /// The sampler's limit: `None` keeps every token.
    pub fn limit(self) -> Option<usize> {
        match self {
            TopK::All => None,
            TopK::Count(k) => Some(k),
        }
    }
}
