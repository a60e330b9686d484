//! Tensors in a backend buffer: declared, allocated zeroed, filled in place, used from a graph.
mod common;

use ggml::{Backend, ComputeBuffer, DType, TensorStore};

#[test]
fn store_tensors_are_allocated_filled_in_place_and_usable_from_graphs() {
    let mut store = TensorStore::new(4).unwrap();
    let w = store.add("w", DType::Q8_0, &[64, 2]).unwrap();
    let bias = store.add("bias", DType::F32, &[2]).unwrap();
    assert!(store.add("w", DType::F32, &[1]).is_err(), "duplicate name");
    assert!(store.data_mut(w).is_err(), "no memory before allocation");
    store.allocate().unwrap();
    assert!(store.add("late", DType::F32, &[1]).is_err(), "added after allocation");
    assert!(store.buffer_bytes() >= 2 * 34 * 2 + 8);
    assert!(store.data_mut(bias).unwrap().iter().all(|&b| b == 0), "buffers start zeroed");

    let rows: Vec<f32> = (0..128).map(|i| if i < 64 { 1.0 } else { -2.0 }).collect();
    store.data_mut(w).unwrap().copy_from_slice(&DType::Q8_0.quantize(&rows, 64).unwrap());
    store.get(bias).write_f32(&[0.5, 0.25]).unwrap();
    assert_eq!(store.find("bias"), Some(bias));

    let mut compute = ComputeBuffer::new().unwrap();
    let ctx = compute.context(8, 16).unwrap();
    let x = ctx.new_tensor(DType::F32, &[64, 1]).unwrap().set_input();
    let y = ctx.add(ctx.mul_mat(store.get(w), x).unwrap(), store.get(bias)).unwrap();
    let mut graph = ctx.new_graph(16).unwrap();
    graph.expand(y).unwrap();
    ctx.allocate(&graph).unwrap();
    x.write_f32(&[1.0; 64]).unwrap();
    Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
    // Row sums: 64·1 + 0.5 and 64·(−2) + 0.25; Q8_0 holds ±1 and ±2 exactly (q = ±127, d = amax/127).
    let got = y.read_f32().unwrap();
    assert!((got[0] - 64.5).abs() < 0.05 && (got[1] + 127.75).abs() < 0.1, "{got:?}");
}

#[test]
fn kept_graphs_recompute_with_new_inputs_and_refuse_freed_stores() {
    use ggml::ReusableGraph;
    let mut store = TensorStore::new(1).unwrap();
    let w = store.add("w", DType::F32, &[4, 2]).unwrap();
    store.allocate().unwrap();
    store.get(w).write_f32(&[1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0]).unwrap();

    let kept = ReusableGraph::new(8, 8).unwrap();
    let mut graph = kept.context().new_graph(8).unwrap();
    let x = kept.context().new_tensor(DType::F32, &[4]).unwrap().set_input().set_name("x");
    let y = kept.context().mul_mat(store.get(w), x).unwrap().set_name("y");
    graph.expand(y).unwrap();
    let sealed = graph.seal();
    kept.finish(sealed).unwrap();

    let backend = Backend::cpu(1).unwrap();
    for (input, want) in [([1.0, 2.0, 3.0, 4.0], [10.0, 10.0]), ([1.0, 0.0, 0.0, 1.0], [2.0, 2.0])] {
        kept.tensor("x").unwrap().write_f32(&input).unwrap();
        kept.compute(&backend).unwrap();
        assert_eq!(kept.tensor("y").unwrap().read_f32().unwrap(), want);
    }
    assert!(kept.is_current());
    // The weight is a tensor of the graph too, but its memory is the store's: a kept graph does not
    // keep it alive, so it never hands it out (reading it after the store is gone would read freed memory).
    let refused = kept.tensor("w").unwrap_err().to_string();
    assert!(refused.contains("lives in a store"), "{refused}");
    drop(store);
    assert!(!kept.is_current(), "the weights it reads are gone");
    assert!(kept.compute(&backend).is_err());
    assert!(kept.tensor("w").is_err(), "a freed store's tensor through a kept graph");
    // The graph's own tensors (its memory) stay readable: the last result.
    assert_eq!(kept.tensor("y").unwrap().read_f32().unwrap(), [2.0, 2.0]);
}

