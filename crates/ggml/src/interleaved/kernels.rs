//! The interleaved products' columns (quantized by ggml's quantizer) and their AVX-512 VNNI loops.

use std::os::raw::c_void;

use ggml_sys as sys;

use super::BLOCK;
use crate::DType;

/// Bytes of a Q8_1 block (f16 scale, f16 scale × sum, 32 signed bytes) and of a Q8_0 block.
const Q8_1_BYTES: usize = 36;
const Q8_0_BYTES: usize = 34;
/// 4-byte groups of a block.
const GROUPS: usize = BLOCK / 4;

/// The columns quantized for the weight type: their blocks one column after another, and per
/// (column, block) the f32 scale, Q8_1's scaled sum (what Q4_1's minimums multiply) and, for Q8_0
/// weights stored +128, each group's start −128 × its byte sum.
pub(super) struct Columns {
    bytes: Vec<u8>,
    block_bytes: usize,
    blocks: usize,
    scales: Vec<[f32; 2]>,
    starts: Vec<[i32; GROUPS]>,
}

impl Columns {
    /// Columns `0..n` of the contiguous f32 `x` (`k` floats each) quantized by ggml's quantizer for
    /// `dtype`'s products (Q8_1 for Q4_1, Q8_0 for Q8_0); `None` where ggml has none.
    pub(super) fn quantize(dtype: DType, x: &sys::ggml_tensor, k: usize, n: usize) -> Option<Columns> {
        let (column_type, block_bytes) = if dtype == DType::Q4_1 { (DType::Q8_1, Q8_1_BYTES) } else { (DType::Q8_0, Q8_0_BYTES) };
        // SAFETY: ggml's CPU type traits are static; from_float writes k / 32 blocks from k floats.
        let quantize = unsafe { (*sys::ggml_get_type_traits_cpu(column_type.to_sys())).from_float }?;
        let blocks = k / BLOCK;
        let mut columns = Columns {
            bytes: vec![0; n * blocks * block_bytes],
            block_bytes,
            blocks,
            scales: vec![[0.0; 2]; n * blocks],
            starts: Vec::new(),
        };
        if dtype == DType::Q8_0 {
            columns.starts = vec![[0; GROUPS]; n * blocks];
        }
        let qs = block_bytes - BLOCK;
        for (c, column) in columns.bytes.chunks_exact_mut(blocks * block_bytes).enumerate() {
            // SAFETY: column c of x holds k contiguous floats; `column` holds blocks blocks.
            unsafe { quantize((x.data as *const u8).add(c * x.nb[1]) as *const f32, column.as_mut_ptr() as *mut c_void, k as i64) };
            for (b, block) in column.chunks_exact(block_bytes).enumerate() {
                let half = |at: usize| crate::dtype::f16_to_f32(u16::from_le_bytes([block[at], block[at + 1]]));
                columns.scales[c * blocks + b] = [half(0), if qs == 4 { half(2) } else { 0.0 }];
                if let Some(starts) = columns.starts.get_mut(c * blocks + b) {
                    for (start, group) in starts.iter_mut().zip(block[qs..].chunks_exact(4)) {
                        *start = -128 * group.iter().map(|&v| v as i8 as i32).sum::<i32>();
                    }
                }
            }
        }
        Some(columns)
    }

    /// Column `c`'s block `b`: its bytes' first value, its scales, its groups' starts (Q8_0).
    fn block(&self, c: usize, b: usize) -> (*const u8, [f32; 2], *const [i32; GROUPS]) {
        let i = c * self.blocks + b;
        let values = self.bytes[i * self.block_bytes + self.block_bytes - BLOCK..].as_ptr();
        (values, self.scales[i], self.starts.get(i).map_or(std::ptr::null(), |s| s as *const _))
    }
}

/// One 16-row group's product with the columns.
pub(super) struct GroupJob {
    /// The group's interleaved blocks.
    pub(super) weights: *const u8,
    pub(super) blocks: usize,
    /// The result's data, its column stride in bytes, and the group's first row.
    pub(super) out: *mut u8,
    pub(super) out_stride: usize,
    pub(super) first_row: usize,
}

