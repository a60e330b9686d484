//! Errors of the safe wrapper: each names the operation and the shapes or types that were refused.

use crate::DType;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A tensor shape as ggml orders it (`ne[0]` is the contiguous dimension).
pub type Shape = [i64; 4];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {why} (shapes {shapes:?})")]
    Shape { op: &'static str, why: String, shapes: Vec<Shape> },

    #[error("{op}: type {got} is not supported here ({why})")]
    Type { op: &'static str, got: DType, why: &'static str },

    #[error("ggml type id {0} is not known to this wrapper")]
    UnknownType(u32),

    #[error("{op}: a row of {row_len} elements is not a whole number of {dtype} blocks of {block}")]
    BlockAlignment { op: &'static str, dtype: DType, row_len: i64, block: i64 },

    #[error("{op}: buffer holds {got} bytes, the tensor needs {expected}")]
    DataSize { op: &'static str, expected: usize, got: usize },

    #[error("{op}: the tensor has no memory yet (allocate its context or graph first)")]
    NotAllocated { op: &'static str },

    #[error("ggml could not allocate {what} ({bytes} bytes)")]
    Allocation { what: &'static str, bytes: usize },

    #[error("graph compute failed with ggml status {0}")]
    Compute(i32),

    #[error("graph is full: it holds at most {capacity} nodes")]
    GraphFull { capacity: usize },

    #[error("invalid argument to {op}: {why}")]
    Invalid { op: &'static str, why: String },
}

impl Error {
    pub(crate) fn shape(op: &'static str, why: impl Into<String>, shapes: &[Shape]) -> Self {
        Error::Shape { op, why: why.into(), shapes: shapes.to_vec() }
    }

    pub(crate) fn invalid(op: &'static str, why: impl Into<String>) -> Self {
        Error::Invalid { op, why: why.into() }
    }
}
