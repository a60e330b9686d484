//! The inner loops of the split attention kernel: f16 runs to f32, a block of keys turned into
//! columns, the scores of a tile of (query row, head) pairs against a block, the online softmax and
//! the weighted sums of value rows. `Portable` is plain Rust and defines the arithmetic; `Avx2`
//! (math256) and `Avx512` (math512) do the same operations in the same order on vectors, and are
//! only instantiated inside functions compiled for (and only called on CPUs with) their features.
//!
//! A pair's score against a cell is one fused multiply-add chain over the head's columns in order,
//! and its weighted sum one chain over the block's cells in order: so a pair's results are the same
//! bits whichever pairs share its tile — one query row alone or a prompt of hundreds — and the same
//! on every implementation.

use super::BLOCK;

/// One implementation of the loops.
pub(super) trait Math {
    /// Whether the implementation uses (and the CPU running it has) AVX2, FMA and F16C.
    const AVX2: bool;
    /// `dst[i] = f32(src[i])` for IEEE halves.
    ///
    /// # Safety
    /// `src` points at `dst.len()` halves.
    unsafe fn halves(src: *const u16, dst: &mut [f32]);
    /// `keys_t[c · BLOCK + j] = keys[j · hd + c]`: a block's `BLOCK` rows of `hd` floats turned into
    /// `hd` columns of `BLOCK` cells, so that a vector holds one column of consecutive cells.
    fn transpose(keys: &[f32], hd: usize, keys_t: &mut [f32]);
    /// For each pair `p`: `out[p · BLOCK + j] = Σ_c q_p[c] · keys_t[c · BLOCK + j]` for every cell `j`
    /// of the block, one fused multiply-add chain over `c` from 0, where `q_p` is the `hd` floats of
    /// `queries` at `pairs[p] · hd`.
    fn scores(queries: &[f32], hd: usize, pairs: &[usize], keys_t: &[f32], out: &mut [f32]);
    /// For each pair `p`: `acc_p[c] += Σ_{j < n} w_p[j] · values[j · hd_v + c]`, one fused
    /// multiply-add chain over `j` in order, where `acc_p` is the `hd_v` floats of `acc` at
    /// `pairs[p] · hd_v` (distinct rows) and `w_p` the `n` floats of `w` at `p · BLOCK`. Zero
    /// weights may be skipped or not: adding a zero product to a sum leaves it as it was.
    fn accumulate(acc: &mut [f32], hd_v: usize, pairs: &[usize], w: &[f32], n: usize, values: &[f32]);
    /// One block of an online softmax: `w` holds the block's scores, to which the mask is added
    /// (masked cells become −∞ whatever their score); they become `exp(score − new max)`, and `max`
    /// and `sum` move on. Returns the factor the weighted sums so far must be scaled by, or None (and
    /// zero weights) when every cell of the block is masked.
    fn softmax_block(w: &mut [f32], mask: &[f32], max: &mut f32, sum: &mut f32) -> Option<f32>;
}

/// The bounds every implementation's loops rely on (the vector ones read through raw pointers).
#[inline(always)]
pub(super) fn check_scores(queries: &[f32], hd: usize, pairs: &[usize], keys_t: &[f32], out: &mut [f32]) {
    assert!(keys_t.len() >= hd * BLOCK && out.len() >= pairs.len() * BLOCK, "split attention: score buffers too short");
    assert!(pairs.iter().all(|&i| (i + 1) * hd <= queries.len()), "split attention: a pair past the queries");
}

/// As `check_scores`, for `accumulate`.
#[inline(always)]
pub(super) fn check_accumulate(acc: &[f32], hd_v: usize, pairs: &[usize], w: &[f32], n: usize, values: &[f32]) {
    assert!(n <= BLOCK && w.len() >= pairs.len() * BLOCK && values.len() >= n * hd_v, "split attention: weight buffers too short");
    assert!(pairs.iter().all(|&i| (i + 1) * hd_v <= acc.len()), "split attention: a pair past the sums");
}

pub(super) struct Portable;

impl Math for Portable {
    const AVX2: bool = false;

