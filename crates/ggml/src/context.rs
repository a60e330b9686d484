//! `Context` (a ggml arena of tensor headers, optionally with their data) and `Tensor<'ctx>`.

use std::ffi::CStr;
use std::marker::PhantomData;
use std::os::raw::{c_int, c_void};
use std::ptr::NonNull;

use ggml_sys as sys;

use crate::error::{Error, Result, Shape};
use crate::DType;

/// A ggml context: an arena holding tensor headers (and, unless `no_alloc`, their data).
/// Freed on drop; every `Tensor<'ctx>` made in it borrows it.
pub struct Context {
    raw: NonNull<sys::ggml_context>,
    /// Set for contexts whose graph runs on a device: ops build ggml's own nodes (which the device
    /// runs) instead of our CPU kernels.
    for_device: std::cell::Cell<bool>,
}

/// How a context is created.
#[derive(Clone, Copy, Debug)]
pub struct ContextParams {
    /// Bytes of the arena. With `no_alloc` only headers (and graphs) live there.
    pub mem_size: usize,
    /// Headers only: data comes later from a backend buffer or a graph allocator.
    pub no_alloc: bool,
}

impl Context {
    /// Creates a context with a ggml-allocated arena of `params.mem_size` bytes.
    pub fn new(params: ContextParams) -> Result<Self> {
        crate::init();
        let sys_params = sys::ggml_init_params { mem_size: params.mem_size, mem_buffer: std::ptr::null_mut(), no_alloc: params.no_alloc };
        // SAFETY: ggml_init copies the params; a null mem_buffer asks ggml to allocate the arena,
        // and a null return (allocation failure) is turned into an error.
        let raw = unsafe { sys::ggml_init(sys_params) };
        let raw = NonNull::new(raw).ok_or(Error::Allocation { what: "context", bytes: params.mem_size })?;
        Ok(Context { raw, for_device: std::cell::Cell::new(false) })
    }

    /// A header-only context sized for `max_tensors` tensors and one graph of `max_nodes` nodes.
    /// Its tensors get memory from a `ComputeBuffer` (see `ComputeBuffer::context`) or nowhere.
    pub fn for_graph(max_tensors: usize, max_nodes: usize) -> Result<Self> {
        let mem_size = tensor_overhead() * max_tensors + crate::graph::graph_overhead(max_nodes);
        Context::new(ContextParams { mem_size, no_alloc: true })
    }

    /// A context holding its tensors' data, with room for `data_bytes` of data in `max_tensors` tensors.
    pub fn with_data(max_tensors: usize, data_bytes: usize) -> Result<Self> {
        // Each tensor's data is aligned inside the arena; leave room for that padding.
        let mem_size = data_bytes + (tensor_overhead() + 64) * max_tensors + crate::graph::graph_overhead(4096);
        Context::new(ContextParams { mem_size, no_alloc: false })
    }

    /// Whether this context builds a graph for a device (`ComputeBuffer::on`, `ReusableGraph::for_backend`):
    /// its ops are ggml's own (ELU, concat, products, attention) rather than our CPU kernels.
    pub fn builds_for_device(&self) -> bool {
        self.for_device.get()
    }

    pub(crate) fn set_builds_for_device(&self, on: bool) {
        self.for_device.set(on);
    }

    pub(crate) fn raw(&self) -> *mut sys::ggml_context {
        self.raw.as_ptr()
    }

    /// Bytes still free in the arena.
    pub fn free_bytes(&self) -> usize {
        // SAFETY: the context is alive for the duration of &self.
        let (used, size) = unsafe { (sys::ggml_used_mem(self.raw()), sys::ggml_get_mem_size(self.raw())) };
        size.saturating_sub(used)
    }

    /// Refuses an op when the arena has no room left for its result's header: ggml aborts the process
    /// rather than fail when a context runs out. (Contexts that also hold data, not only headers, are
    /// sized by their users for it.)
    pub(crate) fn reserve_headers(&self, op: &'static str) -> Result<()> {
        let needed = 2 * tensor_overhead();
        if self.free_bytes() < needed {
            return Err(Error::Allocation { what: op, bytes: needed });
        }
        Ok(())
    }

