//! Q4_1 products with a few columns, ggml's kernel against the few-columns one, at SmolLM2's shapes:
//! `cargo run --release -p ggml --example few_columns_speed`. Interleaved, best of 5 runs of 100 products.

use std::time::Instant;

use ggml::{Backend, Context, ContextParams, DType};

fn main() {
    let backend = Backend::cpu_exact(2).unwrap();
    println!("| k × m | columns | ggml µs | few-columns µs | speed-up |");
    println!("|---|---:|---:|---:|---:|");
    for (k, m) in [(576usize, 1536usize), (1536, 576), (576, 576), (576, 192)] {
        for n in [2usize, 4, 8, 16] {
            let ctx = Context::new(ContextParams { mem_size: 256 << 20, no_alloc: false }).unwrap();
            let values: Vec<f32> = (0..k * m).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect();
            let w = ctx.new_tensor(DType::Q4_1, &[k as i64, m as i64]).unwrap();
            w.write_bytes_at(0, &DType::Q4_1.quantize(&values, k).unwrap()).unwrap();
            let x = ctx.new_tensor(DType::F32, &[k as i64, n as i64]).unwrap();
            x.write_f32(&(0..k * n).map(|i| (i % 13) as f32 - 6.0).collect::<Vec<_>>()).unwrap();
            let graph_of = |fast: bool| {
                let mut g = ctx.new_graph(256).unwrap();
                for _ in 0..100 {
                    let out = if fast { ctx.mul_mat_few_columns(w, x).unwrap() } else { ctx.mul_mat(w, x).unwrap() };
                    g.expand(out).unwrap();
                }
                g
            };
            let (slow, fast) = (graph_of(false), graph_of(true));
            let (mut best_slow, mut best_fast) = (f64::MAX, f64::MAX);
            for _ in 0..5 {
                let t = Instant::now();
                backend.compute(&slow).unwrap();
                best_slow = best_slow.min(t.elapsed().as_secs_f64() / 100.0);
                let t = Instant::now();
                backend.compute(&fast).unwrap();
                best_fast = best_fast.min(t.elapsed().as_secs_f64() / 100.0);
            }
            println!("| {k} × {m} | {n} | {:.1} | {:.1} | {:.2} |", best_slow * 1e6, best_fast * 1e6, best_slow / best_fast);
        }
    }
}
