//! `ccsm-infer decode`: Mimi frames from a file into a WAV.

use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use ccsm::csm::Frame;

use crate::args::LogArgs;
use crate::audio::{self, AudioOut};
use crate::cli::DecodeArgs;
use crate::{output, UsageError};

/// Frames decoded per codec call: the state carries across, so this bounds memory, not the result.
const CHUNK: usize = 16;

/// The frames of a JSON file: its `"frames"` (generation's -o JSON has them too), each a list of codes.
fn read_frames(args: &DecodeArgs) -> Result<Vec<Frame>> {
    let path = &args.frames;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let frames = v.get("frames").and_then(|f| f.as_array()).ok_or_else(|| anyhow::anyhow!("{}: no \"frames\" list", path.display()))?;
    frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let codes = f.as_array().ok_or_else(|| anyhow::anyhow!("{}: frame {i} is not a list of codes", path.display()))?;
            codes
                .iter()
                .map(|c| {
                    c.as_u64()
                        .and_then(|c| u32::try_from(c).ok())
                        .ok_or_else(|| anyhow::anyhow!("{}: frame {i} has a code that is not a whole number: {c}", path.display()))
                })
                .collect()
        })
        .collect()
}

pub fn run(args: &DecodeArgs, log: &LogArgs) -> Result<()> {
    if args.json && args.output.as_os_str() == "-" {
        return Err(UsageError("-o - writes the WAV to stdout; --json needs -o FILE.wav".into()).into());
    }
    let frames = read_frames(args)?;
    let mut codec = audio::open_codec(None, Some(&args.codec), args.threads as usize, (args.kv_quant, args.kv_quant))?
        .ok_or_else(|| anyhow::anyhow!("{}: no codec", args.codec.display()))?;
    codec.check_frames(&frames).with_context(|| format!("{}", args.frames.display()))?;
    let spec = audio::spec(&codec, args.sample_format.into());
    let mut out = if args.output.as_os_str() == "-" { AudioOut::stdout(spec)? } else { AudioOut::file(&args.output, spec)? };
    let started = Instant::now();
    for chunk in frames.chunks(CHUNK) {
        if crate::interrupt::requested() {
            break;
        }
        out.write(&codec.decode(chunk)?)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let samples = out.samples();
    out.finish()?;
    let audio_seconds = samples as f64 / spec.sample_rate as f64;
    if args.json {
        let v = json!({
            "frames": frames.len(),
            "output": args.output.display().to_string(),
            "sample_rate": spec.sample_rate,
            "samples": samples,
            "audio_seconds": audio_seconds,
            "seconds": seconds,
            "real_time_factor": if audio_seconds > 0.0 { seconds / audio_seconds } else { 0.0 },
        });
        output::println(&v.to_string());
    }
    if !log.quiet {
        eprintln!(
            "decoded {} frames into {:.2} s of audio ({samples} samples at {} Hz) in {seconds:.2} s, real-time factor {:.3} -> {}",
            frames.len(),
            audio_seconds,
            spec.sample_rate,
            if audio_seconds > 0.0 { seconds / audio_seconds } else { 0.0 },
            args.output.display()
        );
    }
    Ok(())
}