/// A tensor of a store that was never allocated has no memory: allocating a graph over it would give
/// it memory in the compute buffer, which the store would keep pointing into. Both kinds of graph refuse.
#[test]
fn graphs_over_unallocated_store_tensors_are_refused() {
    use ggml::ReusableGraph;
    let mut store = TensorStore::new(1).unwrap();
    let w = store.add("w", DType::F32, &[4, 2]).unwrap();

    let mut compute = ComputeBuffer::new().unwrap();
    let ctx = compute.context(8, 8).unwrap();
    let x = ctx.new_tensor(DType::F32, &[4]).unwrap();
    let mut graph = ctx.new_graph(8).unwrap();
    graph.expand(ctx.mul_mat(store.get(w), x).unwrap()).unwrap();
    let refused = ctx.allocate(&graph).unwrap_err().to_string();
    assert!(refused.contains("has no memory"), "{refused}");
    assert!(!store.get(w).is_allocated(), "the store's tensor got memory it does not own");

    let kept = ReusableGraph::new(8, 8).unwrap();
    let mut graph = kept.context().new_graph(8).unwrap();
    let x = kept.context().new_tensor(DType::F32, &[4]).unwrap();
    graph.expand(kept.context().mul_mat(store.get(w), x).unwrap()).unwrap();
    assert!(kept.finish(graph.seal()).is_err());
    assert!(!store.get(w).is_allocated());
    store.allocate().unwrap();
    assert!(store.get(w).is_allocated());
}

#[test]
fn kept_graphs_only_read_store_tensors() {
    use ggml::{Context, ReusableGraph};
    let data = Context::with_data(4, 1024).unwrap();
    let w = data.new_tensor(DType::F32, &[4, 2]).unwrap();
    let kept = ReusableGraph::new(8, 8).unwrap();
    let mut graph = kept.context().new_graph(8).unwrap();
    let x = kept.context().new_tensor(DType::F32, &[4]).unwrap();
    graph.expand(kept.context().mul_mat(w, x).unwrap()).unwrap();
    let sealed = graph.seal();
    assert!(kept.finish(sealed).is_err(), "a tensor outside any store cannot be tracked");
}

/// Q4_0 matrices in ggml's repack buffer (when this CPU has a layout for them) compute the same
/// products as the plain layout, against f64 products over the dequantized weights, through `product`
/// too (whose VNNI kernel, taking 16 columns and more, reads both layouts and gives ggml's plain-layout
/// bits: so `product` of either layout is bit for bit ggml's product of one of them); reading them back
/// (which ggml's repack buffer cannot do) is an error, not a crash.
#[test]
fn repacked_q4_0_matrices_compute_the_same_products() {
    let (cols, rows) = (256i64, 64i64);
    assert!(!TensorStore::repacks(DType::Q4_1, &[cols, rows]), "no Q4_1 layout on x86");
    assert!(!TensorStore::repacks(DType::Q4_0, &[cols, rows + 1]), "rows must be a multiple of 8");
    let mut rng = common::Rng::new(5);
    let values = rng.normals((cols * rows) as usize);
    let bytes = DType::Q4_0.quantize(&values, cols as usize).unwrap();
    let weights = common::decode(DType::Q4_0, &bytes, values.len());
    let mut store = TensorStore::new(2).unwrap();
    let plain = store.add("plain", DType::Q4_0, &[cols, rows]).unwrap();
    let packed = store.add_for_products("packed", DType::Q4_0, &[cols, rows]).unwrap();
    store.allocate().unwrap();
    assert!(!store.is_repacked(plain));
    assert_eq!(store.is_repacked(packed), TensorStore::repacks(DType::Q4_0, &[cols, rows]));
    store.data_mut(plain).unwrap().copy_from_slice(&bytes);
    store.get(packed).write_bytes(&bytes).unwrap();
    if store.is_repacked(packed) {
        assert!(store.get(packed).read_bytes().is_err(), "the repack buffer has no reads");
        assert!(store.data_mut(packed).is_err(), "nor in-place writes");
    }
    let backend = Backend::cpu_exact(2).unwrap();
    for n in [1i64, 5, 17] {
        let mut compute = ComputeBuffer::new().unwrap();
        let ctx = compute.context(8, 16).unwrap();
        let x = ctx.new_tensor(DType::F32, &[cols, n]).unwrap().set_input();
        let (a, b) = (ctx.mul_mat(store.get(plain), x).unwrap(), ctx.mul_mat(store.get(packed), x).unwrap());
        let (c, d) = (ctx.product(store.get(plain), x).unwrap(), ctx.product(store.get(packed), x).unwrap());
        let mut graph = ctx.new_graph(16).unwrap();
        for t in [a, b, c, d] {
            graph.expand(t).unwrap();
        }
        ctx.allocate(&graph).unwrap();
        let xs = rng.normals((cols * n) as usize);
        x.write_f32(&xs).unwrap();
        backend.compute(&graph).unwrap();
        let (a, b, c, d) = (a.read_f32().unwrap(), b.read_f32().unwrap(), c.read_f32().unwrap(), d.read_f32().unwrap());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&c) == bits(&a), "{n} columns: product of the plain layout is not ggml's");
        assert!(
            bits(&d) == bits(&a) || bits(&d) == bits(&b),
            "{n} columns: product of the repacked layout is neither layout's ggml product"
        );
        if n >= 16 && ggml::own_kernels().iter().any(|k| k.contains("VNNI")) {
            assert!(bits(&d) == bits(&a), "{n} columns: the VNNI kernel misread the repacked layout");
        }
        for j in 0..n as usize {
            for r in 0..rows as usize {
                let exact: f64 = (0..cols as usize).map(|c| weights[r * cols as usize + c] as f64 * xs[j * cols as usize + c] as f64).sum();
                let scale: f64 =
                    (0..cols as usize).map(|c| (weights[r * cols as usize + c] * xs[j * cols as usize + c]).abs() as f64).sum();
                let (pa, pb) = (a[j * rows as usize + r] as f64, b[j * rows as usize + r] as f64);
                // Both round the activations to q8_0 (about 1/254 of each block's largest value).
                assert!((pa - exact).abs() <= 0.02 * scale, "plain row {r} col {j}: {pa} vs {exact}");
                assert!((pb - pa).abs() <= 1e-4 * scale, "repacked row {r} col {j}: {pb} vs plain {pa}");
                let (pc, pd) = (c[j * rows as usize + r] as f64, d[j * rows as usize + r] as f64);
                assert!((pc - pa).abs() <= 1e-4 * scale && (pd - pa).abs() <= 1e-4 * scale, "product row {r} col {j}: {pc}, {pd} vs {pa}");
            }
        }
    }
}

