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
        DType::Q4_1 => DType::Q8_1,
        _ => DType::Q8_0,
    }
}

/// The cache and weight types the engine uses everywhere.
pub const CACHE_TYPES: [DType; 5] = [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1];

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
/// the same nibbles (x = q·d + m).
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
        other => panic!("no reference decoder for {other}"),
    };
    values.into_iter().take(n).collect()
}

fn nibble(qs: &[u8], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0f
    } else {
        qs[i - 16] >> 4
    }
}
