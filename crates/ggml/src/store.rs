//! `TensorStore`: long-lived tensors (weights, cache layers) whose data lives in one CPU backend buffer.

use std::collections::HashMap;
use std::ptr::NonNull;

use ggml_sys as sys;

use crate::context::{tensor_overhead, Context, ContextParams, Tensor};
use crate::error::{Error, Result};
use crate::DType;

/// Where a store's tensors live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StoreMemory {
    /// Plain host memory: data can be written in place.
    #[default]
    Host,
    /// ggml's CPU repack buffer: Q4_0/Q8_0 weights are re-laid out on write for faster matrix
    /// products. Data must be written through `Tensor::write_bytes` (which converts).
    Repacked,
}

/// ggml's CPU repack buffer type, when this build has one (looked up once).
pub(crate) fn repack_buffer_type() -> Option<sys::ggml_backend_buffer_type_t> {
    static FOUND: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    FOUND.get_or_init(|| find_repack_buffer_type().map(|t| t as usize)).map(|t| t as sys::ggml_backend_buffer_type_t)
}

fn find_repack_buffer_type() -> Option<sys::ggml_backend_buffer_type_t> {
    crate::init();
    // SAFETY: registry lookups return static objects or null; the proc address, when present, has the
    // documented ggml_backend_dev_get_extra_bufts_t signature and returns a null-terminated array.
    unsafe {
        let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
        if dev.is_null() {
            return None;
        }
        let reg = sys::ggml_backend_dev_backend_reg(dev);
        let name = c"ggml_backend_dev_get_extra_bufts";
        let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
        if f.is_null() {
            return None;
        }
        let get: unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *mut sys::ggml_backend_buffer_type_t = std::mem::transmute(f);
        let mut list = get(dev);
        while !list.is_null() && !(*list).is_null() {
            let buft = *list;
            if std::ffi::CStr::from_ptr(sys::ggml_backend_buft_name(buft)).to_bytes() == b"CPU_REPACK" {
                return Some(buft);
            }
            list = list.add(1);
        }
        None
    }
}

/// Index of a tensor in its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorId(usize);

/// How a declared tensor's data is laid out, and so which of the store's contexts holds its header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// ggml's own layout.
    Plain,
    /// ggml's repack buffer.
    Repacked,
    /// Our 16-row interleave (`interleaved`), in a buffer of its own.
    Interleaved,
}

const LAYOUTS: [Layout; 3] = [Layout::Plain, Layout::Repacked, Layout::Interleaved];

/// A set of named tensors declared first, then allocated together in one backend buffer (plus a
/// repack buffer and an interleaved one for matrices declared with `add_for_products`). The buffers
/// are freed (before the headers' contexts) when the store is dropped.
pub struct TensorStore {
    /// Per layout (in `LAYOUTS` order): its buffer once allocated.
    buffers: [Option<NonNull<sys::ggml_backend_buffer>>; 3],
    tensors: Vec<NonNull<sys::ggml_tensor>>,
    layouts: Vec<Layout>,
    by_name: HashMap<String, TensorId>,
    max_tensors: usize,
    memory: StoreMemory,
    // Declared last so they are dropped after the buffers; in `LAYOUTS` order.
    contexts: [Context; 3],
}

impl TensorStore {
    /// An empty store with header room for `max_tensors` tensors (adding more is an error); no data
    /// memory until `allocate`.
    pub fn new(max_tensors: usize) -> Result<Self> {
        let params = || ContextParams { mem_size: tensor_overhead() * max_tensors.max(1), no_alloc: true };
        Ok(TensorStore {
            buffers: [None; 3],
            tensors: Vec::new(),
            layouts: Vec::new(),
            by_name: HashMap::new(),
            max_tensors,
            memory: StoreMemory::Host,
            contexts: [Context::new(params())?, Context::new(params())?, Context::new(params())?],
        })
    }

