//! Test helpers: a seeded RNG and per-element error bounds derived from each block format.
#![allow(dead_code)]

use ggml::DType;

/// SplitMix64: tiny, seeded, portable.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// Relative rounding error of f16 (10 stored mantissa bits, round to nearest).
pub const F16_REL: f32 = 1.0 / 2048.0;
/// Half the spacing of f16 subnormals: the absolute error floor of storing a tiny scale in f16.
pub const F16_ABS: f32 = 1.0 / (1u32 << 25) as f32;

/// Largest error ggml's block formats allow for each element of `row` after a quantize →
/// dequantize round trip, derived from the formats (not measured):
/// - Q8_0: d = amax/127 stored in f16, q = round(x/d): |e| ≤ d/2 + 127·|d − f16(d)|.
/// - Q4_0: d = m/−8 (m the value of largest magnitude) in f16, q = min(15, ⌊x/d + 8.5⌋): |e| ≤ |d|/2
///   where |x| ≤ 7.5|d|, else |d| (the clamp at 15), plus 8·|d − f16(d)|.
/// - Q4_1: d = (max − min)/15 and min in f16, q = min(15, ⌊(x − min)/d + 0.5⌋): |e| ≤ d/2 +
///   15·|d − f16(d)| + |min − f16(min)|.
/// - Q5_0: d = m/−16 in f16, q = min(31, ⌊x/d + 16.5⌋): |e| ≤ |d|/2 where |x| ≤ 15.5|d|, else |d|,
///   plus 16·|d − f16(d)|.
/// - Q5_1: d = (max − min)/31 and min in f16: |e| ≤ d/2 + 31·|d − f16(d)| + |min − f16(min)|.
/// - IQ4_NL: x ≈ d·g with g on a fixed grid of 16 values in [−127, 113] and d searched by ggml around
///   amax/127: not tight; the grid's widest gap is 24, so with d ≤ amax/100, |e| ≤ 12·amax/100 over
///   the grid and at most the clamp beyond it: |e| ≤ 0.2·amax (a loose but format-derived bound).
/// - MXFP4: x ≈ g·2^(⌊log₂ amax⌋ − 3) with g the nearest of ±{0, 1, 2, 3, 4, 6, 8, 12}: the widest gap
///   (8 → 12) gives half of 4 steps within the grid, and amax < 2^(⌊log₂ amax⌋+1) exceeds the largest
///   value 12 steps by less than 4 steps: |e| ≤ 4 steps = 2^(⌊log₂ amax⌋ − 1).
/// - F16: |e| ≤ |x|·2⁻¹¹ (+ subnormal floor); BF16: |x|·2⁻⁸; F32: exact.
pub fn element_error_bounds(dtype: DType, row: &[f32]) -> Vec<f32> {
    let f16_err = |v: f32| v.abs() * F16_REL + F16_ABS;
    match dtype {
        DType::F32 => vec![0.0; row.len()],
        DType::F16 => row.iter().map(|&x| f16_err(x)).collect(),
        DType::BF16 => row.iter().map(|&x| x.abs() / 256.0 + 1e-38).collect(),
        DType::Q8_0 | DType::Q8_1 => per_block(row, |block| {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = amax / 127.0;
            let e = d / 2.0 + 127.0 * f16_err(d);
            vec![e; block.len()]
        }),
        DType::Q4_0 => per_block(row, |block| {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = amax / 8.0;
            block.iter().map(|&x| if x.abs() <= 7.5 * d { d / 2.0 } else { d } + 8.0 * f16_err(d)).collect()
        }),
        DType::Q4_1 => per_block(row, |block| {
            let min = block.iter().copied().fold(f32::INFINITY, f32::min);
            let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            vec![d / 2.0 + 15.0 * f16_err(d) + f16_err(min); block.len()]
        }),
        DType::Q5_0 => per_block(row, |block| {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = amax / 16.0;
            block.iter().map(|&x| if x.abs() <= 15.5 * d { d / 2.0 } else { d } + 16.0 * f16_err(d)).collect()
        }),
        DType::Q5_1 => per_block(row, |block| {
            let min = block.iter().copied().fold(f32::INFINITY, f32::min);
            let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 31.0;
            vec![d / 2.0 + 31.0 * f16_err(d) + f16_err(min); block.len()]
        }),
        DType::IQ4NL => per_block(row, |block| {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            vec![0.2 * amax + 127.0 * f16_err(amax / 127.0); block.len()]
        }),
        DType::MXFP4 => per_block(row, |block| {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let e = if amax > 0.0 { (2f32).powi(amax.log2().floor() as i32 - 1) } else { 0.0 };
            vec![e; block.len()]
        }),
        other => panic!("no derived bound for {other}"),
    }
}

