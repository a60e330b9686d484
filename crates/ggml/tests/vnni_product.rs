//! The VNNI product of Q8_0, Q4_0 and Q4_1 weights equals ggml's bit for bit — its product over the
//! same columns and its dot product over each column alone — and both are within the derived bound of
//! naive f64 math over the stored weights and the Q8_0-rounded columns (wider for Q4_1, whose column
//! sums ggml stores in f16); operands it does not cover are refused (and `product` gives ggml's).

mod common;

use common::{decode, Rng};
use ggml::{Backend, Context, ContextParams, DType, Tensor, MIN_VNNI_COLUMNS};

fn compute(ctx: &Context, out: Tensor<'_>) -> Vec<f32> {
    let mut graph = ctx.new_graph(64).unwrap();
    graph.expand(out).unwrap();
    Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
    out.read_f32().unwrap()
}

fn has_vnni() -> bool {
    let ctx = Context::new(ContextParams { mem_size: 1 << 20, no_alloc: false }).unwrap();
    let (w, x) = (ctx.new_tensor(DType::Q8_0, &[32, 1]).unwrap(), ctx.new_tensor(DType::F32, &[32, 2]).unwrap());
    ctx.mul_mat_vnni(w, x).is_ok()
}

#[test]
fn vnni_products_are_ggmls_bit_for_bit_and_within_the_f64_bound() {
    if !has_vnni() {
        eprintln!("no AVX-512 VNNI here (or ggml built without AVX-512): skipped");
        return;
    }
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        check(dtype);
    }
}

fn check(dtype: DType) {
    let mut checked = 0;
    for (k, m, n) in [(32, 1, 2), (64, 7, 3), (576, 65, 16), (576, 9, 17), (2048, 33, 40), (1536, 4, 512)] {
        let mut rng = Rng::new((k * 1000 + m * 10 + n) as u64);
        // Offset weights, so that Q4_1's minimum matters.
        let w_values: Vec<f32> = rng.normals(k * m).iter().map(|v| v * 0.05 + 0.02).collect();
        let x_values = rng.normals(k * n);
        let w_bytes = dtype.quantize(&w_values, k).unwrap();
        let ctx = Context::new(ContextParams { mem_size: 256 << 20, no_alloc: false }).unwrap();
        let w = ctx.new_tensor(dtype, &[k as i64, m as i64]).unwrap();
        w.write_bytes_at(0, &w_bytes).unwrap();
        let x = ctx.new_tensor(DType::F32, &[k as i64, n as i64]).unwrap();
        x.write_f32(&x_values).unwrap();
        let ours = compute(&ctx, ctx.mul_mat_vnni(w, x).unwrap());
        let theirs = compute(&ctx, ctx.mul_mat(w, x).unwrap());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&ours) == bits(&theirs), "{dtype} k {k} m {m} n {n}: not ggml's product bit for bit");
        for c in [0, n / 2, n - 1] {
            let column = ctx.view(x, &[k as i64, 1], &[x.strides()[1]], c * x.strides()[1]).unwrap();
            let alone = compute(&ctx, ctx.mul_mat(w, ctx.cont(column).unwrap()).unwrap());
            assert!(
                bits(&alone) == bits(&ours[c * m..(c + 1) * m]),
                "{dtype} k {k} m {m} n {n}: column {c} differs from ggml's one-column product"
            );
        }
        let w_dec = decode(dtype, &w_bytes, k * m);
        let x_dec = decode(DType::Q8_0, &DType::Q8_0.quantize(&x_values, k).unwrap(), k * n);
        for c in 0..n {
            for r in 0..m {
                let (row, col) = (&w_dec[r * k..(r + 1) * k], &x_dec[c * k..(c + 1) * k]);
                let want: f64 = row.iter().zip(col).map(|(&a, &b)| a as f64 * b as f64).sum();
                // Each block's dot is exact and scaled by one rounded product of scales; the blocks'
                // terms then add in f32: a few units of rounding of each term, times the blocks.
                let terms: f64 = row
                    .chunks(32)
                    .zip(col.chunks(32))
                    .map(|(a, b)| a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>().abs())
                    .sum();
                let bound = terms * (k / 32 + 3) as f64 * 2f64.powi(-23) + 1e-12;
                // Q4_1's product keeps each column block's scaled sum in f16 (2^-11 of it, times the
                // block's offset).
                let f16_sums: f64 = if dtype == DType::Q4_1 {
                    row.chunks(32)
                        .zip(col.chunks(32))
                        .map(|(a, b)| a.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)) * b.iter().map(|&v| v.abs() as f64).sum::<f64>())
                        .sum::<f64>()
                        * 2f64.powi(-10)
                } else {
                    0.0
                };
                let got = ours[c * m + r] as f64;
                assert!(
                    (got - want).abs() <= bound + f16_sums,
                    "{dtype} k {k} m {m} n {n} ({r}, {c}): {got} vs {want} (bound {bound:.2e})"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 4_000);
}

#[test]
fn vnni_products_refuse_what_they_do_not_cover() {
    let ctx = Context::new(ContextParams { mem_size: 16 << 20, no_alloc: false }).unwrap();
    let q8 = ctx.new_tensor(DType::Q8_0, &[64, 4]).unwrap();
    let q4 = ctx.new_tensor(DType::Q5_0, &[64, 4]).unwrap();
    let one = ctx.new_tensor(DType::F32, &[64, MIN_VNNI_COLUMNS - 1]).unwrap();
    let two = ctx.new_tensor(DType::F32, &[64, MIN_VNNI_COLUMNS]).unwrap();
    let short = ctx.new_tensor(DType::F32, &[32, MIN_VNNI_COLUMNS]).unwrap();
    for (a, b) in [(q8, one), (q4, two), (q8, short)] {
        assert!(ctx.mul_mat_vnni(a, b).is_err());
    }
    for (a, b) in [(q8, one), (q4, two)] {
        assert_eq!(ctx.product(a, b).unwrap().shape(), ctx.mul_mat(a, b).unwrap().shape());
    }
}

/// The kernel runs (and `own_kernels` says so) exactly where the CPU reports AVX-512 F, BW and VNNI
/// and ggml was built with AVX-512 — derived here from the CPU and ggml's build, not from the crate's
/// own check.
#[test]
fn the_kernel_runs_exactly_where_the_cpu_and_build_have_vnni() {
    #[cfg(target_arch = "x86_64")]
    let expected = {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2") && has!("fma") && has!("f16c") && has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
    } && ggml::cpu_features().contains(&"AVX512");
    #[cfg(not(target_arch = "x86_64"))]
    let expected = false;
    assert_eq!(has_vnni(), expected, "mul_mat_vnni accepts operands");
    assert_eq!(ggml::own_kernels().iter().any(|k| k.contains("VNNI")), expected, "{:?}", ggml::own_kernels());
}
