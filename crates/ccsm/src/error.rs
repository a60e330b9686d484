//! Errors of the engine library.

use std::path::PathBuf;

use crate::CacheType;

/// A result whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong loading a model, building a cache or running the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or parsing a GGUF file failed.
    #[error(transparent)]
    Gguf(#[from] ggml::gguf::GgufError),

    /// A ggml call (context, backend, graph or buffer) failed.
    #[error("ggml: {0}")]
    Ggml(#[from] ggml::Error),

    /// The file's `general.architecture` is not one this loader accepts.
    #[error("{path}: architecture `{found}` is not supported here (expected {expected})")]
    Architecture {
        /// The model file that was opened.
        path: String,
        /// The architecture the file declares.
        found: String,
        /// The architecture(s) that would have been accepted.
        expected: &'static str,
    },

    /// A metadata key is missing, has the wrong type, or holds an unusable value.
    #[error("metadata `{key}`: {why}")]
    Config {
        /// The full GGUF metadata key, e.g. `llama.block_count`.
        key: String,
        /// What is wrong with it.
        why: String,
    },

    /// A tensor's dimensions differ from what the model's config implies.
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        /// The GGUF tensor name.
        name: String,
        /// The shape the config implies (ggml order, innermost first).
        expected: Vec<i64>,
        /// The shape stored in the file.
        found: Vec<i64>,
    },

    /// A tensor is stored in a type it cannot be used as (e.g. as a weight matrix or read as f32).
    #[error("tensor `{name}`: type {dtype} {why}")]
    TensorType {
        /// The GGUF tensor name.
        name: String,
        /// The type the tensor is stored in.
        dtype: ggml::DType,
        /// The use the type rules out.
        why: &'static str,
    },

    /// A KV cache could not be built with these types and sizes (bad row size, zero capacity, overflow).
    #[error("KV cache: {k}/{v} cache refused: {why}")]
    CacheLayout {
        /// The K cache type asked for.
        k: CacheType,
        /// The V cache type asked for.
        v: CacheType,
        /// Why the layout was refused.
        why: String,
    },

    /// An error raised for one layer's K or V half of a KV cache (see [`Error::in_layer`]).
    #[error("KV cache layer {layer} ({half}): {source}")]
    InLayer {
        /// The layer index, from 0.
        layer: usize,
        /// Which half: `"k"` or `"v"`.
        half: &'static str,
        /// The error itself.
        source: Box<Error>,
    },

    /// Appending tokens would need more cells than the KV cache has.
    #[error("KV cache is full: {needed} cells needed, capacity {capacity}")]
    CacheFull {
        /// Cells the cache would have to hold after the append.
        needed: usize,
        /// Cells the cache has.
        capacity: usize,
    },

    /// A KV memory budget is below the smallest cache the planner can build.
    #[error("a KV budget of {budget} bytes cannot hold even a minimal cache ({minimum} bytes: q4_0, {min_cells} cells)")]
    BudgetTooSmall {
        /// The budget given, in bytes.
        budget: usize,
        /// The smallest cache in bytes: every layer q4_0 with `min_cells` cells.
        minimum: usize,
        /// Cells in that smallest cache.
        min_cells: usize,
    },

    /// A token id is not below the vocabulary size.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The offending token id.
        id: u32,
        /// The vocabulary size; valid ids are `0..vocab`.
        vocab: usize,
    },

    /// A call was given nothing to work on (no tokens, no sequences, no layers); says what was empty.
    #[error("nothing to evaluate: {0}")]
    EmptyInput(&'static str),

    /// The tokenizer metadata is unusable or does not match the model (kind, vocabulary, BOS/EOS ids).
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A KL-divergence reference file is malformed: wrong magic, truncated, or inconsistent contents.
    #[error("{}: not a usable KL reference file: {why}", path.display())]
    KlReference {
        /// The reference file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },

    /// Something the engine guarantees did not hold: a bug, reported instead of a panic.
    #[error("internal error (a bug in ccsm): {0}")]
    Invariant(String),

    /// A context (cache cells) the model cannot take: none, or more than it was trained for.
    #[error("invalid input: context {requested} must be between 1 and the model's {max}")]
    ContextOutOfRange {
        /// Cells asked for.
        requested: usize,
        /// The model's trained context.
        max: usize,
    },

    /// A frame step for a session whose prompt has not run yet (prefill it first).
    #[error("invalid input: a frame before the session's backbone step (prefill it first)")]
    NotPrefilled,

    /// A frame of codes the model or the codec cannot take (wrong number of codes, a code too large).
    #[error("invalid input: {why}")]
    BadFrame {
        /// Its place in the input (0-based; for a codec stream, counted from the stream's start).
        index: usize,
        /// What is wrong, naming the frame.
        why: String,
    },

    /// Planned cache types without the sensitivity profile the planner needs (`ccsm-infer calibrate`).
    #[error("invalid input: planned cache types need a sensitivity profile")]
    NeedsProfile,

    /// Something only text models' caches take (per-layer types, plans, a recent window), asked of
    /// another model.
    #[error("invalid input: {what} are for text models")]
    TextModelsOnly {
        /// What was asked.
        what: &'static str,
    },

    /// An audio file or upload that cannot be read: not a format this engine reads, corrupt, too long,
    /// or holding no usable samples.
    #[error("{what}: {why}")]
    Audio {
        /// The file (or upload) it is.
        what: String,
        /// What is wrong with it.
        why: String,
    },

    /// A cached-prefix file that is not used: another model's, another cache shape's, truncated,
    /// altered or not a prefix file at all.
    #[error("prefix file {}: {why}", path.display())]
    PrefixFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why it is refused.
        why: String,
    },

    /// A caller's argument is out of range or inconsistent (a bad layer index, batch size, context size).
    #[error("invalid input: {0}")]
    Input(String),
}
