//! Generation with a CSM model: audio frames (32 Mimi codes each) for a text, as JSON, or decoded by the
//! codec into a WAV (a file, or streamed to stdout) as each frame is made.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use ccsm::csm::{
    speech_step, voice, CsmGenerator, CsmModel, CsmOptions, Frame, FrameTimings, Request, Segment, SpeechTurn, TurnProgress, TurnStep,
};
use ccsm::generate::StopReason;
use ccsm::mimi::MimiDecoder;
use ccsm::sampling::{Sampler, SamplerConfig};
use ccsm::wav::SampleFormat;
use ccsm::{CacheReport, CacheType, Model};

use crate::args::{LogArgs, TopK};
use crate::audio::{self, AudioOut, OutputKind};
use crate::cli::GenerateArgs;
use crate::{output, progress, UsageError};

/// Mimi's frame rate: 12.5 frames are one second of 24 kHz audio.
pub const FRAMES_PER_SECOND: f64 = 12.5;
const DEFAULT_FRAMES: u32 = 125;

#[derive(Serialize)]
pub struct SpeechTimings {
    pub prompt_rows: usize,
    pub prompt_seconds: f64,
    pub seconds: f64,
    pub frames_per_second: f64,
    /// Time of the whole pipeline (generation and, with audio out, the codec) over audio time: below 1
    /// is faster than real time.
    pub real_time_factor: f64,
    pub backbone_seconds: f64,
    pub decoder_seconds: f64,
    /// The codec's decoding (audio out only).
    pub codec_seconds: f64,
    /// From the start of the request to the first samples written (audio out only).
    pub time_to_first_audio_seconds: Option<f64>,
}

/// What was written as audio.
#[derive(Serialize)]
pub struct AudioReport {
    /// The WAV file, or `-` for stdout.
    pub output: String,
    pub sample_rate: usize,
    pub samples: u64,
    pub format: SampleFormat,
}

#[derive(Serialize)]
pub struct SpeechResult {
    pub model: String,
    pub text: String,
    pub speaker: u32,
    pub seed: u64,
    /// `end_of_speech` (the model produced an all-zero frame), `limit`, or `interrupted` (Ctrl-C).
    pub stop: StopReason,
    /// Backbone positions went past the model's trained context (possible only under a memory budget).
    pub past_trained_context: bool,
    pub n_frames: usize,
    pub audio_seconds: f64,
    pub timings: SpeechTimings,
    pub k_type: CacheType,
    pub v_type: CacheType,
    pub kv_bytes: usize,
    /// The live cache conversion (--quantize-after), when one ran.
    pub conversion: Option<Vec<CacheReport>>,
    pub audio: Option<AudioReport>,
    pub frames: Vec<Frame>,
}

/// The WAV a request's audio goes into, and its name for the report (`-`: stdout).
struct AudioSink {
    out: AudioOut,
    name: String,
}

