//! Streaming Mimi decoding: frames of codes in, samples out, with the causal state carried between
//! calls (every convolution's state and the transformer's KV cache over the last `context` steps), so
//! decoding frame by frame gives what decoding a whole clip gives. The weights are the codec's
//! (`MimiCodec`), the state each stream's (`MimiStream`, owned by its caller). Several streams'
//! frames are decoded in one graph: the transformer runs over every stream's steps at once (each
//! attending over its own cache), the convolutions per stream over its own states. Graphs are kept,
//! keyed by their streams' caches: a frame costs input writes and one compute.

use std::ops::Range;

use ggml::{Backend, ComputeBuffer, Context, DType, Graph, NodeTime, Slot, Tensor};

use super::config::MimiConfig;
use super::conv::{ConvScope, ConvStates};
use super::encoder::EncodeSlots;
use super::model::MimiModel;
use super::Frame;
use crate::attention::{BatchInputs, BatchSlots, BuildScope, SequencePart};
use crate::engine::step::{GraphKey, KeptGraphs, StepBuilder, StepRunner};
use crate::engine::PER_SEQUENCE_NODES;
use crate::error::{Error, Result};
use crate::kv_cache::{EvictionPolicy, KvCache, KvCacheConfig, Rotation, DECODE_WINDOW};
use crate::memory::make_room;
use crate::CacheType;

/// Runtime settings of a codec.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MimiOptions {
    /// ggml threads.
    pub n_threads: usize,
    /// Types of the transformer's KV cache.
    pub k_type: CacheType,
    /// V type of the transformer's KV cache.
    pub v_type: CacheType,
    /// Most frames decoded by one graph; longer inputs are split (the state carries across).
    pub max_chunk_frames: usize,
}

impl Default for MimiOptions {
    fn default() -> Self {
        MimiOptions { n_threads: 2, k_type: CacheType::F32, v_type: CacheType::F32, max_chunk_frames: 16 }
    }
}

/// Kept graphs at most (a stream decoded frame by frame needs two attention windows, clip decoding a
/// chunk size and a remainder; a server's streams decoded together need one per window they are in).
const KEPT_GRAPHS: usize = 8;

/// One stream's part of a decode: its next frames.
pub struct StreamChunk<'a> {
    /// The stream the frames continue.
    pub stream: &'a mut MimiStream,
    /// Its next frames.
    pub frames: &'a [Frame],
}

/// A codec's weights and backend, shared by every stream it decodes.
pub struct MimiCodec {
    model: MimiModel,
    backend: Backend,
    /// Memory of graphs run fresh (a key's first use; kept graphs have their own buffers).
    compute: ComputeBuffer,
    kept: KeptGraphs<ChunkSlots>,
    /// Kept encode graphs (see `encoder`).
    encode_graphs: KeptGraphs<EncodeSlots>,
    /// The transformer cache of new streams.
    cache_config: KvCacheConfig,
    max_chunk: usize,
}

/// One audio stream's decoding state: every convolution's state and the transformer's KV cache over
/// the last `context` steps. Its caller owns it; the codec decodes into it.
pub struct MimiStream {
    states: ConvStates,
    cache: KvCache,
    /// Codebooks of the frames of this stream (fixed by its first frame).
    codebooks: Option<usize>,
    frames: u64,
}

impl MimiStream {
    /// Bytes of the stream's state: the KV cache and the convolutions' states.
    pub fn bytes(&self) -> usize {
        self.cache.memory_usage() + self.states.bytes()
    }

    /// The transformer's KV cache.
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
    /// A codec over `model`'s weights.
    pub fn new(model: MimiModel, options: MimiOptions) -> Result<Self> {
        if options.max_chunk_frames == 0 {
            return Err(Error::Input("the codec needs chunks of at least one frame".into()));
        }
        let t = &model.config().transformer;
        let capacity = Self::cache_capacity(model.config(), options.max_chunk_frames);
        let cache_config = KvCacheConfig::uniform(t.n_layer, t.head_dim, t.n_head_kv, capacity, options.k_type, options.v_type);
        cache_config.validate()?;
        let backend = model.placement().backend(options.n_threads)?;
        let compute = ComputeBuffer::for_backend(&backend)?;
        Ok(MimiCodec {
            model,
            backend,
            compute,
            kept: KeptGraphs::new(KEPT_GRAPHS),
            encode_graphs: KeptGraphs::new(KEPT_GRAPHS),
            cache_config,
            max_chunk: options.max_chunk_frames,
        })
    }

