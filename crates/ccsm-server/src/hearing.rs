//! The server's ears: recordings (the operator's `--voices`, a request's uploads) become Mimi frames on
//! a thread of their own, with a codec of its own, so a long upload never stalls the sessions that are
//! speaking (the engine thread only decodes). A job whose recordings are encoded goes on to the
//! engine's queue; one whose client left is dropped here; one whose audio cannot be read is refused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use ccsm::csm::{voice, Frame};
use ccsm::mimi::{MimiCodec, MimiModel, MimiOptions};

use crate::api::ApiError;
use crate::jobs::{departed, refused, Job, SpeechEvent, SpeechJob};
use crate::metrics::Metrics;

/// The encoding thread's queue.
pub struct Hearing {
    jobs: Sender<SpeechJob>,
}

/// Whether a job carries recordings still to encode: uploads, or a voice's recording without frames.
pub fn needs_hearing(job: &SpeechJob) -> bool {
    !job.uploads.is_empty() || job.context.iter().any(|s| s.frames.is_empty() && s.audio.is_some())
}

impl Hearing {
    /// Starts the thread with a codec of its own, loaded there from `path` (ggml's handles stay on the
    /// thread that made them) and returns once it has loaded; it encodes all of CSM's `codebooks` and
    /// sends finished jobs to `engine`. The thread ends when the engine's queue or this one closes.
    pub fn start(path: PathBuf, options: MimiOptions, codebooks: usize, engine: Sender<Job>, metrics: Arc<Metrics>) -> Result<Hearing> {
        let (jobs, rx) = mpsc::channel();
        let (loaded_tx, loaded) = mpsc::channel();
        std::thread::Builder::new().name("ccsm-hearing".into()).spawn(move || {
            let codec = MimiModel::load(&path)
                .and_then(|model| MimiCodec::new(model, options))
                .with_context(|| format!("loading the codec from {} to encode recordings", path.display()));
            match codec {
                Ok(codec) => {
                    let _ = loaded_tx.send(Ok(()));
                    run(codec, codebooks, rx, engine, metrics)
                }
                Err(e) => {
                    let _ = loaded_tx.send(Err(e));
                }
            }
        })?;
        loaded.recv().map_err(|_| anyhow::anyhow!("the thread that encodes recordings stopped while loading"))??;
        Ok(Hearing { jobs })
    }

    /// Queues a job for encoding; gives it back if the thread has stopped.
    pub fn hear(&self, job: SpeechJob) -> std::result::Result<(), Box<SpeechJob>> {
        self.jobs.send(job).map_err(|e| Box::new(e.0))
    }
}

fn run(mut codec: MimiCodec, codebooks: usize, jobs: Receiver<SpeechJob>, engine: Sender<Job>, metrics: Arc<Metrics>) {
    // A voice's recording is encoded on its first use, then kept.
    let mut voices: HashMap<PathBuf, Vec<Frame>> = HashMap::new();
    for mut job in jobs {
        if job.events.is_closed() {
            departed(&metrics);
            continue;
        }
        metrics.recordings_encoding.fetch_add(1, Ordering::Relaxed);
        let encoded = encode(&mut codec, &mut voices, &mut job, codebooks, &metrics);
        metrics.recordings_encoding.fetch_sub(1, Ordering::Relaxed);
        if let Err(e) = encoded {
            refused(&metrics);
            let _ = job.events.send(SpeechEvent::Failed(e));
            continue;
        }
        if engine.send(Job::Speech(job)).is_err() {
            return;
        }
    }
}

/// Fills the frames of every segment the job's recordings stand for.
fn encode(
    codec: &mut MimiCodec,
    voices: &mut HashMap<PathBuf, Vec<Frame>>,
    job: &mut SpeechJob,
    codebooks: usize,
    metrics: &Metrics,
) -> Result<(), ApiError> {
    for segment in job.context.iter_mut().filter(|s| s.frames.is_empty()) {
        let Some(path) = segment.audio.clone() else { continue };
        if !voices.contains_key(&path) {
            let frames = voice::encode_file(codec, &path, codebooks)
                .map_err(|e| ApiError::internal(format!("encoding the voice's recording: {e}")))?;
            voices.insert(path.clone(), frames);
            metrics.recordings_encoded.fetch_add(1, Ordering::Relaxed);
        }
        segment.frames = voices[&path].clone();
    }
    for (i, bytes) in std::mem::take(&mut job.uploads) {
        let audio = ccsm::audio_in::read_bytes(bytes, &format!("context[{i}].audio"), ccsm::audio_in::MAX_SECONDS)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        job.context[i].frames = voice::encode_audio(codec, audio, codebooks).map_err(|e| ApiError::invalid(e.to_string()))?;
        metrics.recordings_encoded.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
