//! The CSM engine: weights, backend, compute memory and kept graphs, shared by every session. It
//! prefills any set of sessions' prompts in one backbone graph per chunk, and makes the next frame
//! of any set of sessions with one graph per decoder step and one backbone step for all, so the
//! weights are read once per step for every session: on a memory-bound CPU, concurrency is nearly
//! free. One session is a batch of one, through the same code.
//!
//! Frame steps run kept graphs (the same sessions take many frames in a row); a graph is keyed by its
//! sessions' caches (identity, version, window), so a change to a cache rebuilds it by itself.

use std::ops::Range;
use std::time::Instant;

use ggml::{Backend, ComputeBuffer};

use super::graphs::{BackboneSlots, BackboneStep, DecoderSlots, DecoderStep};
use super::model::CsmModel;
use super::prompt::{Frame, Row};
use super::session::{BackboneState, CsmSession};
use crate::attention::{AttentionChoice, SequencePart};
use crate::engine::step::{GraphKey, KeptGraphs, StepRunner};
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, KvCacheConfig, Rotation};
use crate::memory::make_room;
use crate::sampling::Sampler;
use crate::CacheType;

/// Kept backbone frame graphs: a few attention windows of the same sessions.
const KEPT_BACKBONE_GRAPHS: usize = 2;

/// How sessions' caches are made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SessionCaches {
    /// Backbone cells: prompt rows plus frames (at most the model's context).
    pub capacity: usize,
    /// Backbone K type.
    pub k_type: CacheType,
    /// Backbone V type.
    pub v_type: CacheType,
}

/// One session's part of a batched frame: the session, the sampler its codes are drawn with and,
/// when given, where each codebook's logits go.
pub struct FrameRequest<'a> {
    /// The session that makes the frame.
    pub session: &'a mut CsmSession,
    /// Draws its codes (the caller's: one per session).
    pub sampler: &'a mut Sampler,
    /// Receives each codebook's logits, when given.
    pub trace: Option<&'a mut Vec<Vec<f32>>>,
}

impl<'a> FrameRequest<'a> {
    /// A request without a trace.
    pub fn new(session: &'a mut CsmSession, sampler: &'a mut Sampler) -> Self {
        FrameRequest { session, sampler, trace: None }
    }
}

/// One session's prompt rows, to run after what its backbone cache holds.
pub struct PrefillRequest<'a> {
    /// The session whose cache the rows follow.
    pub session: &'a mut CsmSession,
    /// Its prompt rows (text tokens and frames).
    pub rows: &'a [Row],
}

/// A CSM model's weights with the backend, compute memory and kept graphs its steps use.
pub struct CsmEngine {
    model: CsmModel,
    backend: Backend,
    compute: ComputeBuffer,
    backbone_graphs: KeptGraphs<BackboneSlots>,
    decoder_graphs: KeptGraphs<DecoderSlots>,
    n_batch: usize,
    code_limit: Option<usize>,
    /// Types of new sessions' decoder caches.
    decoder_types: (CacheType, CacheType),
    /// The attention kernels every step runs.
    attention: AttentionChoice,
}

impl CsmEngine {
    /// An engine running `n_threads` ggml threads, prefilling at most `n_batch` rows per graph, whose
    /// sessions' decoder caches hold `decoder_types` (K, V); it runs where the weights are
    /// (`CsmModel::placement`).
    pub fn new(model: CsmModel, n_threads: usize, n_batch: usize, decoder_types: (CacheType, CacheType)) -> Result<Self> {
        if n_batch == 0 {
            return Err(Error::Input("batch size must be at least 1".into()));
        }
        let steps = model.config.n_codebooks - 1;
        let backend = model.placement().backend(n_threads)?;
        let compute = ComputeBuffer::for_backend(&backend)?;
        Ok(CsmEngine {
            model,
            backend,
            compute,
            backbone_graphs: KeptGraphs::new(KEPT_BACKBONE_GRAPHS),
            decoder_graphs: KeptGraphs::new(steps),
            n_batch,
            code_limit: None,
            decoder_types,
            attention: AttentionChoice::Auto,
        })
    }

