//! Command-line definitions. Flags follow llama.cpp's names where one exists.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::args::{default_threads, CacheArgs, KvLayoutArgs, LogArgs, MemoryArgs, SampleFormatArg, TopK};

use ccsm::kv_cache::Rotation;
use ccsm::CacheType;

#[derive(Parser)]
#[command(
    name = "ccsm-infer",
    version,
    about = "CSM-1B and Llama inference on ggml with a quantized KV cache",
    long_about = "CSM-1B and Llama inference on ggml with a quantized KV cache.\n\n\
        Without a subcommand, generates a continuation of the prompt with the model.\n\
        Results go to stdout; logs and progress to stderr.\n\
        Exit codes: 0 success, 1 runtime failure, 2 usage error.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub generate: GenerateArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Subcommand)]
pub enum Command {
    /// Model facts: architecture, parameters, weight bytes, and KV cache bytes per cache type at a context.
    Info(InfoArgs),
    /// Perplexity of a text (llama-perplexity's method), and KL divergence against a reference run.
    Perplexity(PerplexityArgs),
    /// Prompt-processing and decode speed per cache type and context depth (llama-bench's shape).
    Bench(BenchArgs),
    /// Measure a text model's KV sensitivity profile (each layer's K and V cost in KL divergence per
    /// cache type) for --kv-plan auto.
    Calibrate(crate::calibrate_cmd::CalibrateArgs),
    /// Decode Mimi frames (generation's -o JSON, or {"frames": [[code, ...], ...]}) into a WAV.
    Decode(DecodeArgs),
    /// Encode a recording (WAV, FLAC, MP3, Ogg Vorbis) into Mimi frames: the JSON `decode`, `--context` segments and voices read
    Encode(crate::encode_cmd::EncodeArgs),
    /// An OpenAI-compatible HTTP server: /v1/audio/speech (CSM), /v1/completions and
    /// /v1/chat/completions (Llama), /v1/models, /health, /metrics; many sessions in one memory budget.
    Serve(crate::serve_cmd::ServeArgs),
    /// Print the engine version, the ggml version and the CPU features ggml was built with.
    System,
}

#[derive(Args, Clone)]
pub struct DecodeArgs {
    /// The frames: a JSON object with "frames": [[code per codebook], ...] (any number of codebooks up to
    /// the codec's).
    #[arg(value_name = "FRAMES")]
    pub frames: PathBuf,

    /// The Mimi codec: a Mimi GGUF, or a CSM GGUF with one embedded.
    #[arg(long, value_name = "FILE")]
    pub codec: PathBuf,

    /// The WAV to write, or - for stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,

    /// Samples in the WAV: s16 (16-bit PCM) or f32 (32-bit float).
    #[arg(long, value_enum, default_value_t = SampleFormatArg::S16)]
    pub sample_format: SampleFormatArg,

    #[arg(short = 't', long, default_value_t = default_threads(), value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,

    /// KV cache type of the codec's transformer (K and V).
    #[arg(long, value_name = "TYPE", default_value = "f32")]
    pub kv_quant: CacheType,

    /// Print one JSON object on stdout (needs -o FILE).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Clone)]
pub struct InfoArgs {
    /// Model file (GGUF).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,

    /// Context (cache cells) to size the KV caches for [default: as generation, the model's context,
    /// at most 4096].
    #[arg(short = 'c', long = "ctx-size", value_parser = clap::value_parser!(u32).range(1..))]
    pub ctx_size: Option<u32>,

    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,

    /// Also report a device's memory (`vulkan`, `vulkan:N`) against the weights and each cache type's
    /// bytes: what fits there.
    #[arg(long, value_name = "vulkan[:N]")]
    pub device: Option<String>,
}

#[derive(Args, Clone)]
pub struct PerplexityArgs {
    /// Model file (GGUF).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,

