//! `Backend`: what runs graphs — ggml's CPU backend with a persistent thread pool, or a device
//! (`Device`) whose graphs run whole on it.

use std::cell::Cell;
use std::ptr::NonNull;
use std::rc::Rc;
use std::time::Instant;

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::threads;

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

/// What runs graphs: the CPU (ggml's backend with a persistent thread pool; ggml would otherwise
/// start threads per compute) or a device.
pub struct Backend {
    on: On,
}

enum On {
    Cpu(CpuBackend),
    Device(Rc<Device>),
}

struct CpuBackend {
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
        let mut cpu = CpuBackend::new(n_threads)?;
        cpu.share = Some((threads::CoreShare::new(), threads::ThreadTuner::default()));
        Ok(Backend { on: On::Cpu(cpu) })
    }

    /// A CPU backend that runs every graph on exactly `n_threads` threads, however small the graph or
    /// busy the machine: for tests of threaded kernels and measurements of thread counts.
    pub fn cpu_exact(n_threads: usize) -> Result<Self> {
        Ok(Backend { on: On::Cpu(CpuBackend::new(n_threads)?) })
    }

    /// A backend running graphs on `device` (built in its memory: `ComputeBuffer::for_backend`).
    pub fn on_device(device: Rc<Device>) -> Self {
        Backend { on: On::Device(device) }
    }

    /// The device graphs run on; None for the CPU.
    pub fn device(&self) -> Option<&Rc<Device>> {
        match &self.on {
            On::Cpu(_) => None,
            On::Device(d) => Some(d),
        }
    }

    /// The most threads a graph runs on (1 on a device: the device's own parallelism is not ours).
    pub fn n_threads(&self) -> usize {
        match &self.on {
            On::Cpu(cpu) => cpu.n_threads,
            On::Device(_) => 1,
        }
    }

    /// Runs the graph. Every tensor must have memory (`GraphAllocator::alloc`); on a device, every
    /// node must be one it runs (an error naming it otherwise).
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

    /// Runs a graph whose tensors all have memory (the caller checked it).
    pub(crate) fn compute_raw(&self, graph: *mut sys::ggml_cgraph) -> Result<()> {
        match &self.on {
            On::Cpu(cpu) => cpu.compute_raw(graph),
            On::Device(device) => device.compute_raw(graph),
        }
    }

    /// `compute_raw` for a kept graph computed again and again: on a device its nodes are checked the
    /// first time only (`checked_on` remembers which device accepted them).
    pub(crate) fn compute_kept_raw(&self, graph: *mut sys::ggml_cgraph, checked_on: &Cell<*const Device>) -> Result<()> {
        match &self.on {
            On::Cpu(cpu) => cpu.compute_raw(graph),
            On::Device(device) => {
                if !std::ptr::eq(checked_on.get(), Rc::as_ptr(device)) {
                    device.check_raw(graph)?;
                    checked_on.set(Rc::as_ptr(device));
                }
                device.run_raw(graph)
            }
        }
    }

    /// `profile` for a graph whose tensors all have memory (the caller checked it).
    pub(crate) fn profile_raw(&self, graph: *mut sys::ggml_cgraph) -> Result<Vec<NodeTime>> {
        let scratch = Context::for_graph(0, 1)?;
        // SAFETY: the context has room for a one-node graph (sized by for_graph).
        let one = unsafe { sys::ggml_new_graph_custom(scratch.raw(), 1, false) };
        let one = NonNull::new(one).ok_or(Error::Allocation { what: "profile graph", bytes: 0 })?;
        // Each node runs on the threads the whole graph would.
        let threads = match &self.on {
            On::Cpu(cpu) => cpu.plan(graph).map_or(cpu.n_threads, |(work, most, tuner)| tuner.choose(work, most)),
            On::Device(_) => 1,
        };
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
            let started = Instant::now();
            match &self.on {
                On::Cpu(cpu) => cpu.compute_on(one.as_ptr(), threads)?,
                On::Device(device) => device.compute_raw(one.as_ptr())?,
            }
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
}

impl CpuBackend {
    fn new(n_threads: usize) -> Result<Self> {
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
        Ok(CpuBackend { raw, threadpool, n_threads, threads_now: Cell::new(n_threads), share: None })
    }

    /// The graph's work, the most threads it may run on now and the tuner that picks between them
    /// (None for `cpu_exact`).
    fn plan(&self, graph: *mut sys::ggml_cgraph) -> Option<(threads::GraphWork, usize, &threads::ThreadTuner)> {
        let (share, tuner) = self.share.as_ref()?;
        Some((threads::graph_work(graph), self.n_threads.min(share.free_cores()), tuner))
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

impl Drop for CpuBackend {
    fn drop(&mut self) {
        // SAFETY: `raw` came from ggml_backend_cpu_init and is freed once, before the pool it uses.
        unsafe { sys::ggml_backend_free(self.raw.as_ptr()) }
        // SAFETY: the pool came from ggml_threadpool_new and no backend refers to it any more.
        unsafe { sys::ggml_threadpool_free(self.threadpool.as_ptr()) }
    }
}
