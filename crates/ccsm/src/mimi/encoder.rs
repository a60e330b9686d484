//! Mimi's encode path on ggml: 24 kHz samples → SEANet encoder (conv k7, per ratio residual units, ELU and
//! a strided conv; ELU, conv to the hidden width) → the encoder transformer (its own weights, the same
//! block as the decoder's, a causal window of `context` steps) → the learnt stride-2 conv (25 → 12.5 Hz,
//! replicate padding at the start) → split RVQ: each group projects the same latent (semantic: one
//! codebook; acoustic: residual codebooks), nearest centroid by L2, residual subtracted.
//!
//! Every conv carries its state between calls, so encoding frame by frame (1920 samples in, one frame
//! out) gives what encoding the whole clip gives. See docs/mimi.md.

use std::ops::Range;

use ggml::{Context, DType, Graph, Slot, Tensor, TensorId, TensorStore};

use super::config::MimiConfig;
use super::conv::{CausalConv, ConvScope, ConvStates, StateLayout, StridedConv};
use super::decoder::MimiCodec;
use super::model::MimiModel;
use super::seanet::ResidualUnit;
use super::transformer::MimiTransformer;
use super::Frame;
use crate::attention::{BatchInputs, BatchSlots, BuildScope, SequencePart};
use crate::engine::step::{GraphKey, StepBuilder, StepRunner};
use crate::engine::PER_SEQUENCE_NODES;
use crate::error::{Error, Result};
use crate::kv_cache::{EvictionPolicy, KvCache, KvCacheConfig, Rotation};
use crate::memory::make_room;
use crate::weights::WeightLoader;

/// Most frames one encode graph takes (longer audio runs in chunks, the state carried).
const MAX_CHUNK_FRAMES: usize = 16;

/// The encode path's weights.
pub(crate) struct EncoderWeights {
    conv_in: CausalConv,
    /// Per SEANet ratio (the decoder's reversed): residual units, then the strided conv.
    stages: Vec<(Vec<ResidualUnit>, StridedConv)>,
    conv_out: CausalConv,
    transformer: MimiTransformer,
    downsample: StridedConv,
    semantic_in: TensorId,
    acoustic_in: TensorId,
    /// −‖c‖²/2 of every centroid, F32 `[size, n_q]`: computed once when the weights are loaded.
    half_norms: Option<(TensorStore, TensorId)>,
    /// The conv states an encode stream carries.
    pub(crate) layout: StateLayout,
}

/// Whether the file holds the encode path (`{prefix}encoder.conv_in.weight` and the rest).
pub(crate) fn file_has_encoder(file: &ggml::gguf::GgufFile, prefix: &str) -> bool {
    file.tensor(&format!("{prefix}encoder.conv_in.weight")).is_ok()
}

impl EncoderWeights {
    /// Declares `{prefix}encoder.*` and the quantizer's input projections.
    pub(crate) fn declare(loader: &mut WeightLoader<'_>, prefix: &str, c: &MimiConfig) -> Result<Self> {
        let mut layout = StateLayout::default();
        let s = &c.seanet;
        let name = |t: String| format!("{prefix}encoder.{t}");
        let conv_in = CausalConv::load(loader, &mut layout, &name("conv_in".into()), [c.channels, s.kernel_size, s.filters], 1)?;
        let mut stages = Vec::with_capacity(s.ratios.len());
        for (i, &ratio) in s.ratios.iter().rev().enumerate() {
            let width = s.filters << i;
            let residuals = (0..s.residual_layers)
                .map(|j| ResidualUnit::load(loader, &mut layout, &name(format!("res.{i}.{j}")), s, width, j))
                .collect::<Result<Vec<_>>>()?;
            let down = StridedConv::load(loader, &mut layout, &name(format!("down.{i}")), [width, 2 * width], ratio, true)?;
            stages.push((residuals, down));
        }
        let top = s.filters << s.ratios.len();
        let conv_out = CausalConv::load(loader, &mut layout, &name("conv_out".into()), [top, s.last_kernel_size, c.hidden], 1)?;
        let transformer = MimiTransformer::load(loader, &format!("{prefix}encoder."), c.transformer.clone(), c.hidden)?;
        let downsample =
            StridedConv::load(loader, &mut layout, &name("downsample".into()), [c.hidden, c.hidden], c.upsample_stride, false)?;
        let mut projection = |group: &str| loader.matrix(&format!("{prefix}quantizer.{group}_in_proj.weight"), &[c.hidden, c.codebook_dim]);
        let semantic_in = projection("semantic")?;
        let acoustic_in = projection("acoustic")?;
        Ok(EncoderWeights { conv_in, stages, conv_out, transformer, downsample, semantic_in, acoustic_in, half_norms: None, layout })
    }

