//! Compute ops a Llama graph needs. Each checks what ggml would assert, and returns an error instead.
//!
//! Operands may come from other contexts (weights, caches); the result borrows this context, and the
//! signatures make every operand outlive it.

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::DType;

/// How rotary position embedding pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RopeMode {
    /// Adjacent pairs (x0,x1), (x2,x3), … — GGUF llama weights.
    #[default]
    Normal,
    /// Halves paired (x0,x_{d/2}), … — HF-permuted weights.
    Neox,
}

/// Parameters of `rope_ext`, with ggml's neutral defaults (no YaRN, no scaling).
#[derive(Clone, Copy, Debug)]
pub struct RopeParams {
    /// Dimensions rotated (normally the head dimension).
    pub n_dims: i32,
    /// How the rotated dimensions are paired.
    pub mode: RopeMode,
    /// The model's training context in tokens; only YaRN (`ext_factor` > 0) reads it.
    pub n_ctx_orig: i32,
    /// Base of the rotation frequencies (theta): pair `i` turns by `pos * base^(-2i/n_dims)`.
    pub freq_base: f32,
    /// Multiplier on positions (1.0 = none; below 1 stretches the context linearly).
    pub freq_scale: f32,
    /// YaRN extrapolation mix, 0.0 to 1.0; 0.0 turns YaRN off.
    pub ext_factor: f32,
    /// Scale applied to the rotated values (YaRN's magnitude correction; 1.0 = none).
    pub attn_factor: f32,
    /// YaRN: rotation count above which dimensions are extrapolated (ggml's default 32).
    pub beta_fast: f32,
    /// YaRN: rotation count below which dimensions are interpolated (ggml's default 1).
    pub beta_slow: f32,
}

impl Default for RopeParams {
    fn default() -> Self {
        RopeParams {
            n_dims: 0,
            mode: RopeMode::Normal,
            n_ctx_orig: 0,
            freq_base: 10_000.0,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        }
    }
}

fn require_type(op: &'static str, t: Tensor<'_>, allowed: &[DType], why: &'static str) -> Result<()> {
    if allowed.contains(&t.dtype()) {
        Ok(())
    } else {
        Err(Error::Type { op, got: t.dtype(), why })
    }
}

/// b can be broadcast over a (each dimension of a is a multiple of b's).
fn require_repeat(op: &'static str, a: Tensor<'_>, b: Tensor<'_>) -> Result<()> {
    let (sa, sb) = (a.shape(), b.shape());
    if (0..4).all(|i| sa[i] % sb[i] == 0) {
        Ok(())
    } else {
        Err(Error::shape(op, "second operand does not broadcast over the first", &[sa, sb]))
    }
}

fn is_contiguous_1(t: Tensor<'_>) -> bool {
    // SAFETY: reads the header of a live tensor.
    unsafe { sys::ggml_is_contiguous_1(t.raw()) }
}

/// Types that ggml's CPU backend can use as the weight side of a matrix product or as a K/V cache.
fn has_vec_dot(dtype: DType) -> bool {
    !matches!(dtype, DType::I8 | DType::I16 | DType::I32 | DType::I64 | DType::F64 | DType::Q8_1 | DType::Q8K)
}

