//! Causal convolutions as graph nodes, streaming: each carries its state from one call to the next in a
//! state tensor (zeros at the start, which is the causal zero padding), so decoding frame by frame gives
//! what decoding everything at once gives.
//!
//! Activations are `[channels, time]`, channels contiguous, so a window of K consecutive columns is K·C
//! contiguous values: a convolution is one matrix product of the weight `[K·Cin, Cout]` (stored
//! `[Cin, K, Cout]`) with those windows copied out (ggml's views cannot overlap) or, over many columns
//! where the copy would cost more than it saves, a sum of products over shifted views of the input, all
//! in F32 activations (ggml's own conv_1d would round them to F16). A transposed convolution is the product of the weight `[Cin, Cout·K]` with
//! the input, then an overlap-add of its K/stride column groups (col2im), the group that spills into the
//! next call kept as state.

use ggml::{Context, DType, Tensor, TensorId, TensorStore};

use crate::error::{Error, Result};
use crate::weights::WeightLoader;

/// Shapes of the state tensors, in slot order; a layer registers its state while it is declared.
#[derive(Default)]
pub struct StateLayout {
    shapes: Vec<(String, [i64; 2])>,
}

impl StateLayout {
    fn add(&mut self, name: &str, shape: [usize; 2]) -> usize {
        self.shapes.push((format!("state.{name}"), [shape[0] as i64, shape[1] as i64]));
        self.shapes.len() - 1
    }
}

/// The state tensors of one decoding stream (F32, zeroed by `reset`).
pub struct ConvStates {
    store: TensorStore,
    ids: Vec<TensorId>,
}

impl ConvStates {
    pub fn new(layout: &StateLayout, placement: &crate::Placement) -> Result<Self> {
        let mut store = TensorStore::new(layout.shapes.len().max(1))?;
        let ids = layout.shapes.iter().map(|(name, shape)| store.add(name, DType::F32, shape)).collect::<ggml::Result<Vec<_>>>()?;
        placement.allocate(&mut store)?;
        Ok(ConvStates { store, ids })
    }

    /// Back to the start of a stream: all zeros.
    pub fn reset(&self) -> Result<()> {
        for &id in &self.ids {
            let t = self.store.get(id);
            t.write_bytes(&vec![0u8; t.nbytes()])?;
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.store.buffer_bytes()
    }

    fn get(&self, slot: usize) -> Tensor<'_> {
        self.store.get(self.ids[slot])
    }
}

/// What conv nodes are built with: the graph context, the weights, the states, and the state updates,
/// which enter the graph after everything that reads the states.
pub struct ConvScope<'c> {
    pub ctx: &'c Context,
    pub weights: &'c TensorStore,
    pub states: &'c ConvStates,
    pub updates: Vec<Tensor<'c>>,
}

impl<'c> ConvScope<'c> {
    /// Schedules `value` to become state `slot` once the graph has read the old one.
    fn update(&mut self, slot: usize, value: Tensor<'c>) -> Result<()> {
        let node = self.ctx.cpy(value, self.states.get(slot))?;
        self.updates.push(node);
        Ok(())
    }

    fn state(&self, slot: usize) -> Tensor<'c> {
        self.states.get(slot)
    }
}

/// Up to this many output columns a convolution stacks its shifted inputs into one product; beyond, it
/// sums one product per tap (the stacking copy would cost more than the products gain).
const ONE_PRODUCT_MAX_COLUMNS: i64 = 32;

/// Up to this many values per window (input channels × taps) a convolution always stacks.
const ONE_PRODUCT_MAX_WINDOW: usize = 64;

/// A causal 1-D convolution, stride 1: output t sees inputs t − (K−1)·d … t.
pub struct CausalConv {
    weight: TensorId,
    bias: TensorId,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    dilation: usize,
    /// The last (K−1)·d input columns of the previous call (none for K = 1).
    state: Option<usize>,
}

