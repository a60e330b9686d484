//! The text engine thread: continuous batching. Each step runs one graph over every running session
//! (prompt chunks of the sessions still prefilling, one token of each decoding session), so the weights
//! are read once per step for all of them; sessions join and leave between steps.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use ccsm::engine::{SequenceStep, TextEngine};
use ccsm::kv_cache::{KvCache, KvLayout};
use ccsm::memory::{admit, Admission, Budget, SessionLayouts};
use ccsm::sampling::{Logprobs, TokenPicker};
use ccsm::tokenizer::Tokenizer;
use ccsm::{CacheType, Logits};

use crate::api::{ApiError, Usage};
use crate::jobs::{
    drop_departed, gather, publish_kv_bytes, refused, retire, session_cells, started, wait_for_change, Finish, Job, SessionState,
    ShownToken, TextEvent, TextJob,
};
use crate::metrics::Metrics;
use crate::prefixes::{PrefixOptions, Prefixes};

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
    /// Text sessions' per-layer layouts and recent window (speech sessions take `k_type`/`v_type`).
    pub layouts: SessionLayouts,
    /// Most rows one step runs (prompts are fed in chunks within it).
    pub n_batch: usize,
    /// Bytes all sessions' caches share, cached prefixes included (`None`: `parallel` sessions of a
    /// full context, and one more when prefixes are cached).
    pub budget_bytes: Option<usize>,
    /// Cached prefixes: on or off, their type, their folder.
    pub prefixes: PrefixOptions,
    /// How long a speech conversation is kept after its last turn.
    pub conversation_ttl: std::time::Duration,
}

/// Logs and publishes the budget the loop runs with.
pub(crate) fn start_budget(settings: &LoopSettings, full_session: usize, metrics: &Metrics) -> Budget {
    // Without a budget: `parallel` sessions of a full context, and one more for cached prefixes (so a
    // full-context session can start from a prefix of its own length rather than evict it first); on a
    // device no more than its share of the memory left after the weights.
    let sessions = settings.parallel + usize::from(settings.prefixes.enabled);
    let wanted = full_session.saturating_mul(sessions);
    let total = match (settings.budget_bytes, metrics.device_free_after_weights()) {
        (Some(bytes), Some(free)) if bytes > free => {
            eprintln!(
                "warning: a KV budget of {:.1} MiB is more than the device has free ({:.1} MiB): sessions may fail to allocate",
                bytes as f64 / 1048576.0,
                free as f64 / 1048576.0
            );
            bytes
        }
        (Some(bytes), _) => bytes,
        (None, Some(free)) => ccsm::device_cache_budget(wanted, free),
        (None, None) => wanted,
    };
    metrics.kv_budget_bytes.store(total, Ordering::Relaxed);
    eprintln!(
        "model loaded: {} sessions at once, {} cells each, KV budget {:.2} MiB ({}/{} caches)",
        settings.parallel,
        settings.n_ctx,
        total as f64 / (1 << 20) as f64,
        settings.k_type,
        settings.v_type
    );
    Budget::new(total)
}

/// Tokens a request without `max_tokens` may generate at most (fewer when its context is shorter).
const DEFAULT_MAX_TOKENS: usize = 256;

/// Most prompt rows a step runs for a session whose prompt is scored: each row's logits are kept
/// (rows × vocabulary floats), so its chunks stay small.
const SCORED_PROMPT_ROWS: usize = 32;

/// A request that has been checked and tokenized, waiting for a cache.
struct Pending {
    job: TextJob,
    prompt: Vec<u32>,
    /// The prompt's prefix-cache keys (none when it is not looked up: no cache, or a scored prompt,
    /// which needs every row's logits).
    keys: Vec<u64>,
    max_tokens: usize,
}

