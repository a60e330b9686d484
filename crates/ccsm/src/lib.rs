//! ccsm: CSM-1B and Llama inference on ggml with a quantized KV cache.
#![forbid(unsafe_code)]

pub mod attention;
pub mod audio_in;
mod cache_role;
mod cache_type;
pub mod calibrate;
pub mod chat;
pub mod csm;
pub mod engine;
mod error;
#[cfg(feature = "fuzzing")]
pub mod exercise;
pub mod generate;
mod ggml_model;
pub mod kv_cache;
pub mod kv_plan;
pub mod llama;
mod load;
pub mod memory;
pub mod mimi;
mod model;
pub mod perplexity;
mod placement;
pub mod prefix_cache;
pub mod profile;
pub mod sampling;
pub mod tokenizer;
mod trained_context;
pub mod wav;
pub mod weights;

pub use cache_role::CacheRole;
pub use cache_type::CacheType;
pub use error::{Error, Result};
pub use ggml_model::GGMLModel;
pub use load::{inspect, load_model, load_model_placed, AnyModel, Architecture, CacheShape, ModelFacts, DEFAULT_CTX_CAP};
pub use model::{CacheReport, Logits, Model, ModelOptions};
pub use placement::{device_cache_budget, device_cache_types, Placement, DEVICE_CACHE_SHARE};

/// The engine's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
