//! A Llama stack as ggml graph nodes: per block RMSNorm → attention (RoPE, KV cache, flash
//! attention) → residual → RMSNorm → SwiGLU MLP → residual; then the final norm.

use ggml::{Context, DType, Graph, RopeParams, Tensor, TensorId, TensorStore};

use super::config::LlamaConfig;
use super::names::{BlockTensor, StackNames};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::weights::WeightLoader;

/// Per-step inputs shared by every block (filled after the graph is allocated).
#[derive(Clone, Copy)]
pub struct StepInputs<'c> {
    /// I32 `[n]`: absolute position of each new token.
    pub positions: Tensor<'c>,
    /// I64 `[n]`: cache cell each new token's K/V row goes to.
    pub cells: Tensor<'c>,
    /// F16 `[n_kv, n]`: additive attention mask over the first `n_kv` cells.
    pub mask: Tensor<'c>,
    /// F32 `[rope_dims / 2]`: RoPE frequency divisors, when the model scales RoPE.
    pub freq_factors: Option<Tensor<'c>>,
}

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

/// What one graph needs from its surroundings.
pub struct BuildScope<'c, 'g> {
    pub ctx: &'c Context,
    pub graph: &'g mut Graph<'c>,
    pub weights: &'c TensorStore,
    pub cache: &'c KvCache,
    pub inputs: StepInputs<'c>,
    /// Also compute the attention mass each cell receives (summed over layers, heads and queries)
    /// as the output "attn_mass" `[n_kv]`, for the attention eviction policy.
    pub track_attention: bool,
    attention_mass: Option<Tensor<'c>>,
}

impl<'c, 'g> BuildScope<'c, 'g> {
    pub fn new(ctx: &'c Context, graph: &'g mut Graph<'c>, weights: &'c TensorStore, cache: &'c KvCache, inputs: StepInputs<'c>) -> Self {
        BuildScope { ctx, graph, weights, cache, inputs, track_attention: false, attention_mass: None }
    }

    pub fn tracking_attention(mut self, on: bool) -> Self {
        self.track_attention = on;
        self
    }

    /// softmax(K·Q) of one layer, summed per cell, added to the running total.
    fn add_attention_mass(&mut self, keys: Tensor<'c>, queries: Tensor<'c>, scale: f32) -> Result<()> {
        let ctx = self.ctx;
        let scores = ctx.soft_max_ext(ctx.mul_mat(keys, queries)?, Some(self.inputs.mask), scale)?;
        let [n_kv, n, heads, _] = scores.shape();
        let per_query = ctx.cont(ctx.transpose(ctx.reshape(scores, &[n_kv, n * heads])?)?)?;
        let mass = ctx.reshape(ctx.sum_rows(per_query)?, &[n_kv])?;
        self.attention_mass = Some(match self.attention_mass {
            Some(total) => ctx.add(total, mass)?,
            None => mass,
        });
        Ok(())
    }
}

impl Attention {
    fn load(loader: &mut WeightLoader<'_>, names: &StackNames, c: &LlamaConfig, l: usize) -> Result<Self> {
        Ok(Attention {
            norm: loader.vector_f32(&names.block(l, BlockTensor::AttnNorm), c.n_embd)?,
            q: loader.matrix(&names.block(l, BlockTensor::AttnQ), &[c.n_embd, c.n_embd_q()])?,
            k: loader.matrix(&names.block(l, BlockTensor::AttnK), &[c.n_embd, c.n_embd_kv()])?,
            v: loader.matrix(&names.block(l, BlockTensor::AttnV), &[c.n_embd, c.n_embd_kv()])?,
            out: loader.matrix(&names.block(l, BlockTensor::AttnOut), &[c.n_embd_q(), c.n_embd])?,
        })
    }

