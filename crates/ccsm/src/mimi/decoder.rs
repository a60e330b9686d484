//! Streaming Mimi decoding: frames of codes in, samples out, with the causal state carried between
//! calls (every convolution's state and the transformer's KV cache over the last `context` steps), so
//! decoding frame by frame gives what decoding a whole clip gives. Graphs of the same shape are kept:
//! a frame costs input writes and one compute.

use std::ops::Range;

use ggml::{Backend, Context, DType, Graph, NodeTime, ReusableGraph};

use super::config::MimiConfig;
use super::conv::{ConvScope, ConvStates};
use super::model::MimiModel;
use crate::attention::{BuildScope, StepInputs};
use crate::csm::Frame;
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

/// A kept graph and the shape it was built for.
struct KeptChunk {
    frames: usize,
    codebooks: usize,
    n_kv: usize,
    graph: ReusableGraph,
}

/// Kept graphs at most (frame-by-frame streaming needs two attention windows, clip decoding a chunk
/// size and a remainder).
const KEPT_GRAPHS: usize = 4;

/// A codec with its decoding state, ready to turn frames into samples.
pub struct MimiDecoder {
    model: MimiModel,
    states: ConvStates,
    cache: KvCache,
    backend: Backend,
    kept: Vec<KeptChunk>,
    max_chunk: usize,
    /// Codebooks of the frames of this stream (fixed by its first frame).
    codebooks: Option<usize>,
    frames: u64,
}

/// One audio stream's decoding state (convolution states, transformer cache, kept graphs over them),
/// apart from the weights: a server keeps one per session and swaps it into the decoder.
pub struct MimiStream {
    states: ConvStates,
    cache: KvCache,
    kept: Vec<KeptChunk>,
    codebooks: Option<usize>,
    frames: u64,
}

impl MimiStream {
    /// Bytes of the stream's state: the KV cache and the convolutions' states.
    pub fn bytes(&self) -> usize {
        self.cache.memory_usage() + self.states.bytes()
    }
}

impl MimiDecoder {
    /// A new stream (zero states, an empty cache of the decoder's own layout).
    pub fn new_stream(&self) -> Result<MimiStream> {
        let mut cache = KvCache::with_rotation(self.cache.config().clone(), self.cache.rotation())?;
        cache.set_attention(self.cache.attention());
        Ok(MimiStream { states: ConvStates::new(&self.model.state_layout)?, cache, kept: Vec::new(), codebooks: None, frames: 0 })
    }

    /// Exchanges the decoder's stream state with `stream`'s (swap in, decode, swap back).
    pub fn swap_stream(&mut self, stream: &mut MimiStream) {
        std::mem::swap(&mut self.states, &mut stream.states);
        std::mem::swap(&mut self.cache, &mut stream.cache);
        std::mem::swap(&mut self.kept, &mut stream.kept);
        std::mem::swap(&mut self.codebooks, &mut stream.codebooks);
        std::mem::swap(&mut self.frames, &mut stream.frames);
    }

