//! CSM hyperparameters from our GGUF (`csm.backbone.*`, `csm.decoder.*`, `csm.*`).

use ggml::gguf::GgufFile;
use ggml::RopeMode;

use crate::error::{Error, Result};
use crate::llama::LlamaConfig;

/// CSM's hyperparameters: the two Llama stacks and the vocabularies between them.
#[derive(Clone, Debug, PartialEq)]
pub struct CsmConfig {
    /// The backbone over text and frame rows.
    pub backbone: LlamaConfig,
    /// The decoder that turns a backbone state into a frame's codes.
    pub decoder: LlamaConfig,
    /// Text tokens (the tokenizer's vocabulary).
    pub text_vocab: usize,
    /// Codes per codebook (2051 for CSM-1B: 2048 Mimi codes and specials).
    pub audio_vocab: usize,
    /// Codes per frame (32 for CSM-1B, Mimi's codebooks).
    pub n_codebooks: usize,
    /// How both stacks pair dimensions for RoPE.
    pub rope_mode: RopeMode,
}

impl CsmConfig {
    /// Reads the config from our CSM GGUF, every count checked for range.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let layout: String = file.get("csm.rope_layout")?;
        let rope_mode = match layout.as_str() {
            "normal" => RopeMode::Normal,
            "neox" => RopeMode::Neox,
            other => return Err(Error::Config { key: "csm.rope_layout".into(), why: format!("`{other}` (expected normal or neox)") }),
        };
        let count = |key: &str, max: usize| -> Result<usize> {
            let v: usize = file.get(key)?;
            if v == 0 || v > max {
                return Err(Error::Config { key: key.into(), why: format!("{v} is out of range (1..={max})") });
            }
            Ok(v)
        };
        let config = CsmConfig {
            backbone: LlamaConfig::from_gguf(file, "csm.backbone", rope_mode)?,
            decoder: LlamaConfig::from_gguf(file, "csm.decoder", rope_mode)?,
            text_vocab: count("csm.text_vocab_size", 1 << 22)?,
            audio_vocab: count("csm.audio_vocab_size", 1 << 20)?,
            n_codebooks: count("csm.audio_num_codebooks", 256)?,
            rope_mode,
        };
        if config.n_codebooks < 2 {
            return Err(Error::Config { key: "csm.audio_num_codebooks".into(), why: "a frame needs at least 2 codebooks".into() });
        }
        Ok(config)
    }
}