    /// x `[n_embd, n]` → attention output `[n_embd, n]`, storing this step's K/V rows in the cache.
    fn build<'c>(&self, s: &mut BuildScope<'c, '_>, c: &LlamaConfig, layer: usize, x: Tensor<'c>) -> Result<Tensor<'c>> {
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
        let q = ctx.reshape(ctx.mul_mat(w(self.q), h)?, &[hd, n_head, n])?;
        let q = ctx.rope_ext(q, s.inputs.positions, s.inputs.freq_factors, &rope)?.set_name(&format!("blk.{layer}.q"));
        let k = ctx.reshape(ctx.mul_mat(w(self.k), h)?, &[hd, n_head_kv, n])?;
        let k = ctx.rope_ext(k, s.inputs.positions, s.inputs.freq_factors, &rope)?.set_name(&format!("blk.{layer}.k"));
        let v = ctx.mul_mat(w(self.v), h)?.set_name(&format!("blk.{layer}.v"));

        // A rotated cache stores H·k and H·v per head: queries rotate with the keys (scores keep
        // q·k), and the attention output comes back through H (see kv_cache::rotation).
        let hadamard = s.cache.hadamard_tensor();
        let rotate = |t: Tensor<'c>, on: bool| -> Result<Tensor<'c>> {
            match (hadamard, on) {
                (Some(h), true) => Ok(ctx.reshape(ctx.mul_mat(h, ctx.reshape(t, &[hd, t.nelements() / hd])?)?, &t.shape()[..t.n_dims()])?),
                _ => Ok(t),
            }
        };
        let (rotate_k, rotate_v) = (s.cache.rotates_k(), s.cache.rotates_v());
        let q = rotate(q, rotate_k)?;
        let k = rotate(k, rotate_k)?;
        let v = rotate(v, rotate_v)?;

        // The stores run before the attention reads the cache: they enter the graph first.
        let k_rows = ctx.reshape(k, &[hd * n_head_kv, n])?;
        s.graph.expand(s.cache.store_k(ctx, layer, k_rows, s.inputs.cells)?)?;
        s.graph.expand(s.cache.store_v(ctx, layer, v, s.inputs.cells)?)?;

        let n_kv = s.inputs.mask.ne(0) as usize;
        let keys = ctx.permute(s.cache.k_tensor(ctx, layer, n_kv)?, [0, 2, 1, 3])?;
        let values = ctx.permute(s.cache.v_tensor(ctx, layer, n_kv)?, [0, 2, 1, 3])?;
        let queries = ctx.permute(q, [0, 2, 1, 3])?;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        if s.track_attention {
            s.add_attention_mass(keys, queries, scale)?;
        }
        let attended = rotate(ctx.flash_attn_ext(queries, keys, values, Some(s.inputs.mask), scale)?, rotate_v)?;
        let merged = ctx.reshape(attended, &[hd * n_head, n])?;
        Ok(ctx.mul_mat(w(self.out), merged)?.set_name(&format!("blk.{layer}.attn_out")))
    }
}

impl Mlp {
    fn load(loader: &mut WeightLoader<'_>, names: &StackNames, c: &LlamaConfig, l: usize) -> Result<Self> {
        Ok(Mlp {
            norm: loader.vector_f32(&names.block(l, BlockTensor::FfnNorm), c.n_embd)?,
            gate: loader.matrix(&names.block(l, BlockTensor::FfnGate), &[c.n_embd, c.n_ff])?,
            up: loader.matrix(&names.block(l, BlockTensor::FfnUp), &[c.n_embd, c.n_ff])?,
            down: loader.matrix(&names.block(l, BlockTensor::FfnDown), &[c.n_ff, c.n_embd])?,
        })
    }

    fn build<'c>(&self, s: &BuildScope<'c, '_>, c: &LlamaConfig, layer: usize, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let (ctx, w) = (s.ctx, |id| s.weights.get(id));
        let h = ctx.mul(ctx.rms_norm(x, c.rms_eps)?, w(self.norm))?;
        let act = ctx.swiglu(ctx.mul_mat(w(self.gate), h)?, ctx.mul_mat(w(self.up), h)?)?;
        Ok(ctx.mul_mat(w(self.down), act)?.set_name(&format!("blk.{layer}.ffn_out")))
    }
}

impl Block {
    fn build<'c>(&self, s: &mut BuildScope<'c, '_>, c: &LlamaConfig, layer: usize, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let x = s.ctx.add(x, self.attention.build(s, c, layer, x)?)?;
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
            Some(f) => Ok(Some(ctx.new_tensor(DType::F32, &[f.len() as i64])?.set_input().set_name("rope_freq_factors"))),
        }
    }

    /// Embeddings `[n_embd, n]` → final-normed hidden states `[n_embd, n]`.
    pub fn build<'c>(&self, s: &mut BuildScope<'c, '_>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let mut x = x;
        for (layer, block) in self.blocks.iter().enumerate() {
            x = block.build(s, &self.config, layer, x)?;
        }
        let normed = s.ctx.mul(s.ctx.rms_norm(x, self.config.rms_eps)?, s.weights.get(self.output_norm))?;
        if let Some(mass) = s.attention_mass.take() {
            s.graph.expand(mass.set_name("attn_mass").set_output())?;
        }
        Ok(normed.set_name("output_norm"))
    }

    /// Graph nodes one step of this stack needs at most (for sizing contexts).
    pub fn max_nodes(&self) -> usize {
        // About 40 per block, up to 12 more when the cache rotates.
        64 * self.config.n_layer + 64
    }
}