    /// The weights.
    pub fn model(&self) -> &CsmModel {
        &self.model
    }

    /// The weights back, dropping the runtime state.
    pub fn into_model(self) -> CsmModel {
        self.model
    }

    /// Samples only codes below `limit` (the attached codec's codebook size: CSM-1B's audio vocabulary
    /// of 2051 holds 3 specials past Mimi's 2048 codes, which no codec could decode).
    pub fn set_code_limit(&mut self, limit: Option<usize>) {
        self.code_limit = limit.filter(|&l| l > 0);
    }

    /// Which attention kernels the steps of both transformers run (auto by default); kept graphs are
    /// rebuilt.
    pub fn set_attention(&mut self, choice: AttentionChoice) {
        self.attention = choice;
        self.backbone_graphs.clear();
        self.decoder_graphs.clear();
    }

    /// The attention kernels steps run.
    pub fn attention(&self) -> AttentionChoice {
        self.attention
    }

    /// The backbone cache a session of `caches` gets (its shape and types).
    pub fn backbone_config(&self, caches: &SessionCaches) -> Result<KvCacheConfig> {
        let b = &self.model.config.backbone;
        if caches.capacity == 0 || caches.capacity > b.n_ctx_train {
            return Err(Error::ContextOutOfRange { requested: caches.capacity, max: b.n_ctx_train });
        }
        Ok(KvCacheConfig::uniform(b.n_layer, b.head_dim, b.n_head_kv, caches.capacity, caches.k_type, caches.v_type))
    }

    /// The decoder sees one frame: h, then one input per codebook but the last.
    fn decoder_config(&self) -> KvCacheConfig {
        let (c, (k, v)) = (&self.model.config, self.decoder_types);
        KvCacheConfig::uniform(c.decoder.n_layer, c.decoder.head_dim, c.decoder.n_head_kv, c.n_codebooks, k, v)
    }

    /// Bytes of a session's caches.
    pub fn session_bytes(&self, caches: &SessionCaches) -> Result<usize> {
        Ok(self.backbone_config(caches)?.bytes()? + self.decoder_config().bytes()?)
    }

    /// Refuses a session whose caches live elsewhere than this engine's graphs run.
    fn check_placement(&self, session: &CsmSession) -> Result<()> {
        let here = self.model.placement();
        here.require_same(session.backbone.placement(), "the session's backbone cache")?;
        here.require_same(session.decoder.placement(), "the session's decoder cache")
    }

    /// A new empty session (quantized halves rotated, as by default).
    pub fn new_session(&self, caches: &SessionCaches) -> Result<CsmSession> {
        let placement = self.model.placement();
        let backbone = KvCache::placed(self.backbone_config(caches)?, Rotation::default(), placement)?;
        let decoder = KvCache::placed(self.decoder_config(), Rotation::default(), placement)?;
        Ok(CsmSession::new(backbone, decoder, self.model.config.backbone.n_ctx_train))
    }

