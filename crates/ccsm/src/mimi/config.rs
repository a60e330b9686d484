//! Mimi hyperparameters from our GGUF (`mimi.*`), each bounded so no size computed from them overflows.

use ggml::gguf::GgufFile;
use ggml::RopeMode;

use crate::error::{Error, Result};

/// Shape and numerics of the codec's decoder path.
#[derive(Clone, Debug, PartialEq)]
pub struct MimiConfig {
    /// Output samples per second (24000 for Mimi).
    pub sample_rate: usize,
    /// Audio channels of the output (1 for Mimi).
    pub channels: usize,
    /// Width of the latent, the transformer and the SEANet input (512 for Mimi).
    pub hidden: usize,
    /// Transformer steps per frame (2: 12.5 Hz frames, 25 Hz transformer).
    pub upsample_stride: usize,
    /// Codebooks of the quantizer (32), of which the first `n_semantic` (1) form their own group.
    pub n_q: usize,
    /// Codebooks at the front of the quantizer with their own projection, the semantic group (1).
    pub n_semantic: usize,
    /// Entries per codebook: codes of each codebook are `0..codebook_size` (2048 for Mimi).
    pub codebook_size: usize,
    /// Width of a codebook entry before the group projections to `hidden` (256 for Mimi).
    pub codebook_dim: usize,
    /// The decoder transformer between the quantizer and SEANet.
    pub transformer: MimiTransformerConfig,
    /// The SEANet decoder that turns the latent into samples.
    pub seanet: SeanetConfig,
}

/// The decoder transformer of the codec: a causal sliding-window transformer over latent steps.
#[derive(Clone, Debug, PartialEq)]
pub struct MimiTransformerConfig {
    /// Transformer blocks (8 for Mimi).
    pub n_layer: usize,
    /// Query heads; `n_head * head_dim` equals the codec's `hidden`.
    pub n_head: usize,
    /// K/V heads; divides `n_head`.
    pub n_head_kv: usize,
    /// Width of one head (even, for RoPE).
    pub head_dim: usize,
    /// Hidden width of each feed-forward block.
    pub n_ff: usize,
    /// Steps a query sees, itself included (250).
    pub context: usize,
    /// Epsilon of the layer norms, in (0, 1).
    pub norm_eps: f32,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// Which RoPE layout the weights were exported for (normal or NeoX).
    pub rope_mode: RopeMode,
}

/// The SEANet decoder: a convolution, one upsampling block per ratio, and a final convolution.
#[derive(Clone, Debug, PartialEq)]
pub struct SeanetConfig {
    /// Channels after the last upsampling block; block `i` starts with `filters << (ratios.len() - i)`.
    pub filters: usize,
    /// Upsampling ratios in decoder order (8, 6, 5, 4).
    pub ratios: Vec<usize>,
    /// Kernel of the first convolution (hidden → filters · 2^len).
    pub kernel_size: usize,
    /// Kernel of the last convolution (filters → output channels).
    pub last_kernel_size: usize,
    /// Kernel of the dilated convolution inside each residual unit.
    pub residual_kernel_size: usize,
    /// Residual units after each upsampling.
    pub residual_layers: usize,
    /// Dilation of residual unit `j` is `dilation_base^j`.
    pub dilation_base: usize,
    /// Factor a residual unit narrows its inner width by; divides every residual width.
    pub compress: usize,
}

impl SeanetConfig {
    /// Channels entering upsampling block `i` (the first conv's output is filters · 2^len).
    pub fn channels_before(&self, i: usize) -> usize {
        self.filters << (self.ratios.len() - i)
    }
}

impl MimiConfig {
    /// Samples per frame: upsample stride × the SEANet ratios (1920 for Mimi).
    pub fn frame_samples(&self) -> usize {
        self.upsample_stride * self.seanet.ratios.iter().product::<usize>()
    }

    /// Frames per second of audio (12.5 for Mimi).
    pub fn frame_rate(&self) -> f64 {
        self.sample_rate as f64 / self.frame_samples() as f64
    }

