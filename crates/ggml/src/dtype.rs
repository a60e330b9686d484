//! Element types, with block geometry taken from ggml itself, and row quantization.

use std::fmt;
use std::str::FromStr;

use ggml_sys as sys;

use crate::error::{Error, Result};

/// The ggml element types this engine reads, writes or computes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE half float.
    F16,
    /// bfloat16: the top 16 bits of an f32 (same exponent range, 8-bit mantissa).
    BF16,
    /// 8-bit integers times a per-block f16 scale, blocks of 32 (8.5 bits).
    Q8_0,
    /// 8-bit integers with a per-block f16 scale and sum, blocks of 32 (9 bits); ggml's matmul
    /// intermediate for Q4_1/Q5_1.
    Q8_1,
    /// 4-bit integers times a per-block f16 scale, blocks of 32 (4.5 bits).
    Q4_0,
    /// 4-bit integers with a per-block f16 scale and minimum, blocks of 32 (5 bits).
    Q4_1,
    /// 5-bit integers times a per-block f16 scale, blocks of 32 (5.5 bits).
    Q5_0,
    /// 5-bit integers with a per-block f16 scale and minimum, blocks of 32 (6 bits).
    Q5_1,
    /// 4-bit non-linear (a fixed 16-value grid times a per-block f16 scale), blocks of 32.
    IQ4NL,
    /// OCP microscaling FP4: E2M1 values times a power-of-two (E8M0) scale per block of 32 (4.25 bits).
    MXFP4,
    /// k-quant: 2-bit values with 4-bit sub-block scales and minimums, super-blocks of 256 (2.625 bits).
    Q2K,
    /// k-quant: 3-bit values with 6-bit sub-block scales, super-blocks of 256 (3.4375 bits).
    Q3K,
    /// k-quant: 4-bit values with 6-bit sub-block scales and minimums, super-blocks of 256 (4.5 bits).
    Q4K,
    /// k-quant: 5-bit values with 6-bit sub-block scales and minimums, super-blocks of 256 (5.5 bits).
    Q5K,
    /// k-quant: 6-bit values with 8-bit sub-block scales, super-blocks of 256 (6.5625 bits).
    Q6K,
    /// k-quant: 8-bit values with an f32 scale and block sums, super-blocks of 256; ggml's matmul
    /// intermediate for the other k-quants, not a storage type.
    Q8K,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer (row indices, positions).
    I32,
    /// Signed 64-bit integer.
    I64,
    /// 64-bit IEEE float.
    F64,
}

/// Every variant, for tables and tests.
pub const ALL_DTYPES: [DType; 22] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q8_0,
    DType::Q8_1,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::IQ4NL,
    DType::MXFP4,
    DType::Q2K,
    DType::Q3K,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
    DType::Q8K,
    DType::I8,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::F64,
];

impl DType {
    /// The matching `ggml_type` id, for calls into ggml.
    pub fn to_sys(self) -> sys::ggml_type {
        match self {
            DType::F32 => sys::GGML_TYPE_F32,
            DType::F16 => sys::GGML_TYPE_F16,
            DType::BF16 => sys::GGML_TYPE_BF16,
            DType::Q8_0 => sys::GGML_TYPE_Q8_0,
            DType::Q8_1 => sys::GGML_TYPE_Q8_1,
            DType::Q4_0 => sys::GGML_TYPE_Q4_0,
            DType::Q4_1 => sys::GGML_TYPE_Q4_1,
            DType::Q5_0 => sys::GGML_TYPE_Q5_0,
            DType::Q5_1 => sys::GGML_TYPE_Q5_1,
            DType::IQ4NL => sys::GGML_TYPE_IQ4_NL,
            DType::MXFP4 => sys::GGML_TYPE_MXFP4,
            DType::Q2K => sys::GGML_TYPE_Q2_K,
            DType::Q3K => sys::GGML_TYPE_Q3_K,
            DType::Q4K => sys::GGML_TYPE_Q4_K,
            DType::Q5K => sys::GGML_TYPE_Q5_K,
            DType::Q6K => sys::GGML_TYPE_Q6_K,
            DType::Q8K => sys::GGML_TYPE_Q8_K,
            DType::I8 => sys::GGML_TYPE_I8,
            DType::I16 => sys::GGML_TYPE_I16,
            DType::I32 => sys::GGML_TYPE_I32,
            DType::I64 => sys::GGML_TYPE_I64,
            DType::F64 => sys::GGML_TYPE_F64,
        }
    }

