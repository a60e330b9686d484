use ggml::{Backend, ComputeBuffer, DType};
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kv_type: DType = args[1].parse().unwrap();
    let (n_q, n_kv, valid, heads): (i64, i64, usize, i64) =
        (args[2].parse().unwrap(), args[3].parse().unwrap(), args[4].parse().unwrap(), 8);
    let d = 64i64;
    let backend = Backend::cpu(2).unwrap();
    let mut compute = ComputeBuffer::new().unwrap();
    let ctx = compute.context(32, 32).unwrap();
    let q = ctx.new_tensor(DType::F32, &[d, n_q, heads]).unwrap().set_input();
    let k = ctx.new_tensor(kv_type, &[d, n_kv, heads]).unwrap().set_input();
    let v = ctx.new_tensor(kv_type, &[d, n_kv, heads]).unwrap().set_input();
    let mask = ctx.new_tensor(DType::F16, &[n_kv, n_q]).unwrap().set_input();
    let out = ctx.flash_attn_ext(q, k, v, Some(mask), 0.125).unwrap();
    let mut graph = ctx.new_graph(32).unwrap();
    graph.expand(out).unwrap();
    ctx.allocate(&graph).unwrap();
    q.write_f32(&vec![0.1; (d * n_q * heads) as usize]).unwrap();
    k.write_f32(&vec![0.1; (d * n_kv * heads) as usize]).unwrap();
    v.write_f32(&vec![0.1; (d * n_kv * heads) as usize]).unwrap();
    let m: Vec<f32> = (0..n_q as usize).flat_map(|_| (0..n_kv as usize).map(|c| if c < valid { 0.0 } else { f32::NEG_INFINITY })).collect();
    mask.write_f32(&m).unwrap();
    let mut best = f64::MAX;
    for _ in 0..50 {
        let t = Instant::now();
        backend.compute(&graph).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("FA {kv_type} q {n_q} x {heads} heads over {n_kv} cells ({valid} valid): {:.1} us", 1e6 * best);
}
