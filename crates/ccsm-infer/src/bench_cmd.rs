//! `ccsm-infer bench`: prompt-processing and decode speed per cache type and depth, shaped like
//! llama-bench's output. Depth d means the cache already holds d tokens when a test starts.

use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use ccsm::csm::{CsmGenerator, CsmModel, CsmOptions, Row};
use ccsm::llama::LlamaModel;
use ccsm::sampling::{Sampler, SamplerConfig};
use ccsm::{CacheType, GGMLModel, Logits, Model, ModelOptions};

use crate::cli::{BenchArgs, BenchFormat, LogArgs};
use crate::{output, progress};

/// What a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchTest {
    /// Prompt processing: `-p` tokens (or CSM text rows) in one evaluation.
    Pp,
    /// Text generation: `-n` single-token steps.
    Tg,
    /// CSM: `-n` frames.
    Frame,
}

/// One row: a test (pp or tg) at one depth with one cache type.
#[derive(Serialize)]
pub struct BenchRow {
    pub model: String,
    pub size_bytes: u64,
    pub params: u64,
    pub threads: u32,
    pub k_type: CacheType,
    pub v_type: CacheType,
    /// Whether the cache stores Hadamard-rotated rows (`--kv-rotation`).
    pub kv_rotated: bool,
    pub test: BenchTest,
    pub n_prompt: u32,
    pub n_gen: u32,
    pub depth: u32,
    pub avg_ts: f64,
    pub stddev_ts: f64,
    pub samples_ts: Vec<f64>,
    pub kv_bytes: usize,
    pub peak_rss_bytes: Option<u64>,
    /// CSM frame tests: where the time went.
    pub frame_detail: Option<FrameDetail>,
}

/// A CSM frame test's split and real-time factor.
#[derive(Serialize, Clone, Copy)]
pub struct FrameDetail {
    /// Generation time over audio time (12.5 frames per second of audio): below 1 is faster than real time.
    pub real_time_factor: f64,
    /// Share of the frame time in the backbone step.
    pub backbone_share: f64,
    /// Share in the decoder's steps (31 per frame for CSM-1B).
    pub decoder_share: f64,
    pub sampling_share: f64,
}

impl BenchRow {
    fn test_name(&self) -> String {
        let base = match self.test {
            BenchTest::Pp => format!("pp{}", self.n_prompt),
            BenchTest::Frame => format!("frame{}", self.n_gen),
            BenchTest::Tg => format!("tg{}", self.n_gen),
        };
        if self.depth > 0 {
            format!("{base} @ d{}", self.depth)
        } else {
            base
        }
    }
}

/// What every row of one model, cache type and depth shares.
struct RowSource<'a> {
    args: &'a BenchArgs,
    model: &'a str,
    size_bytes: u64,
    params: u64,
    cache: CacheType,
    rotated: bool,
    depth: u32,
}

impl RowSource<'_> {
    fn row(&self, test: BenchTest, samples: Vec<f64>, kv_bytes: usize, frame_detail: Option<FrameDetail>) -> BenchRow {
        let (avg_ts, stddev_ts) = mean_stddev(&samples);
        BenchRow {
            model: self.model.to_owned(),
            size_bytes: self.size_bytes,
            params: self.params,
            threads: self.args.threads,
            k_type: self.cache,
            v_type: self.cache,
            kv_rotated: self.rotated,
            test,
            n_prompt: if test == BenchTest::Pp { self.args.n_prompt } else { 0 },
            n_gen: if test == BenchTest::Pp { 0 } else { self.args.n_gen },
            depth: self.depth,
            avg_ts,
            stddev_ts,
            samples_ts: samples,
            kv_bytes,
            peak_rss_bytes: peak_rss(),
            frame_detail,
        }
    }
}