    /// The variant for a raw `ggml_type` id; [`Error::UnknownType`] for ids this wrapper does not list.
    pub fn from_sys(id: sys::ggml_type) -> Result<Self> {
        ALL_DTYPES.iter().copied().find(|t| t.to_sys() == id).ok_or(Error::UnknownType(id))
    }

    /// Elements per block (1 for plain types, 32 for Q8_0/Q4_0/Q4_1, 256 for k-quants).
    pub fn block_size(self) -> usize {
        // SAFETY: ggml_blck_size only indexes ggml's static type-traits table with a valid type id.
        unsafe { sys::ggml_blck_size(self.to_sys()) as usize }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        // SAFETY: as above, a table lookup with a valid type id.
        unsafe { sys::ggml_type_size(self.to_sys()) }
    }

    /// Bytes of a row of `n` elements; `n` must be a multiple of the block size.
    pub fn row_size(self, n: usize) -> Result<usize> {
        let block = self.block_size();
        if !n.is_multiple_of(block) {
            return Err(Error::BlockAlignment {
                op: "row_size",
                dtype: self,
                row_len: i64::try_from(n).unwrap_or(i64::MAX),
                block: block as i64,
            });
        }
        (n / block)
            .checked_mul(self.type_size())
            .ok_or_else(|| Error::invalid("row_size", format!("a row of {n} {self} elements overflows")))
    }

    /// Whether ggml treats this as a block-quantized type (false for the float and integer types).
    pub fn is_quantized(self) -> bool {
        // SAFETY: a table lookup with a valid type id.
        unsafe { sys::ggml_is_quantized(self.to_sys()) }
    }

    /// Bits per element, from the block geometry.
    pub fn bits_per_element(self) -> f64 {
        self.type_size() as f64 * 8.0 / self.block_size() as f64
    }

    /// Errors unless a row of `row_len` elements is a whole number of blocks.
    pub fn check_row_len(self, op: &'static str, row_len: i64) -> Result<()> {
        let block = self.block_size() as i64;
        if row_len % block != 0 {
            return Err(Error::BlockAlignment { op, dtype: self, row_len, block });
        }
        Ok(())
    }

