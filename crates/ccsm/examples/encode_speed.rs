//! Encode speed of a Mimi codec with its encoder: real-time factor of a whole clip (chunks of 16
//! frames per graph) and of frame-by-frame streaming (1920 samples in, one frame out), best of 3, as
//! JSON on stdout (read by tools/bench_codec_vs_moshi.py --encode).
//!
//! `cargo run --release -p ccsm --example encode_speed CODEC.gguf [SECONDS] [THREADS]`
use std::time::Instant;

use ccsm::mimi::{MimiCodec, MimiModel, MimiOptions};

fn main() -> ccsm::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: encode_speed CODEC.gguf [SECONDS] [THREADS]");
    let seconds: f64 = args.get(2).map_or(10.0, |s| s.parse().expect("seconds"));
    let threads: usize = args.get(3).map_or(2, |s| s.parse().expect("threads"));
    let model = MimiModel::load(path)?;
    let rate = model.config().sample_rate;
    let per_frame = model.config().frame_samples();
    let n_q = model.config().n_q;
    let mut codec = MimiCodec::new(model, MimiOptions { n_threads: threads, ..MimiOptions::default() })?;
    let frames = ((seconds * rate as f64) as usize).div_ceil(per_frame);
    // Deterministic noise (a speech-like level; the encoder's cost does not depend on the signal).
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let samples: Vec<f32> = (0..frames * per_frame)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect();
    let audio = (frames * per_frame) as f64 / rate as f64;
    codec.encode_all(&samples[..per_frame], n_q)?; // warm-up
    let (mut batch, mut streaming) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let start = Instant::now();
        codec.encode_all(&samples, n_q)?;
        batch = batch.min(start.elapsed().as_secs_f64());
        let mut stream = codec.new_encode_stream()?;
        let start = Instant::now();
        for chunk in samples.chunks(per_frame) {
            codec.encode(&mut stream, chunk, n_q)?;
        }
        streaming = streaming.min(start.elapsed().as_secs_f64());
    }
    println!(
        "{{\"audio_seconds\": {audio:.3}, \"threads\": {threads}, \"batch_rtf\": {:.5}, \"streaming_rtf\": {:.5}, \"streaming_ms_per_frame\": {:.3}}}",
        batch / audio,
        streaming / audio,
        1000.0 * streaming / frames as f64
    );
    Ok(())
}
