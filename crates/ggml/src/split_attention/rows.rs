//! Cache rows to f32, one row at a time, with loops the compiler vectorizes for the block types a
//! cache holds (the layouts are ggml's: an f16 scale `d`, for the `_1` types an f16 minimum `m`, the
//! fifth bits `qh` of the 5-bit types, and packed quants; element i of a block is the low nibble of
//! byte i for i < 16 and the high nibble of byte i − 16 above). Other types go through ggml's own
//! dequantizer (`to_float`), which is scalar code.

use std::os::raw::c_void;

use ggml_sys as sys;

use super::math::Math;
use crate::DType;

pub(super) type ToFloat = unsafe extern "C" fn(*const c_void, *mut f32, i64);

/// How a row of one cache type becomes f32.
#[derive(Clone, Copy)]
pub(super) enum RowKind {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    IQ4NL,
    Ggml(ToFloat),
}

impl RowKind {
    /// None when ggml has no dequantizer for the type.
    pub(super) fn of(dtype: DType) -> Option<RowKind> {
        Some(match dtype {
            DType::F32 => RowKind::F32,
            DType::F16 => RowKind::F16,
            DType::Q8_0 => RowKind::Q8_0,
            DType::Q4_0 => RowKind::Q4_0,
            DType::Q4_1 => RowKind::Q4_1,
            DType::Q5_0 => RowKind::Q5_0,
            DType::Q5_1 => RowKind::Q5_1,
            DType::IQ4NL => RowKind::IQ4NL,
            other => RowKind::Ggml(ggml_to_float(other)?),
        })
    }
}

fn ggml_to_float(dtype: DType) -> Option<ToFloat> {
    // SAFETY: a pointer into ggml's static type-traits table, valid for any type id.
    let traits = unsafe { &*sys::ggml_get_type_traits(dtype.to_sys()) };
    traits.to_float
}

/// Decodes `dst.len()` elements of a `kind` row at `src` (f16 rows with `M`'s conversion).
///
/// # Safety
/// `src` points at a row of `dst.len()` elements of the kind (whole blocks for block types), and the
/// CPU has the features `M` uses.
#[inline(always)]
pub(super) unsafe fn decode_row<M: Math>(kind: RowKind, src: *const u8, dst: &mut [f32]) {
    let n = dst.len();
    // SAFETY: (all arms) the caller's contract gives the row's bytes; block sizes are ggml's.
    unsafe {
        match kind {
            RowKind::F32 => std::ptr::copy_nonoverlapping(src.cast::<f32>(), dst.as_mut_ptr(), n),
            RowKind::F16 => M::halves(src.cast::<u16>(), dst),
            RowKind::Q8_0 => blocks::<M, Q8_0, 34>(src, dst),
            RowKind::Q4_0 => blocks::<M, Q4_0, 18>(src, dst),
            RowKind::Q4_1 => blocks::<M, Q4_1, 20>(src, dst),
            RowKind::Q5_0 => blocks::<M, Q5_0, 22>(src, dst),
            RowKind::Q5_1 => blocks::<M, Q5_1, 24>(src, dst),
            RowKind::IQ4NL => blocks::<M, IQ4NL, 18>(src, dst),
            RowKind::Ggml(f) => f(src.cast(), dst.as_mut_ptr(), n as i64),
        }
    }
}

/// A 32-element block layout of `B` bytes.
trait Block<const B: usize> {
    fn decode(b: &[u8; B], out: &mut [f32; 32]);
    /// The same with AVX2 intrinsics.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn decode_avx2(b: &[u8; B], out: &mut [f32; 32]);
}

/// # Safety
/// `src` holds `dst.len() / 32` blocks of `B` bytes; the CPU has `M`'s features.
#[inline(always)]
unsafe fn blocks<M: Math, T: Block<B>, const B: usize>(src: *const u8, dst: &mut [f32]) {
    let n_blocks = dst.len() / 32;
    // SAFETY: the caller's contract.
    let bytes = unsafe { std::slice::from_raw_parts(src, n_blocks * B) };
    for (block, out) in bytes.chunks_exact(B).zip(dst.chunks_exact_mut(32)) {
        let (block, out) = (block.try_into().expect("B-byte chunks"), out.try_into().expect("32-float chunks"));
        #[cfg(target_arch = "x86_64")]
        if M::AVX2 {
            // SAFETY: `M::AVX2` promises the features.
            unsafe { T::decode_avx2(block, out) };
            continue;
        }
        T::decode(block, out);
    }
}

