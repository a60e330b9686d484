//! The inner loops of the split attention kernel: f16 runs to f32, a query against a block of keys,
//! and a weighted sum of value rows. `Portable` is plain Rust; `Avx2` uses AVX2/FMA/F16C intrinsics and
//! is only instantiated inside functions compiled for (and only called on CPUs with) those features.

/// One implementation of the loops.
pub(super) trait Math {
    /// Whether the implementation uses (and the CPU running it has) AVX2, FMA and F16C.
    const AVX2: bool;
    /// `dst[i] = f32(src[i])` for IEEE halves.
    ///
    /// # Safety
    /// `src` points at `dst.len()` halves.
    unsafe fn halves(src: *const u16, dst: &mut [f32]);
    /// `out[j] = q · keys[j]` for the `out.len()` rows of `q.len()` floats in `keys`.
    fn scores(q: &[f32], keys: &[f32], out: &mut [f32]);
    /// `acc += Σ_j w[j] · values[j]` over rows of `acc.len()` floats, skipping zero weights.
    fn accumulate(acc: &mut [f32], w: &[f32], values: &[f32]);
    /// One block of an online softmax: `w` holds the block's scores, to which the mask is added
    /// (masked cells become −∞ whatever their score); they become `exp(score − new max)`, and `max`
    /// and `sum` move on. Returns the factor the weighted sums so far must be scaled by, or None (and
    /// zero weights) when every cell of the block is masked.
    fn softmax_block(w: &mut [f32], mask: &[f32], max: &mut f32, sum: &mut f32) -> Option<f32>;
}

pub(super) struct Portable;

impl Math for Portable {
    const AVX2: bool = false;

    #[inline(always)]
    unsafe fn halves(src: *const u16, dst: &mut [f32]) {
        for (i, d) in dst.iter_mut().enumerate() {
            // SAFETY: the caller's contract.
            *d = super::f16_to_f32(unsafe { src.add(i).read_unaligned() });
        }
    }

    #[inline(always)]
    fn scores(q: &[f32], keys: &[f32], out: &mut [f32]) {
        for (o, k) in out.iter_mut().zip(keys.chunks_exact(q.len())) {
            *o = dot(q, k);
        }
    }

    #[inline(always)]
    fn accumulate(acc: &mut [f32], w: &[f32], values: &[f32]) {
        for (&w, v) in w.iter().zip(values.chunks_exact(acc.len())) {
            if w != 0.0 {
                for (a, &x) in acc.iter_mut().zip(v) {
                    *a = w.mul_add(x, *a);
                }
            }
        }
    }

    #[inline(always)]
    fn softmax_block(w: &mut [f32], mask: &[f32], max: &mut f32, sum: &mut f32) -> Option<f32> {
        w.iter_mut().zip(mask).for_each(|(w, &m)| *w = if m == f32::NEG_INFINITY { m } else { *w + m });
        let block_max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if block_max == f32::NEG_INFINITY {
            w.iter_mut().for_each(|w| *w = 0.0);
            return None;
        }
        let new_max = max.max(block_max);
        let rescale = exp_nonpositive(*max - new_max);
        w.iter_mut().for_each(|w| *w = exp_nonpositive(*w - new_max));
        *sum = *sum * rescale + w.iter().sum::<f32>();
        *max = new_max;
        Some(rescale)
    }
}

use crate::custom::exp_nonpositive;

