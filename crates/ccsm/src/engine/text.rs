//! The text engine: Llama weights shared by every sequence, steps over many sequences at once.

use ggml::{Backend, ComputeBuffer, Context, DType, Graph, NodeTime, Slot, Tensor};

use super::step::{GraphKey, KeptGraphs, StepBuilder, StepRunner};
use crate::attention::{AttentionChoice, BatchInputs, BatchSlots, BuildScope, SequencePart};
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, KvCacheConfig, Rotation};
use crate::llama::LlamaModel;
use crate::{CacheType, Logits};

/// Graph nodes each sequence of a batched step adds per block, at most.
pub(crate) const PER_SEQUENCE_NODES: usize = 64;

/// One sequence's part of a step: its cache, the tokens that follow what it holds, and which logits
/// it wants back.
pub struct SequenceStep<'a> {
    /// The sequence's cache; the tokens' K/V rows are appended to it.
    pub cache: &'a mut KvCache,
    /// Tokens after what the cache holds.
    pub tokens: &'a [u32],
    /// Which of its rows' logits come back.
    pub logits: Logits,
}

/// A Llama model's weights with the backend and compute memory its steps use.
pub struct TextEngine {
    model: LlamaModel,
    compute: ComputeBuffer,
    backend: Backend,
    /// The graph of steps whose sequences each run one token, kept while the same caches take steps
    /// with the same attention windows.
    kept: KeptGraphs<StepSlots>,
    reuse_kept: bool,
    /// The attention kernels every step runs.
    attention: AttentionChoice,
    /// While profiling: every computed node's time, in order.
    profile: Option<Vec<NodeTime>>,
}

/// The inputs and outputs of one step's graph.
struct StepSlots {
    tokens: Slot,
    inputs: BatchSlots,
    output_rows: Option<Slot>,
    logits: Slot,
    attention_mass: Option<Slot>,
}

/// The graph of one step over `caches[i]` with `shapes[i]`.
struct TextStep<'a> {
    model: &'a LlamaModel,
    caches: &'a [&'a KvCache],
    shapes: &'a [SequenceShape],
    track: bool,
    kernels: AttentionChoice,
}

/// What a step's graph computes for one sequence: `n` rows over its first `n_kv` cells, logits per `which`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SequenceShape {
    n: usize,
    n_kv: usize,
    which: Logits,
}

impl SequenceShape {
    fn outputs(self) -> usize {
        match self.which {
            Logits::All => self.n,
            Logits::Last => 1,
        }
    }
}

impl TextEngine {
    /// An engine over `model`'s weights running `n_threads` ggml threads (fewer for graphs too small to
    /// share), where the weights are (`LlamaModel::placement`): on a device its graphs and caches are
    /// there too.
    pub fn new(model: LlamaModel, n_threads: usize) -> Result<Self> {
        let backend = model.placement().backend(n_threads)?;
        Ok(TextEngine {
            model,
            compute: ComputeBuffer::for_backend(&backend)?,
            backend,
            kept: KeptGraphs::new(1),
            reuse_kept: true,
            attention: AttentionChoice::Auto,
            profile: None,
        })
    }

    /// The weights.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The weights back, dropping the runtime state.
    pub fn into_model(self) -> LlamaModel {
        self.model
    }

    /// The layout of a cache of `capacity` cells for this model.
    pub fn cache_config(&self, capacity: usize, k_type: CacheType, v_type: CacheType) -> KvCacheConfig {
        let c = self.model.config();
        KvCacheConfig::uniform(c.n_layer, c.head_dim, c.n_head_kv, capacity, k_type, v_type)
    }

    /// A new empty cache for one sequence (quantized halves rotated, as by default).
    pub fn new_cache(&self, capacity: usize, k_type: CacheType, v_type: CacheType) -> Result<KvCache> {
        self.new_cache_with(self.cache_config(capacity, k_type, v_type))
    }

    /// A cache of `config` (its shape must be this model's), rotated by default.
    pub fn new_cache_with(&self, config: KvCacheConfig) -> Result<KvCache> {
        let c = self.model().config();
        if (config.n_layer, config.head_dim, config.n_head_kv) != (c.n_layer, c.head_dim, c.n_head_kv) {
            return Err(Error::Input(format!(
                "a cache of shape {config:?} for a model of {} layers x {} x {}",
                c.n_layer, c.n_head_kv, c.head_dim
            )));
        }
        KvCache::placed(config, Rotation::default(), self.model.placement())
    }

