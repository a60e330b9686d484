//! Compute graphs, the graph allocator and the CPU backend that runs them.

use std::cell::Cell;
use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Instant;

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::threads;

/// Arena bytes a graph of `max_nodes` nodes needs.
pub fn graph_overhead(max_nodes: usize) -> usize {
    // SAFETY: a pure function of ggml's struct sizes.
    unsafe { sys::ggml_graph_overhead_custom(max_nodes, false) }
}

/// Hashes tensor addresses cheaply: they are unique and 8-byte aligned, so no mixing is needed.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = bytes.iter().fold(self.0, |h, &b| h.rotate_left(8) ^ b as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64 >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type TensorSet = HashSet<*mut sys::ggml_tensor, BuildHasherDefault<AddressHasher>>;

/// A forward compute graph living in a context.
pub struct Graph<'ctx> {
    raw: NonNull<sys::ggml_cgraph>,
    capacity: usize,
    /// Tensors already in the graph, mirrored so expansion can be checked against the capacity
    /// before ggml would abort on overflow.
    visited: TensorSet,
    nodes: usize,
    leafs: usize,
    ctx: *const sys::ggml_context,
    _ctx: PhantomData<&'ctx Context>,
}

impl Context {
    /// A new empty graph of at most `max_nodes` nodes (and as many leaves).
    pub fn new_graph(&self, max_nodes: usize) -> Result<Graph<'_>> {
        let needed = graph_overhead(max_nodes);
        if needed > self.free_bytes() {
            return Err(Error::Allocation { what: "graph in context (arena full)", bytes: needed });
        }
        // SAFETY: the arena has room for the graph (checked above, so ggml does not abort).
        let raw = unsafe { sys::ggml_new_graph_custom(self.raw(), max_nodes, false) };
        let raw = NonNull::new(raw).ok_or(Error::Allocation { what: "graph", bytes: needed })?;
        Ok(Graph { raw, capacity: max_nodes, visited: TensorSet::default(), nodes: 0, leafs: 0, ctx: self.raw(), _ctx: PhantomData })
    }
}

impl<'ctx> Graph<'ctx> {
    pub(crate) fn raw(&self) -> *mut sys::ggml_cgraph {
        self.raw.as_ptr()
    }

    pub(crate) fn context_ptr(&self) -> *const sys::ggml_context {
        self.ctx
    }

    /// Whether a tensor at `address` is in the graph.
    pub(crate) fn contains_address(&self, address: usize) -> bool {
        self.visited.contains(&(address as *mut sys::ggml_tensor))
    }

    /// Every tensor in the graph (nodes and leaves).
    pub(crate) fn tensor_ptrs(&self) -> Vec<*mut sys::ggml_tensor> {
        self.visited.iter().copied().collect()
    }

    /// Adds `output` and every tensor it depends on.
    pub fn expand(&mut self, output: Tensor<'ctx>) -> Result<()> {
        let (mut new_nodes, mut new_leafs) = (0, 0);
        let mut fresh = Vec::new();
        let mut stack = vec![output.raw()];
        let mut seen = TensorSet::default();
        while let Some(t) = stack.pop() {
            if self.visited.contains(&t) || !seen.insert(t) {
                continue;
            }
            fresh.push(t);
            // SAFETY: every pointer on the stack is a live tensor reachable from `output`, whose
            // sources outlive 'ctx by the signatures of the ops that built it.
            let header = unsafe { &*t };
            header.src.iter().filter(|s| !s.is_null()).for_each(|&s| stack.push(s));
            let is_leaf = header.op == sys::GGML_OP_NONE && header.flags & sys::GGML_TENSOR_FLAG_PARAM as i32 == 0;
            if is_leaf {
                new_leafs += 1;
            } else {
                new_nodes += 1;
            }
        }
        if self.nodes + new_nodes > self.capacity || self.leafs + new_leafs > self.capacity {
            return Err(Error::GraphFull { capacity: self.capacity });
        }
        // SAFETY: the graph has room for every new node and leaf (counted above).
        unsafe { sys::ggml_build_forward_expand(self.raw(), output.raw()) };
        self.visited.extend(fresh);
        self.nodes += new_nodes;
        self.leafs += new_leafs;
        Ok(())
    }

