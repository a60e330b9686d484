//! The text engine thread: continuous batching. Each step runs one graph over every running session
//! (prompt chunks of the sessions still prefilling, one token of each decoding session), so the weights
//! are read once per step for all of them; sessions join and leave between steps.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use ccsm::chat::ChatTemplate;
use ccsm::engine::{SequenceStep, TextEngine};
use ccsm::kv_cache::{KvCache, KvLayout};
use ccsm::sampling::Sampler;
use ccsm::{CacheType, Logits};

use crate::api::{ApiError, Usage};
use crate::jobs::{
    admit, drop_departed, gather, refused, retire, session_cells, started, wait_for_change, Admission, Budget, Finish, Job, SessionState,
    TextEvent, TextJob, TextPrompt,
};
use crate::metrics::Metrics;

/// How the loop sizes and admits sessions.
#[derive(Clone, Debug)]
pub struct LoopSettings {
    /// Sessions running at once at most.
    pub parallel: usize,
    /// Most cache cells one session may use (its prompt plus what it generates).
    pub n_ctx: usize,
    pub k_type: CacheType,
    pub v_type: CacheType,
    /// Under memory pressure, admit sessions with smaller cache types instead of waiting.
    pub adapt: bool,
    /// Text sessions' per-layer layouts (speech sessions take `k_type`/`v_type`).
    pub layouts: SessionLayouts,
    /// Most rows one step runs (prompts are fed in chunks within it).
    pub n_batch: usize,
    /// Bytes all sessions' caches share (`None`: `parallel` sessions of a full context).
    pub budget_bytes: Option<usize>,
    /// Text sessions' recent window (f16 cells beside the layout's; at most the session's cells).
    pub recent: usize,
}

/// The layouts text sessions get: the configured one, then under pressure (with `adapt`) the smaller
/// fallbacks in order (uniform q8_0 and q4_0, or the planner's layouts at their bytes).
#[derive(Clone, Debug)]
pub struct SessionLayouts {
    pub configured: KvLayout,
    pub fallbacks: Vec<KvLayout>,
}

/// Logs and publishes the budget the loop runs with.
pub(crate) fn start_budget(settings: &LoopSettings, full_session: usize, metrics: &Metrics) -> Budget {
    let total = settings.budget_bytes.unwrap_or(full_session.saturating_mul(settings.parallel));
    metrics.kv_budget_bytes.store(total, Ordering::Relaxed);
    eprintln!(
        "model loaded: {} sessions at once, {} cells each, KV budget {:.2} MiB ({}/{} caches)",
        settings.parallel,
        settings.n_ctx,
        total as f64 / (1 << 20) as f64,
        settings.k_type,
        settings.v_type
    );
    Budget { total, used: 0 }
}

/// Tokens a request without `max_tokens` may generate at most (fewer when its context is shorter).
const DEFAULT_MAX_TOKENS: usize = 256;

/// A request that has been checked and tokenized, waiting for a cache.
struct Pending {
    job: TextJob,
    prompt: Vec<u32>,
    max_tokens: usize,
}

/// A running request.
struct Session {
    job: TextJob,
    cache: KvCache,
    bytes: usize,
    prompt_len: usize,
    max_tokens: usize,
    /// Prompt tokens not yet fed.
    unfed: VecDeque<u32>,
    /// The sampled token to feed next (decoding).
    next: Option<u32>,
    sampler: Sampler,
    generated: Vec<u32>,
    /// Bytes of the generated text already sent.
    sent: usize,
    first_token_at: Option<Instant>,
    /// Done (or failed) and answered.
    finished: bool,
}

pub fn run(mut engine: TextEngine, settings: LoopSettings, jobs: Receiver<Job>, metrics: Arc<Metrics>) {
    let template = match ChatTemplate::of(engine.model().tokenizer()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("the model's chat template is unusable, /v1/chat/completions will refuse: {e}");
            None
        }
    };
    let full_session = engine
        .cache_config(settings.n_ctx, settings.k_type, settings.v_type)
        .with_layout(settings.layouts.configured.clone())
        .with_recent(settings.recent.min(settings.n_ctx))
        .bytes()
        .unwrap_or(usize::MAX);
    let mut budget = start_budget(&settings, full_session, &metrics);
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut running: Vec<Session> = Vec::new();
    loop {
        // Block for work when idle; otherwise take what has arrived and go on stepping.
        let Some(incoming) = gather(&jobs, running.is_empty() && pending.is_empty()) else { return };
        for job in incoming {
            let Job::Text(job) = job else { continue };
            match check(&engine, template.as_ref(), &settings, &job) {
                Ok((prompt, max_tokens)) => pending.push_back(Pending { job, prompt, max_tokens }),
                Err(e) => {
                    refused(&metrics);
                    let _ = job.events.send(TextEvent::Failed(e));
                }
            }
        }
        drop_departed(&mut pending, |p| p.job.events.is_closed(), &metrics);
        admit_pending(&engine, &settings, &mut budget, &mut pending, &mut running, &metrics);
        if running.is_empty() {
            if !pending.is_empty() {
                wait_for_change();
            }
            continue;
        }
        step(&mut engine, &settings, &mut running, &metrics);
        retire(
            &mut running,
            |s| SessionState { finished: s.finished, gone: s.job.events.is_closed(), bytes: s.bytes },
            &mut budget,
            &metrics,
        );
    }
}

