//! `Context::product`: where each matrix product of weights goes — our kernels where they read the
//! weights' layout and give ggml's values bit for bit, else ggml's product (and always ggml's in a
//! graph built for a device).

use crate::context::{Context, Tensor};
use crate::error::Result;
use crate::few_columns::few_columns_apply;
use crate::vnni_product::{vnni_product_applies, PRODUCT_VNNI_COLUMNS};

impl Context {
    /// `mul_mat(w, x)`: through the VNNI kernel where the CPU has AVX-512 VNNI, for Q8_0, Q4_0 or Q4_1
    /// `w` and a tile of 16 columns or more; else through the few-columns kernel where it applies (Q4_1
    /// `w` `[k, m]`, f32 `x` `[k, n]` with `MIN_FEW_COLUMNS` ≤ n ≤ `MAX_FEW_COLUMNS`, both 2-D and
    /// contiguous, a CPU with AVX2, FMA and F16C); else ggml's. ggml's values bit for bit every way.
    /// Interleaved weights (`TensorStore::add_for_products`) go to the VNNI kernel from 16 columns
    /// and to `mul_mat_interleaved` below that, both ggml's bits; ggml cannot read them.
    ///
    /// Every product of a graph built for a device goes to ggml's product (the device's, when the
    /// graph runs there).
    pub fn product<'c>(&'c self, w: Tensor<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        if self.builds_for_device() {
            return self.mul_mat(w, x);
        }
        if w.is_interleaved() {
            let x = if x.is_contiguous() { x } else { self.cont(x)? };
            return match x.ne(1) >= PRODUCT_VNNI_COLUMNS {
                true => self.mul_mat_vnni(w, x),
                false => self.mul_mat_interleaved(w, x),
            };
        }
        if vnni_product_applies(w, x, PRODUCT_VNNI_COLUMNS) {
            self.mul_mat_vnni(w, x)
        } else if few_columns_apply(w, x) {
            self.mul_mat_few_columns(w, x)
        } else {
            self.mul_mat(w, x)
        }
    }
}