    /// Computes the centroids' −‖c‖²/2 from the loaded codebooks `[dim, size · n_q]`.
    pub(crate) fn finish(
        &mut self,
        weights: &TensorStore,
        codebooks: TensorId,
        c: &MimiConfig,
        placement: &crate::Placement,
    ) -> Result<()> {
        let centroids = weights.get(codebooks).read_f32()?;
        let half_norms: Vec<f32> =
            centroids.chunks_exact(c.codebook_dim).map(|v| -0.5 * v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() as f32).collect();
        let mut store = TensorStore::new(1)?;
        let id = store.add("encoder.codebook_half_norms", DType::F32, &[c.codebook_size as i64, c.n_q as i64])?;
        placement.allocate(&mut store)?;
        store.get(id).write_f32(&half_norms)?;
        self.half_norms = Some((store, id));
        Ok(())
    }
}

/// One audio stream being encoded: every conv's state and the encoder transformer's cache.
pub struct EncodeStream {
    states: ConvStates,
    cache: KvCache,
    /// Frames encoded so far (the first call starts the downsampler's replicate padding).
    frames: u64,
}

impl EncodeStream {}

impl MimiCodec {
    /// The encode path's weights, or an error saying the file has none.
    fn encoder(&self) -> Result<&EncoderWeights> {
        self.model().encoder.as_ref().ok_or_else(|| {
            Error::Input(format!(
                "{} holds only the decoder: encoding needs the encoder's weights (convert the checkpoint again with tools/convert_mimi.py)",
                self.model().name()
            ))
        })
    }

    /// A new encode stream (zero states, an empty cache).
    pub fn new_encode_stream(&self) -> Result<EncodeStream> {
        let encoder = self.encoder()?;
        let c = self.model().config();
        let t = &c.transformer;
        let cells = MimiCodec::cache_capacity(c, MAX_CHUNK_FRAMES);
        let config = KvCacheConfig::uniform(t.n_layer, t.head_dim, t.n_head_kv, cells, crate::CacheType::F32, crate::CacheType::F32);
        Ok(EncodeStream {
            states: ConvStates::new(&encoder.layout, self.model().placement())?,
            cache: KvCache::placed(config, Rotation::default(), self.model().placement())?,
            frames: 0,
        })
    }

    /// Encodes the next samples of `stream` (a whole number of frames, `frame_samples()` each) into
    /// frames of the first `codebooks` codebooks.
    pub fn encode(&mut self, stream: &mut EncodeStream, samples: &[f32], codebooks: usize) -> Result<Vec<Frame>> {
        let c = self.model().config().clone();
        let per_frame = c.frame_samples() * c.channels;
        if !samples.len().is_multiple_of(per_frame) {
            return Err(Error::Input(format!("{} samples are not whole frames of {per_frame}", samples.len())));
        }
        if codebooks == 0 || codebooks > c.n_q {
            return Err(Error::Input(format!("{codebooks} codebooks: this codec encodes 1 to {}", c.n_q)));
        }
        if let Some(i) = samples.iter().position(|s| !s.is_finite()) {
            return Err(Error::Input(format!("sample {i} is not a number")));
        }
        let mut frames = Vec::with_capacity(samples.len() / per_frame);
        for chunk in samples.chunks(MAX_CHUNK_FRAMES * per_frame) {
            frames.extend(self.encode_chunk(stream, chunk, codebooks)?);
        }
        Ok(frames)
    }

    /// Encodes a whole clip: zero-padded to whole frames (as moshi does), one new stream.
    pub fn encode_all(&mut self, samples: &[f32], codebooks: usize) -> Result<Vec<Frame>> {
        let per_frame = self.model().config().frame_samples() * self.model().config().channels;
        let mut padded = samples.to_vec();
        padded.resize(samples.len().div_ceil(per_frame).max(1) * per_frame, 0.0);
        let mut stream = self.new_encode_stream()?;
        self.encode(&mut stream, &padded, codebooks)
    }

