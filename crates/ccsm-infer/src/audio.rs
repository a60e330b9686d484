//! Audio out of the command line: the codec (embedded in the model or `--codec`), and WAV sinks (a
//! file written whole or not at all, or a stream on stdout).

use std::fs::File;
use std::io::{BufWriter, Stdout};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use ccsm::mimi::{has_codec, MimiDecoder, MimiModel, MimiOptions};
use ccsm::wav::{SampleFormat, WavSpec, WavWriter};
use ccsm::CacheType;
use ggml::gguf::GgufFile;

use crate::UsageError;

/// Where generation's `-o` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// The frames as JSON (no `-o`: stdout).
    FramesJson(Option<PathBuf>),
    /// Audio into a WAV file.
    WavFile(PathBuf),
    /// Audio streamed to stdout as a WAV of unknown length.
    WavStdout,
}

impl OutputKind {
    /// By the name: `-` for stdout, `.wav`, `.json`.
    pub fn of(output: Option<&Path>) -> Result<Self> {
        let Some(path) = output else { return Ok(OutputKind::FramesJson(None)) };
        if path.as_os_str() == "-" {
            return Ok(OutputKind::WavStdout);
        }
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("wav") => Ok(OutputKind::WavFile(path.to_path_buf())),
            Some("json") => Ok(OutputKind::FramesJson(Some(path.to_path_buf()))),
            _ => {
                Err(UsageError(format!("-o {}: give a .wav file (audio), a .json file (frames) or - (a WAV on stdout)", path.display()))
                    .into())
            }
        }
    }

    pub fn is_audio(&self) -> bool {
        !matches!(self, OutputKind::FramesJson(_))
    }
}

/// The codec for `model_path`: `--codec FILE` if given (a Mimi GGUF or a CSM GGUF with one embedded),
/// else the one embedded in the model; `None` when there is none.
pub fn open_codec(
    model_path: Option<&Path>,
    codec: Option<&Path>,
    n_threads: usize,
    cache: (CacheType, CacheType),
) -> Result<Option<MimiDecoder>> {
    let path = match (codec, model_path) {
        (Some(c), _) => c,
        (None, Some(m)) if has_codec(&GgufFile::open(m)?) => m,
        _ => return Ok(None),
    };
    let model = MimiModel::load(path).with_context(|| format!("loading the codec from {}", path.display()))?;
    let options = MimiOptions { n_threads, k_type: cache.0, v_type: cache.1, ..MimiOptions::default() };
    Ok(Some(MimiDecoder::new(model, options).context("setting up the codec")?))
}

/// The error when audio is asked for and no codec exists.
pub fn no_codec(model: &Path) -> anyhow::Error {
    UsageError(format!(
        "audio output needs a Mimi codec: {} has none embedded; pass --codec MIMI.gguf (tools/convert_mimi.py makes one), or -o FILE.json for the frames",
        model.display()
    ))
    .into()
}

pub fn spec(decoder: &MimiDecoder, format: SampleFormat) -> WavSpec {
    let c = decoder.model().config();
    WavSpec { sample_rate: c.sample_rate as u32, channels: c.channels as u16, format }
}

/// A WAV being written: to a temporary file renamed into place by `finish`, or to stdout.
pub enum AudioOut {
    File { writer: WavWriter<BufWriter<File>>, partial: PathBuf, path: PathBuf },
    Stdout(WavWriter<Stdout>),
}

impl AudioOut {
    pub fn file(path: &Path, spec: WavSpec) -> Result<Self> {
        let partial = path.with_extension("wav.partial");
        let file = File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let writer = WavWriter::seekable(BufWriter::new(file), spec)?;
        Ok(AudioOut::File { writer, partial, path: path.to_path_buf() })
    }

    pub fn stdout(spec: WavSpec) -> Result<Self> {
        Ok(AudioOut::Stdout(WavWriter::streaming(std::io::stdout(), spec)?))
    }

    /// Appends samples; a stream is flushed at once so a player hears them.
    pub fn write(&mut self, samples: &[f32]) -> Result<()> {
        match self {
            AudioOut::File { writer, .. } => writer.write(samples)?,
            AudioOut::Stdout(writer) => {
                if let Err(e) = writer.write(samples).and_then(|_| writer.flush()) {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        std::process::exit(0);
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Sample frames written so far.
    pub fn samples(&self) -> u64 {
        match self {
            AudioOut::File { writer, .. } => writer.frames_written(),
            AudioOut::Stdout(writer) => writer.frames_written(),
        }
    }

    /// Completes the WAV: a file gets its sizes and its final name.
    pub fn finish(self) -> Result<()> {
        match self {
            AudioOut::File { writer, partial, path } => {
                writer.finish()?;
                std::fs::rename(&partial, &path).with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
            }
            AudioOut::Stdout(mut writer) => writer.flush()?,
        }
        Ok(())
    }
}