    /// The tensor of the graph with this name (inputs to write, outputs to read).
    pub fn find(&self, name: &str) -> Option<Tensor<'ctx>> {
        let c_name = std::ffi::CString::new(name).ok()?;
        // SAFETY: the graph is alive and the name is NUL-terminated; ggml returns null when absent.
        let raw = unsafe { sys::ggml_graph_get_tensor(self.raw(), c_name.as_ptr()) };
        NonNull::new(raw).map(Tensor::from_raw)
    }

    /// Nodes (computed tensors, not leafs) added to the graph so far.
    pub fn n_nodes(&self) -> usize {
        // SAFETY: reads the node count of a live graph.
        unsafe { sys::ggml_graph_n_nodes(self.raw()) as usize }
    }

    /// Refuses a graph with a tensor that has no memory and was not made in `ctx` (a tensor of a store
    /// not yet allocated): the allocator would give it memory in the compute buffer, leaving its owner
    /// pointing into memory it does not own once the graph is gone.
    pub(crate) fn check_foreign_memory(&self, ctx: &Context, op: &'static str) -> Result<()> {
        // SAFETY: `visited` holds live tensors of this graph.
        let foreign = self.visited.iter().find(|&&t| unsafe { (*t).data.is_null() } && !ctx.owns(t));
        match foreign {
            // The tensor is alive: the graph's lifetime keeps every operand's owner alive.
            Some(&t) => Err(Error::invalid(
                op,
                format!(
                    "{:?} has no memory and belongs to another context or store (allocate it first)",
                    Tensor::from_raw(NonNull::new(t).expect("visited pointers are non-null"))
                ),
            )),
            None => Ok(()),
        }
    }

    /// Every tensor of the graph has memory (so computing it cannot touch a null pointer).
    pub(crate) fn check_allocated(&self) -> Result<()> {
        // SAFETY: `visited` holds live tensors of this graph.
        let missing = self.visited.iter().find(|&&t| unsafe { (*t).data.is_null() });
        match missing {
            Some(&t) => {
                let tensor: Tensor<'_> = Tensor::from_raw(NonNull::new(t).expect("visited pointers are non-null"));
                Err(Error::invalid("compute", format!("tensor {tensor:?} has no memory; allocate the graph first")))
            }
            None => Ok(()),
        }
    }
}

/// A reusable CPU buffer for the intermediate tensors of graphs (ggml's graph allocator).
///
/// Graphs get memory through a [`GraphContext`], which borrows the buffer mutably: tensors of a graph
/// cannot outlive the memory they point into, and no second graph can reuse (and so overwrite or
/// reallocate) the buffer while the first one's tensors are alive.
pub struct ComputeBuffer {
    raw: NonNull<sys::ggml_gallocr>,
}

impl ComputeBuffer {
    /// An empty allocator over the CPU buffer type; it takes memory when a graph is first allocated.
    pub fn new() -> Result<Self> {
        crate::init();
        // SAFETY: the CPU buffer type is a static object; gallocr_new allocates a small struct.
        let raw = unsafe { sys::ggml_gallocr_new(sys::ggml_backend_cpu_buffer_type()) };
        Ok(ComputeBuffer { raw: NonNull::new(raw).ok_or(Error::Allocation { what: "graph allocator", bytes: 0 })? })
    }

    /// An empty allocator over a device's memory (`Device::compute` runs its graphs).
    pub fn on(device: &crate::Device) -> Result<Self> {
        // SAFETY: the device's buffer type is a static registry object; gallocr_new allocates a small struct.
        let raw = unsafe { sys::ggml_gallocr_new(device.buffer_type()) };
        Ok(ComputeBuffer { raw: NonNull::new(raw).ok_or(Error::Allocation { what: "graph allocator", bytes: 0 })? })
    }

    /// A header-only context for one graph of at most `max_nodes` nodes, whose tensors take their
    /// memory from this buffer.
    pub fn context(&mut self, max_tensors: usize, max_nodes: usize) -> Result<GraphContext<'_>> {
        Ok(GraphContext { ctx: Context::for_graph(max_tensors, max_nodes)?, buffer: self, allocated: Cell::new(false) })
    }

    pub(crate) fn raw(&self) -> *mut sys::ggml_gallocr {
        self.raw.as_ptr()
    }

    /// Bytes of the buffer (it grows to the largest graph allocated so far).
    pub fn size(&self) -> usize {
        // SAFETY: buffer 0 exists for a single-buffer-type allocator.
        unsafe { sys::ggml_gallocr_get_buffer_size(self.raw.as_ptr(), 0) }
    }
}

impl Drop for ComputeBuffer {
    fn drop(&mut self) {
        // SAFETY: `raw` came from ggml_gallocr_new and is freed once; no GraphContext borrows it now.
        unsafe { sys::ggml_gallocr_free(self.raw.as_ptr()) }
    }
}

/// A context whose graph gets its intermediate memory from a [`ComputeBuffer`]. Dereferences to
/// [`Context`] for building ops.
pub struct GraphContext<'buf> {
    ctx: Context,
    buffer: &'buf mut ComputeBuffer,
    allocated: Cell<bool>,
}