    /// A new stream (zero states, an empty cache).
    pub fn new_stream(&self) -> Result<MimiStream> {
        Ok(MimiStream {
            states: ConvStates::new(&self.model.state_layout, self.model.placement())?,
            cache: KvCache::placed(self.cache_config.clone(), Rotation::default(), self.model.placement())?,
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

    /// The weights.
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

    /// The weights, the backend, the compute memory and the kept encode graphs, borrowed apart (for the
    /// encode path's steps).
    pub(super) fn parts(&mut self) -> (&MimiModel, &Backend, &mut ComputeBuffer, &mut KeptGraphs<EncodeSlots>) {
        (&self.model, &self.backend, &mut self.compute, &mut self.encode_graphs)
    }

    /// Checks frames against the codec and the stream: every frame the same number of codebooks (1 to
    /// the codec's, the stream's so far), every code below the codebook size. The error names the frame.
    pub fn check_frames(&self, stream: &MimiStream, frames: &[Frame]) -> Result<usize> {
        let c = self.model.config();
        let first_index = stream.frames as usize;
        let want = stream.codebooks.or_else(|| frames.first().map(Vec::len)).unwrap_or(c.n_q);
        if want == 0 || want > c.n_q {
            let why = format!("frame {first_index} has {want} codes; this codec decodes 1 to {} codebooks", c.n_q);
            return Err(Error::BadFrame { index: first_index, why });
        }
        for (i, frame) in frames.iter().enumerate() {
            let index = first_index + i;
            if frame.len() != want {
                return Err(Error::BadFrame {
                    index,
                    why: format!("frame {index} has {} codes, the frames before it {want}", frame.len()),
                });
            }
            if let Some((k, &code)) = frame.iter().enumerate().find(|(_, &code)| code as usize >= c.codebook_size) {
                return Err(Error::BadFrame {
                    index,
                    why: format!("frame {index}: code {code} of codebook {k} is not below the codebook size {}", c.codebook_size),
                });
            }
        }
        Ok(want)
    }

    /// Decodes the next frames of `stream`; returns their samples (interleaved when the codec has
    /// several channels), `frame_samples()` per frame.
    pub fn decode(&mut self, stream: &mut MimiStream, frames: &[Frame]) -> Result<Vec<f32>> {
        self.decode_with(&mut [StreamChunk { stream, frames }], None).map(|mut s| s.pop().unwrap_or_default())
    }

    /// `decode`, computing the graphs node by node and adding each node's time to `profile`.
    pub fn decode_profiled(&mut self, stream: &mut MimiStream, frames: &[Frame], profile: &mut Vec<NodeTime>) -> Result<Vec<f32>> {
        self.decode_with(&mut [StreamChunk { stream, frames }], Some(profile)).map(|mut s| s.pop().unwrap_or_default())
    }

    /// Decodes the next frames of every stream, all of them in one graph per chunk; returns each
    /// stream's samples, in order. Every stream's frames are checked before any is decoded.
    pub fn decode_streams(&mut self, chunks: &mut [StreamChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        self.decode_with(chunks, None)
    }

    fn decode_with(&mut self, chunks: &mut [StreamChunk<'_>], mut profile: Option<&mut Vec<NodeTime>>) -> Result<Vec<Vec<f32>>> {
        let mut codebooks = Vec::with_capacity(chunks.len());
        for c in chunks.iter() {
            self.model.placement().require_same(c.stream.cache.placement(), "the stream's cache")?;
            codebooks.push(self.check_frames(c.stream, c.frames)?);
        }
        let per_frame = self.frame_samples() * self.model.config().channels;
        let mut samples: Vec<Vec<f32>> = chunks.iter().map(|c| Vec::with_capacity(c.frames.len() * per_frame)).collect();
        let rounds = chunks.iter().map(|c| c.frames.len().div_ceil(self.max_chunk)).max().unwrap_or(0);
        for round in 0..rounds {
            let range =
                |c: &StreamChunk<'_>| (round * self.max_chunk).min(c.frames.len())..((round + 1) * self.max_chunk).min(c.frames.len());
            let mut parts: Vec<RoundPart<'_>> = Vec::new();
            let mut which = Vec::new();
            for (i, (c, &codebooks)) in chunks.iter_mut().zip(&codebooks).enumerate() {
                let frames = &c.frames[range(c)];
                if !frames.is_empty() {
                    c.stream.codebooks = Some(codebooks);
                    parts.push(RoundPart { stream: &mut *c.stream, frames, codebooks });
                    which.push(i);
                }
            }
            for (i, decoded) in which.into_iter().zip(self.decode_round(&mut parts, profile.as_deref_mut())?) {
                samples[i].extend(decoded);
            }
            for part in parts {
                part.stream.frames += part.frames.len() as u64;
            }
        }
        Ok(samples)
    }

    /// One graph over each part's frames (each at most a chunk); on error no stream's cache changes.
    fn decode_round(&mut self, parts: &mut [RoundPart<'_>], profile: Option<&mut Vec<NodeTime>>) -> Result<Vec<Vec<f32>>> {
        let stride = self.model.config().upsample_stride;
        let mut starts = Vec::with_capacity(parts.len());
        let mut cells = Vec::with_capacity(parts.len());
        let appended = (|| -> Result<()> {
            for p in parts.iter_mut() {
                let steps = p.frames.len() * stride;
                // Only the last `context` steps are ever attended to: older cells go.
                make_room(&mut p.stream.cache, steps, EvictionPolicy::SinkRecent { sinks: 0 })?;
                starts.push(p.stream.cache.len());
                cells.push(p.stream.cache.append(steps)?);
            }
            Ok(())
        })();
        let result = appended.and_then(|()| self.compute(parts, &cells, profile));
        if result.is_err() {
            for (p, &start) in parts.iter_mut().zip(&starts) {
                p.stream.cache.truncate(start);
            }
        }
        result
    }

    fn compute(&mut self, parts: &[RoundPart<'_>], cells: &[Range<usize>], profile: Option<&mut Vec<NodeTime>>) -> Result<Vec<Vec<f32>>> {
        let c = self.model.config();
        let streams: Vec<StreamPart<'_>> = parts
            .iter()
            .map(|p| StreamPart {
                cache: &p.stream.cache,
                states: &p.stream.states,
                frames: p.frames.len(),
                codebooks: p.codebooks,
                n_kv: p.stream.cache.decode_window(),
            })
            .collect();
        let key =
            streams.iter().fold(GraphKey::default(), |k, s| k.with(&[s.frames as u64, s.codebooks as u64]).with_cache(s.cache, s.n_kv));
        let caches: Vec<&KvCache> = streams.iter().map(|s| s.cache).collect();
        let codes: Vec<Vec<i32>> = parts
            .iter()
            .map(|p| {
                p.frames.iter().flat_map(|f| f.iter().enumerate().map(|(k, &code)| (code as usize + k * c.codebook_size) as i32)).collect()
            })
            .collect();
        let step = ChunkStep { model: &self.model, streams };
        let mut runner = StepRunner { backend: &self.backend, compute: &mut self.compute, profile };
        runner.run(
            &step,
            Some((&mut self.kept, key)),
            |graph, io| {
                for (slot, codes) in io.codes.iter().zip(&codes) {
                    graph.at(*slot)?.write_i32(codes)?;
                }
                io.inputs.write(graph, None, &caches, cells)
            },
            |graph, io| io.audio.iter().map(|&slot| Ok(graph.at(slot)?.read_f32()?)).collect(),
        )
    }
}

/// One stream's frames in one graph.
struct RoundPart<'a> {
    stream: &'a mut MimiStream,
    frames: &'a [Frame],
    codebooks: usize,
}

/// A codec with one stream, ready to turn frames into samples (what the command line, the benches and
/// the tests drive).
pub struct MimiDecoder {
    codec: MimiCodec,
    stream: MimiStream,
}

impl MimiDecoder {
    /// A codec with one new stream.
    pub fn new(model: MimiModel, options: MimiOptions) -> Result<Self> {
        let codec = MimiCodec::new(model, options)?;
        let stream = codec.new_stream()?;
        Ok(MimiDecoder { codec, stream })
    }

    /// The codec and the stream, to decode with the codec's functions.
    pub fn parts_mut(&mut self) -> (&mut MimiCodec, &mut MimiStream) {
        (&mut self.codec, &mut self.stream)
    }

    /// The weights.
    pub fn model(&self) -> &MimiModel {
        self.codec.model()
    }

    /// The weights back, dropping the decoding state.
    pub fn into_model(self) -> MimiModel {
        self.codec.into_model()
    }

    /// The stream's transformer cache.
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

/// The graph of one chunk of several streams: per stream codes → latent → upsampled; the transformer
/// over every stream's steps (each attending over its own cache); per stream SEANet → samples, then
/// every convolution's new state.
struct ChunkStep<'a> {
    model: &'a MimiModel,
    streams: Vec<StreamPart<'a>>,
}

/// One stream's part of a chunk graph.
struct StreamPart<'a> {
    cache: &'a KvCache,
    states: &'a ConvStates,
    frames: usize,
    codebooks: usize,
    /// Cells its steps attend over.
    n_kv: usize,
}

/// The inputs and outputs of a chunk's graph.
struct ChunkSlots {
    /// Per stream: its frames' codes.
    codes: Vec<Slot>,
    inputs: BatchSlots,
    /// Per stream: its samples.
    audio: Vec<Slot>,
}

impl StepBuilder for ChunkStep<'_> {
    type Io = ChunkSlots;

    fn max_nodes(&self) -> usize {
        let n = self.streams.len();
        let per_stream = self.model.seanet.max_nodes() + 64 + PER_SEQUENCE_NODES * self.model.config().transformer.n_layer;
        self.model.transformer.max_nodes() + n * per_stream + 64
    }

    fn build<'c>(&self, ctx: &'c Context, graph: &mut Graph<'c>) -> Result<ChunkSlots>
    where
        Self: 'c,
    {
        let model = self.model;
        let stride = model.config().upsample_stride;
        let mut convs: Vec<ConvScope<'c>> =
            self.streams.iter().map(|s| ConvScope { ctx, weights: &model.weights, states: s.states, updates: Vec::new() }).collect();
        let mut codes = Vec::with_capacity(self.streams.len());
        let mut upsampled: Option<Tensor<'c>> = None;
        for (s, convs) in self.streams.iter().zip(convs.iter_mut()) {
            let input = ctx.new_tensor(DType::I32, &[(s.codebooks * s.frames) as i64])?.set_input();
            codes.push(input.slot());
            let up = model.upsample.build(convs, model.build_latent(ctx, input, s.codebooks)?)?;
            upsampled = Some(match upsampled {
                Some(before) => ctx.concat(before, up, 1)?,
                None => up,
            });
        }
        let x = upsampled.ok_or(Error::EmptyInput("a codec step over no streams"))?;
        let parts: Vec<SequencePart> = self.streams.iter().map(|s| SequencePart { rows: s.frames * stride, n_kv: s.n_kv }).collect();
        let caches: Vec<&KvCache> = self.streams.iter().map(|s| s.cache).collect();
        let (inputs, sequences) = BatchInputs::new(ctx, None, &caches, &parts)?;
        let mut scope = BuildScope::batched(ctx, graph, &model.weights, inputs.positions, None, sequences)?;
        let hidden = model.transformer.build(&mut scope, x)?;
        let mut audio = Vec::with_capacity(self.streams.len());
        let mut first_step = 0;
        for (s, convs) in self.streams.iter().zip(convs.iter_mut()) {
            let steps = s.frames * stride;
            let h = if self.streams.len() == 1 {
                hidden
            } else {
                let row = hidden.strides()[1];
                ctx.cont(ctx.view(hidden, &[hidden.ne(0), steps as i64], &[row], first_step * row)?)?
            };
            first_step += steps;
            let out = model.seanet.build(convs, h)?.set_output();
            graph.expand(out)?;
            audio.push(out.slot());
        }
        // After everything that reads the old states.
        for convs in convs {
            for update in convs.updates {
                graph.expand(update)?;
            }
        }
        let inputs = inputs.slots().windowed(model.config().transformer.context);
        Ok(ChunkSlots { codes, inputs, audio })
    }
}
