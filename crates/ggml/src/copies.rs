//! Copies of our own, threaded over rows: ggml's f32 concat copies element by element and splits its
//! work over the third dimension only, so joining two `[channels, time]` matrices (a convolution's
//! carried columns and its new input) ran on one thread at ~3 ns a value, a fifth of the Mimi encoder's
//! time on a long clip. Here each output row is one or two `memcpy`s, rows shared among the threads.
//! `windows` is the im2col of a stride-s convolution over contiguous columns: ggml's views cannot
//! overlap (a view may not span more bytes than its source), so the windows are copied out.
//! In a graph for a device both are ggml's own nodes (its concat, strided views copied).

use std::os::raw::{c_int, c_void};

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::DType;

const F32: usize = std::mem::size_of::<f32>();

impl Context {
    /// `a` and `b` joined along `dim`; f32, rows contiguous, every other dimension equal. The values
    /// ggml's `concat` gives, copied row by row on every thread.
    pub fn concat<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>, dim: usize) -> Result<Tensor<'c>> {
        const OP: &str = "concat";
        let (sa, sb) = (a.shape(), b.shape());
        if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
            return Err(Error::Type {
                op: OP,
                got: if a.dtype() != DType::F32 { a.dtype() } else { b.dtype() },
                why: "concatenation runs in f32",
            });
        }
        if dim > 3 || (0..4).any(|d| d != dim && sa[d] != sb[d]) {
            return Err(Error::shape(OP, format!("dims other than {dim} differ"), &[sa, sb]));
        }
        if !a.rows_contiguous() || !b.rows_contiguous() {
            return Err(Error::shape(OP, "rows must be contiguous", &[sa, sb]));
        }
        let mut ne = sa;
        ne[dim] += sb[dim];
        if self.builds_for_device() {
            self.reserve_headers(OP)?;
            // SAFETY: two live f32 tensors equal in every dimension but `dim` < 4 (checked above), as
            // ggml_concat asserts.
            let raw = unsafe { sys::ggml_concat(self.raw(), a.raw(), b.raw(), dim as c_int) };
            return self.wrap(raw, OP);
        }
        // SAFETY: a and b are live f32 tensors with contiguous rows, equal in every dimension but `dim`
        // (checked above), which is what `concat_kernel` reads; it writes the joined shape; the
        // userdata is `dim`.
        unsafe { self.custom_f32(OP, ne, &[a, b], concat_kernel, -1, dim) }
    }

    /// The windows of `width` consecutive columns of `a` `[c, n]` (contiguous, f32), one every `step`
    /// columns: `[c · width, (n − width) / step + 1]`, column t = columns t·step … t·step + width − 1.
    pub fn windows<'c>(&'c self, a: Tensor<'c>, width: usize, step: usize) -> Result<Tensor<'c>> {
        const OP: &str = "windows";
        let n = a.ne(1) as usize;
        if a.dtype() != DType::F32 || !a.is_contiguous() || a.ne(2) != 1 || a.ne(3) != 1 {
            return Err(Error::shape(OP, "needs a contiguous 2-D f32 matrix", &[a.shape()]));
        }
        if width == 0 || step == 0 || width > n || width > u16::MAX as usize || step > u16::MAX as usize {
            return Err(Error::shape(OP, format!("windows of {width} columns every {step} over {n}"), &[a.shape()]));
        }
        let columns = (n - width) / step + 1;
        if self.builds_for_device() {
            return self.windows_from_views(a, width, step, columns);
        }
        // SAFETY: a is a live contiguous 2-D f32 matrix of at least `width` columns (checked above), which
        // is what `windows_kernel` reads; it writes [c·width, columns], every window inside a; the
        // userdata packs width and step.
        unsafe { self.custom_f32(OP, [a.ne(0) * width as i64, columns as i64, 1, 1], &[a], windows_kernel, -1, width << 16 | step) }
    }

    /// `windows` from ggml's own nodes (for a device): window offset k of every column is a strided
    /// view of `a`, copied contiguous; the `width` copies are joined along the rows.
    fn windows_from_views<'c>(&'c self, a: Tensor<'c>, width: usize, step: usize, columns: usize) -> Result<Tensor<'c>> {
        let column = a.strides()[1];
        let mut joined: Option<Tensor<'c>> = None;
        for k in 0..width {
            let shifted = self.cont(self.view(a, &[a.ne(0), columns as i64], &[column * step], k * column)?)?;
            joined = Some(match joined {
                Some(before) => self.concat(before, shifted, 0)?,
                None => shifted,
            });
        }
        joined.ok_or_else(|| Error::shape("windows", "a window of no columns", &[a.shape()]))
    }
}

/// Thread `ith` of `nth`'s share of `rows` rows: a contiguous range.
fn share(rows: usize, ith: c_int, nth: c_int) -> std::ops::Range<usize> {
    let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
    let per = rows.div_ceil(nth);
    (ith * per).min(rows)..((ith + 1) * per).min(rows)
}

