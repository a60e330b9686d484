//! `ccsm-infer encode`: a recording (WAV, FLAC, MP3, Ogg Vorbis) into Mimi frames, as JSON that `decode`,
//! `--context` segments and voices read.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use ccsm::audio_in::{self, MAX_SECONDS};
use ccsm::csm::voice;
use ccsm::mimi::{MimiCodec, MimiModel, MimiOptions};

use crate::args::{default_threads, LogArgs};
use crate::output::write_atomically;
use crate::{output, UsageError};

/// `ccsm-infer encode`'s flags.
#[derive(Args, Clone)]
pub struct EncodeArgs {
    /// The recording: WAV (8/16/24/32-bit PCM or float), FLAC, MP3 or Ogg Vorbis, any rate (resampled to
    /// the codec's), mixed to mono, at most 10 minutes.
    #[arg(value_name = "AUDIO")]
    pub audio: PathBuf,

    /// The Mimi codec: a Mimi GGUF, or a CSM GGUF with one embedded (with the encoder's weights).
    #[arg(long, value_name = "FILE")]
    pub codec: PathBuf,

    /// Where the frames go (JSON {"frames": [[code per codebook], ...], ...}); stdout without it.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Codebooks per frame (default: all of the codec's; CSM-1B reads 32).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub codebooks: Option<u32>,

    #[arg(short = 't', long, default_value_t = default_threads(), value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,
}

pub fn run(args: &EncodeArgs, log: &LogArgs) -> Result<()> {
    let model = MimiModel::load(&args.codec).with_context(|| format!("loading the codec from {}", args.codec.display()))?;
    let n_q = model.config().n_q;
    let codebooks = args.codebooks.map_or(n_q, |n| n as usize);
    if codebooks > n_q {
        return Err(UsageError(format!("--codebooks {codebooks}: {} encodes 1 to {n_q}", args.codec.display())).into());
    }
    let mut codec = MimiCodec::new(model, MimiOptions { n_threads: args.threads as usize, ..MimiOptions::default() })?;
    let started = std::time::Instant::now();
    let audio = audio_in::read_file(&args.audio, MAX_SECONDS)?;
    let (rate, seconds) = (audio.sample_rate, audio.seconds());
    let frames = voice::encode_audio(&mut codec, audio, codebooks)?;
    let elapsed = started.elapsed().as_secs_f64();
    let result = json!({
        "source": args.audio.display().to_string(),
        "source_sample_rate": rate,
        "seconds": seconds,
        "codebooks": codebooks,
        "frames": frames,
    });
    match &args.output {
        Some(path) => write_atomically(path, &result.to_string())?,
        None => output::println(&result.to_string()),
    }
    if !log.quiet {
        eprintln!(
            "encoded {seconds:.2} s of audio ({rate} Hz) into {} frames of {codebooks} codes in {elapsed:.2} s (real-time factor {:.3})",
            frames.len(),
            elapsed / seconds.max(1e-9)
        );
    }
    Ok(())
}
