//! Ops of our own, run by ggml's thread pool as custom ops (`ggml_map_custom1`): each thread gets
//! `ith` of `nth` and works on its own slice.
//!
//! ELU: ggml's kernel calls `expm1f` element by element; the SEANet decoder runs ELU over half a
//! million values per audio frame, so here it is a vectorizable loop (an `exp` by range reduction and a
//! polynomial, compiled for AVX2 + FMA when the CPU has them).

use std::os::raw::{c_int, c_void};
use std::ptr::NonNull;

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::DType;

impl Context {
    /// ELU with α = 1 (x for x > 0, eˣ − 1 otherwise) on a contiguous F32 tensor, vectorized; within
    /// 2 ulp of `expm1` for negative inputs. In a graph for a device: ggml's ELU node.
    pub fn elu<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "elu";
        if a.dtype() != DType::F32 {
            return Err(Error::Type { op: OP, got: a.dtype(), why: "ELU runs in f32" });
        }
        if !a.is_contiguous() {
            return Err(Error::shape(OP, "the input must be contiguous", &[a.shape()]));
        }
        self.reserve_headers(OP)?;
        if self.builds_for_device() {
            // SAFETY: a live f32 tensor; ggml's ELU node (which devices run) has its shape and type.
            let raw = unsafe { sys::ggml_elu(self.raw(), a.raw()) };
            return Ok(self.wrap(raw, OP)?.set_name("elu"));
        }
        // SAFETY: the input is a live contiguous f32 tensor, which is what `elu_kernel` reads; the
        // result has its shape and type (map_custom1 duplicates the input's header); no userdata.
        let raw = unsafe { sys::ggml_map_custom1(self.raw(), a.raw(), Some(elu_kernel), -1, std::ptr::null_mut()) };
        let out = self.wrap(raw, OP)?;
        Ok(out.set_name("elu"))
    }
}

/// ggml's callback: thread `ith` of `nth` computes its share of `dst = elu(a)`.
unsafe extern "C" fn elu_kernel(dst: *mut sys::ggml_tensor, a: *const sys::ggml_tensor, ith: c_int, nth: c_int, _userdata: *mut c_void) {
    let (Some(dst), Some(a)) = (NonNull::new(dst), NonNull::new(a as *mut sys::ggml_tensor)) else { return };
    // SAFETY: ggml calls this with the live, allocated, contiguous f32 tensors the op was built from
    // (checked in `Context::elu`); dst has a's element count.
    let n = unsafe { sys::ggml_nelements(a.as_ptr()) } as usize;
    let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
    // Slices of whole 8-lane vectors per thread; the last thread takes the rest.
    let per = n.div_ceil(nth).div_ceil(8) * 8;
    let start = (ith * per).min(n);
    let end = ((ith + 1) * per).min(n);
    if start >= end {
        return;
    }
    // SAFETY: [start, end) lies inside both tensors' data, and each thread's range is disjoint from the
    // others', so the mutable slice aliases nothing another thread touches.
    let (x, y) = unsafe {
        let x = std::slice::from_raw_parts((a.as_ref().data as *const f32).add(start), end - start);
        let y = std::slice::from_raw_parts_mut((dst.as_ref().data as *mut f32).add(start), end - start);
        (x, y)
    };
    elu_slice(x, y);
}

/// `y = elu(x)`, with the fastest loop the CPU runs.
pub(crate) fn elu_slice(x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (detected above), all the function is compiled for.
        unsafe { elu_avx2(x, y) };
        return;
    }
    elu_portable(x, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn elu_avx2(x: &[f32], y: &mut [f32]) {
    elu_portable(x, y)
}

/// A loop the compiler vectorizes: no branches, no calls.
#[inline(always)]
fn elu_portable(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = if x > 0.0 { x } else { exp_m1_negative(x) };
    }
}

/// eˣ = 2ᵏ·(1 + q) for x ≤ 0 with x = k·ln 2 + r, |r| ≤ ln2/2, and q = eʳ − 1 by a degree-7 Taylor
/// polynomial (relative error < 1e-7 over that range). Returns (2ᵏ, q). Branch-free, so loops over it
/// vectorize.
#[inline(always)]
fn exp_parts(x: f32) -> (f32, f32) {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let k = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // q = r + r²/2 + … + r⁷/5040
    let q = r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2ᵏ from the bits of k + 127 (an integer in 1..=127 since x ≥ −87): added to 2²³ it is the
    // mantissa's low bits. Integer ops only, so the loop stays vectorized (`as i32` saturates lane by lane).
    let biased = (k + 127.0 + 8_388_608.0).to_bits() - 8_388_608f32.to_bits();
    (f32::from_bits(biased << 23), q)
}

/// eˣ − 1 for x ≤ 0: 2ᵏ·q + (2ᵏ − 1), exact for small |x| (k = 0), as accurate as expm1.
#[inline(always)]
fn exp_m1_negative(x: f32) -> f32 {
    let (scale, q) = exp_parts(x);
    scale * q + (scale - 1.0)
}

/// eˣ for x ≤ 0, 0 below −87 (and for −∞).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    let (scale, q) = exp_parts(x);
    if x < -87.0 {
        0.0
    } else {
        scale * q + scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_within_2_ulp_and_flushes_below_the_range() {
        for i in 0..200_000 {
            let x = -87.0 + i as f32 * 0.000435;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            assert!((got - want).abs() <= 2.0 * want * f32::EPSILON as f64, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn elu_matches_expm1_within_2_ulp() {
        let xs: Vec<f32> = (0..200_001).map(|i| -30.0 + i as f32 * 0.00016).chain([-100.0, -87.5, -1e-30, 0.0, 1e-30, 3.5]).collect();
        let mut ys = vec![0f32; xs.len()];
        elu_slice(&xs, &mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = if x > 0.0 { x as f64 } else { (x as f64).exp_m1() };
            let ulp = (want.abs() as f32).max(f32::MIN_POSITIVE) * f32::EPSILON;
            assert!(((y as f64) - want).abs() <= 2.0 * ulp as f64, "elu({x}) = {y}, want {want}");
        }
    }
}
