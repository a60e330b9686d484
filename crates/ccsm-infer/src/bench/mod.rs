//! `ccsm-infer bench`: prompt-processing and decode speed per cache type and depth, shaped like
//! llama-bench's output. Depth d means the cache already holds d tokens when a test starts.

mod codec;
mod csm;
mod llama;

use anyhow::{Context, Result};
use serde::Serialize;

use ccsm::attention::AttentionChoice;
use ccsm::CacheType;

use crate::args::LogArgs;
use crate::cli::{BenchArgs, BenchFormat};
use crate::output;

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
    /// Codec: `-n` frames decoded, `n_prompt` per call (1: streaming).
    Decode,
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
    /// The attention kernels (`--attention`): auto, direct, dequantized or split.
    pub attention: AttentionChoice,
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
    /// With --kv-layout or --kv-plan: the per-layer layout benched (k_type/v_type are then layer 0's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_layout: Option<String>,
    /// With --kv-recent: the cells kept in f16 beside the cache's types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_recent: Option<usize>,
    /// CSM frame tests with --sessions: sessions making frames together (the speed counts all of theirs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u32>,
    /// With --device: the device the model ran on (`Vulkan0`); absent on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// With --profile: time per op kind of one step (or frame, or codec call).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<ccsm::profile::OpTotal>>,
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
    /// Share in the codec (CSM with --codec, and codec tests).
    pub codec_share: f64,
    /// From the start of a request (prompt prefill) to the first decoded samples (with a codec).
    pub time_to_first_audio_seconds: Option<f64>,
}

impl BenchRow {
    fn test_name(&self) -> String {
        let base = match self.test {
            BenchTest::Pp => format!("pp{}", self.n_prompt),
            BenchTest::Frame => format!("frame{}", self.n_gen),
            BenchTest::Tg => format!("tg{}", self.n_gen),
            BenchTest::Decode if self.n_prompt == 1 => format!("decode{} streaming", self.n_gen),
            BenchTest::Decode => format!("decode{} by {}", self.n_gen, self.n_prompt),
        };
        let base = match self.sessions {
            Some(n) if n > 1 => format!("{base} ×{n} sessions"),
            _ => base,
        };
        if self.depth > 0 {
            format!("{base} @ d{}", self.depth)
        } else {
            base
        }
    }
}

/// What every row of one model, cache type and depth shares.
pub(crate) struct RowSource<'a> {
    args: &'a BenchArgs,
    model: &'a str,
    size_bytes: u64,
    params: u64,
    cache: CacheType,
    rotated: bool,
    attention: AttentionChoice,
    depth: u32,
}

impl RowSource<'_> {
    pub(crate) fn row(&self, test: BenchTest, samples: Vec<f64>, kv_bytes: usize, frame_detail: Option<FrameDetail>) -> BenchRow {
        let (avg_ts, stddev_ts) = mean_stddev(&samples);
        BenchRow {
            model: self.model.to_owned(),
            size_bytes: self.size_bytes,
            params: self.params,
            threads: self.args.threads,
            k_type: self.cache,
            v_type: self.cache,
            kv_rotated: self.rotated,
            attention: self.attention,
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
            kv_layout: None,
            sessions: None,
            device: None,
            kv_recent: None,
            profile: None,
        }
    }
}