impl CausalConv {
    /// Declares `{name}.weight` `[c_in, kernel, c_out]` and `{name}.bias` `[c_out]`.
    pub fn load(loader: &mut WeightLoader<'_>, layout: &mut StateLayout, name: &str, shape: [usize; 3], dilation: usize) -> Result<Self> {
        let [c_in, kernel, c_out] = shape;
        let weight = if (c_in * kernel) as i64 <= ggml::MAX_NARROW_INNER {
            // A few values per window (the encoder's first conv): f32 for the narrow product's kernel.
            loader.dense_f32(&format!("{name}.weight"), &[c_in, kernel, c_out])?
        } else {
            loader.matrix(&format!("{name}.weight"), &[c_in, kernel, c_out])?
        };
        let bias = loader.vector_f32(&format!("{name}.bias"), c_out)?;
        let history = (kernel - 1) * dilation;
        let state = (history > 0).then(|| layout.add(name, [c_in, history]));
        Ok(CausalConv { weight, bias, c_in, c_out, kernel, dilation, state })
    }

    /// x `[c_in, T]` (contiguous) → `[c_out, T]`: Σ over taps j of W_j · x shifted by j·d columns, each a
    /// dense product (ggml has no overlapping views for a one-product im2col).
    pub fn build<'c>(&self, s: &mut ConvScope<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let ctx = s.ctx;
        let (c_in, c_out, t) = (self.c_in as i64, self.c_out as i64, x.ne(1));
        let weight = s.weights.get(self.weight);
        let input = match self.state {
            None => x,
            Some(slot) => {
                let history = (self.kernel - 1) * self.dilation;
                let input = ctx.concat(s.state(slot), x, 1)?;
                let column = input.strides()[1];
                s.update(slot, ctx.view(input, &[c_in, history as i64], &[column], t as usize * column)?)?;
                input
            }
        };
        let column = input.strides()[1];
        let tap = |j: usize| ctx.view(input, &[c_in, t], &[column], j * self.dilation * column);
        if self.kernel > 1 && self.dilation == 1 && (t <= ONE_PRODUCT_MAX_COLUMNS || self.c_in * self.kernel <= ONE_PRODUCT_MAX_WINDOW) {
            // Few columns: the products would be matrix-vector ones reading the weight in K strided
            // pieces; the K-column windows of the input (one copy) make it one product over the whole.
            // A narrow input (the encoder's first conv reads 1 channel) stacks at any length: per tap,
            // each product would have an inner dimension of 1.
            let stacked = ctx.windows(input, self.kernel, 1)?;
            let w = ctx.reshape(weight, &[c_in * self.kernel as i64, c_out])?;
            let y = if w.ne(0) <= ggml::MAX_NARROW_INNER { ctx.narrow_product(w, stacked)? } else { ctx.mul_mat(w, stacked)? };
            return Ok(ctx.add(y, s.weights.get(self.bias))?);
        }
        let mut y: Option<Tensor<'c>> = None;
        for j in 0..self.kernel {
            // W_j: row j of every output's [Cin, K] kernel; the input from column j·d on.
            let w_j = ctx.view(weight, &[c_in, c_out], &[weight.strides()[2]], j * weight.strides()[1])?;
            let x_j = tap(j)?;
            let product = ctx.mul_mat(w_j, x_j)?;
            y = Some(match y {
                Some(sum) => ctx.add(sum, product)?,
                None => product,
            });
        }
        let y = y.ok_or_else(|| Error::Invariant("a convolution without taps".into()))?;
        Ok(ctx.add(y, s.weights.get(self.bias))?)
    }
}

