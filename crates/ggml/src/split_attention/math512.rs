//! AVX-512 versions of the two loops a prompt's attention spends its time in: the scores of a query
//! against 8 key rows and the weighted sum of value rows, 16 lanes at a time (ggml's tiled kernel
//! runs 512-bit vectors on these CPUs and beat the 8-lane loops by 8–26 % on f16 prompts). The
//! weighted sums are the 8-lane loops' bit for bit (each column's chain of FMAs is the same); the
//! scores sum 16 lanes instead of 8, so they round differently (within f32 rounding). Everything else
//! — f16 runs, the online softmax, the block decoders — is the AVX2 code.

use std::arch::x86_64::*;

use super::math::{Avx2, Math};

pub(super) struct Avx512;

impl Math for Avx512 {
    const AVX2: bool = true;

    #[inline(always)]
    unsafe fn halves(src: *const u16, dst: &mut [f32]) {
        // SAFETY: the caller's contract; `Avx512` runs only where AVX2 and F16C exist too.
        unsafe { Avx2::halves(src, dst) }
    }

    #[inline(always)]
    fn scores(q: &[f32], keys: &[f32], out: &mut [f32]) {
        let hd = q.len();
        if !hd.is_multiple_of(16) {
            return Avx2::scores(q, keys, out);
        }
        let mut rows = out.chunks_exact_mut(8);
        let mut first = 0;
        for eight in &mut rows {
            // SAFETY: keys holds out.len() rows of hd floats, so rows first..first + 8 exist; `eight`
            // is 8 floats; the CPU has AVX-512F (the only way `Avx512` is run).
            unsafe { _mm256_storeu_ps(eight.as_mut_ptr(), scores16x8(q, keys.as_ptr().add(first * hd))) };
            first += 8;
        }
        Avx2::scores(q, &keys[first * hd..], rows.into_remainder());
    }

    #[inline(always)]
    fn accumulate(acc: &mut [f32], w: &[f32], values: &[f32]) {
        let hd = acc.len();
        if hd.is_multiple_of(64) {
            for c in (0..hd).step_by(64) {
                // SAFETY: columns c..c + 64 of acc and of every value row exist; AVX-512F as above.
                unsafe { accumulate_columns::<4>(acc, w, values, c) };
            }
        } else if hd.is_multiple_of(16) {
            for c in (0..hd).step_by(16) {
                // SAFETY: as above, 16 columns.
                unsafe { accumulate_columns::<1>(acc, w, values, c) };
            }
        } else {
            Avx2::accumulate(acc, w, values);
        }
    }

    #[inline(always)]
    fn softmax_block(w: &mut [f32], mask: &[f32], max: &mut f32, sum: &mut f32) -> Option<f32> {
        Avx2::softmax_block(w, mask, max, sum)
    }
}

/// q against 8 key rows at `keys`: one 16-lane accumulator per row, folded to 8 lanes, then the
/// AVX2 loop's pairwise tree.
///
/// # Safety
/// `keys` points at 8 rows of q.len() floats, q.len() a multiple of 16; AVX-512F, AVX2 and FMA are
/// present.
#[inline(always)]
unsafe fn scores16x8(q: &[f32], keys: *const f32) -> __m256 {
    let hd = q.len();
    // SAFETY: the caller's contract bounds every load.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 8];
        for c in (0..hd).step_by(16) {
            let qv = _mm512_loadu_ps(q.as_ptr().add(c));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(qv, _mm512_loadu_ps(keys.add(r * hd + c)), *a);
            }
        }
        let mut h = [_mm256_setzero_ps(); 8];
        for (h, a) in h.iter_mut().zip(acc) {
            *h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))));
        }
        let quads = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
        let quads_hi = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
        _mm256_add_ps(_mm256_permute2f128_ps(quads, quads_hi, 0x20), _mm256_permute2f128_ps(quads, quads_hi, 0x31))
    }
}

/// `acc[c..c + 16R] += Σ_j w[j] · values[j][c..c + 16R]`, the R vectors in registers.
///
/// # Safety
/// Columns c..c + 16R exist in acc and in each of the w.len() rows of acc.len() floats in values;
/// AVX-512F is present.
#[inline(always)]
unsafe fn accumulate_columns<const R: usize>(acc: &mut [f32], w: &[f32], values: &[f32], c: usize) {
    let hd = acc.len();
    // SAFETY: the caller's contract bounds every access.
    unsafe {
        let mut sums = [_mm512_setzero_ps(); R];
        for (r, s) in sums.iter_mut().enumerate() {
            *s = _mm512_loadu_ps(acc.as_ptr().add(c + 16 * r));
        }
        for (j, &weight) in w.iter().enumerate() {
            if weight == 0.0 {
                continue;
            }
            let wv = _mm512_set1_ps(weight);
            let row = values.as_ptr().add(j * hd + c);
            for (r, s) in sums.iter_mut().enumerate() {
                *s = _mm512_fmadd_ps(wv, _mm512_loadu_ps(row.add(16 * r)), *s);
            }
        }
        for (r, s) in sums.iter().enumerate() {
            _mm512_storeu_ps(acc.as_mut_ptr().add(c + 16 * r), *s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 500.0 - 1.0).collect()
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn avx512_loops(q: &[f32], keys: &[f32], w: &[f32], scores: &mut [f32], acc: &mut [f32]) {
        Avx512::scores(q, keys, scores);
        Avx512::accumulate(acc, w, keys);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2_accumulate(acc: &mut [f32], w: &[f32], values: &[f32]) {
        Avx2::accumulate(acc, w, values);
    }

    /// Scores and weighted sums against f64 sums (head sizes with 16-lane rows, with 8-lane tails
    /// and with neither; block sizes with and without 8-row tails), and the weighted sums equal to
    /// the 8-lane loop's bit for bit.
    #[test]
    fn loops_match_f64_sums_and_the_weighted_sums_the_avx2_ones() {
        if !super::super::has_avx512() {
            eprintln!("no AVX-512 here (or ggml built without it): skipped");
            return;
        }
        for hd in [16, 24, 48, 60, 64, 128] {
            for n in [1, 7, 8, 9, 31, 32] {
                let (q, keys, w) = (data(hd, 1), data(hd * n, 2), data(n, 3));
                let want_scores: Vec<f64> = keys.chunks(hd).map(|k| q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum()).collect();
                let mut want_acc: Vec<f64> = q.iter().map(|&x| x as f64).collect();
                for (j, v) in keys.chunks(hd).enumerate() {
                    want_acc.iter_mut().zip(v).for_each(|(a, &x)| *a += w[j] as f64 * x as f64);
                }
                let (mut scores, mut acc) = (vec![0f32; n], q.clone());
                // SAFETY: the CPU has the features (checked above).
                unsafe { avx512_loops(&q, &keys, &w, &mut scores, &mut acc) };
                for (g, w) in scores.iter().zip(&want_scores).chain(acc.iter().zip(&want_acc)) {
                    assert!((*g as f64 - w).abs() < 1e-4, "hd {hd} n {n}: {g} vs {w}");
                }
                let mut narrow = q.clone();
                // SAFETY: as above.
                unsafe { avx2_accumulate(&mut narrow, &w, &keys) };
                assert!(
                    acc.iter().zip(&narrow).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "hd {hd} n {n}: weighted sums differ from AVX2's"
                );
            }
        }
    }
}
