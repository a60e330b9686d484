//! The speech engine thread: CSM sessions share one engine and one codec (the weights are loaded
//! once). Every running session makes one frame per round, all in one batched pass (the weights are
//! read once per decoder and backbone step for every session), decoded to audio by the session's own
//! codec stream as soon as it exists.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use ccsm::csm::{
    context_rows, frame_key, row_keys, speech_step, CsmEngine, CsmSession, Frame, PrefillRequest, Request, Row, Segment, SessionCaches,
    SpeechTurn, TurnProgress, TurnStep,
};
use ccsm::generate::StopReason;
use ccsm::memory::{admit, uniform_fallbacks, Admission, Budget};
use ccsm::mimi::{MimiCodec, MimiStream};
use ccsm::sampling::Sampler;

use crate::api::{ApiError, Usage};
use crate::conversations::Conversations;
use crate::hearing::{needs_hearing, Hearing};
use crate::jobs::{
    drop_departed, gather, refused, retire, session_cells, started, wait_for_change, Finish, Job, SessionState, SpeechEvent, SpeechJob,
};
use crate::metrics::Metrics;
use crate::prefixes::Prefixes;
use crate::text_loop::{start_budget, LoopSettings};

struct Pending {
    job: SpeechJob,
    /// The context the turn runs with (a conversation's turns, the voice's, the request's).
    context: Vec<Segment>,
    rows: Vec<Row>,
    /// Their prefix-cache keys.
    keys: Vec<u64>,
    /// Rows of `context` (the rest are the text to say).
    context_rows: usize,
}

struct Session {
    job: SpeechJob,
    state: CsmSession,
    stream: MimiStream,
    bytes: usize,
    /// The prompt rows still to run, until they have.
    rows: Option<Vec<Row>>,
    prompt_rows: usize,
    /// The keys of every prompt row (for the prefix cache).
    keys: Vec<u64>,
    context: Vec<Segment>,
    context_rows: usize,
    /// The frames made so far.
    frames: Vec<Frame>,
    /// Started from a cached prefix.
    warm: bool,
    /// Finished with an answer (its rows are worth caching).
    answered: bool,
    sampler: Sampler,
    progress: TurnProgress,
    first_audio: bool,
    finished: bool,
}

/// The budget every session's caches come out of, and the cached prefixes inside it.
struct Memory {
    budget: Budget,
    prefixes: Option<Prefixes>,
}

/// The engine and codec every session shares, and the thread that encodes recordings (when the
/// codec has an encoder).
pub struct Speech {
    pub engine: CsmEngine,
    pub codec: MimiCodec,
    pub hearing: Option<Hearing>,
}

/// Runs the loop; `voices` (contexts given as frames) are prefilled into the prefix cache first, and
/// then `ready` is called.
pub fn run(
    mut speech: Speech,
    settings: LoopSettings,
    voices: Vec<Vec<Segment>>,
    jobs: Receiver<Job>,
    metrics: Arc<Metrics>,
    ready: impl FnOnce(),
) {
    let stream_bytes = match speech.codec.new_stream() {
        Ok(s) => s.bytes(),
        Err(e) => return tracing::error!("cannot make a codec stream: {e}"),
    };
    let full = SessionCaches { capacity: settings.n_ctx, k_type: settings.k_type, v_type: settings.v_type };
    let full_session = speech.engine.session_bytes(&full).unwrap_or(usize::MAX);
    let mut budget = start_budget(&settings, full_session.saturating_add(stream_bytes), &metrics);
    let shape = speech.engine.backbone_config(&full);
    let mut prefixes = shape.ok().and_then(|shape| Prefixes::start(&settings.prefixes, &shape, &mut budget, &metrics));
    if let Some(p) = prefixes.as_mut() {
        warm_voices(&mut speech.engine, &settings, &voices, p, &mut budget, &metrics);
    }
    let mut memory = Memory { budget, prefixes };
    let mut conversations = Conversations::new(settings.conversation_ttl);
    ready();
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
            let context = conversations.context_for(job.conversation.as_deref(), &job.context, job.voice_segments);
            match check(&speech, &settings, &job, &context) {
                Ok((rows, context_rows)) => pending.push_back(Pending { job, context, keys: row_keys(&rows), rows, context_rows }),
                Err(e) => {
                    refused(&metrics);
                    let _ = job.events.send(SpeechEvent::Failed(e));
                }
            }
        }
        drop_departed(&mut pending, |p| p.job.events.is_closed(), &metrics);
        admit_pending(&speech, &settings, stream_bytes, &mut memory, &mut pending, &mut running, &metrics);
        if running.is_empty() {
            if !pending.is_empty() {
                wait_for_change();
            }
            continue;
        }
        round(&mut speech, &mut running, &metrics);
        metrics.steps.fetch_add(1, Ordering::Relaxed);
        let held = memory.prefixes.as_ref().map_or(0, Prefixes::bytes);
        let ended = retire(
            &mut running,
            |s| SessionState { finished: s.finished, gone: s.job.events.is_closed(), bytes: s.bytes },
            &mut memory.budget,
            held,
            &metrics,
        );
        for s in ended.into_iter().filter(|s| s.answered) {
            remember(s, &mut memory.prefixes, &mut conversations, &mut memory.budget, &metrics);
        }
    }
}

