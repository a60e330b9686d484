//! Products of Q4_1 weights with a few f32 columns (the decode steps of several sequences batched):
//! ggml's kernel runs one dot product per (row, column), unpacking each weight block again for every
//! column, and on AVX2 it has no multi-column kernel for Q4_1. Here each weight block is unpacked once
//! and used for up to 8 columns.
//!
//! The result is ggml's bit for bit: the columns are quantized by ggml's own Q8_1 quantizer, and each
//! (row, column) sum runs the same operations in the same order as `ggml_vec_dot_q4_1_q8_1` (8-lane fma
//! per block, the same horizontal sum, the offsets' scalar sum added last), so a batched step gives each
//! sequence what it gets alone.

use std::os::raw::{c_int, c_void};

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::DType;

/// Elements per Q4_1 and Q8_1 block.
const BLOCK: usize = 32;
/// Bytes of a Q4_1 block (f16 scale, f16 offset, 16 bytes of nibbles).
const Q4_1_BYTES: usize = 20;
/// Bytes of a Q8_1 block (f16 scale, f16 scale × sum, 32 signed bytes).
const Q8_1_BYTES: usize = 36;
/// Columns one pass over a row's blocks serves (accumulators kept in registers).
const GROUP: usize = 8;
/// Most columns the kernel takes; more go to ggml's product.
pub const MAX_FEW_COLUMNS: i64 = 32;
/// Fewest columns the kernel takes: at 2 it only matches ggml's speed.
pub const MIN_FEW_COLUMNS: i64 = 3;

impl Context {
    /// The few-columns kernel itself (an error where it does not apply).
    pub fn mul_mat_few_columns<'c>(&'c self, w: Tensor<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "mul_mat_few_columns";
        if !few_columns_apply(w, x) {
            return Err(Error::shape(
                OP,
                format!("needs q4_1 weights and {MIN_FEW_COLUMNS}..={MAX_FEW_COLUMNS} contiguous f32 columns of a whole number of blocks, 2-D, on AVX2"),
                &[w.shape(), x.shape()],
            ));
        }
        // SAFETY: w is a contiguous 2-D Q4_1 tensor and x a contiguous 2-D f32 tensor with w's row length
        // (a multiple of 32) and MIN_FEW_COLUMNS..=MAX_FEW_COLUMNS columns (checked above), which is what
        // `kernel` reads; it writes the [m, n] result; no userdata.
        unsafe { self.custom_f32(OP, [w.ne(1), x.ne(1), 1, 1], &[w, x], kernel, -1, 0) }
    }
}

pub(crate) fn few_columns_apply(w: Tensor<'_>, x: Tensor<'_>) -> bool {
    let two_d = |t: Tensor<'_>| t.ne(2) == 1 && t.ne(3) == 1 && t.is_contiguous();
    w.dtype() == DType::Q4_1
        && x.dtype() == DType::F32
        && two_d(w)
        && two_d(x)
        && w.ne(0) == x.ne(0)
        && (w.ne(0) as usize).is_multiple_of(BLOCK)
        && (MIN_FEW_COLUMNS..=MAX_FEW_COLUMNS).contains(&x.ne(1))
        && crate::split_attention::has_avx2()
}