    /// ggml's lower-case name ("q8_0", "f16").
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q8_1 => "q8_1",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::IQ4NL => "iq4_nl",
            DType::MXFP4 => "mxfp4",
            DType::Q2K => "q2_K",
            DType::Q3K => "q3_K",
            DType::Q4K => "q4_K",
            DType::Q5K => "q5_K",
            DType::Q6K => "q6_K",
            DType::Q8K => "q8_K",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::F64 => "f64",
        }
    }

    /// Whether ggml can turn F32 rows into this type (the quantize direction).
    pub fn can_quantize_from_f32(self) -> bool {
        matches!(
            self,
            DType::F32
                | DType::F16
                | DType::BF16
                | DType::Q8_0
                | DType::Q4_0
                | DType::Q4_1
                | DType::Q5_0
                | DType::Q5_1
                | DType::IQ4NL
                | DType::MXFP4
        ) || matches!(self, DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K)
    }

    /// Whether ggml can turn this type back into F32 values.
    pub fn can_dequantize(self) -> bool {
        // SAFETY: ggml_get_type_traits returns a pointer into a static table, valid for any type id.
        let traits = unsafe { &*sys::ggml_get_type_traits(self.to_sys()) };
        self == DType::F32 || traits.to_float.is_some()
    }

    /// Quantizes `values` (rows of `row_len` elements) into this type's bytes, as ggml does on write.
    pub fn quantize(self, values: &[f32], row_len: usize) -> Result<Vec<u8>> {
        const OP: &str = "quantize";
        if !self.can_quantize_from_f32() {
            return Err(Error::Type { op: OP, got: self, why: "no quantizer from f32 for this type" });
        }
        if row_len == 0 || !values.len().is_multiple_of(row_len) {
            return Err(Error::invalid(OP, format!("{} values are not whole rows of {row_len}", values.len())));
        }
        let row_bytes = self.row_size(row_len)?;
        let rows = values.len() / row_len;
        let mut out = vec![0u8; rows * row_bytes];
        if self == DType::F32 {
            out.iter_mut().zip(values.iter().flat_map(|v| v.to_le_bytes())).for_each(|(o, b)| *o = b);
            return Ok(out);
        }
        // The CPU backend's row quantizer, the one its graph writes (set_rows, cpy) use: for IQ4_NL it
        // differs from ggml_quantize_chunk's (which searches the block scale), and cache bytes written by
        // a step must equal those a live conversion writes.
        // SAFETY: ggml's CPU type traits are a static table, valid for any type id.
        let from_float = unsafe { (*sys::ggml_get_type_traits_cpu(self.to_sys())).from_float };
        if let Some(from_float) = from_float {
            for (src, dst) in values.chunks_exact(row_len).zip(out.chunks_exact_mut(row_bytes)) {
                // SAFETY: `src` holds row_len floats (a whole number of blocks) and `dst` the row_bytes
                // bytes of one row of this type: what the row quantizer reads and writes.
                unsafe { from_float(src.as_ptr(), dst.as_mut_ptr().cast(), row_len as i64) };
            }
            return Ok(out);
        }
        // SAFETY: `values` holds rows*row_len floats and `out` rows*row_bytes bytes, exactly what
        // ggml_quantize_chunk reads and writes for these arguments; row_len is a whole number of
        // blocks (checked by row_size) and the type needs no importance matrix (checked above).
        let written = unsafe {
            sys::ggml_quantize_chunk(
                self.to_sys(),
                values.as_ptr(),
                out.as_mut_ptr().cast(),
                0,
                rows as i64,
                row_len as i64,
                std::ptr::null(),
            )
        };
        debug_assert_eq!(written, out.len());
        Ok(out)
    }

    /// Dequantizes `n` elements of this type from `bytes` into F32.
    pub fn dequantize(self, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
        const OP: &str = "dequantize";
        let expected = self.row_size(n)?;
        if bytes.len() != expected {
            return Err(Error::DataSize { op: OP, expected, got: bytes.len() });
        }
        if self == DType::F32 {
            return Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
        }
        // SAFETY: static table lookup with a valid type id.
        let traits = unsafe { &*sys::ggml_get_type_traits(self.to_sys()) };
        let to_float = traits.to_float.ok_or(Error::Type { op: OP, got: self, why: "no dequantizer" })?;
        let mut out = vec![0f32; n];
        // SAFETY: `bytes` holds exactly the row_size(n) bytes of n elements and `out` has room for n floats.
        unsafe { to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), n as i64) };
        Ok(out)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        ALL_DTYPES.iter().copied().find(|t| t.name().eq_ignore_ascii_case(s)).ok_or_else(|| format!("unknown ggml type `{s}`"))
    }
}

/// An IEEE half's value (exact). One conversion for every kernel of ours that reads f16 scales or
/// rows (split attention's rows, the few-columns and VNNI products).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if frac == 0 => sign,
        0 => {
            // Subnormal: normalize.
            let shift = frac.leading_zeros() - 21;
            sign | ((127 - 15 - shift + 1) << 23) | ((frac << (shift + 13)) & 0x7f_ffff)
        }
        31 => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod half_tests {
    use super::*;

    /// Every half converts as ggml's own F16 dequantizer converts it.
    #[test]
    fn halves_convert_exactly() {
        for bits in 0..=u16::MAX {
            let want = DType::F16.dequantize(&bits.to_le_bytes(), 1).unwrap()[0];
            let got = f16_to_f32(bits);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{bits:#06x}: {got} vs {want}");
        }
    }
}
