//! A Llama text model from a GGUF file: token embeddings, the transformer stack, the output head
//! (tied to the embeddings when `output.weight` is absent) and the tokenizer.

use std::path::Path;

use ggml::gguf::GgufFile;
use ggml::{RopeMode, TensorId, TensorStore};

use super::config::LlamaConfig;
use super::names::{StackNames, OUTPUT, ROPE_FREQS, TOKEN_EMBD};
use super::transformer::Transformer;
use crate::error::{Error, Result};
use crate::placement::Placement;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightLoader;

/// Immutable weights and metadata of a text model (the mutable state lives in `GGMLModel`).
pub struct LlamaModel {
    pub(crate) weights: TensorStore,
    pub(crate) transformer: Transformer,
    pub(crate) token_embd: TensorId,
    pub(crate) output: TensorId,
    tokenizer: Tokenizer,
    vocab_size: usize,
    name: String,
    weight_bytes: u64,
    params: u64,
    placement: Placement,
}

impl LlamaModel {
    /// Opens the GGUF file at `path`, checks it and loads the weights (see `from_file`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::open(path.as_ref())?;
        Self::from_file(&file, path.as_ref())
    }

    /// Checks the file as loading does (metadata, tokenizer, every tensor's name, shape and type) and
    /// loads the weights.
    pub fn from_file(file: &GgufFile, path: &Path) -> Result<Self> {
        Self::from_loader(file, path, WeightLoader::new(file)?)
    }

    /// `from_file`, the weights in `placement`'s memory (an engine over them runs there).
    pub fn from_file_placed(file: &GgufFile, path: &Path, placement: &Placement) -> Result<Self> {
        Self::from_loader(file, path, WeightLoader::placed(file, placement)?)
    }

    /// `load`, with every weight matrix dequantized to F32 (`WeightLoader::dequantizing`): the
    /// model's function without 8-bit activations, for measuring what a KV cache alone costs.
    pub fn load_f32_weights(path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::open(path.as_ref())?;
        Self::from_loader(&file, path.as_ref(), WeightLoader::dequantizing(&file)?)
    }

    fn from_loader(file: &GgufFile, path: &Path, mut loader: WeightLoader<'_>) -> Result<Self> {
        let parts = declare(file, path, &mut loader)?;
        let placement = loader.placement().clone();
        let weights = loader.finish()?;
        let name = file.get_opt::<String>("general.name")?.unwrap_or_else(|| path.display().to_string());
        let weight_bytes = weights.buffer_bytes() as u64;
        let params = file.tensors().iter().map(|t| t.nelements() as u64).sum();
        let Parts { transformer, token_embd, output, tokenizer, vocab_size } = parts;
        Ok(LlamaModel { weights, transformer, token_embd, output, tokenizer, vocab_size, name, weight_bytes, params, placement })
    }

    /// Every check `from_file` makes, without reading the weights: the config of a file that would load.
    pub fn check_file(file: &GgufFile, path: &Path) -> Result<LlamaConfig> {
        let mut loader = WeightLoader::new(file)?;
        Ok(declare(file, path, &mut loader)?.transformer.config().clone())
    }

    /// Where the weights are (and so where engines over them run).
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The transformer's hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        self.transformer.config()
    }

    /// The tokenizer stored in the file.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Rows of the token embeddings: logits per position.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `general.name` from the file, or its path when absent.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Parameters (elements of every tensor in the file).
    pub fn params(&self) -> u64 {
        self.params
    }

    /// Bytes of the weights buffer.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
}

/// A text model's parts but its weights' data.
struct Parts {
    transformer: Transformer,
    token_embd: TensorId,
    output: TensorId,
    tokenizer: Tokenizer,
    vocab_size: usize,
}

/// Reads the config and tokenizer and declares every tensor (checked against the config) on `loader`.
fn declare(file: &GgufFile, path: &Path, loader: &mut WeightLoader<'_>) -> Result<Parts> {
    let arch: String = file.get("general.architecture")?;
    if arch != "llama" {
        return Err(Error::Architecture { path: path.display().to_string(), found: arch, expected: "llama" });
    }
    let config = LlamaConfig::from_gguf(file, "llama", RopeMode::Normal)?;
    let embd_info = file.tensor(TOKEN_EMBD)?;
    let vocab_size = embd_info.shape.get(1).copied().unwrap_or(0) as usize;
    if let Some(declared) = file.get_opt::<usize>("llama.vocab_size")? {
        if declared != vocab_size {
            return Err(Error::Config {
                key: "llama.vocab_size".into(),
                why: format!("{declared}, but {TOKEN_EMBD} has {vocab_size} rows"),
            });
        }
    }
    let tokenizer = Tokenizer::from_gguf(file)?;
    if tokenizer.vocab_size() != vocab_size {
        return Err(Error::Tokenizer(format!("{} tokens, but the model has a vocabulary of {vocab_size}", tokenizer.vocab_size())));
    }
    let freq_factors = match file.tensor(ROPE_FREQS) {
        Ok(_) => Some(file.read_tensor_f32(ROPE_FREQS)?),
        Err(_) => None,
    };
    if let Some(f) = &freq_factors {
        if f.len() != config.rope.n_dims / 2 {
            return Err(Error::TensorShape {
                name: ROPE_FREQS.into(),
                expected: vec![config.rope.n_dims as i64 / 2],
                found: vec![f.len() as i64],
            });
        }
    }
    let head = [config.n_embd, vocab_size];
    let (token_embd, output) = match file.tensor(OUTPUT) {
        Ok(_) => (loader.matrix(TOKEN_EMBD, &head)?, loader.product_matrix(OUTPUT, &head)?),
        Err(_) => {
            let tied = loader.tied_matrix(TOKEN_EMBD, &head)?;
            (tied, tied)
        }
    };
    let transformer = Transformer::load(loader, &StackNames::new(""), config, freq_factors)?;
    Ok(Parts { transformer, token_embd, output, tokenizer, vocab_size })
}