/// ggml's callback: thread `ith` of `nth` computes its share of the rows for every column.
unsafe extern "C" fn kernel(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _userdata: *mut c_void) {
    // SAFETY: ggml calls this with the node built in `mul_mat_few_columns`: dst f32 [m, n] and its two
    // sources as checked there, all allocated.
    let (dst, w, x) = unsafe {
        let dst = &*dst;
        (dst, &*dst.src[0], &*dst.src[1])
    };
    let (k, m, n) = (w.ne[0] as usize, w.ne[1] as usize, x.ne[1] as usize);
    let blocks = k / BLOCK;
    // Every thread quantizes every column (a few thousand values) rather than waiting for one that did;
    // blocks are stored interleaved, [block][column], so one block of every column sits together.
    let mut column = vec![0u8; blocks * Q8_1_BYTES];
    let mut columns = vec![0u8; n * blocks * Q8_1_BYTES];
    // SAFETY: ggml's CPU type traits are static; Q8_1's from_float is ggml's own quantizer (the one its
    // mul_mat uses), which writes k / 32 blocks from k floats.
    let quantize = unsafe { (*sys::ggml_get_type_traits_cpu(DType::Q8_1.to_sys())).from_float };
    let Some(quantize) = quantize else { return };
    // Each block's f16 scale and scaled sum, as f32 (exact), [block][column].
    let mut scales = vec![[0f32; 2]; n * blocks];
    let half = |bytes: [u8; 2]| crate::dtype::f16_to_f32(u16::from_le_bytes(bytes));
    for c in 0..n {
        // SAFETY: column c of x holds k contiguous floats; `column` holds blocks × 36 bytes.
        unsafe { quantize((x.data as *const u8).add(c * x.nb[1]) as *const f32, column.as_mut_ptr() as *mut c_void, k as i64) };
        for (ib, block) in column.chunks_exact(Q8_1_BYTES).enumerate() {
            columns[(ib * n + c) * Q8_1_BYTES..][..Q8_1_BYTES].copy_from_slice(block);
            scales[ib * n + c] = [half([block[0], block[1]]), half([block[2], block[3]])];
        }
    }
    let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
    let per = m.div_ceil(nth);
    for row in (ith * per).min(m)..((ith + 1) * per).min(m) {
        let mut first = 0;
        while first < n {
            let count = GROUP.min(n - first);
            let mut sums = [0f32; GROUP];
            // SAFETY: row < m, so its blocks lie inside w's data; `columns` holds blocks × n blocks, and
            // columns first..first + count exist; the CPU has AVX2, FMA and F16C (checked at build).
            unsafe {
                let weights = (w.data as *const u8).add(row * w.nb[1]);
                let cols = Columns { blocks: columns.as_ptr().add(first * Q8_1_BYTES), scales: scales.as_ptr().add(first), n };
                match count {
                    1 => dot_group::<1>(weights, cols, blocks, &mut sums),
                    2 => dot_group::<2>(weights, cols, blocks, &mut sums),
                    3 => dot_group::<3>(weights, cols, blocks, &mut sums),
                    4 => dot_group::<4>(weights, cols, blocks, &mut sums),
                    5 => dot_group::<5>(weights, cols, blocks, &mut sums),
                    6 => dot_group::<6>(weights, cols, blocks, &mut sums),
                    7 => dot_group::<7>(weights, cols, blocks, &mut sums),
                    _ => dot_group::<8>(weights, cols, blocks, &mut sums),
                }
            }
            for (c, &s) in sums[..count].iter().enumerate() {
                // SAFETY: (row, first + c) is inside dst [m, n].
                unsafe { *((dst.data as *mut u8).add((first + c) * dst.nb[1] + row * dst.nb[0]) as *mut f32) = s };
            }
            first += count;
        }
    }
}

/// Interleaved Q8_1 columns: block `ib` of column `c` at `blocks + (ib * n + c) * 36`, its scales at
/// `scales[ib * n + c]`.
#[derive(Clone, Copy)]
struct Columns {
    blocks: *const u8,
    scales: *const [f32; 2],
    n: usize,
}

/// The dot products of one row's Q4_1 blocks with `C` (≤ 8) Q8_1 columns, each as
/// `ggml_vec_dot_q4_1_q8_1` computes it on AVX2. `C` is a constant so the accumulators stay in registers.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `weights` points at `blocks` Q4_1 blocks; `cols` holds `blocks`
/// blocks of at least `C` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_group<const C: usize>(weights: *const u8, cols: Columns, blocks: usize, sums: &mut [f32; GROUP]) {
    use std::arch::x86_64::*;
    let half = |p: *const u8| -> f32 {
        // SAFETY: every caller below passes p pointing at a block's 2-byte f16 scale or minimum.
        let bits = unsafe { (p as *const u16).read_unaligned() };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    };
    let mut acc = [_mm256_setzero_ps(); C];
    let mut offsets = [0f32; C];
    let low_mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for ib in 0..blocks {
        // SAFETY: block ib of the row and of each column is inside its buffer (the caller's contract).
        unsafe {
            let wb = weights.add(ib * Q4_1_BYTES);
            let (d0, m0) = (half(wb), half(wb.add(2)));
            let packed = _mm_loadu_si128(wb.add(4) as *const __m128i);
            let qx = _mm256_and_si256(low_mask, _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed));
            let d0v = _mm256_set1_ps(d0);
            let yb0 = cols.blocks.add(ib * cols.n * Q8_1_BYTES);
            let sc0 = cols.scales.add(ib * cols.n);
            for c in 0..C {
                let [d1, s1] = *sc0.add(c);
                offsets[c] += m0 * s1;
                let d0d1 = _mm256_mul_ps(d0v, _mm256_set1_ps(d1));
                let qy = _mm256_loadu_si256(yb0.add(c * Q8_1_BYTES + 4) as *const __m256i);
                let xy = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(qx, qy)));
                acc[c] = _mm256_fmadd_ps(d0d1, xy, acc[c]);
            }
        }
    }
    for c in 0..C {
        let x = acc[c];
        let mut r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        sums[c] = _mm_cvtss_f32(r) + offsets[c];
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_group<const C: usize>(_: *const u8, _: Columns, _: usize, _: &mut [f32; GROUP]) {
    unreachable!("the kernel is only built for x86_64 CPUs with AVX2")
}
