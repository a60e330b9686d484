//! Q4_1 weights interleaved 16 rows at a time, and their products with 1–15 f32 columns (decode
//! steps, batched steps of a few sequences) on AVX-512 VNNI.
//!
//! ggml's one-column product spends about 15 instructions on each (row, block) pair: it unpacks the
//! row's nibbles, multiplies them with the column's bytes in two steps, converts, scales and adds,
//! all on 8 lanes of one row. Stored so that one 512-bit vector holds the same 4 bytes of 16 rows'
//! block, a VNNI dot with the column's 4 bytes broadcast serves 16 rows at once: about 3 instructions
//! a pair, and the nibbles stay packed (the layout is exactly as large as ggml's).
//!
//! The result is ggml's bit for bit. Q4_1's nibbles are unsigned and Q8_1's values signed, which is
//! the VNNI dot's operand order, so each 4-byte group's dot is the exact integer ggml's lane gets;
//! lane `g` of each row adds `d_row·d_column × f32(dot g)` block by block with one fused multiply-add,
//! the lanes meet in ggml's tree, and the offsets' sum (`m_row · s_column`, multiplied then added, block
//! by block) comes last — `ggml_vec_dot_q4_1_q8_1`'s operations in its order. The columns are
//! quantized by ggml's own Q8_1 quantizer.
//!
//! Layout, per 16 rows and block `b` (`GROUP_BLOCK_BYTES` = 16 × 20 bytes, as the plain blocks): the
//! 16 rows' f16 scales, their f16 minimums, then 4 quads: quad `q` holds each row's nibble bytes
//! `4q..4q + 4` (low nibbles: elements `4q..4q + 4`, ggml's lane `q`; high nibbles: elements
//! `16 + 4q..`, lane `q + 4`), row `r` at `4r`. Such tensors live in their own buffers (registered
//! here), are written whole through `Tensor::write_bytes`, and multiply only through
//! `Context::product`: ggml cannot read them.

use std::collections::HashSet;
use std::os::raw::{c_int, c_void};
use std::sync::Mutex;

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::DType;

/// Rows stored side by side.
pub(crate) const ROWS: usize = 16;
/// Elements per Q4_1 and Q8_1 block.
const BLOCK: usize = 32;
/// Bytes of a plain Q4_1 block (f16 scale, f16 minimum, 16 bytes of nibbles).
const Q4_1_BYTES: usize = 20;
/// Bytes of one block of 16 interleaved rows.
pub(crate) const GROUP_BLOCK_BYTES: usize = ROWS * Q4_1_BYTES;
/// Where the minimums and the quads of an interleaved block start.
pub(crate) const MINS_AT: usize = 2 * ROWS;
pub(crate) const QUADS_AT: usize = 4 * ROWS;
/// Bytes of one quad (4 bytes of each of the 16 rows).
pub(crate) const QUAD_BYTES: usize = 4 * ROWS;
/// Bytes of a Q8_1 block (f16 scale, f16 scale × sum, 32 signed bytes).
const Q8_1_BYTES: usize = 36;

/// Whether weights of this type and shape are stored interleaved for products on this machine:
/// Q4_1 matrices of whole blocks and rows in sixteens, on a CPU with AVX-512 VNNI (on builds whose
/// ggml has AVX-512).
pub(crate) fn interleaves(dtype: DType, shape: &[i64]) -> bool {
    let matrix = shape.len() >= 2 && shape.iter().skip(2).all(|&d| d == 1);
    dtype == DType::Q4_1
        && matrix
        && shape[0] > 0
        && shape[1] > 0
        && (shape[0] as usize).is_multiple_of(BLOCK)
        && (shape[1] as usize).is_multiple_of(ROWS)
        && crate::vnni_product::has_vnni()
}