impl Context {
    /// Rows of `a` picked by the I32 indices in `b` (an embedding lookup). Index values are not
    /// checked here: whoever writes `b` keeps them below `a.ne(1)`.
    pub fn get_rows<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "get_rows";
        require_type(OP, b, &[DType::I32], "row indices must be i32")?;
        if a.is_interleaved() {
            return self.interleaved_rows(a, b);
        }
        if !a.dtype().can_dequantize() && a.dtype() != DType::I32 {
            return Err(Error::Type { op: OP, got: a.dtype(), why: "rows of this type cannot be read as f32" });
        }
        let (sa, sb) = (a.shape(), b.shape());
        if sa[2] != sb[1] || sa[3] != sb[2] || sb[3] != 1 {
            return Err(Error::shape(OP, "indices must be [n, a.ne2, a.ne3, 1]", &[sa, sb]));
        }
        self.reserve_headers(OP)?;
        // SAFETY: the shape and type conditions ggml_get_rows asserts were checked above.
        self.wrap(unsafe { sys::ggml_get_rows(self.raw(), a.raw(), b.raw()) }, OP)
    }

    /// The matrix product `a^T b` as ggml defines it: result `[a.ne1, b.ne1, b.ne2, b.ne3]`.
    pub fn mul_mat<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "mul_mat";
        if !has_vec_dot(a.dtype()) {
            return Err(Error::Type { op: OP, got: a.dtype(), why: "no dot product for this weight type" });
        }
        require_type(OP, b, &[DType::F32], "the right operand must be f32")?;
        if a.is_interleaved() {
            return Err(Error::invalid(OP, "interleaved weights are multiplied through Context::product"));
        }
        if a.is_transposed() || !a.rows_contiguous() {
            return Err(Error::shape(OP, "left operand must have contiguous rows (not transposed)", &[a.shape()]));
        }
        let (sa, sb) = (a.shape(), b.shape());
        if sa[0] != sb[0] || sb[2] % sa[2] != 0 || sb[3] % sa[3] != 0 {
            return Err(Error::shape(OP, "inner dimensions differ or batch dims do not broadcast", &[sa, sb]));
        }
        self.reserve_headers(OP)?;
        // SAFETY: ggml_can_mul_mat and !ggml_is_transposed(a) hold (checked above).
        self.wrap(unsafe { sys::ggml_mul_mat(self.raw(), a.raw(), b.raw()) }, OP)
    }

    /// RMS normalisation over `ne[0]` (without the learned scale; multiply by it with `mul`).
    pub fn rms_norm<'c>(&'c self, a: Tensor<'c>, eps: f32) -> Result<Tensor<'c>> {
        const OP: &str = "rms_norm";
        require_type(OP, a, &[DType::F32], "normalisation runs in f32")?;
        if !a.rows_contiguous() {
            return Err(Error::shape(OP, "rows must be contiguous", &[a.shape()]));
        }
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::invalid(OP, format!("eps {eps} must be finite and non-negative")));
        }
        self.reserve_headers(OP)?;
        // SAFETY: f32 input with contiguous rows, as the CPU kernel requires.
        self.wrap(unsafe { sys::ggml_rms_norm(self.raw(), a.raw(), eps) }, OP)
    }

    /// Element-wise product, `b` broadcast over `a`.
    pub fn mul<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        self.binary("mul", a, b, sys::ggml_mul)
    }

    /// Element-wise sum, `b` broadcast over `a`.
    pub fn add<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        self.binary("add", a, b, sys::ggml_add)
    }

    fn binary<'c>(
        &'c self,
        op: &'static str,
        a: Tensor<'c>,
        b: Tensor<'c>,
        f: unsafe extern "C" fn(*mut sys::ggml_context, *mut sys::ggml_tensor, *mut sys::ggml_tensor) -> *mut sys::ggml_tensor,
    ) -> Result<Tensor<'c>> {
        require_type(op, a, &[DType::F32], "element-wise ops run in f32")?;
        require_type(op, b, &[DType::F32], "element-wise ops run in f32")?;
        require_repeat(op, a, b)?;
        if !a.rows_contiguous() {
            return Err(Error::shape(op, "the first operand's rows must be contiguous", &[a.shape()]));
        }
        self.reserve_headers(op)?;
        // SAFETY: both operands are f32 and b broadcasts over a (ggml_can_repeat), as ggml asserts.
        self.wrap(unsafe { f(self.raw(), a.raw(), b.raw()) }, op)
    }

    /// Sums over `ne[0]`: `[n, a, b, c]` → `[1, a, b, c]`.
    pub fn sum_rows<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "sum_rows";
        require_type(OP, a, &[DType::F32], "sums run in f32")?;
        if !a.rows_contiguous() {
            return Err(Error::shape(OP, "rows must be contiguous", &[a.shape()]));
        }
        self.reserve_headers(OP)?;
        // SAFETY: f32 input with contiguous rows, as the CPU kernel asserts.
        self.wrap(unsafe { sys::ggml_sum_rows(self.raw(), a.raw()) }, OP)
    }

    /// Per row of a matrix `[n, m]`, the index of its largest value (ggml's kernel takes the last of
    /// equal ones): I32 `[m]`.
    pub fn argmax<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "argmax";
        require_type(OP, a, &[DType::F32], "the CPU kernel reads f32")?;
        if !a.rows_contiguous() || a.ne(2) != 1 || a.ne(3) != 1 || a.ne(0) > i32::MAX as i64 {
            return Err(Error::shape(OP, "needs a matrix with contiguous rows of at most 2^31 - 1 values", &[a.shape()]));
        }
        self.reserve_headers(OP)?;
        // SAFETY: a live f32 matrix with contiguous rows, which ggml_argmax asserts and its kernel reads.
        self.wrap(unsafe { sys::ggml_argmax(self.raw(), a.raw()) }, OP)
    }

    /// `a * s`.
    pub fn scale<'c>(&'c self, a: Tensor<'c>, s: f32) -> Result<Tensor<'c>> {
        const OP: &str = "scale";
        require_type(OP, a, &[DType::F32], "scaling runs in f32")?;
        if !is_contiguous_1(a) {
            return Err(Error::shape(OP, "rows must be contiguous", &[a.shape()]));
        }
        self.reserve_headers(OP)?;
        // SAFETY: f32 input with contiguous rows.
        self.wrap(unsafe { sys::ggml_scale(self.raw(), a.raw(), s) }, OP)
    }

    /// SiLU, `x * sigmoid(x)`, element by element (f32 with contiguous rows).
    pub fn silu<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        self.unary("silu", a, sys::ggml_silu)
    }

    /// GELU with the exact erf (not ggml_gelu's tanh approximation).
    pub fn gelu_erf<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        self.unary("gelu_erf", a, sys::ggml_gelu_erf)
    }

    fn unary<'c>(
        &'c self,
        op: &'static str,
        a: Tensor<'c>,
        f: unsafe extern "C" fn(*mut sys::ggml_context, *mut sys::ggml_tensor) -> *mut sys::ggml_tensor,
    ) -> Result<Tensor<'c>> {
        require_type(op, a, &[DType::F32], "activations run in f32")?;
        if !is_contiguous_1(a) {
            return Err(Error::shape(op, "rows must be contiguous", &[a.shape()]));
        }
        self.reserve_headers(op)?;
        // SAFETY: f32 input with contiguous rows, as ggml_unary asserts.
        self.wrap(unsafe { f(self.raw(), a.raw()) }, op)
    }

    /// Normalisation over `ne[0]` to zero mean and unit variance (LayerNorm without its affine part).
    pub fn norm<'c>(&'c self, a: Tensor<'c>, eps: f32) -> Result<Tensor<'c>> {
        const OP: &str = "norm";
        require_type(OP, a, &[DType::F32], "normalisation runs in f32")?;
        if !a.rows_contiguous() {
            return Err(Error::shape(OP, "rows must be contiguous", &[a.shape()]));
        }
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::invalid(OP, format!("eps {eps} must be finite and non-negative")));
        }
        self.reserve_headers(OP)?;
        // SAFETY: f32 input with contiguous rows, as the CPU kernel requires.
        self.wrap(unsafe { sys::ggml_norm(self.raw(), a.raw(), eps) }, OP)
    }

    /// `a` tiled to `shape`: every dimension of `shape` is a multiple of `a`'s.
    pub fn repeat_4d<'c>(&'c self, a: Tensor<'c>, shape: [i64; 4]) -> Result<Tensor<'c>> {
        const OP: &str = "repeat";
        require_type(OP, a, &[DType::F32], "repeats run in f32")?;
        let sa = a.shape();
        if shape.iter().any(|&d| d <= 0) || (0..4).any(|i| shape[i] % sa[i] != 0) {
            return Err(Error::shape(OP, format!("{shape:?} is not a tiling of the source"), &[sa]));
        }
        self.reserve_headers(OP)?;
        // SAFETY: every target dimension is a positive multiple of the source's (ggml_can_repeat).
        self.wrap(unsafe { sys::ggml_repeat_4d(self.raw(), a.raw(), shape[0], shape[1], shape[2], shape[3]) }, OP)
    }

    /// `silu(gate) * up`, fused.
    pub fn swiglu<'c>(&'c self, gate: Tensor<'c>, up: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "swiglu";
        require_type(OP, gate, &[DType::F32], "activations run in f32")?;
        if gate.dtype() != up.dtype() || !gate.shapes_equal(up) {
            return Err(Error::shape(OP, "gate and up must have one type and shape", &[gate.shape(), up.shape()]));
        }
        if !is_contiguous_1(gate) || !is_contiguous_1(up) {
            return Err(Error::shape(OP, "rows must be contiguous", &[gate.shape(), up.shape()]));
        }
        self.reserve_headers(OP)?;
        // SAFETY: same shape, same type, contiguous rows: the conditions of ggml_glu_impl.
        self.wrap(unsafe { sys::ggml_swiglu_split(self.raw(), gate.raw(), up.raw()) }, OP)
    }

    /// `softmax(a * scale + mask)` over `ne[0]`. The mask (f16 or f32) has rows of `a.ne0`.
    pub fn soft_max_ext<'c>(&'c self, a: Tensor<'c>, mask: Option<Tensor<'c>>, scale: f32) -> Result<Tensor<'c>> {
        const OP: &str = "soft_max_ext";
        require_type(OP, a, &[DType::F32], "softmax runs in f32")?;
        if !a.is_contiguous() {
            return Err(Error::shape(OP, "input must be contiguous", &[a.shape()]));
        }
        if let Some(m) = mask {
            require_type(OP, m, &[DType::F16, DType::F32], "masks are f16 or f32")?;
            let (sa, sm) = (a.shape(), m.shape());
            if !m.is_contiguous() || sm[0] != sa[0] || sm[1] < sa[1] || sa[2] % sm[2] != 0 || sa[3] % sm[3] != 0 {
                return Err(Error::shape(OP, "mask must be contiguous, [a.ne0, >= a.ne1, ...] and broadcast", &[sa, sm]));
            }
        }
        let mask_raw = mask.map_or(std::ptr::null_mut(), |m| m.raw());
        self.reserve_headers(OP)?;
        // SAFETY: the conditions ggml_soft_max_impl asserts were checked above; max_bias 0 needs no mask.
        self.wrap(unsafe { sys::ggml_soft_max_ext(self.raw(), a.raw(), mask_raw, scale, 0.0) }, OP)
    }

    /// Rotary embedding of `a` `[head_dim, n_head, n_tokens]` at the I32 `positions` `[n_tokens]`,
    /// with optional per-pair frequency divisors (llama3 scaling) of at least `n_dims / 2` entries.
    pub fn rope_ext<'c>(
        &'c self,
        a: Tensor<'c>,
        positions: Tensor<'c>,
        freq_factors: Option<Tensor<'c>>,
        p: &RopeParams,
    ) -> Result<Tensor<'c>> {
        const OP: &str = "rope_ext";
        require_type(OP, a, &[DType::F32, DType::F16], "rope runs on f32 or f16")?;
        require_type(OP, positions, &[DType::I32], "positions must be i32")?;
        let (sa, sp) = (a.shape(), positions.shape());
        if positions.n_dims() != 1 || sp[0] != sa[2] {
            return Err(Error::shape(OP, "positions must be a vector with one entry per token (a.ne2)", &[sa, sp]));
        }
        if p.n_dims <= 0 || p.n_dims % 2 != 0 || p.n_dims as i64 > sa[0] {
            return Err(Error::invalid(OP, format!("n_dims {} must be even, positive and <= head dim {}", p.n_dims, sa[0])));
        }
        if let Some(f) = freq_factors {
            require_type(OP, f, &[DType::F32], "frequency factors must be f32")?;
            if f.ne(0) < (p.n_dims / 2) as i64 {
                return Err(Error::shape(OP, "frequency factors need n_dims/2 entries", &[sa, f.shape()]));
            }
        }
        let mode = match p.mode {
            RopeMode::Normal => 0,
            RopeMode::Neox => sys::GGML_ROPE_TYPE_NEOX as i32,
        };
        let factors = freq_factors.map_or(std::ptr::null_mut(), |f| f.raw());
        self.reserve_headers(OP)?;
        // SAFETY: positions are an i32 vector matching a.ne2, factors (if any) are f32 with n_dims/2
        // entries, and the mode is a plain rope mode: the conditions ggml_rope_impl asserts.
        let raw = unsafe {
            sys::ggml_rope_ext(
                self.raw(),
                a.raw(),
                positions.raw(),
                factors,
                p.n_dims,
                mode,
                p.n_ctx_orig,
                p.freq_base,
                p.freq_scale,
                p.ext_factor,
                p.attn_factor,
                p.beta_fast,
                p.beta_slow,
            )
        };
        self.wrap(raw, OP)
    }

    /// Fused attention `softmax(q k^T * scale + mask) v`, reading K and V in their own (possibly
    /// quantized) types.
    ///
    /// q `[head_dim, n_q, n_head, 1]` f32; k `[head_dim, n_kv, n_head_kv, 1]`; v `[head_dim_v, n_kv,
    /// n_head_kv, 1]` (not transposed); mask f16 `[n_kv, >= n_q, 1, 1]`. Result `[head_dim_v, n_head,
    /// n_q, 1]` (heads before tokens).
    pub fn flash_attn_ext<'c>(
        &'c self,
        q: Tensor<'c>,
        k: Tensor<'c>,
        v: Tensor<'c>,
        mask: Option<Tensor<'c>>,
        scale: f32,
    ) -> Result<Tensor<'c>> {
        const OP: &str = "flash_attn_ext";
        check_attention(OP, q, k, v, mask, scale)?;
        let mask_raw = mask.map_or(std::ptr::null_mut(), |m| m.raw());
        self.reserve_headers(OP)?;
        // SAFETY: every condition ggml_flash_attn_ext and the CPU kernel assert was checked above.
        let raw = unsafe { sys::ggml_flash_attn_ext(self.raw(), q.raw(), k.raw(), v.raw(), mask_raw, scale, 0.0, 0.0) };
        let out = self.wrap(raw, OP)?;
        // SAFETY: `out` is a flash-attention node; asking for f32 accumulation is always accepted.
        unsafe { sys::ggml_prec_set_acc(out.raw(), sys::GGML_PREC_F32) };
        Ok(out)
    }
}