/// Eight independent sums, so the loop vectorizes without reassociating.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] = x[i].mul_add(y[i], lanes[i]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::Avx2;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Math, Portable};

    pub(in super::super) struct Avx2;

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
        fn scores(q: &[f32], keys: &[f32], out: &mut [f32]) {
            let hd = q.len();
            if !hd.is_multiple_of(8) {
                return Portable::scores(q, keys, out);
            }
            let mut rows = out.chunks_exact_mut(8);
            let mut first = 0;
            for eight in &mut rows {
                // SAFETY: keys holds out.len() rows of hd floats, so rows first..first + 8 exist.
                let sums = unsafe { scores8(q, keys.as_ptr().add(first * hd)) };
                // SAFETY: `eight` is 8 floats.
                unsafe { _mm256_storeu_ps(eight.as_mut_ptr(), sums) };
                first += 8;
            }
            Portable::scores(q, &keys[first * hd..], rows.into_remainder());
        }

        #[inline(always)]
        fn accumulate(acc: &mut [f32], w: &[f32], values: &[f32]) {
            let hd = acc.len();
            if hd.is_multiple_of(64) {
                for c in (0..hd).step_by(64) {
                    // SAFETY: columns c..c + 64 of acc and of every value row exist.
                    unsafe { accumulate_columns::<8>(acc, w, values, c) };
                }
            } else if hd.is_multiple_of(8) {
                for c in (0..hd).step_by(8) {
                    // SAFETY: as above, 8 columns.
                    unsafe { accumulate_columns::<1>(acc, w, values, c) };
                }
            } else {
                Portable::accumulate(acc, w, values);
            }
        }

        #[inline(always)]
        fn softmax_block(w: &mut [f32], mask: &[f32], max: &mut f32, sum: &mut f32) -> Option<f32> {
            if w.len() != 32 {
                return Portable::softmax_block(w, mask, max, sum);
            }
            // SAFETY: w and mask hold 32 floats (w checked, mask as long as w by contract).
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
                let rescale = exp_nonpositive(*max - new_max);
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

    use crate::custom::exp_nonpositive;

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

    /// q against 8 key rows at `keys` (8 accumulators, one per row, reduced into one vector).
    ///
    /// # Safety
    /// `keys` points at 8 rows of q.len() floats, q.len() a multiple of 8; AVX2 and FMA are present.
    #[inline(always)]
    unsafe fn scores8(q: &[f32], keys: *const f32) -> __m256 {
        let hd = q.len();
        // SAFETY: the caller's contract bounds every load.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..hd).step_by(8) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys.add(r * hd + c)), *a);
                }
            }
            // hadd pairs, then quads: lane r of the low half sums row r's columns 0–3 of every
            // 8, of the high half columns 4–7.
            let quads = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
            let quads_hi = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
            let low = _mm256_permute2f128_ps(quads, quads_hi, 0x20);
            let high = _mm256_permute2f128_ps(quads, quads_hi, 0x31);
            _mm256_add_ps(low, high)
        }
    }

    /// `acc[c..c + 8R] += Σ_j w[j] · values[j][c..c + 8R]`, the R vectors in registers.
    ///
    /// # Safety
    /// Columns c..c + 8R exist in acc and in each of the w.len() rows of acc.len() floats in values;
    /// AVX2 and FMA are present.
    #[inline(always)]
    unsafe fn accumulate_columns<const R: usize>(acc: &mut [f32], w: &[f32], values: &[f32], c: usize) {
        let hd = acc.len();
        // SAFETY: the caller's contract bounds every access.
        unsafe {
            let mut sums = [_mm256_setzero_ps(); R];
            for (r, s) in sums.iter_mut().enumerate() {
                *s = _mm256_loadu_ps(acc.as_ptr().add(c + 8 * r));
            }
            for (j, &weight) in w.iter().enumerate() {
                if weight == 0.0 {
                    continue;
                }
                let wv = _mm256_set1_ps(weight);
                let row = values.as_ptr().add(j * hd + c);
                for (r, s) in sums.iter_mut().enumerate() {
                    *s = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * r)), *s);
                }
            }
            for (r, s) in sums.iter().enumerate() {
                _mm256_storeu_ps(acc.as_mut_ptr().add(c + 8 * r), *s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 500.0 - 1.0).collect()
    }

    /// Both implementations against f64 sums, for head sizes with and without vector tails.
    #[test]
    fn loops_match_f64_sums() {
        for hd in [8, 24, 60, 64, 128] {
            for n in [1, 7, 8, 9, 32] {
                let (q, keys, w) = (data(hd, 1), data(hd * n, 2), data(n, 3));
                let want_scores: Vec<f64> = keys.chunks(hd).map(|k| q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum()).collect();
                let mut want_acc: Vec<f64> = q.iter().map(|&x| x as f64).collect();
                for (j, v) in keys.chunks(hd).enumerate() {
                    want_acc.iter_mut().zip(v).for_each(|(a, &x)| *a += w[j] as f64 * x as f64);
                }
                let check = |name: &str, scores: &[f32], acc: &[f32]| {
                    for (g, w) in scores.iter().zip(&want_scores).chain(acc.iter().zip(&want_acc)) {
                        assert!((*g as f64 - w).abs() < 1e-4, "{name} hd {hd} n {n}: {g} vs {w}");
                    }
                };
                let (mut scores, mut acc) = (vec![0f32; n], q.clone());
                Portable::scores(&q, &keys, &mut scores);
                Portable::accumulate(&mut acc, &w, &keys);
                check("portable", &scores, &acc);
                #[cfg(target_arch = "x86_64")]
                if super::super::has_avx2() {
                    let (mut scores, mut acc) = (vec![0f32; n], q.clone());
                    // SAFETY: the CPU has the features (checked).
                    unsafe { avx2_loops(&q, &keys, &w, &mut scores, &mut acc) };
                    check("avx2", &scores, &acc);
                }
            }
        }
    }

    /// The softmax step against f64 on a block with masked cells, both implementations.
    #[test]
    fn softmax_block_matches_f64() {
        let scores: Vec<f32> = data(32, 4).iter().map(|x| x * 20.0).collect();
        let mask: Vec<f32> = (0..32).map(|j| if j % 7 == 3 { f32::NEG_INFINITY } else { -(j as f32) * 0.1 }).collect();
        let (prev_max, prev_sum) = (3.0f32, 2.5f32);
        let live: Vec<f64> = scores.iter().zip(&mask).filter(|(_, m)| m.is_finite()).map(|(s, m)| (*s + *m) as f64).collect();
        let new_max = live.iter().copied().fold(prev_max as f64, f64::max);
        let check = |name: &str, w: &[f32], max: f32, sum: f32, rescale: Option<f32>| {
            assert_eq!(max as f64, new_max, "{name}");
            let want_rescale = (prev_max as f64 - new_max).exp();
            assert!((rescale.unwrap() as f64 - want_rescale).abs() < 1e-6 * want_rescale, "{name}");
            let want_sum = prev_sum as f64 * want_rescale + live.iter().map(|s| (s - new_max).exp()).sum::<f64>();
            assert!((sum as f64 - want_sum).abs() < 1e-5 * want_sum, "{name}: {sum} vs {want_sum}");
            for (j, &w) in w.iter().enumerate() {
                let want = if mask[j].is_finite() { ((scores[j] + mask[j]) as f64 - new_max).exp() } else { 0.0 };
                assert!((w as f64 - want).abs() < 1e-6, "{name} cell {j}: {w} vs {want}");
            }
        };
        let (mut w, mut max, mut sum) = (scores.clone(), prev_max, prev_sum);
        let rescale = Portable::softmax_block(&mut w, &mask, &mut max, &mut sum);
        check("portable", &w, max, sum, rescale);
        #[cfg(target_arch = "x86_64")]
        if super::super::has_avx2() {
            let (mut w, mut max, mut sum) = (scores.clone(), prev_max, prev_sum);
            // SAFETY: the CPU has the features (checked).
            let rescale = unsafe { avx2_softmax(&mut w, &mask, &mut max, &mut sum) };
            check("avx2", &w, max, sum, rescale);
        }
        let all_masked = vec![f32::NEG_INFINITY; 32];
        let (mut w, mut max, mut sum) = (scores.clone(), prev_max, prev_sum);
        assert_eq!(Portable::softmax_block(&mut w, &all_masked, &mut max, &mut sum), None);
        assert!(w.iter().all(|w| *w == 0.0) && max == prev_max && sum == prev_sum);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2_softmax(w: &mut [f32], mask: &[f32], max: &mut f32, sum: &mut f32) -> Option<f32> {
        Avx2::softmax_block(w, mask, max, sum)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2_loops(q: &[f32], keys: &[f32], w: &[f32], scores: &mut [f32], acc: &mut [f32]) {
        Avx2::scores(q, keys, scores);
        Avx2::accumulate(acc, w, keys);
    }
}
