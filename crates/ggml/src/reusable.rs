//! `ReusableGraph`: a graph built and allocated once, then computed many times with new input data
//! (decode steps of the same shape), so per-token work is only writing inputs and computing.
//!
//! A kept graph points at tensors of other stores (weights, cache layers), which lifetimes cannot
//! follow once the graph is stored. Every store buffer is therefore registered with a serial number
//! while alive; the graph records the serials of the buffers it reads, and refuses to compute (an
//! error, not a crash) once any of them was freed or replaced. It hands out only the tensors whose
//! memory is its own (inputs, intermediates, outputs): those live exactly as long as the graph.
//!
//! Building borrows the stores until the graph is finished, so none can be freed in between:
//!
//! ```compile_fail
//! # use ggml::{DType, ReusableGraph, TensorStore};
//! let mut store = TensorStore::new(1).unwrap();
//! let w = store.add("w", DType::F32, &[4, 2]).unwrap();
//! store.allocate().unwrap();
//! let kept = ReusableGraph::new(8, 8).unwrap();
//! let mut graph = kept.context().new_graph(8).unwrap();
//! let x = kept.context().new_tensor(DType::F32, &[4]).unwrap();
//! graph.expand(kept.context().mul_mat(store.get(w), x).unwrap()).unwrap();
//! let sealed = graph.seal();
//! drop(store); // error: `store` is still borrowed by the sealed graph
//! kept.finish(sealed).unwrap();
//! ```

use std::cell::{Cell, OnceCell};
use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ggml_sys as sys;

use crate::backend::Backend;
use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::graph::{ComputeBuffer, Graph};

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

/// A graph that has been built and can be handed to `ReusableGraph::finish`. It still borrows what
/// the graph was built from (`'ctx`), so no store it reads can be freed before it is finished.
pub struct SealedGraph<'ctx> {
    ctx: *const sys::ggml_context,
    raw: NonNull<sys::ggml_cgraph>,
    tensors: Vec<*mut sys::ggml_tensor>,
    _borrow: PhantomData<&'ctx Context>,
}

impl<'ctx> Graph<'ctx> {
    /// Ends building: the graph can now only be finished by the `ReusableGraph` that owns its context.
    pub fn seal(self) -> SealedGraph<'ctx> {
        SealedGraph {
            ctx: self.context_ptr(),
            raw: NonNull::new(self.raw()).expect("graphs are non-null"),
            tensors: self.tensor_ptrs(),
            _borrow: PhantomData,
        }
    }
}

/// What a finished graph knows.
struct Finished {
    graph: NonNull<sys::ggml_cgraph>,
    /// (buffer address, serial) of every store buffer the graph reads or writes.
    dependencies: Vec<(usize, u64)>,
    /// Named tensors whose memory the graph's own compute buffer holds.
    own: HashMap<String, NonNull<sys::ggml_tensor>>,
    /// Every tensor whose memory the graph's own compute buffer holds, by address.
    own_addresses: HashSet<usize>,
    /// Names of tensors in store memory (weights, cache views): refused by `tensor`.
    foreign: HashSet<String>,
}

/// A graph with its own context and compute buffer, kept across computes.
pub struct ReusableGraph {
    // Dropped before the context and buffer its pointers point into.
    finished: OnceCell<Finished>,
    /// The device whose support of every node was checked (null: none yet), so a kept graph is
    /// checked once, not at every step.
    checked_on: Cell<*const crate::Device>,
    ctx: Context,
    buffer: ComputeBuffer,
}

impl ReusableGraph {
    /// An empty graph context for `max_nodes` nodes; build in `context()`, then `finish`.
    pub fn new(max_tensors: usize, max_nodes: usize) -> Result<Self> {
        Ok(ReusableGraph {
            finished: OnceCell::new(),
            checked_on: Cell::new(std::ptr::null()),
            ctx: Context::for_graph(max_tensors, max_nodes)?,
            buffer: ComputeBuffer::new()?,
        })
    }

    /// `new`, for a graph `backend` runs: in its device's memory, built with ggml's own ops, when it
    /// is a device.
    pub fn for_backend(backend: &Backend, max_tensors: usize, max_nodes: usize) -> Result<Self> {
        let buffer = ComputeBuffer::for_backend(backend)?;
        let ctx = Context::for_graph(max_tensors, max_nodes)?;
        ctx.set_builds_for_device(buffer.is_on_device());
        Ok(ReusableGraph { finished: OnceCell::new(), checked_on: Cell::new(std::ptr::null()), ctx, buffer })
    }