    /// Whether one-token steps reuse a kept graph (default) or build a graph per step.
    pub fn set_reuse_kept_graph(&mut self, reuse: bool) {
        self.reuse_kept = reuse;
        self.kept.clear();
    }

    /// Which attention kernels steps run (auto by default); kept graphs are rebuilt.
    pub fn set_attention(&mut self, choice: AttentionChoice) {
        self.attention = choice;
        self.kept.clear();
    }

    /// The attention kernels steps run.
    pub fn attention(&self) -> AttentionChoice {
        self.attention
    }

    /// Starts (or stops) timing every node of the following steps (collected until `take_profile`).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Vec::new);
    }

    /// The node times collected since profiling started (or the last take).
    pub fn take_profile(&mut self) -> Vec<NodeTime> {
        self.profile.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Bytes of the compute memory (grows to the largest step so far).
    pub fn compute_buffer_bytes(&self) -> usize {
        self.compute.size() + self.kept.buffer_bytes()
    }

    /// Runs each sequence's tokens after what its cache holds, all in one graph: projections and
    /// MLPs over every row at once, attention per sequence over its own cache. Returns per sequence
    /// its logits (`[n][vocab]` for `All`, `[vocab]` for `Last`). On error no cache changes.
    /// `track_attention` (one sequence only) adds each cell's attention mass to its cache's scores.
    pub fn step(&mut self, sequences: &mut [SequenceStep<'_>], track_attention: bool) -> Result<Vec<Vec<f32>>> {
        if sequences.is_empty() {
            return Err(Error::EmptyInput("a step over no sequences"));
        }
        if track_attention && sequences.len() > 1 {
            return Err(Error::Input("attention tracking runs one sequence per step".into()));
        }
        let vocab = self.model.vocab_size();
        for seq in sequences.iter() {
            self.model.placement().require_same(seq.cache.placement(), "a sequence's cache")?;
            if seq.tokens.is_empty() {
                return Err(Error::EmptyInput("no tokens"));
            }
            if let Some(&id) = seq.tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::TokenOutOfRange { id, vocab });
            }
            let needed = seq.cache.len() + seq.tokens.len();
            if needed > seq.cache.capacity() {
                return Err(Error::CacheFull { needed, capacity: seq.cache.capacity() });
            }
        }
        let starts: Vec<usize> = sequences.iter().map(|s| s.cache.len()).collect();
        let result = self.step_appended(sequences, track_attention);
        if result.is_err() {
            for (seq, &start) in sequences.iter_mut().zip(&starts) {
                seq.cache.truncate(start);
            }
        }
        result
    }

    fn step_appended(&mut self, sequences: &mut [SequenceStep<'_>], track: bool) -> Result<Vec<Vec<f32>>> {
        let mut cells = Vec::with_capacity(sequences.len());
        for seq in sequences.iter_mut() {
            cells.push(seq.cache.append(seq.tokens.len())?);
        }
        // A one-token row attends over its cache's decode window whether or not the step is all decode
        // rows: the window's padding is masked, but the attention kernel splits its cells by the window,
        // so the same window gives the same sums as a step of that sequence alone.
        let one_token = |s: &SequenceStep<'_>| self.reuse_kept && s.tokens.len() == 1 && s.logits == Logits::Last;
        let decode = sequences.iter().all(one_token);
        let shapes: Vec<SequenceShape> = sequences
            .iter()
            .map(|s| SequenceShape {
                n: s.tokens.len(),
                n_kv: if one_token(s) { s.cache.decode_window() } else { s.cache.len() },
                which: s.logits,
            })
            .collect();
        let caches: Vec<&KvCache> = sequences.iter().map(|s| &*s.cache).collect();
        let tokens: Vec<i32> = sequences.iter().flat_map(|s| s.tokens.iter().map(|&t| t as i32)).collect();
        let step = TextStep { model: &self.model, caches: &caches, shapes: &shapes, track, kernels: self.attention };
        // One-token steps keep their graph: the same caches with the same windows take many in a row.
        let kept = decode.then(|| {
            let key = caches.iter().zip(&shapes).fold(GraphKey::new(&[track as u64]), |k, (c, s)| k.with_cache(c, s.n_kv));
            (&mut self.kept, key)
        });
        let mut runner = StepRunner { backend: &self.backend, compute: &mut self.compute, profile: self.profile.as_mut() };
        let model = &self.model;
        let (logits, mass) = runner.run(
            &step,
            kept,
            |graph, io| {
                graph.at(io.tokens)?.write_i32(&tokens)?;
                io.inputs.write(graph, model.transformer.freq_factors(), &caches, &cells)?;
                if let Some(t) = io.output_rows {
                    graph.at(t)?.write_i32(&output_row_indices(&shapes))?;
                }
                Ok(())
            },
            |graph, io| {
                let mass = io.attention_mass.map(|t| graph.at(t)?.read_f32()).transpose()?;
                Ok((graph.at(io.logits)?.read_f32()?, mass))
            },
        )?;
        if let Some(mass) = mass {
            sequences[0].cache.add_scores(&mass);
        }
        let vocab = self.model.vocab_size();
        let mut per_sequence = Vec::with_capacity(shapes.len());
        let mut offset = 0;
        for shape in &shapes {
            let len = shape.outputs() * vocab;
            per_sequence.push(logits[offset..offset + len].to_vec());
            offset += len;
        }
        Ok(per_sequence)
    }
}

