//! Layout ops: views, reshapes, permutes, copies and row stores. Each is checked against the source's
//! bytes and the traps of quantized types before ggml sees it.

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result, Shape};
use crate::DType;

/// Bytes a tensor of `shape` with `strides` spans (ggml_nbytes' formula).
fn span_bytes(dtype: DType, shape: Shape, strides: [usize; 4]) -> usize {
    let block = dtype.block_size();
    let outer = |from: usize| (from..4).map(|i| (shape[i] as usize - 1) * strides[i]).sum::<usize>();
    if block == 1 {
        dtype.type_size() + outer(0)
    } else {
        shape[0] as usize * strides[0] / block + outer(1)
    }
}

impl Context {
    /// A view of `a` with `shape` (1–4 dims) and byte `strides` for dims 1.. (dim 0 is dense), starting
    /// `offset` bytes into `a`. The view must stay inside `a`'s bytes.
    pub fn view<'c>(&'c self, a: Tensor<'c>, shape: &[i64], strides: &[usize], offset: usize) -> Result<Tensor<'c>> {
        const OP: &str = "view";
        let n = shape.len();
        if n == 0 || n > 4 || strides.len() + 1 != n {
            return Err(Error::invalid(OP, format!("{n} dims need {} strides, got {}", n.saturating_sub(1), strides.len())));
        }
        if shape.iter().any(|&d| d <= 0) {
            return Err(Error::invalid(OP, format!("non-positive dimension in {shape:?}")));
        }
        let dtype = a.dtype();
        dtype.check_row_len(OP, shape[0])?;
        let mut full_shape = [1i64; 4];
        full_shape[..n].copy_from_slice(shape);
        let row = dtype.row_size(shape[0] as usize)?;
        let mut full_strides = [dtype.type_size(), row, row, row];
        for (i, &s) in strides.iter().enumerate() {
            full_strides[i + 1] = s;
        }
        // Unused trailing dims take the stride of the last used one times its extent, as ggml does.
        for i in n..4 {
            full_strides[i] = full_strides[i - 1] * full_shape[i - 1] as usize;
        }
        let span = span_bytes(dtype, full_shape, full_strides);
        if offset.checked_add(span).is_none_or(|end| end > a.nbytes()) {
            return Err(Error::shape(
                OP,
                format!("view of {span} bytes at offset {offset} exceeds the {} bytes of the source", a.nbytes()),
                &[a.shape(), full_shape],
            ));
        }
        // ggml also asserts that the view's dense size fits after the offset, whatever its strides:
        // overlapping views (rows closer than their length) abort there.
        let dense = full_shape[1..].iter().try_fold(row, |acc, &d| acc.checked_mul(d as usize));
        if dense.and_then(|d| d.checked_add(offset)).is_none_or(|end| end > a.nbytes()) {
            let why =
                format!("its dense size at offset {offset} exceeds the {} bytes of the source (ggml has no overlapping views)", a.nbytes());
            return Err(Error::shape(OP, why, &[a.shape(), full_shape]));
        }
        let ctx = self.raw();
        self.reserve_headers(OP)?;
        // SAFETY: the view lies inside the source's bytes and so does its dense size (both checked
        // above), which is what ggml_view_impl asserts; dims and strides are passed in the counts each
        // ggml_view_Nd reads.
        let raw = unsafe {
            match n {
                1 => sys::ggml_view_1d(ctx, a.raw(), shape[0], offset),
                2 => sys::ggml_view_2d(ctx, a.raw(), shape[0], shape[1], strides[0], offset),
                3 => sys::ggml_view_3d(ctx, a.raw(), shape[0], shape[1], shape[2], strides[0], strides[1], offset),
                _ => sys::ggml_view_4d(ctx, a.raw(), shape[0], shape[1], shape[2], shape[3], strides[0], strides[1], strides[2], offset),
            }
        };
        self.wrap(raw, OP)
    }

    /// The same data with another shape (1–4 dims); `a` must be contiguous.
    pub fn reshape<'c>(&'c self, a: Tensor<'c>, shape: &[i64]) -> Result<Tensor<'c>> {
        const OP: &str = "reshape";
        if !a.is_contiguous() {
            return Err(Error::shape(OP, "only contiguous tensors can be reshaped (use cont first)", &[a.shape()]));
        }
        if shape.is_empty() || shape.len() > 4 || shape.iter().any(|&d| d <= 0) {
            return Err(Error::invalid(OP, format!("bad target shape {shape:?}")));
        }
        if shape.iter().product::<i64>() != a.nelements() {
            return Err(Error::invalid(OP, format!("{shape:?} does not hold the {} elements of {:?}", a.nelements(), a.shape())));
        }
        a.dtype().check_row_len(OP, shape[0])?;
        let ctx = self.raw();
        self.reserve_headers(OP)?;
        // SAFETY: `a` is contiguous and the element counts match: what ggml_reshape_Nd asserts.
        let raw = unsafe {
            match shape.len() {
                1 => sys::ggml_reshape_1d(ctx, a.raw(), shape[0]),
                2 => sys::ggml_reshape_2d(ctx, a.raw(), shape[0], shape[1]),
                3 => sys::ggml_reshape_3d(ctx, a.raw(), shape[0], shape[1], shape[2]),
                _ => sys::ggml_reshape_4d(ctx, a.raw(), shape[0], shape[1], shape[2], shape[3]),
            }
        };
        self.wrap(raw, OP)
    }

