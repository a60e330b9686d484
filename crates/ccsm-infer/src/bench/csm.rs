//! CSM: prompt rows per second and frames per second, with the time split between backbone, decoder,
//! sampling and (with a codec) the codec.

use std::time::Instant;

use anyhow::{Context, Result};

use ccsm::csm::{CsmGenerator, CsmModel, CsmOptions, CsmSession, FrameRequest, PrefillRequest, Row, SessionCaches};
use ccsm::mimi::{MimiDecoder, MimiModel, MimiOptions};
use ccsm::sampling::{Sampler, SamplerConfig};
use ccsm::Model;

use super::{filler_tokens, model_name, reset_peak_rss, BenchRow, BenchTest, FrameDetail, RowSource};
use crate::args::LogArgs;
use crate::cli::BenchArgs;
use crate::progress;

/// CSM: prompt rows per second (`-p` text rows) and frames per second (`-n` frames) at each depth.
pub fn bench_csm(args: &BenchArgs, log: &LogArgs, file: &ggml::gguf::GgufFile, placement: &ccsm::Placement) -> Result<Vec<BenchRow>> {
    let name = model_name(args);
    let mut weights = Some(CsmModel::from_file_placed(file, &args.model, placement)?);
    let mut codec = match &args.codec {
        Some(path) => {
            let model = MimiModel::load(path).with_context(|| format!("loading the codec {}", path.display()))?;
            Some(MimiDecoder::new(model, MimiOptions { n_threads: args.threads as usize, ..MimiOptions::default() })?)
        }
        None => None,
    };
    let tests: Vec<BenchTest> =
        [(BenchTest::Pp, args.n_prompt), (BenchTest::Frame, args.n_gen)].into_iter().filter(|t| t.1 > 0).map(|t| t.0).collect();
    let bar = progress::bar((args.cache_types.len() * args.attention.len() * args.depths.len() * tests.len()) as u64, "bench", log.quiet);
    let mut rows = Vec::new();
    for (&cache, &attention) in args.cache_types.iter().flat_map(|c| args.attention.iter().map(move |a| (c, a))) {
        for &depth in &args.depths {
            let csm = weights.take().expect("weights are returned after each run");
            let (text_vocab, n_ctx_train) = (csm.config().text_vocab, csm.config().backbone.n_ctx_train);
            let n_ctx = depth as usize + args.n_prompt.max(args.n_gen) as usize + 1;
            anyhow::ensure!(
                n_ctx <= n_ctx_train,
                "depth {depth} + {} rows exceeds the model's context {n_ctx_train}",
                args.n_prompt.max(args.n_gen)
            );
            let options = CsmOptions { n_ctx, k_type: cache, v_type: cache, n_threads: args.threads as usize, n_batch: 512 };
            let mut generator = CsmGenerator::new(csm, options)?;
            generator.set_kv_rotation(args.kv_rotation)?;
            generator.set_attention(attention);
            generator.set_code_limit(codec.as_ref().map(|c| c.model().config().codebook_size));
            reset_peak_rss();
            let text_rows = |n: usize, seed: u64| -> Vec<Row> { filler_tokens(n, text_vocab, seed).into_iter().map(Row::Text).collect() };
            for &test in &tests {
                let mut samples = Vec::new();
                let mut detail = FrameDetail {
                    real_time_factor: 0.0,
                    backbone_share: 0.0,
                    decoder_share: 0.0,
                    sampling_share: 0.0,
                    codec_share: 0.0,
                    time_to_first_audio_seconds: None,
                };
                for rep in 0..args.repetitions {
                    generator.reset();
                    let request_start = Instant::now();
                    generator.prefill(&text_rows(depth.max(1) as usize, 1))?;
                    if test == BenchTest::Pp {
                        let prompt = text_rows(args.n_prompt as usize, 100 + rep as u64);
                        let start = Instant::now();
                        generator.prefill(&prompt)?;
                        samples.push(args.n_prompt as f64 / start.elapsed().as_secs_f64());
                        continue;
                    }
                    let mut sampler = Sampler::new(SamplerConfig::csm(rep as u64))?;
                    let before = generator.timings();
                    let (mut codec_seconds, mut first_audio) = (0.0, None);
                    if let Some(c) = codec.as_mut() {
                        c.reset()?;
                    }
                    let start = Instant::now();
                    for _ in 0..args.n_gen {
                        let frame = generator.generate_frame(&mut sampler, None)?;
                        if let (Some(c), Some(frame)) = (codec.as_mut(), frame) {
                            let t = Instant::now();
                            c.decode(&[frame])?;
                            codec_seconds += t.elapsed().as_secs_f64();
                            first_audio.get_or_insert_with(|| request_start.elapsed().as_secs_f64());
                        }
                    }
                    let seconds = start.elapsed().as_secs_f64();
                    let t = generator.timings();
                    samples.push(args.n_gen as f64 / seconds);
                    detail = FrameDetail {
                        real_time_factor: seconds / (args.n_gen as f64 / crate::speech_cmd::FRAMES_PER_SECOND),
                        backbone_share: (t.backbone_seconds - before.backbone_seconds) / seconds,
                        decoder_share: (t.decoder_seconds - before.decoder_seconds) / seconds,
                        sampling_share: (t.sampling_seconds - before.sampling_seconds) / seconds,
                        codec_share: codec_seconds / seconds,
                        time_to_first_audio_seconds: first_audio,
                    };
                }
                let source = RowSource {
                    args,
                    model: &name,
                    size_bytes: generator.model().weight_bytes(),
                    params: generator.model().params(),
                    cache,
                    rotated: generator.backbone_cache().is_rotated(),
                    attention,
                    depth,
                };
                rows.push(source.row(test, samples, generator.kv_memory_usage(), (test == BenchTest::Frame).then_some(detail)));
                if test == BenchTest::Frame {
                    for &n in args.sessions.iter().filter(|&&n| n > 1) {
                        let samples = frames_together(&mut generator, n as usize, args, &text_rows(depth.max(1) as usize, 1))?;
                        let mut row = source.row(test, samples, generator.kv_memory_usage() * n as usize, None);
                        row.sessions = Some(n);
                        rows.push(row);
                    }
                }
                bar.inc(1);
            }
            weights = Some(generator.into_model());
        }
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// Frames per second of `n` sessions making frames together (every session's next frame in one engine
/// step), each prefilled with `prompt`: one sample per repetition of -n steps.
fn frames_together(generator: &mut CsmGenerator, n: usize, args: &BenchArgs, prompt: &[Row]) -> Result<Vec<f64>> {
    let (engine, own) = generator.parts_mut();
    let caches = SessionCaches {
        capacity: own.backbone_cache().capacity(),
        k_type: own.backbone_cache().k_type(),
        v_type: own.backbone_cache().v_type(),
    };
    let mut samples = Vec::new();
    for rep in 0..args.repetitions {
        let mut sessions: Vec<CsmSession> = (0..n).map(|_| engine.new_session(&caches)).collect::<ccsm::Result<_>>()?;
        let mut samplers: Vec<Sampler> =
            (0..n).map(|i| Sampler::new(SamplerConfig::csm((rep as usize * n + i) as u64))).collect::<ccsm::Result<_>>()?;
        let mut requests: Vec<PrefillRequest> = sessions.iter_mut().map(|session| PrefillRequest { session, rows: prompt }).collect();
        engine.prefill(&mut requests)?;
        let start = Instant::now();
        let mut made = 0;
        for _ in 0..args.n_gen {
            let mut requests: Vec<FrameRequest> =
                sessions.iter_mut().zip(samplers.iter_mut()).map(|(session, sampler)| FrameRequest::new(session, sampler)).collect();
            made += engine.step_frames(&mut requests)?.iter().filter(|f| f.is_some()).count();
        }
        samples.push(made as f64 / start.elapsed().as_secs_f64());
    }
    Ok(samples)
}
