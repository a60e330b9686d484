//! The element types a KV cache can hold.

use std::fmt;
use std::str::FromStr;

use ggml::DType;

/// A KV cache element type: f32, f16, q8_0, q4_0 or q4_1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CacheType {
    F32,
    #[default]
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl CacheType {
    pub const ALL: [CacheType; 5] = [CacheType::F32, CacheType::F16, CacheType::Q8_0, CacheType::Q4_0, CacheType::Q4_1];

    pub fn dtype(self) -> DType {
        match self {
            CacheType::F32 => DType::F32,
            CacheType::F16 => DType::F16,
            CacheType::Q8_0 => DType::Q8_0,
            CacheType::Q4_0 => DType::Q4_0,
            CacheType::Q4_1 => DType::Q4_1,
        }
    }

    pub fn name(self) -> &'static str {
        self.dtype().name()
    }

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

impl FromStr for CacheType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CacheType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown cache type `{s}` (expected one of f32, f16, q8_0, q4_0, q4_1)"))
    }
}
