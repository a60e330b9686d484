//! Compute graphs and the graph allocator (in CPU or device memory).

use std::cell::Cell;
use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::marker::PhantomData;
use std::ptr::NonNull;

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};

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

/// A reusable buffer (CPU or device memory) for the intermediate tensors of graphs (ggml's graph allocator).
///
/// Graphs get memory through a [`GraphContext`], which borrows the buffer mutably: tensors of a graph
/// cannot outlive the memory they point into, and no second graph can reuse (and so overwrite or
/// reallocate) the buffer while the first one's tensors are alive.
pub struct ComputeBuffer {
    raw: NonNull<sys::ggml_gallocr>,
    /// Over a device's memory: its graphs are built for the device (`Context::builds_for_device`).
    for_device: bool,
}

impl ComputeBuffer {
    /// An empty allocator over the CPU buffer type; it takes memory when a graph is first allocated.
    pub fn new() -> Result<Self> {
        crate::init();
        // SAFETY: the CPU buffer type is a static object; gallocr_new allocates a small struct.
        let raw = unsafe { sys::ggml_gallocr_new(sys::ggml_backend_cpu_buffer_type()) };
        Ok(ComputeBuffer { raw: NonNull::new(raw).ok_or(Error::Allocation { what: "graph allocator", bytes: 0 })?, for_device: false })
    }

    /// An empty allocator over the memory `backend` computes in (the CPU's or its device's).
    pub fn for_backend(backend: &crate::Backend) -> Result<Self> {
        match backend.device() {
            Some(device) => Self::on(device),
            None => Self::new(),
        }
    }

    /// An empty allocator over a device's memory (`Device::compute` runs its graphs).
    pub fn on(device: &crate::Device) -> Result<Self> {
        // SAFETY: the device's buffer type is a static registry object; gallocr_new allocates a small struct.
        let raw = unsafe { sys::ggml_gallocr_new(device.buffer_type()) };
        Ok(ComputeBuffer { raw: NonNull::new(raw).ok_or(Error::Allocation { what: "graph allocator", bytes: 0 })?, for_device: true })
    }

    /// A header-only context for one graph of at most `max_nodes` nodes, whose tensors take their
    /// memory from this buffer.
    pub fn context(&mut self, max_tensors: usize, max_nodes: usize) -> Result<GraphContext<'_>> {
        let ctx = Context::for_graph(max_tensors, max_nodes)?;
        ctx.set_builds_for_device(self.for_device);
        Ok(GraphContext { ctx, buffer: self, allocated: Cell::new(false) })
    }

    /// Whether the buffer is a device's memory.
    pub fn is_on_device(&self) -> bool {
        self.for_device
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
