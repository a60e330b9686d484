//! The few-columns Q4_1 product equals ggml's `mul_mat` bit for bit (same quantizer, same sums in the
//! same order), and both are within the derived bound of naive f64 math over the decoded weights and the
//! Q8_1-rounded columns.

mod common;

use common::{decode, Rng};
use ggml::{Backend, Context, ContextParams, DType, Tensor, MAX_FEW_COLUMNS, MIN_FEW_COLUMNS};

fn compute(ctx: &Context, out: Tensor<'_>) -> Vec<f32> {
    let mut graph = ctx.new_graph(64).unwrap();
    graph.expand(out).unwrap();
    Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
    out.read_f32().unwrap()
}

/// (ggml's product, ours, the f64 reference) of random Q4_1 weights [k, m] and f32 columns [k, n].
fn products(k: usize, m: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f64>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let w_values: Vec<f32> = rng.normals(k * m).iter().map(|v| v * 0.05 + 0.01).collect();
    let x_values = rng.normals(k * n);
    let w_bytes = DType::Q4_1.quantize(&w_values, k).unwrap();
    let ctx = Context::new(ContextParams { mem_size: 64 << 20, no_alloc: false }).unwrap();
    let w = ctx.new_tensor(DType::Q4_1, &[k as i64, m as i64]).unwrap();
    w.write_bytes_at(0, &w_bytes).unwrap();
    let x = ctx.new_tensor(DType::F32, &[k as i64, n as i64]).unwrap();
    x.write_f32(&x_values).unwrap();
    let theirs = compute(&ctx, ctx.mul_mat(w, x).unwrap());
    let ours = compute(&ctx, ctx.mul_mat_few_columns(w, x).unwrap());
    // Naive f64 over the stored weights and the exact columns. The bound: Q8_1 rounds each column value
    // by at most half its block's step (amax / 127), and stores each block's sum in f16 (relative 2^-11,
    // times the block's offset); then f32 rounding of the sums.
    let w_dec = decode(DType::Q4_1, &w_bytes, k * m);
    let mut reference = vec![0f64; m * n];
    let mut bound = vec![0f64; m * n];
    for c in 0..n {
        let col = &x_values[c * k..(c + 1) * k];
        for r in 0..m {
            let row = &w_dec[r * k..(r + 1) * k];
            reference[c * m + r] = row.iter().zip(col).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mut b = 1e-5 * row.iter().zip(col).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>() + 1e-6;
            for (wb, xb) in row.chunks(32).zip(col.chunks(32)) {
                let step = xb.iter().fold(0f64, |a, &v| a.max(v.abs() as f64)) / 127.0;
                let w_abs: f64 = wb.iter().map(|&v| v.abs() as f64).sum();
                let w_max = wb.iter().fold(0f64, |a, &v| a.max(v.abs() as f64));
                let sum_abs: f64 = xb.iter().map(|&v| v.abs() as f64).sum::<f64>() + 32.0 * step;
                b += w_abs * step * 0.5 + w_max * sum_abs * 2f64.powi(-10);
            }
            bound[c * m + r] = b;
        }
    }
    assert_eq!((theirs.len(), ours.len()), (m * n, m * n));
    (theirs, ours, reference, bound)
}

#[test]
fn few_columns_equal_ggml_bit_for_bit_and_the_f64_reference() {
    let mut checked = 0;
    for (k, m) in [(32, 1), (64, 7), (576, 192), (1536, 65)] {
        for n in [MIN_FEW_COLUMNS as usize, 4, 7, 8, 9, 16, 17, MAX_FEW_COLUMNS as usize] {
            let (theirs, ours, reference, bound) = products(k, m, n, (k * 1000 + m * 10 + n) as u64);
            for i in 0..m * n {
                assert_eq!(ours[i].to_bits(), theirs[i].to_bits(), "k {k} m {m} n {n} element {i}: {} vs ggml {}", ours[i], theirs[i]);
                assert!(
                    (ours[i] as f64 - reference[i]).abs() <= bound[i],
                    "k {k} m {m} n {n} element {i}: {} vs {}",
                    ours[i],
                    reference[i]
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 10_000);
}

#[test]
fn few_columns_refuse_what_they_do_not_cover() {
    let ctx = Context::new(ContextParams { mem_size: 16 << 20, no_alloc: false }).unwrap();
    let w = ctx.new_tensor(DType::Q4_1, &[64, 4]).unwrap();
    let one = ctx.new_tensor(DType::F32, &[64, MIN_FEW_COLUMNS - 1]).unwrap();
    let many = ctx.new_tensor(DType::F32, &[64, MAX_FEW_COLUMNS + 1]).unwrap();
    let q8 = ctx.new_tensor(DType::Q8_0, &[64, 4]).unwrap();
    let two = ctx.new_tensor(DType::F32, &[64, MIN_FEW_COLUMNS]).unwrap();
    for (a, b) in [(w, one), (w, many), (q8, two)] {
        assert!(ctx.mul_mat_few_columns(a, b).is_err());
        // `product` falls back to ggml's kernel instead.
        assert_eq!(ctx.product(a, b).unwrap().shape(), ctx.mul_mat(a, b).unwrap().shape());
    }
}
