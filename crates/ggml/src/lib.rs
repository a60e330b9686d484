//! A safe wrapper over ggml: its CPU backend and (with the `vulkan` feature) its Vulkan devices.
//!
//! Every op checks the shapes and types ggml would assert on and returns an [`Error`] instead, since a
//! failed ggml assert aborts the whole process. Tensors borrow the context (or store) that owns them.
//!
//! # Where raw tensor pointers become `Tensor<'_>`
//! A [`Tensor<'ctx>`] is a copyable pointer whose lifetime promises that its header and its data stay
//! alive for `'ctx`. Raw pointers become tensors only here, each relying on one invariant:
//! - `Context::wrap` (every op and `new_tensor`): the pointer ggml just returned from a live context;
//!   `'ctx` borrows that context, and the op signatures make every operand outlive it.
//! - `TensorStore::get`: headers in the store's context, data in its buffer, both freed only when the
//!   store drops; the tensor borrows the store.
//! - `Graph::find`: tensors reachable from a `Graph<'ctx>`, which exists only while its context and
//!   every operand's owner (stores borrowed by the ops) are alive.
//! - `Graph::check_allocated` / `check_foreign_memory`: the same, for an error message only.
//! - `Backend::profile_raw`: nodes of a graph the caller keeps alive (a `Graph` or a current kept graph).
//! - `ReusableGraph::finish`: the `SealedGraph<'ctx>` still borrows every store the graph was built
//!   from, so the headers it walks are alive (dropping a store before `finish` does not compile).
//! - `ReusableGraph::tensor`: only tensors whose header is in the kept graph's own context and whose
//!   data is in its own compute buffer; tensors of stores (weights, cache views) are refused, since the
//!   kept graph does not keep stores alive (it records their buffers' serials and refuses to compute
//!   once one is gone).
//!
//! Graph allocation (`GraphContext::allocate`, `ReusableGraph::finish`) refuses a graph holding a
//! tensor of another context that has no memory yet: the allocator would place it in the compute buffer
//! and leave its owner pointing into memory it does not own.

mod backend;
mod context;
mod copies;
mod custom;
mod device;
mod devices;
mod dtype;
mod error;
mod few_columns;
pub mod gguf;
mod graph;
mod host_copy;
mod interleaved;
mod log;
mod narrow_product;
mod ops;
mod product;
mod reusable;
mod slot;
mod split_attention;
mod store;
mod threads;
mod views;
mod vnni_product;

pub use backend::{Backend, NodeTime};
pub use context::{tensor_overhead, Context, ContextParams, Tensor};
pub use device::Device;
pub use devices::{devices, gpu_backends, DeviceInfo, DeviceKind};
pub use dtype::{DType, ALL_DTYPES};
pub use error::{Error, Result, Shape};
pub use few_columns::{MAX_FEW_COLUMNS, MIN_FEW_COLUMNS};
pub use graph::{graph_overhead, ComputeBuffer, Graph, GraphContext};
pub use host_copy::{copy_bytes, ByteCopy};
pub use narrow_product::MAX_NARROW_INNER;
pub use ops::{RopeMode, RopeParams};
pub use reusable::{ReusableGraph, SealedGraph};
pub use slot::{Slot, StepGraph};
pub use split_attention::AttentionSource;
pub use store::{StoreMemory, TensorId, TensorStore};
pub use vnni_product::MIN_VNNI_COLUMNS;

use ggml_sys as sys;

/// One-time set-up: log routing and the CPU backend's tables. Called by every constructor.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::install();
        // SAFETY: initialises ggml's CPU lookup tables; idempotent and called once here.
        unsafe { sys::ggml_cpu_init() };
    });
}

/// The version of the ggml sources compiled in.
pub fn ggml_version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(sys::ggml_version()) }.to_string_lossy().into_owned()
}

/// Where the compiled ggml tree was found at build time.
pub fn ggml_source_dir() -> &'static str {
    sys::SOURCE_DIR
}

/// Which of this crate's own kernels run on this CPU and build: the split attention's loops
/// (AVX-512, AVX2 or portable) and the products (AVX-512 VNNI for 16 columns and more, else ggml's).
pub fn own_kernels() -> Vec<&'static str> {
    let attention = if split_attention::has_avx512() {
        "attention: AVX-512"
    } else if split_attention::has_avx2() {
        "attention: AVX2"
    } else {
        "attention: portable"
    };
    let products = if vnni_product::has_vnni() {
        "products: AVX-512 VNNI (16+ columns; Q4_1/Q8_0 weights interleaved: every column count)"
    } else {
        "products: ggml's"
    };
    vec![attention, products]
}

/// The SIMD features ggml's CPU kernels were compiled with (and the CPU offers).
pub fn cpu_features() -> Vec<&'static str> {
    init();
    // SAFETY: each of these reads a compile-time constant or a cached cpuid result.
    let checks: [(&str, unsafe extern "C" fn() -> i32); 10] = [
        ("SSE3", sys::ggml_cpu_has_sse3),
        ("AVX", sys::ggml_cpu_has_avx),
        ("AVX2", sys::ggml_cpu_has_avx2),
        ("F16C", sys::ggml_cpu_has_f16c),
        ("FMA", sys::ggml_cpu_has_fma),
        ("AVX512", sys::ggml_cpu_has_avx512),
        ("AVX512_VNNI", sys::ggml_cpu_has_avx512_vnni),
        ("AVX512_BF16", sys::ggml_cpu_has_avx512_bf16),
        ("AMX_INT8", sys::ggml_cpu_has_amx_int8),
        ("LLAMAFILE", sys::ggml_cpu_has_llamafile),
    ];
    checks
        .into_iter()
        // SAFETY: see above; these functions take no arguments and have no preconditions.
        .filter(|(_, has)| unsafe { has() } != 0)
        .map(|(name, _)| name)
        .collect()
}
