//! Time of a graph of NODES small adds on THREADS threads: the per-node barrier cost ggml::threads weighs.
//!
//! `cargo run --release -p ggml --example node_overhead NODES THREADS [WIDTH]`

use ggml::{Backend, ComputeBuffer, DType};
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let nodes: usize = args[1].parse().unwrap();
    let threads: usize = args[2].parse().unwrap();
    let width: i64 = args.get(3).map_or(64, |v| v.parse().unwrap());
    let backend = Backend::cpu_exact(threads).unwrap();
    let mut compute = ComputeBuffer::new().unwrap();
    let ctx = compute.context(nodes + 8, nodes + 8).unwrap();
    let x = ctx.new_tensor(DType::F32, &[width, 2]).unwrap().set_input();
    let mut y = x;
    for _ in 0..nodes {
        y = ctx.add(y, x).unwrap();
    }
    let mut graph = ctx.new_graph(nodes + 8).unwrap();
    graph.expand(y).unwrap();
    ctx.allocate(&graph).unwrap();
    x.write_f32(&vec![0.5; (width * 2) as usize]).unwrap();
    let mut best = f64::MAX;
    for _ in 0..20 {
        let t = Instant::now();
        backend.compute(&graph).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{nodes} tiny nodes on {threads} threads: {:.3} ms per compute, {:.2} us per node", 1000.0 * best, 1e6 * best / nodes as f64);
}
