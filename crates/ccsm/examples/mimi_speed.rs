use ccsm::mimi::{MimiDecoder, MimiModel, MimiOptions};
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = MimiModel::load(&args[1]).unwrap();
    let chunk: usize = args[2].parse().unwrap();
    let n = 40;
    let q = model.config().n_q;
    let frames: Vec<Vec<u32>> = (0..n).map(|t| (0..q).map(|k| ((t * 31 + k * 17) % 2048) as u32).collect()).collect();
    let mut d = MimiDecoder::new(model, MimiOptions { max_chunk_frames: chunk, ..Default::default() }).unwrap();
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
    for f in frames.chunks(chunk).take(4) {
        d.decode_profiled(f, &mut times).unwrap();
    }
    let total: f64 = times.iter().map(|t| t.seconds).sum();
    for o in ccsm::profile::by_op(&times).iter().take(8) {
        println!(
            "{:>16} {:4} nodes {:8.3} ms/frame {:5.1} %",
            o.op,
            o.nodes / 4,
            1000.0 * o.seconds / (4 * chunk) as f64,
            100.0 * o.seconds / total
        );
    }
    let per = times.len() / 4;
    let mut mm: Vec<_> = times[..per].iter().filter(|t| t.op == "MUL_MAT").collect();
    mm.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    for t in mm.iter().take(24) {
        let a = t.sources[0].unwrap();
        let b = t.sources[1].unwrap();
        let flop = 2.0 * a[0] as f64 * a[1] as f64 * b[1] as f64;
        println!("{:?} x {:?} {:.3} ms {:.1} GFLOP/s", &a[..2], &b[..2], 1000.0 * t.seconds, flop / t.seconds / 1e9);
    }
}