    pub fn new(model: MimiModel, options: MimiOptions) -> Result<Self> {
        if options.max_chunk_frames == 0 {
            return Err(Error::Input("the codec needs chunks of at least one frame".into()));
        }
        let t = &model.config().transformer;
        let capacity = Self::cache_capacity(model.config(), options.max_chunk_frames);
        let cache = KvCache::with_rotation(
            KvCacheConfig::uniform(t.n_layer, t.head_dim, t.n_head_kv, capacity, options.k_type, options.v_type),
            Rotation::default(),
        )?;
        let states = ConvStates::new(&model.state_layout)?;
        Ok(MimiDecoder {
            model,
            states,
            cache,
            backend: Backend::cpu(options.n_threads)?,
            kept: Vec::new(),
            max_chunk: options.max_chunk_frames,
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

    /// The weights back, dropping the decoding state.
    pub fn into_model(self) -> MimiModel {
        self.model
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Bytes of the decoding state: the KV cache and the convolutions' states.
    pub fn state_bytes(&self) -> usize {
        self.cache.memory_usage() + self.states.bytes()
    }

    /// Frames decoded since the stream started.
    pub fn frames_decoded(&self) -> u64 {
        self.frames
    }

    /// Samples (per channel) one frame becomes.
    pub fn frame_samples(&self) -> usize {
        self.model.config().frame_samples()
    }

    /// Starts a new stream: zero states, an empty cache, positions from 0.
    pub fn reset(&mut self) -> Result<()> {
        self.states.reset()?;
        self.cache.clear();
        self.codebooks = None;
        self.frames = 0;
        Ok(())
    }

    /// Converts the transformer's cache (kept graphs are rebuilt).
    pub fn set_cache_types(&mut self, k_type: CacheType, v_type: CacheType) -> Result<()> {
        self.kept.clear();
        self.cache.quantize(k_type, v_type)?;
        Ok(())
    }

    /// Checks frames against the codec: every frame the same number of codebooks (1 to the codec's),
    /// every code below the codebook size. The error names the frame.
    pub fn check_frames(&self, frames: &[Frame], first_index: usize) -> Result<usize> {
        let c = self.model.config();
        let want = self.codebooks.or_else(|| frames.first().map(Vec::len)).unwrap_or(c.n_q);
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

    /// Decodes the next frames of the stream; returns their samples (interleaved when the codec has
    /// several channels), `frame_samples()` per frame.
    pub fn decode(&mut self, frames: &[Frame]) -> Result<Vec<f32>> {
        self.decode_with(frames, None)
    }

    /// `decode`, computing the graphs node by node and adding each node's time to `profile`.
    pub fn decode_profiled(&mut self, frames: &[Frame], profile: &mut Vec<NodeTime>) -> Result<Vec<f32>> {
        self.decode_with(frames, Some(profile))
    }

    fn decode_with(&mut self, frames: &[Frame], mut profile: Option<&mut Vec<NodeTime>>) -> Result<Vec<f32>> {
        let codebooks = self.check_frames(frames, self.frames as usize)?;
        self.codebooks = Some(codebooks);
        let mut samples = Vec::with_capacity(frames.len() * self.frame_samples() * self.model.config().channels);
        for chunk in frames.chunks(self.max_chunk) {
            samples.extend(self.decode_chunk(chunk, codebooks, profile.as_deref_mut())?);
            self.frames += chunk.len() as u64;
        }
        Ok(samples)
    }

    fn decode_chunk(&mut self, frames: &[Frame], codebooks: usize, profile: Option<&mut Vec<NodeTime>>) -> Result<Vec<f32>> {
        let c = self.model.config();
        let steps = frames.len() * c.upsample_stride;
        // Only the last `context` steps are ever attended to: older cells go.
        make_room(&mut self.cache, steps, EvictionPolicy::SinkRecent { sinks: 0 })?;
        let start = self.cache.len();
        let cells = self.cache.append(steps)?;
        let result = self.compute(frames, codebooks, cells, profile);
        if result.is_err() {
            self.cache.truncate(start);
        }
        result
    }

    fn compute(
        &mut self,
        frames: &[Frame],
        codebooks: usize,
        cells: Range<usize>,
        profile: Option<&mut Vec<NodeTime>>,
    ) -> Result<Vec<f32>> {
        let n_kv = self.cache.decode_window();
        let shape = (frames.len(), codebooks, n_kv);
        let found = self.kept.iter().position(|k| (k.frames, k.codebooks, k.n_kv) == shape && k.graph.is_current());
        let index = match found {
            Some(i) => i,
            None => {
                if self.kept.len() >= KEPT_GRAPHS {
                    self.kept.remove(0);
                }
                let max_nodes = self.model.transformer.max_nodes() + self.model.seanet.max_nodes() + 64;
                let graph = ReusableGraph::new(max_nodes + 64, max_nodes)?;
                let mut building = graph.context().new_graph(max_nodes)?;
                build_chunk(&self.model, &self.cache, &self.states, graph.context(), &mut building, shape)?;
                graph.finish(building.seal())?;
                self.kept.push(KeptChunk { frames: shape.0, codebooks, n_kv, graph });
                self.kept.len() - 1
            }
        };
        let c = self.model.config();
        let graph = &self.kept[index].graph;
        let codes: Vec<i32> =
            frames.iter().flat_map(|f| f.iter().enumerate().map(|(k, &code)| (code as usize + k * c.codebook_size) as i32)).collect();
        graph.tensor("codes")?.write_i32(&codes)?;
        let positions = &self.cache.positions()[cells.clone()];
        graph.tensor("positions")?.write_i32(positions)?;
        graph.tensor("cells")?.write_i64(&KvCache::cell_indices(cells))?;
        graph.tensor("mask")?.write_f32(&self.cache.windowed_attention_mask(positions, n_kv, c.transformer.context))?;
        match profile {
            Some(times) => times.extend(graph.profile(&self.backend)?),
            None => graph.compute(&self.backend)?,
        }
        Ok(graph.tensor("codec.audio")?.read_f32()?)
    }
}

/// The graph of one chunk: codes → latent → upsampled → transformer (over the cache) → SEANet →
/// samples, then every convolution's new state.
fn build_chunk<'c>(
    model: &'c MimiModel,
    cache: &'c KvCache,
    states: &'c ConvStates,
    ctx: &'c Context,
    graph: &mut Graph<'c>,
    (frames, codebooks, n_kv): (usize, usize, usize),
) -> Result<()> {
    let steps = (frames * model.config().upsample_stride) as i64;
    let codes = ctx.new_tensor(DType::I32, &[(codebooks * frames) as i64])?.set_input().set_name("codes");
    let inputs = StepInputs {
        positions: ctx.new_tensor(DType::I32, &[steps])?.set_input().set_name("positions"),
        cells: ctx.new_tensor(DType::I64, &[steps])?.set_input().set_name("cells"),
        mask: ctx.new_tensor(DType::F16, &[n_kv as i64, steps])?.set_input().set_name("mask"),
        freq_factors: None,
    };
    let mut convs = ConvScope { ctx, weights: &model.weights, states, updates: Vec::new() };
    let latent = model.build_latent(ctx, codes, codebooks)?;
    let upsampled = model.upsample.build(&mut convs, latent)?;
    let mut scope = BuildScope::new(ctx, graph, &model.weights, cache, inputs);
    let hidden = model.transformer.build(&mut scope, upsampled)?;
    let audio = model.seanet.build(&mut convs, hidden)?.set_name("codec.audio").set_output();
    graph.expand(audio)?;
    // After everything that reads the old states.
    for update in convs.updates {
        graph.expand(update)?;
    }
    Ok(())
}
