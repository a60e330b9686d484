//! `ccsm-infer calibrate`: measures a model's KV sensitivity profile on a text (what each layer's K
//! and V cost in KL divergence per cache type), for `--kv-plan auto`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use ccsm::calibrate::{calibrate, CalibrationOptions};
use ccsm::kv_plan::{SensitivityProfile, GGUF_KEY};
use ccsm::llama::LlamaModel;
use ccsm::{CacheType, GGMLModel, ModelOptions};
use ggml::gguf::{GgufFile, GgufWriter, Value};

use crate::args::{default_threads, LogArgs};
use crate::{output, progress, UsageError};

#[derive(Args, Clone)]
pub struct CalibrateArgs {
    /// Model file (GGUF, a Llama text model).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,

    /// The calibration text (measure the plan later on a different one).
    #[arg(short = 'f', long = "file", value_name = "TEXT")]
    pub file: PathBuf,

    /// Write the profile (JSON) here.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Also write a copy of MODEL with the profile in its metadata (`ccsm.kv_profile`), so
    /// --kv-plan auto needs no --kv-profile.
    #[arg(long, value_name = "GGUF")]
    pub gguf_out: Option<PathBuf>,

    /// Tokens per chunk (as perplexity: the second half of each chunk is scored).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512, value_parser = clap::value_parser!(u32).range(4..))]
    pub ctx_size: u32,

    /// Chunks of the text to measure on.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunks: u32,

    /// The types to cost, comma-separated.
    #[arg(long, value_name = "TYPES", value_delimiter = ',', default_value = "f16,q8_0,q5_1,q5_0,q4_1,iq4_nl,q4_0,mxfp4")]
    pub types: Vec<CacheType>,

    /// The type each layer's K and V is measured at; the others are scaled by their squared error
    /// on the same rows.
    #[arg(long, value_name = "TYPE", default_value = "q4_0")]
    pub probe: CacheType,

    /// Measure every type directly (one run per layer, half and type) instead of scaling the probe's.
    #[arg(long)]
    pub exhaustive: bool,

    /// Recent windows (--kv-recent) to measure, comma-separated cell counts (one run each, the whole
    /// cache at the probe type): the planner chooses among them. `0` measures none.
    #[arg(long, value_name = "CELLS", value_delimiter = ',', default_value = "8,16,32,64")]
    pub windows: Vec<usize>,

    /// Calibrate the model as stored (`native`) or with its weight matrices dequantized to f32
    /// (`f32`, the default): quantized weights make ggml round activations to 8 bits, and then any
    /// change to the cache costs a fixed floor of KL divergence that hides what each layer costs.
    #[arg(long, value_enum, default_value_t = WeightsArg::F32)]
    pub weights: WeightsArg,

    #[arg(short = 'b', long = "batch-size", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,

    #[arg(short = 't', long, default_value_t = default_threads(), value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,
}

pub fn run(args: &CalibrateArgs, log: &LogArgs) -> Result<()> {
    if args.output.is_none() && args.gguf_out.is_none() {
        return Err(UsageError("calibrate needs -o PROFILE.json, --gguf-out MODEL.gguf, or both".into()).into());
    }
    if args.gguf_out.as_deref() == Some(args.model.as_path()) {
        return Err(UsageError("--gguf-out must be a new file, not the model being read".into()).into());
    }
    if let Some(t) = args.types.iter().find(|t| **t == CacheType::F32) {
        return Err(UsageError(format!("--types: {t} is the reference (it costs nothing)")).into());
    }
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let model = args.weights.load(&args.model)?;
    let ctx = args.ctx_size as usize;
    let options = ModelOptions {
        n_ctx: ctx,
        k_type: CacheType::F32,
        v_type: CacheType::F32,
        n_threads: args.threads as usize,
        n_batch: args.batch_size as usize,
    };
    let mut model = GGMLModel::new(model, options).context("setting up the model")?;
    let tokens = model.model().tokenizer().encode_plain(&text)?;
    let calibration = CalibrationOptions {
        ctx,
        chunks: Some(args.chunks as usize),
        types: args.types.clone(),
        probe: args.probe,
        exhaustive: args.exhaustive,
        windows: args.windows.clone(),
        f32_weights: args.weights == WeightsArg::F32,
        text_name: args.file.file_name().map_or_else(|| args.file.display().to_string(), |n| n.to_string_lossy().into_owned()),
    };
    let name = args.model.file_name().map_or_else(|| args.model.display().to_string(), |n| n.to_string_lossy().into_owned());
    let started = Instant::now();
    let bar = progress::bar(0, "calibrating", log.quiet);
    let profile = calibrate(&mut model, &name, &tokens, &calibration, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if let Some(path) = &args.output {
        profile.save(path)?;
    }
    if let Some(path) = &args.gguf_out {
        write_gguf_with_profile(&args.model, path, &profile)?;
    }
    let c = &profile.calibration;
    output::println(&format!(
        "profiled {} layers x K/V at {} types on {} chunks of {ctx} in {:.0} s; uniform {}: predicted KLD {:.5}, measured {}",
        profile.shape.n_layer,
        args.types.len(),
        c.chunks,
        started.elapsed().as_secs_f64(),
        c.probe,
        c.predicted_uniform_probe_kld,
        c.measured_uniform_probe_kld.map_or("-".into(), |m| format!("{m:.5}")),
    ));
    if !c.windows.is_empty() {
        let gains: Vec<String> = c.windows.iter().map(|w| format!("{}: {:.5} (x{:.2})", w.cells, w.kld, w.ratio)).collect();
        output::println(&format!("recent windows at uniform {}: {}", c.probe, gains.join(", ")));
    }
    Ok(())
}

/// How a text model's weight matrices are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightsArg {
    /// As stored in the file.
    Native,
    /// Dequantized to f32 on load.
    F32,
}

impl WeightsArg {
    pub fn load(self, path: &Path) -> Result<LlamaModel> {
        let model = match self {
            WeightsArg::Native => LlamaModel::load(path),
            WeightsArg::F32 => LlamaModel::load_f32_weights(path),
        };
        model.with_context(|| format!("loading {}", path.display()))
    }
}

/// Copies `src` to `dst` with the profile stored under `GGUF_KEY` (every other key and tensor as is).
fn write_gguf_with_profile(src: &Path, dst: &Path, profile: &SensitivityProfile) -> Result<()> {
    let file = GgufFile::open(src)?;
    let mut writer = GgufWriter::new();
    for (key, value) in file.metadata() {
        writer.set(key, value.clone());
    }
    writer.set(GGUF_KEY, Value::String(profile.to_json()));
    for info in file.tensors() {
        let mut data = vec![0u8; info.size as usize];
        file.read_tensor_data(info, &mut data)?;
        writer.add_tensor(&info.name, info.dtype, &info.shape, data)?;
    }
    writer.write(dst).with_context(|| format!("writing {}", dst.display()))?;
    Ok(())
}
