//! Q4_1 and Q8_0 weights interleaved 16 rows at a time, and their products with 1–15 f32 columns
//! (decode steps, batched steps of a few sequences) on AVX-512 VNNI.
//!
//! ggml's one-column product spends about 15 instructions on each (row, block) pair: it unpacks or
//! sign-fixes the row's bytes, multiplies them with the column's in one or two steps, converts,
//! scales and adds, all on 8 lanes of one row. Stored so that one 512-bit vector holds the same 4
//! bytes of 16 rows' block, a VNNI dot with the column's 4 bytes broadcast serves 16 rows at once:
//! about 3 instructions a pair, and the layout is exactly as large as ggml's (Q4_1's nibbles stay
//! packed).
//!
//! The result is ggml's bit for bit. Each 4-byte group's dot is the exact integer ggml's lane gets:
//! Q4_1's nibbles are unsigned and Q8_1's values signed, the VNNI dot's operand order; Q8_0's weights
//! are stored +128 (as unsigned), and each dot starts from −128 × the column group's sum. Lane `g` of
//! each row adds `d_row·d_column × f32(dot g)` block by block with one fused multiply-add, the lanes
//! meet in ggml's tree, and Q4_1's offsets (`m_row · s_column`, multiplied then added, block by
//! block) come last — `ggml_vec_dot_q4_1_q8_1`'s and `ggml_vec_dot_q8_0_q8_0`'s operations in their
//! order. The columns are quantized by ggml's own quantizer for the weight type (Q8_1, Q8_0).
//!
//! Layout, per 16 rows and block `b` (16 plain blocks' bytes): the 16 rows' f16 scales, then
//! - Q4_1: their f16 minimums, then 4 quads: quad `q` holds each row's nibble bytes `4q..4q + 4`
//!   (low nibbles: elements `4q..4q + 4`, ggml's lane `q`; high nibbles: elements `16 + 4q..`, lane
//!   `q + 4`), row `r` at `4r`;
//! - Q8_0: 8 groups: group `g` holds each row's bytes `4g..4g + 4` (lane `g`) XOR 0x80, row `r` at `4r`.
//!
//! Such tensors live in their own buffers (registered here), are written whole through
//! `Tensor::write_bytes`, and are read only by `Context::product` and `Context::rows`: ggml cannot.

mod kernels;

use std::collections::HashSet;
use std::os::raw::{c_int, c_void};
use std::sync::Mutex;

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::DType;

/// Rows stored side by side.
pub(crate) const ROWS: usize = 16;
/// Elements per block (of both weight types and their columns' types).
const BLOCK: usize = 32;
/// Bytes of one 4-byte group (or quad) of the 16 rows.
pub(crate) const GROUP_BYTES: usize = 4 * ROWS;
/// Where an interleaved block's bytes start after its scales: Q4_1's minimums, then its quads.
pub(crate) const Q4_1_MINS_AT: usize = 2 * ROWS;
pub(crate) const Q4_1_QUADS_AT: usize = 4 * ROWS;
pub(crate) const Q8_0_GROUPS_AT: usize = 2 * ROWS;

/// Bytes of one block of 16 interleaved rows of `dtype` (16 plain blocks).
pub(crate) fn group_block_bytes(dtype: DType) -> usize {
    ROWS * dtype.type_size()
}

/// Whether weights of this type and shape are stored interleaved for products on this machine:
/// Q4_1 or Q8_0 matrices (or stacks of them along the outer dimensions, each multiplied through a
/// view of it whole) of whole blocks and rows in sixteens, on a CPU with AVX-512 VNNI (on builds
/// whose ggml has AVX-512).
pub(crate) fn interleaves(dtype: DType, shape: &[i64]) -> bool {
    matches!(dtype, DType::Q4_1 | DType::Q8_0)
        && shape.len() >= 2
        && shape.iter().all(|&d| d > 0)
        && (shape[0] as usize).is_multiple_of(BLOCK)
        && (shape[1] as usize).is_multiple_of(ROWS)
        && crate::vnni_product::has_vnni()
}

