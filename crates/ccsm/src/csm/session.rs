//! Speech sessions: one stream's state apart from the weights, and frames for many sessions at once.
//! A batched frame runs each of the decoder's steps as one graph over every session (its rows attend
//! over its own decoder cache), then one backbone step over every session's new frame, so the weights
//! are read once per step for all sessions: on a memory-bound CPU, concurrency is nearly free.

use std::time::Instant;

use ggml::{Context, DType, Graph, ReusableGraph, Tensor};

use super::generator::{row_inputs, CsmGenerator, FrameTimings};
use super::model::CsmModel;
use super::prompt::{Frame, Row};
use crate::attention::{BatchInputs, BuildScope};
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, KvCacheConfig, Rotation};
use crate::model::TrainedContext;
use crate::sampling::Sampler;
use crate::{CacheType, Logits};

/// One speech stream's state (its backbone cache, its decoder cache and what the last step left),
/// apart from the weights: a server keeps one per session, swaps it into the generator for one
/// session's steps, or runs many at once with `generate_frames`.
pub struct CsmSession {
    pub(super) backbone_cache: KvCache,
    pub(super) backbone_step: Option<(usize, bool, ReusableGraph)>,
    pub(super) decoder_cache: KvCache,
    pub(super) last: Option<(Vec<f32>, Vec<f32>)>,
    pub(super) trained: TrainedContext,
    pub(super) timings: FrameTimings,
}

impl CsmSession {
    /// Exact bytes of the session's caches (backbone and decoder).
    pub fn kv_bytes(&self) -> usize {
        self.backbone_cache.memory_usage() + self.decoder_cache.memory_usage()
    }

    pub fn timings(&self) -> FrameTimings {
        self.timings
    }

    /// Whether a backbone step has run (the session can make frames).
    pub fn is_prefilled(&self) -> bool {
        self.last.is_some()
    }
}

/// One session's part of a batched frame.
pub struct FrameRequest<'a> {
    pub session: &'a mut CsmSession,
    pub sampler: &'a mut Sampler,
}

impl CsmGenerator {
    /// Bytes of a session's caches: a backbone of `capacity` cells of these types, and a decoder cache
    /// of the generator's own layout.
    pub fn session_bytes(&self, capacity: usize, k_type: CacheType, v_type: CacheType) -> Result<usize> {
        let b = &self.model.config.backbone;
        let backbone = KvCacheConfig::uniform(b.n_layer, b.head_dim, b.n_head_kv, capacity, k_type, v_type);
        Ok(backbone.bytes()? + self.decoder_cache.config().bytes()?)
    }

    /// A new empty session with a backbone cache of `capacity` cells of these types, and a decoder cache
    /// laid out as the generator's (so batched frames round as one-at-a-time frames do).
    pub fn new_session(&self, capacity: usize, k_type: CacheType, v_type: CacheType) -> Result<CsmSession> {
        let b = &self.model.config.backbone;
        if capacity == 0 || capacity > b.n_ctx_train {
            return Err(Error::Input(format!("context {capacity} must be between 1 and the model's {}", b.n_ctx_train)));
        }
        let config = KvCacheConfig::uniform(b.n_layer, b.head_dim, b.n_head_kv, capacity, k_type, v_type);
        let mut backbone_cache = KvCache::with_rotation(config, Rotation::default())?;
        backbone_cache.set_attention(self.backbone_cache.attention());
        let mut decoder_cache = KvCache::with_rotation(self.decoder_cache.config().clone(), self.decoder_cache.rotation())?;
        decoder_cache.set_attention(self.decoder_cache.attention());
        Ok(CsmSession {
            backbone_cache,
            backbone_step: None,
            decoder_cache,
            last: None,
            trained: TrainedContext::new(b.n_ctx_train),
            timings: FrameTimings::default(),
        })
    }