    /// A new f32 node of `shape` that our `kernel` computes from `args` (ggml hands it the node, the
    /// thread's index and count, and `userdata` — a plain integer, never a pointer); `tasks` is ggml's
    /// thread count for it (-1: all). Every custom op of this crate is made here.
    ///
    /// # Safety
    /// `kernel` must read `args` only as the tensors they are (their types and shapes checked by the
    /// caller), write only within the new `shape` f32 node, and treat `userdata` as an integer;
    /// `args` must hold fewer than `GGML_MAX_SRC` tensors.
    pub(crate) unsafe fn custom_f32<'c>(
        &'c self,
        op: &'static str,
        shape: [i64; 4],
        args: &[Tensor<'c>],
        kernel: unsafe extern "C" fn(*mut sys::ggml_tensor, c_int, c_int, *mut c_void),
        tasks: c_int,
        userdata: usize,
    ) -> Result<Tensor<'c>> {
        self.reserve_headers(op)?;
        let mut raw: Vec<*mut sys::ggml_tensor> = args.iter().map(|t| t.raw()).collect();
        // SAFETY: the caller vouches for the kernel against these operands and shape (see above); ggml
        // copies the argument pointers into the node, and the userdata pointer is an integer's bits.
        let out = unsafe {
            sys::ggml_custom_4d(
                self.raw(),
                DType::F32.to_sys(),
                shape[0],
                shape[1],
                shape[2],
                shape[3],
                raw.as_mut_ptr(),
                raw.len() as c_int,
                Some(kernel),
                tasks,
                userdata as *mut c_void,
            )
        };
        self.wrap(out, op)
    }

    /// A new tensor of `dtype` with `shape` (1 to 4 dimensions, `shape[0]` contiguous).
    pub fn new_tensor(&self, dtype: DType, shape: &[i64]) -> Result<Tensor<'_>> {
        const OP: &str = "new_tensor";
        if shape.is_empty() || shape.len() > 4 {
            return Err(Error::invalid(OP, format!("{} dimensions; ggml tensors have 1 to 4", shape.len())));
        }
        if shape.iter().any(|&d| d <= 0) {
            return Err(Error::invalid(OP, format!("non-positive dimension in {shape:?}")));
        }
        dtype.check_row_len(OP, shape[0])?;
        let elements = shape.iter().try_fold(1i64, |acc, &d| acc.checked_mul(d));
        let bytes = elements
            .and_then(|n| (n as u128 / dtype.block_size() as u128).checked_mul(dtype.type_size() as u128))
            .filter(|&b| b < (1u128 << 50))
            .ok_or_else(|| Error::invalid(OP, format!("shape {shape:?} of {dtype} overflows")))?;
        let needed = tensor_overhead() + if self.allocates_data() { bytes as usize + 64 } else { 0 };
        if needed > self.free_bytes() {
            return Err(Error::Allocation { what: "tensor in context (arena full)", bytes: needed });
        }
        // SAFETY: the context is alive, the arena has room (checked above, so ggml does not abort), and
        // `shape` has 1..=4 positive entries, which ggml_new_tensor reads as n_dims values.
        let raw = unsafe { sys::ggml_new_tensor(self.raw(), dtype.to_sys(), shape.len() as i32, shape.as_ptr()) };
        self.wrap(raw, OP)
    }

    /// Whether the tensor header at `t` lives in this context's arena (was made in this context).
    pub(crate) fn owns(&self, t: *const sys::ggml_tensor) -> bool {
        // SAFETY: the context is alive; these read its arena's address and size.
        let (base, size) = unsafe { (sys::ggml_get_mem_buffer(self.raw()) as usize, sys::ggml_get_mem_size(self.raw())) };
        (base..base + size).contains(&(t as usize))
    }

    fn allocates_data(&self) -> bool {
        // SAFETY: the context is alive.
        !unsafe { sys::ggml_get_no_alloc(self.raw()) }
    }

    /// Wraps a tensor pointer that ggml just returned from this context.
    pub(crate) fn wrap(&self, raw: *mut sys::ggml_tensor, op: &'static str) -> Result<Tensor<'_>> {
        let raw = NonNull::new(raw).ok_or(Error::Allocation { what: op, bytes: 0 })?;
        let tensor = Tensor { raw, _ctx: PhantomData };
        // SAFETY: the pointer is a tensor ggml just created in this live context.
        DType::from_sys(unsafe { raw.as_ref() }.type_)?;
        Ok(tensor)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `raw` came from ggml_init and is freed exactly once; no Tensor<'_> outlives &self.
        unsafe { sys::ggml_free(self.raw()) }
    }
}