/// A running request.
struct Session {
    job: TextJob,
    cache: KvCache,
    bytes: usize,
    prompt_len: usize,
    max_tokens: usize,
    /// The prompt (its tokens are scored when `echo` asks for logprobs).
    prompt: Vec<u32>,
    /// Prompt tokens not yet fed.
    unfed: VecDeque<u32>,
    /// The prompt's tokens scored so far (the first has no logprob).
    scored: Vec<ShownToken>,
    /// The sampled token to feed next (decoding).
    next: Option<u32>,
    picker: TokenPicker,
    generated: Vec<u32>,
    /// Bytes of the generated text already sent.
    sent: usize,
    /// Generated tokens whose logprobs are not sent yet, with the byte of the text where each begins.
    unsent: Vec<(usize, ShownToken)>,
    /// Bytes of text the generated tokens stand for.
    text_bytes: usize,
    first_token_at: Option<Instant>,
    /// Done (or failed) and answered.
    finished: bool,
    /// Finished with an answer (its rows are worth caching).
    answered: bool,
    /// Started from a cached prefix.
    warm: bool,
    /// Its `Done`, sent once it is retired.
    done: Option<TextEvent>,
}

/// Runs the loop; `ready` is called once the prefix cache is set up (loaded from disk).
pub fn run(mut engine: TextEngine, settings: LoopSettings, jobs: Receiver<Job>, metrics: Arc<Metrics>, ready: impl FnOnce()) {
    let full_config = engine
        .cache_config(settings.n_ctx, settings.k_type, settings.v_type)
        .with_layout(settings.layouts.configured.clone())
        .with_recent(settings.layouts.recent.min(settings.n_ctx));
    let full_session = full_config.bytes().unwrap_or(usize::MAX);
    let mut budget = start_budget(&settings, full_session, &metrics);
    let mut prefixes = Prefixes::start(&settings.prefixes, &full_config, &mut budget, &metrics);
    ready();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut running: Vec<Session> = Vec::new();
    loop {
        // Block for work when idle; otherwise take what has arrived and go on stepping.
        let Some(incoming) = gather(&jobs, running.is_empty() && pending.is_empty()) else { return };
        for job in incoming {
            let Job::Text(mut job) = job else { continue };
            match check(&settings, &job) {
                Ok(max_tokens) => {
                    let prompt = std::mem::take(&mut job.prompt);
                    let looked_up = prefixes.is_some() && !job.scores_prompt();
                    let keys = if looked_up { ccsm::prefix_cache::token_keys(&prompt) } else { Vec::new() };
                    pending.push_back(Pending { prompt, keys, job, max_tokens })
                }
                Err(e) => {
                    refused(&metrics);
                    let _ = job.events.send(TextEvent::Failed(e));
                }
            }
        }
        drop_departed(&mut pending, |p| p.job.events.is_closed(), &metrics);
        admit_pending(&engine, &settings, &mut budget, &mut prefixes, &mut pending, &mut running, &metrics);
        if running.is_empty() {
            if !pending.is_empty() {
                wait_for_change();
            }
            continue;
        }
        step(&mut engine, &settings, &mut running, &metrics);
        // A finished session's `Done` goes out once its bytes are back in the budget, so a client
        // holding its whole answer sees the session gone from /metrics.
        // Its rows are cached before then too, so the client's next turn finds them.
        let done: Vec<_> = running.iter_mut().filter_map(|s| s.done.take().map(|e| (s.job.events.clone(), e))).collect();
        let held = prefixes.as_ref().map_or(0, Prefixes::bytes);
        let ended = retire(
            &mut running,
            |s| SessionState { finished: s.finished, gone: s.job.events.is_closed(), bytes: s.bytes },
            &mut budget,
            held,
            &metrics,
        );
        if let Some(p) = prefixes.as_mut() {
            for s in ended.iter().filter(|s| s.answered) {
                let rows: Vec<u32> = s.prompt.iter().chain(&s.generated).copied().collect();
                p.keep(&mut budget, &ccsm::prefix_cache::token_keys(&rows), &s.cache, &metrics);
            }
            publish_kv_bytes(&budget, p.bytes(), &metrics);
        }
        for (events, event) in done {
            let _ = events.send(event);
        }
    }
}

