//! Decode attention speed: ggml's flash attention against `split_attention`, SmolLM2's shape
//! (64-wide heads, 9 query heads over 3 KV heads), cells laid out as the cache stores them.
//! `cargo run --release -p ggml --example split_speed -- [N_KV] [N_Q] [THREADS]`
use ggml::{Backend, ComputeBuffer, DType};
use std::time::Instant;

fn main() {
    let args: Vec<i64> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let n_kv = args.first().copied().unwrap_or(4096);
    let n_q = args.get(1).copied().unwrap_or(1);
    let threads = args.get(2).copied().unwrap_or(2) as usize;
    let (hd, n_head, n_head_kv) = (64i64, 9i64, 3i64);
    let backend = Backend::cpu_exact(threads).unwrap();
    let only: Option<DType> = std::env::var("TYPE").ok().map(|t| t.parse().expect("a type"));
    for dtype in [DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1].into_iter().filter(|t| only.is_none_or(|o| o == *t)) {
        let mut line = format!("{dtype:>5} n_kv {n_kv} n_q {n_q}:");
        let modes: &[bool] = if std::env::var_os("SPLIT_ONLY").is_some() { &[true] } else { &[false, true] };
        for &split in modes {
            let mut compute = ComputeBuffer::new().unwrap();
            let ctx = compute.context(64, 32).unwrap();
            let q = ctx.new_tensor(DType::F32, &[hd, n_head, n_q]).unwrap().set_input();
            let k = ctx.new_tensor(dtype, &[hd, n_head_kv, n_kv]).unwrap().set_input();
            let v = ctx.new_tensor(dtype, &[hd, n_head_kv, n_kv]).unwrap().set_input();
            let mask = ctx.new_tensor(DType::F16, &[n_kv, n_q]).unwrap().set_input();
            let (qp, kp, vp) =
                (ctx.permute(q, [0, 2, 1, 3]).unwrap(), ctx.permute(k, [0, 2, 1, 3]).unwrap(), ctx.permute(v, [0, 2, 1, 3]).unwrap());
            let out = if split { ctx.split_attention(qp, kp, vp, mask, 0.125) } else { ctx.flash_attn_ext(qp, kp, vp, Some(mask), 0.125) }
                .unwrap();
            let mut graph = ctx.new_graph(32).unwrap();
            graph.expand(out).unwrap();
            ctx.allocate(&graph).unwrap();
            let fill = |n: i64| (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect::<Vec<f32>>();
            q.write_f32(&fill(hd * n_head * n_q)).unwrap();
            k.write_f32(&fill(hd * n_head_kv * n_kv)).unwrap();
            v.write_f32(&fill(hd * n_head_kv * n_kv)).unwrap();
            mask.write_f32(&vec![0.0; (n_kv * n_q) as usize]).unwrap();
            let mut best = f64::MAX;
            for _ in 0..50 {
                let t = Instant::now();
                backend.compute(&graph).unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            line += &format!("  {} {:7.1} us", if split { "split" } else { "ggml" }, 1e6 * best);
        }
        println!("{line}");
    }
}
