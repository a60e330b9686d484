//! Frame generation: the backbone over rows (prompt, then each generated frame), and per frame the
//! decoder's 31 steps over a cache reset every frame.
//!
//! Graphs of the same shape are kept: the single-row backbone step (per attention window) and each
//! of the decoder's steps (the same every frame), so a frame costs input writes and computes only.

use std::ops::Range;
use std::time::Instant;

use ggml::{Backend, ComputeBuffer, Context, DType, Graph, ReusableGraph, Tensor};
use serde::Serialize;

use super::model::CsmModel;
use super::prompt::{Frame, Row};
pub use super::session::CsmSession;
use crate::attention::{BuildScope, StepInputs};
use crate::error::{Error, Result};
use crate::kv_cache::EvictionPolicy;
use crate::kv_cache::{KvCache, KvCacheConfig, Rotation};
use crate::llama::Transformer;
use crate::memory::{self, make_room, ManagedCache, MemoryReport};
use crate::model::{keep_count, CacheReport, Model, TrainedContext};
use crate::sampling::Sampler;
use crate::{CacheType, Logits};

/// Runtime settings of a CSM model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CsmOptions {
    /// Backbone cache cells: prompt rows plus frames (at most the model's context).
    pub n_ctx: usize,
    pub k_type: CacheType,
    pub v_type: CacheType,
    pub n_threads: usize,
    /// Most prompt rows evaluated in one graph.
    pub n_batch: usize,
}

/// Where generation time went.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct FrameTimings {
    pub prompt_rows: usize,
    pub prompt_seconds: f64,
    pub frames: usize,
    /// Backbone steps over generated frames.
    pub backbone_seconds: f64,
    /// The decoder's steps (31 per frame for CSM-1B).
    pub decoder_seconds: f64,
    pub sampling_seconds: f64,
}

/// A CSM model with its two caches, ready to generate.
pub struct CsmGenerator {
    pub(super) model: CsmModel,
    pub(super) backbone_cache: KvCache,
    pub(super) decoder_cache: KvCache,
    pub(super) backend: Backend,
    pub(super) compute: ComputeBuffer,
    n_batch: usize,
    pub(super) backbone_step: Option<(usize, bool, ReusableGraph)>,
    track_attention: bool,
    evict: Option<EvictionPolicy>,
    pub(super) trained: TrainedContext,
    /// Codes sampled are below this (a codec's codebook size; CSM's audio vocabulary has specials past it).
    pub(super) code_limit: Option<usize>,
    decoder_steps: Vec<Option<ReusableGraph>>,
    /// After the last backbone step: its final-normed hidden state and codebook-0 logits.
    pub(super) last: Option<(Vec<f32>, Vec<f32>)>,
    pub(super) timings: FrameTimings,
}

/// What a backbone step returns: the last row's final-normed hidden state, its codebook-0 logits and,
/// while attention is tracked, the mass each cell received.
struct BackboneOutput {
    h: Vec<f32>,
    c0_logits: Vec<f32>,
    mass: Option<Vec<f32>>,
}

/// The per-step inputs shared by both stacks' graphs.
fn step_inputs<'c>(ctx: &'c Context, stack: &Transformer, n: i64, n_kv: usize) -> Result<StepInputs<'c>> {
    Ok(StepInputs {
        positions: ctx.new_tensor(DType::I32, &[n])?.set_input().set_name("positions"),
        cells: ctx.new_tensor(DType::I64, &[n])?.set_input().set_name("cells"),
        mask: ctx.new_tensor(DType::F16, &[n_kv as i64, n])?.set_input().set_name("mask"),
        freq_factors: stack.freq_factor_input(ctx)?,
    })
}

fn lookup_inputs<'c>(graph: &'c ReusableGraph, stack: &Transformer) -> Result<StepInputs<'c>> {
    Ok(StepInputs {
        positions: graph.tensor("positions")?,
        cells: graph.tensor("cells")?,
        mask: graph.tensor("mask")?,
        freq_factors: if stack.freq_factors().is_some() { Some(graph.tensor("rope_freq_factors")?) } else { None },
    })
}