/// Checks a job's prompt fits a session's context (tokenized, and checked against the vocabulary, on the
/// HTTP side: the engine thread does no per-request work but the steps); returns its token limit.
fn check(settings: &LoopSettings, job: &TextJob) -> Result<usize, ApiError> {
    let prompt = &job.prompt;
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty"));
    }
    let max_tokens = job.options.max_tokens.unwrap_or_else(|| DEFAULT_MAX_TOKENS.min(settings.n_ctx.saturating_sub(prompt.len())));
    let needed = prompt.len() + max_tokens.max(1);
    if needed > settings.n_ctx {
        return Err(ApiError::invalid(format!(
            "the prompt ({} tokens) plus max_tokens ({}) needs {needed} tokens of context; this server gives a session {}",
            prompt.len(),
            max_tokens,
            settings.n_ctx
        )));
    }
    Ok(max_tokens)
}

/// Starts queued sessions, in arrival order, while there are slots and memory.
fn admit_pending(
    engine: &TextEngine,
    settings: &LoopSettings,
    budget: &mut Budget,
    prefixes: &mut Option<Prefixes>,
    pending: &mut VecDeque<Pending>,
    running: &mut Vec<Session>,
    metrics: &Metrics,
) {
    while running.len() < settings.parallel {
        let Some(head) = pending.front() else { return };
        // The last sampled token is never fed back: prompt + max_tokens − 1 cells.
        let cells = session_cells(head.prompt.len() + head.max_tokens.saturating_sub(1), settings.n_ctx);
        let config_of = |layout: KvLayout| {
            engine.cache_config(cells, settings.k_type, settings.v_type).with_layout(layout).with_recent(settings.layouts.recent.min(cells))
        };
        let bytes_of = |layout: &KvLayout| config_of(layout.clone()).bytes().ok();
        // Sessions come first: cached prefixes make room before a session waits or is narrowed, all
        // but the one this session would start from while running sessions can still free memory.
        let hit = match (prefixes.as_mut(), bytes_of(&settings.layouts.configured)) {
            (Some(p), Some(bytes)) => p.make_room_for(budget, bytes, &head.keys, !running.is_empty(), metrics),
            _ => None,
        };
        let decision = admit(&settings.layouts.configured, &settings.layouts.fallbacks, settings.adapt, budget, bytes_of);
        if let (Some(p), false) = (prefixes.as_mut(), matches!(decision, Admission::Start { .. })) {
            p.release(hit);
        }
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
        let Pending { job, prompt, max_tokens, .. } = pending.pop_front().expect("head exists");
        metrics.waiting.fetch_sub(1, Ordering::Relaxed);
        let o = &job.options;
        let made = (|| -> ccsm::Result<_> {
            Ok((engine.new_cache_with(config_of(layout))?, TokenPicker::new(o.sampler, o.adjust.clone(), o.logprobs)?))
        })();
        let (mut cache, picker) = match made {
            Ok(parts) => parts,
            Err(e) => {
                if let Some(p) = prefixes.as_mut() {
                    p.release(hit);
                }
                // A 400: the HTTP side counts it.
                let _ = job.events.send(TextEvent::Failed(ApiError::invalid(format!("cannot start the session: {e}"))));
                continue;
            }
        };
        let restore = |c: &mut ccsm::prefix_cache::PrefixCache, hit| c.restore(hit, &mut cache).inspect_err(|_| cache.clear());
        let reused = prefixes.as_mut().map_or(0, |p| p.start_session(hit, restore, metrics));
        started(budget, bytes, prompt.len() - reused, metrics);
        let _ = job.events.send(TextEvent::Accepted);
        running.push(Session {
            job,
            cache,
            bytes,
            prompt_len: prompt.len(),
            max_tokens,
            unfed: prompt[reused..].iter().copied().collect(),
            warm: reused > 0,
            answered: false,
            prompt,
            scored: Vec::new(),
            next: None,
            picker,
            generated: Vec::new(),
            sent: 0,
            unsent: Vec::new(),
            text_bytes: 0,
            first_token_at: None,
            finished: false,
            done: None,
        });
    }
}

/// One session's rows in a step: its tokens, which logits it wants, and whether the last row's are
/// sampled from (a decode step or the prompt's last chunk).
struct Input {
    session: usize,
    tokens: Vec<u32>,
    logits: Logits,
    sample: bool,
}

