//! Graph time on one thread and on two as the work per node grows: where a second thread starts to
//! pay for its wake-up and barriers (the constants of `threads_for` in `src/threads.rs`).
//! Each graph is a chain of 24 blocks (RMS norm, a K×K Q8_0 product, a residual add: 72 nodes).
//! Best of 300 runs per case, the two thread counts interleaved.
//!
//! cargo run --release -p ggml --example thread_crossover
use ggml::{Backend, Context, DType};
use std::time::Instant;

const LAYERS: i64 = 24;

fn main() {
    let one = Backend::cpu_exact(1).unwrap();
    let two = Backend::cpu_exact(2).unwrap();
    println!("| K | columns | work units | nodes | 1 thread µs | 2 threads µs | 2 / 1 |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for k in [32i64, 64, 96, 128, 192, 256, 384, 512, 768, 1024] {
        for columns in [1i64, 4] {
            let data_bytes = (LAYERS * k * k * 2) as usize + (1 << 20);
            let ctx = Context::with_data(4 * LAYERS as usize + 8, data_bytes).unwrap();
            let mut x = ctx.new_tensor(DType::F32, &[k, columns]).unwrap();
            x.write_f32(&vec![0.5; (k * columns) as usize]).unwrap();
            for _ in 0..LAYERS {
                let w = ctx.new_tensor(DType::Q8_0, &[k, k]).unwrap();
                w.write_f32(&(0..k * k).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect::<Vec<_>>()).unwrap();
                let normed = ctx.rms_norm(x, 1e-5).unwrap();
                let product = ctx.mul_mat(w, normed).unwrap();
                x = ctx.add(x, product).unwrap();
            }
            let mut graph = ctx.new_graph(4096).unwrap();
            graph.expand(x).unwrap();
            let mut best = [f64::MAX; 2];
            for _ in 0..300 {
                for (i, backend) in [&one, &two].into_iter().enumerate() {
                    let started = Instant::now();
                    backend.compute(&graph).unwrap();
                    best[i] = best[i].min(started.elapsed().as_secs_f64());
                }
            }
            // The units `threads_for` counts: 2·K per product element, in + out elements elsewhere.
            let units = LAYERS as f64 * (2.0 * (k * k * columns) as f64 + 5.0 * (k * columns) as f64);
            println!(
                "| {k} | {columns} | {units:.0} | {} | {:.1} | {:.1} | {:.2} |",
                3 * LAYERS,
                best[0] * 1e6,
                best[1] * 1e6,
                best[1] / best[0]
            );
        }
    }
}
