//! A Llama stack as ggml graph nodes: per block RMSNorm → attention (RoPE, KV cache, flash
//! attention) → residual → RMSNorm → SwiGLU MLP → residual; then the final norm.

use ggml::{Context, DType, RopeParams, Tensor, TensorId};

use super::config::LlamaConfig;
use super::names::{BlockTensor, StackNames};
use crate::attention::{self, AttentionShape, BuildScope};
use crate::error::Result;
use crate::weights::WeightLoader;
use crate::Logits;

struct Attention {
    norm: TensorId,
    q: TensorId,
    k: TensorId,
    v: TensorId,
    out: TensorId,
}

struct Mlp {
    norm: TensorId,
    gate: TensorId,
    up: TensorId,
    down: TensorId,
}

struct Block {
    attention: Attention,
    mlp: Mlp,
}

/// The weights and config of one stack; the weights' data lives in the model's `TensorStore`.
pub struct Transformer {
    config: LlamaConfig,
    blocks: Vec<Block>,
    output_norm: TensorId,
    freq_factors: Option<Vec<f32>>,
}

impl Attention {
    fn load(loader: &mut WeightLoader<'_>, names: &StackNames, c: &LlamaConfig, l: usize) -> Result<Self> {
        Ok(Attention {
            norm: loader.vector_f32(&names.block(l, BlockTensor::AttnNorm), c.n_embd)?,
            q: loader.product_matrix(&names.block(l, BlockTensor::AttnQ), &[c.n_embd, c.n_embd_q()])?,
            k: loader.product_matrix(&names.block(l, BlockTensor::AttnK), &[c.n_embd, c.n_embd_kv()])?,
            v: loader.product_matrix(&names.block(l, BlockTensor::AttnV), &[c.n_embd, c.n_embd_kv()])?,
            out: loader.product_matrix(&names.block(l, BlockTensor::AttnOut), &[c.n_embd_q(), c.n_embd])?,
        })
    }

    /// x `[n_embd, n]` → attention output `[n_embd, n]` (only the last row's with `last_only`),
    /// storing this step's K/V rows in the cache.
    fn build<'c>(&self, s: &mut BuildScope<'c, '_>, c: &LlamaConfig, layer: usize, x: Tensor<'c>, last_only: bool) -> Result<Tensor<'c>> {
        let (ctx, w) = (s.ctx, |id| s.weights.get(id));
        let n = x.ne(1);
        let (hd, n_head, n_head_kv) = (c.head_dim as i64, c.n_head as i64, c.n_head_kv as i64);
        let h = ctx.mul(ctx.rms_norm(x, c.rms_eps)?, w(self.norm))?;
        let rope = RopeParams {
            n_dims: c.rope.n_dims as i32,
            mode: c.rope.mode,
            n_ctx_orig: c.n_ctx_train as i32,
            freq_base: c.rope.freq_base,
            ..Default::default()
        };
        let q = ctx.reshape(ctx.product(w(self.q), h)?, &[hd, n_head, n])?;
        let q = ctx.rope_ext(q, s.inputs.positions, s.inputs.freq_factors, &rope)?.set_name(&format!("blk.{layer}.q"));
        let k = ctx.reshape(ctx.product(w(self.k), h)?, &[hd, n_head_kv, n])?;
        let k = ctx.rope_ext(k, s.inputs.positions, s.inputs.freq_factors, &rope)?.set_name(&format!("blk.{layer}.k"));
        let v = ctx.product(w(self.v), h)?.set_name(&format!("blk.{layer}.v"));
        let shape = AttentionShape { head_dim: c.head_dim, n_head: c.n_head, n_head_kv: c.n_head_kv };
        let merged = attention::over_cache(s, layer, shape, q, k, v)?;
        let merged = if last_only { s.kept_rows(merged)? } else { merged };
        Ok(ctx.product(w(self.out), merged)?.set_name(&format!("blk.{layer}.attn_out")))
    }
}

