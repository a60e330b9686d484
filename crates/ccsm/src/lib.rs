//! ccsm: CSM-1B and Llama inference on ggml with a quantized KV cache.
#![forbid(unsafe_code)]

/// The engine's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