/// One graph over every running session; then each samples and sends what it has.
fn step(engine: &mut TextEngine, settings: &LoopSettings, running: &mut [Session], metrics: &Metrics) {
    // Decoding sessions take one row each; prefilling ones share what is left of the step's rows.
    let decoding = running.iter().filter(|s| s.unfed.is_empty()).count();
    let mut rows_left = settings.n_batch.saturating_sub(decoding).max(1);
    let mut inputs: Vec<Input> = Vec::new();
    for (i, s) in running.iter_mut().enumerate() {
        if s.job.events.is_closed() {
            continue;
        }
        if let Some(token) = s.next {
            inputs.push(Input { session: i, tokens: vec![token], logits: Logits::Last, sample: true });
        } else if !s.unfed.is_empty() && rows_left > 0 {
            let scored = s.job.scores_prompt();
            let n = s.unfed.len().min(rows_left).min(if scored { SCORED_PROMPT_ROWS } else { usize::MAX });
            rows_left -= n;
            let tokens: Vec<u32> = s.unfed.drain(..n).collect();
            let logits = if scored { Logits::All } else { Logits::Last };
            inputs.push(Input { session: i, tokens, logits, sample: s.unfed.is_empty() });
        }
    }
    if inputs.is_empty() {
        return;
    }
    let result = {
        let mut sequences: Vec<SequenceStep> = Vec::with_capacity(inputs.len());
        let mut rest: &mut [Session] = running;
        let mut offset = 0;
        for input in &inputs {
            let (_, tail) = rest.split_at_mut(input.session - offset);
            let (session, after) = tail.split_first_mut().expect("index in range");
            sequences.push(SequenceStep { cache: &mut session.cache, tokens: &input.tokens, logits: input.logits });
            rest = after;
            offset = input.session + 1;
        }
        engine.step(&mut sequences, false)
    };
    metrics.steps.fetch_add(1, Ordering::Relaxed);
    let logits = match result {
        Ok(l) => l,
        Err(e) => {
            // A step failing is the engine's fault, not a request's: every session in it ends with the error.
            tracing::error!("engine step failed: {e}");
            for input in &inputs {
                fail(&mut running[input.session], format!("generation failed: {e}"), metrics);
            }
            return;
        }
    };
    let vocab = engine.model().vocab_size();
    let tokenizer = engine.model().tokenizer();
    for (input, mut logits) in inputs.into_iter().zip(logits) {
        let s = &mut running[input.session];
        s.next = None;
        if input.logits == Logits::All {
            score_prompt(tokenizer, s, &mut logits, input.tokens.len(), vocab);
        }
        if !input.sample {
            continue;
        }
        if input.logits == Logits::All {
            // The scored prompt's last chunk: all its tokens are scored.
            let _ = s.job.events.send(TextEvent::Prompt(std::mem::take(&mut s.scored)));
        }
        if s.max_tokens == 0 {
            // Only the prompt's scores were asked for (echo with max_tokens 0).
            finish(tokenizer, s, Finish::Length, None, metrics);
            continue;
        }
        let last = logits.len() - vocab;
        match s.picker.pick(&mut logits[last..]) {
            Ok((token, logprobs)) => emit(tokenizer, s, token, logprobs, metrics),
            Err(e) => fail(s, e.to_string(), metrics),
        }
    }
}

/// Scores the prompt tokens a chunk's rows predict (row j of the chunk predicts the token after it);
/// the prompt's first token has nothing before it.
fn score_prompt(tokenizer: &Tokenizer, s: &mut Session, logits: &mut [f32], rows: usize, vocab: usize) {
    let first = s.prompt.len() - s.unfed.len() - rows;
    if first == 0 {
        s.scored.push(shown(tokenizer, s.prompt[0], None));
    }
    for (j, row) in logits.chunks_mut(vocab).enumerate().take(rows) {
        let Some(&token) = s.prompt.get(first + j + 1) else { break };
        let logprobs = s.picker.score(row, token);
        s.scored.push(shown(tokenizer, token, logprobs));
    }
}

