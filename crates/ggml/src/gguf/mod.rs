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
/// Metadata key holding the tensor data alignment in bytes (a power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// Why a GGUF file could not be read or written, or a key or tensor could not be had from it.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Opening, reading, seeking or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("{path}: not a GGUF file (magic {found:?}, expected \"GGUF\")")]
    BadMagic {
        /// The file being read.
        path: PathBuf,
        /// The four bytes found instead.
        found: [u8; 4],
    },

    /// A format version other than 2 or 3.
    #[error("{path}: GGUF version {version} is not supported (2 and 3 are)")]
    UnsupportedVersion {
        /// The file being read.
        path: PathBuf,
        /// The version number in the header.
        version: u32,
    },

    /// The file ends before a field it announces.
    #[error("{path}: file ends at byte {offset} while reading {what}")]
    Truncated {
        /// The file being read.
        path: PathBuf,
        /// The file's length in bytes, where reading stopped.
        offset: u64,
        /// The field being read ("the version", "the value of `key`").
        what: String,
    },

    /// A field that is present but invalid: a length past the end of the file, an unknown type id, a
    /// duplicate key or tensor, a misaligned or overflowing tensor.
    #[error("{path}: at byte {offset}: {why}")]
    Malformed {
        /// The file being read.
        path: PathBuf,
        /// Byte offset of the key, value or tensor info at fault.
        offset: u64,
        /// What is wrong there.
        why: String,
    },

    /// A required metadata key is absent.
    #[error("metadata key `{key}` is missing")]
    MissingKey {
        /// The key asked for.
        key: String,
    },

    /// A metadata value that does not convert to the type asked for.
    #[error("metadata key `{key}` has type {found}, expected {expected}")]
    WrongType {
        /// The key asked for.
        key: String,
        /// What the caller needed ("an integer fitting u32", "a power of two").
        expected: &'static str,
        /// The value's GGUF type (or the value itself, for a bad alignment).
        found: String,
    },

    /// No tensor of that name is in the file.
    #[error("tensor `{name}` is missing")]
    MissingTensor {
        /// The tensor name asked for.
        name: String,
    },

    /// A tensor that cannot be read or added: unsupported type, partial blocks, wrong data size, bad shape.
    #[error("tensor `{name}`: {why}")]
    Tensor {
        /// The tensor's GGUF name.
        name: String,
        /// What is wrong with it.
        why: String,
    },

    /// A tensor stored in a type the caller cannot use.
    #[error("tensor `{name}` has type {dtype}, which {why}")]
    TensorType {
        /// The tensor's GGUF name.
        name: String,
        /// The type it is stored in.
        dtype: DType,
        /// The use the type rules out.
        why: &'static str,
    },
}

/// Result of GGUF reading, writing and metadata look-ups.
pub type GgufResult<T> = std::result::Result<T, GgufError>;
