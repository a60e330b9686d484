//! The two step graphs of CSM, over any number of sessions: the backbone over each session's new rows
//! (masked sums of text and audio embeddings → hidden → codebook-0 logits), and decoder step `s` over
//! each session's decoder cache. One session is a batch of one; the same builders serve fresh graphs
//! (prompts) and kept ones (frames).

use ggml::{Context, DType, Graph, Slot, StepGraph, Tensor};

use super::model::CsmModel;
use super::prompt::Row;
use crate::attention::{AttentionChoice, BatchInputs, BatchSlots, BuildScope, SequencePart};
use crate::engine::step::StepBuilder;
use crate::engine::PER_SEQUENCE_NODES;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::Logits;

/// The backbone over `rows[i]` new rows of `caches[i]`, attending over its first `n_kv[i]` cells.
pub(super) struct BackboneStep<'a> {
    pub model: &'a CsmModel,
    pub caches: &'a [&'a KvCache],
    /// Per session: its new rows and the cells they attend over.
    pub parts: &'a [SequencePart],
    /// Also sum the attention mass each cell receives (one session only).
    pub track: bool,
    pub kernels: AttentionChoice,
}

/// The inputs and outputs of a backbone step.
pub(super) struct BackboneSlots {
    text_ids: Slot,
    text_mask: Slot,
    audio_ids: Slot,
    audio_mask: Slot,
    inputs: BatchSlots,
    /// With several sessions of several rows: each session's last row.
    output_rows: Option<Slot>,
    /// Final-normed hidden state `[n_embd]` of each session's last row.
    pub hidden: Slot,
    /// Codebook-0 logits `[audio_vocab]` of each session's last row.
    pub logits: Slot,
    pub attention_mass: Option<Slot>,
}

/// Whether every session has one row (then every row is an output row).
fn one_row_each(parts: &[SequencePart]) -> bool {
    parts.iter().all(|p| p.rows == 1)
}

impl StepBuilder for BackboneStep<'_> {
    type Io = BackboneSlots;

    fn max_nodes(&self) -> usize {
        let c = &self.model.config;
        self.model.backbone.max_nodes() + PER_SEQUENCE_NODES * self.caches.len() * c.backbone.n_layer + 64
    }

    fn build<'c>(&self, ctx: &'c Context, graph: &mut Graph<'c>) -> Result<BackboneSlots>
    where
        Self: 'c,
    {
        let model = self.model;
        let (k, d) = (model.config.n_codebooks as i64, model.config.backbone.n_embd as i64);
        let n = self.parts.iter().map(|p| p.rows).sum::<usize>() as i64;
        let w = |id| model.weights.get(id);
        let input = |t: DType, shape: &[i64]| -> Result<Tensor<'c>> { Ok(ctx.new_tensor(t, shape)?.set_input()) };
        let text_ids = input(DType::I32, &[n])?;
        let text_mask = input(DType::F32, &[1, n])?;
        let audio_ids = input(DType::I32, &[k * n])?;
        let audio_mask = input(DType::F32, &[1, k * n])?;
        let text = ctx.mul(ctx.get_rows(w(model.text_embd), text_ids)?, text_mask)?;
        let audio = ctx.mul(ctx.get_rows(w(model.audio_embd), audio_ids)?, audio_mask)?;
        // [d, k·n] → [d, k, n] → [k, d, n]: one sum over the k codebook columns of each row.
        let audio = ctx.cont(ctx.permute(ctx.reshape(audio, &[d, k, n])?, [1, 0, 2, 3])?)?;
        let audio = ctx.reshape(ctx.sum_rows(audio)?, &[d, n])?;
        let x = ctx.add(text, audio)?;
        let (inputs, sequences) = BatchInputs::new(ctx, model.backbone.freq_factor_input(ctx)?, self.caches, self.parts)?;
        let (which, output_rows) = if one_row_each(self.parts) {
            (Logits::All, None)
        } else if self.caches.len() > 1 {
            (Logits::Last, Some(input(DType::I32, &[self.caches.len() as i64])?))
        } else {
            (Logits::Last, None)
        };
        let mut scope = BuildScope::batched(ctx, graph, &model.weights, inputs.positions, inputs.freq_factors, sequences)?
            .tracking_attention(self.track)
            .with_kernels(self.kernels)
            .with_output_rows(output_rows);
        let hidden = model.backbone.build(&mut scope, x, which)?.set_output();
        let attention_mass = scope.take_attention_mass().map(Tensor::set_output);
        let logits = ctx.product(w(model.codebook0_head), hidden)?.set_output();
        graph.expand(hidden)?;
        graph.expand(logits)?;
        if let Some(mass) = attention_mass {
            graph.expand(mass)?;
        }
        Ok(BackboneSlots {
            text_ids: text_ids.slot(),
            text_mask: text_mask.slot(),
            audio_ids: audio_ids.slot(),
            audio_mask: audio_mask.slot(),
            inputs: inputs.slots(),
            output_rows: output_rows.map(Tensor::slot),
            hidden: hidden.slot(),
            logits: logits.slot(),
            attention_mass: attention_mass.map(Tensor::slot),
        })
    }
}

