//! Streaming Mimi decoding: frames of codes in, samples out, with the causal state carried between
//! calls (every convolution's state and the transformer's KV cache over the last `context` steps), so
//! decoding frame by frame gives what decoding a whole clip gives. The weights are the codec's
//! (`MimiCodec`), the state each stream's (`MimiStream`, owned by its caller). Graphs of the same
//! shape are kept with their stream: a frame costs input writes and one compute.

use std::ops::Range;

use ggml::{Backend, ComputeBuffer, Context, DType, Graph, NodeTime, Slot};

use super::config::MimiConfig;
use super::conv::{ConvScope, ConvStates};
use super::model::MimiModel;
use super::Frame;
use crate::attention::{BuildScope, StepInputs};
use crate::engine::step::{GraphKey, KeptGraphs, StepBuilder, StepRunner};
use crate::error::{Error, Result};
use crate::kv_cache::{EvictionPolicy, KvCache, KvCacheConfig, Rotation, DECODE_WINDOW};
use crate::memory::make_room;
use crate::CacheType;

/// Runtime settings of a codec.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MimiOptions {
    pub n_threads: usize,
    /// Types of the transformer's KV cache.
    pub k_type: CacheType,
    pub v_type: CacheType,
    /// Most frames decoded by one graph; longer inputs are split (the state carries across).
    pub max_chunk_frames: usize,
}

impl Default for MimiOptions {
    fn default() -> Self {
        MimiOptions { n_threads: 2, k_type: CacheType::F32, v_type: CacheType::F32, max_chunk_frames: 16 }
    }
}

/// Kept graphs per stream at most (frame-by-frame streaming needs two attention windows, clip
/// decoding a chunk size and a remainder).
const KEPT_GRAPHS: usize = 4;

/// A codec's weights and backend, shared by every stream it decodes.
pub struct MimiCodec {
    model: MimiModel,
    backend: Backend,
    /// Stays empty: every chunk graph is kept with its stream (it has its own buffer).
    compute: ComputeBuffer,
    /// The transformer cache of new streams.
    cache_config: KvCacheConfig,
    max_chunk: usize,
}

/// One audio stream's decoding state: every convolution's state, the transformer's KV cache over
/// the last `context` steps, and the kept graphs over them. Its caller owns it; the codec decodes
/// into it.
pub struct MimiStream {
    states: ConvStates,
    cache: KvCache,
    kept: KeptGraphs<ChunkSlots>,
    /// Codebooks of the frames of this stream (fixed by its first frame).
    codebooks: Option<usize>,
    frames: u64,
}

impl MimiStream {
    /// Bytes of the stream's state: the KV cache and the convolutions' states.
    pub fn bytes(&self) -> usize {
        self.cache.memory_usage() + self.states.bytes()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Frames decoded since the stream started.
    pub fn frames_decoded(&self) -> u64 {
        self.frames
    }

    /// Starts the stream again: zero states, an empty cache, positions from 0.
    pub fn reset(&mut self) -> Result<()> {
        self.states.reset()?;
        self.cache.clear();
        self.codebooks = None;
        self.frames = 0;
        Ok(())
    }

    /// Converts the transformer's cache.
    pub fn set_cache_types(&mut self, k_type: CacheType, v_type: CacheType) -> Result<()> {
        self.cache.quantize(k_type, v_type)?;
        Ok(())
    }
}

impl MimiCodec {
    pub fn new(model: MimiModel, options: MimiOptions) -> Result<Self> {
        if options.max_chunk_frames == 0 {
            return Err(Error::Input("the codec needs chunks of at least one frame".into()));
        }
        let t = &model.config().transformer;
        let capacity = Self::cache_capacity(model.config(), options.max_chunk_frames);
        let cache_config = KvCacheConfig::uniform(t.n_layer, t.head_dim, t.n_head_kv, capacity, options.k_type, options.v_type);
        cache_config.validate()?;
        Ok(MimiCodec {
            model,
            backend: Backend::cpu(options.n_threads)?,
            compute: ComputeBuffer::new()?,
            cache_config,
            max_chunk: options.max_chunk_frames,
        })
    }

    /// A new stream (zero states, an empty cache).
    pub fn new_stream(&self) -> Result<MimiStream> {
        Ok(MimiStream {
            states: ConvStates::new(&self.model.state_layout)?,
            cache: KvCache::with_rotation(self.cache_config.clone(), Rotation::default())?,
            kept: KeptGraphs::new(KEPT_GRAPHS),
            codebooks: None,
            frames: 0,
        })
    }

    /// Cells of the transformer's KV cache for chunks of up to `max_chunk_frames` frames: a query needs
    /// the `context - 1` steps before it, eviction keeps 3/4 of the capacity, and a chunk's steps must fit
    /// beside what it keeps.
    pub fn cache_capacity(config: &MimiConfig, max_chunk_frames: usize) -> usize {
        let t = &config.transformer;
        let steps = max_chunk_frames * config.upsample_stride;
        let needed = ((t.context - 1) * 4).div_ceil(3).max(t.context - 1 + steps) + 1;
        needed.div_ceil(DECODE_WINDOW) * DECODE_WINDOW
    }

