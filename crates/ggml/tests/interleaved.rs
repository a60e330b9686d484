//! Q4_1 and Q8_0 matrices stored interleaved for products (on AVX-512 VNNI machines) multiply
//! through `product` to ggml's own product of the plain matrix, bit for bit, at every column count
//! (the interleaved kernel's 1–15, the VNNI kernel's 16 and more), and within the derived bound of
//! f64 math; their rows looked up are ggml's `get_rows` of the plain matrix; ggml's product and
//! reads refuse them rather than misread them.

mod common;

use common::{decode, Rng};
use ggml::{Backend, ComputeBuffer, DType, TensorStore};

#[test]
fn interleaved_products_and_rows_are_ggmls_bit_for_bit() {
    for dtype in [DType::Q4_1, DType::Q8_0] {
        check(dtype);
    }
}

fn check(dtype: DType) {
    let (k, m) = (576usize, 48usize);
    let shape = [k as i64, m as i64];
    let vnni = ggml::own_kernels().iter().any(|kernel| kernel.contains("VNNI"));
    assert_eq!(TensorStore::interleaves(dtype, &shape), vnni, "interleaved exactly where the VNNI kernels run");
    assert!(!TensorStore::interleaves(dtype, &[k as i64, m as i64 + 8]), "rows must come in sixteens");
    assert!(!TensorStore::interleaves(DType::Q4_0, &shape), "Q4_1 and Q8_0 only");
    let mut rng = Rng::new(11);
    // Offset weights, so that the minimums matter.
    let values: Vec<f32> = rng.normals(k * m).iter().map(|v| v * 0.05 + 0.02).collect();
    let bytes = dtype.quantize(&values, k).unwrap();
    let mut store = TensorStore::new(2).unwrap();
    let plain = store.add("plain", dtype, &shape).unwrap();
    let stored = store.add_for_products("stored", dtype, &shape).unwrap();
    store.allocate().unwrap();
    assert_eq!(store.is_interleaved(stored), vnni);
    store.data_mut(plain).unwrap().copy_from_slice(&bytes);
    store.get(stored).write_bytes(&bytes).unwrap();
    if vnni {
        assert!(store.get(stored).is_interleaved() && !store.get(plain).is_interleaved());
        assert!(store.get(stored).read_bytes().is_err(), "interleaved bytes are not ggml's");
        assert!(store.data_mut(stored).is_err(), "nor written in place");
    }
    let backend = Backend::cpu_exact(2).unwrap();
    let weights = decode(dtype, &bytes, k * m);
    for n in [1usize, 2, 3, 4, 7, 15, 16, 33] {
        let mut compute = ComputeBuffer::new().unwrap();
        let ctx = compute.context(8, 16).unwrap();
        let x = ctx.new_tensor(DType::F32, &[k as i64, n as i64]).unwrap().set_input();
        if vnni {
            assert!(ctx.mul_mat(store.get(stored), x).is_err(), "ggml's product cannot read the interleave");
        }
        let (theirs, ours) = (ctx.mul_mat(store.get(plain), x).unwrap(), ctx.product(store.get(stored), x).unwrap());
        let mut graph = ctx.new_graph(16).unwrap();
        graph.expand(theirs).unwrap();
        graph.expand(ours).unwrap();
        ctx.allocate(&graph).unwrap();
        let xs = rng.normals(k * n);
        x.write_f32(&xs).unwrap();
        backend.compute(&graph).unwrap();
        let (theirs, ours) = (theirs.read_f32().unwrap(), ours.read_f32().unwrap());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&ours) == bits(&theirs), "{dtype} {n} columns: not ggml's product of the plain matrix bit for bit");
        // And against f64 (Q8_0 has no minimums: that term is 0 there) over the stored weights and the Q8_0-rounded columns (Q8_1 rounds as
        // Q8_0): each block's scaled dot rounds once, the blocks add in f32, and Q8_1 keeps each
        // block's scaled sum in f16 (2^-11 of it, times the block's minimum).
        let x_dec = decode(DType::Q8_0, &DType::Q8_0.quantize(&xs, k).unwrap(), k * n);
        for c in 0..n {
            for r in 0..m {
                let (row, col) = (&weights[r * k..(r + 1) * k], &x_dec[c * k..(c + 1) * k]);
                let want: f64 = row.iter().zip(col).map(|(&a, &b)| a as f64 * b as f64).sum();
                let terms: f64 = row.iter().zip(col).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let mins: f64 = if dtype != DType::Q4_1 {
                    0.0
                } else {
                    row.chunks(32)
                        .zip(col.chunks(32))
                        .map(|(a, b)| a.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)) * b.iter().map(|&v| v.abs() as f64).sum::<f64>())
                        .sum()
                };
                let bound = terms * (k / 32 + 3) as f64 * 2f64.powi(-23) + mins * 2f64.powi(-10) + 1e-12;
                let got = ours[c * m + r] as f64;
                assert!((got - want).abs() <= bound, "{dtype} {n} columns ({r}, {c}): {got} vs {want} (bound {bound:.2e})");
            }
        }
    }
}

