//! Opening a model file whatever its architecture: the one entry point the CLI and the loader fuzz
//! target share, and the same checks without the weights for `info`.

use std::path::Path;

use ggml::gguf::GgufFile;

use crate::cache_role::CacheRole;
use crate::csm::CsmModel;
use crate::error::{Error, Result};
use crate::kv_cache::KvCacheConfig;
use crate::llama::{LlamaConfig, LlamaModel};
use crate::mimi::{has_codec, MimiCodec, MimiConfig, MimiModel, MimiOptions};
use crate::placement::Placement;
use crate::CacheType;

/// Default context when the model's own is larger: keeps the cache modest, and a file that claims a
/// huge context cannot make the engine allocate for it unasked.
pub const DEFAULT_CTX_CAP: usize = 4096;

/// A loaded model of one of the supported architectures.
#[allow(clippy::large_enum_variant)] // made once per process; boxing would buy nothing
pub enum AnyModel {
    /// A Llama text model (`general.architecture` = `llama`).
    Llama(LlamaModel),
    /// A CSM speech model: backbone, audio decoder and, when the file embeds one, its codec.
    Csm(CsmModel),
    /// A codec alone (it decodes frames; it generates nothing).
    Mimi(MimiModel),
}

/// Parses the file (in Rust: ggml's C parser never sees it), checks it against its architecture and
/// loads the weights.
pub fn load_model(path: impl AsRef<Path>) -> Result<AnyModel> {
    load_model_placed(path, &Placement::Cpu)
}

/// `load_model`, the weights in `placement`'s memory (engines over them run there).
pub fn load_model_placed(path: impl AsRef<Path>, placement: &Placement) -> Result<AnyModel> {
    let path = path.as_ref();
    let file = GgufFile::open(path)?;
    match architecture(&file, path)? {
        Architecture::Llama => LlamaModel::from_file_placed(&file, path, placement).map(AnyModel::Llama),
        Architecture::Csm => CsmModel::from_file_placed(&file, path, placement).map(AnyModel::Csm),
        Architecture::Mimi => MimiModel::from_file_placed(&file, path, placement).map(AnyModel::Mimi),
    }
}

/// The model architectures this engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama-family text models.
    Llama,
    /// Sesame CSM: text-to-speech with a Llama backbone and audio decoder.
    Csm,
    /// The Mimi audio codec alone.
    Mimi,
}

fn architecture(file: &GgufFile, path: &Path) -> Result<Architecture> {
    let arch: String = file.get("general.architecture")?;
    match arch.as_str() {
        "llama" => Ok(Architecture::Llama),
        "csm" => Ok(Architecture::Csm),
        "mimi" => Ok(Architecture::Mimi),
        _ => Err(Error::Architecture { path: path.display().to_string(), found: arch, expected: "llama, csm or mimi" }),
    }
}

/// One KV cache a run of the model allocates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheShape {
    /// Which stack the cache serves (text, CSM backbone or decoder, codec).
    pub role: CacheRole,
    /// Layers of the stack, one K and one V tensor each.
    pub n_layer: usize,
    /// K/V heads per layer.
    pub n_head_kv: usize,
    /// Width of one K/V head.
    pub head_dim: usize,
    /// Cells it gets (the context for text and the CSM backbone; one per codebook for the decoder).
    pub cells: usize,
}

impl CacheShape {
    fn of(role: CacheRole, stack: &LlamaConfig, cells: usize) -> Self {
        CacheShape { role, n_layer: stack.n_layer, n_head_kv: stack.n_head_kv, head_dim: stack.head_dim, cells }
    }

    /// The cache's config with these types (its bytes: `config(..).bytes()`).
    pub fn config(&self, k_type: CacheType, v_type: CacheType) -> KvCacheConfig {
        KvCacheConfig::uniform(self.n_layer, self.head_dim, self.n_head_kv, self.cells, k_type, v_type)
    }
}

/// The codec transformer's cache, as `MimiCodec` sizes it by default.
fn codec_cache(c: &MimiConfig) -> CacheShape {
    let t = &c.transformer;
    let cells = MimiCodec::cache_capacity(c, MimiOptions::default().max_chunk_frames);
    CacheShape { role: CacheRole::Codec, n_layer: t.n_layer, n_head_kv: t.n_head_kv, head_dim: t.head_dim, cells }
}

/// What a model file holds, from a file that passed every check loading makes.
#[derive(Clone, Debug)]
pub struct ModelFacts {
    /// The file's architecture.
    pub architecture: Architecture,
    /// `general.name`, empty when the file has none.
    pub name: String,
    /// Parameters: elements of every tensor in the file.
    pub params: u64,
    /// Bytes of tensor data in the file.
    pub weight_bytes: u64,
    /// Tensors in the file.
    pub tensors: usize,
    /// Every KV cache a run of the model allocates, at the context asked for.
    pub caches: Vec<CacheShape>,
}

/// Checks the file exactly as `load_model` does (metadata, tokenizer, every tensor's name, shape and
/// type) without reading the weights, and reports what it holds; caches sized for `n_ctx` cells
/// (default: the model's context, at most `DEFAULT_CTX_CAP`).
pub fn inspect(path: impl AsRef<Path>, n_ctx: Option<usize>) -> Result<ModelFacts> {
    let path = path.as_ref();
    let file = GgufFile::open(path)?;
    let architecture = architecture(&file, path)?;
    let cells = |trained: usize| n_ctx.unwrap_or(trained.min(DEFAULT_CTX_CAP));
    let caches = match architecture {
        Architecture::Llama => {
            let c = LlamaModel::check_file(&file, path)?;
            vec![CacheShape::of(CacheRole::Text, &c, cells(c.n_ctx_train))]
        }
        Architecture::Csm => {
            let c = CsmModel::check_file(&file, path)?;
            let mut caches = vec![
                CacheShape::of(CacheRole::Backbone, &c.backbone, cells(c.backbone.n_ctx_train)),
                CacheShape::of(CacheRole::Decoder, &c.decoder, c.n_codebooks),
            ];
            if has_codec(&file) {
                caches.push(codec_cache(&MimiModel::check_file(&file, path)?));
            }
            caches
        }
        Architecture::Mimi => vec![codec_cache(&MimiModel::check_file(&file, path)?)],
    };
    Ok(ModelFacts {
        architecture,
        name: file.get_opt::<String>("general.name")?.unwrap_or_default(),
        params: file.tensors().iter().map(|t| t.nelements() as u64).sum(),
        weight_bytes: file.tensors().iter().map(|t| t.size).sum(),
        tensors: file.tensors().len(),
        caches,
    })
}
