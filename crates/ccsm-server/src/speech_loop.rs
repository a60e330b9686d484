//! The speech engine thread: CSM sessions share one engine and one codec (the weights are loaded
//! once). Every running session makes one frame per round, all in one batched pass (the weights are
//! read once per decoder and backbone step for every session), decoded to audio by the session's own
//! codec stream as soon as it exists.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use ccsm::csm::{speech_step, CsmEngine, CsmSession, PrefillRequest, Request, Row, SessionCaches, SpeechTurn, TurnProgress, TurnStep};
use ccsm::generate::StopReason;
use ccsm::memory::{admit, uniform_fallbacks, Admission, Budget};
use ccsm::mimi::{MimiCodec, MimiStream};
use ccsm::sampling::Sampler;

use crate::api::{ApiError, Usage};
use crate::hearing::{needs_hearing, Hearing};
use crate::jobs::{
    drop_departed, gather, refused, retire, session_cells, started, wait_for_change, Finish, Job, SessionState, SpeechEvent, SpeechJob,
};
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
    progress: TurnProgress,
    first_audio: bool,
    finished: bool,
}

/// The engine and codec every session shares, and the thread that encodes recordings (when the
/// codec has an encoder).
pub struct Speech {
    pub engine: CsmEngine,
    pub codec: MimiCodec,
    pub hearing: Option<Hearing>,
}

pub fn run(mut speech: Speech, settings: LoopSettings, jobs: Receiver<Job>, metrics: Arc<Metrics>) {
    let stream_bytes = match speech.codec.new_stream() {
        Ok(s) => s.bytes(),
        Err(e) => return tracing::error!("cannot make a codec stream: {e}"),
    };
    let full = SessionCaches { capacity: settings.n_ctx, k_type: settings.k_type, v_type: settings.v_type };
    let full_session = speech.engine.session_bytes(&full).unwrap_or(usize::MAX);
    let mut budget = start_budget(&settings, full_session.saturating_add(stream_bytes), &metrics);
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut running: Vec<Session> = Vec::new();
    loop {
        let Some(incoming) = gather(&jobs, running.is_empty() && pending.is_empty()) else { return };
        for job in incoming {
            let Job::Speech(job) = job else { continue };
            if needs_hearing(&job) {
                // Recordings are encoded on the hearing thread; the job comes back with their frames.
                let unheard = match &speech.hearing {
                    Some(hearing) => {
                        hearing.hear(job).err().map(|job| (job, ApiError::internal("the thread that encodes recordings has stopped")))
                    }
                    None => Some((
                        Box::new(job),
                        ApiError::invalid(
                            "this server's codec holds only the decoder: it cannot encode recordings (convert it again with its encoder)",
                        ),
                    )),
                };
                if let Some((job, e)) = unheard {
                    refused(&metrics);
                    let _ = job.events.send(SpeechEvent::Failed(e));
                }
                continue;
            }
            match check(&speech, &settings, &job) {
                Ok(rows) => pending.push_back(Pending { job, rows }),
                Err(e) => {
                    refused(&metrics);
                    let _ = job.events.send(SpeechEvent::Failed(e));
                }
            }
        }
        drop_departed(&mut pending, |p| p.job.events.is_closed(), &metrics);
        admit_pending(&speech, &settings, stream_bytes, &mut budget, &mut pending, &mut running, &metrics);
        if running.is_empty() {
            if !pending.is_empty() {
                wait_for_change();
            }
            continue;
        }
        round(&mut speech, &mut running, &metrics);
        metrics.steps.fetch_add(1, Ordering::Relaxed);
        retire(
            &mut running,
            |s| SessionState { finished: s.finished, gone: s.job.events.is_closed(), bytes: s.bytes },
            &mut budget,
            &metrics,
        );
    }
}