#[test]
fn byte_copies_between_stores_land_whole_and_refuse_bad_ranges() {
    use ggml::{copy_bytes, ByteCopy};
    let mut from = TensorStore::new(2).unwrap();
    let a = from.add("a", DType::F16, &[1024, 700]).unwrap();
    let b = from.add("b", DType::Q8_0, &[64, 3]).unwrap();
    from.allocate().unwrap();
    let mut to = TensorStore::new(2).unwrap();
    let c = to.add("c", DType::F16, &[1024, 900]).unwrap();
    let d = to.add("d", DType::Q8_0, &[64, 3]).unwrap();
    to.allocate().unwrap();
    // Bytes that differ everywhere, so a piece copied to the wrong offset shows.
    let pattern = |n: usize, seed: usize| (0..n).map(|i| (i.wrapping_mul(2654435761) >> 7 ^ seed) as u8).collect::<Vec<u8>>();
    let (a_bytes, b_bytes) = (pattern(from.get(a).nbytes(), 1), pattern(from.get(b).nbytes(), 2));
    from.data_mut(a).unwrap().copy_from_slice(&a_bytes);
    from.data_mut(b).unwrap().copy_from_slice(&b_bytes);
    let part = 2048 * 650; // 650 rows of a, several threads' shares
    let copies = [
        ByteCopy { src: from.get(a), dst: to.get(c), len: part },
        ByteCopy { src: from.get(b), dst: to.get(d), len: from.get(b).nbytes() },
    ];
    for threads in [1, 2, 3, 8] {
        to.get(c).write_bytes(&vec![0; to.get(c).nbytes()]).unwrap();
        to.get(d).write_bytes(&vec![0; to.get(d).nbytes()]).unwrap();
        copy_bytes(&copies, threads).unwrap();
        let got = to.get(c).read_bytes().unwrap();
        assert_eq!(&got[..part], &a_bytes[..part], "{threads} threads");
        assert!(got[part..].iter().all(|&x| x == 0), "{threads} threads: wrote past the copy");
        assert_eq!(to.get(d).read_bytes().unwrap(), b_bytes, "{threads} threads");
    }
    let too_long = ByteCopy { src: from.get(b), dst: to.get(d), len: from.get(b).nbytes() + 1 };
    assert!(copy_bytes(&[too_long], 2).is_err(), "a copy past the source's end");
    let onto_itself = ByteCopy { src: to.get(c), dst: to.get(c), len: 64 };
    assert!(copy_bytes(&[onto_itself], 2).is_err(), "a destination overlapping its source");
    let twice = ByteCopy { src: from.get(b), dst: to.get(d), len: 32 };
    assert!(copy_bytes(&[twice, twice], 2).is_err(), "two copies into the same bytes");
}