fn write_step_inputs(inputs: &StepInputs<'_>, stack: &Transformer, cache: &KvCache, cells: Range<usize>) -> Result<()> {
    let positions = &cache.positions()[cells.clone()];
    inputs.positions.write_i32(positions)?;
    inputs.cells.write_i64(&KvCache::cell_indices(cells))?;
    inputs.mask.write_f32(&cache.attention_mask(positions, inputs.mask.ne(0) as usize))?;
    if let (Some(t), Some(f)) = (inputs.freq_factors, stack.freq_factors()) {
        t.write_f32(f)?;
    }
    Ok(())
}

/// The backbone over `n` rows: masked sums of text and audio embeddings → hidden → codebook-0 logits.
fn build_backbone<'c>(
    model: &'c CsmModel,
    cache: &'c KvCache,
    ctx: &'c Context,
    graph: &mut Graph<'c>,
    n: usize,
    n_kv: usize,
    track_attention: bool,
) -> Result<()> {
    let (k, d) = (model.config.n_codebooks as i64, model.config.backbone.n_embd as i64);
    let n = n as i64;
    let w = |id| model.weights.get(id);
    let text_ids = ctx.new_tensor(DType::I32, &[n])?.set_input().set_name("text_ids");
    let text_mask = ctx.new_tensor(DType::F32, &[1, n])?.set_input().set_name("text_mask");
    let audio_ids = ctx.new_tensor(DType::I32, &[k * n])?.set_input().set_name("audio_ids");
    let audio_mask = ctx.new_tensor(DType::F32, &[1, k * n])?.set_input().set_name("audio_mask");
    let text = ctx.mul(ctx.get_rows(w(model.text_embd), text_ids)?, text_mask)?;
    let audio = ctx.mul(ctx.get_rows(w(model.audio_embd), audio_ids)?, audio_mask)?;
    // [d, k·n] → [d, k, n] → [k, d, n]: one sum over the k codebook columns of each row.
    let audio = ctx.cont(ctx.permute(ctx.reshape(audio, &[d, k, n])?, [1, 0, 2, 3])?)?;
    let audio = ctx.reshape(ctx.sum_rows(audio)?, &[d, n])?;
    let x = ctx.add(text, audio)?.set_name("backbone_in");
    let inputs = step_inputs(ctx, &model.backbone, n, n_kv)?;
    let mut scope = BuildScope::new(ctx, graph, &model.weights, cache, inputs).tracking_attention(track_attention);
    let last = model.backbone.build(&mut scope, x, Logits::Last)?.set_name("h_last").set_output();
    let logits = ctx.mul_mat(w(model.codebook0_head), last)?.set_name("c0_logits").set_output();
    graph.expand(last)?;
    graph.expand(logits)?;
    Ok(())
}

/// Decoder step `s`: s = 0 takes [projection(h), projection(audio(c0))] at positions 0 and 1;
/// s ≥ 1 takes projection(audio(c_s of codebook s)) at position s + 1. Logits are codebook s + 1's.
fn build_decoder_step<'c>(
    model: &'c CsmModel,
    cache: &'c KvCache,
    ctx: &'c Context,
    graph: &mut Graph<'c>,
    s: usize,
    n_kv: usize,
) -> Result<()> {
    let w = |id| model.weights.get(id);
    let code = ctx.new_tensor(DType::I32, &[1])?.set_input().set_name("code");
    let audio = ctx.get_rows(w(model.audio_embd), code)?;
    let (x, n) = if s == 0 {
        let h = ctx.new_tensor(DType::F32, &[model.config.backbone.n_embd as i64, 1])?.set_input().set_name("h_in");
        (ctx.concat(h, audio, 1)?, 2)
    } else {
        (audio, 1)
    };
    let x = ctx.mul_mat(w(model.projection), x)?.set_name("decoder_in");
    let inputs = step_inputs(ctx, &model.decoder, n, n_kv)?;
    let mut scope = BuildScope::new(ctx, graph, &model.weights, cache, inputs);
    let last = model.decoder.build(&mut scope, x, Logits::Last)?;
    debug_assert_eq!(last.ne(1), 1, "{n} decoder rows in, one out");
    let heads = w(model.audio_head);
    let head = ctx.view(heads, &[heads.ne(0), heads.ne(1)], &[heads.strides()[1]], s * heads.strides()[2])?;
    let logits = ctx.mul_mat(head, last)?.set_name("logits").set_output();
    graph.expand(logits)?;
    Ok(())
}