/// Keeps an answered turn warm: a conversation's turn, all its rows (prompt and frames) for the next
/// turn; otherwise its context's rows (a voice, a shared context) for the next request that has it.
fn remember(s: Session, prefixes: &mut Option<Prefixes>, conversations: &mut Conversations, budget: &mut Budget, metrics: &Metrics) {
    if let Some(p) = prefixes.as_mut() {
        match &s.job.conversation {
            Some(_) => {
                let keys: Vec<u64> = s.keys.iter().copied().chain(s.frames.iter().map(|f| frame_key(f))).collect();
                p.keep(budget, &keys, s.state.backbone_cache(), metrics);
            }
            None => p.keep(budget, &s.keys[..s.context_rows], s.state.backbone_cache(), metrics),
        }
        crate::jobs::publish_kv_bytes(budget, p.bytes(), metrics);
    }
    if let Some(id) = &s.job.conversation {
        let said = Segment { speaker: s.job.speaker, text: s.job.text.clone(), frames: s.frames, audio: None };
        conversations.add_turn(id, s.context, said);
    }
}

/// Prefills each voice's context into the prefix cache (those not cached already, from disk).
fn warm_voices(
    engine: &mut CsmEngine,
    settings: &LoopSettings,
    voices: &[Vec<Segment>],
    prefixes: &mut Prefixes,
    budget: &mut Budget,
    metrics: &Metrics,
) {
    for context in voices {
        let Ok(rows) = context_rows(engine.model(), context) else { continue };
        let keys = row_keys(&rows);
        if rows.len() < ccsm::prefix_cache::BLOCK_ROWS || rows.len() >= settings.n_ctx || prefixes.cache().contains(&keys) {
            continue;
        }
        let caches =
            SessionCaches { capacity: session_cells(rows.len(), settings.n_ctx), k_type: settings.k_type, v_type: settings.v_type };
        let warmed = engine.new_session(&caches).and_then(|mut state| {
            engine.prefill(&mut [PrefillRequest { session: &mut state, rows: &rows }])?;
            Ok(state)
        });
        match warmed {
            Ok(state) => prefixes.keep(budget, &keys, state.backbone_cache(), metrics),
            Err(e) => tracing::warn!("a voice could not be prefilled: {e}"),
        }
    }
    eprintln!("prefix cache: {} voices warm ({:.1} MiB)", voices.len(), prefixes.bytes() as f64 / (1 << 20) as f64);
}

/// The job's backbone rows (`context`, then the input; recordings already encoded), checked against
/// the session context, and how many of them are the context's.
fn check(speech: &Speech, settings: &LoopSettings, job: &SpeechJob, context: &[Segment]) -> Result<(Vec<Row>, usize), ApiError> {
    let request =
        Request { text: job.text.clone(), speaker: job.speaker, context: context.to_vec(), seed: None, max_frames: None, output: None };
    let (rows, context_rows) = request.rows_after_context(speech.engine.model()).map_err(|e| ApiError::invalid(e.to_string()))?;
    let needed = rows.len() + job.max_frames;
    if needed > settings.n_ctx {
        return Err(ApiError::invalid(format!(
            "the input and context ({} rows) plus max_audio_ms ({} frames of 80 ms) need {needed} positions; this server gives a session {}",
            rows.len(),
            job.max_frames,
            settings.n_ctx
        )));
    }
    Ok((rows, context_rows))
}

