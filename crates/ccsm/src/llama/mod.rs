//! The Llama transformer: one stack type serving text models and both CSM transformers.

mod config;
mod names;
mod text_model;
pub(crate) mod transformer;

pub use config::{Llama3Scaling, LlamaConfig, RopeConfig};
pub use names::{BlockTensor, StackNames, OUTPUT, ROPE_FREQS, TOKEN_EMBD};
pub use text_model::LlamaModel;
pub use transformer::Transformer;