pub fn run(args: &GenerateArgs, log: &LogArgs, path: &Path, model: CsmModel) -> Result<()> {
    let n_ctx_train = model.config().backbone.n_ctx_train;
    let n_ctx = args.ctx_size.map_or(n_ctx_train.min(ccsm::DEFAULT_CTX_CAP), |c| c as usize);
    if n_ctx > n_ctx_train {
        return Err(UsageError(format!("-c {n_ctx} is beyond the model's context of {n_ctx_train}")).into());
    }
    if args.prompt_cache.is_some() {
        return Err(UsageError(
            "--prompt-cache is for text models; speech keeps voices and conversations warm in the server (serve --cache-dir)".into(),
        )
        .into());
    }
    let kind = if args.batch.is_some() { OutputKind::FramesJson(args.output.clone()) } else { OutputKind::of(args.output.as_deref())? };
    if kind == OutputKind::WavStdout && args.json {
        return Err(UsageError("-o - writes the WAV to stdout; --json needs -o FILE.wav".into()).into());
    }
    // With --quantize-after the caches start in f32 and are converted to the requested types live.
    let start_type = |t| if args.quantize_after.is_some() { CacheType::F32 } else { t };
    let (k_type, v_type) = (args.cache.k_type(CacheType::F16), args.cache.v_type(CacheType::F16));
    let options = CsmOptions {
        n_ctx,
        k_type: start_type(k_type),
        v_type: start_type(v_type),
        n_threads: args.threads as usize,
        n_batch: args.batch_size as usize,
    };
    let mut codec = audio::open_codec(Some(path), args.codec.as_deref(), args.threads as usize, (k_type, v_type))?;
    if kind.is_audio() && codec.is_none() {
        return Err(audio::no_codec(path));
    }
    let mut generator = CsmGenerator::new(model, options).context("setting up the model")?;
    if let Some(c) = &codec {
        generator.set_code_limit(Some(c.model().config().codebook_size));
    }
    args.cache.apply_rotation(&mut generator)?;
    if args.cache.layers.any_text_only() || args.memory.memory_strategy == Some(crate::args::MemoryStrategyArg::Plan) {
        return Err(UsageError(
            "per-layer cache types (--kv-layout, --kv-plan, --memory-strategy plan) and --kv-recent are for text models; CSM takes --kv-quant/--ctk/--ctv"
                .into(),
        )
        .into());
    }
    let policy = args.cache.policy(&args.memory, path, CacheType::F16)?;
    crate::cache_setup::apply_budget(&policy, &mut generator, log.quiet)?;
    let model_name = path.display().to_string();
    if let Some(batch) = &args.batch {
        return run_batch(args, log, &mut generator, codec.as_mut(), &model_name, batch);
    }
    let context: Vec<Segment> = match &args.context {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
            .with_context(|| format!("{}: expected a JSON list of {{\"speaker\", \"text\", \"frames\"}}", p.display()))?,
        None => Vec::new(),
    };
    let mut context = context;
    if let (Some(audio), Some(text)) = (&args.voice_audio, &args.voice_text) {
        context.insert(0, Segment { speaker: args.speaker, text: text.clone(), frames: Vec::new(), audio: Some(audio.clone()) });
    }
    let base = args.context.as_deref().and_then(Path::parent).unwrap_or(Path::new(""));
    encode_context_audio(&mut generator, codec.as_mut(), &mut context, base, path)?;
    let text = args.prompt_text()?;
    let request = Request { text, speaker: args.speaker, context, seed: None, max_frames: None, output: None };
    let sink = match (&kind, codec.as_ref()) {
        (OutputKind::WavFile(p), Some(c)) => {
            Some(AudioSink { out: AudioOut::file(p, audio::spec(c, args.sample_format.into()))?, name: p.display().to_string() })
        }
        (OutputKind::WavStdout, Some(c)) => {
            Some(AudioSink { out: AudioOut::stdout(audio::spec(c, args.sample_format.into()))?, name: "-".into() })
        }
        _ => None,
    };
    let result = speak(args, log, &mut generator, codec.as_mut(), sink, &model_name, &request)?;
    match &kind {
        OutputKind::FramesJson(Some(out)) => crate::output::write_atomically(out, &serde_json::to_string(&result)?)?,
        OutputKind::FramesJson(None) if !args.json => output::println(&serde_json::to_string(&result)?),
        _ => {}
    }
    if args.json {
        let mut summary = serde_json::to_value(&result)?;
        if args.output.is_some() {
            summary["frames"] = serde_json::Value::Null;
            summary["output"] = serde_json::Value::String(args.output.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
        }
        output::println(&summary.to_string());
    }
    if !log.quiet {
        summarize(&result);
    }
    Ok(())
}

/// Encodes the recordings segments name (`"audio"`) into their frames with the codec's encoder.
fn encode_context_audio(
    generator: &mut CsmGenerator,
    codec: Option<&mut MimiDecoder>,
    context: &mut [Segment],
    base: &Path,
    model: &Path,
) -> Result<()> {
    if context.iter().all(|s| s.audio.is_none()) {
        return Ok(());
    }
    let Some(codec) = codec else {
        return Err(UsageError(format!(
            "audio in the context needs a Mimi codec with its encoder: {} has none embedded; pass --codec MIMI.gguf",
            model.display()
        ))
        .into());
    };
    let codebooks = generator.model().config().n_codebooks;
    Ok(voice::encode_segments(codec.parts_mut().0, context, base, codebooks)?)
}

fn summarize(result: &SpeechResult) {
    let t = &result.timings;
    let audio = match (&result.audio, t.time_to_first_audio_seconds) {
        (Some(a), first) => format!(
            " | codec {:.2} s, first audio after {:.0} ms | wrote {} ({} samples at {} Hz)",
            t.codec_seconds,
            1000.0 * first.unwrap_or(0.0),
            a.output,
            a.samples,
            a.sample_rate
        ),
        _ => String::new(),
    };
    eprintln!(
        "{} frames ({:.2} s of audio, stop: {:?}) in {:.2} s: {:.2} frames/s, real-time factor {:.2} | backbone {:.2} s, decoder {:.2} s{audio} | KV cache {} bytes ({}/{})",
        result.n_frames,
        result.audio_seconds,
        result.stop,
        t.seconds,
        t.frames_per_second,
        t.real_time_factor,
        t.backbone_seconds,
        t.decoder_seconds,
        result.kv_bytes,
        result.k_type,
        result.v_type
    );
}

fn sampler_for(args: &GenerateArgs, seed: u64) -> Result<Sampler> {
    let defaults = SamplerConfig::csm(seed);
    Ok(Sampler::new(SamplerConfig {
        temperature: args.temp.unwrap_or(defaults.temperature),
        top_k: args.top_k.map_or(defaults.top_k, TopK::limit),
        top_p: args.top_p.unwrap_or(defaults.top_p),
        seed,
    })?)
}

/// Generates the frames of one request from an empty state; with a sink, each frame's audio is decoded
/// by the codec and written as soon as the frame exists.
fn speak(
    args: &GenerateArgs,
    log: &LogArgs,
    generator: &mut CsmGenerator,
    mut codec: Option<&mut MimiDecoder>,
    mut sink: Option<AudioSink>,
    model_name: &str,
    request: &Request,
) -> Result<SpeechResult> {
    generator.reset();
    let rows = request.rows(generator.model())?;
    let max_frames = request.max_frames.or(args.n_predict).unwrap_or(DEFAULT_FRAMES) as usize;
    let capacity = generator.backbone_cache().capacity();
    if rows.len() + max_frames > capacity && args.memory.max_memory_mb.is_none() {
        return Err(UsageError(format!(
            "the prompt ({} rows) plus {max_frames} frames needs {} backbone positions, but the context holds {capacity}; lower -n or raise -c (at most {})",
            rows.len(),
            rows.len() + max_frames,
            generator.model().config().backbone.n_ctx_train
        ))
        .into());
    }
    if let Some(c) = codec.as_deref_mut() {
        c.reset()?;
    }
    let seed = request.seed.unwrap_or(args.seed);
    let mut sampler = sampler_for(args, seed)?;
    let started = Instant::now();
    generator.prefill(&rows)?;
    let bar = progress::bar(max_frames as u64, "frames", log.quiet);
    let mut frames = Vec::new();
    let mut turn = TurnProgress::new(max_frames);
    let mut conversion = None;
    let mut first_audio = None;
    while !turn.is_over() {
        if crate::interrupt::requested() {
            turn.stop = Some(StopReason::Interrupted);
            break;
        }
        if args.quantize_after.is_some_and(|n| n as usize == frames.len()) && conversion.is_none() {
            let reports = generator.quantize_kv_cache(args.cache.k_type(CacheType::F16), args.cache.v_type(CacheType::F16))?;
            if !log.quiet {
                bar.suspend(|| crate::cache_setup::log_conversion(&reports, frames.len(), "frames"));
            }
            conversion = Some(reports);
        }
        let (engine, session) = generator.parts_mut();
        let (codec_part, stream) = match (sink.is_some(), codec.as_deref_mut()) {
            (true, Some(c)) => {
                let (c, s) = c.parts_mut();
                (Some(c), Some(s))
            }
            _ => (None, None),
        };
        let step = speech_step(engine, codec_part, &mut [SpeechTurn { session, sampler: &mut sampler, stream, progress: &mut turn }])?;
        match step.into_iter().next() {
            Some(TurnStep::Frame { frame, samples }) => {
                if let (Some(s), Some(samples)) = (sink.as_mut(), samples) {
                    s.out.write(&samples)?;
                    first_audio.get_or_insert_with(|| started.elapsed().as_secs_f64());
                }
                frames.push(frame);
                bar.inc(1);
            }
            Some(TurnStep::Failed(e)) => return Err(e.into()),
            _ => {}
        }
    }
    let stop = turn.stop.unwrap_or(StopReason::Limit);
    let codec_seconds = turn.codec_seconds;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let audio = match (sink, codec.as_deref()) {
        (Some(s), Some(c)) => {
            let report = AudioReport {
                output: s.name,
                sample_rate: c.model().config().sample_rate,
                samples: s.out.samples(),
                format: args.sample_format.into(),
            };
            s.out.finish()?;
            Some(report)
        }
        _ => None,
    };
    let codec_kv_bytes = codec.as_deref().map_or(0, |c| c.cache().memory_usage());
    let t: FrameTimings = generator.timings();
    let audio_seconds = frames.len() as f64 / FRAMES_PER_SECOND;
    Ok(SpeechResult {
        model: model_name.to_owned(),
        text: request.text.clone(),
        speaker: request.speaker,
        seed,
        stop,
        past_trained_context: generator.past_trained_context(),
        n_frames: frames.len(),
        audio_seconds,
        timings: SpeechTimings {
            prompt_rows: t.prompt_rows,
            prompt_seconds: t.prompt_seconds,
            seconds,
            frames_per_second: frames.len() as f64 / seconds,
            real_time_factor: if audio_seconds > 0.0 { seconds / audio_seconds } else { 0.0 },
            backbone_seconds: t.backbone_seconds,
            decoder_seconds: t.decoder_seconds,
            codec_seconds,
            time_to_first_audio_seconds: first_audio,
        },
        k_type: generator.backbone_cache().k_type(),
        v_type: generator.backbone_cache().v_type(),
        kv_bytes: generator.kv_memory_usage() + codec_kv_bytes,
        conversion,
        audio,
        frames,
    })
}

/// Runs every line of a JSONL request file; a bad line is reported (with its number) and skipped. A
/// line's `"output"` names a WAV its audio goes to.
fn run_batch(
    args: &GenerateArgs,
    log: &LogArgs,
    generator: &mut CsmGenerator,
    mut codec: Option<&mut MimiDecoder>,
    model_name: &str,
    batch: &PathBuf,
) -> Result<()> {
    let file = std::fs::File::open(batch).with_context(|| format!("opening {}", batch.display()))?;
    let mut lines_out = Vec::new();
    let mut failures = 0;
    // Split on bytes, not `lines()`: a line that is not UTF-8 is that request's error, not the batch's.
    for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        if crate::interrupt::requested() {
            break;
        }
        let number = i + 1;
        let line = line.with_context(|| format!("{}: reading line {number}", batch.display()))?;
        if line.trim_ascii().is_empty() {
            continue;
        }
        let result = Request::from_line_bytes(&line).map_err(anyhow::Error::from).and_then(|mut request| {
            let base = batch.parent().unwrap_or(Path::new(""));
            encode_context_audio(generator, codec.as_deref_mut(), &mut request.context, base, Path::new(model_name))?;
            let sink = match (&request.output, codec.as_deref()) {
                (Some(p), Some(c)) => {
                    Some(AudioSink { out: AudioOut::file(p, audio::spec(c, args.sample_format.into()))?, name: p.display().to_string() })
                }
                (Some(_), None) => return Err(audio::no_codec(Path::new(model_name))),
                (None, _) => None,
            };
            speak(args, log, generator, codec.as_deref_mut(), sink, model_name, &request)
        });
        let out = match result {
            Ok(r) => serde_json::to_value(&r)?,
            Err(e) => {
                failures += 1;
                eprintln!("error: {}: line {number}: {e:#}", batch.display());
                serde_json::json!({ "line": number, "error": format!("{e:#}") })
            }
        };
        let mut out = out;
        out["line"] = serde_json::json!(number);
        let text = out.to_string();
        if args.output.is_none() {
            output::println(&text);
        }
        lines_out.push(text);
    }
    if let Some(path) = &args.output {
        crate::output::write_atomically(path, &(lines_out.join("\n") + "\n"))?;
    }
    anyhow::ensure!(failures == 0, "{failures} of {} requests failed", lines_out.len());
    Ok(())
}