/// Deterministic token ids spread over the vocabulary (what they are does not change the speed).
fn filler_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Peak resident memory since the last reset (Linux: VmHWM).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn mean_stddev(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = if n > 1.0 { samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

pub fn run(args: &BenchArgs, log: &LogArgs) -> Result<()> {
    let file = ggml::gguf::GgufFile::open(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let rows = if file.get::<String>("general.architecture")? == "csm" { bench_csm(args, log, &file)? } else { bench_llama(args, log)? };
    match args.output {
        BenchFormat::Json => output::println(&serde_json::to_string_pretty(&rows)?),
        BenchFormat::Jsonl => rows.iter().try_for_each(|r| serde_json::to_string(r).map(|l| output::println(&l)))?,
        BenchFormat::Md => output::print(&markdown(&rows)),
    }
    Ok(())
}

fn model_name(args: &BenchArgs) -> String {
    args.model.file_name().map_or_else(|| args.model.display().to_string(), |f| f.to_string_lossy().into_owned())
}

fn bench_llama(args: &BenchArgs, log: &LogArgs) -> Result<Vec<BenchRow>> {
    let mut weights = Some(LlamaModel::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?);
    let name = model_name(args);
    let tests: Vec<BenchTest> =
        [(BenchTest::Pp, args.n_prompt), (BenchTest::Tg, args.n_gen)].into_iter().filter(|t| t.1 > 0).map(|t| t.0).collect();
    let total = (args.cache_types.len() * args.depths.len() * tests.len()) as u64;
    let bar = progress::bar(total, "bench", log.quiet);
    let mut rows = Vec::new();
    for &cache in &args.cache_types {
        for &depth in &args.depths {
            let llama = weights.take().expect("weights are returned after each run");
            let n_ctx = depth as usize + args.n_prompt.max(args.n_gen) as usize + 1;
            let options = ModelOptions { n_ctx, k_type: cache, v_type: cache, n_threads: args.threads as usize, n_batch: 512 };
            let mut model = GGMLModel::new(llama, options).with_context(|| format!("a {cache} cache of {n_ctx} cells"))?;
            model.set_kv_rotation(args.kv_rotation)?;
            reset_peak_rss();
            let vocab = model.model().vocab_size();
            if depth > 0 {
                model.eval(&filler_tokens(depth as usize, vocab, 1), Logits::Last)?;
            }
            for &test in &tests {
                let mut samples = Vec::new();
                for rep in 0..args.repetitions {
                    model.truncate(depth as usize);
                    let seconds = if test == BenchTest::Pp {
                        let prompt = filler_tokens(args.n_prompt as usize, vocab, 100 + rep as u64);
                        let start = Instant::now();
                        model.eval(&prompt, Logits::Last)?;
                        start.elapsed().as_secs_f64() / args.n_prompt as f64
                    } else {
                        let tokens = filler_tokens(args.n_gen as usize, vocab, 200 + rep as u64);
                        let start = Instant::now();
                        for &t in &tokens {
                            model.eval(&[t], Logits::Last)?;
                        }
                        start.elapsed().as_secs_f64() / args.n_gen as f64
                    };
                    samples.push(1.0 / seconds);
                }
                let source = RowSource {
                    args,
                    model: &name,
                    size_bytes: model.model().weight_bytes(),
                    params: model.model().params(),
                    cache,
                    rotated: model.cache().is_rotated(),
                    depth,
                };
                rows.push(source.row(test, samples, model.kv_memory_usage(), None));
                bar.inc(1);
            }
            weights = Some(model.into_model());
        }
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// CSM: prompt rows per second (`-p` text rows) and frames per second (`-n` frames) at each depth.
fn bench_csm(args: &BenchArgs, log: &LogArgs, file: &ggml::gguf::GgufFile) -> Result<Vec<BenchRow>> {
    let name = model_name(args);
    let mut weights = Some(CsmModel::from_file(file, &args.model)?);
    let tests: Vec<BenchTest> =
        [(BenchTest::Pp, args.n_prompt), (BenchTest::Frame, args.n_gen)].into_iter().filter(|t| t.1 > 0).map(|t| t.0).collect();
    let bar = progress::bar((args.cache_types.len() * args.depths.len() * tests.len()) as u64, "bench", log.quiet);
    let mut rows = Vec::new();
    for &cache in &args.cache_types {
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
            reset_peak_rss();
            let text_rows = |n: usize, seed: u64| -> Vec<Row> { filler_tokens(n, text_vocab, seed).into_iter().map(Row::Text).collect() };
            for &test in &tests {
                let mut samples = Vec::new();
                let mut detail = FrameDetail { real_time_factor: 0.0, backbone_share: 0.0, decoder_share: 0.0, sampling_share: 0.0 };
                for rep in 0..args.repetitions {
                    generator.reset();
                    generator.prefill(&text_rows(depth.max(1) as usize, 1))?;
                    if test == BenchTest::Pp {
                        let prompt = text_rows(args.n_prompt as usize, 100 + rep as u64);
                        let start = Instant::now();
                        generator.prefill(&prompt)?;
                        samples.push(args.n_prompt as f64 / start.elapsed().as_secs_f64());
                        continue;
                    }
                    let mut sampler = Sampler::new(SamplerConfig { temperature: 0.9, top_k: Some(50), top_p: 1.0, seed: rep as u64 })?;
                    let before = generator.timings();
                    let start = Instant::now();
                    for _ in 0..args.n_gen {
                        generator.generate_frame(&mut sampler, None)?;
                    }
                    let seconds = start.elapsed().as_secs_f64();
                    let t = generator.timings();
                    samples.push(args.n_gen as f64 / seconds);
                    detail = FrameDetail {
                        real_time_factor: seconds / (args.n_gen as f64 / crate::speech_cmd::FRAMES_PER_SECOND),
                        backbone_share: (t.backbone_seconds - before.backbone_seconds) / seconds,
                        decoder_share: (t.decoder_seconds - before.decoder_seconds) / seconds,
                        sampling_share: (t.sampling_seconds - before.sampling_seconds) / seconds,
                    };
                }
                let source = RowSource {
                    args,
                    model: &name,
                    size_bytes: generator.model().weight_bytes(),
                    params: generator.model().params(),
                    cache,
                    rotated: generator.backbone_cache().is_rotated(),
                    depth,
                };
                rows.push(source.row(test, samples, generator.kv_memory_usage(), (test == BenchTest::Frame).then_some(detail)));
                bar.inc(1);
            }
            weights = Some(generator.into_model());
        }
    }
    bar.finish_and_clear();
    Ok(rows)
}

fn human_bytes(b: u64) -> String {
    let mib = b as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.2} MiB")
    }
}

fn human_params(p: u64) -> String {
    if p >= 1_000_000_000 {
        format!("{:.2} B", p as f64 / 1e9)
    } else {
        format!("{:.2} M", p as f64 / 1e6)
    }
}

/// llama-bench's table, with the cache type, KV bytes and peak RSS beside each row.
pub fn markdown(rows: &[BenchRow]) -> String {
    let mut out =
        String::from("| model | size | params | threads | cache | test | t/s | KV cache | peak RSS | RTF (backbone / decoder) |\n");
    out.push_str("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n");
    for r in rows {
        let frame = r.frame_detail.map_or("-".into(), |d| {
            format!("{:.2} ({:.0} % / {:.0} %)", d.real_time_factor, 100.0 * d.backbone_share, 100.0 * d.decoder_share)
        });
        out.push_str(&format!(
            "| {} | {} | {} | {} | {}/{}{} | {} | {:.2} ± {:.2} | {} | {} | {frame} |\n",
            r.model,
            human_bytes(r.size_bytes),
            human_params(r.params),
            r.threads,
            r.k_type,
            r.v_type,
            // Rows stored rotated get a mark: "q4_0/q4_0 ·H".
            if r.kv_rotated { " ·H" } else { "" },
            r.test_name(),
            r.avg_ts,
            r.stddev_ts,
            human_bytes(r.kv_bytes as u64),
            r.peak_rss_bytes.map_or("-".into(), human_bytes),
        ));
    }
    out
}
