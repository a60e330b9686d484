//! Matrix-vector speed of one weight type: best time per product, weight bandwidth and GFLOP/s.
//!
//! `cargo run --release -p ggml --example gemv_speed TYPE K M N [MATRICES]`

use ggml::{Backend, ComputeBuffer, DType, TensorStore};
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dtype: DType = args[1].parse().unwrap();
    let (k, m, n): (i64, i64, i64) = (args[2].parse().unwrap(), args[3].parse().unwrap(), args[4].parse().unwrap());
    let layers: usize = args.get(5).map_or(1, |v| v.parse().unwrap());
    let mut store = TensorStore::new(layers).unwrap();
    let ids: Vec<_> = (0..layers).map(|l| store.add(&format!("w{l}"), dtype, &[k, m]).unwrap()).collect();
    store.allocate().unwrap();
    let vals: Vec<f32> = (0..k * m).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    for &id in &ids {
        store.get(id).write_f32(&vals).unwrap();
    }
    let backend = Backend::cpu_exact(2).unwrap();
    let mut compute = ComputeBuffer::new().unwrap();
    let ctx = compute.context(8 + 2 * layers, 8 + 2 * layers).unwrap();
    let x = ctx.new_tensor(DType::F32, &[k, n]).unwrap().set_input();
    let mut graph = ctx.new_graph(8 + 2 * layers).unwrap();
    for &id in &ids {
        graph.expand(ctx.mul_mat(store.get(id), x).unwrap()).unwrap();
    }
    ctx.allocate(&graph).unwrap();
    x.write_f32(&vec![0.5; (k * n) as usize]).unwrap();
    let reps = 200;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            backend.compute(&graph).unwrap();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    let bytes = store.buffer_bytes() as f64;
    println!(
        "{dtype} [{k}, {m}] x {n} cols, {layers} matrices: {:.1} us per product, {:.1} GB/s of weights, {:.1} GFLOP/s",
        1e6 * best / layers as f64,
        bytes / best / 1e9,
        2.0 * (k * m * n) as f64 * layers as f64 / best / 1e9
    );
}