/// Bytes of arena one tensor header takes.
pub fn tensor_overhead() -> usize {
    // SAFETY: a pure function of ggml's struct sizes.
    unsafe { sys::ggml_tensor_overhead() }
}

/// A tensor in a context. Copyable like the pointer it is; it cannot outlive its context.
#[derive(Clone, Copy)]
pub struct Tensor<'ctx> {
    raw: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'ctx Context>,
}

impl<'ctx> Tensor<'ctx> {
    /// Wraps a tensor owned by a structure that keeps its context alive for `'ctx`. Every call site
    /// must say why the header and its data outlive `'ctx` (see the crate docs' list).
    pub(crate) fn from_raw(raw: NonNull<sys::ggml_tensor>) -> Self {
        Tensor { raw, _ctx: PhantomData }
    }

    pub(crate) fn raw(self) -> *mut sys::ggml_tensor {
        self.raw.as_ptr()
    }

    /// Whether the tensor's data is in ggml's CPU repack buffer (re-laid out for matrix products).
    pub fn is_repacked(self) -> bool {
        let buffer = self.header().buffer;
        // SAFETY: a non-null buffer of a live tensor is a live backend buffer.
        !buffer.is_null() && crate::store::repack_buffer_type() == Some(unsafe { sys::ggml_backend_buffer_get_type(buffer) })
    }

    /// Whether the tensor's data is interleaved 16 rows at a time for our own products (see
    /// `interleaved`): ggml cannot read it, so it is only multiplied through `Context::product`.
    pub fn is_interleaved(self) -> bool {
        crate::interleaved::holds(self.own_or_source_buffer())
    }

    /// The tensor's buffer or, for a view made before its graph is allocated (no buffer yet), its
    /// source's.
    fn own_or_source_buffer(self) -> sys::ggml_backend_buffer_t {
        let header = self.header();
        match (header.buffer.is_null(), header.view_src.is_null()) {
            // SAFETY: a view's source is a live tensor header (views keep their source alive).
            (true, false) => unsafe { (*header.view_src).buffer },
            _ => header.buffer,
        }
    }

    /// The backend buffer holding the tensor's data (null outside one).
    pub(crate) fn header_buffer(self) -> sys::ggml_backend_buffer_t {
        self.header().buffer
    }

    fn header(&self) -> &sys::ggml_tensor {
        // SAFETY: the tensor lives in a context that outlives 'ctx, and so this borrow.
        unsafe { self.raw.as_ref() }
    }

    /// The tensor's element type.
    pub fn dtype(self) -> DType {
        // Every Tensor is created through `Context::wrap` or a store, which reject unknown types.
        DType::from_sys(self.header().type_).unwrap_or(DType::F32)
    }

    /// Elements per dimension, `ne[0]` contiguous; unused dimensions are 1.
    pub fn shape(self) -> Shape {
        self.header().ne
    }

    /// Bytes between consecutive elements of each dimension (ggml's `nb`).
    pub fn strides(self) -> [usize; 4] {
        self.header().nb
    }

    /// Elements along dimension `dim` (0..4; panics beyond), ggml's `ne[dim]`.
    pub fn ne(self, dim: usize) -> i64 {
        self.header().ne[dim]
    }

    /// Dimensions up to the last one longer than 1 (at least 1), as ggml counts them.
    pub fn n_dims(self) -> usize {
        // SAFETY: reads the header of a live tensor.
        unsafe { sys::ggml_n_dims(self.raw()) as usize }
    }

    /// Total elements: the product of the four dimensions.
    pub fn nelements(self) -> i64 {
        self.shape().iter().product()
    }

    /// Bytes spanned by the tensor (ggml_nbytes).
    pub fn nbytes(self) -> usize {
        // SAFETY: reads the header of a live tensor.
        unsafe { sys::ggml_nbytes(self.raw()) }
    }

    /// Whether the elements are packed in ggml order with no gaps or permutation (a plain buffer).
    pub fn is_contiguous(self) -> bool {
        // SAFETY: reads the header of a live tensor.
        unsafe { sys::ggml_is_contiguous(self.raw()) }
    }

    /// Rows are contiguous in memory (`nb[0]` is one element or block, and the first stride is smallest).
    pub fn rows_contiguous(self) -> bool {
        let nb = self.strides();
        nb[0] == self.dtype().type_size() && nb[0] <= nb[1]
    }