    /// The context to build the graph in (before `finish`).
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Records what the graph depends on and allocates its intermediate tensors, once.
    pub fn finish(&self, sealed: SealedGraph<'_>) -> Result<()> {
        const OP: &str = "ReusableGraph::finish";
        if self.finished.get().is_some() {
            return Err(Error::invalid(OP, "the graph is already finished"));
        }
        if !std::ptr::eq(sealed.ctx, self.ctx.raw()) {
            return Err(Error::invalid(OP, "the graph was built in another context"));
        }
        let mut dependencies = Vec::new();
        let mut own = Vec::new();
        let mut foreign = HashSet::new();
        for &t in &sealed.tensors {
            let tensor = Tensor::from_raw(NonNull::new(t).expect("graph tensors are non-null"));
            // SAFETY: the sealed graph borrows everything it was built from, so every tensor in it is
            // alive: headers in this context or in stores, data in stores or not yet allocated.
            let header = unsafe { &*t };
            if header.data.is_null() {
                // Memory comes from this graph's compute buffer; only this context's tensors may get it.
                if !self.ctx.owns(t) {
                    return Err(Error::invalid(
                        OP,
                        format!("{tensor:?} has no memory and belongs to another context or store (allocate it first)"),
                    ));
                }
                own.push(t);
                continue;
            }
            let base = if header.view_src.is_null() {
                header
            } else {
                // SAFETY: a view's source outlives the view (it is in the same or an enclosing store or
                // context, alive as argued above).
                unsafe { &*header.view_src }
            };
            let buffer = base.buffer as usize;
            let serial = serial_of(buffer).ok_or_else(|| {
                Error::invalid(OP, format!("{tensor:?} is not in a TensorStore; kept graphs can only read store tensors"))
            })?;
            if !dependencies.contains(&(buffer, serial)) {
                dependencies.push((buffer, serial));
            }
            foreign.insert(tensor.name());
        }
        // SAFETY: the compute buffer's allocator and the graph are alive, and every tensor it will
        // place is a header of this context (checked above); failure is reported.
        let ok = unsafe { sys::ggml_gallocr_alloc_graph(self.buffer.raw(), sealed.raw.as_ptr()) };
        if !ok {
            return Err(Error::Allocation { what: "kept graph compute buffer", bytes: 0 });
        }
        let own_addresses = own.iter().map(|&t| t as usize).collect();
        let own = own
            .into_iter()
            .map(|t| NonNull::new(t).expect("graph tensors are non-null"))
            .map(|t| (Tensor::from_raw(t).name(), t))
            .filter(|(name, _)| !name.is_empty())
            .collect();
        let finished = Finished { graph: sealed.raw, dependencies, own, own_addresses, foreign };
        self.finished.set(finished).map_err(|_| Error::invalid(OP, "the graph is already finished"))
    }

    /// Bytes of the graph's own compute buffer.
    pub fn buffer_size(&self) -> usize {
        self.buffer.size()
    }

    /// Whether every store the graph uses is still the one it was built over.
    pub fn is_current(&self) -> bool {
        self.finished.get().is_some_and(|f| f.dependencies.iter().all(|&(buffer, serial)| serial_of(buffer) == Some(serial)))
    }

    /// A named tensor of the graph's own memory (inputs to write, outputs to read). Tensors of stores
    /// (weights, cache rows and their views) are refused: the graph does not keep them alive.
    pub fn tensor(&self, name: &str) -> Result<Tensor<'_>> {
        const OP: &str = "ReusableGraph::tensor";
        let finished = self.finished.get().ok_or_else(|| Error::invalid(OP, "the graph is not finished"))?;
        match finished.own.get(name) {
            // The header is in `self.ctx` and its data in `self.buffer`: both live as long as `&self`.
            Some(&t) => Ok(Tensor::from_raw(t)),
            None if finished.foreign.contains(name) => {
                Err(Error::invalid(OP, format!("`{name}` lives in a store, not in the graph; read it from its store")))
            }
            None => Err(Error::invalid(OP, format!("no tensor named `{name}`"))),
        }
    }

    /// The tensor at `address` if it is one of the graph's own (see `Slot`).
    pub(crate) fn own_tensor(&self, address: usize) -> Option<NonNull<sys::ggml_tensor>> {
        let finished = self.finished.get()?;
        finished.own_addresses.contains(&address).then(|| NonNull::new(address as *mut sys::ggml_tensor)).flatten()
    }

    /// Computes the graph node by node, timing each (see `Backend::profile`).
    pub fn profile(&self, backend: &Backend) -> Result<Vec<crate::backend::NodeTime>> {
        let finished = self.finished.get().ok_or_else(|| Error::invalid("ReusableGraph::profile", "the graph is not finished"))?;
        if !self.is_current() {
            return Err(Error::invalid("ReusableGraph::profile", "a store this graph uses was freed or replaced; rebuild it"));
        }
        backend.profile_raw(finished.graph.as_ptr())
    }

    /// Computes the graph; an error if it is not finished or a store it uses is gone.
    pub fn compute(&self, backend: &Backend) -> Result<()> {
        let finished = self.finished.get().ok_or_else(|| Error::invalid("ReusableGraph::compute", "the graph is not finished"))?;
        if !self.is_current() {
            return Err(Error::invalid("ReusableGraph::compute", "a store this graph uses was freed or replaced; rebuild it"));
        }
        backend.compute_kept_raw(finished.graph.as_ptr(), &self.checked_on)
    }
}