    /// Runs each session's rows through the backbone after what it holds: in chunks of at most the
    /// batch size, every session's next chunk in one graph. On error, no session's cache changes
    /// past the chunk that failed.
    pub fn prefill(&mut self, requests: &mut [PrefillRequest<'_>]) -> Result<()> {
        for r in requests.iter() {
            if r.rows.is_empty() {
                return Err(Error::EmptyInput("no backbone rows"));
            }
            self.check_rows(r.rows)?;
        }
        let started = Instant::now();
        // With eviction, steps stay within a quarter of the capacity so room can always be made.
        let chunk = |s: &CsmSession| match s.evict {
            Some(_) => self.n_batch.min((s.backbone.capacity() / 4).max(1)),
            None => self.n_batch,
        };
        let chunks: Vec<Vec<&[Row]>> = requests.iter().map(|r| r.rows.chunks(chunk(r.session)).collect()).collect();
        let rounds = chunks.iter().map(Vec::len).max().unwrap_or(0);
        for round in 0..rounds {
            let mut sessions = Vec::new();
            let mut rows = Vec::new();
            for (r, c) in requests.iter_mut().zip(&chunks) {
                if let Some(&part) = c.get(round) {
                    sessions.push(&mut *r.session);
                    rows.push(part);
                }
            }
            self.backbone_rows(&mut sessions, &rows, false)?;
        }
        let seconds = started.elapsed().as_secs_f64();
        for r in requests.iter_mut() {
            r.session.timings.prompt_rows += r.rows.len();
            r.session.timings.prompt_seconds += seconds;
        }
        Ok(())
    }

    fn check_rows(&self, rows: &[Row]) -> Result<()> {
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

    /// One backbone step: `rows[i]` after what `sessions[i]` holds. Sessions that track attention run
    /// alone (the mass is summed over the step's queries). `frame`: one-row steps of made frames, whose
    /// graphs are kept.
    fn backbone_rows(&mut self, sessions: &mut [&mut CsmSession], rows: &[&[Row]], frame: bool) -> Result<()> {
        for session in sessions.iter() {
            self.check_placement(session)?;
        }
        if sessions.len() > 1 && sessions.iter().any(|s| s.tracks_attention()) {
            for (session, rows) in sessions.iter_mut().zip(rows) {
                self.backbone_rows(&mut [&mut **session], &[*rows], frame)?;
            }
            return Ok(());
        }
        for (session, rows) in sessions.iter_mut().zip(rows) {
            if let Some(policy) = session.evict {
                make_room(&mut session.backbone, rows.len(), policy)?;
            }
        }
        let starts: Vec<usize> = sessions.iter().map(|s| s.backbone.len()).collect();
        let result = self.backbone_appended(sessions, rows, frame);
        if result.is_err() {
            for (session, &start) in sessions.iter_mut().zip(&starts) {
                session.backbone.truncate(start);
            }
        }
        result
    }

    fn backbone_appended(&mut self, sessions: &mut [&mut CsmSession], rows: &[&[Row]], frame: bool) -> Result<()> {
        let mut cells: Vec<Range<usize>> = Vec::with_capacity(sessions.len());
        for (session, rows) in sessions.iter_mut().zip(rows) {
            cells.push(session.backbone.append(rows.len())?);
        }
        let track = sessions.len() == 1 && sessions[0].tracks_attention();
        let caches: Vec<&KvCache> = sessions.iter().map(|s| &s.backbone).collect();
        let parts: Vec<SequencePart> = caches
            .iter()
            .zip(rows)
            .map(|(c, r)| SequencePart { rows: r.len(), n_kv: if frame { c.decode_window() } else { c.len() } })
            .collect();
        let step = BackboneStep { model: &self.model, caches: &caches, parts: &parts, track, kernels: self.attention };
        let kept = frame.then(|| {
            let key = caches.iter().zip(&parts).fold(GraphKey::new(&[track as u64]), |k, (c, p)| k.with_cache(c, p.n_kv));
            (&mut self.backbone_graphs, key)
        });
        let mut runner = StepRunner { backend: &self.backend, compute: &mut self.compute, profile: None };
        let model = &self.model;
        let (hidden, logits, mass) = runner.run(
            &step,
            kept,
            |graph, io| io.write(graph, model, &caches, rows, &cells),
            |graph, io| {
                let mass = io.attention_mass.map(|t| graph.at(t)?.read_f32()).transpose()?;
                Ok((graph.at(io.hidden)?.read_f32()?, graph.at(io.logits)?.read_f32()?, mass))
            },
        )?;
        let (d, v) = (model.config.backbone.n_embd, model.config.audio_vocab);
        for (i, session) in sessions.iter_mut().enumerate() {
            if let Some(mass) = &mass {
                session.backbone.add_scores(mass);
            }
            let state = BackboneState { hidden: hidden[i * d..(i + 1) * d].to_vec(), c0_logits: logits[i * v..(i + 1) * v].to_vec() };
            session.last = Some(state);
            session.trained.observe(session.backbone.next_position(), "backbone");
        }
        Ok(())
    }

    /// The next frame of every session (each prefilled): codebook 0 from its last backbone state,
    /// then one graph per decoder step over every session, then one backbone step over every new
    /// frame. `None` for a session whose model ended the speech (an all-zero frame, not fed back).
    pub fn step_frames(&mut self, requests: &mut [FrameRequest<'_>]) -> Result<Vec<Option<Frame>>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.model.config.clone();
        let limit = self.code_limit.unwrap_or(c.audio_vocab).min(c.audio_vocab);
        let mut states = Vec::with_capacity(requests.len());
        for r in requests.iter() {
            self.check_placement(r.session)?;
            let state = r.session.last.clone().ok_or(Error::NotPrefilled)?;
            states.push(state);
        }
        let mut sampling = 0.0;
        let mut sample = |r: &mut FrameRequest<'_>, logits: &[f32]| -> Result<u32> {
            let t = Instant::now();
            let code = r.sampler.sample(&logits[..limit])?;
            sampling += t.elapsed().as_secs_f64();
            if let Some(trace) = r.trace.as_deref_mut() {
                trace.push(logits.to_vec());
            }
            Ok(code)
        };
        let mut frames = Vec::with_capacity(requests.len());
        for (r, state) in requests.iter_mut().zip(&states) {
            frames.push(vec![sample(r, &state.c0_logits)?]);
            r.session.decoder.clear();
        }
        let started = Instant::now();
        let hidden: Vec<&[f32]> = states.iter().map(|s| s.hidden.as_slice()).collect();
        for s in 0..c.n_codebooks - 1 {
            let codes: Vec<u32> = frames.iter().map(|f| f[s]).collect();
            let logits = self.decoder_step(requests, s, &hidden, &codes)?;
            for ((frame, r), logits) in frames.iter_mut().zip(requests.iter_mut()).zip(logits.chunks(c.audio_vocab)) {
                frame.push(sample(r, logits)?);
            }
        }
        let decoder_seconds = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let speaking: Vec<usize> = (0..frames.len()).filter(|&i| frames[i].iter().any(|&code| code != 0)).collect();
        if !speaking.is_empty() {
            let rows: Vec<Vec<Row>> = speaking.iter().map(|&i| vec![Row::Audio(frames[i].clone())]).collect();
            let rows: Vec<&[Row]> = rows.iter().map(Vec::as_slice).collect();
            let mut sessions: Vec<&mut CsmSession> =
                requests.iter_mut().enumerate().filter(|(i, _)| speaking.contains(i)).map(|(_, r)| &mut *r.session).collect();
            self.backbone_rows(&mut sessions, &rows, true)?;
        }
        let backbone_seconds = started.elapsed().as_secs_f64();
        let n = requests.len() as f64;
        for (i, r) in requests.iter_mut().enumerate() {
            let t = &mut r.session.timings;
            t.decoder_seconds += decoder_seconds / n;
            t.sampling_seconds += sampling / n;
            if speaking.contains(&i) {
                t.backbone_seconds += backbone_seconds / speaking.len() as f64;
                t.frames += 1;
            }
        }
        Ok(frames.into_iter().enumerate().map(|(i, f)| speaking.contains(&i).then_some(f)).collect())
    }

    /// Decoder step `s` for every session: logits of codebook s + 1, `[audio_vocab]` per session in order.
    fn decoder_step(&mut self, requests: &mut [FrameRequest<'_>], s: usize, hidden: &[&[f32]], codes: &[u32]) -> Result<Vec<f32>> {
        let mut cells = Vec::with_capacity(requests.len());
        for r in requests.iter_mut() {
            cells.push(r.session.decoder.append(DecoderStep::rows(s))?);
        }
        let caches: Vec<&KvCache> = requests.iter().map(|r| &r.session.decoder).collect();
        let step = DecoderStep { model: &self.model, caches: &caches, s, kernels: self.attention };
        let key = caches.iter().fold(GraphKey::new(&[s as u64]), |k, c| k.with_cache(c, c.capacity()));
        let mut runner = StepRunner { backend: &self.backend, compute: &mut self.compute, profile: None };
        let model = &self.model;
        runner.run(
            &step,
            Some((&mut self.decoder_graphs, key)),
            |graph, io| io.write(graph, model, codes, hidden, &caches, &cells),
            |graph, io| Ok(graph.at(io.logits)?.read_f32()?),
        )
    }
}