impl Mlp {
    fn load(loader: &mut WeightLoader<'_>, names: &StackNames, c: &LlamaConfig, l: usize) -> Result<Self> {
        Ok(Mlp {
            norm: loader.vector_f32(&names.block(l, BlockTensor::FfnNorm), c.n_embd)?,
            gate: loader.product_matrix(&names.block(l, BlockTensor::FfnGate), &[c.n_embd, c.n_ff])?,
            up: loader.product_matrix(&names.block(l, BlockTensor::FfnUp), &[c.n_embd, c.n_ff])?,
            down: loader.product_matrix(&names.block(l, BlockTensor::FfnDown), &[c.n_ff, c.n_embd])?,
        })
    }

    fn build<'c>(&self, s: &BuildScope<'c, '_>, c: &LlamaConfig, layer: usize, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let (ctx, w) = (s.ctx, |id| s.weights.get(id));
        let h = ctx.mul(ctx.rms_norm(x, c.rms_eps)?, w(self.norm))?;
        let act = ctx.swiglu(ctx.product(w(self.gate), h)?, ctx.product(w(self.up), h)?)?;
        Ok(ctx.product(w(self.down), act)?.set_name(&format!("blk.{layer}.ffn_out")))
    }
}

impl Block {
    /// With `last_only` every row's K/V still enter the cache, but the rest of the block (output
    /// projection, residual, MLP) runs for the last row alone.
    fn build<'c>(&self, s: &mut BuildScope<'c, '_>, c: &LlamaConfig, layer: usize, x: Tensor<'c>, last_only: bool) -> Result<Tensor<'c>> {
        let attended = self.attention.build(s, c, layer, x, last_only)?;
        let x = if last_only { s.kept_rows(x)? } else { x };
        let x = s.ctx.add(x, attended)?;
        let x = s.ctx.add(x, self.mlp.build(s, c, layer, x)?)?;
        Ok(x.set_name(&format!("blk.{layer}.out")))
    }
}

impl Transformer {
    /// Declares every tensor of the stack (checked against `config`) on the loader.
    pub fn load(loader: &mut WeightLoader<'_>, names: &StackNames, config: LlamaConfig, freq_factors: Option<Vec<f32>>) -> Result<Self> {
        let blocks = (0..config.n_layer)
            .map(|l| Ok(Block { attention: Attention::load(loader, names, &config, l)?, mlp: Mlp::load(loader, names, &config, l)? }))
            .collect::<Result<Vec<_>>>()?;
        let output_norm = loader.vector_f32(&names.output_norm(), config.n_embd)?;
        let freq_factors = freq_factors.or_else(|| config.rope.freq_factors());
        Ok(Transformer { config, blocks, output_norm, freq_factors })
    }

    /// The stack's hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// RoPE frequency divisors the step inputs must carry (`None`: unscaled RoPE).
    pub fn freq_factors(&self) -> Option<&[f32]> {
        self.freq_factors.as_deref()
    }

    /// A new F32 input tensor for the frequency factors, when the stack has them.
    pub fn freq_factor_input<'c>(&self, ctx: &'c Context) -> Result<Option<Tensor<'c>>> {
        match &self.freq_factors {
            None => Ok(None),
            Some(f) => Ok(Some(ctx.new_tensor(DType::F32, &[f.len() as i64])?.set_input())),
        }
    }

    /// Embeddings `[n_embd, n]` → final-normed hidden states `[n_embd, n]`, or `[n_embd, 1]` of the
    /// last row with `Logits::Last` (the last block's projections and MLP then skip the other rows,
    /// as llama.cpp does: 1/n_layer of a prompt's MLP work).
    pub fn build<'c>(&self, s: &mut BuildScope<'c, '_>, x: Tensor<'c>, rows: Logits) -> Result<Tensor<'c>> {
        let mut x = x;
        let last_layer = self.blocks.len().saturating_sub(1);
        for (layer, block) in self.blocks.iter().enumerate() {
            let last_only = rows == Logits::Last && layer == last_layer && (x.ne(1) > 1 || s.output_rows.is_some());
            x = block.build(s, &self.config, layer, x, last_only)?;
        }
        let normed = s.ctx.mul(s.ctx.rms_norm(x, self.config.rms_eps)?, s.weights.get(self.output_norm))?;
        Ok(normed.set_name("output_norm"))
    }

    /// Graph nodes one step of this stack needs at most (for sizing contexts).
    pub fn max_nodes(&self) -> usize {
        // About 40 per block, up to 12 more when the cache rotates.
        64 * self.config.n_layer + 64
    }
}