    /// Moves source dim `i` to position `axes[i]` (ggml's convention).
    pub fn permute<'c>(&'c self, a: Tensor<'c>, axes: [usize; 4]) -> Result<Tensor<'c>> {
        const OP: &str = "permute";
        let mut seen = [false; 4];
        for &ax in &axes {
            if ax > 3 || std::mem::replace(&mut seen[ax], true) {
                return Err(Error::invalid(OP, format!("{axes:?} is not a permutation of 0..4")));
            }
        }
        if a.dtype().is_quantized() && axes[0] != 0 {
            return Err(Error::Type { op: OP, got: a.dtype(), why: "quantized blocks cannot leave dimension 0" });
        }
        let [x, y, z, w] = axes.map(|v| v as i32);
        self.reserve_headers(OP)?;
        // SAFETY: the axes are a permutation of 0..4, as ggml_permute asserts.
        self.wrap(unsafe { sys::ggml_permute(self.raw(), a.raw(), x, y, z, w) }, OP)
    }

    /// Swaps dims 0 and 1 (a view). Refused for quantized tensors: their blocks live along dim 0.
    pub fn transpose<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        self.permute(a, [1, 0, 2, 3])
    }

    /// A contiguous copy. A quantized source must have contiguous rows: `cont(transpose(q))` crashes ggml.
    pub fn cont<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "cont";
        if a.dtype().is_quantized() && (!a.rows_contiguous() || a.is_transposed()) {
            return Err(Error::shape(OP, "a quantized tensor must keep contiguous rows (no transposed copy)", &[a.shape()]));
        }
        self.reserve_headers(OP)?;
        // SAFETY: non-quantized sources, or quantized ones copied row by row, are handled by ggml_dup.
        self.wrap(unsafe { sys::ggml_cont(self.raw(), a.raw()) }, OP)
    }

    /// Copies `a` into `b` (converting or quantizing to `b`'s type); returns the node that does it.
    pub fn cpy<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "cpy";
        if a.nelements() != b.nelements() {
            return Err(Error::shape(OP, "element counts differ", &[a.shape(), b.shape()]));
        }
        let (ta, tb) = (a.dtype(), b.dtype());
        if tb.is_quantized() {
            if ta != DType::F32 && ta != tb {
                return Err(Error::Type { op: OP, got: ta, why: "only f32 rows can be quantized on copy" });
            }
            tb.check_row_len(OP, b.ne(0))?;
            // ggml quantizes the source row by row: the rows must line up with the blocks.
            if a.ne(0) != b.ne(0) {
                return Err(Error::shape(OP, "quantizing copies need equal row lengths", &[a.shape(), b.shape()]));
            }
            if !b.rows_contiguous() {
                return Err(Error::shape(OP, "a quantized destination needs contiguous rows", &[b.shape()]));
            }
        }
        if ta.is_quantized() && (!a.rows_contiguous() || (tb != DType::F32 && tb != ta)) {
            return Err(Error::Type { op: OP, got: ta, why: "quantized sources copy row by row into f32 or their own type" });
        }
        if !ta.can_dequantize() || !tb.can_quantize_from_f32() {
            return Err(Error::Type { op: OP, got: if ta.can_dequantize() { tb } else { ta }, why: "no conversion for this pair" });
        }
        self.reserve_headers(OP)?;
        // SAFETY: equal element counts and a conversion pair the CPU dup kernels implement (checked).
        self.wrap(unsafe { sys::ggml_cpy(self.raw(), a.raw(), b.raw()) }, OP)
    }

    /// Stores the F32 rows of `src` `[n_embd, n_rows]` into `dst` at the I64 row `indices` `[n_rows]`,
    /// converting to `dst`'s type (quantize on write). Index values are the caller's to keep in range.
    pub fn set_rows<'c>(&'c self, dst: Tensor<'c>, src: Tensor<'c>, indices: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "set_rows";
        require_f32_or_f16(OP, src)?;
        if !matches!(indices.dtype(), DType::I64 | DType::I32) {
            return Err(Error::Type { op: OP, got: indices.dtype(), why: "row indices must be i64 or i32" });
        }
        if !dst.dtype().can_quantize_from_f32() {
            return Err(Error::Type { op: OP, got: dst.dtype(), why: "rows cannot be converted into this type" });
        }
        let (sd, ss, si) = (dst.shape(), src.shape(), indices.shape());
        let shapes = [sd, ss, si];
        if sd[0] != ss[0] || sd[2] != ss[2] || sd[3] != ss[3] {
            return Err(Error::shape(OP, "source rows do not match destination rows", &shapes));
        }
        if ss[1] != si[0] || ss[2] % si[1] != 0 || ss[3] % si[2] != 0 || si[3] != 1 {
            return Err(Error::shape(OP, "one index per source row is needed", &shapes));
        }
        dst.dtype().check_row_len(OP, sd[0])?;
        // SAFETY: reads headers of live tensors.
        let rows_ok = unsafe { sys::ggml_is_contiguous_rows(dst.raw()) && sys::ggml_is_contiguous_rows(src.raw()) };
        if !rows_ok {
            return Err(Error::shape(OP, "rows must be contiguous", &shapes));
        }
        self.reserve_headers(OP)?;
        // SAFETY: every assertion of ggml_set_rows was checked above.
        self.wrap(unsafe { sys::ggml_set_rows(self.raw(), dst.raw(), src.raw(), indices.raw()) }, OP)
    }
}

fn require_f32_or_f16(op: &'static str, t: Tensor<'_>) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F16 => Ok(()),
        other => Err(Error::Type { op, got: other, why: "source rows must be f32 or f16" }),
    }
}