    /// The text to score.
    #[arg(short = 'f', long = "file", value_name = "TEXT")]
    pub file: PathBuf,

    /// Tokens per chunk; the second half of each chunk is scored.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512, value_parser = clap::value_parser!(u32).range(4..))]
    pub ctx_size: u32,

    /// Score at most this many chunks (default: all the text holds).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunks: Option<u32>,

    /// Most tokens evaluated in one graph.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,

    #[arg(short = 't', long, default_value_t = default_threads(), value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,

    #[command(flatten)]
    pub cache: CacheArgs,

    /// Hold the weight matrices as stored (`native`) or dequantized to f32 (`f32`): the same model
    /// without 8-bit activations, so a KLD measures the cache alone (see `ccsm-infer calibrate`).
    #[arg(long, value_enum, default_value_t = crate::calibrate_cmd::WeightsArg::Native)]
    pub weights: crate::calibrate_cmd::WeightsArg,

    /// Save this run's distributions as a KL reference (make it with --kv-quant f32).
    #[arg(long, value_name = "FILE", conflicts_with = "kl")]
    pub kl_base: Option<PathBuf>,

    /// Compare this run with a reference saved by --kl-base: KL divergence, Δ ln PPL, same top token, RMS Δp.
    #[arg(long, value_name = "FILE")]
    pub kl: Option<PathBuf>,

    /// llama.cpp's prompt cache: start from the prompt's rows saved in FILE when it was written for
    /// this model and its prompt starts the same way (a long system prompt, a document), and save
    /// the prompt's rows there when it did not hold them all. A file of another model, truncated or
    /// altered is refused with the reason and written anew.
    #[arg(long, value_name = "FILE")]
    pub prompt_cache: Option<PathBuf>,

    #[command(flatten)]
    pub memory: MemoryArgs,

    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Model file (GGUF).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,

    /// Cache types to measure, comma-separated (each for K and V).
    #[arg(long = "kv-quant", value_name = "TYPES", value_delimiter = ',', default_value = "f16")]
    pub cache_types: Vec<CacheType>,

    /// Hadamard rotation of the cache rows (quantized, off, all), as for generation.
    #[arg(long, value_name = "WHEN", default_value = "quantized")]
    pub kv_rotation: Rotation,

    /// Attention kernels to measure, comma-separated: auto (chosen per step), direct (ggml's flash
    /// attention over the cache as stored), dequantized (the cache copied to f32 for ggml's tiled
    /// kernel), split (ours, split by cells). See docs/attention.md.
    #[arg(long, value_name = "PATHS", value_delimiter = ',', default_value = "auto")]
    pub attention: Vec<ccsm::attention::AttentionChoice>,

    /// Context depths (tokens already in the cache), comma-separated.
    #[arg(short = 'd', long = "depth", value_delimiter = ',', default_value = "0")]
    pub depths: Vec<u32>,

    /// Prompt tokens per prompt-processing test (0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: u32,

    /// Tokens per decode test (0 skips it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: u32,

    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub repetitions: u32,

    #[arg(short = 't', long, default_value_t = default_threads(), value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,

    /// Where the model runs: `cpu`, or `vulkan` / `vulkan:N` (a build with `--features vulkan`); the
    /// `--codec` of a CSM bench decodes on the CPU. The markdown table names the device in the
    /// threads column.
    #[arg(long, default_value = "cpu", value_name = "cpu|vulkan[:N]")]
    pub device: String,

    /// Output format: md (a markdown table), json (one array), jsonl (one object per line).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = BenchFormat::Md)]
    pub output: BenchFormat,

    /// CSM: decode every generated frame with this Mimi codec (end to end: frames/s, real-time factor,
    /// time to first audio, the codec's share). A codec file given as MODEL benches the codec alone.
    #[arg(long, value_name = "FILE")]
    pub codec: Option<PathBuf>,