impl GraphContext<'_> {
    /// Gives every tensor of `graph` without memory a place in the buffer. Once per context: a second
    /// allocation could move the buffer under the first graph's tensors.
    pub fn allocate(&self, graph: &Graph<'_>) -> Result<()> {
        if self.allocated.get() {
            return Err(Error::invalid("allocate", "a graph context allocates one graph, once"));
        }
        if !std::ptr::eq(graph.context_ptr(), self.ctx.raw()) {
            return Err(Error::invalid("allocate", "the graph was built in another context"));
        }
        graph.check_foreign_memory(&self.ctx, "allocate")?;
        self.allocated.set(true);
        // SAFETY: both objects are alive; gallocr reports failure through its return value.
        let ok = unsafe { sys::ggml_gallocr_alloc_graph(self.buffer.raw.as_ptr(), graph.raw()) };
        if ok {
            Ok(())
        } else {
            Err(Error::Allocation { what: "graph compute buffer", bytes: 0 })
        }
    }
}

impl std::ops::Deref for GraphContext<'_> {
    type Target = Context;

    fn deref(&self) -> &Context {
        &self.ctx
    }
}

/// Time one node of a graph took when the graph was computed node by node (`Backend::profile`).
#[derive(Clone, Debug)]
pub struct NodeTime {
    /// ggml's op name ("MUL_MAT", "FLASH_ATTN_EXT"; the unary op's own name for unary ops).
    pub op: String,
    /// The node's tensor name (empty if it was never named).
    pub name: String,
    /// The node's output shape.
    pub shape: crate::Shape,
    /// Shapes of its first two sources (the operands of a product).
    pub sources: [Option<crate::Shape>; 2],
    /// Wall-clock seconds computing this node alone took, on the threads the whole graph would use.
    pub seconds: f64,
}

/// The CPU backend, with a persistent thread pool (ggml would otherwise start threads per compute).
pub struct Backend {
    raw: NonNull<sys::ggml_backend>,
    threadpool: NonNull<sys::ggml_threadpool>,
    n_threads: usize,
    /// The threads the last graph ran on (a small graph runs on fewer: `threads::threads_for`).
    threads_now: Cell<usize>,
    /// The cores other programs leave free, and what each kind of graph ran fastest on; None: every
    /// graph on `n_threads` (`cpu_exact`).
    share: Option<(threads::CoreShare, threads::ThreadTuner)>,
}

impl Backend {
    /// A CPU backend whose graphs run on at most `n_threads` threads: fewer for a graph whose work is
    /// not worth waking them, and no more than the cores other programs leave free (`crate::threads`).
    pub fn cpu(n_threads: usize) -> Result<Self> {
        let mut backend = Self::cpu_exact(n_threads)?;
        backend.share = Some((threads::CoreShare::new(), threads::ThreadTuner::default()));
        Ok(backend)
    }

    /// A CPU backend that runs every graph on exactly `n_threads` threads, however small the graph or
    /// busy the machine: for tests of threaded kernels and measurements of thread counts.
    pub fn cpu_exact(n_threads: usize) -> Result<Self> {
        crate::init();
        if n_threads == 0 || n_threads > 1024 {
            return Err(Error::invalid("Backend::cpu", format!("{n_threads} threads (use 1 to 1024)")));
        }
        // SAFETY: creates a fresh CPU backend; null means failure.
        let raw = unsafe { sys::ggml_backend_cpu_init() };
        let raw = NonNull::new(raw).ok_or(Error::Allocation { what: "CPU backend", bytes: 0 })?;
        // SAFETY: `raw` is a CPU backend, as ggml_backend_cpu_set_n_threads requires.
        unsafe { sys::ggml_backend_cpu_set_n_threads(raw.as_ptr(), n_threads as i32) };
        // SAFETY: the params are ggml's defaults for this thread count; a null pool is an error.
        let mut params = unsafe { sys::ggml_threadpool_params_default(n_threads as i32) };
        // Idle workers sleep between graphs (poll 0) instead of spinning for the next one: spinning
        // bought nothing measurable on SmolLM2 decode and, on shared cores, slowed small graphs a
        // hundredfold.
        params.poll = 0;
        // SAFETY: `params` is a valid, initialised parameter block.
        let pool = unsafe { sys::ggml_threadpool_new(&mut params) };
        let Some(threadpool) = NonNull::new(pool) else {
            // SAFETY: `raw` was created above and is freed once here.
            unsafe { sys::ggml_backend_free(raw.as_ptr()) };
            return Err(Error::Allocation { what: "thread pool", bytes: 0 });
        };
        // SAFETY: both are alive; the backend only borrows the pool, which outlives it (see Drop).
        unsafe { sys::ggml_backend_cpu_set_threadpool(raw.as_ptr(), threadpool.as_ptr()) };
        Ok(Backend { raw, threadpool, n_threads, threads_now: Cell::new(n_threads), share: None })
    }