    /// Whether `add_for_products` would place a tensor of this type and shape in ggml's repack buffer:
    /// this build has one, and the CPU has a repacked layout for it (ggml's rule on x86: Q4_0 with a
    /// multiple of 8 rows, on AVX2). Allocation checks ggml agreed.
    pub fn repacks(dtype: DType, shape: &[i64]) -> bool {
        let rows = shape.get(1).copied().unwrap_or(1);
        let matrix = shape.iter().skip(2).all(|&d| d == 1);
        dtype == DType::Q4_0 && matrix && rows % 8 == 0 && crate::cpu_features().contains(&"AVX2") && repack_buffer_type().is_some()
    }

    /// Whether `add_for_products` would interleave a tensor of this type and shape for our own
    /// products (Q4_1 matrices with rows in sixteens, on AVX-512 VNNI: see `Context::product`).
    pub fn interleaves(dtype: DType, shape: &[i64]) -> bool {
        crate::interleaved::interleaves(dtype, shape)
    }

    /// Declares a matrix used only as the first operand of whole-tensor matrix products through
    /// `Context::product`: in ggml's repack buffer when `repacks` says it has a layout there, else
    /// interleaved when `interleaves` says so (faster products either way), else as `add`. Its data
    /// must be written through `Tensor::write_bytes`.
    pub fn add_for_products(&mut self, name: &str, dtype: DType, shape: &[i64]) -> Result<TensorId> {
        let layout = match (Self::repacks(dtype, shape), Self::interleaves(dtype, shape)) {
            (true, _) => Layout::Repacked,
            (false, true) => Layout::Interleaved,
            (false, false) => Layout::Plain,
        };
        self.declare(name, dtype, shape, layout)
    }

    /// Declares a matrix used whole as the first operand of products through `Context::product` and
    /// looked up by rows through `Context::get_rows` (a tied embedding and output head): interleaved
    /// when `interleaves` says so, else as `add` (ggml's repack buffer has no row lookups). Its data
    /// must be written through `Tensor::write_bytes`.
    pub fn add_for_products_and_rows(&mut self, name: &str, dtype: DType, shape: &[i64]) -> Result<TensorId> {
        let layout = if Self::interleaves(dtype, shape) { Layout::Interleaved } else { Layout::Plain };
        self.declare(name, dtype, shape, layout)
    }

    /// Whether the tensor lives in the repack buffer (write it through `Tensor::write_bytes`).
    pub fn is_repacked(&self, id: TensorId) -> bool {
        self.layouts[id.0] == Layout::Repacked || self.memory == StoreMemory::Repacked
    }

    /// Whether the tensor is interleaved (write it through `Tensor::write_bytes`).
    pub fn is_interleaved(&self, id: TensorId) -> bool {
        self.layouts[id.0] == Layout::Interleaved
    }

    /// Whether the tensor's data is written whole through `Tensor::write_bytes` (repacked or
    /// interleaved), not in place through `data_mut`.
    pub fn written_whole(&self, id: TensorId) -> bool {
        self.is_repacked(id) || self.is_interleaved(id)
    }

    /// Declares a tensor; only before `allocate`.
    pub fn add(&mut self, name: &str, dtype: DType, shape: &[i64]) -> Result<TensorId> {
        self.declare(name, dtype, shape, Layout::Plain)
    }

    fn declare(&mut self, name: &str, dtype: DType, shape: &[i64], layout: Layout) -> Result<TensorId> {
        if self.buffers.iter().any(Option::is_some) {
            return Err(Error::invalid("TensorStore::add", "the store is already allocated"));
        }
        if self.tensors.len() >= self.max_tensors {
            return Err(Error::invalid("TensorStore::add", format!("more than {} tensors", self.max_tensors)));
        }
        if self.by_name.contains_key(name) {
            return Err(Error::invalid("TensorStore::add", format!("tensor `{name}` declared twice")));
        }
        let raw = self.context(layout).new_tensor(dtype, shape)?.set_name(name).raw();
        let id = TensorId(self.tensors.len());
        self.tensors.push(NonNull::new(raw).expect("new_tensor returns non-null"));
        self.layouts.push(layout);
        self.by_name.insert(name.to_owned(), id);
        Ok(id)
    }

