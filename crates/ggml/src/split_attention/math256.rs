//! `Avx2`: the loops of `math` on 8-lane vectors (AVX2, FMA, F16C). Scores hold 8 cells a vector (one
//! column of the transposed block), weighted sums 8 columns; both keep each pair's chain of fused
//! multiply-adds in `Portable`'s order, so the bits are its bits.

use std::arch::x86_64::*;

use super::math::{check_accumulate, check_scores, unchanged_or_exp, Math, Portable};
use super::BLOCK;

pub(super) struct Avx2;

impl Math for Avx2 {
    const AVX2: bool = true;

    #[inline(always)]
    unsafe fn halves(src: *const u16, dst: &mut [f32]) {
        let n = dst.len();
        let mut i = 0;
        // SAFETY: the caller's contract bounds the reads; `Avx2` runs only where F16C exists.
        unsafe {
            while i + 8 <= n {
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(_mm_loadu_si128(src.add(i).cast())));
                i += 8;
            }
            Portable::halves(src.add(i), &mut dst[i..]);
        }
    }

    #[inline(always)]
    fn transpose(keys: &[f32], hd: usize, keys_t: &mut [f32]) {
        if !hd.is_multiple_of(8) {
            return Portable::transpose(keys, hd, keys_t);
        }
        assert!(keys.len() >= BLOCK * hd && keys_t.len() >= BLOCK * hd, "split attention: key buffers too short");
        for j in (0..BLOCK).step_by(8) {
            for c in (0..hd).step_by(8) {
                // SAFETY: rows j..j + 8 and columns c..c + 8 are inside both buffers (checked above).
                unsafe { transpose8(keys.as_ptr().add(j * hd + c), hd, keys_t.as_mut_ptr().add(c * BLOCK + j), BLOCK) };
            }
        }
    }

    #[inline(always)]
    fn scores(queries: &[f32], hd: usize, pairs: &[usize], keys_t: &[f32], out: &mut [f32]) {
        check_scores(queries, hd, pairs, keys_t, out);
        let mut first = 0;
        for tile in pairs.chunks(2) {
            let o = out[first * BLOCK..].as_mut_ptr();
            // SAFETY: every pair's query and output row and the block's columns are inside their
            // buffers (checked); AVX2 and FMA are present (the only way `Avx2` is run).
            unsafe {
                match tile.len() {
                    2 => scores_tile::<2>(queries.as_ptr(), hd, tile, keys_t.as_ptr(), o),
                    _ => scores_tile::<1>(queries.as_ptr(), hd, tile, keys_t.as_ptr(), o),
                }
            }
            first += tile.len();
        }
    }

    #[inline(always)]
    fn accumulate(acc: &mut [f32], hd_v: usize, pairs: &[usize], w: &[f32], n: usize, values: &[f32]) {
        check_accumulate(acc, hd_v, pairs, w, n, values);
        let columns = if hd_v.is_multiple_of(32) {
            4
        } else if hd_v.is_multiple_of(8) {
            1
        } else {
            return Portable::accumulate(acc, hd_v, pairs, w, n, values);
        };
        let mut first = 0;
        for tile in pairs.chunks(2) {
            let w = w[first * BLOCK..].as_ptr();
            for c in (0..hd_v).step_by(8 * columns) {
                // SAFETY: as for the scores: rows, weights and columns c..c + 8·columns are inside
                // their buffers (checked), the rows distinct.
                unsafe {
                    let (a, v) = (acc.as_mut_ptr(), values.as_ptr());
                    match (tile.len(), columns) {
                        (2, 4) => accumulate_tile::<2, 4>(a, hd_v, tile, w, n, v, c),
                        (2, _) => accumulate_tile::<2, 1>(a, hd_v, tile, w, n, v, c),
                        (_, 4) => accumulate_tile::<1, 4>(a, hd_v, tile, w, n, v, c),
                        _ => accumulate_tile::<1, 1>(a, hd_v, tile, w, n, v, c),
                    }
                }
            }
            first += tile.len();
        }
    }

    #[inline(always)]
    fn softmax_block(w: &mut [f32], mask: &[f32], max: &mut f32, sum: &mut f32) -> Option<f32> {
        if w.len() != 32 || mask.len() < 32 {
            return Portable::softmax_block(w, mask, max, sum);
        }
        // SAFETY: w and mask hold 32 floats (checked).
        unsafe {
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut s = [ninf; 4];
            for (i, s) in s.iter_mut().enumerate() {
                let (score, m) = (_mm256_loadu_ps(w.as_ptr().add(8 * i)), _mm256_loadu_ps(mask.as_ptr().add(8 * i)));
                *s = _mm256_blendv_ps(_mm256_add_ps(score, m), ninf, _mm256_cmp_ps(m, ninf, _CMP_EQ_OQ));
            }
            let block_max = horizontal_max(_mm256_max_ps(_mm256_max_ps(s[0], s[1]), _mm256_max_ps(s[2], s[3])));
            if block_max == f32::NEG_INFINITY {
                w.iter_mut().for_each(|w| *w = 0.0);
                return None;
            }
            let new_max = max.max(block_max);
            let rescale = unchanged_or_exp(*max, new_max);
            let shift = _mm256_set1_ps(new_max);
            let mut total = _mm256_setzero_ps();
            for (i, s) in s.iter().enumerate() {
                let e = exp8(_mm256_sub_ps(*s, shift));
                total = _mm256_add_ps(total, e);
                _mm256_storeu_ps(w.as_mut_ptr().add(8 * i), e);
            }
            *sum = *sum * rescale + horizontal_sum(total);
            *max = new_max;
            Some(rescale)
        }
    }
}