    /// The most threads a graph runs on.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// The graph's work, the most threads it may run on now and the tuner that picks between them
    /// (None for `cpu_exact`).
    fn plan(&self, graph: *mut sys::ggml_cgraph) -> Option<(threads::GraphWork, usize, &threads::ThreadTuner)> {
        let (share, tuner) = self.share.as_ref()?;
        Some((threads::graph_work(graph), self.n_threads.min(share.free_cores()), tuner))
    }

    /// Runs the graph. Every tensor must have memory (`GraphAllocator::alloc`).
    pub fn compute(&self, graph: &Graph<'_>) -> Result<()> {
        graph.check_allocated()?;
        self.compute_raw(graph.raw())
    }

    /// Runs the graph one node at a time, timing each (a profile: each node also pays one dispatch
    /// to the thread pool, a few microseconds).
    pub fn profile(&self, graph: &Graph<'_>) -> Result<Vec<NodeTime>> {
        graph.check_allocated()?;
        self.profile_raw(graph.raw())
    }

    /// `profile` for a graph whose tensors all have memory (the caller checked it).
    pub(crate) fn profile_raw(&self, graph: *mut sys::ggml_cgraph) -> Result<Vec<NodeTime>> {
        let scratch = Context::for_graph(0, 1)?;
        // SAFETY: the context has room for a one-node graph (sized by for_graph).
        let one = unsafe { sys::ggml_new_graph_custom(scratch.raw(), 1, false) };
        let one = NonNull::new(one).ok_or(Error::Allocation { what: "profile graph", bytes: 0 })?;
        // Each node runs on the threads the whole graph would.
        let threads = self.plan(graph).map_or(self.n_threads, |(work, most, tuner)| tuner.choose(work, most));
        // SAFETY: the caller's graph is alive and allocated.
        let n = unsafe { sys::ggml_graph_n_nodes(graph) };
        let mut times = Vec::with_capacity(n as usize);
        for i in 0..n {
            // SAFETY: i < n_nodes; the node is a live, allocated tensor of the caller's graph, whose
            // sources were computed by the nodes before it, so computing it alone is what the full
            // compute does at this point.
            let node = unsafe {
                let node = sys::ggml_graph_node(graph, i);
                sys::ggml_graph_clear(one.as_ptr());
                sys::ggml_graph_add_node(one.as_ptr(), node);
                node
            };
            let started = std::time::Instant::now();
            self.compute_on(one.as_ptr(), threads)?;
            let seconds = started.elapsed().as_secs_f64();
            let tensor: Tensor<'_> = Tensor::from_raw(NonNull::new(node).expect("graph nodes are non-null"));
            // SAFETY: ggml_op_desc returns a static NUL-terminated name.
            let op = unsafe { std::ffi::CStr::from_ptr(sys::ggml_op_desc(node)) }.to_string_lossy().into_owned();
            // SAFETY: a live node's sources are live tensors or null.
            let sources = unsafe { (*node).src }.map(|s| NonNull::new(s).map(|s| Tensor::from_raw(s).shape()));
            times.push(NodeTime { op, name: tensor.name(), shape: tensor.shape(), sources: [sources[0], sources[1]], seconds });
        }
        Ok(times)
    }

    /// Runs a graph whose tensors all have memory (the caller checked it).
    pub(crate) fn compute_raw(&self, graph: *mut sys::ggml_cgraph) -> Result<()> {
        let Some((work, most, tuner)) = self.plan(graph) else {
            return self.compute_on(graph, self.n_threads);
        };
        let threads = tuner.choose(work, most);
        let started = Instant::now();
        self.compute_on(graph, threads)?;
        tuner.record(work, most, threads, started.elapsed().as_secs_f64());
        Ok(())
    }

    fn compute_on(&self, graph: *mut sys::ggml_cgraph, threads: usize) -> Result<()> {
        if self.threads_now.replace(threads) != threads {
            // SAFETY: `raw` is a CPU backend; 1 <= threads <= the pool's size.
            unsafe { sys::ggml_backend_cpu_set_n_threads(self.raw.as_ptr(), threads as i32) };
        }
        // SAFETY: the caller guarantees a live, fully allocated graph built from validated ops.
        let status = unsafe { sys::ggml_backend_graph_compute(self.raw.as_ptr(), graph) };
        if status == sys::GGML_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(Error::Compute(status))
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: `raw` came from ggml_backend_cpu_init and is freed once, before the pool it uses.
        unsafe { sys::ggml_backend_free(self.raw.as_ptr()) }
        // SAFETY: the pool came from ggml_threadpool_new and no backend refers to it any more.
        unsafe { sys::ggml_threadpool_free(self.threadpool.as_ptr()) }
    }
}