/// Deterministic token ids spread over the vocabulary (what they are does not change the speed).
pub(crate) fn filler_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Peak resident memory since the last reset (Linux: VmHWM).
pub(crate) fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub(crate) fn mean_stddev(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = if n > 1.0 { samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

pub fn run(args: &BenchArgs, log: &LogArgs) -> Result<()> {
    let file = ggml::gguf::GgufFile::open(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let architecture = file.get::<String>("general.architecture")?;
    if args.layers.any_text_only() && matches!(architecture.as_str(), "csm" | "mimi") {
        return Err(crate::UsageError("per-layer cache types (--kv-layout, --kv-plan) and --kv-recent are for text models".into()).into());
    }
    let placement = ccsm::Placement::parse(&args.device).map_err(|e| crate::UsageError(e.to_string()))?;
    let mut rows = match architecture.as_str() {
        "csm" => csm::bench_csm(args, log, &file, &placement)?,
        "mimi" => codec::bench_codec(args, log, &file, &placement)?,
        _ => llama::bench_llama(args, log, &file, &placement)?,
    };
    if placement.is_device() {
        rows.iter_mut().for_each(|r| r.device = Some(placement.name()));
    }
    match args.output {
        BenchFormat::Json => output::println(&serde_json::to_string_pretty(&rows)?),
        BenchFormat::Jsonl => rows.iter().try_for_each(|r| serde_json::to_string(r).map(|l| output::println(&l)))?,
        BenchFormat::Md => output::print(&markdown(&rows)),
    }
    Ok(())
}

pub(crate) fn model_name(args: &BenchArgs) -> String {
    args.model.file_name().map_or_else(|| args.model.display().to_string(), |f| f.to_string_lossy().into_owned())
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
        String::from("| model | size | params | threads | cache | test | t/s | KV cache | peak RSS | RTF (backbone / decoder / codec) |\n");
    out.push_str("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n");
    for r in rows {
        let frame = r.frame_detail.map_or("-".into(), |d| {
            let codec = if d.codec_share > 0.0 { format!(" / {:.0} %", 100.0 * d.codec_share) } else { String::new() };
            let first = d.time_to_first_audio_seconds.map_or(String::new(), |s| format!(", first audio {:.0} ms", 1000.0 * s));
            format!("{:.3} ({:.0} % / {:.0} %{codec}{first})", d.real_time_factor, 100.0 * d.backbone_share, 100.0 * d.decoder_share)
        });
        out.push_str(&format!(
            "| {} | {} | {} | {} | {}{}{} | {} | {:.2} ± {:.2} | {} | {} | {frame} |\n",
            r.model,
            human_bytes(r.size_bytes),
            human_params(r.params),
            r.device.clone().unwrap_or_else(|| r.threads.to_string()),
            r.kv_layout.clone().unwrap_or_else(|| format!("{}/{}", r.k_type, r.v_type))
                + &r.kv_recent.map(|n| format!(" +f16×{n}")).unwrap_or_default(),
            // Rows stored rotated get a mark: "q4_0/q4_0 ·H".
            if r.kv_rotated { " ·H" } else { "" },
            // A forced attention path is named: "q8_0/q8_0 ·H split".
            if r.attention == AttentionChoice::Auto { String::new() } else { format!(" {}", r.attention) },
            r.test_name(),
            r.avg_ts,
            r.stddev_ts,
            human_bytes(r.kv_bytes as u64),
            r.peak_rss_bytes.map_or("-".into(), human_bytes),
        ));
    }
    for r in rows {
        if let Some(profile) = &r.profile {
            out.push_str(&profile_table(r, profile));
        }
    }
    out
}

/// Time per op kind of one profiled step: the `--profile` table under the results.
fn profile_table(r: &BenchRow, profile: &[ccsm::profile::OpTotal]) -> String {
    let total: f64 = profile.iter().map(|o| o.seconds).sum();
    let mut out = format!(
        "\n{} {}/{}: {:.3} ms in {} nodes\n\n| op | nodes | ms | share |\n| --- | ---: | ---: | ---: |\n",
        r.test_name(),
        r.k_type,
        r.v_type,
        1000.0 * total,
        profile.iter().map(|o| o.nodes).sum::<usize>()
    );
    for o in profile.iter().filter(|o| o.seconds >= 0.005 * total) {
        out.push_str(&format!("| {} | {} | {:.3} | {:.1} % |\n", o.op, o.nodes, 1000.0 * o.seconds, 100.0 * o.seconds / total));
    }
    out
}
