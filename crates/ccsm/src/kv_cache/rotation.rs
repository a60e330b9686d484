//! Hadamard rotation of quantized K/V rows. Each head's slice is multiplied by the orthonormal
//! Walsh-Hadamard matrix H (symmetric, H·H = I) before it is quantized: an outlier channel is spread
//! over the whole head, so the per-block scales of Q4/Q8 formats fit the values far better.
//! Attention is unchanged in exact arithmetic: scores use (Hq)·(Hk) = q·k, and the output of
//! attention over HV is H times the output over V, undone by one more product with H.

use serde::Serialize;

use crate::CacheType;

/// When cache rows are rotated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rotation {
    /// Never: rows are stored as computed.
    Off,
    /// A half (K or V) is rotated when it is stored in a quantized type and the head dimension is a
    /// power of two.
    #[default]
    Quantized,
    /// Every half with a power-of-two head dimension, f16 and f32 included: no accuracy gain there,
    /// but it checks the rotation itself (attention over rotated f32 rows equals the plain result).
    All,
}

impl Rotation {
    /// Whether rows of `head_dim` values stored as `ty` are rotated under this policy.
    pub fn applies(self, ty: CacheType, head_dim: usize) -> bool {
        let wanted = match self {
            Rotation::Off => false,
            Rotation::Quantized => ty.is_quantized(),
            Rotation::All => true,
        };
        wanted && head_dim.is_power_of_two() && head_dim >= 2
    }

    /// The policy's name on the command line and in reports (`off`, `quantized`, `all`).
    pub fn name(self) -> &'static str {
        match self {
            Rotation::Off => "off",
            Rotation::Quantized => "quantized",
            Rotation::All => "all",
        }
    }
}

impl std::str::FromStr for Rotation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Rotation::Off),
            "quantized" => Ok(Rotation::Quantized),
            "all" => Ok(Rotation::All),
            _ => Err(format!("unknown rotation `{s}` (expected quantized, off or all)")),
        }
    }
}

/// The orthonormal Hadamard matrix of order `n` (a power of two), row-major: entry (i, j) is
/// (−1)^popcount(i & j) / √n (Sylvester's construction).
pub fn hadamard_matrix(n: usize) -> Vec<f32> {
    let scale = 1.0 / (n as f32).sqrt();
    (0..n * n).map(|k| if ((k / n) & (k % n)).count_ones().is_multiple_of(2) { scale } else { -scale }).collect()
}

/// Multiplies every `head_dim` slice of `values` by the orthonormal Hadamard matrix, in place, with
/// the fast Walsh-Hadamard transform (`head_dim` log `head_dim` additions per slice).
pub fn rotate_heads(values: &mut [f32], head_dim: usize) {
    debug_assert!(head_dim.is_power_of_two() && values.len().is_multiple_of(head_dim));
    let scale = 1.0 / (head_dim as f32).sqrt();
    for head in values.chunks_exact_mut(head_dim) {
        // The first three butterfly stages on whole blocks of 8 (short spans do not vectorize one
        // by one), then the wider stages over contiguous halves; the same additions in the same order.
        let mut span = 1;
        if head_dim >= 8 {
            head.chunks_exact_mut(8).for_each(hadamard8);
            span = 8;
        }
        while span < head_dim {
            for block in head.chunks_exact_mut(2 * span) {
                let (low, high) = block.split_at_mut(span);
                for (a, b) in low.iter_mut().zip(high.iter_mut()) {
                    (*a, *b) = (*a + *b, *a - *b);
                }
            }
            span *= 2;
        }
        head.iter_mut().for_each(|v| *v *= scale);
    }
}

/// Butterfly stages of spans 1, 2 and 4 on 8 values (unnormalised).
fn hadamard8(x: &mut [f32]) {
    let mut v: [f32; 8] = x.try_into().expect("blocks of 8");
    for span in [1, 2, 4] {
        let mut out = v;
        for i in 0..8 {
            out[i] = if i & span == 0 { v[i] + v[i + span] } else { v[i - span] - v[i] };
        }
        v = out;
    }
    x.copy_from_slice(&v);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sylvester's recursion H(2n) = [[H, H], [H, −H]] (unnormalised), independent of the closed
    /// form and of the butterfly under test.
    fn sylvester(n: usize) -> Vec<Vec<f64>> {
        let mut h = vec![vec![1.0]];
        while h.len() < n {
            let top = h.iter().map(|r| r.iter().chain(r).copied().collect());
            let bottom = h.iter().map(|r| r.iter().copied().chain(r.iter().map(|x| -x)).collect());
            h = top.chain(bottom).collect();
        }
        h
    }

    #[test]
    fn the_fast_transform_is_the_normalised_sylvester_matrix_and_its_own_inverse() {
        let n = 16;
        let h = sylvester(n);
        let scale = 1.0 / (n as f64).sqrt();
        let closed = hadamard_matrix(n);
        assert!((0..n * n).all(|k| (closed[k] as f64 - h[k / n][k % n] * scale).abs() < 1e-7), "closed form");
        let x: Vec<f32> = (0..2 * n).map(|i| ((i * 7919) % 23) as f32 - 11.0).collect();
        let mut fast = x.clone();
        rotate_heads(&mut fast, n);
        for (head, out) in x.chunks(n).zip(fast.chunks(n)) {
            for i in 0..n {
                let naive: f64 = (0..n).map(|j| h[i][j] * scale * head[j] as f64).sum();
                assert!((naive - out[i] as f64).abs() < 1e-5, "row {i}: {naive} vs {}", out[i]);
            }
        }
        rotate_heads(&mut fast, n);
        assert!(x.iter().zip(&fast).all(|(a, b)| (a - b).abs() < 1e-5), "H·H = I");
    }

    /// The butterflies one index at a time, stage by stage: what `rotate_heads` computes, written
    /// the plainest way.
    fn plain_butterflies(head: &mut [f32]) {
        let n = head.len();
        let mut span = 1;
        while span < n {
            for start in (0..n).step_by(2 * span) {
                for i in start..start + span {
                    let (a, b) = (head[i], head[i + span]);
                    head[i] = a + b;
                    head[i + span] = a - b;
                }
            }
            span *= 2;
        }
        let scale = 1.0 / (n as f32).sqrt();
        head.iter_mut().for_each(|v| *v *= scale);
    }

    #[test]
    fn blocked_butterflies_round_as_the_plain_ones_bit_for_bit() {
        for n in [1, 2, 4, 8, 16, 64, 128, 256] {
            // Values whose sums round (no exact small integers), three heads.
            let x: Vec<f32> = (0..3 * n).map(|i| ((i as f32 + 0.37) * 1.618_034).sin() * 3.7 + 1e-3 * i as f32).collect();
            let mut fast = x.clone();
            rotate_heads(&mut fast, n);
            let mut plain = x;
            plain.chunks_exact_mut(n).for_each(plain_butterflies);
            assert!(fast.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()), "head dim {n}");
        }
    }

    #[test]
    fn only_quantized_halves_with_power_of_two_heads_rotate() {
        assert!(Rotation::Quantized.applies(CacheType::Q4_0, 64));
        assert!(!Rotation::Quantized.applies(CacheType::F16, 64));
        assert!(!Rotation::Quantized.applies(CacheType::Q8_0, 96));
        assert!(!Rotation::Off.applies(CacheType::Q4_0, 64));
        assert!(Rotation::All.applies(CacheType::F32, 64) && !Rotation::All.applies(CacheType::F32, 48));
    }
}