    #[inline(always)]
    unsafe fn halves(src: *const u16, dst: &mut [f32]) {
        for (i, d) in dst.iter_mut().enumerate() {
            // SAFETY: the caller's contract.
            *d = crate::dtype::f16_to_f32(unsafe { src.add(i).read_unaligned() });
        }
    }

    #[inline(always)]
    fn transpose(keys: &[f32], hd: usize, keys_t: &mut [f32]) {
        for (j, row) in keys.chunks_exact(hd).take(BLOCK).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                keys_t[c * BLOCK + j] = x;
            }
        }
    }

    #[inline(always)]
    fn scores(queries: &[f32], hd: usize, pairs: &[usize], keys_t: &[f32], out: &mut [f32]) {
        for (&i, out) in pairs.iter().zip(out.chunks_exact_mut(BLOCK)) {
            let q = &queries[i * hd..(i + 1) * hd];
            for (j, o) in out.iter_mut().enumerate() {
                *o = q.iter().enumerate().fold(0.0, |sum, (c, &x)| x.mul_add(keys_t[c * BLOCK + j], sum));
            }
        }
    }

    #[inline(always)]
    fn accumulate(acc: &mut [f32], hd_v: usize, pairs: &[usize], w: &[f32], n: usize, values: &[f32]) {
        for (&i, w) in pairs.iter().zip(w.chunks_exact(BLOCK)) {
            let acc = &mut acc[i * hd_v..(i + 1) * hd_v];
            for (&w, v) in w[..n].iter().zip(values.chunks_exact(hd_v)) {
                if w != 0.0 {
                    acc.iter_mut().zip(v).for_each(|(a, &x)| *a = w.mul_add(x, *a));
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
        let rescale = unchanged_or_exp(*max, new_max);
        w.iter_mut().for_each(|w| *w = exp_nonpositive(*w - new_max));
        *sum = *sum * rescale + w.iter().sum::<f32>();
        *max = new_max;
        Some(rescale)
    }
}

use crate::custom::exp_nonpositive;

/// `exp(max − new_max)`, the factor earlier sums are scaled by: 1 without the polynomial when the
/// maximum stayed (most blocks past the first few), which is what the polynomial gives at 0.
#[inline(always)]
pub(super) fn unchanged_or_exp(max: f32, new_max: f32) -> f32 {
    if max == new_max {
        1.0
    } else {
        exp_nonpositive(max - new_max)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in super::super) fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 500.0 - 1.0).collect()
    }

    /// The loops of one implementation, over `n` cells of a block whose other rows are garbage.
    pub(in super::super) struct Run {
        pub scores: Vec<f32>,
        pub acc: Vec<f32>,
    }

    /// A case: `pairs` query rows of `hd` floats, a block of keys and values, weights over `n` cells.
    pub(in super::super) struct Case {
        pub hd: usize,
        pub n: usize,
        pub queries: Vec<f32>,
        pub keys: Vec<f32>,
        pub w: Vec<f32>,
        pub acc: Vec<f32>,
        pub pairs: Vec<usize>,
    }

    impl Case {
        pub fn new(hd: usize, n: usize, pairs: usize) -> Case {
            // Pairs taken in a scattered order, as a prompt's live rows are.
            let order: Vec<usize> = (0..pairs).map(|p| (p * 7 + 3) % pairs).collect();
            let mut w = data(pairs * BLOCK, 3);
            w.iter_mut().step_by(5).for_each(|w| *w = 0.0); // masked cells
            Case { hd, n, queries: data(pairs * hd, 1), keys: data(BLOCK * hd, 2), w, acc: data(pairs * hd, 4), pairs: order }
        }

        /// Runs `M`'s loops, the pairs in tiles of `tile` (each tile a call of its own).
        pub fn run<M: Math>(&self, tile: usize) -> Run {
            let mut keys_t = vec![f32::NAN; self.hd * BLOCK];
            M::transpose(&self.keys, self.hd, &mut keys_t);
            let (mut scores, mut acc) = (vec![0.0; self.pairs.len() * BLOCK], self.acc.clone());
            for (k, pairs) in self.pairs.chunks(tile).enumerate() {
                let at = k * tile * BLOCK;
                M::scores(&self.queries, self.hd, pairs, &keys_t, &mut scores[at..]);
                M::accumulate(&mut acc, self.hd, pairs, &self.w[at..], self.n, &self.keys[..self.n * self.hd]);
            }
            Run { scores, acc }
        }

        /// The portable loops' results, checked against f64 sums.
        pub fn reference(&self) -> Run {
            let run = self.run::<Portable>(self.pairs.len());
            for (p, &i) in self.pairs.iter().enumerate() {
                let q = &self.queries[i * self.hd..(i + 1) * self.hd];
                for (j, k) in self.keys.chunks(self.hd).enumerate() {
                    let want: f64 = q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum();
                    assert!((run.scores[p * BLOCK + j] as f64 - want).abs() < 1e-4, "hd {} score {p}/{j}", self.hd);
                }
                for c in 0..self.hd {
                    let w = &self.w[p * BLOCK..];
                    let want = self.acc[i * self.hd + c] as f64
                        + (0..self.n).map(|j| w[j] as f64 * self.keys[j * self.hd + c] as f64).sum::<f64>();
                    assert!((run.acc[i * self.hd + c] as f64 - want).abs() < 1e-4, "hd {} sum {p}/{c}", self.hd);
                }
            }
            run
        }

        /// Whether `got` is `want` bit for bit.
        pub fn same(got: &Run, want: &Run) -> bool {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            bits(&got.scores) == bits(&want.scores) && bits(&got.acc) == bits(&want.acc)
        }
    }

    /// The portable loops against f64 sums, and the same bits whatever the tiling.
    #[test]
    fn portable_loops_match_f64_sums_whatever_the_tiling() {
        for hd in [8, 24, 60, 64, 128] {
            for n in [1, 7, 8, 9, 32] {
                let case = Case::new(hd, n, 11);
                let want = case.reference();
                for tile in [1, 3, 4] {
                    assert!(Case::same(&case.run::<Portable>(tile), &want), "hd {hd} n {n} tile {tile}");
                }
            }
        }
    }

    /// The softmax step against f64 on a block with masked cells.
    #[test]
    fn softmax_block_matches_f64() {
        assert_eq!(exp_nonpositive(0.0).to_bits(), 1f32.to_bits(), "skipping the polynomial when the maximum stays changes nothing");
        check_softmax::<Portable>("portable");
        let all_masked = vec![f32::NEG_INFINITY; 32];
        let (mut w, mut max, mut sum) = (data(32, 4), 3.0f32, 2.5f32);
        assert_eq!(Portable::softmax_block(&mut w, &all_masked, &mut max, &mut sum), None);
        assert!(w.iter().all(|w| *w == 0.0) && max == 3.0 && sum == 2.5);
    }

    pub(in super::super) fn check_softmax<M: Math>(name: &str) {
        let scores: Vec<f32> = data(32, 4).iter().map(|x| x * 20.0).collect();
        let mask: Vec<f32> = (0..32).map(|j| if j % 7 == 3 { f32::NEG_INFINITY } else { -(j as f32) * 0.1 }).collect();
        let (prev_max, prev_sum) = (3.0f32, 2.5f32);
        let live: Vec<f64> = scores.iter().zip(&mask).filter(|(_, m)| m.is_finite()).map(|(s, m)| (*s + *m) as f64).collect();
        let new_max = live.iter().copied().fold(prev_max as f64, f64::max);
        let (mut w, mut max, mut sum) = (scores.clone(), prev_max, prev_sum);
        let rescale = M::softmax_block(&mut w, &mask, &mut max, &mut sum);
        assert_eq!(max as f64, new_max, "{name}");
        let want_rescale = (prev_max as f64 - new_max).exp();
        assert!((rescale.unwrap() as f64 - want_rescale).abs() < 1e-6 * want_rescale, "{name}");
        let want_sum = prev_sum as f64 * want_rescale + live.iter().map(|s| (s - new_max).exp()).sum::<f64>();
        assert!((sum as f64 - want_sum).abs() < 1e-5 * want_sum, "{name}: {sum} vs {want_sum}");
        for (j, &w) in w.iter().enumerate() {
            let want = if mask[j].is_finite() { ((scores[j] + mask[j]) as f64 - new_max).exp() } else { 0.0 };
            assert!((w as f64 - want).abs() < 1e-6, "{name} cell {j}: {w} vs {want}");
        }
    }
}