    /// Gives every declared tensor memory in one CPU host buffer (zero-filled).
    pub fn allocate(&mut self) -> Result<()> {
        self.allocate_in(StoreMemory::Host)
    }

    fn context(&self, layout: Layout) -> &Context {
        &self.contexts[LAYOUTS.iter().position(|&l| l == layout).unwrap_or(0)]
    }

    /// Gives every tensor declared with `add` memory of the given kind, and those declared with
    /// `add_for_products` repack or interleaved memory (zero-filled).
    pub fn allocate_in(&mut self, memory: StoreMemory) -> Result<()> {
        if self.buffers.iter().any(Option::is_some) || self.tensors.is_empty() {
            return Ok(());
        }
        let mut buffers = [None; 3];
        for (slot, layout) in LAYOUTS.into_iter().enumerate() {
            let indices: Vec<usize> = (0..self.tensors.len()).filter(|&i| self.layouts[i] == layout).collect();
            if indices.is_empty() {
                continue;
            }
            let kind = if layout == Layout::Repacked { StoreMemory::Repacked } else { memory };
            match self.allocate_part(layout, kind, &indices) {
                Ok(b) => buffers[slot] = Some(b),
                Err(e) => {
                    buffers.into_iter().flatten().for_each(free_buffer);
                    return Err(e);
                }
            }
        }
        self.buffers = buffers;
        self.memory = memory;
        Ok(())
    }

    /// Allocates the headers of one context (the tensors at `indices`) in a buffer of `memory`.
    fn allocate_part(&self, layout: Layout, memory: StoreMemory, indices: &[usize]) -> Result<NonNull<sys::ggml_backend_buffer>> {
        let buft = match memory {
            // SAFETY: returns a static buffer type.
            StoreMemory::Host => unsafe { sys::ggml_backend_cpu_buffer_type() },
            StoreMemory::Repacked => {
                repack_buffer_type().ok_or(Error::invalid("allocate_in", "this ggml build has no CPU repack buffer"))?
            }
        };
        self.allocate_part_in(layout, buft, memory == StoreMemory::Repacked, indices)
    }

    /// Gives every tensor memory on the device (zero-filled): weights and caches the device's graphs
    /// read. Tensors declared for products in the CPU's layouts (ggml's repack buffer, our
    /// interleave) are refused: the device reads ggml's own layout only.
    pub fn allocate_on(&mut self, device: &crate::Device) -> Result<()> {
        if self.buffers.iter().any(Option::is_some) || self.tensors.is_empty() {
            return Ok(());
        }
        if let Some(i) = self.layouts.iter().position(|&l| l != Layout::Plain) {
            let name = self.tensor(self.tensors[i]).name();
            return Err(Error::invalid(
                "allocate_on",
                format!("tensor `{name}` is declared in a CPU-only layout (repacked or interleaved)"),
            ));
        }
        let indices: Vec<usize> = (0..self.tensors.len()).collect();
        self.buffers[0] = Some(self.allocate_part_in(Layout::Plain, device.buffer_type(), false, &indices)?);
        Ok(())
    }