    /// Whether the first two dimensions are swapped in memory (`nb[0] > nb[1]`).
    pub fn is_transposed(self) -> bool {
        // SAFETY: reads the header of a live tensor.
        unsafe { sys::ggml_is_transposed(self.raw()) }
    }

    /// The tensor's name as ggml stores it (at most 63 bytes; empty if never named).
    pub fn name(self) -> String {
        // SAFETY: ggml keeps `name` NUL-terminated (it is zeroed and written with a bounded copy).
        unsafe { CStr::from_ptr(self.header().name.as_ptr()) }.to_string_lossy().into_owned()
    }

    /// Names the tensor (truncated to ggml's 63 bytes) so graph dumps and eval callbacks can find it.
    pub fn set_name(self, name: &str) -> Self {
        let clean: Vec<u8> = name.bytes().filter(|&b| b != 0).take(63).collect();
        let c_name = std::ffi::CString::new(clean).unwrap_or_default();
        // SAFETY: ggml copies at most 63 bytes of the NUL-terminated string into the live header.
        unsafe { sys::ggml_set_name(self.raw(), c_name.as_ptr()) };
        self
    }

    /// Marks the tensor as a graph input (the allocator gives it memory that is not reused).
    pub fn set_input(self) -> Self {
        // SAFETY: sets a flag bit on a live header.
        unsafe { sys::ggml_set_input(self.raw()) };
        self
    }

    /// Marks the tensor as a graph output (its memory survives until the graph is reallocated).
    pub fn set_output(self) -> Self {
        // SAFETY: sets a flag bit on a live header.
        unsafe { sys::ggml_set_output(self.raw()) };
        self
    }

    /// Whether the tensor's data pointer has been set (by an allocating context, a buffer or an allocator).
    pub fn is_allocated(self) -> bool {
        !self.header().data.is_null()
    }

    /// Whether both tensors have the same four dimensions (types and strides are not compared).
    pub fn shapes_equal(self, other: Tensor<'_>) -> bool {
        self.shape() == other.shape()
    }

    fn check_io(self, op: &'static str, len: usize) -> Result<()> {
        if !self.is_allocated() {
            return Err(Error::NotAllocated { op });
        }
        // ggml's repack buffer converts whole-tensor writes and has no reads (a null function).
        if op != "write_bytes" && self.is_repacked() {
            return Err(Error::invalid(op, "a tensor in ggml's repack buffer is only written whole (write_bytes)"));
        }
        if op != "write_bytes" && self.is_interleaved() {
            return Err(Error::invalid(op, "an interleaved tensor is only written whole (write_bytes)"));
        }
        if !self.is_contiguous() {
            return Err(Error::shape(op, "data I/O needs a contiguous tensor", &[self.shape()]));
        }
        if len != self.nbytes() {
            return Err(Error::DataSize { op, expected: self.nbytes(), got: len });
        }
        Ok(())
    }

    /// Copies raw bytes (in the tensor's own type) into the tensor (re-laid out on the way where the
    /// tensor is repacked or interleaved).
    pub fn write_bytes(self, bytes: &[u8]) -> Result<()> {
        self.check_io("write_bytes", bytes.len())?;
        let interleaved;
        let bytes = match self.is_interleaved() {
            true => {
                interleaved = crate::interleaved::interleave(
                    self.dtype(),
                    bytes,
                    self.ne(0) as usize,
                    (self.ne(1) * self.ne(2) * self.ne(3)) as usize,
                );
                &interleaved[..]
            }
            false => bytes,
        };
        let header = self.header();
        if header.buffer.is_null() {
            // SAFETY: the tensor is allocated in its context's arena with nbytes() bytes (checked above).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), header.data.cast::<u8>(), bytes.len()) };
        } else {
            // SAFETY: the tensor lives in a backend buffer and the size equals its nbytes (checked).
            unsafe { sys::ggml_backend_tensor_set(self.raw(), bytes.as_ptr().cast(), 0, bytes.len()) };
        }
        Ok(())
    }

