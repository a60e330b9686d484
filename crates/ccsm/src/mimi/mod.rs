//! Mimi, the neural audio codec whose codes CSM generates: its decoder path on ggml (split RVQ →
//! depthwise upsampling → a windowed transformer → the SEANet decoder), streaming frame by frame.

mod config;
mod conv;
mod decoder;
mod encoder;
mod model;
mod seanet;
mod transformer;

pub use config::{MimiConfig, MimiTransformerConfig, SeanetConfig};
pub use decoder::{MimiCodec, MimiDecoder, MimiOptions, MimiStream, StreamChunk};
pub use encoder::EncodeStream;
pub use model::{has_codec, MimiModel, EMBEDDED_PREFIX};

/// The codes of one audio frame, one per codebook (what CSM generates and the codec decodes).
pub type Frame = Vec<u32>;