    pub fn model(&self) -> &MimiModel {
        &self.model
    }

    /// The weights back.
    pub fn into_model(self) -> MimiModel {
        self.model
    }

    /// Samples (per channel) one frame becomes.
    pub fn frame_samples(&self) -> usize {
        self.model.config().frame_samples()
    }

    /// Checks frames against the codec and the stream: every frame the same number of codebooks (1 to
    /// the codec's, the stream's so far), every code below the codebook size. The error names the frame.
    pub fn check_frames(&self, stream: &MimiStream, frames: &[Frame]) -> Result<usize> {
        let c = self.model.config();
        let first_index = stream.frames as usize;
        let want = stream.codebooks.or_else(|| frames.first().map(Vec::len)).unwrap_or(c.n_q);
        if want == 0 || want > c.n_q {
            return Err(Error::Input(format!("frame {first_index} has {want} codes; this codec decodes 1 to {} codebooks", c.n_q)));
        }
        for (i, frame) in frames.iter().enumerate() {
            let index = first_index + i;
            if frame.len() != want {
                return Err(Error::Input(format!("frame {index} has {} codes, the frames before it {want}", frame.len())));
            }
            if let Some((k, &code)) = frame.iter().enumerate().find(|(_, &code)| code as usize >= c.codebook_size) {
                return Err(Error::Input(format!(
                    "frame {index}: code {code} of codebook {k} is not below the codebook size {}",
                    c.codebook_size
                )));
            }
        }
        Ok(want)
    }

    /// Decodes the next frames of `stream`; returns their samples (interleaved when the codec has
    /// several channels), `frame_samples()` per frame.
    pub fn decode(&mut self, stream: &mut MimiStream, frames: &[Frame]) -> Result<Vec<f32>> {
        self.decode_with(stream, frames, None)
    }

    /// `decode`, computing the graphs node by node and adding each node's time to `profile`.
    pub fn decode_profiled(&mut self, stream: &mut MimiStream, frames: &[Frame], profile: &mut Vec<NodeTime>) -> Result<Vec<f32>> {
        self.decode_with(stream, frames, Some(profile))
    }

    fn decode_with(&mut self, stream: &mut MimiStream, frames: &[Frame], mut profile: Option<&mut Vec<NodeTime>>) -> Result<Vec<f32>> {
        let codebooks = self.check_frames(stream, frames)?;
        stream.codebooks = Some(codebooks);
        let mut samples = Vec::with_capacity(frames.len() * self.frame_samples() * self.model.config().channels);
        for chunk in frames.chunks(self.max_chunk) {
            samples.extend(self.decode_chunk(stream, chunk, codebooks, profile.as_deref_mut())?);
            stream.frames += chunk.len() as u64;
        }
        Ok(samples)
    }

    fn decode_chunk(
        &mut self,
        stream: &mut MimiStream,
        frames: &[Frame],
        codebooks: usize,
        profile: Option<&mut Vec<NodeTime>>,
    ) -> Result<Vec<f32>> {
        let c = self.model.config();
        let steps = frames.len() * c.upsample_stride;
        // Only the last `context` steps are ever attended to: older cells go.
        make_room(&mut stream.cache, steps, EvictionPolicy::SinkRecent { sinks: 0 })?;
        let start = stream.cache.len();
        let cells = stream.cache.append(steps)?;
        let result = self.compute(stream, frames, codebooks, cells, profile);
        if result.is_err() {
            stream.cache.truncate(start);
        }
        result
    }

    fn compute(
        &mut self,
        stream: &mut MimiStream,
        frames: &[Frame],
        codebooks: usize,
        cells: Range<usize>,
        profile: Option<&mut Vec<NodeTime>>,
    ) -> Result<Vec<f32>> {
        let n_kv = stream.cache.decode_window();
        let step = ChunkStep { model: &self.model, cache: &stream.cache, states: &stream.states, frames: frames.len(), codebooks, n_kv };
        let key = GraphKey::new(&[frames.len() as u64, codebooks as u64]).with_cache(&stream.cache, n_kv);
        let c = self.model.config();
        let codes: Vec<i32> =
            frames.iter().flat_map(|f| f.iter().enumerate().map(|(k, &code)| (code as usize + k * c.codebook_size) as i32)).collect();
        let cache = &stream.cache;
        let mut runner = StepRunner { backend: &self.backend, compute: &mut self.compute, profile };
        runner.run(
            &step,
            Some((&mut stream.kept, key)),
            |graph, io| {
                graph.at(io.codes)?.write_i32(&codes)?;
                let positions = &cache.positions()[cells.clone()];
                graph.at(io.positions)?.write_i32(positions)?;
                graph.at(io.cells)?.write_i64(&KvCache::cell_indices(cells.clone()))?;
                graph.at(io.mask)?.write_f32(&cache.windowed_attention_mask(positions, n_kv, c.transformer.context))?;
                Ok(())
            },
            |graph, io| Ok(graph.at(io.audio)?.read_f32()?),
        )
    }
}

/// A codec with one stream, ready to turn frames into samples (what the command line, the benches and
/// the tests drive).
pub struct MimiDecoder {
    codec: MimiCodec,
    stream: MimiStream,
}

impl MimiDecoder {
    pub fn new(model: MimiModel, options: MimiOptions) -> Result<Self> {
        let codec = MimiCodec::new(model, options)?;
        let stream = codec.new_stream()?;
        Ok(MimiDecoder { codec, stream })
    }