/// Backbone input ids and masks for `rows`.
pub(super) fn row_inputs(rows: &[Row], n_codebooks: usize, audio_vocab: usize) -> (Vec<i32>, Vec<f32>, Vec<i32>, Vec<f32>) {
    let mut text = Vec::with_capacity(rows.len());
    let mut text_mask = Vec::with_capacity(rows.len());
    let mut audio = Vec::with_capacity(rows.len() * n_codebooks);
    let mut audio_mask = Vec::with_capacity(rows.len() * n_codebooks);
    for row in rows {
        match row {
            Row::Text(id) => {
                text.push(*id as i32);
                text_mask.push(1.0);
                audio.extend((0..n_codebooks).map(|k| (k * audio_vocab) as i32));
                audio_mask.extend(std::iter::repeat_n(0.0, n_codebooks));
            }
            Row::Audio(frame) => {
                text.push(0);
                text_mask.push(0.0);
                audio.extend(frame.iter().enumerate().map(|(k, &c)| (c as usize + k * audio_vocab) as i32));
                audio_mask.extend(std::iter::repeat_n(1.0, n_codebooks));
            }
        }
    }
    (text, text_mask, audio, audio_mask)
}

impl CsmGenerator {
    pub fn new(model: CsmModel, options: CsmOptions) -> Result<Self> {
        let c = model.config();
        if options.n_ctx == 0 || options.n_ctx > c.backbone.n_ctx_train {
            return Err(Error::Input(format!("context {} must be between 1 and the model's {}", options.n_ctx, c.backbone.n_ctx_train)));
        }
        if options.n_batch == 0 {
            return Err(Error::Input("batch size must be at least 1".into()));
        }
        let cache = |stack: &crate::llama::LlamaConfig, capacity| {
            KvCache::with_rotation(
                KvCacheConfig::uniform(stack.n_layer, stack.head_dim, stack.n_head_kv, capacity, options.k_type, options.v_type),
                Rotation::default(),
            )
        };
        let backbone_cache = cache(&c.backbone, options.n_ctx)?;
        // The decoder sees one frame: h, then one input per codebook but the last.
        let decoder_cache = cache(&c.decoder, c.n_codebooks)?;
        let steps = c.n_codebooks - 1;
        let trained = TrainedContext::new(c.backbone.n_ctx_train);
        Ok(CsmGenerator {
            model,
            backbone_cache,
            decoder_cache,
            backend: Backend::cpu(options.n_threads)?,
            compute: ComputeBuffer::new()?,
            n_batch: options.n_batch,
            backbone_step: None,
            track_attention: false,
            evict: None,
            trained,
            code_limit: None,
            decoder_steps: (0..steps).map(|_| None).collect(),
            last: None,
            timings: FrameTimings::default(),
        })
    }

    /// Kept graphs read the cache buffers; drop them before the buffers are replaced.
    fn drop_kept_graphs(&mut self) {
        self.backbone_step = None;
        self.decoder_steps.iter_mut().for_each(|g| *g = None);
    }

    pub fn model(&self) -> &CsmModel {
        &self.model
    }

    /// The weights back, dropping the runtime state.
    pub fn into_model(self) -> CsmModel {
        self.model
    }

    /// Which attention kernels the steps of both transformers run (auto by default).
    pub fn set_attention(&mut self, choice: crate::attention::AttentionChoice) {
        self.drop_kept_graphs();
        self.backbone_cache.set_attention(choice);
        self.decoder_cache.set_attention(choice);
    }

    pub fn backbone_cache(&self) -> &KvCache {
        &self.backbone_cache
    }

    pub fn decoder_cache(&self) -> &KvCache {
        &self.decoder_cache
    }