impl BackboneSlots {
    /// Fills the inputs: `rows[i]` of `caches[i]`, stored at `cells[i]`.
    pub fn write(
        &self,
        graph: StepGraph<'_>,
        model: &CsmModel,
        caches: &[&KvCache],
        rows: &[&[Row]],
        cells: &[std::ops::Range<usize>],
    ) -> Result<()> {
        let c = &model.config;
        let all: Vec<&Row> = rows.iter().flat_map(|r| r.iter()).collect();
        let inputs = RowInputs::of(&all, c.n_codebooks, c.audio_vocab);
        graph.at(self.text_ids)?.write_i32(&inputs.text)?;
        graph.at(self.text_mask)?.write_f32(&inputs.text_mask)?;
        graph.at(self.audio_ids)?.write_i32(&inputs.audio)?;
        graph.at(self.audio_mask)?.write_f32(&inputs.audio_mask)?;
        self.inputs.write(graph, model.backbone.freq_factors(), caches, cells)?;
        if let Some(t) = self.output_rows {
            let mut last = Vec::with_capacity(rows.len());
            let mut end = 0;
            for r in rows {
                end += r.len();
                last.push(end as i32 - 1);
            }
            graph.at(t)?.write_i32(&last)?;
        }
        Ok(())
    }
}

/// The backbone's input ids and masks for some rows.
struct RowInputs {
    /// Text token per row (0 for audio rows).
    text: Vec<i32>,
    /// 1 for text rows, 0 for audio rows.
    text_mask: Vec<f32>,
    /// Per row and codebook, the audio embedding's row (code + codebook · audio_vocab).
    audio: Vec<i32>,
    /// 1 for audio rows' codebooks, 0 for text rows'.
    audio_mask: Vec<f32>,
}

impl RowInputs {
    fn of(rows: &[&Row], n_codebooks: usize, audio_vocab: usize) -> Self {
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
        RowInputs { text, text_mask, audio, audio_mask }
    }
}

/// Decoder step `s` over every session's decoder cache: s = 0 takes each session's
/// [projection(h), projection(audio(c0))] at positions 0 and 1; s ≥ 1 takes projection(audio(c_s of
/// codebook s)) at position s + 1. Its outputs are the logits of codebook s + 1, per session.
pub(super) struct DecoderStep<'a> {
    pub model: &'a CsmModel,
    pub caches: &'a [&'a KvCache],
    pub s: usize,
    pub kernels: AttentionChoice,
}

/// The inputs and outputs of a decoder step.
pub(super) struct DecoderSlots {
    /// Where step `s`'s codebook starts in the audio embedding (`s · audio_vocab`).
    code_offset: u32,
    codes: Slot,
    /// Step 0's backbone states, one per session.
    hidden: Option<Slot>,
    /// At step 0 of several sessions: each session's second row.
    output_rows: Option<Slot>,
    inputs: BatchSlots,
    /// `[audio_vocab]` per session, in order.
    pub logits: Slot,
}

impl DecoderStep<'_> {
    /// Rows each session runs at this step.
    pub fn rows(s: usize) -> usize {
        if s == 0 {
            2
        } else {
            1
        }
    }
}

impl StepBuilder for DecoderStep<'_> {
    type Io = DecoderSlots;

    fn max_nodes(&self) -> usize {
        let c = &self.model.config;
        self.model.decoder.max_nodes() + PER_SEQUENCE_NODES * self.caches.len() * c.decoder.n_layer + 64
    }

    fn build<'c>(&self, ctx: &'c Context, graph: &mut Graph<'c>) -> Result<DecoderSlots>
    where
        Self: 'c,
    {
        let (model, s) = (self.model, self.s);
        let w = |id| model.weights.get(id);
        let n_seq = self.caches.len() as i64;
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
        let x = ctx.product(w(model.projection), x)?;
        let parts: Vec<SequencePart> = self.caches.iter().map(|c| SequencePart { rows: Self::rows(s), n_kv: c.capacity() }).collect();
        let (inputs, sequences) = BatchInputs::new(ctx, model.decoder.freq_factor_input(ctx)?, self.caches, &parts)?;
        let output_rows = if s == 0 && n_seq > 1 { Some(ctx.new_tensor(DType::I32, &[n_seq])?.set_input()) } else { None };
        let mut scope = BuildScope::batched(ctx, graph, &model.weights, inputs.positions, inputs.freq_factors, sequences)?
            .with_kernels(self.kernels)
            .with_output_rows(output_rows);
        let which = if s == 0 { Logits::Last } else { Logits::All };
        let last = model.decoder.build(&mut scope, x, which)?;
        let heads = w(model.audio_head);
        let head = ctx.view(heads, &[heads.ne(0), heads.ne(1)], &[heads.strides()[1]], s * heads.strides()[2])?;
        let logits = ctx.product(head, last)?.set_output();
        graph.expand(logits)?;
        Ok(DecoderSlots {
            code_offset: (s * model.config.audio_vocab) as u32,
            codes: codes.slot(),
            hidden: hidden.map(Tensor::slot),
            output_rows: output_rows.map(Tensor::slot),
            inputs: inputs.slots(),
            logits: logits.slot(),
        })
    }
}

impl DecoderSlots {
    /// Fills the inputs of the step: each session's code of the step's codebook and, at step 0, its
    /// backbone state; rows stored at `cells[i]` of `caches[i]`.
    pub fn write(
        &self,
        graph: StepGraph<'_>,
        model: &CsmModel,
        codes: &[u32],
        hidden: &[&[f32]],
        caches: &[&KvCache],
        cells: &[std::ops::Range<usize>],
    ) -> Result<()> {
        graph.at(self.codes)?.write_i32(&codes.iter().map(|&c| (c + self.code_offset) as i32).collect::<Vec<_>>())?;
        if let Some(h) = self.hidden {
            graph.at(h)?.write_f32(&hidden.concat())?;
        }
        if let Some(t) = self.output_rows {
            graph.at(t)?.write_i32(&(0..caches.len() as i32).map(|i| 2 * i + 1).collect::<Vec<_>>())?;
        }
        self.inputs.write(graph, model.decoder.freq_factors(), caches, cells)
    }
}