    /// The codec and the stream, to decode with the codec's functions.
    pub fn parts_mut(&mut self) -> (&mut MimiCodec, &mut MimiStream) {
        (&mut self.codec, &mut self.stream)
    }

    /// The codec back, for streams of its own, dropping this one.
    pub fn into_codec(self) -> MimiCodec {
        self.codec
    }

    pub fn codec(&self) -> &MimiCodec {
        &self.codec
    }

    pub fn model(&self) -> &MimiModel {
        self.codec.model()
    }

    /// The weights back, dropping the decoding state.
    pub fn into_model(self) -> MimiModel {
        self.codec.into_model()
    }

    pub fn cache(&self) -> &KvCache {
        &self.stream.cache
    }

    /// Bytes of the decoding state: the KV cache and the convolutions' states.
    pub fn state_bytes(&self) -> usize {
        self.stream.bytes()
    }

    /// Frames decoded since the stream started.
    pub fn frames_decoded(&self) -> u64 {
        self.stream.frames
    }

    /// Samples (per channel) one frame becomes.
    pub fn frame_samples(&self) -> usize {
        self.codec.frame_samples()
    }

    /// Starts a new stream: zero states, an empty cache, positions from 0.
    pub fn reset(&mut self) -> Result<()> {
        self.stream.reset()
    }

    /// Converts the transformer's cache.
    pub fn set_cache_types(&mut self, k_type: CacheType, v_type: CacheType) -> Result<()> {
        self.stream.set_cache_types(k_type, v_type)
    }

    /// See `MimiCodec::check_frames` (for this decoder's stream).
    pub fn check_frames(&self, frames: &[Frame]) -> Result<usize> {
        self.codec.check_frames(&self.stream, frames)
    }

    /// Decodes the next frames of the stream (see `MimiCodec::decode`).
    pub fn decode(&mut self, frames: &[Frame]) -> Result<Vec<f32>> {
        self.codec.decode(&mut self.stream, frames)
    }

    /// `decode`, computing the graphs node by node and adding each node's time to `profile`.
    pub fn decode_profiled(&mut self, frames: &[Frame], profile: &mut Vec<NodeTime>) -> Result<Vec<f32>> {
        self.codec.decode_profiled(&mut self.stream, frames, profile)
    }
}

/// The graph of one chunk: codes → latent → upsampled → transformer (over the cache) → SEANet →
/// samples, then every convolution's new state.
struct ChunkStep<'a> {
    model: &'a MimiModel,
    cache: &'a KvCache,
    states: &'a ConvStates,
    frames: usize,
    codebooks: usize,
    n_kv: usize,
}

/// The inputs and output of a chunk's graph.
struct ChunkSlots {
    codes: Slot,
    positions: Slot,
    cells: Slot,
    mask: Slot,
    audio: Slot,
}

impl StepBuilder for ChunkStep<'_> {
    type Io = ChunkSlots;

    fn max_nodes(&self) -> usize {
        self.model.transformer.max_nodes() + self.model.seanet.max_nodes() + 64
    }

    fn build<'c>(&self, ctx: &'c Context, graph: &mut Graph<'c>) -> Result<ChunkSlots>
    where
        Self: 'c,
    {
        let model = self.model;
        let steps = (self.frames * model.config().upsample_stride) as i64;
        let input = |t: DType, shape: &[i64]| -> Result<ggml::Tensor<'c>> { Ok(ctx.new_tensor(t, shape)?.set_input()) };
        let codes = input(DType::I32, &[(self.codebooks * self.frames) as i64])?;
        let inputs = StepInputs {
            positions: input(DType::I32, &[steps])?,
            cells: input(DType::I64, &[steps])?,
            mask: input(DType::F16, &[self.n_kv as i64, steps])?,
            freq_factors: None,
        };
        let mut convs = ConvScope { ctx, weights: &model.weights, states: self.states, updates: Vec::new() };
        let latent = model.build_latent(ctx, codes, self.codebooks)?;
        let upsampled = model.upsample.build(&mut convs, latent)?;
        let mut scope = BuildScope::new(ctx, graph, &model.weights, self.cache, inputs);
        let hidden = model.transformer.build(&mut scope, upsampled)?;
        let audio = model.seanet.build(&mut convs, hidden)?.set_name("codec.audio").set_output();
        graph.expand(audio)?;
        // After everything that reads the old states.
        for update in convs.updates {
            graph.expand(update)?;
        }
        Ok(ChunkSlots {
            codes: codes.slot(),
            positions: inputs.positions.slot(),
            cells: inputs.cells.slot(),
            mask: inputs.mask.slot(),
            audio: audio.slot(),
        })
    }
}