/// The 8×8 floats at `src` (rows `src_stride` apart) written transposed at `dst` (rows `dst_stride`
/// apart).
///
/// # Safety
/// 8 rows of 8 floats exist at both; AVX is present.
#[inline(always)]
pub(super) unsafe fn transpose8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    // SAFETY: the caller's contract bounds every access.
    unsafe {
        let mut r = [_mm256_setzero_ps(); 8];
        for (i, r) in r.iter_mut().enumerate() {
            *r = _mm256_loadu_ps(src.add(i * src_stride));
        }
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        for i in 0..4 {
            _mm256_storeu_ps(dst.add(i * dst_stride), _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4]));
            _mm256_storeu_ps(dst.add((i + 4) * dst_stride), _mm256_permute2f128_ps::<0x31>(u[i], u[i + 4]));
        }
    }
}

/// The scores of `T` pairs against the block's 32 cells: 4 vectors of 8 cells a pair, each column's
/// 4 vectors loaded once for the tile.
///
/// # Safety
/// As `Math::scores` checks, for the pairs of `tile`; AVX2 and FMA are present.
#[inline(always)]
unsafe fn scores_tile<const T: usize>(queries: *const f32, hd: usize, tile: &[usize], keys_t: *const f32, out: *mut f32) {
    // SAFETY: the caller's contract bounds every access.
    unsafe {
        let mut q = [queries; T];
        for (q, &i) in q.iter_mut().zip(tile) {
            *q = queries.add(i * hd);
        }
        let mut acc = [[_mm256_setzero_ps(); 4]; T];
        for c in 0..hd {
            let column = keys_t.add(c * BLOCK);
            let k =
                [_mm256_loadu_ps(column), _mm256_loadu_ps(column.add(8)), _mm256_loadu_ps(column.add(16)), _mm256_loadu_ps(column.add(24))];
            for (acc, q) in acc.iter_mut().zip(&q) {
                let x = _mm256_broadcast_ss(&*q.add(c));
                for (a, k) in acc.iter_mut().zip(&k) {
                    *a = _mm256_fmadd_ps(x, *k, *a);
                }
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            for (i, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(p * BLOCK + 8 * i), *a);
            }
        }
    }
}