/// The overlap-add of a transposed convolution whose kernel is twice its stride: the products `z`
/// `[c, 2·stride, T]` give output columns t·stride + r = z[:, r, t] + z[:, stride + r, t − 1]; the second
/// half of the last input column spills into the next call (`slot`).
fn overlap_add<'c>(s: &mut ConvScope<'c>, z: Tensor<'c>, channels: usize, stride: usize, slot: usize) -> Result<Tensor<'c>> {
    let ctx = s.ctx;
    let (c, st, t) = (channels as i64, stride as i64, z.ne(2));
    let f = DType::F32.type_size();
    let (col, group) = (channels * f, z.strides()[2]);
    let first = ctx.view(z, &[c, st, t], &[col, group], 0)?;
    let spill = |from: i64, len: i64| ctx.view(z, &[c, st, len], &[col, group], stride * col + from as usize * group);
    let carried = ctx.reshape(s.state(slot), &[c, st, 1])?;
    let second = if t == 1 { carried } else { ctx.concat(carried, spill(0, t - 1)?, 2)? };
    s.update(slot, spill(t - 1, 1)?)?;
    Ok(ctx.add(first, second)?)
}

/// A causal transposed 1-D convolution with kernel 2 × stride (SEANet's upsampling layers).
pub struct ConvTranspose {
    weight: TensorId,
    bias: TensorId,
    c_in: usize,
    c_out: usize,
    stride: usize,
    state: usize,
}

impl ConvTranspose {
    /// Declares `{name}.weight` `[c_in, c_out, 2·stride]` and `{name}.bias` `[c_out]`.
    pub fn load(
        loader: &mut WeightLoader<'_>,
        layout: &mut StateLayout,
        name: &str,
        c_in: usize,
        c_out: usize,
        stride: usize,
    ) -> Result<Self> {
        let weight = loader.matrix(&format!("{name}.weight"), &[c_in, c_out, 2 * stride])?;
        let bias = loader.vector_f32(&format!("{name}.bias"), c_out)?;
        let state = layout.add(name, [c_out, stride]);
        Ok(ConvTranspose { weight, bias, c_in, c_out, stride, state })
    }

    /// x `[c_in, T]` → `[c_out, T·stride]`.
    pub fn build<'c>(&self, s: &mut ConvScope<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let ctx = s.ctx;
        let (c_out, k, t) = (self.c_out as i64, 2 * self.stride as i64, x.ne(1));
        let w = ctx.reshape(s.weights.get(self.weight), &[self.c_in as i64, c_out * k])?;
        let z = ctx.reshape(ctx.mul_mat(w, x)?, &[c_out, k, t])?;
        let y = overlap_add(s, z, self.c_out, self.stride, self.state)?;
        let y = ctx.add(y, s.weights.get(self.bias))?;
        Ok(ctx.reshape(y, &[c_out, t * self.stride as i64])?)
    }
}

/// The depthwise transposed convolution that upsamples the latent (one kernel of 2 × stride taps per
/// channel, no bias).
pub struct DepthwiseUpsample {
    taps: TensorId,
    channels: usize,
    stride: usize,
    state: usize,
}

impl DepthwiseUpsample {
    /// Declares `name` `[channels, 2·stride]` (F32).
    pub fn load(loader: &mut WeightLoader<'_>, layout: &mut StateLayout, name: &str, channels: usize, stride: usize) -> Result<Self> {
        let taps = loader.dense_f32(name, &[channels, 2 * stride])?;
        let state = layout.add("upsample", [channels, stride]);
        Ok(DepthwiseUpsample { taps, channels, stride, state })
    }

    /// x `[channels, T]` → `[channels, T·stride]`.
    pub fn build<'c>(&self, s: &mut ConvScope<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let ctx = s.ctx;
        let (c, k, t) = (self.channels as i64, 2 * self.stride as i64, x.ne(1));
        if x.ne(0) != c {
            return Err(Error::Invariant(format!("upsampling {} channels with taps for {c}", x.ne(0))));
        }
        // z[c, j, t] = taps[c, j] · x[c, t]
        let spread = ctx.repeat_4d(ctx.reshape(x, &[c, 1, t])?, [c, k, t, 1])?;
        let z = ctx.mul(spread, ctx.reshape(s.weights.get(self.taps), &[c, k, 1])?)?;
        let y = overlap_add(s, z, self.channels, self.stride, self.state)?;
        Ok(ctx.reshape(y, &[c, t * self.stride as i64])?)
    }
}