fn admit_pending(
    speech: &Speech,
    settings: &LoopSettings,
    stream_bytes: usize,
    memory: &mut Memory,
    pending: &mut VecDeque<Pending>,
    running: &mut Vec<Session>,
    metrics: &Metrics,
) {
    let Memory { budget, prefixes } = memory;
    while running.len() < settings.parallel {
        let Some(head) = pending.front() else { return };
        let cells = session_cells(head.rows.len() + head.job.max_frames, settings.n_ctx);
        let caches = |(k_type, v_type): (ccsm::CacheType, ccsm::CacheType)| SessionCaches { capacity: cells, k_type, v_type };
        let bytes_of =
            |&types: &(ccsm::CacheType, ccsm::CacheType)| speech.engine.session_bytes(&caches(types)).ok().map(|b| b + stream_bytes);
        // Sessions come first: cached prefixes make room before a session waits or is narrowed, all
        // but the one this session would start from while running sessions can still free memory.
        let hit = match (prefixes.as_mut(), bytes_of(&(settings.k_type, settings.v_type))) {
            (Some(p), Some(bytes)) => p.make_room_for(budget, bytes, &head.keys, !running.is_empty(), metrics),
            _ => None,
        };
        let decision = admit(&(settings.k_type, settings.v_type), &uniform_fallbacks(), settings.adapt, budget, bytes_of);
        if let (Some(p), false) = (prefixes.as_mut(), matches!(decision, Admission::Start { .. })) {
            p.release(hit);
        }
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
        let Pending { job, context, rows, keys, context_rows } = pending.pop_front().expect("head exists");
        metrics.waiting.fetch_sub(1, Ordering::Relaxed);
        let made = (|| -> ccsm::Result<_> {
            Ok((speech.engine.new_session(&caches(types))?, speech.codec.new_stream()?, Sampler::new(job.sampler)?))
        })();
        let (mut state, stream, sampler) = match made {
            Ok(parts) => parts,
            Err(e) => {
                if let Some(p) = prefixes.as_mut() {
                    p.release(hit);
                }
                // A 400: the HTTP side counts it.
                let _ = job.events.send(SpeechEvent::Failed(ApiError::invalid(e.to_string())));
                continue;
            }
        };
        let restore = |c: &mut ccsm::prefix_cache::PrefixCache, hit| state.start_from_prefix(c, hit).inspect_err(|_| state.reset());
        let reused = prefixes.as_mut().map_or(0, |p| p.start_session(hit, restore, metrics));
        started(budget, bytes, rows.len() - reused, metrics);
        let _ = job.events.send(SpeechEvent::Accepted);
        let prompt_rows = rows.len();
        let progress = TurnProgress::new(job.max_frames);
        running.push(Session {
            job,
            state,
            stream,
            bytes,
            rows: Some(rows[reused..].to_vec()),
            prompt_rows,
            keys,
            context,
            context_rows,
            frames: Vec::new(),
            warm: reused > 0,
            answered: false,
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
            TurnStep::Frame { frame, samples } => {
                metrics.frames_generated.fetch_add(1, Ordering::Relaxed);
                s.frames.push(frame);
                if !s.first_audio {
                    s.first_audio = true;
                    let seconds = s.job.arrived.elapsed().as_secs_f64();
                    metrics.time_to_first_audio.observe(seconds);
                    metrics.time_to_first_audio_by_prefix.observe(s.warm, seconds);
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
    s.answered = true;
}

fn fail(s: &mut Session, message: String, metrics: &Metrics) {
    let _ = s.job.events.send(SpeechEvent::Failed(ApiError::internal(message)));
    metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
    s.finished = true;
}