/// ggml's callback for `concat`: thread `ith` of `nth` writes its share of the output's rows.
unsafe extern "C" fn concat_kernel(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    let dim = userdata as usize;
    // SAFETY: ggml calls this with the node built in `Context::concat`: dst contiguous f32, its two
    // sources f32 with contiguous rows, equal in every dimension but `dim`, all allocated.
    let (dst, a, b) = unsafe {
        let dst = &*dst;
        (dst, &*dst.src[0], &*dst.src[1])
    };
    let rows = (dst.ne[1] * dst.ne[2] * dst.ne[3]) as usize;
    let row_of = |t: &sys::ggml_tensor, i: [usize; 3]| -> *const u8 {
        // SAFETY: i is inside t's dims 1..3 (the caller derives it from dst's, less the offset), so the
        // row starts inside t's data.
        unsafe { (t.data as *const u8).add(i[0] * t.nb[1] + i[1] * t.nb[2] + i[2] * t.nb[3]) }
    };
    for r in share(rows, ith, nth) {
        let i = [r % dst.ne[1] as usize, r / dst.ne[1] as usize % dst.ne[2] as usize, r / (dst.ne[1] * dst.ne[2]) as usize];
        // SAFETY: row r of the contiguous dst holds ne[0] floats; this thread alone writes it.
        let out = unsafe { (dst.data as *mut u8).add(r * dst.nb[1]) };
        if dim == 0 {
            let (na, nb) = (a.ne[0] as usize * F32, b.ne[0] as usize * F32);
            // SAFETY: a's row holds a.ne[0] floats and b's b.ne[0]; together they fill dst's row.
            unsafe {
                std::ptr::copy_nonoverlapping(row_of(a, i), out, na);
                std::ptr::copy_nonoverlapping(row_of(b, i), out.add(na), nb);
            }
        } else {
            let along = i[dim - 1];
            let split = a.ne[dim] as usize;
            let (src, mut j) = if along < split { (a, i) } else { (b, i) };
            if along >= split {
                j[dim - 1] -= split;
            }
            // SAFETY: j indexes a row of src (a below the split, b past it), ne[0] floats like dst's.
            unsafe { std::ptr::copy_nonoverlapping(row_of(src, j), out, dst.ne[0] as usize * F32) };
        }
    }
}

/// ggml's callback for `windows`: thread `ith` of `nth` copies its share of the windows.
unsafe extern "C" fn windows_kernel(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    let (width, step) = (userdata as usize >> 16, userdata as usize & 0xffff);
    // SAFETY: ggml calls this with the node built in `Context::windows`: dst f32 [c·width, columns],
    // its source a contiguous f32 [c, n] with (columns − 1)·step + width ≤ n, both allocated.
    let (dst, a) = unsafe {
        let dst = &*dst;
        (dst, &*dst.src[0])
    };
    let column = a.nb[1];
    for t in share(dst.ne[1] as usize, ith, nth) {
        // SAFETY: window t spans columns t·step .. t·step + width of a (inside it), and dst's column t
        // holds exactly width columns' worth; this thread alone writes it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (a.data as *const u8).add(t * step * column),
                (dst.data as *mut u8).add(t * dst.nb[1]),
                width * column,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Backend, ComputeBuffer, DType};

    /// The nodes a graph for a device builds instead of our kernels, run here on the CPU through
    /// ggml's own ops: `concat` and `windows` give the same values exactly, ELU and the narrow product
    /// within the rounding bounds below. On a device the same nodes run there (the Mimi decode test
    /// in `ccsm`'s device tests).
    #[test]
    fn ggmls_nodes_for_a_device_give_our_kernels_values() {
        let (c, n) = (12i64, 40i64);
        let a: Vec<f32> = (0..c * n).map(|i| ((i * 7919) % 1000) as f32 / 7.0 - 60.0).collect();
        let b: Vec<f32> = (0..c * 9).map(|i| i as f32 * 0.25).collect();
        for case in 0..7 {
            let [ours, ggmls] = [false, true].map(|for_device| {
                let mut compute = ComputeBuffer::new().unwrap();
                let ctx = compute.context(64, 64).unwrap();
                ctx.set_builds_for_device(for_device);
                let (x, y) =
                    (ctx.new_tensor(DType::F32, &[c, n]).unwrap().set_input(), ctx.new_tensor(DType::F32, &[c, 9]).unwrap().set_input());
                let out = match case {
                    0 => ctx.concat(x, y, 1),
                    1 => ctx.concat(ctx.cont(ctx.view(x, &[c, 9], &[x.strides()[1]], 0).unwrap()).unwrap(), y, 0),
                    2 => ctx.windows(x, 3, 1),
                    3 => ctx.windows(x, 4, 2),
                    4 => ctx.windows(x, 1, 3),
                    5 => ctx.elu(x),
                    _ => ctx.narrow_product(y, ctx.reshape(x, &[c, n]).unwrap()),
                }
                .unwrap()
                .set_output();
                let mut graph = ctx.new_graph(64).unwrap();
                graph.expand(out).unwrap();
                ctx.allocate(&graph).unwrap();
                x.write_f32(&a).unwrap();
                if case < 2 || case == 6 {
                    y.write_f32(&b).unwrap();
                }
                Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
                (out.shape(), out.read_f32().unwrap())
            });
            assert_eq!(ours.0, ggmls.0, "case {case}: shapes");
            // Per value, what the two may differ by: nothing for copies; for ELU our kernel's 2 ulp
            // from `expm1` (ggml's CPU ELU is `expm1f`); for the product of k = 12 terms summed in
            // two orders, the classic bound 2·k·ε·Σ|wᵢxᵢ| (whatever SIMD width ggml's sum uses).
            let bound = |i: usize| -> f32 {
                match case {
                    0..=4 => 0.0,
                    5 => 2.0 * f32::EPSILON * ggmls.1[i].abs(),
                    _ => {
                        let (o, t) = (i % 9, i / 9);
                        let terms: f32 = (0..c as usize).map(|j| (b[o * c as usize + j] * a[t * c as usize + j]).abs()).sum();
                        2.0 * 12.0 * f32::EPSILON * terms
                    }
                }
            };
            for (i, (x, y)) in ours.1.iter().zip(&ggmls.1).enumerate() {
                assert!((x - y).abs() <= bound(i), "case {case}, value {i}: ggml's node {y} against our kernel's {x}");
            }
        }
    }
}
