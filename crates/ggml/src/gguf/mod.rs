//! GGUF files, read and written in Rust: the container is parsed and checked here (bounded
//! allocations, every offset and size verified) so that no file reaches ggml's C parser unchecked.

mod reader;
mod value;
mod writer;

pub use reader::{GgufFile, TensorInfo};
pub use value::{FromValue, Value, ValueType};
pub use writer::GgufWriter;

use std::path::PathBuf;

use crate::DType;

/// "GGUF" read as a little-endian u32.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const ALIGNMENT_KEY: &str = "general.alignment";

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: not a GGUF file (magic {found:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },

    #[error("{path}: GGUF version {version} is not supported (2 and 3 are)")]
    UnsupportedVersion { path: PathBuf, version: u32 },

    #[error("{path}: file ends at byte {offset} while reading {what}")]
    Truncated { path: PathBuf, offset: u64, what: String },

    #[error("{path}: at byte {offset}: {why}")]
    Malformed { path: PathBuf, offset: u64, why: String },

    #[error("metadata key `{key}` is missing")]
    MissingKey { key: String },

    #[error("metadata key `{key}` has type {found}, expected {expected}")]
    WrongType { key: String, expected: &'static str, found: String },

    #[error("tensor `{name}` is missing")]
    MissingTensor { name: String },

    #[error("tensor `{name}`: {why}")]
    Tensor { name: String, why: String },

    #[error("tensor `{name}` has type {dtype}, which {why}")]
    TensorType { name: String, dtype: DType, why: &'static str },
}

pub type GgufResult<T> = std::result::Result<T, GgufError>;