    /// Codec: frames per decode call, comma-separated (1 is streaming, frame by frame).
    #[arg(long, value_delimiter = ',', default_value = "1,16", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub chunk: Vec<u32>,

    /// CSM: sessions making frames together, comma-separated (every session's next frame in one engine
    /// step); a frame test's speed counts every session's frames.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub sessions: Vec<u32>,

    /// Also time every graph node once per test and print the time per op kind.
    #[arg(long)]
    pub profile: bool,

    /// Text models: bench one per-layer layout (--kv-layout, or --kv-plan auto --kv-bits) instead of
    /// the --kv-quant list.
    #[command(flatten)]
    pub layers: KvLayoutArgs,
}

/// How `bench` prints its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchFormat {
    /// A markdown table, llama-bench's shape.
    Md,
    /// One JSON array.
    Json,
    /// One JSON object per line.
    Jsonl,
}

#[derive(Args, Clone)]
pub struct GenerateArgs {
    /// Model file (GGUF). Same as -m.
    #[arg(value_name = "MODEL")]
    pub model_positional: Option<PathBuf>,

    /// Model file (GGUF).
    #[arg(short, long, value_name = "MODEL", conflicts_with = "model_positional")]
    pub model: Option<PathBuf>,

    /// Prompt text. It is the operator's own: spellings of control tokens in it (`<|im_start|>`) become
    /// those tokens (with --chat, only the template's do). The server never reads its clients' text so.
    #[arg(short, long)]
    pub prompt: Option<String>,

    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file", value_name = "PATH", conflicts_with = "prompt")]
    pub prompt_file: Option<PathBuf>,

    /// Text models: the prompt is one user message, rendered with the model's chat template (the GGUF's
    /// tokenizer.chat_template, as the server's /v1/chat/completions does). Instruct models need it.
    #[arg(long)]
    pub chat: bool,

    /// Tokens (text models) or audio frames (CSM) to generate at most [default: 64 tokens, 125 frames].
    #[arg(short = 'n', long = "n-predict", value_parser = clap::value_parser!(u32).range(1..))]
    pub n_predict: Option<u32>,

    /// Context size: KV cache cells (default: the model's training context, at most 4096).
    #[arg(short = 'c', long = "ctx-size", value_parser = clap::value_parser!(u32).range(1..))]
    pub ctx_size: Option<u32>,

    /// Threads for ggml.
    #[arg(short = 't', long, default_value_t = default_threads(), value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,

    /// Where the model runs: `cpu`, or `vulkan` / `vulkan:N` (a build with `--features vulkan`; `ccsm-infer
    /// system` lists the devices). On a device the weights, KV caches and graphs live in its memory;
    /// a cache type its attention does not take is refused by name. The codec decodes on the CPU.
    #[arg(long, default_value = "cpu", value_name = "cpu|vulkan[:N]")]
    pub device: String,

    /// Most prompt tokens evaluated in one graph.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,

    /// Sampling seed (same seed, same output).
    #[arg(short, long, default_value_t = 42)]
    pub seed: u64,

    /// Sampling temperature; 0 is greedy [default: 0.8 for text, 0.9 for CSM].
    #[arg(long, value_parser = non_negative_f32)]
    pub temp: Option<f32>,

    /// Keep only the K most likely tokens (ties with the K-th are kept), K >= 1, or `all` for no limit
    /// [default: 40 for text, 50 for CSM].
    #[arg(long, value_name = "K|all", value_parser = top_k_value)]
    pub top_k: Option<TopK>,

    /// Keep the smallest set of tokens whose probability reaches P [default: 0.95 for text, 1 for CSM].
    #[arg(long, value_parser = unit_interval)]
    pub top_p: Option<f32>,

    /// CSM: the speaker id of the text to say.
    #[arg(long, default_value_t = 0)]
    pub speaker: u32,