fn per_block(row: &[f32], f: impl Fn(&[f32]) -> Vec<f32>) -> Vec<f32> {
    row.chunks(32).flat_map(f).collect()
}

/// The type ggml converts the f32 operand into before a dot product with a `weight` row.
pub fn vec_dot_type(weight: DType) -> DType {
    match weight {
        DType::F32 => DType::F32,
        DType::F16 => DType::F16,
        DType::Q4_1 | DType::Q5_1 => DType::Q8_1,
        _ => DType::Q8_0,
    }
}

/// The cache and weight types the engine uses everywhere.
pub const CACHE_TYPES: [DType; 9] =
    [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::IQ4NL, DType::MXFP4];

/// MXFP4's values in units of its scale (ggml's `kvalues_mxfp4`: twice the E2M1 numbers).
const MXFP4_GRID: [f32; 16] = [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 0.0, -1.0, -2.0, -3.0, -4.0, -6.0, -8.0, -12.0];

/// IQ4_NL's grid (ggml's `kvalues_iq4nl`, the format's definition).
const IQ4_NL_GRID: [f32; 16] = [-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0, 1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0];

/// IEEE half to f32, written from the format (sign, 5-bit exponent, 10-bit mantissa).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h >> 15 == 1 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let mant = (h & 0x3ff) as f32;
    sign * match exp {
        0 => mant * (2f32).powi(-24),
        31 if mant == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        _ => (1.0 + mant / 1024.0) * (2f32).powi(exp - 15),
    }
}

/// Decodes `n` elements of `dtype` from their bytes, from the block layouts alone (independent of
/// ggml's dequantizers): Q8_0 = f16 d + 32 i8 (x = q·d); Q4_0 = f16 d + 16 bytes, element j in the
/// low nibble of byte j and element j+16 in the high nibble (x = (q − 8)·d); Q4_1 = f16 d + f16 m +
/// the same nibbles (x = q·d + m); Q5_0 = f16 d + 32 high bits (bit j of a u32 for element j) + the
/// nibbles (x = (q − 16)·d); Q5_1 = f16 d + f16 m + the same (x = q·d + m); IQ4_NL = f16 d + the
/// nibbles as grid indices (x = grid[q]·d); MXFP4 = an E8M0 exponent byte e + the nibbles as indices
/// into twice the E2M1 values (x = grid[q]·2^(e − 128)).
pub fn decode(dtype: DType, bytes: &[u8], n: usize) -> Vec<f32> {
    fn h(b: &[u8], at: usize) -> f32 {
        f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
    }
    let values: Vec<f32> = match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect(),
        DType::Q8_0 => bytes.chunks_exact(34).flat_map(|b| (0..32).map(move |i| b[2 + i] as i8 as f32 * h(b, 0))).collect(),
        DType::Q4_0 => bytes.chunks_exact(18).flat_map(|b| (0..32).map(move |i| (nibble(&b[2..], i) as f32 - 8.0) * h(b, 0))).collect(),
        DType::Q4_1 => bytes.chunks_exact(20).flat_map(|b| (0..32).map(move |i| nibble(&b[4..], i) as f32 * h(b, 0) + h(b, 2))).collect(),
        DType::Q5_0 => {
            bytes.chunks_exact(22).flat_map(|b| (0..32).map(move |i| (five_bits(&b[2..6], &b[6..], i) as f32 - 16.0) * h(b, 0))).collect()
        }
        DType::Q5_1 => {
            bytes.chunks_exact(24).flat_map(|b| (0..32).map(move |i| five_bits(&b[4..8], &b[8..], i) as f32 * h(b, 0) + h(b, 2))).collect()
        }
        DType::IQ4NL => {
            bytes.chunks_exact(18).flat_map(|b| (0..32).map(move |i| IQ4_NL_GRID[nibble(&b[2..], i) as usize] * h(b, 0))).collect()
        }
        DType::MXFP4 => bytes
            .chunks_exact(17)
            .flat_map(|b| (0..32).map(move |i| MXFP4_GRID[nibble(&b[1..], i) as usize] * (2f32).powi(b[0] as i32 - 128)))
            .collect(),
        other => panic!("no reference decoder for {other}"),
    };
    values.into_iter().take(n).collect()
}

/// Element i of a 5-bit block: its nibble and bit i of the little-endian u32 of high bits.
fn five_bits(qh: &[u8], qs: &[u8], i: usize) -> u8 {
    let high = (u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]) >> i) & 1;
    nibble(qs, i) | (high as u8) << 4
}

fn nibble(qs: &[u8], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0f
    } else {
        qs[i - 16] >> 4
    }
}