/// The interleaved bytes of a plain Q4_1 matrix of `m` rows of `k` elements.
pub(crate) fn interleave(plain: &[u8], k: usize, m: usize) -> Vec<u8> {
    let (blocks, row_bytes) = (k / BLOCK, k / BLOCK * Q4_1_BYTES);
    let mut out = vec![0u8; plain.len()];
    for group in 0..m / ROWS {
        for b in 0..blocks {
            let dst = &mut out[(group * blocks + b) * GROUP_BLOCK_BYTES..][..GROUP_BLOCK_BYTES];
            for r in 0..ROWS {
                let src = &plain[(group * ROWS + r) * row_bytes + b * Q4_1_BYTES..][..Q4_1_BYTES];
                dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                dst[MINS_AT + 2 * r..MINS_AT + 2 * r + 2].copy_from_slice(&src[2..4]);
                for q in 0..4 {
                    dst[QUADS_AT + q * QUAD_BYTES + 4 * r..][..4].copy_from_slice(&src[4 + 4 * q..8 + 4 * q]);
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
    /// `mul_mat(w, x)` for interleaved Q4_1 `w` `[k, m]` and f32 `x` `[k, n]`, both 2-D, `x`
    /// contiguous (an error otherwise). `Context::product` sends 1–15 columns here.
    pub fn mul_mat_interleaved<'c>(&'c self, w: Tensor<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "mul_mat_interleaved";
        let two_d = |t: Tensor<'_>| t.ne(2) == 1 && t.ne(3) == 1;
        if !(w.is_interleaved() && x.dtype() == DType::F32 && two_d(w) && two_d(x) && x.is_contiguous() && w.ne(0) == x.ne(0)) {
            return Err(Error::shape(OP, "needs interleaved q4_1 weights and contiguous 2-D f32 columns of the same length", &[w.shape(), x.shape()]));
        }
        // SAFETY: w is an interleaved Q4_1 matrix [k, m] (k in blocks, m in sixteens: `interleaves`
        // admitted it) and x contiguous f32 [k, n] (checked), which is what `kernel` reads; it writes
        // the [m, n] result; no userdata.
        unsafe { self.custom_f32(OP, [w.ne(1), x.ne(1), 1, 1], &[w, x], kernel, -1, 0) }
    }
}

/// ggml's callback: thread `ith` of `nth` computes its share of the 16-row groups for every column.
unsafe extern "C" fn kernel(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _userdata: *mut c_void) {
    // SAFETY: ggml calls this with the node built in `mul_mat_interleaved`: dst f32 [m, n] and its two
    // sources as checked there, all allocated.
    let (dst, w, x) = unsafe { (&*dst, &*(*dst).src[0], &*(*dst).src[1]) };
    let (k, m, n) = (w.ne[0] as usize, w.ne[1] as usize, x.ne[1] as usize);
    let blocks = k / BLOCK;
    // SAFETY: ggml's CPU type traits are static; Q8_1's from_float is the quantizer ggml's product
    // uses for Q4_1 weights' columns, writing k / 32 blocks from k floats.
    let Some(quantize) = (unsafe { (*sys::ggml_get_type_traits_cpu(DType::Q8_1.to_sys())).from_float }) else { return };
    // Every thread quantizes every column (a few thousand values) rather than wait for one that did.
    let mut columns = vec![0u8; n * blocks * Q8_1_BYTES];
    let mut scales = vec![[0f32; 2]; n * blocks];
    for (c, column) in columns.chunks_exact_mut(blocks * Q8_1_BYTES).enumerate() {
        // SAFETY: column c of x holds k contiguous floats; `column` holds blocks × 36 bytes.
        unsafe { quantize((x.data as *const u8).add(c * x.nb[1]) as *const f32, column.as_mut_ptr() as *mut c_void, k as i64) };
        for (b, block) in column.chunks_exact(Q8_1_BYTES).enumerate() {
            let half = |at: usize| crate::dtype::f16_to_f32(u16::from_le_bytes([block[at], block[at + 1]]));
            scales[c * blocks + b] = [half(0), half(2)];
        }
    }
    let groups = m / ROWS;
    let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
    let per = groups.div_ceil(nth);
    for group in (ith * per).min(groups)..((ith + 1) * per).min(groups) {
        let job = GroupJob {
            // SAFETY (pointer arithmetic): the group's blocks lie inside w (group < m / 16).
            weights: unsafe { (w.data as *const u8).add(group * blocks * GROUP_BLOCK_BYTES) },
            blocks,
            columns: columns.as_ptr(),
            scales: scales.as_ptr(),
            out: dst.data as *mut u8,
            out_stride: dst.nb[1],
            first_row: group * ROWS,
        };
        let mut c = 0;
        while c < n {
            // SAFETY: the CPU has AVX-512 VNNI (tensors are interleaved only there); columns c, c + 1
            // (when two) exist in `columns`, `scales` and dst; the group's rows lie inside dst.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if c + 1 < n {
                    vnni::group_columns::<2>(&job, c);
                } else {
                    vnni::group_columns::<1>(&job, c);
                }
            }
            c += 2;
        }
    }
}

/// One 16-row group's product with the quantized columns.
struct GroupJob {
    /// The group's interleaved blocks.
    weights: *const u8,
    blocks: usize,
    /// Q8_1 columns, `blocks` blocks each, one after another; their f32 scale and scaled sum.
    columns: *const u8,
    scales: *const [f32; 2],
    /// The result's data, its column stride in bytes, and the group's first row.
    out: *mut u8,
    out_stride: usize,
    first_row: usize,
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{GroupJob, GROUP_BLOCK_BYTES, MINS_AT, Q8_1_BYTES, QUADS_AT, QUAD_BYTES};

    /// Columns `first..first + C` of the 16 rows: per block and quad, the 16 rows' packed bytes
    /// split into low and high nibbles (lanes q and q + 4), each met by the column's 4 bytes of
    /// that lane broadcast in one VNNI dot; `lane += (d_row · d_column) × f32(dot)`; offsets
    /// `+= m_row · s_column`; at the end ggml's tree over the 8 lanes, plus the offsets.
    ///
    /// # Safety
    /// The job's pointers are live as `kernel` built them; columns first..first + C exist; the CPU
    /// has AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn group_columns<const C: usize>(job: &GroupJob, first: usize) {
        let low = _mm512_set1_epi8(0x0f);
        let mut lanes = [[_mm512_setzero_ps(); 8]; C];
        let mut offsets = [_mm512_setzero_ps(); C];
        // SAFETY: the caller's contract bounds every access: block b < blocks of the group and of
        // each column, rows first_row..first_row + 16 of columns first..first + C of the result.
        unsafe {
            for b in 0..job.blocks {
                let wb = job.weights.add(b * GROUP_BLOCK_BYTES);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(wb as *const __m256i));
                let mins = _mm512_cvtph_ps(_mm256_loadu_si256(wb.add(MINS_AT) as *const __m256i));
                let mut scale = [_mm512_setzero_ps(); C];
                for c in 0..C {
                    let [d1, s1] = *job.scales.add((first + c) * job.blocks + b);
                    scale[c] = _mm512_mul_ps(d, _mm512_set1_ps(d1));
                    offsets[c] = _mm512_add_ps(offsets[c], _mm512_mul_ps(mins, _mm512_set1_ps(s1)));
                }
                for q in 0..4 {
                    let packed = _mm512_loadu_si512(wb.add(QUADS_AT + q * QUAD_BYTES) as *const _);
                    let lo = _mm512_and_si512(packed, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low);
                    for c in 0..C {
                        let y = job.columns.add(((first + c) * job.blocks + b) * Q8_1_BYTES + 4 + 4 * q);
                        let y_lo = _mm512_set1_epi32((y as *const i32).read_unaligned());
                        let y_hi = _mm512_set1_epi32((y.add(16) as *const i32).read_unaligned());
                        let dot_lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, y_lo);
                        let dot_hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, y_hi);
                        lanes[c][q] = _mm512_fmadd_ps(scale[c], _mm512_cvtepi32_ps(dot_lo), lanes[c][q]);
                        lanes[c][q + 4] = _mm512_fmadd_ps(scale[c], _mm512_cvtepi32_ps(dot_hi), lanes[c][q + 4]);
                    }
                }
            }
            for c in 0..C {
                let l = &lanes[c];
                // ggml's hsum_float_8: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
                let even = _mm512_add_ps(_mm512_add_ps(l[0], l[4]), _mm512_add_ps(l[2], l[6]));
                let odd = _mm512_add_ps(_mm512_add_ps(l[1], l[5]), _mm512_add_ps(l[3], l[7]));
                let sum = _mm512_add_ps(_mm512_add_ps(even, odd), offsets[c]);
                let out = job.out.add((first + c) * job.out_stride + job.first_row * 4) as *mut f32;
                _mm512_storeu_ps(out, sum);
            }
        }
    }
}