    pub fn timings(&self) -> FrameTimings {
        self.timings
    }

    /// Computes, per backbone cell, the attention mass it receives (for the attention eviction policy).
    pub fn set_track_attention(&mut self, on: bool) {
        self.track_attention = on;
    }

    /// Whether backbone positions went past the model's trained context since the last reset (only
    /// possible with eviction; warned once on the `ccsm` log).
    pub fn past_trained_context(&self) -> bool {
        self.trained.passed()
    }

    /// Samples only codes below `limit` (the attached codec's codebook size: CSM-1B's audio vocabulary
    /// of 2051 holds 3 specials past Mimi's 2048 codes, which no codec could decode).
    pub fn set_code_limit(&mut self, limit: Option<usize>) {
        self.code_limit = limit.filter(|&l| l > 0);
    }

    /// Codebook-0 logits after the last backbone step.
    pub fn c0_logits(&self) -> Option<&[f32]> {
        self.last.as_ref().map(|(_, logits)| logits.as_slice())
    }

    /// Runs `rows` through the backbone after what is cached (the prompt, in batches).
    pub fn prefill(&mut self, rows: &[Row]) -> Result<()> {
        if rows.is_empty() {
            return Err(Error::EmptyInput("no backbone rows"));
        }
        let started = Instant::now();
        // With eviction, steps stay within a quarter of the capacity so room can always be made.
        let step = match self.evict {
            Some(_) => self.n_batch.min((self.backbone_cache.capacity() / 4).max(1)),
            None => self.n_batch,
        };
        for chunk in rows.chunks(step) {
            self.backbone_rows(chunk)?;
        }
        self.timings.prompt_rows += rows.len();
        self.timings.prompt_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    pub(super) fn check_rows(&self, rows: &[Row]) -> Result<()> {
        let c = &self.model.config;
        for row in rows {
            match row {
                Row::Text(id) if *id as usize >= c.text_vocab => return Err(Error::TokenOutOfRange { id: *id, vocab: c.text_vocab }),
                Row::Audio(frame) if frame.len() != c.n_codebooks || frame.iter().any(|&code| code as usize >= c.audio_vocab) => {
                    return Err(Error::Input(format!("an audio row needs {} codes below {}", c.n_codebooks, c.audio_vocab)))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn backbone_rows(&mut self, rows: &[Row]) -> Result<()> {
        if rows.is_empty() {
            return Err(Error::EmptyInput("no backbone rows"));
        }
        self.check_rows(rows)?;
        if let Some(policy) = self.evict {
            make_room(&mut self.backbone_cache, rows.len(), policy)?;
        }
        let start = self.backbone_cache.len();
        let cells = self.backbone_cache.append(rows.len())?;
        let result = self.compute_backbone(rows, cells);
        match result {
            Ok(BackboneOutput { h, c0_logits, mass }) => {
                if let Some(mass) = mass {
                    self.backbone_cache.add_scores(&mass);
                }
                self.last = Some((h, c0_logits));
                self.trained.observe(self.backbone_cache.next_position(), "backbone");
                Ok(())
            }
            Err(e) => {
                self.backbone_cache.truncate(start);
                Err(e)
            }
        }
    }

    /// The backbone over rows already appended: hidden state, codebook-0 logits, attention mass.
    fn compute_backbone(&mut self, rows: &[Row], cells: Range<usize>) -> Result<BackboneOutput> {
        let (model, cache, track) = (&self.model, &self.backbone_cache, self.track_attention);
        let max_nodes = model.backbone.max_nodes() + 32;
        if rows.len() == 1 {
            let n_kv = cache.decode_window();
            let kept = matches!(&self.backbone_step, Some((window, tracked, g)) if *window == n_kv && *tracked == track && g.is_current());
            if !kept {
                self.backbone_step = None;
                let graph = ReusableGraph::new(max_nodes + 16, max_nodes)?;
                let mut building = graph.context().new_graph(max_nodes)?;
                build_backbone(model, cache, graph.context(), &mut building, 1, n_kv, track)?;
                graph.finish(building.seal())?;
                self.backbone_step = Some((n_kv, track, graph));
            }
            let (_, _, graph) = self.backbone_step.as_ref().expect("set above");
            self.write_backbone_inputs(|name| graph.tensor(name), rows, cells)?;
            graph.compute(&self.backend)?;
            let mass = if track { Some(graph.tensor("attn_mass")?.read_f32()?) } else { None };
            return Ok(BackboneOutput { h: graph.tensor("h_last")?.read_f32()?, c0_logits: graph.tensor("c0_logits")?.read_f32()?, mass });
        }
        let ctx = self.compute.context(max_nodes + 16, max_nodes)?;
        let mut graph = ctx.new_graph(max_nodes)?;
        build_backbone(model, cache, &ctx, &mut graph, rows.len(), cache.len(), track)?;
        ctx.allocate(&graph)?;
        let find = |name: &str| find_named(&graph, name);
        write_backbone_inputs_with(model, cache, &find, rows, cells)?;
        self.backend.compute(&graph)?;
        let mass = if track { Some(find("attn_mass")?.read_f32()?) } else { None };
        Ok(BackboneOutput { h: find("h_last")?.read_f32()?, c0_logits: find("c0_logits")?.read_f32()?, mass })
    }

    fn write_backbone_inputs<'g>(&self, find: impl Fn(&str) -> ggml::Result<Tensor<'g>>, rows: &[Row], cells: Range<usize>) -> Result<()> {
        write_backbone_inputs_with(&self.model, &self.backbone_cache, &find, rows, cells)
    }

    /// Samples one frame from the last backbone state. `None` means the model ended the speech (an
    /// all-zero frame, which is not emitted nor fed back). `trace`, when given, receives each
    /// codebook's logits.
    pub fn generate_frame(&mut self, sampler: &mut Sampler, mut trace: Option<&mut Vec<Vec<f32>>>) -> Result<Option<Frame>> {
        let (h, c0_logits) =
            self.last.clone().ok_or_else(|| Error::Input("generate_frame before any backbone step (prefill a prompt first)".into()))?;
        let c = self.model.config.clone();
        let t = Instant::now();
        let limit = self.code_limit.unwrap_or(c.audio_vocab).min(c.audio_vocab);
        let mut frame = vec![sampler.sample(&c0_logits[..limit])?];
        self.timings.sampling_seconds += t.elapsed().as_secs_f64();
        if let Some(trace) = trace.as_deref_mut() {
            trace.push(c0_logits);
        }

        let started = Instant::now();
        self.decoder_cache.clear();
        for s in 0..c.n_codebooks - 1 {
            let logits = self.decoder_step(s, &h, frame[s])?;
            let t = Instant::now();
            frame.push(sampler.sample(&logits[..limit])?);
            self.timings.sampling_seconds += t.elapsed().as_secs_f64();
            if let Some(trace) = trace.as_deref_mut() {
                trace.push(logits);
            }
        }
        self.timings.decoder_seconds += started.elapsed().as_secs_f64();

        if frame.iter().all(|&code| code == 0) {
            return Ok(None);
        }
        let started = Instant::now();
        self.backbone_rows(&[Row::Audio(frame.clone())])?;
        self.timings.backbone_seconds += started.elapsed().as_secs_f64();
        self.timings.frames += 1;
        Ok(Some(frame))
    }

    /// One decoder step through its kept graph; returns the logits of codebook s + 1.
    fn decoder_step(&mut self, s: usize, h: &[f32], code: u32) -> Result<Vec<f32>> {
        let n = if s == 0 { 2 } else { 1 };
        let cells = self.decoder_cache.append(n)?;
        let (model, cache) = (&self.model, &self.decoder_cache);
        let n_kv = cache.capacity();
        if !self.decoder_steps[s].as_ref().is_some_and(|g| g.is_current()) {
            let max_nodes = model.decoder.max_nodes() + 32;
            let graph = ReusableGraph::new(max_nodes + 16, max_nodes)?;
            let mut building = graph.context().new_graph(max_nodes)?;
            build_decoder_step(model, cache, graph.context(), &mut building, s, n_kv)?;
            graph.finish(building.seal())?;
            self.decoder_steps[s] = Some(graph);
        }
        let graph = self.decoder_steps[s].as_ref().expect("set above");
        let offset = (s * model.config.audio_vocab) as u32;
        graph.tensor("code")?.write_i32(&[(code + offset) as i32])?;
        if s == 0 {
            graph.tensor("h_in")?.write_f32(h)?;
        }
        write_step_inputs(&lookup_inputs(graph, &model.decoder)?, &model.decoder, cache, cells)?;
        graph.compute(&self.backend)?;
        Ok(graph.tensor("logits")?.read_f32()?)
    }
}

fn find_named<'g>(graph: &Graph<'g>, name: &str) -> ggml::Result<Tensor<'g>> {
    graph.find(name).ok_or_else(|| ggml::Error::Invalid { op: "find", why: format!("no tensor named `{name}`") })
}

fn write_backbone_inputs_with<'g>(
    model: &CsmModel,
    cache: &KvCache,
    find: &dyn Fn(&str) -> ggml::Result<Tensor<'g>>,
    rows: &[Row],
    cells: Range<usize>,
) -> Result<()> {
    let c = &model.config;
    let (text, text_mask, audio, audio_mask) = row_inputs(rows, c.n_codebooks, c.audio_vocab);
    find("text_ids")?.write_i32(&text)?;
    find("text_mask")?.write_f32(&text_mask)?;
    find("audio_ids")?.write_i32(&audio)?;
    find("audio_mask")?.write_f32(&audio_mask)?;
    let inputs = StepInputs {
        positions: find("positions")?,
        cells: find("cells")?,
        mask: find("mask")?,
        freq_factors: if model.backbone.freq_factors().is_some() { Some(find("rope_freq_factors")?) } else { None },
    };
    write_step_inputs(&inputs, &model.backbone, cache, cells)
}

impl Model for CsmGenerator {
    type Input = [Row];
    type Output = Vec<f32>;

