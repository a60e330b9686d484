//! Running a step's graph: a builder makes the graph and returns the slots of its inputs and
//! outputs; the graph runs fresh (built for this step in the engine's compute buffer) or kept (built
//! once, computed again while its key holds). Callers write inputs and read outputs through the
//! slots either way, and never invalidate a kept graph by hand: its key holds each cache's identity
//! and version, and a graph over a freed or replaced buffer is rebuilt.

use ggml::{Backend, ComputeBuffer, Context, Graph, NodeTime, ReusableGraph, StepGraph};

use crate::error::Result;
use crate::kv_cache::KvCache;

/// Builds one kind of step graph.
pub(crate) trait StepBuilder {
    /// The slots of the graph's inputs and outputs.
    type Io;

    /// Most nodes the graph can have.
    fn max_nodes(&self) -> usize;

    fn build<'c>(&self, ctx: &'c Context, graph: &mut Graph<'c>) -> Result<Self::Io>
    where
        Self: 'c;
}

/// What a kept graph was built for: its kind and shape, and per cache it reads, the cache's identity,
/// version and attention window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct GraphKey(Vec<u64>);

impl GraphKey {
    pub fn new(words: &[u64]) -> Self {
        GraphKey(words.to_vec())
    }

    /// Adds words of the graph's shape.
    pub fn with(mut self, words: &[u64]) -> Self {
        self.0.extend_from_slice(words);
        self
    }

    /// Adds a cache the graph reads, over its first `n_kv` cells.
    pub fn with_cache(mut self, cache: &KvCache, n_kv: usize) -> Self {
        self.0.extend([cache.id(), cache.version(), n_kv as u64]);
        self
    }
}

/// Kept graphs of one kind, the most recently used last; the least recently used is dropped past
/// `capacity`. A graph is kept from its key's second use: a key used once (a set of sessions that
/// changes every step, a first frame) runs fresh in the shared compute buffer, which costs less than
/// building a graph with a buffer of its own.
pub(crate) struct KeptGraphs<Io> {
    entries: Vec<(GraphKey, ReusableGraph, Io)>,
    capacity: usize,
    /// Keys run fresh once, most recent last (at most `capacity`).
    seen: Vec<GraphKey>,
}

impl<Io> KeptGraphs<Io> {
    pub fn new(capacity: usize) -> Self {
        KeptGraphs { entries: Vec::new(), capacity: capacity.max(1), seen: Vec::new() }
    }

    /// Bytes of the kept graphs' own compute buffers.
    pub fn buffer_bytes(&self) -> usize {
        self.entries.iter().map(|(_, g, _)| g.buffer_size()).sum()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.seen.clear();
    }

    /// Whether the graph for `key` is kept (or should be, having run once before); otherwise the key
    /// is remembered and its graph runs fresh this time.
    fn keeps(&mut self, key: &GraphKey) -> bool {
        if self.entries.iter().any(|(k, _, _)| k == key) {
            return true;
        }
        if let Some(i) = self.seen.iter().position(|k| k == key) {
            self.seen.remove(i);
            return true;
        }
        if self.seen.len() >= self.capacity {
            self.seen.remove(0);
        }
        self.seen.push(key.clone());
        false
    }

    /// The index of the graph for `key`, built by `builder` when none is kept (or it reads a store
    /// that was freed or replaced).
    fn find_or_build<B: StepBuilder<Io = Io>>(&mut self, key: GraphKey, builder: &B, backend: &Backend) -> Result<usize> {
        if let Some(i) = self.entries.iter().position(|(k, g, _)| *k == key && g.is_current()) {
            let entry = self.entries.remove(i);
            self.entries.push(entry);
            return Ok(self.entries.len() - 1);
        }
        self.entries.retain(|(k, g, _)| *k != key && g.is_current());
        let max_nodes = builder.max_nodes();
        let graph = ReusableGraph::for_backend(backend, max_nodes + 16, max_nodes)?;
        let io = {
            let mut building = graph.context().new_graph(max_nodes)?;
            let io = builder.build(graph.context(), &mut building)?;
            graph.finish(building.seal())?;
            io
        };
        if self.entries.len() >= self.capacity {
            self.entries.remove(0);
        }
        self.entries.push((key, graph, io));
        Ok(self.entries.len() - 1)
    }
}

/// What a step runs on: the backend, the compute memory of fresh graphs, and (while profiling) where
/// node times go.
pub(crate) struct StepRunner<'a> {
    pub backend: &'a Backend,
    pub compute: &'a mut ComputeBuffer,
    pub profile: Option<&'a mut Vec<NodeTime>>,
}

impl StepRunner<'_> {
    /// Builds (or finds kept, with `kept`) the graph of `builder`, writes its inputs, computes it and
    /// reads its outputs.
    pub fn run<B: StepBuilder, R>(
        &mut self,
        builder: &B,
        kept: Option<(&mut KeptGraphs<B::Io>, GraphKey)>,
        write: impl FnOnce(StepGraph<'_>, &B::Io) -> Result<()>,
        read: impl FnOnce(StepGraph<'_>, &B::Io) -> Result<R>,
    ) -> Result<R> {
        let kept = kept.and_then(|(graphs, key)| graphs.keeps(&key).then_some((graphs, key)));
        match kept {
            Some((graphs, key)) => {
                let i = graphs.find_or_build(key, builder, self.backend)?;
                let (_, graph, io) = &graphs.entries[i];
                let step = StepGraph::Kept(graph);
                write(step, io)?;
                self.compute(step)?;
                read(step, io)
            }
            None => {
                let max_nodes = builder.max_nodes();
                let ctx = self.compute.context(max_nodes + 16, max_nodes)?;
                let mut graph = ctx.new_graph(max_nodes)?;
                let io = builder.build(&ctx, &mut graph)?;
                ctx.allocate(&graph)?;
                let step = StepGraph::Fresh(&graph);
                write(step, &io)?;
                match self.profile.as_deref_mut() {
                    Some(times) => times.extend(step.profile(self.backend)?),
                    None => step.compute(self.backend)?,
                }
                read(step, &io)
            }
        }
    }

    fn compute(&mut self, step: StepGraph<'_>) -> Result<()> {
        match self.profile.as_deref_mut() {
            Some(times) => times.extend(step.profile(self.backend)?),
            None => step.compute(self.backend)?,
        }
        Ok(())
    }
}
