//! Measures what the ggml-sys build switches (llamafile sgemm, OpenMP) and the CPU repack buffer do
//! to a SmolLM2-shaped stack of matrix products (30 layers, width 576, FFN 1536), at batch 1
//! (decode) and batch 128 (prompt). Run once per build configuration:
//!   cargo run --release -p ggml --example kernel_choices [-- THREADS]
//!   cargo run --release -p ggml --no-default-features --example kernel_choices
//!   cargo run --release -p ggml --features ggml-sys/openmp --example kernel_choices

use std::time::Instant;

use ggml::{Backend, ComputeBuffer, DType, StoreMemory, TensorStore};

const LAYERS: usize = 30;
const WIDTH: i64 = 576;
const KV: i64 = 192;
const FFN: i64 = 1536;

fn weights(dtype: DType, memory: StoreMemory) -> ggml::Result<TensorStore> {
    let mut store = TensorStore::new(LAYERS * 7)?;
    let shapes = [
        ("q", WIDTH, WIDTH),
        ("k", WIDTH, KV),
        ("v", WIDTH, KV),
        ("o", WIDTH, WIDTH),
        ("gate", WIDTH, FFN),
        ("up", WIDTH, FFN),
        ("down", FFN, WIDTH),
    ];
    for l in 0..LAYERS {
        for (name, cols, rows) in shapes {
            store.add(&format!("{l}.{name}"), dtype, &[cols, rows])?;
        }
    }
    store.allocate_in(memory)?;
    let mut seed = 1u32;
    for l in 0..LAYERS {
        for (name, cols, rows) in shapes {
            let values: Vec<f32> = (0..cols * rows)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
                })
                .collect();
            let id = store.find(&format!("{l}.{name}")).expect("declared above");
            store.get(id).write_f32(&values)?;
        }
    }
    Ok(store)
}

fn run(store: &TensorStore, backend: &Backend, compute: &mut ComputeBuffer, batch: i64, reps: usize) -> ggml::Result<f64> {
    let w = |l: usize, n: &str| store.get(store.find(&format!("{l}.{n}")).expect("declared"));
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let ctx = compute.context(LAYERS * 16 + 4, 1024)?;
        let input = ctx.new_tensor(DType::F32, &[WIDTH, batch])?.set_input();
        let mut x = input;
        let mut graph = ctx.new_graph(1024)?;
        for l in 0..LAYERS {
            let h = ctx.rms_norm(x, 1e-5)?;
            graph.expand(ctx.mul_mat(w(l, "k"), h)?)?;
            graph.expand(ctx.mul_mat(w(l, "v"), h)?)?;
            x = ctx.add(x, ctx.mul_mat(w(l, "o"), ctx.mul_mat(w(l, "q"), h)?)?)?;
            let h = ctx.rms_norm(x, 1e-5)?;
            let act = ctx.swiglu(ctx.mul_mat(w(l, "gate"), h)?, ctx.mul_mat(w(l, "up"), h)?)?;
            x = ctx.add(x, ctx.mul_mat(w(l, "down"), act)?)?;
        }
        graph.expand(x)?;
        ctx.allocate(&graph)?;
        input.write_f32(&vec![0.1; (WIDTH * batch) as usize])?;
        let start = Instant::now();
        backend.compute(&graph)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> ggml::Result<()> {
    let threads = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let backend = Backend::cpu_exact(threads)?;
    let mut compute = ComputeBuffer::new()?;
    println!("features: {} | threads {threads}", ggml::cpu_features().join(" "));
    println!("| weights | memory | batch 1 ms | batch 128 ms | batch 128 rows/s |");
    println!("|---|---|---|---|---|");
    for dtype in [DType::Q4_1, DType::Q4_0, DType::Q8_0, DType::F16] {
        for memory in [StoreMemory::Host, StoreMemory::Repacked] {
            if memory == StoreMemory::Repacked && dtype == DType::F16 {
                continue;
            }
            let store = match weights(dtype, memory) {
                Ok(store) => store,
                Err(e) => {
                    println!("| {dtype} | {memory:?} | {e} | | |");
                    continue;
                }
            };
            let decode = run(&store, &backend, &mut compute, 1, 30)?;
            let prompt = run(&store, &backend, &mut compute, 128, 5)?;
            println!("| {dtype} | {memory:?} | {:.2} | {:.1} | {:.0} |", decode * 1e3, prompt * 1e3, 128.0 / prompt);
        }
    }
    Ok(())
}
