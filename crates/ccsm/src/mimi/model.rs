//! Mimi weights from our GGUF (a Mimi file, or a CSM file with the codec embedded under `codec.`), every
//! shape checked against the config before ggml sees it.

use std::path::Path;

use ggml::gguf::GgufFile;
use ggml::{DType, Tensor, TensorId, TensorStore};

use super::config::MimiConfig;
use super::conv::{DepthwiseUpsample, StateLayout};
use super::encoder::{file_has_encoder, EncoderWeights};
use super::seanet::Seanet;
use super::transformer::MimiTransformer;
use crate::error::{Error, Result};
use crate::placement::Placement;
use crate::weights::WeightLoader;

/// Tensor-name prefix of a codec embedded in a CSM GGUF.
pub const EMBEDDED_PREFIX: &str = "codec.";

/// The split residual vector quantizer's decode side.
struct Quantizer {
    /// `[dim, size · n_q]`: centroid c of codebook k is row c + k · size.
    codebooks: TensorId,
    semantic_proj: TensorId,
    acoustic_proj: TensorId,
}

/// The immutable part of a Mimi codec (the decoder path).
pub struct MimiModel {
    pub(crate) config: MimiConfig,
    pub(crate) weights: TensorStore,
    quantizer: Quantizer,
    pub(crate) upsample: DepthwiseUpsample,
    pub(crate) transformer: MimiTransformer,
    pub(crate) seanet: Seanet,
    pub(crate) state_layout: StateLayout,
    /// The encode path, when the file holds it.
    pub(crate) encoder: Option<EncoderWeights>,
    name: String,
    weight_bytes: u64,
    placement: Placement,
}

/// Whether a GGUF holds a codec: a Mimi file, or a CSM file with one embedded.
pub fn has_codec(file: &GgufFile) -> bool {
    file.value("mimi.sample_rate").is_some()
}

impl MimiModel {
    /// Loads a Mimi GGUF (or the codec embedded in a CSM GGUF), every tensor checked.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::open(path.as_ref())?;
        Self::from_file(&file, path.as_ref())
    }

    /// The codec of a Mimi GGUF, or the one embedded in a CSM GGUF.
    pub fn from_file(file: &GgufFile, path: &Path) -> Result<Self> {
        Self::from_file_placed(file, path, &Placement::Cpu)
    }

    /// `from_file`, the weights in `placement`'s memory (codecs over them decode there).
    pub fn from_file_placed(file: &GgufFile, path: &Path, placement: &Placement) -> Result<Self> {
        let prefix = codec_prefix(file, path)?;
        let mut loader = WeightLoader::placed(file, placement)?;
        let mut layout = StateLayout::default();
        let parts = declare(file, prefix, &mut loader, &mut layout)?;
        let weights = loader.finish()?;
        let mut parts = parts;
        if let Some(encoder) = parts.encoder.as_mut() {
            encoder.finish(&weights, parts.quantizer.codebooks, &parts.config, placement)?;
        }
        let weight_bytes = weights.buffer_bytes() as u64;
        let name = file.get_opt::<String>("general.name")?.unwrap_or_else(|| path.display().to_string());
        let Parts { config, quantizer, upsample, transformer, seanet, encoder } = parts;
        Ok(MimiModel {
            config,
            weights,
            quantizer,
            upsample,
            transformer,
            seanet,
            state_layout: layout,
            encoder,
            name,
            weight_bytes,
            placement: placement.clone(),
        })
    }

    /// Every check `from_file` makes, without reading the weights.
    pub fn check_file(file: &GgufFile, path: &Path) -> Result<MimiConfig> {
        let prefix = codec_prefix(file, path)?;
        let mut loader = WeightLoader::new(file)?;
        Ok(declare(file, prefix, &mut loader, &mut StateLayout::default())?.config)
    }

    /// Where the weights are (and so where codecs over them decode).
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The hyperparameters.
    pub fn config(&self) -> &MimiConfig {
        &self.config
    }

    /// Whether the file holds the encode path (it always holds the decode path).
    pub fn can_encode(&self) -> bool {
        self.encoder.is_some()
    }

    /// The codebooks' centroids `[dim, size · n_q]`.
    pub(crate) fn codebooks_id(&self) -> TensorId {
        self.quantizer.codebooks
    }

    /// The file's `general.name`, else its path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of the loaded weights.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Codes `[k_used · frames]` (I32, frame-major, code of codebook k offset by k · size) → latent
    /// `[hidden, frames]`: each group's centroids summed and projected, the groups added.
    pub(crate) fn build_latent<'c>(&'c self, ctx: &'c ggml::Context, codes: Tensor<'c>, k_used: usize) -> Result<Tensor<'c>> {
        let c = &self.config;
        let w = |id| self.weights.get(id);
        let (dim, k) = (c.codebook_dim as i64, k_used as i64);
        let frames = codes.ne(0) / k;
        let rows = ctx.reshape(ctx.get_rows(w(self.quantizer.codebooks), codes)?, &[dim, k, frames])?;
        let f = DType::F32.type_size();
        let group = |first: usize, count: usize| -> Result<Tensor<'c>> {
            let view = ctx.view(rows, &[dim, count as i64, frames], &[dim as usize * f, rows.strides()[2]], first * dim as usize * f)?;
            if count == 1 {
                return Ok(ctx.reshape(ctx.cont(view)?, &[dim, frames])?);
            }
            let summed = ctx.sum_rows(ctx.cont(ctx.permute(view, [1, 0, 2, 3])?)?)?;
            Ok(ctx.reshape(summed, &[dim, frames])?)
        };
        let semantic = c.n_semantic.min(k_used);
        let mut latent = ctx.mul_mat(w(self.quantizer.semantic_proj), group(0, semantic)?)?;
        if k_used > semantic {
            latent = ctx.add(latent, ctx.mul_mat(w(self.quantizer.acoustic_proj), group(semantic, k_used - semantic)?)?)?;
        }
        Ok(latent.set_name("codec.latent"))
    }
}