    /// The latent before quantization of a whole clip, `[frames][hidden]` (for tests and measurements
    /// against upstream encoders).
    pub fn encode_latent(&mut self, samples: &[f32]) -> Result<Vec<f32>> {
        let per_frame = self.model().config().frame_samples();
        if samples.is_empty() || !samples.len().is_multiple_of(per_frame) {
            return Err(Error::Input(format!("{} samples are not whole frames of {per_frame}", samples.len())));
        }
        let mut stream = self.new_encode_stream()?;
        let mut latent = Vec::new();
        for chunk in samples.chunks(MAX_CHUNK_FRAMES * per_frame) {
            latent.extend(self.run_chunk(&mut stream, chunk, 0)?.0);
        }
        Ok(latent)
    }

    fn encode_chunk(&mut self, stream: &mut EncodeStream, samples: &[f32], codebooks: usize) -> Result<Vec<Frame>> {
        let (_, codes) = self.run_chunk(stream, samples, codebooks)?;
        let n = samples.len() / self.model().config().frame_samples();
        Ok((0..n).map(|t| codes.iter().map(|k| k[t] as u32).collect()).collect())
    }

    /// One graph over `samples`: the latent and, per codebook, each frame's code.
    fn run_chunk(&mut self, stream: &mut EncodeStream, samples: &[f32], codebooks: usize) -> Result<(Vec<f32>, Vec<Vec<i32>>)> {
        let c = self.model().config();
        let steps = samples.len() / c.frame_samples() * c.upsample_stride;
        make_room(&mut stream.cache, steps, EvictionPolicy::SinkRecent { sinks: 0 })?;
        let start = stream.cache.len();
        let cells = stream.cache.append(steps)?;
        let result = self.compute_chunk(stream, samples, codebooks, cells);
        match result {
            Ok(out) => {
                stream.frames += (samples.len() / self.model().config().frame_samples()) as u64;
                Ok(out)
            }
            Err(e) => {
                stream.cache.truncate(start);
                Err(e)
            }
        }
    }

    fn compute_chunk(
        &mut self,
        stream: &EncodeStream,
        samples: &[f32],
        codebooks: usize,
        cells: Range<usize>,
    ) -> Result<(Vec<f32>, Vec<Vec<i32>>)> {
        let (model, backend, compute, graphs) = self.parts();
        let encoder = model.encoder.as_ref().ok_or_else(|| Error::Invariant("encoding without the encoder's weights".into()))?;
        let step = EncodeStep {
            model,
            encoder,
            cache: &stream.cache,
            states: &stream.states,
            samples: samples.len(),
            codebooks,
            n_kv: stream.cache.decode_window(),
            first: stream.frames == 0,
        };
        let caches = [&stream.cache];
        let context = model.config().transformer.context;
        let mut runner = StepRunner { backend, compute, profile: None };
        // Kept while the stream's chunks keep their shape (frame after frame when streaming); its first
        // chunk (the downsampler's replicate start) has a graph of its own.
        let key = GraphKey::new(&[samples.len() as u64, codebooks as u64, step.first as u64]).with_cache(&stream.cache, step.n_kv);
        runner.run(
            &step,
            Some((graphs, key)),
            |graph, io| {
                graph.at(io.samples)?.write_f32(samples)?;
                io.inputs.clone().windowed(context).write(graph, None, &caches, std::slice::from_ref(&cells))
            },
            |graph, io| {
                let latent = graph.at(io.latent)?.read_f32()?;
                let codes = io.codes.iter().map(|&s| graph.at(s)?.read_i32().map_err(Error::from)).collect::<Result<Vec<_>>>()?;
                Ok((latent, codes))
            },
        )
    }
}

/// The graph of one chunk of samples.
struct EncodeStep<'a> {
    model: &'a MimiModel,
    encoder: &'a EncoderWeights,
    cache: &'a KvCache,
    states: &'a ConvStates,
    samples: usize,
    codebooks: usize,
    n_kv: usize,
    /// The stream's first chunk: the downsampler pads with its first column.
    first: bool,
}

/// The inputs and outputs of an encode graph.
pub(super) struct EncodeSlots {
    samples: Slot,
    inputs: BatchSlots,
    /// `[hidden, frames]`.
    latent: Slot,
    /// Per codebook: I32 `[frames]`.
    codes: Vec<Slot>,
}