/// The interleaved bytes of a plain Q4_1 or Q8_0 matrix of `m` rows of `k` elements.
pub(crate) fn interleave(dtype: DType, plain: &[u8], k: usize, m: usize) -> Vec<u8> {
    let (blocks, size) = (k / BLOCK, dtype.type_size());
    let mut out = vec![0u8; plain.len()];
    for group in 0..m / ROWS {
        for b in 0..blocks {
            let dst = &mut out[(group * blocks + b) * ROWS * size..][..ROWS * size];
            for r in 0..ROWS {
                let src = &plain[((group * ROWS + r) * blocks + b) * size..][..size];
                dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                if dtype == DType::Q4_1 {
                    dst[Q4_1_MINS_AT + 2 * r..Q4_1_MINS_AT + 2 * r + 2].copy_from_slice(&src[2..4]);
                    for q in 0..4 {
                        dst[Q4_1_QUADS_AT + q * GROUP_BYTES + 4 * r..][..4].copy_from_slice(&src[4 + 4 * q..8 + 4 * q]);
                    }
                } else {
                    for g in 0..8 {
                        let at = Q8_0_GROUPS_AT + g * GROUP_BYTES + 4 * r;
                        for (d, s) in dst[at..at + 4].iter_mut().zip(&src[2 + 4 * g..6 + 4 * g]) {
                            *d = s ^ 0x80;
                        }
                    }
                }
            }
        }
    }
    out
}

/// Backend buffers that hold interleaved tensors (by address).
static BUFFERS: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

pub(crate) fn register_buffer(buffer: *mut sys::ggml_backend_buffer) {
    BUFFERS.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashSet::new).insert(buffer as usize);
}

pub(crate) fn unregister_buffer(buffer: *mut sys::ggml_backend_buffer) {
    if let Some(set) = BUFFERS.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        set.remove(&(buffer as usize));
    }
}

pub(crate) fn holds(buffer: *mut sys::ggml_backend_buffer) -> bool {
    !buffer.is_null() && BUFFERS.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|set| set.contains(&(buffer as usize)))
}

impl Context {
    /// `mul_mat(w, x)` for interleaved Q4_1 or Q8_0 `w` `[k, m]` and f32 `x` `[k, n]`, both 2-D, `x`
    /// contiguous (an error otherwise). `Context::product` sends 1–15 columns here.
    pub fn mul_mat_interleaved<'c>(&'c self, w: Tensor<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "mul_mat_interleaved";
        let two_d = |t: Tensor<'_>| t.ne(2) == 1 && t.ne(3) == 1;
        if !(w.is_interleaved() && x.dtype() == DType::F32 && two_d(w) && two_d(x) && x.is_contiguous() && w.ne(0) == x.ne(0)) {
            return Err(Error::shape(
                OP,
                "needs interleaved weights and contiguous 2-D f32 columns of the same length",
                &[w.shape(), x.shape()],
            ));
        }
        // SAFETY: w is an interleaved Q4_1/Q8_0 matrix [k, m] (k in blocks, m in sixteens:
        // `interleaves` admitted it) and x contiguous f32 [k, n] (checked), which is what
        // `product_kernel` reads; it writes the [m, n] result; no userdata.
        unsafe { self.custom_f32(OP, [w.ne(1), x.ne(1), 1, 1], &[w, x], product_kernel, -1, 0) }
    }

    /// `get_rows(table, ids)` for an interleaved table: the rows dequantized to f32 as ggml's
    /// `get_rows` does it (each value its byte times the block's scale), `[k, ids]`.
    pub fn interleaved_rows<'c>(&'c self, table: Tensor<'c>, ids: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "interleaved_rows";
        let one_d = |t: Tensor<'_>| t.ne(1) == 1 && t.ne(2) == 1 && t.ne(3) == 1;
        if !(table.is_interleaved() && table.ne(2) == 1 && ids.dtype() == DType::I32 && one_d(ids) && ids.is_contiguous()) {
            return Err(Error::shape(OP, "needs an interleaved table and a contiguous vector of i32 ids", &[table.shape(), ids.shape()]));
        }
        // SAFETY: table is an interleaved Q4_1/Q8_0 matrix [k, m] and ids contiguous i32 [n]
        // (checked), which `rows_kernel` reads (refusing ids outside 0..m); it writes [k, n].
        unsafe { self.custom_f32(OP, [table.ne(0), ids.ne(0), 1, 1], &[table, ids], rows_kernel, -1, 0) }
    }
}