    /// Exchanges the generator's stream state with `session`'s: swap in, run the session's steps
    /// (`prefill`, `generate_frame`), swap back. Kept graphs travel with their caches.
    pub fn swap_session(&mut self, session: &mut CsmSession) {
        std::mem::swap(&mut self.backbone_cache, &mut session.backbone_cache);
        std::mem::swap(&mut self.backbone_step, &mut session.backbone_step);
        std::mem::swap(&mut self.last, &mut session.last);
        std::mem::swap(&mut self.trained, &mut session.trained);
        std::mem::swap(&mut self.timings, &mut session.timings);
        // The decoder cache is reset every frame: one-at-a-time frames use the generator's own (its kept
        // decoder graphs read it); the session's serves `generate_frames`.
    }

    /// The next frame of every session (each prefilled), in one graph per decoder step and one backbone
    /// step for all: what each session's `generate_frame` would give, sampled by its own sampler. `None`
    /// for a session whose model ended the speech (its frame is not fed back).
    pub fn generate_frames(&mut self, requests: &mut [FrameRequest<'_>]) -> Result<Vec<Option<Frame>>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.model.config.clone();
        let limit = self.code_limit.unwrap_or(c.audio_vocab).min(c.audio_vocab);
        let mut frames = Vec::with_capacity(requests.len());
        let mut hidden = Vec::with_capacity(requests.len());
        for r in requests.iter_mut() {
            let (h, c0) = r
                .session
                .last
                .clone()
                .ok_or_else(|| Error::Input("generate_frames before a session's backbone step (prefill it first)".into()))?;
            frames.push(vec![r.sampler.sample(&c0[..limit])?]);
            hidden.push(h);
            r.session.decoder_cache.clear();
        }
        let started = Instant::now();
        for s in 0..c.n_codebooks - 1 {
            let codes: Vec<u32> = frames.iter().map(|f| f[s]).collect();
            let logits = self.decoder_step_batched(requests, s, &hidden, &codes)?;
            for ((frame, r), logits) in frames.iter_mut().zip(requests.iter_mut()).zip(logits.chunks(c.audio_vocab)) {
                frame.push(r.sampler.sample(&logits[..limit])?);
            }
        }
        let decoder_seconds = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let speaking: Vec<usize> = (0..frames.len()).filter(|&i| frames[i].iter().any(|&code| code != 0)).collect();
        if !speaking.is_empty() {
            self.backbone_step_batched(requests, &speaking, &frames)?;
        }
        let backbone_seconds = started.elapsed().as_secs_f64();
        let n = requests.len() as f64;
        for (i, r) in requests.iter_mut().enumerate() {
            let t = &mut r.session.timings;
            t.decoder_seconds += decoder_seconds / n;
            if speaking.contains(&i) {
                t.backbone_seconds += backbone_seconds / speaking.len() as f64;
                t.frames += 1;
            }
        }
        Ok(frames.into_iter().enumerate().map(|(i, f)| speaking.contains(&i).then_some(f)).collect())
    }

    /// Decoder step `s` for every session: logits of codebook s + 1, `[audio_vocab]` per session in order.
    fn decoder_step_batched(
        &mut self,
        requests: &mut [FrameRequest<'_>],
        s: usize,
        hidden: &[Vec<f32>],
        codes: &[u32],
    ) -> Result<Vec<f32>> {
        let rows = if s == 0 { 2 } else { 1 };
        let mut cells = Vec::with_capacity(requests.len());
        for r in requests.iter_mut() {
            cells.push(r.session.decoder_cache.append(rows)?);
        }
        let caches: Vec<&KvCache> = requests.iter().map(|r| &r.session.decoder_cache).collect();
        let parts: Vec<(usize, usize)> = caches.iter().map(|c| (rows, c.capacity())).collect();
        let model = &self.model;
        let max_nodes = model.decoder.max_nodes() + crate::engine::PER_SEQUENCE_NODES * caches.len() * model.config.decoder.n_layer + 64;
        let ctx = self.compute.context(max_nodes + 16, max_nodes)?;
        let mut graph = ctx.new_graph(max_nodes)?;
        let step = build_decoder_batched(model, &caches, &ctx, &mut graph, s, &parts)?;
        ctx.allocate(&graph)?;
        let offset = (s * model.config.audio_vocab) as u32;
        step.codes.write_i32(&codes.iter().map(|&c| (c + offset) as i32).collect::<Vec<_>>())?;
        if let Some(h) = step.hidden {
            h.write_f32(&hidden.concat())?;
        }
        if let Some(t) = step.output_rows {
            t.write_i32(&(0..caches.len() as i32).map(|i| 2 * i + 1).collect::<Vec<_>>())?;
        }
        step.inputs.write(model.decoder.freq_factors(), &caches, &cells)?;
        self.backend.compute(&graph)?;
        Ok(step.out.read_f32()?)
    }

    /// One backbone step over the frames of the sessions in `speaking` (one row each).
    fn backbone_step_batched(&mut self, requests: &mut [FrameRequest<'_>], speaking: &[usize], frames: &[Frame]) -> Result<()> {
        let starts: Vec<usize> = speaking.iter().map(|&i| requests[i].session.backbone_cache.len()).collect();
        let result = self.backbone_rows_batched(requests, speaking, frames);
        if result.is_err() {
            for (&i, &start) in speaking.iter().zip(&starts) {
                requests[i].session.backbone_cache.truncate(start);
            }
        }
        result
    }

    fn backbone_rows_batched(&mut self, requests: &mut [FrameRequest<'_>], speaking: &[usize], frames: &[Frame]) -> Result<()> {
        let mut cells = Vec::with_capacity(speaking.len());
        for &i in speaking {
            cells.push(requests[i].session.backbone_cache.append(1)?);
        }
        let model = &self.model;
        let c = &model.config;
        let rows: Vec<Row> = speaking.iter().map(|&i| Row::Audio(frames[i].clone())).collect();
        let (h, c0) = {
            let caches: Vec<&KvCache> = speaking.iter().map(|&i| &requests[i].session.backbone_cache).collect();
            let parts: Vec<(usize, usize)> = caches.iter().map(|c| (1, c.decode_window())).collect();
            let max_nodes = model.backbone.max_nodes() + crate::engine::PER_SEQUENCE_NODES * caches.len() * c.backbone.n_layer + 64;
            let ctx = self.compute.context(max_nodes + 16, max_nodes)?;
            let mut graph = ctx.new_graph(max_nodes)?;
            let step = build_backbone_batched(model, &caches, &ctx, &mut graph, &parts)?;
            ctx.allocate(&graph)?;
            let (text, text_mask, audio, audio_mask) = row_inputs(&rows, c.n_codebooks, c.audio_vocab);
            let [text_t, text_mask_t, audio_t, audio_mask_t] = step.embeddings;
            text_t.write_i32(&text)?;
            text_mask_t.write_f32(&text_mask)?;
            audio_t.write_i32(&audio)?;
            audio_mask_t.write_f32(&audio_mask)?;
            step.inputs.write(model.backbone.freq_factors(), &caches, &cells)?;
            self.backend.compute(&graph)?;
            (step.hidden.read_f32()?, step.logits.read_f32()?)
        };
        let (d, v) = (c.backbone.n_embd, c.audio_vocab);
        for (k, &i) in speaking.iter().enumerate() {
            let session = &mut *requests[i].session;
            session.last = Some((h[k * d..(k + 1) * d].to_vec(), c0[k * v..(k + 1) * v].to_vec()));
            session.trained.observe(session.backbone_cache.next_position(), "backbone");
        }
        Ok(())
    }
}

struct DecoderStep<'c> {
    codes: Tensor<'c>,
    hidden: Option<Tensor<'c>>,
    /// The rows whose output is wanted, at step 0 of several sessions: each session's second.
    output_rows: Option<Tensor<'c>>,
    inputs: BatchInputs<'c>,
    out: Tensor<'c>,
}

/// Decoder step `s` over every session (as `build_decoder_step` for one): s = 0 takes each session's
/// [projection(h), projection(audio(c0))], s ≥ 1 one projected audio embedding each.
fn build_decoder_batched<'c>(
    model: &'c CsmModel,
    caches: &[&'c KvCache],
    ctx: &'c Context,
    graph: &mut Graph<'c>,
    s: usize,
    parts: &[(usize, usize)],
) -> Result<DecoderStep<'c>> {
    let w = |id| model.weights.get(id);
    let n_seq = caches.len() as i64;
    let codes = ctx.new_tensor(DType::I32, &[n_seq])?.set_input();
    let audio = ctx.get_rows(w(model.audio_embd), codes)?;
    let d = model.config.backbone.n_embd as i64;
    let (x, hidden) = if s == 0 {
        // Rows in session order: h of session 0, its audio, h of session 1, ...
        let h = ctx.new_tensor(DType::F32, &[d, n_seq])?.set_input();
        let pairs = ctx.concat(ctx.reshape(h, &[d, 1, n_seq])?, ctx.reshape(audio, &[d, 1, n_seq])?, 1)?;
        (ctx.reshape(pairs, &[d, 2 * n_seq])?, Some(h))
    } else {
        (audio, None)
    };
    let x = ctx.mul_mat(w(model.projection), x)?;
    let (inputs, sequences) = BatchInputs::new(ctx, model.decoder.freq_factor_input(ctx)?, caches, parts)?;
    let mut scope = BuildScope::batched(ctx, graph, &model.weights, inputs.positions, inputs.freq_factors, sequences)?;
    let output_rows = if s == 0 && caches.len() > 1 { Some(ctx.new_tensor(DType::I32, &[n_seq])?.set_input()) } else { None };
    scope.output_rows = output_rows;
    let which = if s == 0 { Logits::Last } else { Logits::All };
    let last = model.decoder.build(&mut scope, x, which)?;
    let heads = w(model.audio_head);
    let head = ctx.view(heads, &[heads.ne(0), heads.ne(1)], &[heads.strides()[1]], s * heads.strides()[2])?;
    let out = ctx.mul_mat(head, last)?.set_output();
    graph.expand(out)?;
    Ok(DecoderStep { codes, hidden, output_rows, inputs, out })
}

struct BackboneStep<'c> {
    /// Text ids, text mask, audio ids, audio mask.
    embeddings: [Tensor<'c>; 4],
    inputs: BatchInputs<'c>,
    hidden: Tensor<'c>,
    logits: Tensor<'c>,
}

/// The backbone over one row per session (as `build_backbone` for one session's row).
fn build_backbone_batched<'c>(
    model: &'c CsmModel,
    caches: &[&'c KvCache],
    ctx: &'c Context,
    graph: &mut Graph<'c>,
    parts: &[(usize, usize)],
) -> Result<BackboneStep<'c>> {
    let (k, d) = (model.config.n_codebooks as i64, model.config.backbone.n_embd as i64);
    let n = caches.len() as i64;
    let w = |id| model.weights.get(id);
    let text_ids = ctx.new_tensor(DType::I32, &[n])?.set_input();
    let text_mask = ctx.new_tensor(DType::F32, &[1, n])?.set_input();
    let audio_ids = ctx.new_tensor(DType::I32, &[k * n])?.set_input();
    let audio_mask = ctx.new_tensor(DType::F32, &[1, k * n])?.set_input();
    let text = ctx.mul(ctx.get_rows(w(model.text_embd), text_ids)?, text_mask)?;
    let audio = ctx.mul(ctx.get_rows(w(model.audio_embd), audio_ids)?, audio_mask)?;
    let audio = ctx.cont(ctx.permute(ctx.reshape(audio, &[d, k, n])?, [1, 0, 2, 3])?)?;
    let audio = ctx.reshape(ctx.sum_rows(audio)?, &[d, n])?;
    let x = ctx.add(text, audio)?;
    let (inputs, sequences) = BatchInputs::new(ctx, model.backbone.freq_factor_input(ctx)?, caches, parts)?;
    let mut scope = BuildScope::batched(ctx, graph, &model.weights, inputs.positions, inputs.freq_factors, sequences)?;
    let hidden = model.backbone.build(&mut scope, x, Logits::All)?.set_output();
    let logits = ctx.mul_mat(w(model.codebook0_head), hidden)?.set_output();
    graph.expand(hidden)?;
    graph.expand(logits)?;
    Ok(BackboneStep { embeddings: [text_ids, text_mask, audio_ids, audio_mask], inputs, hidden, logits })
}
