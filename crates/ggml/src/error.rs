//! Errors of the safe wrapper: each names the operation and the shapes or types that were refused.

use crate::DType;

/// Result of the safe wrapper's fallible calls, with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A tensor shape as ggml orders it (`ne[0]` is the contiguous dimension).
pub type Shape = [i64; 4];

/// Why a ggml call was refused or failed, checked before ggml could abort the process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Operand shapes the op cannot combine.
    #[error("{op}: {why} (shapes {shapes:?})")]
    Shape {
        /// The op that refused the shapes.
        op: &'static str,
        /// Which rule the shapes broke.
        why: String,
        /// Every operand's shape, in argument order.
        shapes: Vec<Shape>,
    },

    /// An element type the op (or ggml's CPU backend) does not handle.
    #[error("{op}: type {got} is not supported here ({why})")]
    Type {
        /// The op that refused the type.
        op: &'static str,
        /// The type it was given.
        got: DType,
        /// What that type lacks for this op.
        why: &'static str,
    },

    /// A raw ggml type id (from a file or a tensor header) with no [`DType`] variant.
    #[error("ggml type id {0} is not known to this wrapper")]
    UnknownType(u32),

    /// A row length that is not a multiple of a block type's block size.
    #[error("{op}: a row of {row_len} elements is not a whole number of {dtype} blocks of {block}")]
    BlockAlignment {
        /// The op that needed whole blocks.
        op: &'static str,
        /// The block type of the row.
        dtype: DType,
        /// Elements in the row (`ne[0]`).
        row_len: i64,
        /// Elements per block of `dtype`.
        block: i64,
    },

    /// A host buffer whose length does not match the tensor's size in bytes.
    #[error("{op}: buffer holds {got} bytes, the tensor needs {expected}")]
    DataSize {
        /// The op that copied data in or out.
        op: &'static str,
        /// Bytes the tensor holds.
        expected: usize,
        /// Bytes the caller's buffer holds.
        got: usize,
    },

    /// A tensor whose data pointer is still null, so it cannot be read or written.
    #[error("{op}: the tensor has no memory yet (allocate its context or graph first)")]
    NotAllocated {
        /// The op that needed the tensor's data.
        op: &'static str,
    },

    /// A context, tensor, graph or buffer did not fit its arena, or ggml returned null for it.
    #[error("ggml could not allocate {what} ({bytes} bytes)")]
    Allocation {
        /// What was being allocated (a context, a compute buffer, ...).
        what: &'static str,
        /// Size asked for, in bytes (0 where it is not known).
        bytes: usize,
    },

    /// `ggml_backend_graph_compute` returned a status other than success (the raw `ggml_status`).
    #[error("graph compute failed with ggml status {0}")]
    Compute(i32),

    /// Expanding the graph would pass the node capacity it was created with.
    #[error("graph is full: it holds at most {capacity} nodes")]
    GraphFull {
        /// Most nodes the graph can hold.
        capacity: usize,
    },

    /// Any other argument the op refuses (out of range, overflowing, inconsistent).
    #[error("invalid argument to {op}: {why}")]
    Invalid {
        /// The op that refused the argument.
        op: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

impl Error {
    pub(crate) fn shape(op: &'static str, why: impl Into<String>, shapes: &[Shape]) -> Self {
        Error::Shape { op, why: why.into(), shapes: shapes.to_vec() }
    }

    pub(crate) fn invalid(op: &'static str, why: impl Into<String>) -> Self {
        Error::Invalid { op, why: why.into() }
    }
}