/// ggml's callback: thread `ith` of `nth` computes its share of the 16-row groups for every column.
unsafe extern "C" fn product_kernel(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _userdata: *mut c_void) {
    // SAFETY: ggml calls this with the node built in `mul_mat_interleaved`: dst f32 [m, n] and its two
    // sources as checked there, all allocated.
    let (dst, w, x) = unsafe { (&*dst, &*(*dst).src[0], &*(*dst).src[1]) };
    let Ok(dtype) = DType::from_sys(w.type_) else { return };
    let (k, m, n) = (w.ne[0] as usize, w.ne[1] as usize, x.ne[1] as usize);
    // Every thread quantizes every column (a few thousand values) rather than wait for one that did.
    let Some(columns) = kernels::Columns::quantize(dtype, x, k, n) else { return };
    let groups = m / ROWS;
    let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
    let per = groups.div_ceil(nth);
    for group in (ith * per).min(groups)..((ith + 1) * per).min(groups) {
        let job = kernels::GroupJob {
            // Inside w: group < m / 16.
            weights: (w.data as *const u8).wrapping_add(group * (k / BLOCK) * group_block_bytes(dtype)),
            blocks: k / BLOCK,
            out: dst.data as *mut u8,
            out_stride: dst.nb[1],
            first_row: group * ROWS,
        };
        // SAFETY: the CPU has AVX-512 VNNI (tensors are interleaved only there); the job's weights are
        // the group's blocks of w, its rows lie inside dst, and `columns` holds the n columns.
        unsafe { kernels::group_product(dtype, &job, &columns, n) };
    }
}

/// ggml's callback: thread `ith` of `nth` dequantizes its share of the ids' rows.
unsafe extern "C" fn rows_kernel(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _userdata: *mut c_void) {
    // SAFETY: ggml calls this with the node built in `interleaved_rows`: dst f32 [k, n], the table and
    // the ids as checked there, all allocated.
    let (dst, table, ids) = unsafe { (&*dst, &*(*dst).src[0], &*(*dst).src[1]) };
    let Ok(dtype) = DType::from_sys(table.type_) else { return };
    let (k, m, n) = (table.ne[0] as usize, table.ne[1] as usize, ids.ne[0] as usize);
    let (blocks, group_bytes) = (k / BLOCK, group_block_bytes(dtype));
    let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
    for i in (ith..n).step_by(nth) {
        // SAFETY: i < n ids; dst row i holds k floats.
        let (id, out) = unsafe {
            let id = *(ids.data as *const i32).add(i);
            (id, std::slice::from_raw_parts_mut((dst.data as *mut u8).add(i * dst.nb[1]) as *mut f32, k))
        };
        // Ids are checked by callers (ggml's get_rows would abort the process); one outside the table
        // gives a row of zeros rather than a read outside it.
        let Some(row) = usize::try_from(id).ok().filter(|&row| row < m) else {
            out.fill(0.0);
            continue;
        };
        for (b, values) in out.chunks_exact_mut(BLOCK).enumerate() {
            // SAFETY: row < m and b < blocks: the row's group block lies inside the table.
            let block = unsafe {
                std::slice::from_raw_parts((table.data as *const u8).add(((row / ROWS) * blocks + b) * group_bytes), group_bytes)
            };
            dequantize(dtype, block, row % ROWS, values);
        }
    }
}

/// Lane `lane`'s 32 values of one interleaved block, as ggml dequantizes the plain block: Q8_0 `q ·
/// d`, Q4_1 `q · d + m` (one multiply-add, as its `dequantize_row_q4_1`).
fn dequantize(dtype: DType, block: &[u8], lane: usize, out: &mut [f32]) {
    let half = |at: usize| crate::dtype::f16_to_f32(u16::from_le_bytes([block[at], block[at + 1]]));
    let d = half(2 * lane);
    if dtype == DType::Q4_1 {
        let m = half(Q4_1_MINS_AT + 2 * lane);
        for q in 0..4 {
            for j in 0..4 {
                let byte = block[Q4_1_QUADS_AT + q * GROUP_BYTES + 4 * lane + j];
                out[4 * q + j] = (byte & 0x0f) as f32 * d + m;
                out[16 + 4 * q + j] = (byte >> 4) as f32 * d + m;
            }
        }
    } else {
        for g in 0..8 {
            for j in 0..4 {
                let byte = block[Q8_0_GROUPS_AT + g * GROUP_BYTES + 4 * lane + j] ^ 0x80;
                out[4 * g + j] = (byte as i8) as f32 * d;
            }
        }
    }
}
