//! The speech engine thread: CSM sessions share one generator and one codec (the weights are loaded
//! once); each session's state (backbone cache, codec stream) is swapped in for its frames. Every
//! running session makes one frame per round, decoded to audio as soon as it exists.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use ccsm::csm::{CsmGenerator, CsmSession, Request, Row};
use ccsm::kv_cache::KvCacheConfig;
use ccsm::mimi::{MimiDecoder, MimiStream};
use ccsm::sampling::Sampler;
use ccsm::CacheType;

use crate::api::{ApiError, Usage};
use crate::jobs::{admit, gather, session_cells, Admission, Budget, Finish, Job, SpeechEvent, SpeechJob};
use crate::metrics::Metrics;
use crate::text_loop::{start_budget, LoopSettings};

struct Pending {
    job: SpeechJob,
    rows: Vec<Row>,
}

struct Session {
    job: SpeechJob,
    state: CsmSession,
    stream: MimiStream,
    bytes: usize,
    /// The prompt, until it has run.
    rows: Option<Vec<Row>>,
    prompt_rows: usize,
    sampler: Sampler,
    frames: usize,
    first_audio: bool,
    finished: bool,
}

/// The generator and codec every session shares.
pub struct Speech {
    pub generator: CsmGenerator,
    pub codec: MimiDecoder,
}

pub fn run(mut speech: Speech, settings: LoopSettings, jobs: Receiver<Job>, metrics: Arc<Metrics>) {
    let stream_bytes = match speech.codec.new_stream() {
        Ok(s) => s.bytes(),
        Err(e) => return tracing::error!("cannot make a codec stream: {e}"),
    };
    let full_session = backbone_bytes(&speech, settings.n_ctx, settings.k_type, settings.v_type).unwrap_or(usize::MAX);
    let mut budget = start_budget(&settings, full_session.saturating_add(stream_bytes), &metrics);
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut running: Vec<Session> = Vec::new();
    loop {
        let Some(incoming) = gather(&jobs, running.is_empty() && pending.is_empty()) else { return };
        for job in incoming {
            let Job::Speech(job) = job else { continue };
            match check(&speech, &settings, &job) {
                Ok(rows) => pending.push_back(Pending { job, rows }),
                Err(e) => {
                    metrics.waiting.fetch_sub(1, Ordering::Relaxed);
                    metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                    let _ = job.events.send(SpeechEvent::Failed(e));
                }
            }
        }
        pending.retain(|p| {
            let gone = p.job.events.is_closed();
            if gone {
                metrics.waiting.fetch_sub(1, Ordering::Relaxed);
                metrics.requests_cancelled.fetch_add(1, Ordering::Relaxed);
            }
            !gone
        });
        admit_pending(&speech, &settings, stream_bytes, &mut budget, &mut pending, &mut running, &metrics);
        if running.is_empty() {
            if !pending.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            continue;
        }
        for session in running.iter_mut().filter(|s| !s.job.events.is_closed()) {
            frame(&mut speech, session, &metrics);
        }
        metrics.steps.fetch_add(1, Ordering::Relaxed);
        running.retain(|s| {
            let done = s.finished || s.job.events.is_closed();
            if done {
                budget.give_back(s.bytes);
                if !s.finished {
                    metrics.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                }
                metrics.running.fetch_sub(1, Ordering::Relaxed);
            }
            !done
        });
        metrics.kv_bytes.store(budget.used, Ordering::Relaxed);
    }
}

/// The job's backbone rows (voice context, then the input), checked against the session context.
fn check(speech: &Speech, settings: &LoopSettings, job: &SpeechJob) -> Result<Vec<Row>, ApiError> {
    let request =
        Request { text: job.text.clone(), speaker: job.speaker, context: job.context.clone(), seed: None, max_frames: None, output: None };
    let rows = request.rows(speech.generator.model()).map_err(|e| ApiError::invalid(e.to_string()))?;
    let needed = rows.len() + job.max_frames;
    if needed > settings.n_ctx {
        return Err(ApiError::invalid(format!(
            "the input and context ({} rows) plus max_audio_ms ({} frames of 80 ms) need {needed} positions; this server gives a session {}",
            rows.len(),
            job.max_frames,
            settings.n_ctx
        )));
    }
    Ok(rows)
}