    fn allocate_part_in(
        &self,
        layout: Layout,
        buft: sys::ggml_backend_buffer_type_t,
        repacked: bool,
        indices: &[usize],
    ) -> Result<NonNull<sys::ggml_backend_buffer>> {
        let ctx = self.context(layout);
        let bytes: usize = indices.iter().map(|&i| self.tensor(self.tensors[i]).nbytes()).sum();
        // SAFETY: the context holds only unallocated headers; the buffer type is static. A null
        // result is an allocation failure.
        let raw = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx.raw(), buft) };
        let buffer = NonNull::new(raw).ok_or(Error::Allocation { what: "tensor store buffer", bytes })?;
        if repacked {
            // The repack buffer records each tensor's packed layout in `extra`; a type or shape with no
            // layout on this CPU leaves it null, and writing such a tensor would crash inside ggml.
            // SAFETY: the headers are live and were just initialised by the allocation.
            if let Some(&i) = indices.iter().find(|&&i| unsafe { self.tensors[i].as_ref() }.extra.is_null()) {
                let t = self.tensor(self.tensors[i]);
                let why = format!("tensor `{}` ({} {:?}) has no repacked layout on this CPU", t.name(), t.dtype(), t.shape());
                // SAFETY: the buffer was just allocated here and nothing else refers to it yet.
                unsafe { sys::ggml_backend_buffer_free(buffer.as_ptr()) };
                return Err(Error::invalid("allocate_in", why));
            }
        }
        // SAFETY: the buffer was just allocated and is owned by this store.
        unsafe { sys::ggml_backend_buffer_clear(buffer.as_ptr(), 0) };
        crate::reusable::register_buffer(buffer.as_ptr());
        if layout == Layout::Interleaved {
            crate::interleaved::register_buffer(buffer.as_ptr());
        }
        Ok(buffer)
    }

    fn tensor(&self, raw: NonNull<sys::ggml_tensor>) -> Tensor<'_> {
        Tensor::from_raw(raw)
    }

    /// The tensor, borrowed from the store.
    pub fn get(&self, id: TensorId) -> Tensor<'_> {
        self.tensor(self.tensors[id.0])
    }

    /// The id of the tensor added under `name`; `None` if there is none.
    pub fn find(&self, name: &str) -> Option<TensorId> {
        self.by_name.get(name).copied()
    }

    /// Tensors added so far (plain and repacked).
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no tensor has been added.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Bytes of the backend buffers (0 before allocation).
    pub fn buffer_bytes(&self) -> usize {
        // SAFETY: the buffers, if any, are alive while the store is.
        self.buffers.iter().flatten().map(|b| unsafe { sys::ggml_backend_buffer_get_size(b.as_ptr()) }).sum()
    }

    /// The tensor's bytes in host memory, for loading data straight into place.
    pub fn data_mut(&mut self, id: TensorId) -> Result<&mut [u8]> {
        if self.buffers.iter().all(Option::is_none) {
            return Err(Error::NotAllocated { op: "TensorStore::data_mut" });
        }
        if self.written_whole(id) {
            return Err(Error::invalid("TensorStore::data_mut", "repacked or interleaved memory is written through Tensor::write_bytes"));
        }
        let buffer = self.get(id).header_buffer();
        // SAFETY: a store tensor's buffer is one of the store's live buffers.
        if !buffer.is_null() && !unsafe { sys::ggml_backend_buffer_is_host(buffer) } {
            return Err(Error::invalid("TensorStore::data_mut", "device memory is written through Tensor::write_bytes"));
        }
        let t = self.get(id);
        let len = t.nbytes();
        let data = t.raw();
        // SAFETY: the CPU buffer is host memory; the tensor's data spans nbytes() bytes inside it, and
        // the &mut self borrow makes this the only live reference into that range.
        Ok(unsafe { std::slice::from_raw_parts_mut((*data).data.cast::<u8>(), len) })
    }
}

/// Forgets and frees a buffer of a store (in its drop, or when a later part fails to allocate).
fn free_buffer(buffer: NonNull<sys::ggml_backend_buffer>) {
    crate::reusable::unregister_buffer(buffer.as_ptr());
    crate::interleaved::unregister_buffer(buffer.as_ptr());
    // SAFETY: the buffer is owned by the store and freed once; the headers pointing into it are in
    // the store's contexts, dropped after it, and no Tensor borrowed from the store outlives it.
    unsafe { sys::ggml_backend_buffer_free(buffer.as_ptr()) }
}

impl Drop for TensorStore {
    fn drop(&mut self) {
        self.buffers.iter_mut().filter_map(Option::take).for_each(free_buffer);
    }
}