#[test]
fn interleaved_rows_are_ggmls_get_rows() {
    for dtype in [DType::Q4_1, DType::Q8_0] {
        let (k, m) = (96usize, 32usize);
        let values = Rng::new(3).normals(k * m);
        let bytes = dtype.quantize(&values, k).unwrap();
        let mut store = TensorStore::new(2).unwrap();
        let plain = store.add("plain", dtype, &[k as i64, m as i64]).unwrap();
        let stored = store.add_for_products_and_rows("stored", dtype, &[k as i64, m as i64]).unwrap();
        store.allocate().unwrap();
        store.data_mut(plain).unwrap().copy_from_slice(&bytes);
        store.get(stored).write_bytes(&bytes).unwrap();
        assert_eq!(store.is_interleaved(stored), TensorStore::interleaves(dtype, &[k as i64, m as i64]));
        let mut compute = ComputeBuffer::new().unwrap();
        let ctx = compute.context(8, 16).unwrap();
        let ids = ctx.new_tensor(DType::I32, &[5]).unwrap().set_input();
        let (theirs, ours) = (ctx.get_rows(store.get(plain), ids).unwrap(), ctx.get_rows(store.get(stored), ids).unwrap());
        let mut graph = ctx.new_graph(16).unwrap();
        graph.expand(theirs).unwrap();
        graph.expand(ours).unwrap();
        ctx.allocate(&graph).unwrap();
        ids.write_i32(&[0, 31, 17, 16, 5]).unwrap();
        Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(ours.read_f32().unwrap()), bits(theirs.read_f32().unwrap()), "{dtype}: rows differ from ggml's get_rows");
    }
}

/// A stack of matrices interleaved as one tensor multiplies through views of each whole matrix (CSM's
/// per-codebook heads) as ggml multiplies the plain stack's.
#[test]
fn views_of_stacked_interleaved_matrices_multiply_as_ggmls() {
    let (k, m, stack) = (64usize, 32usize, 3usize);
    let shape = [k as i64, m as i64, stack as i64];
    let values = Rng::new(9).normals(k * m * stack);
    let bytes = DType::Q8_0.quantize(&values, k).unwrap();
    let mut store = TensorStore::new(2).unwrap();
    let plain = store.add("plain", DType::Q8_0, &shape).unwrap();
    let stored = store.add_for_products("stored", DType::Q8_0, &shape).unwrap();
    store.allocate().unwrap();
    store.data_mut(plain).unwrap().copy_from_slice(&bytes);
    store.get(stored).write_bytes(&bytes).unwrap();
    assert_eq!(store.is_interleaved(stored), TensorStore::interleaves(DType::Q8_0, &shape));
    let mut compute = ComputeBuffer::new().unwrap();
    let ctx = compute.context(16, 32).unwrap();
    let x = ctx.new_tensor(DType::F32, &[k as i64, 2]).unwrap().set_input();
    let mut graph = ctx.new_graph(32).unwrap();
    let mut pairs = Vec::new();
    for s in 0..stack {
        let (p, q) = (store.get(plain), store.get(stored));
        let p = ctx.view(p, &[k as i64, m as i64], &[p.strides()[1]], s * p.strides()[2]).unwrap();
        let q = ctx.view(q, &[k as i64, m as i64], &[q.strides()[1]], s * q.strides()[2]).unwrap();
        let (theirs, ours) = (ctx.mul_mat(p, x).unwrap(), ctx.product(q, x).unwrap());
        graph.expand(theirs).unwrap();
        graph.expand(ours).unwrap();
        pairs.push((theirs, ours));
    }
    ctx.allocate(&graph).unwrap();
    x.write_f32(&Rng::new(10).normals(2 * k)).unwrap();
    Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
    for (s, (theirs, ours)) in pairs.into_iter().enumerate() {
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(ours.read_f32().unwrap()), bits(theirs.read_f32().unwrap()), "matrix {s} of the stack");
    }
}
