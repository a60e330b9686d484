//! A Mimi codec alone: frames decoded per second, streaming (one frame per call, as generation feeds
//! it) and in chunks, with the real-time factor.

use std::time::Instant;

use anyhow::{Context, Result};

use ccsm::csm::Frame;
use ccsm::mimi::{MimiDecoder, MimiModel, MimiOptions};

use super::{model_name, reset_peak_rss, BenchRow, BenchTest, FrameDetail, RowSource};
use crate::args::LogArgs;
use crate::cli::BenchArgs;
use crate::progress;

/// Deterministic codes over the codebooks (what they are does not change the speed).
pub(crate) fn filler_frames(n: usize, codebooks: usize, size: usize) -> Vec<Frame> {
    (0..n).map(|t| (0..codebooks).map(|k| ((t * 31 + k * 17 + t * k) % size) as u32).collect()).collect()
}

pub fn bench_codec(args: &BenchArgs, log: &LogArgs, file: &ggml::gguf::GgufFile, placement: &ccsm::Placement) -> Result<Vec<BenchRow>> {
    let name = model_name(args);
    let mut weights =
        Some(MimiModel::from_file_placed(file, &args.model, placement).with_context(|| format!("loading {}", args.model.display()))?);
    let bar = progress::bar((args.cache_types.len() * args.chunk.len()) as u64, "bench", log.quiet);
    let mut rows = Vec::new();
    for &cache in &args.cache_types {
        for &chunk in &args.chunk {
            let model = weights.take().expect("weights are returned after each run");
            let c = model.config().clone();
            let options = MimiOptions { n_threads: args.threads as usize, k_type: cache, v_type: cache, max_chunk_frames: chunk as usize };
            let mut decoder = MimiDecoder::new(model, options).with_context(|| format!("a codec with a {cache} cache"))?;
            reset_peak_rss();
            let frames = filler_frames(args.n_gen.max(1) as usize, c.n_q, c.codebook_size);
            let decode_all = |d: &mut MimiDecoder| -> Result<f64> {
                d.reset()?;
                let start = Instant::now();
                for call in frames.chunks(chunk as usize) {
                    d.decode(call)?;
                }
                Ok(start.elapsed().as_secs_f64())
            };
            decode_all(&mut decoder)?; // builds the kept graphs
            let mut samples = Vec::new();
            let mut best = f64::MAX;
            for _ in 0..args.repetitions {
                let seconds = decode_all(&mut decoder)?;
                best = best.min(seconds);
                samples.push(frames.len() as f64 / seconds);
            }
            let detail = FrameDetail {
                real_time_factor: best / (frames.len() as f64 / c.frame_rate()),
                backbone_share: 0.0,
                decoder_share: 0.0,
                sampling_share: 0.0,
                codec_share: 1.0,
                time_to_first_audio_seconds: None,
            };
            let source = RowSource {
                args,
                model: &name,
                size_bytes: decoder.model().weight_bytes(),
                params: 0,
                cache,
                rotated: decoder.cache().is_rotated(),
                attention: ccsm::attention::AttentionChoice::Auto,
                depth: 0,
            };
            let mut row = source.row(BenchTest::Decode, samples, decoder.state_bytes(), Some(detail));
            row.n_prompt = chunk;
            if args.profile {
                let mut times = Vec::new();
                decoder.reset()?;
                decoder.decode_profiled(&frames[..(chunk as usize).min(frames.len())], &mut times)?;
                row.profile = Some(ccsm::profile::by_op(&times));
            }
            rows.push(row);
            bar.inc(1);
            weights = Some(decoder.into_model());
        }
    }
    bar.finish_and_clear();
    Ok(rows)
}
