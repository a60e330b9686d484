//! Matrix products whose inner dimension is a handful of values (Mimi's first encoder convolution reads
//! one channel through 7 taps): ggml runs one 7-long dot product per output value, ~3 ns each, so this
//! one layer took a tenth of the encoder's time. Here each output column is K broadcast
//! multiply-adds over a vector of all M outputs, vectorized across M.

use std::os::raw::{c_int, c_void};

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::DType;

/// Widest inner dimension the kernel takes; wider products go to ggml's.
pub const MAX_NARROW_INNER: i64 = 16;

impl Context {
    /// `mul_mat(w, x)` for f32 `w` `[k, m]` and f32 `x` `[k, n]`, both 2-D and contiguous, with
    /// k ≤ `MAX_NARROW_INNER`: `[m, n]`, each value Σᵢ w[i, o]·x[i, t] summed in order of i. In a
    /// graph for a device: ggml's product.
    pub fn narrow_product<'c>(&'c self, w: Tensor<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "narrow_product";
        let two_d = |t: Tensor<'_>| t.dtype() == DType::F32 && t.ne(2) == 1 && t.ne(3) == 1 && t.is_contiguous();
        if !two_d(w) || !two_d(x) || w.ne(0) != x.ne(0) || w.ne(0) > MAX_NARROW_INNER {
            return Err(Error::shape(
                OP,
                format!("needs contiguous 2-D f32 operands with the same inner dimension, at most {MAX_NARROW_INNER}"),
                &[w.shape(), x.shape()],
            ));
        }
        if self.builds_for_device() {
            return self.mul_mat(w, x);
        }
        // SAFETY: w [k, m] and x [k, n] are live contiguous 2-D f32 tensors with k ≤ MAX_NARROW_INNER
        // (checked above), which is what `kernel` reads; it writes the [m, n] result; no userdata.
        unsafe { self.custom_f32(OP, [w.ne(1), x.ne(1), 1, 1], &[w, x], kernel, -1, 0) }
    }
}

/// ggml's callback: thread `ith` of `nth` computes its share of the output columns.
unsafe extern "C" fn kernel(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _userdata: *mut c_void) {
    // SAFETY: ggml calls this with the node built in `narrow_product`: dst f32 [m, n], its sources
    // w [k, m] and x [k, n], contiguous f32, all allocated.
    let (w, x, y) = unsafe {
        let dst = &*dst;
        let (w, x) = (&*dst.src[0], &*dst.src[1]);
        let (k, m, n) = (w.ne[0] as usize, w.ne[1] as usize, x.ne[1] as usize);
        (
            std::slice::from_raw_parts(w.data as *const f32, k * m),
            std::slice::from_raw_parts(x.data as *const f32, k * n),
            (dst.data as *mut f32, m, n, k),
        )
    };
    let (y, m, n, k) = y;
    let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
    let per = n.div_ceil(nth);
    let columns = (ith * per).min(n)..((ith + 1) * per).min(n);
    if columns.is_empty() {
        return;
    }
    // SAFETY: this thread's columns of y, disjoint from every other thread's.
    let y = unsafe { std::slice::from_raw_parts_mut(y.add(columns.start * m), columns.len() * m) };
    // wᵀ, [k][m]: row i holds every output's weight for input i, so a column is k vector updates.
    let mut wt = vec![0f32; k * m];
    for (o, row) in w.chunks_exact(k).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            wt[i * m + o] = v;
        }
    }
    products(&wt, &x[columns.start * k..columns.end * k], y, k, m);
}

/// y[:, t] = Σᵢ x[i, t] · wt[i, :], with the fastest loop the CPU runs.
fn products(wt: &[f32], x: &[f32], y: &mut [f32], k: usize, m: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (detected above), all the function is compiled for.
        unsafe { products_avx2(wt, x, y, k, m) };
        return;
    }
    products_portable(wt, x, y, k, m);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn products_avx2(wt: &[f32], x: &[f32], y: &mut [f32], k: usize, m: usize) {
    products_portable(wt, x, y, k, m)
}

/// A loop the compiler vectorizes over the outputs.
#[inline(always)]
fn products_portable(wt: &[f32], x: &[f32], y: &mut [f32], k: usize, m: usize) {
    for (column, inputs) in y.chunks_exact_mut(m).zip(x.chunks_exact(k)) {
        column.fill(0.0);
        for (&xi, weights) in inputs.iter().zip(wt.chunks_exact(m)) {
            for (out, &w) in column.iter_mut().zip(weights) {
                *out += xi * w;
            }
        }
    }
}