/// A causal strided 1-D convolution with kernel 2 × stride (SEANet's encoder downsampling, Mimi's
/// learnt 25 → 12.5 Hz conv): output t sees inputs t·s − s … t·s + s − 1, the first s of them carried
/// from the previous call (zeros at the start, or with `replicate` the first input column repeated).
pub struct StridedConv {
    weight: TensorId,
    bias: Option<TensorId>,
    c_in: usize,
    c_out: usize,
    stride: usize,
    state: usize,
}

impl StridedConv {
    /// Declares `{name}.weight` `[c_in, 2·stride, c_out]` and, with `bias`, `{name}.bias` `[c_out]`.
    pub fn load(
        loader: &mut WeightLoader<'_>,
        layout: &mut StateLayout,
        name: &str,
        [c_in, c_out]: [usize; 2],
        stride: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = loader.matrix(&format!("{name}.weight"), &[c_in, 2 * stride, c_out])?;
        let bias = if bias { Some(loader.vector_f32(&format!("{name}.bias"), c_out)?) } else { None };
        let state = layout.add(name, [c_in, stride]);
        Ok(StridedConv { weight, bias, c_in, c_out, stride, state })
    }

    /// x `[c_in, T]` (T a multiple of the stride) → `[c_out, T / stride]`. With `replicate_start`,
    /// the columns before the input are its first column (the stream's first call), not the state.
    pub fn build<'c>(&self, s: &mut ConvScope<'c>, x: Tensor<'c>, replicate_start: bool) -> Result<Tensor<'c>> {
        let ctx = s.ctx;
        let (c_in, st, t) = (self.c_in as i64, self.stride as i64, x.ne(1));
        if t % st != 0 || x.ne(0) != c_in {
            return Err(Error::Invariant(format!("a stride-{st} conv over {:?}", x.shape())));
        }
        let before = if replicate_start {
            let first = ctx.view(x, &[c_in, 1], &[x.strides()[1]], 0)?;
            ctx.repeat_4d(ctx.cont(first)?, [c_in, st, 1, 1])?
        } else {
            s.state(self.state)
        };
        let input = ctx.concat(before, x, 1)?;
        let column = input.strides()[1];
        s.update(self.state, ctx.view(input, &[c_in, st], &[column], t as usize * column)?)?;
        // Output t reads the 2·stride columns from t·stride on (the first `stride` before the input).
        let w = ctx.reshape(s.weights.get(self.weight), &[c_in * 2 * st, self.c_out as i64])?;
        let half = self.c_in * self.stride;
        let y = if t / st > ONE_PRODUCT_MAX_COLUMNS && half.is_multiple_of(w.dtype().block_size()) {
            // Many outputs: two products over the groups of `stride` columns (group t with the first
            // half of the kernel, group t + 1 with the second) read the input in place; copying the
            // overlapping windows out would cost more than the products.
            let groups = t / st;
            let grouped = ctx.reshape(input, &[half as i64, groups + 1])?;
            let row = grouped.strides()[1];
            let w_half = |i: usize| -> Result<Tensor<'c>> {
                Ok(ctx.view(w, &[half as i64, w.ne(1)], &[w.strides()[1]], i * w.dtype().row_size(half)?)?)
            };
            let x_half = |i: usize| ctx.view(grouped, &[half as i64, groups], &[row], i * row);
            ctx.add(ctx.mul_mat(w_half(0)?, x_half(0)?)?, ctx.mul_mat(w_half(1)?, x_half(1)?)?)?
        } else {
            ctx.mul_mat(w, ctx.windows(input, 2 * self.stride, self.stride)?)?
        };
        Ok(match self.bias {
            Some(b) => ctx.add(y, s.weights.get(b))?,
            None => y,
        })
    }
}
