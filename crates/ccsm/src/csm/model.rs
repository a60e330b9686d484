//! CSM weights from our GGUF, every shape checked against the config.

use std::path::Path;

use ggml::gguf::GgufFile;
use ggml::{TensorId, TensorStore};

use super::config::CsmConfig;
use crate::error::{Error, Result};
use crate::llama::{StackNames, Transformer, TOKEN_EMBD};
use crate::placement::Placement;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightLoader;

/// Tensor names of our CSM GGUF beyond the two Llama stacks.
pub const AUDIO_EMBD: &str = "audio_embd.weight";
pub const PROJECTION: &str = "projection.weight";
pub const CODEBOOK0_HEAD: &str = "codebook0_head.weight";
pub const AUDIO_HEAD: &str = "audio_head.weight";

/// The immutable part of a CSM model.
pub struct CsmModel {
    pub(crate) config: CsmConfig,
    pub(crate) weights: TensorStore,
    pub(crate) backbone: Transformer,
    pub(crate) decoder: Transformer,
    pub(crate) text_embd: TensorId,
    /// `[n_embd_backbone, audio_vocab * n_codebooks]`: code t of codebook k is row t + k * audio_vocab.
    pub(crate) audio_embd: TensorId,
    /// backbone width → decoder width.
    pub(crate) projection: TensorId,
    pub(crate) codebook0_head: TensorId,
    /// `[n_embd_decoder, audio_vocab, n_codebooks - 1]`: slice i gives the logits of codebook i + 1.
    pub(crate) audio_head: TensorId,
    tokenizer: Tokenizer,
    name: String,
    weight_bytes: u64,
    params: u64,
    placement: Placement,
}

impl CsmModel {
    /// Loads a CSM GGUF, every tensor checked against the config.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::open(path.as_ref())?;
        Self::from_file(&file, path.as_ref())
    }

    /// Checks the file as loading does (metadata, tokenizer, every tensor's name, shape and type) and
    /// loads the weights.
    pub fn from_file(file: &GgufFile, path: &Path) -> Result<Self> {
        Self::from_file_placed(file, path, &Placement::Cpu)
    }

    /// `from_file`, the weights in `placement`'s memory (engines over them run there).
    pub fn from_file_placed(file: &GgufFile, path: &Path, placement: &Placement) -> Result<Self> {
        let mut loader = WeightLoader::placed(file, placement)?;
        let Parts { config, tokenizer, backbone, decoder, text_embd, audio_embd, projection, codebook0_head, audio_head } =
            declare(file, path, &mut loader)?;
        let weights = loader.finish()?;
        let name = file.get_opt::<String>("general.name")?.unwrap_or_else(|| path.display().to_string());
        let weight_bytes = weights.buffer_bytes() as u64;
        let params = file.tensors().iter().map(|t| t.nelements() as u64).sum();
        Ok(CsmModel {
            config,
            weights,
            backbone,
            decoder,
            text_embd,
            audio_embd,
            projection,
            codebook0_head,
            audio_head,
            tokenizer,
            name,
            weight_bytes,
            params,
            placement: placement.clone(),
        })
    }

    /// Every check `from_file` makes, without reading the weights: the config of a file that would load.
    pub fn check_file(file: &GgufFile, path: &Path) -> Result<CsmConfig> {
        let mut loader = WeightLoader::new(file)?;
        Ok(declare(file, path, &mut loader)?.config)
    }

    /// Where the weights are (and so where engines over them run).
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The hyperparameters.
    pub fn config(&self) -> &CsmConfig {
        &self.config
    }

    /// The text tokenizer (Llama 3's, with BOS and EOS).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The file's `general.name`, else its path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of the loaded weights.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Parameters (elements of every tensor).
    pub fn params(&self) -> u64 {
        self.params
    }
}

/// A CSM model's parts but its weights' data.
struct Parts {
    config: CsmConfig,
    tokenizer: Tokenizer,
    backbone: Transformer,
    decoder: Transformer,
    text_embd: TensorId,
    audio_embd: TensorId,
    projection: TensorId,
    codebook0_head: TensorId,
    audio_head: TensorId,
}

/// Reads the config and tokenizer and declares every tensor (checked against the config) on `loader`.
fn declare(file: &GgufFile, path: &Path, loader: &mut WeightLoader<'_>) -> Result<Parts> {
    let arch: String = file.get("general.architecture")?;
    if arch != "csm" {
        return Err(Error::Architecture { path: path.display().to_string(), found: arch, expected: "csm" });
    }
    let config = CsmConfig::from_gguf(file)?;
    let tokenizer = Tokenizer::from_gguf(file)?;
    if tokenizer.vocab_size() != config.text_vocab {
        return Err(Error::Tokenizer(format!("{} tokens, but csm.text_vocab_size is {}", tokenizer.vocab_size(), config.text_vocab)));
    }
    if tokenizer.bos().is_none() || tokenizer.eos().is_none() {
        return Err(Error::Tokenizer("CSM segments need BOS and EOS ids (tokenizer.ggml.bos/eos_token_id)".into()));
    }
    let (bb, dd) = (config.backbone.n_embd, config.decoder.n_embd);
    let (v, k) = (config.audio_vocab, config.n_codebooks);
    let text_embd = loader.matrix(TOKEN_EMBD, &[bb, config.text_vocab])?;
    let audio_embd = loader.matrix(AUDIO_EMBD, &[bb, v * k])?;
    let projection = loader.product_matrix(PROJECTION, &[bb, dd])?;
    let codebook0_head = loader.product_matrix(CODEBOOK0_HEAD, &[bb, v])?;
    // One head per codebook, each multiplied through a view of it whole.
    let audio_head = loader.product_matrix(AUDIO_HEAD, &[dd, v, k - 1])?;
    let backbone = Transformer::load(loader, &StackNames::new("backbone."), config.backbone.clone(), None)?;
    let decoder = Transformer::load(loader, &StackNames::new("decoder."), config.decoder.clone(), None)?;
    Ok(Parts { config, tokenizer, backbone, decoder, text_embd, audio_embd, projection, codebook0_head, audio_head })
}