/// The job's backbone rows (voice context, then the input; recordings already encoded), checked
/// against the session context.
fn check(speech: &Speech, settings: &LoopSettings, job: &SpeechJob) -> Result<Vec<Row>, ApiError> {
    let context = job.context.clone();
    let request = Request { text: job.text.clone(), speaker: job.speaker, context, seed: None, max_frames: None, output: None };
    let rows = request.rows(speech.engine.model()).map_err(|e| ApiError::invalid(e.to_string()))?;
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
        let caches = |(k_type, v_type): (ccsm::CacheType, ccsm::CacheType)| SessionCaches { capacity: cells, k_type, v_type };
        let bytes_of =
            |&types: &(ccsm::CacheType, ccsm::CacheType)| speech.engine.session_bytes(&caches(types)).ok().map(|b| b + stream_bytes);
        let decision = admit(&(settings.k_type, settings.v_type), &uniform_fallbacks(), settings.adapt, budget, bytes_of);
        let (types, bytes) = match decision {
            Admission::Wait => return,
            Admission::Never { smallest } => {
                let p = pending.pop_front().expect("head exists");
                refused(metrics);
                let _ = p.job.events.send(SpeechEvent::Failed(ApiError::over_budget(smallest, budget.total)));
                continue;
            }
            Admission::Start { layout, bytes } => (layout, bytes),
        };
        let Pending { job, rows } = pending.pop_front().expect("head exists");
        metrics.waiting.fetch_sub(1, Ordering::Relaxed);
        let made = (|| -> ccsm::Result<_> {
            Ok((speech.engine.new_session(&caches(types))?, speech.codec.new_stream()?, Sampler::new(job.sampler)?))
        })();
        let (state, stream, sampler) = match made {
            Ok(parts) => parts,
            Err(e) => {
                // A 400: the HTTP side counts it.
                let _ = job.events.send(SpeechEvent::Failed(ApiError::invalid(e.to_string())));
                continue;
            }
        };
        started(budget, bytes, rows.len(), metrics);
        let _ = job.events.send(SpeechEvent::Accepted);
        let prompt_rows = rows.len();
        let progress = TurnProgress::new(job.max_frames);
        running.push(Session {
            job,
            state,
            stream,
            bytes,
            rows: Some(rows),
            prompt_rows,
            sampler,
            progress,
            first_audio: false,
            finished: false,
        });
    }
}

/// One round: new sessions run their prompts (together, one backbone graph per chunk), then every
/// session makes its next frame in one batched pass (each decoder step one graph over all of them),
/// and each frame is decoded by its session's codec stream and sent.
fn round(speech: &mut Speech, running: &mut [Session], metrics: &Metrics) {
    let mut new: Vec<&mut Session> = running.iter_mut().filter(|s| s.rows.is_some() && !s.job.events.is_closed()).collect();
    if !new.is_empty() {
        let prompts: Vec<Vec<Row>> = new.iter_mut().map(|s| s.rows.take().expect("filtered")).collect();
        let done = {
            let mut requests: Vec<PrefillRequest> =
                new.iter_mut().zip(&prompts).map(|(s, rows)| PrefillRequest { session: &mut s.state, rows }).collect();
            speech.engine.prefill(&mut requests)
        };
        if let Err(e) = done {
            new.into_iter().for_each(|s| fail(s, format!("the prompt failed: {e}"), metrics));
        }
    }
    let mut active: Vec<&mut Session> = running.iter_mut().filter(|s| !s.finished && !s.job.events.is_closed()).collect();
    if active.is_empty() {
        return;
    }
    let made = {
        let mut turns: Vec<SpeechTurn> = active
            .iter_mut()
            .map(|s| SpeechTurn { session: &mut s.state, sampler: &mut s.sampler, stream: Some(&mut s.stream), progress: &mut s.progress })
            .collect();
        speech_step(&mut speech.engine, Some(&mut speech.codec), &mut turns)
    };
    let steps = match made {
        Ok(steps) => steps,
        Err(e) => {
            tracing::error!("frame step failed: {e}");
            return active.into_iter().for_each(|s| fail(s, format!("generation failed: {e}"), metrics));
        }
    };
    for (s, step) in active.into_iter().zip(steps) {
        match step {
            TurnStep::Frame { samples, .. } => {
                metrics.frames_generated.fetch_add(1, Ordering::Relaxed);
                if !s.first_audio {
                    s.first_audio = true;
                    metrics.time_to_first_audio.observe(s.job.arrived.elapsed().as_secs_f64());
                }
                let _ = s.job.events.send(SpeechEvent::Audio(samples.unwrap_or_default()));
                if s.progress.stop == Some(StopReason::Limit) {
                    finish(s, Finish::Length, metrics);
                }
            }
            TurnStep::Stopped(StopReason::Limit) | TurnStep::Over => finish(s, Finish::Length, metrics),
            TurnStep::Stopped(_) => finish(s, Finish::Stop, metrics),
            TurnStep::Failed(e) => fail(s, format!("decoding failed: {e}"), metrics),
        }
    }
}

fn finish(s: &mut Session, finish: Finish, metrics: &Metrics) {
    tracing::debug!("speech session ended: {} after {} frames", finish.name(), s.progress.frames);
    let _ = s.job.events.send(SpeechEvent::Done { usage: Usage::new(s.prompt_rows, s.progress.frames) });
    metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
    s.finished = true;
}

fn fail(s: &mut Session, message: String, metrics: &Metrics) {
    let _ = s.job.events.send(SpeechEvent::Failed(ApiError::internal(message)));
    metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
    s.finished = true;
}