/// `acc_p[c..c + 8R] += Σ_j w_p[j] · values[j][c..c + 8R]` for the `T` pairs of `tile`, the `T × R`
/// vectors in registers and each value vector loaded once for the tile.
///
/// # Safety
/// As `Math::accumulate` checks, for the pairs of `tile` (weights at `w`, `BLOCK` apart) and columns
/// `c..c + 8R`; AVX2 and FMA are present.
#[inline(always)]
unsafe fn accumulate_tile<const T: usize, const R: usize>(
    acc: *mut f32,
    hd_v: usize,
    tile: &[usize],
    w: *const f32,
    n: usize,
    values: *const f32,
    c: usize,
) {
    // SAFETY: the caller's contract bounds every access.
    unsafe {
        let mut rows = [acc; T];
        let mut sums = [[_mm256_setzero_ps(); R]; T];
        for ((row, sums), &pair) in rows.iter_mut().zip(sums.iter_mut()).zip(tile) {
            *row = acc.add(pair * hd_v + c);
            for (i, sum) in sums.iter_mut().enumerate() {
                *sum = _mm256_loadu_ps(row.add(8 * i));
            }
        }
        for j in 0..n {
            let row = values.add(j * hd_v + c);
            let mut v = [_mm256_setzero_ps(); R];
            for (i, v) in v.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(row.add(8 * i));
            }
            for (p, sums) in sums.iter_mut().enumerate() {
                let weight = _mm256_broadcast_ss(&*w.add(p * BLOCK + j));
                for (sum, v) in sums.iter_mut().zip(&v) {
                    *sum = _mm256_fmadd_ps(weight, *v, *sum);
                }
            }
        }
        for (row, sums) in rows.iter().zip(&sums) {
            for (i, sum) in sums.iter().enumerate() {
                _mm256_storeu_ps(row.add(8 * i), *sum);
            }
        }
    }
}

/// `exp_nonpositive` on 8 lanes (the same steps: 2ᵏ·(1 + q), 0 below −87 and for −∞).
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: register-only (AVX2, FMA).
    unsafe {
        let clamped = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let k = _mm256_round_ps(
            _mm256_mul_ps(clamped, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428_606_8e-6), _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693_145_75), clamped));
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let q = _mm256_mul_ps(p, r);
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
        let e = _mm256_fmadd_ps(scale, q, scale);
        _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_LT_OQ), e)
    }
}

#[inline(always)]
unsafe fn horizontal_max(v: __m256) -> f32 {
    // SAFETY: register-only (AVX).
    unsafe {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)))
    }
}

#[inline(always)]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    // SAFETY: register-only (AVX).
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::math::tests::{check_softmax, Case};
    use super::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run(case: &Case, tile: usize) -> super::super::math::tests::Run {
        case.run::<Avx2>(tile)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn softmax() {
        check_softmax::<Avx2>("avx2");
    }

    /// Scores and weighted sums the portable loops' bit for bit, whatever the tiling, for head sizes
    /// with and without 8- and 32-column runs and blocks with and without 8-cell tails.
    #[test]
    fn loops_are_the_portable_ones_bit_for_bit() {
        if !super::super::has_avx2() {
            eprintln!("no AVX2 here: skipped");
            return;
        }
        for hd in [8, 24, 60, 64, 128] {
            for n in [1, 7, 8, 9, 32] {
                let case = Case::new(hd, n, 11);
                let want = case.reference();
                for tile in [1, 2, 3, 11] {
                    // SAFETY: the CPU has the features (checked).
                    assert!(Case::same(&unsafe { run(&case, tile) }, &want), "hd {hd} n {n} tile {tile}");
                }
            }
        }
        // SAFETY: as above.
        unsafe { softmax() };
    }
}
