//! Tensors in a backend buffer: declared, allocated zeroed, filled in place, used from a graph.

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
    Backend::cpu(2).unwrap().compute(&graph).unwrap();
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