#[inline(always)]
fn half_at(b: &[u8], at: usize) -> f32 {
    crate::dtype::f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

struct Q8_0;

impl Block<34> for Q8_0 {
    #[inline(always)]
    fn decode(b: &[u8; 34], out: &mut [f32; 32]) {
        let d = half_at(b, 0);
        for (o, &q) in out.iter_mut().zip(&b[2..]) {
            *o = q as i8 as f32 * d;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn decode_avx2(b: &[u8; 34], out: &mut [f32; 32]) {
        // SAFETY: the caller's contract; every access is inside b and out.
        unsafe {
            let d = x86::half(b, 0);
            for i in 0..4 {
                let q = _mm_loadl_epi64(b.as_ptr().add(2 + 8 * i).cast());
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
            }
        }
    }
}

/// A block of an f16 scale and 16 bytes of nibbles, each nibble indexing a grid of 16 signed values:
/// x = grid[q]·d. Q4_0's grid is q − 8; IQ4_NL's is ggml's non-linear one.
trait SignedGrid {
    const GRID: [i8; 16];
}

/// Q4_0 as a grid: −8 … 7.
struct Q4_0;

impl SignedGrid for Q4_0 {
    const GRID: [i8; 16] = [-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7];
}

/// IQ4_NL's 16 values (ggml's `kvalues_iq4nl`).
struct IQ4NL;

impl SignedGrid for IQ4NL {
    const GRID: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
}

impl<T: SignedGrid> Block<18> for T {
    #[inline(always)]
    fn decode(b: &[u8; 18], out: &mut [f32; 32]) {
        let d = half_at(b, 0);
        let (low, high) = out.split_at_mut(16);
        for ((lo, hi), &q) in low.iter_mut().zip(high).zip(&b[2..]) {
            *lo = T::GRID[(q & 15) as usize] as f32 * d;
            *hi = T::GRID[(q >> 4) as usize] as f32 * d;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn decode_avx2(b: &[u8; 18], out: &mut [f32; 32]) {
        // SAFETY: the caller's contract; every access is inside b and out (the grid is 16 bytes).
        unsafe {
            let (d, grid) = (x86::half(b, 0), _mm_loadu_si128(T::GRID.as_ptr().cast()));
            let (lo, hi) = x86::nibbles(b.as_ptr().add(2));
            // Each nibble indexes the grid: one byte shuffle looks up 16 of them.
            x86::signed16(out.as_mut_ptr(), _mm_shuffle_epi8(grid, lo), d);
            x86::signed16(out.as_mut_ptr().add(16), _mm_shuffle_epi8(grid, hi), d);
        }
    }
}

struct Q4_1;

impl Block<20> for Q4_1 {
    #[inline(always)]
    fn decode(b: &[u8; 20], out: &mut [f32; 32]) {
        let (d, m) = (half_at(b, 0), half_at(b, 2));
        let (low, high) = out.split_at_mut(16);
        for ((lo, hi), &q) in low.iter_mut().zip(high).zip(&b[4..]) {
            *lo = (q & 15) as f32 * d + m;
            *hi = (q >> 4) as f32 * d + m;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn decode_avx2(b: &[u8; 20], out: &mut [f32; 32]) {
        // SAFETY: the caller's contract; every access is inside b and out.
        unsafe {
            let (d, m) = (x86::half(b, 0), x86::half(b, 2));
            let (lo, hi) = x86::nibbles(b.as_ptr().add(4));
            x86::unsigned16(out.as_mut_ptr(), lo, d, m);
            x86::unsigned16(out.as_mut_ptr().add(16), hi, d, m);
        }
    }
}

/// The 5-bit value of element i < 16 and of element i + 16.
#[inline(always)]
fn five_bits(qs: &[u8], qh: u32, i: usize) -> (i32, i32) {
    let lo = (qs[i] & 15) as u32 | ((qh >> i) & 1) << 4;
    let hi = (qs[i] >> 4) as u32 | ((qh >> (i + 16)) & 1) << 4;
    (lo as i32, hi as i32)
}

struct Q5_0;

impl Block<22> for Q5_0 {
    #[inline(always)]
    fn decode(b: &[u8; 22], out: &mut [f32; 32]) {
        let d = half_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let (low, high) = out.split_at_mut(16);
        for (i, (lo, hi)) in low.iter_mut().zip(high).enumerate() {
            let (l, h) = five_bits(&b[6..], qh, i);
            *lo = (l - 16) as f32 * d;
            *hi = (h - 16) as f32 * d;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn decode_avx2(b: &[u8; 22], out: &mut [f32; 32]) {
        // SAFETY: the caller's contract; every access is inside b and out.
        unsafe {
            let d = x86::half(b, 0);
            let (lo, hi) = x86::nibbles(b.as_ptr().add(6));
            let (top_lo, top_hi) = x86::fifth_bits(u32::from_le_bytes([b[2], b[3], b[4], b[5]]));
            let sixteen = _mm_set1_epi8(16);
            x86::signed16(out.as_mut_ptr(), _mm_sub_epi8(_mm_or_si128(lo, top_lo), sixteen), d);
            x86::signed16(out.as_mut_ptr().add(16), _mm_sub_epi8(_mm_or_si128(hi, top_hi), sixteen), d);
        }
    }
}

struct Q5_1;

impl Block<24> for Q5_1 {
    #[inline(always)]
    fn decode(b: &[u8; 24], out: &mut [f32; 32]) {
        let (d, m) = (half_at(b, 0), half_at(b, 2));
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let (low, high) = out.split_at_mut(16);
        for (i, (lo, hi)) in low.iter_mut().zip(high).enumerate() {
            let (l, h) = five_bits(&b[8..], qh, i);
            *lo = l as f32 * d + m;
            *hi = h as f32 * d + m;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn decode_avx2(b: &[u8; 24], out: &mut [f32; 32]) {
        // SAFETY: the caller's contract; every access is inside b and out.
        unsafe {
            let (d, m) = (x86::half(b, 0), x86::half(b, 2));
            let (lo, hi) = x86::nibbles(b.as_ptr().add(8));
            let (top_lo, top_hi) = x86::fifth_bits(u32::from_le_bytes([b[4], b[5], b[6], b[7]]));
            x86::unsigned16(out.as_mut_ptr(), _mm_or_si128(lo, top_lo), d, m);
            x86::unsigned16(out.as_mut_ptr().add(16), _mm_or_si128(hi, top_hi), d, m);
        }
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Block pieces in AVX2 registers. Every function needs AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The f16 at byte `at` of `b`, in all 8 lanes.
    #[inline(always)]
    pub(super) unsafe fn half(b: &[u8], at: usize) -> __m256 {
        let bits = u16::from_le_bytes([b[at], b[at + 1]]) as i32;
        // SAFETY: register-only conversion (F16C).
        unsafe { _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))) }
    }

    /// The 16 bytes at `qs` as (low nibbles, high nibbles).
    ///
    /// # Safety
    /// 16 readable bytes at `qs`.
    #[inline(always)]
    pub(super) unsafe fn nibbles(qs: *const u8) -> (__m128i, __m128i) {
        // SAFETY: the caller's contract.
        unsafe {
            let (bytes, low4) = (_mm_loadu_si128(qs.cast()), _mm_set1_epi8(15));
            (_mm_and_si128(bytes, low4), _mm_and_si128(_mm_srli_epi16(bytes, 4), low4))
        }
    }

    /// Bit i of `qh` as 16 or 0 in byte i: (bytes 0–15, bytes 16–31).
    #[inline(always)]
    pub(super) unsafe fn fifth_bits(qh: u32) -> (__m128i, __m128i) {
        // SAFETY: register-only (AVX2).
        unsafe {
            // Byte i takes byte i / 8 of qh (shuffles stay inside 128-bit lanes; qh is in both).
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(qh as i32),
                _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
            );
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
            let set = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
            (_mm256_castsi256_si128(set), _mm256_extracti128_si256(set, 1))
        }
    }

    /// `out[0..16] = d · i8(bytes)`.
    ///
    /// # Safety
    /// 16 writable floats at `out`.
    #[inline(always)]
    pub(super) unsafe fn signed16(out: *mut f32, bytes: __m128i, d: __m256) {
        // SAFETY: the caller's contract.
        unsafe {
            _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), d));
            _mm256_storeu_ps(out.add(8), _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8))), d));
        }
    }

    /// `out[0..16] = d · u8(bytes) + m`.
    ///
    /// # Safety
    /// 16 writable floats at `out`.
    #[inline(always)]
    pub(super) unsafe fn unsigned16(out: *mut f32, bytes: __m128i, d: __m256, m: __m256) {
        // SAFETY: the caller's contract.
        unsafe {
            _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), d, m));
            _mm256_storeu_ps(out.add(8), _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))), d, m));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every decoder (portable and AVX2) against ggml's own dequantizer, on rows ggml's quantizer wrote.
    #[test]
    fn rows_decode_as_ggml_does() {
        let values: Vec<f32> = (0..256).map(|i| ((i * 7919 % 1013) as f32 / 300.0 - 1.7) * if i % 5 == 0 { 9.0 } else { 1.0 }).collect();
        for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::IQ4NL, DType::BF16] {
            let bytes = if dtype == DType::F32 {
                values.iter().flat_map(|v| v.to_le_bytes()).collect()
            } else {
                dtype.quantize(&values, 64).unwrap()
            };
            let want = dtype.dequantize(&bytes, values.len()).unwrap();
            let kind = RowKind::of(dtype).unwrap();
            let row_bytes = dtype.row_size(64).unwrap();
            let mut got = vec![0f32; values.len()];
            for (r, row) in got.chunks_exact_mut(64).enumerate() {
                // SAFETY: `bytes` holds 4 rows of 64 elements of `dtype`.
                unsafe { decode_row::<super::super::math::Portable>(kind, bytes.as_ptr().add(r * row_bytes), row) };
            }
            assert_eq!(got, want, "portable {dtype}");
            #[cfg(target_arch = "x86_64")]
            if super::super::has_avx2() {
                let mut got = vec![0f32; values.len()];
                for (r, row) in got.chunks_exact_mut(64).enumerate() {
                    // SAFETY: as above, and the CPU has the features (checked).
                    unsafe { decode_avx2(kind, bytes.as_ptr().add(r * row_bytes), row) };
                }
                assert_eq!(got, want, "avx2 {dtype}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_avx2(kind: RowKind, src: *const u8, dst: &mut [f32]) {
        // SAFETY: the caller's contract.
        unsafe { decode_row::<super::super::math256::Avx2>(kind, src, dst) }
    }
}
