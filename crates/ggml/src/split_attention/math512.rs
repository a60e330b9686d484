//! `Avx512`: the loops a prompt's attention spends its time in on 16-lane vectors — scores of 16
//! cells a vector, weighted sums of 16 columns, the softmax's exponentials — each pair's fused
//! multiply-add chains in `Portable`'s order, so scores and weighted sums are its bits; the softmax
//! sums its 32 weights in another order than the 8-lane loop (within f32 rounding). f16 runs and the
//! transposition are the AVX2 code.

use std::arch::x86_64::*;

use super::math::{check_accumulate, check_scores, unchanged_or_exp, Math};
use super::math256::Avx2;
use super::BLOCK;

pub(super) struct Avx512;

impl Math for Avx512 {
    const AVX2: bool = true;

    #[inline(always)]
    unsafe fn halves(src: *const u16, dst: &mut [f32]) {
        // SAFETY: the caller's contract; `Avx512` runs only where AVX2 and F16C exist too.
        unsafe { Avx2::halves(src, dst) }
    }

    #[inline(always)]
    fn transpose(keys: &[f32], hd: usize, keys_t: &mut [f32]) {
        Avx2::transpose(keys, hd, keys_t)
    }

    #[inline(always)]
    fn scores(queries: &[f32], hd: usize, pairs: &[usize], keys_t: &[f32], out: &mut [f32]) {
        check_scores(queries, hd, pairs, keys_t, out);
        let mut first = 0;
        for tile in pairs.chunks(4) {
            let o = out[first * BLOCK..].as_mut_ptr();
            // SAFETY: every pair's query and output row and the block's columns are inside their
            // buffers (checked); the CPU has AVX-512F (the only way `Avx512` is run).
            unsafe {
                let (q, k) = (queries.as_ptr(), keys_t.as_ptr());
                match tile.len() {
                    4 => scores_tile::<4>(q, hd, tile, k, o),
                    3 => scores_tile::<3>(q, hd, tile, k, o),
                    2 => scores_tile::<2>(q, hd, tile, k, o),
                    _ => scores_tile::<1>(q, hd, tile, k, o),
                }
            }
            first += tile.len();
        }
    }

    #[inline(always)]
    fn accumulate(acc: &mut [f32], hd_v: usize, pairs: &[usize], w: &[f32], n: usize, values: &[f32]) {
        check_accumulate(acc, hd_v, pairs, w, n, values);
        let columns = if hd_v.is_multiple_of(64) {
            4
        } else if hd_v.is_multiple_of(16) {
            1
        } else {
            return Avx2::accumulate(acc, hd_v, pairs, w, n, values);
        };
        let mut first = 0;
        for tile in pairs.chunks(4) {
            let w = w[first * BLOCK..].as_ptr();
            for c in (0..hd_v).step_by(16 * columns) {
                // SAFETY: rows, weights and columns c..c + 16·columns are inside their buffers
                // (checked), the rows distinct; AVX-512F as above.
                unsafe {
                    let (a, v) = (acc.as_mut_ptr(), values.as_ptr());
                    match (tile.len(), columns) {
                        (4, 4) => accumulate_tile::<4, 4>(a, hd_v, tile, w, n, v, c),
                        (3, 4) => accumulate_tile::<3, 4>(a, hd_v, tile, w, n, v, c),
                        (2, 4) => accumulate_tile::<2, 4>(a, hd_v, tile, w, n, v, c),
                        (1, 4) => accumulate_tile::<1, 4>(a, hd_v, tile, w, n, v, c),
                        (4, _) => accumulate_tile::<4, 1>(a, hd_v, tile, w, n, v, c),
                        (3, _) => accumulate_tile::<3, 1>(a, hd_v, tile, w, n, v, c),
                        (2, _) => accumulate_tile::<2, 1>(a, hd_v, tile, w, n, v, c),
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
            return Avx2::softmax_block(w, mask, max, sum);
        }
        // SAFETY: w and mask hold 32 floats (checked); AVX-512F as above.
        unsafe {
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut s = [ninf; 2];
            for (i, s) in s.iter_mut().enumerate() {
                let (score, m) = (_mm512_loadu_ps(w.as_ptr().add(16 * i)), _mm512_loadu_ps(mask.as_ptr().add(16 * i)));
                *s = _mm512_mask_mov_ps(_mm512_add_ps(score, m), _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m, ninf), ninf);
            }
            let block_max = _mm512_reduce_max_ps(_mm512_max_ps(s[0], s[1]));
            if block_max == f32::NEG_INFINITY {
                w.iter_mut().for_each(|w| *w = 0.0);
                return None;
            }
            let new_max = max.max(block_max);
            let rescale = unchanged_or_exp(*max, new_max);
            let shift = _mm512_set1_ps(new_max);
            let e = [exp16(_mm512_sub_ps(s[0], shift)), exp16(_mm512_sub_ps(s[1], shift))];
            _mm512_storeu_ps(w.as_mut_ptr(), e[0]);
            _mm512_storeu_ps(w.as_mut_ptr().add(16), e[1]);
            *sum = *sum * rescale + _mm512_reduce_add_ps(_mm512_add_ps(e[0], e[1]));
            *max = new_max;
            Some(rescale)
        }
    }
}

/// The scores of `T` pairs against the block's 32 cells: 2 vectors of 16 cells a pair, each column's
/// 2 vectors loaded once for the tile.
///
/// # Safety
/// As `Math::scores` checks, for the pairs of `tile`; AVX-512F is present.
#[inline(always)]
unsafe fn scores_tile<const T: usize>(queries: *const f32, hd: usize, tile: &[usize], keys_t: *const f32, out: *mut f32) {
    // SAFETY: the caller's contract bounds every access.
    unsafe {
        let mut q = [queries; T];
        for (q, &i) in q.iter_mut().zip(tile) {
            *q = queries.add(i * hd);
        }
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        for c in 0..hd {
            let column = keys_t.add(c * BLOCK);
            let k = [_mm512_loadu_ps(column), _mm512_loadu_ps(column.add(16))];
            for p in 0..T {
                let x = _mm512_set1_ps(*q[p].add(c));
                acc[p][0] = _mm512_fmadd_ps(x, k[0], acc[p][0]);
                acc[p][1] = _mm512_fmadd_ps(x, k[1], acc[p][1]);
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(p * BLOCK), acc[0]);
            _mm512_storeu_ps(out.add(p * BLOCK + 16), acc[1]);
        }
    }
}

/// `acc_p[c..c + 16R] += Σ_j w_p[j] · values[j][c..c + 16R]` for the `T` pairs of `tile`, the
/// `T × R` vectors in registers and each value vector loaded once for the tile.
///
/// # Safety
/// As `Math::accumulate` checks, for the pairs of `tile` (weights at `w`, `BLOCK` apart) and columns
/// `c..c + 16R`; AVX-512F is present.
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
        let mut sums = [[_mm512_setzero_ps(); R]; T];
        for ((row, sums), &pair) in rows.iter_mut().zip(sums.iter_mut()).zip(tile) {
            *row = acc.add(pair * hd_v + c);
            for (i, sum) in sums.iter_mut().enumerate() {
                *sum = _mm512_loadu_ps(row.add(16 * i));
            }
        }
        for j in 0..n {
            let row = values.add(j * hd_v + c);
            let mut v = [_mm512_setzero_ps(); R];
            for (i, v) in v.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(row.add(16 * i));
            }
            for (p, sums) in sums.iter_mut().enumerate() {
                let weight = _mm512_set1_ps(*w.add(p * BLOCK + j));
                for (sum, v) in sums.iter_mut().zip(&v) {
                    *sum = _mm512_fmadd_ps(weight, *v, *sum);
                }
            }
        }
        for (row, sums) in rows.iter().zip(&sums) {
            for (i, sum) in sums.iter().enumerate() {
                _mm512_storeu_ps(row.add(16 * i), *sum);
            }
        }
    }
}

