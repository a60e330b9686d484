//! Attention over a cache with a recent window: the step's newest rows also go to the window's f16
//! ring, and each query reads three sources as one softmax (the cache's typed rows, the ring, and
//! this step's rows as computed), each under its own mask from `KvCache::step_masks`.

use ggml::{AttentionSource, Context, Graph, Tensor};

use super::RecentInputs;
use crate::error::Result;
use crate::kv_cache::{Half, KvCache};

/// Queries `q` `[head_dim, n_head, n]` over layer `layer` of `cache`, whose step rows `k_rows` and
/// `v_rows` `[n_embd_kv, n]` (contiguous, rotated as the cache stores them) are already stored in the
/// cache's own rows; `mask` is the cache rows' mask. Returns `[head_dim, n_head, n]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend<'c>(
    ctx: &'c Context,
    graph: &mut Graph<'c>,
    cache: &'c KvCache,
    layer: usize,
    inputs: RecentInputs<'c>,
    q: Tensor<'c>,
    [k_rows, v_rows]: [Tensor<'c>; 2],
    mask: Tensor<'c>,
    scale: f32,
) -> Result<Tensor<'c>> {
    let c = cache.config();
    let (hd, n_head_kv, n) = (c.head_dim as i64, c.n_head_kv as i64, k_rows.ne(1));
    let m = inputs.slots.ne(0);
    // The step's last m rows go to the ring (before the attention reads it: they enter the graph first).
    let newest = |t: Tensor<'c>| -> Result<Tensor<'c>> {
        let row = t.strides()[1];
        Ok(ctx.view(t, &[t.ne(0), m], &[row], (n - m) as usize * row)?)
    };
    graph.expand(cache.store_recent(ctx, layer, Half::K, newest(k_rows)?, inputs.slots)?)?;
    graph.expand(cache.store_recent(ctx, layer, Half::V, newest(v_rows)?, inputs.slots)?)?;
    let by_cell = |t: Tensor<'c>| -> Result<Tensor<'c>> { Ok(ctx.permute(t, [0, 2, 1, 3])?) };
    let step = |t: Tensor<'c>| -> Result<Tensor<'c>> { by_cell(ctx.reshape(t, &[hd, n_head_kv, n])?) };
    let n_kv = mask.ne(0) as usize;
    // The two small sources first: they share one partials node (one part each, one per thread).
    let sources = [
        AttentionSource {
            k: by_cell(cache.recent_tensor(ctx, layer, Half::K)?)?,
            v: by_cell(cache.recent_tensor(ctx, layer, Half::V)?)?,
            mask: inputs.ring_mask,
        },
        AttentionSource { k: step(k_rows)?, v: step(v_rows)?, mask: inputs.step_mask },
        AttentionSource { k: by_cell(cache.k_tensor(ctx, layer, n_kv)?)?, v: by_cell(cache.v_tensor(ctx, layer, n_kv)?)?, mask },
    ];
    Ok(ctx.split_attention_over(by_cell(q)?, &sources, scale)?)
}