/// "" for a Mimi file, `codec.` for a CSM file with the codec embedded.
fn codec_prefix(file: &GgufFile, path: &Path) -> Result<&'static str> {
    let arch: String = file.get("general.architecture")?;
    match arch.as_str() {
        "mimi" => Ok(""),
        "csm" if has_codec(file) => Ok(EMBEDDED_PREFIX),
        "csm" => Err(Error::Architecture {
            path: path.display().to_string(),
            found: "csm without an embedded codec".into(),
            expected: "mimi, or csm with mimi.* metadata",
        }),
        _ => Err(Error::Architecture { path: path.display().to_string(), found: arch, expected: "mimi (or csm with an embedded codec)" }),
    }
}

struct Parts {
    config: MimiConfig,
    quantizer: Quantizer,
    upsample: DepthwiseUpsample,
    transformer: MimiTransformer,
    seanet: Seanet,
    encoder: Option<EncoderWeights>,
}

fn declare(file: &GgufFile, prefix: &str, loader: &mut WeightLoader<'_>, layout: &mut StateLayout) -> Result<Parts> {
    let config = MimiConfig::from_gguf(file)?;
    let c = &config;
    let name = |t: &str| format!("{prefix}{t}");
    let quantizer = Quantizer {
        codebooks: loader.matrix(&name("quantizer.codebooks.weight"), &[c.codebook_dim, c.codebook_size * c.n_q])?,
        semantic_proj: loader.matrix(&name("quantizer.semantic_proj.weight"), &[c.codebook_dim, c.hidden])?,
        acoustic_proj: loader.matrix(&name("quantizer.acoustic_proj.weight"), &[c.codebook_dim, c.hidden])?,
    };
    let upsample = DepthwiseUpsample::load(loader, layout, &name("upsample.weight"), c.hidden, c.upsample_stride)?;
    let transformer = MimiTransformer::load(loader, prefix, c.transformer.clone(), c.hidden)?;
    let seanet = Seanet::load(loader, layout, prefix, &c.seanet, c.hidden, c.channels)?;
    let encoder = if file_has_encoder(file, prefix) { Some(EncoderWeights::declare(loader, prefix, c)?) } else { None };
    Ok(Parts { config, quantizer, upsample, transformer, seanet, encoder })
}