/// Tokenizes a job's prompt and checks it fits a session's context; also returns its token limit.
fn check(
    engine: &TextEngine,
    template: Option<&ChatTemplate>,
    settings: &LoopSettings,
    job: &TextJob,
) -> Result<(Vec<u32>, usize), ApiError> {
    let tokenizer = engine.model().tokenizer();
    let prompt = match &job.prompt {
        TextPrompt::Plain(text) => tokenizer.encode(text),
        TextPrompt::Chat(messages) => match template {
            Some(t) => t.encode(tokenizer, messages),
            None => return Err(ApiError::invalid("this model has no chat template (tokenizer.chat_template); use /v1/completions")),
        },
    }
    .map_err(|e| ApiError::invalid(e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty"));
    }
    let max_tokens = job.max_tokens.unwrap_or_else(|| DEFAULT_MAX_TOKENS.min(settings.n_ctx.saturating_sub(prompt.len())));
    let needed = prompt.len() + max_tokens.max(1);
    if needed > settings.n_ctx {
        return Err(ApiError::invalid(format!(
            "the prompt ({} tokens) plus max_tokens ({}) needs {needed} tokens of context; this server gives a session {}",
            prompt.len(),
            max_tokens,
            settings.n_ctx
        )));
    }
    Ok((prompt, max_tokens))
}

/// Starts queued sessions, in arrival order, while there are slots and memory.
fn admit_pending(
    engine: &TextEngine,
    settings: &LoopSettings,
    budget: &mut Budget,
    pending: &mut VecDeque<Pending>,
    running: &mut Vec<Session>,
    metrics: &Metrics,
) {
    while running.len() < settings.parallel {
        let Some(head) = pending.front() else { return };
        // The last sampled token is never fed back: prompt + max_tokens − 1 cells.
        let cells = session_cells((head.prompt.len() + head.max_tokens).saturating_sub(1), settings.n_ctx);
        let config_of = |layout: KvLayout| {
            engine.cache_config(cells, settings.k_type, settings.v_type).with_layout(layout).with_recent(settings.recent.min(cells))
        };
        let bytes_of = |layout: &KvLayout| config_of(layout.clone()).bytes().ok();
        let decision = admit(&settings.layouts.configured, &settings.layouts.fallbacks, settings.adapt, budget, bytes_of);
        let (layout, bytes) = match decision {
            Admission::Wait => return,
            Admission::Never { smallest } => {
                let p = pending.pop_front().expect("head exists");
                refused(metrics);
                let _ = p.job.events.send(TextEvent::Failed(ApiError::over_budget(smallest, budget.total)));
                continue;
            }
            Admission::Start { layout, bytes } => (layout, bytes),
        };
        let Pending { job, prompt, max_tokens } = pending.pop_front().expect("head exists");
        metrics.waiting.fetch_sub(1, Ordering::Relaxed);
        let made = (|| -> ccsm::Result<_> { Ok((engine.new_cache_with(config_of(layout))?, Sampler::new(job.sampler)?)) })();
        let (cache, sampler) = match made {
            Ok(parts) => parts,
            Err(e) => {
                metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                let _ = job.events.send(TextEvent::Failed(ApiError::invalid(format!("cannot start the session: {e}"))));
                continue;
            }
        };
        started(budget, bytes, prompt.len(), metrics);
        let _ = job.events.send(TextEvent::Accepted);
        running.push(Session {
            job,
            cache,
            bytes,
            prompt_len: prompt.len(),
            max_tokens,
            unfed: prompt.into(),
            next: None,
            sampler,
            generated: Vec::new(),
            sent: 0,
            first_token_at: None,
            finished: false,
        });
    }
}

/// One graph over every running session; then each samples and sends what it has.
fn step(engine: &mut TextEngine, settings: &LoopSettings, running: &mut [Session], metrics: &Metrics) {
    // Decoding sessions take one row each; prefilling ones share what is left of the step's rows.
    let decoding = running.iter().filter(|s| s.unfed.is_empty()).count();
    let mut rows_left = settings.n_batch.saturating_sub(decoding).max(1);
    let mut inputs: Vec<(usize, Vec<u32>, bool)> = Vec::new();
    for (i, s) in running.iter_mut().enumerate() {
        if s.job.events.is_closed() {
            continue;
        }
        if let Some(token) = s.next {
            inputs.push((i, vec![token], true));
        } else if !s.unfed.is_empty() && rows_left > 0 {
            let n = s.unfed.len().min(rows_left);
            rows_left -= n;
            let chunk: Vec<u32> = s.unfed.drain(..n).collect();
            let last = s.unfed.is_empty();
            inputs.push((i, chunk, last));
        }
    }
    if inputs.is_empty() {
        return;
    }
    let result = {
        let mut sequences: Vec<SequenceStep> = Vec::with_capacity(inputs.len());
        let mut rest: &mut [Session] = running;
        let mut offset = 0;
        for (i, tokens, _) in &inputs {
            let (_, tail) = rest.split_at_mut(i - offset);
            let (session, after) = tail.split_first_mut().expect("index in range");
            sequences.push(SequenceStep { cache: &mut session.cache, tokens, logits: Logits::Last });
            rest = after;
            offset = i + 1;
        }
        engine.step(&mut sequences, false)
    };
    metrics.steps.fetch_add(1, Ordering::Relaxed);
    let logits = match result {
        Ok(l) => l,
        Err(e) => {
            // A step failing is the engine's fault, not a request's: every session in it ends with the error.
            tracing::error!("engine step failed: {e}");
            for (i, _, _) in &inputs {
                let s = &mut running[*i];
                let _ = s.job.events.send(TextEvent::Failed(ApiError::internal(format!("generation failed: {e}"))));
                metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                s.finished = true;
            }
            return;
        }
    };
    for ((i, _, sample), logits) in inputs.into_iter().zip(logits) {
        let s = &mut running[i];
        s.next = None;
        if !sample {
            continue;
        }
        match s.sampler.sample(&logits) {
            Ok(token) => emit(engine, s, token, metrics),
            Err(e) => {
                let _ = s.job.events.send(TextEvent::Failed(ApiError::internal(e.to_string())));
                metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                s.finished = true;
            }
        }
    }
}

/// Takes a sampled token: ends the session (end of text, a stop sequence, the limit) or sends the
/// text that can no longer become part of a stop sequence, and queues the token to feed.
fn emit(engine: &TextEngine, s: &mut Session, token: u32, metrics: &Metrics) {
    let tokenizer = engine.model().tokenizer();
    if s.first_token_at.is_none() {
        s.first_token_at = Some(Instant::now());
        metrics.time_to_first_token.observe(s.job.arrived.elapsed().as_secs_f64());
    }
    let finish = |s: &mut Session, finish: Finish, text_end: Option<usize>, metrics: &Metrics| {
        let text = tokenizer.decode(&s.generated).unwrap_or_default();
        let sent = floor_char_boundary(&text, s.sent);
        let end = floor_char_boundary(&text, text_end.unwrap_or(text.len())).max(sent);
        if end > sent {
            let _ = s.job.events.send(TextEvent::Delta(text[sent..end].to_owned()));
        }
        let _ = s.job.events.send(TextEvent::Done { finish, usage: Usage::new(s.prompt_len, s.generated.len()) });
        metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
        s.finished = true;
    };
    if tokenizer.is_end(token) && !s.job.ignore_eos {
        return finish(s, Finish::Stop, None, metrics);
    }
    s.generated.push(token);
    metrics.tokens_generated.fetch_add(1, Ordering::Relaxed);
    let text = tokenizer.decode(&s.generated).unwrap_or_default();
    // What was sent is a prefix of the text (undecided characters were held back); should decoding ever
    // disagree, start from the nearest character boundary rather than panic.
    let sent = floor_char_boundary(&text, s.sent);
    if let Some(at) = s.job.stop.iter().filter_map(|stop| text[sent..].find(stop.as_str()).map(|i| i + sent)).min() {
        return finish(s, Finish::Stop, Some(at), metrics);
    }
    if s.generated.len() >= s.max_tokens {
        return finish(s, Finish::Length, None, metrics);
    }
    // Hold back a tail that may still become a stop sequence, and unfinished characters.
    let mut safe = text.len();
    for stop in &s.job.stop {
        for k in (1..stop.len()).rev() {
            if stop.is_char_boundary(k) && text.ends_with(&stop[..k]) {
                safe = safe.min(text.len() - k);
                break;
            }
        }
    }
    while text[..safe].ends_with('\u{FFFD}') {
        safe -= '\u{FFFD}'.len_utf8();
    }
    if safe > sent && text.is_char_boundary(safe) {
        let _ = s.job.events.send(TextEvent::Delta(text[sent..safe].to_owned()));
        s.sent = safe;
    }
    s.next = Some(token);
}

/// The largest character boundary of `text` at or before `at`.
fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}
