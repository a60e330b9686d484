//! `Device`: a compute device other than the CPU (a GPU through ggml's Vulkan backend), where weights,
//! caches and graphs' intermediate tensors live in the device's memory and graphs run whole on it.
//!
//! No node falls back to the CPU: a graph with an op the device cannot run (our own CPU kernels, or a
//! type the device lacks for that op) is refused before it runs, with the op, its types and the
//! device named — llama.cpp's users meet that fallback as a silent 7× slowdown.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::DType;

/// An opened device with its backend (one stream of work).
pub struct Device {
    dev: sys::ggml_backend_dev_t,
    backend: NonNull<sys::ggml_backend>,
    name: String,
}

impl Device {
    /// Opens the device ggml's registry calls `name` (`Vulkan0`; see `crate::devices`). The CPU is
    /// not a `Device`: it is `Backend::cpu`.
    pub fn open(name: &str) -> Result<Device> {
        crate::init();
        let known = || crate::devices().iter().map(|d| d.name.clone()).collect::<Vec<_>>().join(", ");
        let c_name = CString::new(name).map_err(|_| Error::invalid("Device::open", "a device name has no NUL bytes"))?;
        // SAFETY: a registry lookup by a NUL-terminated name; null when there is no such device.
        let dev = unsafe { sys::ggml_backend_dev_by_name(c_name.as_ptr()) };
        if dev.is_null() {
            return Err(Error::invalid("Device::open", format!("no device `{name}` (this build and machine have: {})", known())));
        }
        // SAFETY: dev is a registry device.
        if unsafe { sys::ggml_backend_dev_type(dev) } == sys::GGML_BACKEND_DEVICE_TYPE_CPU {
            return Err(Error::invalid("Device::open", format!("`{name}` is the CPU: use the CPU backend")));
        }
        // SAFETY: dev is a registry device; a null backend is an initialisation failure.
        let backend = unsafe { sys::ggml_backend_dev_init(dev, std::ptr::null()) };
        let backend = NonNull::new(backend).ok_or(Error::Allocation { what: "device backend", bytes: 0 })?;
        Ok(Device { dev, backend, name: name.to_owned() })
    }

    /// The device's registry name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Memory the device reports free and in all, in bytes.
    pub fn memory(&self) -> (usize, usize) {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: dev is a registry device; the call fills the two sizes.
        unsafe { sys::ggml_backend_dev_memory(self.dev, &mut free, &mut total) };
        (free, total)
    }

    /// The device memory's buffer type (for stores and compute buffers on the device).
    pub(crate) fn buffer_type(&self) -> sys::ggml_backend_buffer_type_t {
        // SAFETY: dev is a registry device; its buffer type is static.
        unsafe { sys::ggml_backend_dev_buffer_type(self.dev) }
    }

    /// Whether the device runs this op with these operand types and shapes.
    pub fn supports(&self, op: Tensor<'_>) -> bool {
        // SAFETY: the backend is alive and `op` is a live node header.
        unsafe { sys::ggml_backend_supports_op(self.backend.as_ptr(), op.raw()) }
    }

    /// Whether the device's flash attention takes K of type `k` and V of type `v` at head size
    /// `head_dim` (asked of the device with a node of that shape; nothing runs).
    pub fn attends(&self, k: DType, v: DType, head_dim: usize) -> Result<bool> {
        let ctx = Context::for_graph(8, 8)?;
        let hd = head_dim as i64;
        let q = ctx.new_tensor(DType::F32, &[hd, 1, 2])?;
        let (kt, vt) = (ctx.new_tensor(k, &[hd, 256, 1])?, ctx.new_tensor(v, &[hd, 256, 1])?);
        Ok(self.supports(ctx.flash_attn_ext(q, kt, vt, None, 1.0)?))
    }

    /// Runs the graph on the device. Every tensor must have device memory (a store allocated with
    /// `TensorStore::allocate_on`, a `ComputeBuffer::on`); a node the device cannot run is an error
    /// naming it, before anything runs.
    pub fn compute(&self, graph: &Graph<'_>) -> Result<()> {
        graph.check_allocated()?;
        self.compute_raw(graph.raw())
    }

    /// `compute` for a graph whose tensors all have device memory (the caller checked it).
    pub(crate) fn compute_raw(&self, graph: *mut sys::ggml_cgraph) -> Result<()> {
        self.check_raw(graph)?;
        self.run_raw(graph)
    }

    /// An error naming the first node of the graph the device cannot run.
    pub(crate) fn check_raw(&self, graph: *mut sys::ggml_cgraph) -> Result<()> {
        // SAFETY: the caller's graph is alive; indices below its node count are its nodes.
        let n = unsafe { sys::ggml_graph_n_nodes(graph) };
        for i in 0..n {
            // SAFETY: i < n; graph nodes are non-null live tensors.
            let node: Tensor<'_> =
                Tensor::from_raw(NonNull::new(unsafe { sys::ggml_graph_node(graph, i) }).expect("graph nodes are non-null"));
            if !self.supports(node) {
                return Err(Error::invalid("Device::compute", format!("the device {} cannot run {}", self.name, describe(node))));
            }
        }
        Ok(())
    }

    /// Runs a graph `check_raw` accepted, and waits for it.
    pub(crate) fn run_raw(&self, graph: *mut sys::ggml_cgraph) -> Result<()> {
        // SAFETY: the graph is allocated and every node is one the device supports (the caller checked).
        let status = unsafe { sys::ggml_backend_graph_compute(self.backend.as_ptr(), graph) };
        // A device's compute may still be running when graph_compute returns: wait, so that outputs
        // read next, inputs written for the next step and buffers freed after are not touched while
        // its kernels use them.
        // SAFETY: the backend is alive; synchronize waits for the work queued on it.
        unsafe { sys::ggml_backend_synchronize(self.backend.as_ptr()) };
        if status == sys::GGML_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(Error::Compute(status))
        }
    }
}

/// "OP (name) on TYPE [shape], TYPE [shape]" for an error message.
fn describe(node: Tensor<'_>) -> String {
    // SAFETY: ggml_op_desc returns a static NUL-terminated name for a live node.
    let op = unsafe { CStr::from_ptr(sys::ggml_op_desc(node.raw())) }.to_string_lossy().into_owned();
    // SAFETY: a live node's sources are live tensors or null.
    let sources: Vec<String> = unsafe { (*node.raw()).src }
        .iter()
        .filter_map(|&s| NonNull::new(s))
        .map(|s| {
            let t: Tensor<'_> = Tensor::from_raw(s);
            format!("{} {:?}", t.dtype(), &t.shape()[..t.n_dims().max(1)])
        })
        .collect();
    let name = node.name();
    let named = if name.is_empty() { String::new() } else { format!(" (`{name}`)") };
    format!("{op}{named} over {}", sources.join(", "))
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: the backend came from ggml_backend_dev_init and is freed once; buffers allocated
        // from the device's buffer type do not refer to it.
        unsafe { sys::ggml_backend_free(self.backend.as_ptr()) }
    }
}