/// A token as an answer shows it.
fn shown(tokenizer: &Tokenizer, token: u32, logprobs: Option<Logprobs>) -> ShownToken {
    let bytes = |t: u32| tokenizer.token_bytes(t).unwrap_or_default();
    ShownToken {
        bytes: bytes(token),
        special: tokenizer.is_special(token),
        logprob: logprobs.as_ref().map(|l| l.chosen.logprob),
        top: logprobs.map(|l| l.top.into_iter().map(|t| (bytes(t.token), t.logprob)).collect()).unwrap_or_default(),
    }
}

fn fail(s: &mut Session, message: String, metrics: &Metrics) {
    let _ = s.job.events.send(TextEvent::Failed(ApiError::internal(message)));
    metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
    s.finished = true;
}

/// Ends a session: sends the text not sent yet (up to `text_end`, where a stop sequence begins) with
/// the tokens that begin in it, then `Done`.
fn finish(tokenizer: &Tokenizer, s: &mut Session, finish: Finish, text_end: Option<usize>, metrics: &Metrics) {
    let text = tokenizer.decode(&s.generated).unwrap_or_default();
    let sent = floor_char_boundary(&text, s.sent);
    let end = floor_char_boundary(&text, text_end.unwrap_or(text.len())).max(sent);
    let tokens = take_unsent(&mut s.unsent, text_end.map(|_| end));
    if end > sent || !tokens.is_empty() {
        let _ = s.job.events.send(TextEvent::Delta { text: text[sent..end].to_owned(), tokens });
    }
    s.done = Some(TextEvent::Done { finish, usage: Usage::new(s.prompt_len, s.generated.len()) });
    metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
    s.finished = true;
    s.answered = true;
}

/// The unsent tokens that begin before `end` (all of them without an end).
fn take_unsent(unsent: &mut Vec<(usize, ShownToken)>, end: Option<usize>) -> Vec<ShownToken> {
    let n = match end {
        Some(end) => unsent.iter().take_while(|(start, t)| *start < end || (t.special && *start <= end)).count(),
        None => unsent.len(),
    };
    unsent.drain(..n).map(|(_, t)| t).collect()
}

/// Takes a sampled token: ends the session (end of text, a stop sequence, the limit) or sends the
/// text that can no longer become part of a stop sequence, and queues the token to feed.
fn emit(tokenizer: &Tokenizer, s: &mut Session, token: u32, logprobs: Option<Logprobs>, metrics: &Metrics) {
    if s.first_token_at.is_none() {
        s.first_token_at = Some(Instant::now());
        let seconds = s.job.arrived.elapsed().as_secs_f64();
        metrics.time_to_first_token.observe(seconds);
        metrics.time_to_first_token_by_prefix.observe(s.warm, seconds);
    }
    if tokenizer.is_end(token) && !s.job.options.ignore_eos {
        return finish(tokenizer, s, Finish::Stop, None, metrics);
    }
    s.generated.push(token);
    if s.picker.reports_logprobs() {
        let t = shown(tokenizer, token, logprobs);
        let start = s.text_bytes;
        s.text_bytes += if t.special { 0 } else { t.bytes.len() };
        s.unsent.push((start, t));
    }
    metrics.tokens_generated.fetch_add(1, Ordering::Relaxed);
    let text = tokenizer.decode(&s.generated).unwrap_or_default();
    // What was sent is a prefix of the text (undecided characters were held back); should decoding ever
    // disagree, start from the nearest character boundary rather than panic.
    let sent = floor_char_boundary(&text, s.sent);
    let stops = &s.job.options.stop;
    if let Some(at) = stops.iter().filter_map(|stop| text[sent..].find(stop.as_str()).map(|i| i + sent)).min() {
        return finish(tokenizer, s, Finish::Stop, Some(at), metrics);
    }
    if s.generated.len() >= s.max_tokens {
        return finish(tokenizer, s, Finish::Length, None, metrics);
    }
    // Hold back a tail that may still become a stop sequence, and unfinished characters.
    let mut safe = text.len();
    for stop in stops {
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
        let tokens = take_unsent(&mut s.unsent, Some(safe));
        let _ = s.job.events.send(TextEvent::Delta { text: text[sent..safe].to_owned(), tokens });
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
