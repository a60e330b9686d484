//! Errors of the engine library.

use std::path::PathBuf;

use crate::CacheType;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gguf(#[from] ggml::gguf::GgufError),

    #[error("ggml: {0}")]
    Ggml(#[from] ggml::Error),

    #[error("{path}: architecture `{found}` is not supported here (expected {expected})")]
    Architecture { path: String, found: String, expected: &'static str },

    #[error("metadata `{key}`: {why}")]
    Config { key: String, why: String },

    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    TensorShape { name: String, expected: Vec<i64>, found: Vec<i64> },

    #[error("tensor `{name}`: type {dtype} {why}")]
    TensorType { name: String, dtype: ggml::DType, why: &'static str },

    #[error("KV cache: {k}/{v} cache refused: {why}")]
    CacheLayout { k: CacheType, v: CacheType, why: String },

    #[error("KV cache layer {layer} ({half}): {source}")]
    InLayer { layer: usize, half: &'static str, source: Box<Error> },

    #[error("KV cache is full: {needed} cells needed, capacity {capacity}")]
    CacheFull { needed: usize, capacity: usize },

    #[error("a KV budget of {budget} bytes cannot hold even a minimal cache ({minimum} bytes: q4_0, {min_cells} cells)")]
    BudgetTooSmall { budget: usize, minimum: usize, min_cells: usize },

    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },

    #[error("nothing to evaluate: {0}")]
    EmptyInput(&'static str),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: not a usable KL reference file: {why}", path.display())]
    KlReference { path: PathBuf, why: String },

    /// Something the engine guarantees did not hold: a bug, reported instead of a panic.
    #[error("internal error (a bug in ccsm): {0}")]
    Invariant(String),

    #[error("invalid input: {0}")]
    Input(String),
}

impl Error {
    /// This error, said of one layer's half of a KV cache.
    pub fn in_layer(self, layer: usize, half: crate::kv_cache::Half) -> Error {
        Error::InLayer { layer, half: half.name(), source: Box::new(self) }
    }
}