/// The group's rows of all `n` columns, two columns per pass over its blocks.
///
/// # Safety
/// The job's weights are 16 interleaved rows of `dtype` (`blocks` blocks each), its result holds
/// those rows of `n` columns, `columns` holds `n` columns of `blocks` blocks quantized for `dtype`;
/// the CPU has AVX-512 F, BW and VNNI.
pub(super) unsafe fn group_product(dtype: DType, job: &GroupJob, columns: &Columns, n: usize) {
    let mut c = 0;
    while c < n {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract; columns c and c + 1 (when two) exist.
        unsafe {
            match (dtype == DType::Q4_1, c + 1 < n) {
                (true, true) => vnni::q4_1::<2>(job, columns, c),
                (true, false) => vnni::q4_1::<1>(job, columns, c),
                (false, true) => vnni::q8_0::<2>(job, columns, c),
                (false, false) => vnni::q8_0::<1>(job, columns, c),
            }
        }
        c += 2;
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::super::{group_block_bytes, GROUP_BYTES, Q4_1_MINS_AT, Q4_1_QUADS_AT, Q8_0_GROUPS_AT};
    use super::{Columns, GroupJob, GROUPS};
    use crate::DType;

    /// ggml's hsum_float_8 over the 8 lanes, (`((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`),
    /// plus Q4_1's `offsets`, stored as column `c`'s 16 rows.
    ///
    /// # Safety
    /// Column c's rows first_row..first_row + 16 lie inside the job's result; AVX-512 F.
    #[inline(always)]
    unsafe fn store(job: &GroupJob, c: usize, l: &[__m512; GROUPS], offsets: Option<__m512>) {
        let even = _mm512_add_ps(_mm512_add_ps(l[0], l[4]), _mm512_add_ps(l[2], l[6]));
        let odd = _mm512_add_ps(_mm512_add_ps(l[1], l[5]), _mm512_add_ps(l[3], l[7]));
        let mut sum = _mm512_add_ps(even, odd);
        if let Some(offsets) = offsets {
            sum = _mm512_add_ps(sum, offsets);
        }
        // SAFETY: the caller's contract.
        unsafe { _mm512_storeu_ps(job.out.add(c * job.out_stride + job.first_row * 4) as *mut f32, sum) };
    }

    /// Q4_1 rows, columns `first..first + C`: per block and quad, the 16 rows' packed bytes split
    /// into low and high nibbles (lanes q and q + 4), each met by the column's 4 bytes of that lane
    /// broadcast in one VNNI dot; `lane += (d_row · d_column) × f32(dot)`; offsets `+= m_row ·
    /// s_column`.
    ///
    /// # Safety
    /// As `group_product`, for columns first..first + C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q4_1<const C: usize>(job: &GroupJob, columns: &Columns, first: usize) {
        let low = _mm512_set1_epi8(0x0f);
        let mut lanes = [[_mm512_setzero_ps(); GROUPS]; C];
        let mut offsets = [_mm512_setzero_ps(); C];
        let step = group_block_bytes(DType::Q4_1);
        // SAFETY: the caller's contract bounds every access (block b < blocks of the group and of
        // each column; the result's rows of columns first..first + C).
        unsafe {
            for b in 0..job.blocks {
                let wb = job.weights.add(b * step);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(wb as *const __m256i));
                let mins = _mm512_cvtph_ps(_mm256_loadu_si256(wb.add(Q4_1_MINS_AT) as *const __m256i));
                let mut scale = [_mm512_setzero_ps(); C];
                let mut values = [std::ptr::null(); C];
                for c in 0..C {
                    let (v, [d1, s1], _) = columns.block(first + c, b);
                    values[c] = v;
                    scale[c] = _mm512_mul_ps(d, _mm512_set1_ps(d1));
                    offsets[c] = _mm512_add_ps(offsets[c], _mm512_mul_ps(mins, _mm512_set1_ps(s1)));
                }
                for q in 0..4 {
                    let packed = _mm512_loadu_si512(wb.add(Q4_1_QUADS_AT + q * GROUP_BYTES) as *const _);
                    let lo = _mm512_and_si512(packed, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low);
                    for c in 0..C {
                        let y = values[c].add(4 * q);
                        let y_lo = _mm512_set1_epi32((y as *const i32).read_unaligned());
                        let y_hi = _mm512_set1_epi32((y.add(16) as *const i32).read_unaligned());
                        let dot_lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, y_lo);
                        let dot_hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, y_hi);
                        lanes[c][q] = _mm512_fmadd_ps(scale[c], _mm512_cvtepi32_ps(dot_lo), lanes[c][q]);
                        lanes[c][q + 4] = _mm512_fmadd_ps(scale[c], _mm512_cvtepi32_ps(dot_hi), lanes[c][q + 4]);
                    }
                }
            }
            for (c, (l, &offsets)) in lanes.iter().zip(&offsets).enumerate() {
                store(job, first + c, l, Some(offsets));
            }
        }
    }

    /// Q8_0 rows (stored +128), columns `first..first + C`: per block and group, the 16 rows' bytes
    /// met by the column's 4 bytes broadcast in one VNNI dot started from −128 × their sum; `lane +=
    /// (d_row · d_column) × f32(dot)`.
    ///
    /// # Safety
    /// As `group_product`, for columns first..first + C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q8_0<const C: usize>(job: &GroupJob, columns: &Columns, first: usize) {
        // [lane][column]: each group's load meets every column's accumulator of that lane.
        let mut lanes = [[_mm512_setzero_ps(); C]; GROUPS];
        let step = group_block_bytes(DType::Q8_0);
        // SAFETY: as in `q4_1`; Q8_0 columns carry their groups' starts.
        unsafe {
            for b in 0..job.blocks {
                let wb = job.weights.add(b * step);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(wb as *const __m256i));
                let mut scale = [_mm512_setzero_ps(); C];
                let mut values = [std::ptr::null(); C];
                let mut starts = [std::ptr::null(); C];
                for c in 0..C {
                    let (v, [d1, _], s) = columns.block(first + c, b);
                    (values[c], starts[c]) = (v, s);
                    scale[c] = _mm512_mul_ps(d, _mm512_set1_ps(d1));
                }
                for (g, lane) in lanes.iter_mut().enumerate() {
                    let rows = _mm512_loadu_si512(wb.add(Q8_0_GROUPS_AT + g * GROUP_BYTES) as *const _);
                    for c in 0..C {
                        let y = _mm512_set1_epi32((values[c].add(4 * g) as *const i32).read_unaligned());
                        let start = _mm512_set1_epi32((*starts[c])[g]);
                        let dot = _mm512_dpbusd_epi32(start, rows, y);
                        lane[c] = _mm512_fmadd_ps(scale[c], _mm512_cvtepi32_ps(dot), lane[c]);
                    }
                }
            }
            for c in 0..C {
                let l = &lanes;
                let column = [l[0][c], l[1][c], l[2][c], l[3][c], l[4][c], l[5][c], l[6][c], l[7][c]];
                store(job, first + c, &column, None);
            }
        }
    }
}