fn admit_pending(
    speech: &Speech,
    settings: &LoopSettings,
    stream_bytes: usize,
    budget: &mut Budget,
    pending: &mut VecDeque<Pending>,
    running: &mut Vec<Session>,
    metrics: &Metrics,
) {
    while running.len() < settings.parallel {
        let Some(head) = pending.front() else { return };
        let cells = session_cells(head.rows.len() + head.job.max_frames, settings.n_ctx);
        let bytes_of = |k, v| backbone_bytes(speech, cells, k, v).map(|b| b + stream_bytes);
        let decision = admit((settings.k_type, settings.v_type), settings.adapt, budget, bytes_of);
        let (k, v, bytes) = match decision {
            Admission::Wait => return,
            Admission::Never { smallest } => {
                let p = pending.pop_front().expect("head exists");
                metrics.waiting.fetch_sub(1, Ordering::Relaxed);
                metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                let _ = p.job.events.send(SpeechEvent::Failed(ApiError::invalid(format!(
                    "this request needs {smallest} bytes of caches at the smallest layout, more than the server's budget of {}",
                    budget.total
                ))));
                continue;
            }
            Admission::Start { k, v, bytes } => (k, v, bytes),
        };
        let Pending { job, rows } = pending.pop_front().expect("head exists");
        metrics.waiting.fetch_sub(1, Ordering::Relaxed);
        let made = (|| -> ccsm::Result<_> {
            Ok((speech.generator.new_session(cells, k, v)?, speech.codec.new_stream()?, Sampler::new(job.sampler)?))
        })();
        let (state, stream, sampler) = match made {
            Ok(parts) => parts,
            Err(e) => {
                metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                let _ = job.events.send(SpeechEvent::Failed(ApiError::invalid(e.to_string())));
                continue;
            }
        };
        budget.take(bytes);
        metrics.running.fetch_add(1, Ordering::Relaxed);
        metrics.prompt_tokens.fetch_add(rows.len() as u64, Ordering::Relaxed);
        let _ = job.events.send(SpeechEvent::Accepted);
        let prompt_rows = rows.len();
        running.push(Session {
            job,
            state,
            stream,
            bytes,
            rows: Some(rows),
            prompt_rows,
            sampler,
            frames: 0,
            first_audio: false,
            finished: false,
        });
    }
}

/// Bytes of a backbone cache of `cells` cells of these types (ggml's block math).
fn backbone_bytes(speech: &Speech, cells: usize, k_type: CacheType, v_type: CacheType) -> Option<usize> {
    let b = &speech.generator.model().config().backbone;
    KvCacheConfig { n_layer: b.n_layer, head_dim: b.head_dim, n_head_kv: b.n_head_kv, capacity: cells, k_type, v_type }.bytes().ok()
}

/// The session's next frame (after its prompt, the first time), decoded and sent.
fn frame(speech: &mut Speech, s: &mut Session, metrics: &Metrics) {
    speech.generator.swap_session(&mut s.state);
    let made = (|| -> ccsm::Result<_> {
        if let Some(rows) = s.rows.take() {
            speech.generator.prefill(&rows)?;
        }
        speech.generator.generate_frame(&mut s.sampler, None)
    })();
    speech.generator.swap_session(&mut s.state);
    let frame = match made {
        Ok(Some(frame)) => frame,
        Ok(None) => return finish(s, Finish::Stop, metrics),
        Err(e) => return fail(s, format!("generation failed: {e}"), metrics),
    };
    speech.codec.swap_stream(&mut s.stream);
    let samples = speech.codec.decode(std::slice::from_ref(&frame));
    speech.codec.swap_stream(&mut s.stream);
    let samples = match samples {
        Ok(samples) => samples,
        Err(e) => return fail(s, format!("decoding failed: {e}"), metrics),
    };
    s.frames += 1;
    metrics.frames_generated.fetch_add(1, Ordering::Relaxed);
    if !s.first_audio {
        s.first_audio = true;
        metrics.time_to_first_audio.observe(s.job.arrived.elapsed().as_secs_f64());
    }
    let _ = s.job.events.send(SpeechEvent::Audio(samples));
    if s.frames >= s.job.max_frames {
        finish(s, Finish::Length, metrics);
    }
}

/// Ends the session: `Stop` when the model ended the speech, `Length` at the audio limit.
fn finish(s: &mut Session, finish: Finish, metrics: &Metrics) {
    tracing::debug!("speech session ended: {} after {} frames", finish.name(), s.frames);
    let _ = s.job.events.send(SpeechEvent::Done { usage: Usage::new(s.prompt_rows, s.frames) });
    metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
    s.finished = true;
}

fn fail(s: &mut Session, message: String, metrics: &Metrics) {
    let _ = s.job.events.send(SpeechEvent::Failed(ApiError::internal(message)));
    metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
    s.finished = true;
}
