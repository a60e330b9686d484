//! Decode speed of a Mimi codec and where a call's time goes (dev tool: per-op totals, the slowest
//! products with their rates).
use ccsm::mimi::{MimiDecoder, MimiModel, MimiOptions};
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = MimiModel::load(&args[1]).unwrap();
    let chunk: usize = args[2].parse().unwrap();
    let n = 160;
    let q = model.config().n_q;
    let frames: Vec<Vec<u32>> = (0..n).map(|t| (0..q).map(|k| ((t * 31 + k * 17) % 2048) as u32).collect()).collect();
    let kv: ccsm::CacheType = args.get(4).map_or("f32", |s| s.as_str()).parse().unwrap();
    let mut d = MimiDecoder::new(model, MimiOptions { max_chunk_frames: chunk, k_type: kv, v_type: kv, ..Default::default() }).unwrap();
    d.decode(&frames[..chunk]).unwrap();
    let mut s = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for f in frames.chunks(chunk) {
            d.decode(f).unwrap();
        }
        s = s.min(start.elapsed().as_secs_f64());
    }
    println!("{n} frames in {s:.3} s: {:.2} ms/frame, RTF {:.3}", 1000.0 * s / n as f64, s / (n as f64 * 0.08));
    let mut times = Vec::new();
    d.decode_profiled(&frames[..chunk], &mut times).unwrap();
    let total: f64 = times.iter().map(|t| t.seconds).sum();
    println!("one call of {chunk} frames, profiled: {:.3} ms", 1000.0 * total);
    for o in ccsm::profile::by_op(&times).iter().take(8) {
        println!("{:>16} {:4} nodes {:8.3} ms {:5.1} %", o.op, o.nodes, 1000.0 * o.seconds, 100.0 * o.seconds / total);
    }
    let mut mm: Vec<_> = times.iter().filter(|t| t.op == "MUL_MAT").collect();
    mm.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    for t in mm.iter().take(args.get(3).map_or(16, |v| v.parse().unwrap())) {
        let a = t.sources[0].unwrap();
        let b = t.sources[1].unwrap();
        let flop = 2.0 * a[0] as f64 * a[1] as f64 * b[1] as f64;
        println!("{:?} x {:?} {:.3} ms {:.1} GFLOP/s", &a[..2], &b[..2], 1000.0 * t.seconds, flop / t.seconds / 1e9);
    }
}