/// `exp_nonpositive` on 16 lanes: the 8-lane loop's steps lane for lane (so the same bits).
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    // SAFETY: register-only (AVX-512F).
    unsafe {
        let floor = _mm512_set1_ps(-87.0);
        let clamped = _mm512_max_ps(x, floor);
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            clamped,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428_606_8e-6), _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_145_75), clamped));
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let q = _mm512_mul_ps(p, r);
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127))));
        let e = _mm512_fmadd_ps(scale, q, scale);
        _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, floor), _mm512_setzero_ps())
    }
}

#[cfg(test)]
mod tests {
    use super::super::math::tests::{check_softmax, data, Case, Run};
    use super::*;

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn run(case: &Case, tile: usize) -> Run {
        case.run::<Avx512>(tile)
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn softmax_weights(w: &mut [f32], mask: &[f32]) {
        let (mut max, mut sum) = (1.0, 1.0);
        check_softmax::<Avx512>("avx512");
        Avx512::softmax_block(w, mask, &mut max, &mut sum);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn softmax_weights_avx2(w: &mut [f32], mask: &[f32]) {
        let (mut max, mut sum) = (1.0, 1.0);
        Avx2::softmax_block(w, mask, &mut max, &mut sum);
    }

    /// Scores and weighted sums the portable loops' bit for bit whatever the tiling (head sizes with
    /// and without 16- and 64-column runs, blocks with and without 16-cell tails); the softmax
    /// against f64, its weights the 8-lane loop's bit for bit.
    #[test]
    fn loops_are_the_portable_ones_bit_for_bit() {
        if !super::super::has_avx512() {
            eprintln!("no AVX-512 here (or ggml built without it): skipped");
            return;
        }
        for hd in [16, 24, 48, 60, 64, 128] {
            for n in [1, 7, 8, 9, 31, 32] {
                let case = Case::new(hd, n, 11);
                let want = case.reference();
                for tile in [1, 2, 3, 4, 5, 11] {
                    // SAFETY: the CPU has the features (checked above).
                    assert!(Case::same(&unsafe { run(&case, tile) }, &want), "hd {hd} n {n} tile {tile}");
                }
            }
        }
        let mask: Vec<f32> = (0..32).map(|j| if j % 5 == 1 { f32::NEG_INFINITY } else { 0.0 }).collect();
        let (mut wide, mut narrow) = (data(32, 9), data(32, 9));
        // SAFETY: as above.
        unsafe {
            softmax_weights(&mut wide, &mask);
            softmax_weights_avx2(&mut narrow, &mask);
        }
        assert_eq!(wide.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), narrow.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }
}