    /// Copies the tensor's raw bytes out.
    pub fn read_bytes(self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.nbytes()];
        self.check_io("read_bytes", out.len())?;
        let header = self.header();
        if header.buffer.is_null() {
            // SAFETY: the tensor's data holds nbytes() readable bytes (checked above).
            unsafe { std::ptr::copy_nonoverlapping(header.data.cast::<u8>(), out.as_mut_ptr(), out.len()) };
        } else {
            // SAFETY: the tensor lives in a backend buffer and `out` has exactly nbytes() room.
            unsafe { sys::ggml_backend_tensor_get(self.raw(), out.as_mut_ptr().cast(), 0, out.len()) };
        }
        Ok(out)
    }

    /// The tensor's data address when it lies in host memory (a plain context or a host buffer).
    pub(crate) fn host_data(self) -> Option<usize> {
        let header = self.header();
        // SAFETY: a non-null buffer pointer in a live tensor's header is a live backend buffer.
        let host = header.buffer.is_null() || unsafe { sys::ggml_backend_buffer_is_host(header.buffer) };
        (host && !header.data.is_null()).then_some(header.data as usize)
    }

    pub(crate) fn check_range(self, op: &'static str, offset: usize, len: usize) -> Result<()> {
        self.check_io(op, self.nbytes())?;
        if offset.checked_add(len).is_none_or(|end| end > self.nbytes()) {
            return Err(Error::invalid(
                op,
                format!("bytes {offset}..{} outside the tensor's {}", offset.saturating_add(len), self.nbytes()),
            ));
        }
        Ok(())
    }

    /// Copies `len` bytes starting `offset` bytes into the (contiguous) tensor.
    pub fn read_bytes_at(self, offset: usize, len: usize) -> Result<Vec<u8>> {
        self.check_range("read_bytes_at", offset, len)?;
        let mut out = vec![0u8; len];
        let header = self.header();
        if header.buffer.is_null() {
            // SAFETY: the range lies inside the tensor's allocated bytes (checked above).
            unsafe { std::ptr::copy_nonoverlapping(header.data.cast::<u8>().add(offset), out.as_mut_ptr(), len) };
        } else {
            // SAFETY: the tensor lives in a backend buffer and offset + len <= nbytes (checked).
            unsafe { sys::ggml_backend_tensor_get(self.raw(), out.as_mut_ptr().cast(), offset, len) };
        }
        Ok(out)
    }

    /// Copies `bytes` into the (contiguous) tensor starting `offset` bytes in.
    pub fn write_bytes_at(self, offset: usize, bytes: &[u8]) -> Result<()> {
        self.check_range("write_bytes_at", offset, bytes.len())?;
        let header = self.header();
        if header.buffer.is_null() {
            // SAFETY: the range lies inside the tensor's allocated bytes (checked above).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), header.data.cast::<u8>().add(offset), bytes.len()) };
        } else {
            // SAFETY: the tensor lives in a backend buffer and offset + len <= nbytes (checked).
            unsafe { sys::ggml_backend_tensor_set(self.raw(), bytes.as_ptr().cast(), offset, bytes.len()) };
        }
        Ok(())
    }

    /// Writes F32 values, converted (quantized) to the tensor's type.
    pub fn write_f32(self, values: &[f32]) -> Result<()> {
        if values.len() as i64 != self.nelements() {
            return Err(Error::DataSize { op: "write_f32", expected: self.nelements() as usize, got: values.len() });
        }
        let bytes = self.dtype().quantize(values, self.ne(0) as usize)?;
        self.write_bytes(&bytes)
    }

    /// Reads the tensor as F32 values (dequantized from its type).
    pub fn read_f32(self) -> Result<Vec<f32>> {
        let dtype = self.dtype();
        let bytes = self.read_bytes()?;
        match dtype {
            DType::I32 => Ok(bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect()),
            _ => dtype.dequantize(&bytes, self.nelements() as usize),
        }
    }

    /// Reads the whole of an I32 tensor (indices: argmax results).
    pub fn read_i32(self) -> Result<Vec<i32>> {
        self.check_dtype("read_i32", DType::I32)?;
        Ok(self.read_bytes()?.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Writes the whole of an I32 tensor (indices, positions) from `values`.
    pub fn write_i32(self, values: &[i32]) -> Result<()> {
        self.check_dtype("write_i32", DType::I32)?;
        self.write_bytes(&values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
    }

    /// Writes the whole of an I64 tensor from `values`.
    pub fn write_i64(self, values: &[i64]) -> Result<()> {
        self.check_dtype("write_i64", DType::I64)?;
        self.write_bytes(&values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
    }

    fn check_dtype(self, op: &'static str, want: DType) -> Result<()> {
        if self.dtype() != want {
            return Err(Error::Type { op, got: self.dtype(), why: "wrong element type for this call" });
        }
        Ok(())
    }
}

impl std::fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?} {} {:?})", self.name(), self.dtype(), self.shape())
    }
}