    /// CSM: context segments (JSON list of {"speaker", "text", "frames": [[codes...], ...]} or
    /// {"speaker", "text", "audio": "recording.wav"}, paths relative to the JSON file) said before.
    #[arg(long, value_name = "FILE")]
    pub context: Option<PathBuf>,

    /// CSM: a recording of the voice to speak in (WAV, FLAC, MP3, Ogg Vorbis; encoded by the codec),
    /// said by --speaker before the text; needs --voice-text.
    #[arg(long, value_name = "AUDIO", requires = "voice_text")]
    pub voice_audio: Option<PathBuf>,

    /// CSM: what the --voice-audio recording says (its transcript).
    #[arg(long, value_name = "TEXT", requires = "voice_audio")]
    pub voice_text: Option<String>,

    /// CSM: where the result goes: FILE.wav (audio, decoded by the codec as frames are made), FILE.json
    /// (the frames), or - (a WAV streamed to stdout). Without it the frames JSON goes to stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// CSM: the Mimi codec for audio output (a Mimi GGUF, or a CSM GGUF with one embedded) when the
    /// model has none embedded.
    #[arg(long, value_name = "FILE")]
    pub codec: Option<PathBuf>,

    /// Samples in the WAV: s16 (16-bit PCM) or f32 (32-bit float).
    #[arg(long, value_enum, default_value_t = SampleFormatArg::S16)]
    pub sample_format: SampleFormatArg,

    /// CSM: run the requests of a JSONL file (one {"text", "speaker", "context", "seed", "max_frames",
    /// "output"} per line; "output" names a WAV for that request's audio), writing one JSON result line
    /// per request to stdout (or -o).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "prompt_file", "context"])]
    pub batch: Option<PathBuf>,

    #[command(flatten)]
    pub cache: CacheArgs,

    /// Start with an f32 cache and convert it live to the --kv-quant/--ctk/--ctv types after N tokens
    /// (text) or frames (CSM).
    #[arg(long, value_name = "N")]
    pub quantize_after: Option<u32>,

    /// llama.cpp's prompt cache: start from the prompt's rows saved in FILE when it was written for
    /// this model and its prompt starts the same way (a long system prompt, a document), and save
    /// the prompt's rows there when it did not hold them all. A file of another model, truncated or
    /// altered is refused with the reason and written anew.
    #[arg(long, value_name = "FILE")]
    pub prompt_cache: Option<PathBuf>,

    #[command(flatten)]
    pub memory: MemoryArgs,

    /// Print one JSON object (text, token ids, timings, memory) on stdout instead of the text.
    #[arg(long)]
    pub json: bool,
}

fn non_negative_f32(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("{v} must be a finite number >= 0"))
    }
}

fn top_k_value(s: &str) -> Result<TopK, String> {
    if s == "all" {
        return Ok(TopK::All);
    }
    match s.parse::<usize>() {
        Ok(0) => Err("0 would keep no token: give a count of at least 1, or `all` for no limit".into()),
        Ok(k) => Ok(TopK::Count(k)),
        Err(e) => Err(format!("{e}: expected a count of at least 1, or `all`")),
    }
}

fn unit_interval(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} must be in (0, 1]"))
    }
}

impl GenerateArgs {
    /// The model file: MODEL or -m.
    pub fn model_path(&self) -> anyhow::Result<PathBuf> {
        self.model
            .clone()
            .or_else(|| self.model_positional.clone())
            .ok_or_else(|| crate::UsageError("no model given: pass MODEL or -m MODEL (see --help)".into()).into())
    }

    /// The prompt: -p's text or -f's file.
    pub fn prompt_text(&self) -> anyhow::Result<String> {
        use anyhow::Context as _;
        match (&self.prompt, &self.prompt_file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(path)) => std::fs::read_to_string(path).with_context(|| format!("reading prompt file {}", path.display())),
            (None, None) => Err(crate::UsageError("no prompt given: pass -p TEXT or -f FILE".into()).into()),
        }
    }
}
