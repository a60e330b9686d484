//! The one table of GGUF tensor names for Llama stacks (text models, CSM backbone and decoder).

/// Tensors of one transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockTensor {
    /// RMS norm weights before attention (`attn_norm`).
    AttnNorm,
    /// Query projection (`attn_q`).
    AttnQ,
    /// Key projection (`attn_k`).
    AttnK,
    /// Value projection (`attn_v`).
    AttnV,
    /// Attention output projection (`attn_output`).
    AttnOut,
    /// RMS norm weights before the feed-forward block (`ffn_norm`).
    FfnNorm,
    /// Gate projection of the SwiGLU feed-forward (`ffn_gate`).
    FfnGate,
    /// Up projection of the feed-forward (`ffn_up`).
    FfnUp,
    /// Down projection of the feed-forward (`ffn_down`).
    FfnDown,
}

impl BlockTensor {
    /// The tensor's name inside a block, as in `blk.{layer}.{name}.weight`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            BlockTensor::AttnNorm => "attn_norm",
            BlockTensor::AttnQ => "attn_q",
            BlockTensor::AttnK => "attn_k",
            BlockTensor::AttnV => "attn_v",
            BlockTensor::AttnOut => "attn_output",
            BlockTensor::FfnNorm => "ffn_norm",
            BlockTensor::FfnGate => "ffn_gate",
            BlockTensor::FfnUp => "ffn_up",
            BlockTensor::FfnDown => "ffn_down",
        }
    }
}

/// Token embeddings `[n_embd, vocab]` (text models; CSM's text embeddings too).
pub const TOKEN_EMBD: &str = "token_embd.weight";
/// Untied output head `[n_embd, vocab]`; when absent, text models reuse the token embeddings.
pub const OUTPUT: &str = "output.weight";
/// Precomputed RoPE frequency factors, which take the place of the ones computed from the config.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// Names of a transformer stack's tensors under a prefix ("" for `llama`, "backbone." for CSM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackNames {
    prefix: String,
}

impl StackNames {
    /// Names under `prefix`, which ends in `.` unless empty.
    pub fn new(prefix: &str) -> Self {
        StackNames { prefix: prefix.to_owned() }
    }

    /// Name of tensor `t` of block `layer`, e.g. `backbone.blk.3.attn_q.weight`.
    pub fn block(&self, layer: usize, t: BlockTensor) -> String {
        format!("{}blk.{layer}.{}.weight", self.prefix, t.gguf_name())
    }

    /// Name of the final RMS norm's weights, after the last block.
    pub fn output_norm(&self) -> String {
        format!("{}output_norm.weight", self.prefix)
    }
}
