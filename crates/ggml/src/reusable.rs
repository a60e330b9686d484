//! `ReusableGraph`: a graph built and allocated once, then computed many times with new input data
//! (decode steps of the same shape), so per-token work is only writing inputs and computing.
//!
//! A kept graph points at tensors of other stores (weights, cache layers), which lifetimes cannot
//! follow once the graph is stored. Every store buffer is therefore registered with a serial number
//! while alive; the graph records the serials of the buffers it reads, and refuses to compute (an
//! error, not a crash) once any of them was freed or replaced.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::graph::{Backend, ComputeBuffer, Graph};

static LIVE_BUFFERS: Mutex<Option<HashMap<usize, u64>>> = Mutex::new(None);
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

/// Records a store buffer as alive; returns its serial.
pub(crate) fn register_buffer(buffer: *mut sys::ggml_backend_buffer) -> u64 {
    let serial = NEXT_SERIAL.fetch_add(1, Ordering::Relaxed);
    let mut live = LIVE_BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
    live.get_or_insert_with(HashMap::new).insert(buffer as usize, serial);
    serial
}

/// Forgets a store buffer that is about to be freed.
pub(crate) fn unregister_buffer(buffer: *mut sys::ggml_backend_buffer) {
    let mut live = LIVE_BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(map) = live.as_mut() {
        map.remove(&(buffer as usize));
    }
}

fn serial_of(buffer: usize) -> Option<u64> {
    let live = LIVE_BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
    live.as_ref().and_then(|m| m.get(&buffer).copied())
}

/// A graph that has been built and can be handed to `ReusableGraph::finish`.
pub struct SealedGraph {
    ctx: *const sys::ggml_context,
    raw: NonNull<sys::ggml_cgraph>,
    tensors: Vec<*mut sys::ggml_tensor>,
}

impl Graph<'_> {
    /// Ends building: the graph can now only be finished by the `ReusableGraph` that owns its context.
    pub fn seal(self) -> SealedGraph {
        SealedGraph { ctx: self.context_ptr(), raw: NonNull::new(self.raw()).expect("graphs are non-null"), tensors: self.tensor_ptrs() }
    }
}

/// A graph with its own context and compute buffer, kept across computes.
pub struct ReusableGraph {
    graph: Option<NonNull<sys::ggml_cgraph>>,
    /// (buffer address, serial) of every store buffer the graph reads or writes.
    dependencies: Vec<(usize, u64)>,
    named: HashMap<String, NonNull<sys::ggml_tensor>>,
    // Dropped after the graph pointers above, which point into this context.
    ctx: Context,
    buffer: ComputeBuffer,
}

impl ReusableGraph {
    /// An empty graph context for `max_nodes` nodes; build in `context()`, then `finish`.
    pub fn new(max_tensors: usize, max_nodes: usize) -> Result<Self> {
        Ok(ReusableGraph {
            graph: None,
            dependencies: Vec::new(),
            named: HashMap::new(),
            ctx: Context::for_graph(max_tensors, max_nodes)?,
            buffer: ComputeBuffer::new()?,
        })
    }

    /// The context to build the graph in (before `finish`).
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Records what the graph depends on and allocates its intermediate tensors, once.
    pub fn finish(&mut self, sealed: SealedGraph) -> Result<()> {
        const OP: &str = "ReusableGraph::finish";
        if self.graph.is_some() {
            return Err(Error::invalid(OP, "the graph is already finished"));
        }
        if !std::ptr::eq(sealed.ctx, self.ctx.raw()) {
            return Err(Error::invalid(OP, "the graph was built in another context"));
        }
        let mut dependencies = Vec::new();
        for &t in &sealed.tensors {
            // SAFETY: the sealed graph's tensors are alive: they are in this context or in stores
            // the builder borrowed until now.
            let header = unsafe { &*t };
            if header.data.is_null() {
                continue;
            }
            let base = if header.view_src.is_null() {
                header
            } else {
                // SAFETY: a view's source outlives the view (ggml keeps it in the same or an
                // enclosing store or context, alive as argued above).
                unsafe { &*header.view_src }
            };
            let buffer = base.buffer as usize;
            let serial = serial_of(buffer).ok_or_else(|| {
                Error::invalid(
                    OP,
                    format!(
                        "{:?} is not in a TensorStore; kept graphs can only read store tensors",
                        Tensor::from_raw(NonNull::new(t).expect("non-null"))
                    ),
                )
            })?;
            if !dependencies.contains(&(buffer, serial)) {
                dependencies.push((buffer, serial));
            }
        }
        // SAFETY: the compute buffer's allocator and the graph are alive; failure is reported.
        let ok = unsafe { sys::ggml_gallocr_alloc_graph(self.buffer.raw(), sealed.raw.as_ptr()) };
        if !ok {
            return Err(Error::Allocation { what: "kept graph compute buffer", bytes: 0 });
        }
        for &t in &sealed.tensors {
            let tensor = Tensor::from_raw(NonNull::new(t).expect("non-null"));
            let name = tensor.name();
            if !name.is_empty() {
                self.named.insert(name, NonNull::new(t).expect("non-null"));
            }
        }
        self.dependencies = dependencies;
        self.graph = Some(sealed.raw);
        Ok(())
    }

    /// Bytes of the graph's own compute buffer.
    pub fn buffer_size(&self) -> usize {
        self.buffer.size()
    }

    /// Whether every store the graph uses is still the one it was built over.
    pub fn is_current(&self) -> bool {
        self.graph.is_some() && self.dependencies.iter().all(|&(buffer, serial)| serial_of(buffer) == Some(serial))
    }

    /// A named tensor of the graph (inputs to write, outputs to read).
    pub fn tensor(&self, name: &str) -> Result<Tensor<'_>> {
        self.named
            .get(name)
            .map(|&t| Tensor::from_raw(t))
            .ok_or_else(|| Error::invalid("ReusableGraph::tensor", format!("no tensor named `{name}`")))
    }

    /// Computes the graph; an error if it is not finished or a store it uses is gone.
    pub fn compute(&self, backend: &Backend) -> Result<()> {
        let graph = self.graph.ok_or_else(|| Error::invalid("ReusableGraph::compute", "the graph is not finished"))?;
        if !self.is_current() {
            return Err(Error::invalid("ReusableGraph::compute", "a store this graph uses was freed or replaced; rebuild it"));
        }
        backend.compute_raw(graph.as_ptr())
    }
}
