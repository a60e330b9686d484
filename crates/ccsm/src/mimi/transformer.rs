//! Mimi's decoder transformer: per block LayerNorm (with bias) → attention over the codec's KV cache
//! (RoPE at absolute positions, a causal window of `context` steps) → LayerScale → residual →
//! LayerNorm → fc1 → exact GELU → fc2 → LayerScale → residual. No final norm.

use ggml::{DType, RopeParams, Tensor, TensorId};

use super::config::MimiTransformerConfig;
use crate::attention::{self, AttentionShape, BuildScope};
use crate::error::Result;
use crate::weights::WeightLoader;

struct LayerNorm {
    weight: TensorId,
    bias: TensorId,
}

struct Block {
    attn_norm: LayerNorm,
    /// `[width, q + k + v rows]`: one product for the three projections.
    qkv: TensorId,
    out: TensorId,
    attn_scale: TensorId,
    ffn_norm: LayerNorm,
    up: TensorId,
    down: TensorId,
    ffn_scale: TensorId,
}

pub struct MimiTransformer {
    config: MimiTransformerConfig,
    width: usize,
    blocks: Vec<Block>,
}

impl LayerNorm {
    fn load(loader: &mut WeightLoader<'_>, name: &str, width: usize) -> Result<Self> {
        Ok(LayerNorm {
            weight: loader.vector_f32(&format!("{name}.weight"), width)?,
            bias: loader.vector_f32(&format!("{name}.bias"), width)?,
        })
    }

    fn build<'c>(&self, s: &BuildScope<'c, '_>, x: Tensor<'c>, eps: f32) -> Result<Tensor<'c>> {
        let ctx = s.ctx;
        Ok(ctx.add(ctx.mul(ctx.norm(x, eps)?, s.weights.get(self.weight))?, s.weights.get(self.bias))?)
    }
}

impl MimiTransformer {
    /// Declares `{prefix}transformer.blk.L.*` for every layer.
    pub fn load(loader: &mut WeightLoader<'_>, prefix: &str, config: MimiTransformerConfig, width: usize) -> Result<Self> {
        let (q_width, kv_width) = (config.n_head * config.head_dim, config.n_head_kv * config.head_dim);
        let blocks = (0..config.n_layer)
            .map(|l| {
                let name = |t: &str| format!("{prefix}transformer.blk.{l}.{t}");
                Ok(Block {
                    attn_norm: LayerNorm::load(loader, &name("attn_norm"), width)?,
                    qkv: loader.matrix(&name("attn_qkv.weight"), &[width, q_width + 2 * kv_width])?,
                    out: loader.matrix(&name("attn_output.weight"), &[q_width, width])?,
                    attn_scale: loader.vector_f32(&name("attn_scale.weight"), width)?,
                    ffn_norm: LayerNorm::load(loader, &name("ffn_norm"), width)?,
                    up: loader.matrix(&name("ffn_up.weight"), &[width, config.n_ff])?,
                    down: loader.matrix(&name("ffn_down.weight"), &[config.n_ff, width])?,
                    ffn_scale: loader.vector_f32(&name("ffn_scale.weight"), width)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MimiTransformer { config, width, blocks })
    }

    /// x `[width, n]` (n steps at the scope's positions) → `[width, n]`.
    pub fn build<'c>(&self, s: &mut BuildScope<'c, '_>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let c = &self.config;
        let (hd, n) = (c.head_dim as i64, x.ne(1));
        let rope = RopeParams { n_dims: c.head_dim as i32, mode: c.rope_mode, freq_base: c.rope_base, ..Default::default() };
        let shape = AttentionShape { head_dim: c.head_dim, n_head: c.n_head, n_head_kv: c.n_head_kv };
        let mut x = x;
        for (layer, b) in self.blocks.iter().enumerate() {
            let (ctx, w) = (s.ctx, |id| s.weights.get(id));
            let h = b.attn_norm.build(s, x, c.norm_eps)?;
            let qkv = ctx.mul_mat(w(b.qkv), h)?;
            let (f, row) = (DType::F32.type_size(), qkv.strides()[1]);
            let (q_heads, kv_heads) = (c.n_head as i64, c.n_head_kv as i64);
            let part =
                |heads: i64, first_head: i64| ctx.view(qkv, &[hd, heads, n], &[hd as usize * f, row], (first_head * hd) as usize * f);
            let q = ctx.rope_ext(ctx.cont(part(q_heads, 0)?)?, s.inputs.positions, None, &rope)?;
            let k = ctx.rope_ext(ctx.cont(part(kv_heads, q_heads)?)?, s.inputs.positions, None, &rope)?;
            let v = ctx.cont(ctx.view(qkv, &[hd * kv_heads, n], &[row], ((q_heads + kv_heads) * hd) as usize * f)?)?;
            let attended = attention::over_cache(s, layer, shape, q, k, v)?;
            let (ctx, w) = (s.ctx, |id| s.weights.get(id));
            x = ctx.add(x, ctx.mul(ctx.mul_mat(w(b.out), attended)?, w(b.attn_scale))?)?;
            let h = b.ffn_norm.build(s, x, c.norm_eps)?;
            let ff = ctx.mul_mat(w(b.down), ctx.gelu_erf(ctx.mul_mat(w(b.up), h)?)?)?;
            x = ctx.add(x, ctx.mul(ff, w(b.ffn_scale))?)?.set_name(&format!("codec.blk.{layer}.out"));
        }
        debug_assert_eq!(x.ne(0) as usize, self.width);
        Ok(x)
    }

    /// Graph nodes the transformer needs at most.
    pub fn max_nodes(&self) -> usize {
        48 * self.config.n_layer + 16
    }
}
