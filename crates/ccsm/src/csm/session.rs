//! One speech stream's state, apart from the weights: its backbone cache, its decoder cache (reset
//! every frame), what the last backbone step left, its eviction policy and its timings. The engine
//! steps any set of sessions at once; a server keeps one per request.

use serde::Serialize;

use crate::error::Result;
use crate::kv_cache::{EvictionPolicy, KvCache};
use crate::prefix_cache::{PrefixCache, PrefixHit};
use crate::trained_context::TrainedContext;

/// Where generation time went.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct FrameTimings {
    /// Prompt rows run.
    pub prompt_rows: usize,
    /// Time spent on them.
    pub prompt_seconds: f64,
    /// Frames made (end-of-speech frames not counted).
    pub frames: usize,
    /// Backbone steps over generated frames.
    pub backbone_seconds: f64,
    /// The decoder's steps (31 per frame for CSM-1B).
    pub decoder_seconds: f64,
    /// Time spent sampling codes.
    pub sampling_seconds: f64,
}

/// What the last backbone step left: the last row's final-normed hidden state and its codebook-0 logits.
#[derive(Clone, Debug)]
pub(super) struct BackboneState {
    pub hidden: Vec<f32>,
    pub c0_logits: Vec<f32>,
}

/// One speech stream's state (see the module docs).
pub struct CsmSession {
    pub(super) backbone: KvCache,
    pub(super) decoder: KvCache,
    pub(super) last: Option<BackboneState>,
    pub(super) trained: TrainedContext,
    pub(super) evict: Option<EvictionPolicy>,
    pub(super) timings: FrameTimings,
}

impl CsmSession {
    pub(super) fn new(backbone: KvCache, decoder: KvCache, n_ctx_train: usize) -> Self {
        CsmSession {
            backbone,
            decoder,
            last: None,
            trained: TrainedContext::new(n_ctx_train),
            evict: None,
            timings: FrameTimings::default(),
        }
    }

    /// Exact bytes of the session's caches (backbone and decoder).
    pub fn kv_bytes(&self) -> usize {
        self.backbone.memory_usage() + self.decoder.memory_usage()
    }

    /// Where the session's time went.
    pub fn timings(&self) -> FrameTimings {
        self.timings
    }

    /// Whether a backbone step has run (the session can make frames).
    pub fn is_prefilled(&self) -> bool {
        self.last.is_some()
    }

    /// The backbone cache (prompt rows and frames).
    pub fn backbone_cache(&self) -> &KvCache {
        &self.backbone
    }

    /// The decoder cache (one frame's codebooks, reset every frame).
    pub fn decoder_cache(&self) -> &KvCache {
        &self.decoder
    }

    /// Codebook-0 logits after the last backbone step.
    pub fn c0_logits(&self) -> Option<&[f32]> {
        self.last.as_ref().map(|s| s.c0_logits.as_slice())
    }

    /// Whether backbone positions went past the model's trained context since the last reset (only
    /// possible with eviction; warned once on the `ccsm` log).
    pub fn past_trained_context(&self) -> bool {
        self.trained.passed()
    }

    /// Makes room by evicting backbone cells with `policy` when a step would not fit (None: a full
    /// cache is an error).
    pub fn set_eviction(&mut self, policy: Option<EvictionPolicy>) {
        self.evict = policy;
    }

    /// Whether the session's steps sum the attention each cell receives (for the attention policy).
    pub(super) fn tracks_attention(&self) -> bool {
        self.evict.is_some_and(EvictionPolicy::tracks_attention)
    }

    /// Starts the session over from a cached prefix of its prompt (`hit`, from `prefixes.longest`):
    /// the backbone holds the prefix's rows, and prefilling the rest of the prompt makes it ready.
    pub fn start_from_prefix(&mut self, prefixes: &mut PrefixCache, hit: PrefixHit) -> Result<()> {
        self.reset();
        prefixes.restore(hit, &mut self.backbone)
    }

    /// Empties both caches and forgets the last step and the timings.
    pub fn reset(&mut self) {
        self.trained.reset();
        self.backbone.clear();
        self.decoder.clear();
        self.last = None;
        self.timings = FrameTimings::default();
    }
}