impl StepBuilder for EncodeStep<'_> {
    type Io = EncodeSlots;

    fn max_nodes(&self) -> usize {
        let c = self.model.config();
        let seanet = 32 + c.seanet.ratios.len() * (24 + 24 * c.seanet.residual_layers);
        seanet + self.model.transformer.max_nodes() + PER_SEQUENCE_NODES * c.transformer.n_layer + 16 * c.n_q + 64
    }

    fn build<'c>(&self, ctx: &'c Context, graph: &mut Graph<'c>) -> Result<EncodeSlots>
    where
        Self: 'c,
    {
        let (model, e) = (self.model, self.encoder);
        let c = model.config();
        let samples = ctx.new_tensor(DType::F32, &[c.channels as i64, (self.samples / c.channels) as i64])?.set_input();
        let mut convs = ConvScope { ctx, weights: &model.weights, states: self.states, updates: Vec::new() };
        let mut x = e.conv_in.build(&mut convs, samples)?;
        for (residuals, down) in &e.stages {
            for unit in residuals {
                x = unit.build(&mut convs, x)?;
            }
            x = down.build(&mut convs, ctx.elu(x)?, false)?;
        }
        let x = e.conv_out.build(&mut convs, ctx.elu(x)?)?;
        // The transformer over the 25 Hz steps, attending over the stream's cache.
        let steps = x.ne(1) as usize;
        let (inputs, sequences) = BatchInputs::new(ctx, None, &[self.cache], &[SequencePart { rows: steps, n_kv: self.n_kv }])?;
        let mut scope = BuildScope::batched(ctx, graph, &model.weights, inputs.positions, None, sequences)?;
        let hidden = e.transformer.build(&mut scope, x)?;
        let latent = e.downsample.build(&mut convs, hidden, self.first)?.set_output();
        graph.expand(latent)?;
        let codes = quantize(ctx, graph, model, e, latent, self.codebooks)?;
        for update in convs.updates {
            graph.expand(update)?;
        }
        Ok(EncodeSlots { samples: samples.slot(), inputs: inputs.slots(), latent: latent.slot(), codes })
    }
}

/// Split RVQ encoding of `latent` `[hidden, frames]`: the semantic codebook from its projection, the
/// acoustic ones as residual stages from theirs; nearest centroid by L2 (argmax of c·x − ‖c‖²/2).
fn quantize<'c>(
    ctx: &'c Context,
    graph: &mut Graph<'c>,
    model: &'c MimiModel,
    e: &'c EncoderWeights,
    latent: Tensor<'c>,
    codebooks: usize,
) -> Result<Vec<Slot>> {
    let c = model.config();
    let (dim, size) = (c.codebook_dim as i64, c.codebook_size as i64);
    let all = model.weights.get(model.codebooks_id());
    let (store, id) = e.half_norms.as_ref().ok_or_else(|| Error::Invariant("the codebooks' norms were not computed".into()))?;
    let norms = store.get(*id);
    let row = all.strides()[1];
    let mut codes = Vec::with_capacity(codebooks);
    let stage = |x: Tensor<'c>, k: usize| -> Result<(Tensor<'c>, Tensor<'c>)> {
        let book = ctx.view(all, &[dim, size], &[row], k * size as usize * row)?;
        let half_norms = ctx.view(norms, &[size, 1], &[norms.strides()[1]], k * norms.strides()[1])?;
        let scores = ctx.add(ctx.mul_mat(book, x)?, half_norms)?;
        let code = ctx.argmax(scores)?.set_output();
        let chosen = ctx.get_rows(book, code)?;
        Ok((code, ctx.add(x, ctx.scale(chosen, -1.0)?)?))
    };
    let semantic = ctx.mul_mat(model.weights.get(e.semantic_in), latent)?;
    let mut x = semantic;
    for k in 0..codebooks.min(c.n_semantic) {
        let (code, rest) = stage(x, k)?;
        graph.expand(code)?;
        codes.push(code.slot());
        x = rest;
    }
    if codebooks > c.n_semantic {
        let mut x = ctx.mul_mat(model.weights.get(e.acoustic_in), latent)?;
        for k in c.n_semantic..codebooks {
            let (code, rest) = stage(x, k)?;
            graph.expand(code)?;
            codes.push(code.slot());
            x = rest;
        }
    }
    Ok(codes)
}