    fn reset(&mut self) {
        self.trained.reset();
        self.backbone_cache.clear();
        self.decoder_cache.clear();
        self.last = None;
        self.timings = FrameTimings::default();
    }

    /// Codebook-0 logits after `input` rows.
    fn forward(&mut self, input: &[Row]) -> Result<Vec<f32>> {
        self.prefill(input)?;
        Ok(self.c0_logits().map(<[f32]>::to_vec).unwrap_or_default())
    }

    fn kv_memory_usage(&self) -> usize {
        self.backbone_cache.memory_usage() + self.decoder_cache.memory_usage()
    }

    fn quantize_kv_cache(&mut self, k_type: CacheType, v_type: CacheType) -> Result<Vec<CacheReport>> {
        self.drop_kept_graphs();
        Ok(vec![
            CacheReport { cache: "backbone", report: self.backbone_cache.quantize(k_type, v_type)? },
            CacheReport { cache: "decoder", report: self.decoder_cache.quantize(k_type, v_type)? },
        ])
    }

    fn optimize_memory(&mut self, max_bytes: usize, policy: EvictionPolicy) -> Result<MemoryReport> {
        self.drop_kept_graphs();
        let caches = vec![
            ManagedCache { name: "backbone", cache: &mut self.backbone_cache, resizable: true },
            ManagedCache { name: "decoder", cache: &mut self.decoder_cache, resizable: false },
        ];
        memory::optimize(caches, max_bytes, policy)
    }

    fn prune_caches(&mut self, fraction: f64, policy: EvictionPolicy) -> Result<usize> {
        let keep = keep_count(self.backbone_cache.len(), fraction)?;
        self.backbone_cache.prune(keep, policy)
    }

    fn set_eviction(&mut self, policy: Option<EvictionPolicy>) {
        self.evict = policy;
        self.track_attention = policy.is_some_and(EvictionPolicy::tracks_attention);
    }

    fn set_kv_rotation(&mut self, rotation: Rotation) -> Result<()> {
        self.drop_kept_graphs();
        self.backbone_cache.set_rotation(rotation)?;
        self.decoder_cache.set_rotation(rotation)?;
        Ok(())
    }
}