    /// Reads the `mimi.*` metadata, refusing out-of-range values and counts that do not fit together.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let count = |name: &str, max: usize| -> Result<usize> {
            let key = format!("mimi.{name}");
            let v: usize = file.get(&key)?;
            if v == 0 || v > max {
                return Err(Error::Config { key, why: format!("{v} is out of range (1..={max})") });
            }
            Ok(v)
        };
        let float = |name: &str, lo: f32, hi: f32| -> Result<f32> {
            let key = format!("mimi.{name}");
            let v: f32 = file.get(&key)?;
            if !(v.is_finite() && v > lo && v < hi) {
                return Err(Error::Config { key, why: format!("{v} is out of range") });
            }
            Ok(v)
        };
        let layout: String = file.get("mimi.rope_layout")?;
        let rope_mode = match layout.as_str() {
            "normal" => RopeMode::Normal,
            "neox" => RopeMode::Neox,
            other => return Err(Error::Config { key: "mimi.rope_layout".into(), why: format!("`{other}` (expected normal or neox)") }),
        };
        let ratios: Vec<usize> = file.get("mimi.seanet.ratios")?;
        if ratios.is_empty() || ratios.len() > 8 || ratios.iter().any(|&r| r == 0 || r > 64) {
            return Err(Error::Config { key: "mimi.seanet.ratios".into(), why: format!("{ratios:?} (1 to 8 ratios of 1..=64)") });
        }
        let transformer = MimiTransformerConfig {
            n_layer: count("transformer.block_count", 256)?,
            n_head: count("transformer.head_count", 256)?,
            n_head_kv: count("transformer.head_count_kv", 256)?,
            head_dim: count("transformer.key_length", 1024)?,
            n_ff: count("transformer.feed_forward_length", 1 << 16)?,
            context: count("transformer.context_length", 1 << 16)?,
            norm_eps: float("transformer.layer_norm_epsilon", 0.0, 1.0)?,
            rope_base: float("transformer.rope.freq_base", 1.0, 1e9)?,
            rope_mode,
        };
        let seanet = SeanetConfig {
            filters: count("seanet.filters", 1024)?,
            ratios,
            kernel_size: count("seanet.kernel_size", 64)?,
            last_kernel_size: count("seanet.last_kernel_size", 64)?,
            residual_kernel_size: count("seanet.residual_kernel_size", 64)?,
            residual_layers: count("seanet.residual_layers", 8)?,
            dilation_base: count("seanet.dilation_base", 8)?,
            compress: count("seanet.compress", 64)?,
        };
        let config = MimiConfig {
            sample_rate: count("sample_rate", 1 << 20)?,
            channels: count("channels", 8)?,
            hidden: count("hidden_size", 8192)?,
            upsample_stride: count("upsample_stride", 64)?,
            n_q: count("codebook_count", 256)?,
            n_semantic: count("semantic_codebook_count", 256)?,
            codebook_size: count("codebook_size", 1 << 16)?,
            codebook_dim: count("codebook_dim", 8192)?,
            transformer,
            seanet,
        };
        config.check()?;
        Ok(config)
    }

    /// Relations between the counts the graphs rely on.
    fn check(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(Error::Config { key: format!("mimi.{key}"), why });
        let t = &self.transformer;
        if self.n_semantic > self.n_q {
            return bad("semantic_codebook_count", format!("{} of {} codebooks", self.n_semantic, self.n_q));
        }
        if !t.n_head.is_multiple_of(t.n_head_kv) {
            return bad("transformer.head_count_kv", format!("{} KV heads do not divide {} heads", t.n_head_kv, t.n_head));
        }
        if t.n_head * t.head_dim != self.hidden || !t.head_dim.is_multiple_of(2) {
            return bad(
                "transformer.key_length",
                format!("{} heads of {} (even) must make the width {}", t.n_head, t.head_dim, self.hidden),
            );
        }
        let s = &self.seanet;
        if s.filters << s.ratios.len() > 1 << 16 {
            return bad("seanet.filters", format!("{} filters over {} ratios make more than 65536 channels", s.filters, s.ratios.len()));
        }
        // Residual units of block i are channels_before(i) / 2 wide, compressed inside.
        if (0..s.ratios.len()).any(|i| !(s.channels_before(i) / 2).is_multiple_of(s.compress)) {
            return bad("seanet.compress", format!("{} does not divide every residual width", s.compress));
        }
        Ok(())
    }
}
