//! Hyperparameters of a Llama transformer, read once from GGUF metadata under a key prefix
//! (`llama` for text models, `csm.backbone` / `csm.decoder` for CSM).

use ggml::gguf::{FromValue, GgufFile};
use ggml::RopeMode;

use crate::error::{Error, Result};

/// Bounds of the hyperparameters (far above any released model): with them no width, tensor size or
/// cache size computed from a config can overflow 64 bits.
pub const MAX_LAYERS: usize = 4096;
pub const MAX_WIDTH: usize = 1 << 20;
pub const MAX_HEADS: usize = 4096;
pub const MAX_HEAD_DIM: usize = 4096;
pub const MAX_FFN: usize = 1 << 22;
pub const MAX_CONTEXT: usize = 1 << 24;

/// Llama 3 long-context RoPE scaling (frequency-dependent division of the rotation speed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    /// How much slower the longest wavelengths rotate (≥ 1).
    pub factor: f32,
    /// Wavelengths longer than `original_context / low_freq_factor` are slowed by the full `factor`.
    pub low_freq_factor: f32,
    /// Wavelengths shorter than `original_context / high_freq_factor` are left alone.
    pub high_freq_factor: f32,
    /// The context length the model was pretrained at, before the extension.
    pub original_context: u32,
}

/// Rotary position embedding of one transformer stack.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Base of the rotation frequencies (`rope.freq_base`, 10000 when absent).
    pub freq_base: f32,
    /// Dimensions of each head that are rotated.
    pub n_dims: usize,
    /// How rotated pairs are laid out in a head (adjacent or split halves), per architecture.
    pub mode: RopeMode,
    /// Llama 3 frequency scaling; None when the model's RoPE is unscaled.
    pub llama3: Option<Llama3Scaling>,
}

impl RopeConfig {
    /// Per-pair divisors of the rotation frequency (ggml's `freq_factors`), or `None` when unscaled.
    ///
    /// Llama 3: wavelengths shorter than `original / high_freq_factor` keep their frequency, longer
    /// than `original / low_freq_factor` are slowed by `factor`, and those in between interpolate.
    pub fn freq_factors(&self) -> Option<Vec<f32>> {
        let s = self.llama3?;
        let low_wavelen = s.original_context as f64 / s.low_freq_factor as f64;
        let high_wavelen = s.original_context as f64 / s.high_freq_factor as f64;
        let factors = (0..self.n_dims / 2)
            .map(|i| {
                let freq = (self.freq_base as f64).powf(-2.0 * i as f64 / self.n_dims as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let scaled = if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / s.factor as f64
                } else {
                    let smooth =
                        (s.original_context as f64 / wavelen - s.low_freq_factor as f64) / (s.high_freq_factor - s.low_freq_factor) as f64;
                    (1.0 - smooth) * freq / s.factor as f64 + smooth * freq
                };
                (freq / scaled) as f32
            })
            .collect();
        Some(factors)
    }
}

/// Shape and numerics of one Llama transformer stack.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Width of the residual stream (the embedding length).
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// K/V heads; divides `n_head` (grouped-query attention when fewer).
    pub n_head_kv: usize,
    /// Width of one head (even; `n_embd / n_head` unless the file says otherwise).
    pub head_dim: usize,
    /// Hidden width of each feed-forward block.
    pub n_ff: usize,
    /// Epsilon of the RMS norms, in (0, 1).
    pub rms_eps: f32,
    /// Rotary position embedding.
    pub rope: RopeConfig,
    /// Longest context the model was trained for.
    pub n_ctx_train: usize,
}

