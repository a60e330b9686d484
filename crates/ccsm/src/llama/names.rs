//! The one table of GGUF tensor names for Llama stacks (text models, CSM backbone and decoder).

/// Tensors of one transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockTensor {
    AttnNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnOut,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnDown,
}

impl BlockTensor {
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

/// Text models: token embeddings, untied output head, precomputed RoPE frequency factors.
pub const TOKEN_EMBD: &str = "token_embd.weight";
pub const OUTPUT: &str = "output.weight";
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// Names of a transformer stack's tensors under a prefix ("" for `llama`, "backbone." for CSM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackNames {
    prefix: String,
}

impl StackNames {
    pub fn new(prefix: &str) -> Self {
        StackNames { prefix: prefix.to_owned() }
    }

    pub fn block(&self, layer: usize, t: BlockTensor) -> String {
        format!("{}blk.{layer}.{}.weight", self.prefix, t.gguf_name())
    }

    pub fn output_norm(&self) -> String {
        format!("{}output_norm.weight", self.prefix)
    }
}
