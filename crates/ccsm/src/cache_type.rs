//! The element types a KV cache can hold.

use std::fmt;
use std::str::FromStr;

use ggml::DType;

/// A KV cache element type: f32, f16, q8_0, q5_1, q5_0, q4_1, q4_0 or iq4_nl (all in blocks of 32
/// elements or single elements, so a head of 64 is always whole blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CacheType {
    /// Full precision (32 bits): the reference every quantized cache is measured against.
    F32,
    /// Half precision (16 bits), the default.
    #[default]
    F16,
    /// 8-bit values with one f16 scale per block of 32 (8.5 bits).
    Q8_0,
    /// 4-bit values with one f16 scale per block of 32 (4.5 bits).
    Q4_0,
    /// 4-bit values with an f16 scale and minimum per block of 32 (5 bits).
    Q4_1,
    /// 5-bit values with one f16 scale per block of 32 (5.5 bits).
    Q5_0,
    /// 5-bit values with an f16 scale and minimum per block of 32 (6 bits).
    Q5_1,
    /// 4-bit indices into a non-linear table, one f16 scale per block of 32 (4.5 bits).
    IQ4NL,
    /// OCP microscaling FP4 (4.25 bits): for halves the planner finds cheap.
    MXFP4,
}

impl CacheType {
    /// Every cache type.
    pub const ALL: [CacheType; 9] = [
        CacheType::F32,
        CacheType::F16,
        CacheType::Q8_0,
        CacheType::Q4_0,
        CacheType::Q4_1,
        CacheType::Q5_0,
        CacheType::Q5_1,
        CacheType::IQ4NL,
        CacheType::MXFP4,
    ];

    /// The ggml type the cache's tensors are stored in.
    pub fn dtype(self) -> DType {
        match self {
            CacheType::F32 => DType::F32,
            CacheType::F16 => DType::F16,
            CacheType::Q8_0 => DType::Q8_0,
            CacheType::Q4_0 => DType::Q4_0,
            CacheType::Q4_1 => DType::Q4_1,
            CacheType::Q5_0 => DType::Q5_0,
            CacheType::Q5_1 => DType::Q5_1,
            CacheType::IQ4NL => DType::IQ4NL,
            CacheType::MXFP4 => DType::MXFP4,
        }
    }

    /// ggml's name for the type (`f16`, `q8_0`, …), as the command line spells it.
    pub fn name(self) -> &'static str {
        self.dtype().name()
    }

    /// Whether the type is block-quantized (anything but f32 and f16).
    pub fn is_quantized(self) -> bool {
        self.dtype().is_quantized()
    }
}

impl fmt::Display for CacheType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for CacheType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for CacheType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for CacheType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(t) = CacheType::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s)) {
            return Ok(t);
        }
        let names: Vec<&str> = CacheType::ALL.iter().map(|t| t.name()).collect();
        match s.parse::<DType>() {
            // K-quants (q2_K … q8_K) store 256-element blocks; a cache row is cut into heads of 64 for
            // attention, and a head cannot start inside a block.
            Ok(d) if d.block_size() == 256 => Err(format!(
                "cache type `{s}` is a k-quant: it stores blocks of 256 elements, and a KV head of 64 elements cannot be cut from one; use one of {}",
                names.join(", ")
            )),
            _ => Err(format!("unknown cache type `{s}` (expected one of {})", names.join(", "))),
        }
    }
}