impl LlamaConfig {
    /// Reads `{prefix}.block_count`, `{prefix}.embedding_length`, … from the file. A missing or
    /// malformed key is an error naming it.
    pub fn from_gguf(file: &GgufFile, prefix: &str, rope_mode: RopeMode) -> Result<Self> {
        let key = |name: &str| format!("{prefix}.{name}");
        // Every count is bounded so that products of them (widths, byte sizes) cannot overflow.
        let bounded = |name: &str, value: Option<usize>, max: usize| -> Result<usize> {
            let k = key(name);
            let v = match value {
                Some(v) => v,
                None => file.get(&k)?,
            };
            if v == 0 || v > max {
                return Err(Error::Config { key: k, why: format!("{v} is out of range (1..={max})") });
            }
            Ok(v)
        };
        let positive = |name: &str, max: usize| bounded(name, None, max);
        let n_embd = positive("embedding_length", MAX_WIDTH)?;
        let n_head = positive("attention.head_count", MAX_HEADS)?;
        let n_head_kv =
            bounded("attention.head_count_kv", Some(file.get_opt::<usize>(&key("attention.head_count_kv"))?.unwrap_or(n_head)), MAX_HEADS)?;
        if n_head % n_head_kv != 0 {
            return Err(Error::Config {
                key: key("attention.head_count_kv"),
                why: format!("{n_head_kv} KV heads do not divide {n_head} query heads"),
            });
        }
        let head_dim = match file.get_opt::<usize>(&key("attention.key_length"))? {
            Some(v) => bounded("attention.key_length", Some(v), MAX_HEAD_DIM)?,
            None if n_embd % n_head == 0 => bounded("attention.key_length", Some(n_embd / n_head), MAX_HEAD_DIM)?,
            None => {
                return Err(Error::Config { key: key("attention.head_count"), why: format!("{n_head} heads do not divide width {n_embd}") })
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::Config { key: key("attention.key_length"), why: format!("head dim {head_dim} must be even") });
        }
        if let Some(v) = file.get_opt::<usize>(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(Error::Config {
                    key: key("attention.value_length"),
                    why: format!("{v} differs from the key length {head_dim}"),
                });
            }
        }
        let rms_eps: f32 = file.get(&key("attention.layer_norm_rms_epsilon"))?;
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(Error::Config { key: key("attention.layer_norm_rms_epsilon"), why: format!("{rms_eps} is out of range") });
        }
        let freq_base = optional_or(file, &key("rope.freq_base"), 10_000.0f32)?;
        if !(freq_base.is_finite() && freq_base > 1.0) {
            return Err(Error::Config { key: key("rope.freq_base"), why: format!("{freq_base} is out of range") });
        }
        let n_dims = optional_or(file, &key("rope.dimension_count"), head_dim)?;
        if n_dims == 0 || n_dims > head_dim || n_dims % 2 != 0 {
            return Err(Error::Config { key: key("rope.dimension_count"), why: format!("{n_dims} for head dim {head_dim}") });
        }
        let llama3 = match file.get_opt::<String>(&key("rope.scaling.type"))?.as_deref() {
            None | Some("none") => None,
            Some("llama3") => Some(Llama3Scaling {
                factor: file.get(&key("rope.scaling.factor"))?,
                low_freq_factor: file.get(&key("rope.scaling.low_freq_factor"))?,
                high_freq_factor: file.get(&key("rope.scaling.high_freq_factor"))?,
                original_context: file.get(&key("rope.scaling.original_context_length"))?,
            }),
            Some(other) => {
                return Err(Error::Config {
                    key: key("rope.scaling.type"),
                    why: format!("scaling `{other}` is not supported (none, llama3)"),
                })
            }
        };
        if let Some(s) = llama3 {
            let sane = s.factor >= 1.0 && s.low_freq_factor > 0.0 && s.high_freq_factor > s.low_freq_factor && s.original_context > 0;
            if !sane {
                return Err(Error::Config { key: key("rope.scaling"), why: format!("inconsistent llama3 scaling {s:?}") });
            }
        }
        Ok(LlamaConfig {
            n_layer: positive("block_count", MAX_LAYERS)?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: positive("feed_forward_length", MAX_FFN)?,
            rms_eps,
            rope: RopeConfig { freq_base, n_dims, mode: rope_mode, llama3 },
            n_ctx_train: positive("context_length", MAX_CONTEXT)?,
        })
    }

    /// Width of the K (and V) rows of one token across KV heads.
    pub fn n_embd_kv(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Width of the concatenated query heads.
    pub fn n_embd_q(&self) -> usize {
        self.n_head * self.head_dim
    }
}

fn optional_or<T: FromValue>(file: &GgufFile, key: &str, default: T) -> Result<T> {
    Ok(file.get_opt(key)?.unwrap_or(default))
}