/// Whether the last block must pick output rows (more than the very last row is wanted, or a row
/// other than the last).
fn needs_output_rows(shapes: &[SequenceShape]) -> bool {
    let total: usize = shapes.iter().map(|s| s.n).sum();
    let outputs: usize = shapes.iter().map(|s| s.outputs()).sum();
    shapes.len() > 1 && outputs < total
}

/// The rows of the step whose logits are wanted, in order.
fn output_row_indices(shapes: &[SequenceShape]) -> Vec<i32> {
    let mut rows = Vec::new();
    let mut first = 0;
    for s in shapes {
        match s.which {
            Logits::All => rows.extend((first..first + s.n).map(|r| r as i32)),
            Logits::Last => rows.push((first + s.n - 1) as i32),
        }
        first += s.n;
    }
    rows
}

impl StepBuilder for TextStep<'_> {
    type Io = StepSlots;

    fn max_nodes(&self) -> usize {
        // Per sequence and block up to about 30 attention nodes more (column views, stores, cache views,
        // permutes, the two kernel nodes, a join, and 12 for a rotated cache).
        self.model.transformer.max_nodes() + PER_SEQUENCE_NODES * self.caches.len() * self.model.config().n_layer + 16
    }

    fn build<'c>(&self, ctx: &'c Context, graph: &mut Graph<'c>) -> Result<StepSlots>
    where
        Self: 'c,
    {
        let (model, shapes) = (self.model, self.shapes);
        let transformer = &model.transformer;
        let total: usize = shapes.iter().map(|s| s.n).sum();
        let tokens = ctx.new_tensor(DType::I32, &[total as i64])?.set_input();
        let parts: Vec<SequencePart> = shapes.iter().map(|s| SequencePart { rows: s.n, n_kv: s.n_kv }).collect();
        let (inputs, sequences) = BatchInputs::new(ctx, transformer.freq_factor_input(ctx)?, self.caches, &parts)?;
        let output_rows = if needs_output_rows(shapes) {
            let n_out = output_row_indices(shapes).len() as i64;
            Some(ctx.new_tensor(DType::I32, &[n_out])?.set_input())
        } else {
            None
        };
        // The last block runs over every row when every row's logits are wanted, else over the picked
        // rows (`output_rows`) or, for one sequence, its last.
        let outputs: usize = shapes.iter().map(|s| s.outputs()).sum();
        let which = if outputs == total { Logits::All } else { Logits::Last };
        let x = ctx.get_rows(model.weights.get(model.token_embd), tokens)?;
        let mut scope = BuildScope::batched(ctx, graph, &model.weights, inputs.positions, inputs.freq_factors, sequences)?
            .tracking_attention(self.track)
            .with_kernels(self.kernels)
            .with_output_rows(output_rows);
        let hidden = transformer.build(&mut scope, x, which)?;
        let attention_mass = scope.take_attention_mass().map(Tensor::set_output);
        let logits = ctx.product(model.weights.get(model.output), hidden)?.set_output();
        graph.expand(logits)?;
        if let Some(mass) = attention_mass {
            graph.expand(mass)?;
        }
        Ok(StepSlots {
            tokens: tokens.slot(),
            inputs: inputs.slots(),
            output_rows: output_rows.map(Tensor::slot),
            logits: logits.slot(),
            attention_mass: attention_mass.map(Tensor::slot),
        })
    }
}