/// What ggml's flash attention asserts of its operands (and our own attention kernels rely on).
pub(crate) fn check_attention(
    op: &'static str,
    q: Tensor<'_>,
    k: Tensor<'_>,
    v: Tensor<'_>,
    mask: Option<Tensor<'_>>,
    scale: f32,
) -> Result<()> {
    require_type(op, q, &[DType::F32], "queries must be f32")?;
    for (t, what) in [(k, "K"), (v, "V")] {
        if !has_vec_dot(t.dtype()) || !t.dtype().can_dequantize() {
            return Err(Error::Type { op, got: t.dtype(), why: if what == "K" { "unsupported K type" } else { "unsupported V type" } });
        }
        if !t.rows_contiguous() {
            return Err(Error::shape(op, format!("{what} rows must be contiguous"), &[t.shape()]));
        }
    }
    let (sq, sk, sv) = (q.shape(), k.shape(), v.shape());
    let shapes = [sq, sk, sv];
    if sq[0] != sk[0] {
        return Err(Error::shape(op, "q and k head dims differ", &shapes));
    }
    if sk[1] != sv[1] || sk[2] != sv[2] {
        return Err(Error::shape(op, "k and v differ in cells or kv heads", &shapes));
    }
    if sq[2] % sk[2] != 0 {
        return Err(Error::shape(op, "query heads are not a multiple of kv heads", &shapes));
    }
    if sq[3] != sk[3] || sq[3] != sv[3] {
        return Err(Error::shape(op, "batch dim 3 differs", &shapes));
    }
    if !q.rows_contiguous() {
        return Err(Error::shape(op, "q rows must be contiguous", &shapes));
    }
    if let Some(m) = mask {
        require_type(op, m, &[DType::F16], "the mask must be f16")?;
        let sm = m.shape();
        if !m.is_contiguous() || sm[0] != sk[1] || sm[1] < sq[1] || sq[2] % sm[2] != 0 || sq[3] % sm[3] != 0 {
            return Err(Error::shape(op, "mask must be contiguous [n_kv, >= n_q, ...]", &[sq, sk, sm]));
        }
    }
    if !scale.is_finite() {
        return Err(Error::invalid(op, format!("scale {scale} is not finite")));
    }
    for t in [k, v] {
        t.dtype().check_row_len(op, t.ne(0))?;
    }
    Ok(())
}
