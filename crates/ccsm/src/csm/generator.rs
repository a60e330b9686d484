//! `CsmGenerator`: the CSM engine with one session, behind the `Model` trait (as `GGMLModel` is for
//! text): what the command line, the benches and the tests drive. Its steps are the engine's, a
//! batch of one.

use super::engine::{CsmEngine, FrameRequest, PrefillRequest, SessionCaches};
use super::model::CsmModel;
use super::prompt::{Frame, Row};
use super::session::{CsmSession, FrameTimings};
use crate::attention::AttentionChoice;
use crate::error::Result;
use crate::kv_cache::{EvictionPolicy, KvCache, Rotation};
use crate::memory::{self, ManagedCache, MemoryReport};
use crate::model::{keep_count, CacheReport, Model};
use crate::sampling::Sampler;
use crate::CacheRole;
use crate::CacheType;

/// Runtime settings of a CSM model: a text model's (`n_ctx` is the backbone's cells; the decoder's
/// cache takes the same types).
pub type CsmOptions = crate::ModelOptions;

/// A CSM model with one session, ready to generate.
pub struct CsmGenerator {
    engine: CsmEngine,
    session: CsmSession,
}

impl CsmGenerator {
    /// An engine with one session of `options`' context and types.
    pub fn new(model: CsmModel, options: CsmOptions) -> Result<Self> {
        options.check(Some(model.config().backbone.n_ctx_train))?;
        let engine = CsmEngine::new(model, options.n_threads, options.n_batch, (options.k_type, options.v_type))?;
        let session = engine.new_session(&SessionCaches { capacity: options.n_ctx, k_type: options.k_type, v_type: options.v_type })?;
        Ok(CsmGenerator { engine, session })
    }

    /// The weights.
    pub fn model(&self) -> &CsmModel {
        self.engine.model()
    }

    /// The engine and the session, to step them with the engine's functions (`speech_step`).
    pub fn parts_mut(&mut self) -> (&mut CsmEngine, &mut CsmSession) {
        (&mut self.engine, &mut self.session)
    }

    /// The engine back, for sessions of its own, dropping this one.
    pub fn into_engine(self) -> CsmEngine {
        self.engine
    }

    /// The weights back, dropping the runtime state.
    pub fn into_model(self) -> CsmModel {
        self.engine.into_model()
    }

    /// Which attention kernels the steps of both transformers run (auto by default).
    pub fn set_attention(&mut self, choice: AttentionChoice) {
        self.engine.set_attention(choice);
    }

    /// The session's backbone cache.
    pub fn backbone_cache(&self) -> &KvCache {
        self.session.backbone_cache()
    }

    /// The session's decoder cache.
    pub fn decoder_cache(&self) -> &KvCache {
        self.session.decoder_cache()
    }

    /// Where the session's time went since its last reset.
    pub fn timings(&self) -> FrameTimings {
        self.session.timings()
    }

    /// Whether backbone positions went past the model's trained context since the last reset.
    pub fn past_trained_context(&self) -> bool {
        self.session.past_trained_context()
    }

    /// Samples only codes below `limit` (see `CsmEngine::set_code_limit`).
    pub fn set_code_limit(&mut self, limit: Option<usize>) {
        self.engine.set_code_limit(limit);
    }

    /// Codebook-0 logits after the last backbone step.
    pub fn c0_logits(&self) -> Option<&[f32]> {
        self.session.c0_logits()
    }

    /// Runs `rows` through the backbone after what is cached (the prompt, in batches).
    pub fn prefill(&mut self, rows: &[Row]) -> Result<()> {
        self.engine.prefill(&mut [PrefillRequest { session: &mut self.session, rows }])
    }

    /// Samples one frame from the last backbone state. `None` means the model ended the speech (an
    /// all-zero frame, which is not emitted nor fed back). `trace`, when given, receives each
    /// codebook's logits.
    pub fn generate_frame(&mut self, sampler: &mut Sampler, trace: Option<&mut Vec<Vec<f32>>>) -> Result<Option<Frame>> {
        let mut request = [FrameRequest { session: &mut self.session, sampler, trace }];
        let mut frames = self.engine.step_frames(&mut request)?;
        Ok(frames.pop().flatten())
    }
}

impl Model for CsmGenerator {
    type Input = [Row];
    type Output = Vec<f32>;

    fn reset(&mut self) {
        self.session.reset();
    }

    /// Codebook-0 logits after `input` rows.
    fn forward(&mut self, input: &[Row]) -> Result<Vec<f32>> {
        self.prefill(input)?;
        Ok(self.c0_logits().map(<[f32]>::to_vec).unwrap_or_default())
    }

    fn kv_memory_usage(&self) -> usize {
        self.session.kv_bytes()
    }

    fn quantize_kv_cache(&mut self, k_type: CacheType, v_type: CacheType) -> Result<Vec<CacheReport>> {
        Ok(vec![
            CacheReport { cache: CacheRole::Backbone, report: self.session.backbone.quantize(k_type, v_type)? },
            CacheReport { cache: CacheRole::Decoder, report: self.session.decoder.quantize(k_type, v_type)? },
        ])
    }

    fn optimize_memory(&mut self, max_bytes: usize, policy: EvictionPolicy) -> Result<MemoryReport> {
        let caches = vec![
            ManagedCache { role: CacheRole::Backbone, cache: &mut self.session.backbone, resizable: true },
            ManagedCache { role: CacheRole::Decoder, cache: &mut self.session.decoder, resizable: false },
        ];
        memory::optimize(caches, max_bytes, policy)
    }

    fn prune_caches(&mut self, fraction: f64, policy: EvictionPolicy) -> Result<usize> {
        let keep = keep_count(self.session.backbone.len(), fraction)?;
        self.session.backbone.prune(keep, policy)
    }

    fn set_eviction(&mut self, policy: Option<EvictionPolicy>) {
        self.session.set_eviction(policy);
    }

    fn set_kv_rotation(&mut self, rotation: Rotation) -> Result<()> {
        self.session.backbone.set_rotation(rotation)?;
        self.session.decoder.set_rotation(rotation)?;
        Ok(())
    }
}
