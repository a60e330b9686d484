//! What the HTTP side hands the engine thread (a job with a channel for its output), what comes back,
//! and the memory budget every session's caches come out of.

use std::time::Instant;

use ccsm::csm::Segment;
use ccsm::sampling::SamplerConfig;
use tokio::sync::mpsc::UnboundedSender;

use std::sync::atomic::Ordering;

use ccsm::memory::Budget;

use crate::api::{ApiError, Usage};
use crate::metrics::Metrics;
use crate::requests::TextOptions;

pub struct TextJob {
    /// The prompt's tokens (a client's text, tokenized on the HTTP side as text: spellings of control
    /// tokens stay text).
    pub prompt: Vec<u32>,
    /// Length, sampling, adjustment, stops, logprobs (`max_tokens` `None`: up to `DEFAULT_MAX_TOKENS`,
    /// as far as the session's context allows).
    pub options: TextOptions,
    pub events: UnboundedSender<TextEvent>,
    pub arrived: Instant,
}

impl TextJob {
    /// Whether the prompt's own tokens are scored (`echo` with `logprobs`).
    pub fn scores_prompt(&self) -> bool {
        self.options.echo && self.options.logprobs.is_some()
    }
}

/// A token as an answer shows it, with its logprob and the most likely alternatives when asked.
#[derive(Clone, Debug)]
pub struct ShownToken {
    /// What it stands for: a piece of UTF-8 text (perhaps part of a character), or a control token's spelling.
    pub bytes: Vec<u8>,
    /// A control token: the text leaves it out.
    pub special: bool,
    /// `None` for a prompt's first token (nothing before it to predict it).
    pub logprob: Option<f32>,
    pub top: Vec<(Vec<u8>, f32)>,
}

/// Why a generation ended, as OpenAI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End of text, or a stop sequence.
    Stop,
    /// `max_tokens` (or the audio limit) reached.
    Length,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

pub enum TextEvent {
    /// Admitted: a cache was given and the prompt will run.
    Accepted,
    /// The prompt's tokens with their logprobs (`echo` with `logprobs`), once it has run.
    Prompt(Vec<ShownToken>),
    /// New text, and the tokens that begin in it (when logprobs are reported).
    Delta {
        text: String,
        tokens: Vec<ShownToken>,
    },
    Done {
        finish: Finish,
        usage: Usage,
    },
    Failed(ApiError),
}

pub struct SpeechJob {
    pub text: String,
    pub speaker: u32,
    pub context: Vec<Segment>,
    /// Recordings a request sent (`"audio": "data:audio/...;base64,..."`), by the index of their segment
    /// in `context`: the hearing thread encodes them into its frames.
    pub uploads: Vec<(usize, Vec<u8>)>,
    pub sampler: SamplerConfig,
    pub max_frames: usize,
    /// The conversation the turn continues and joins (see `conversations`).
    pub conversation: Option<String>,
    /// How many of `context`'s first segments are the voice's (a continued conversation has them already).
    pub voice_segments: usize,
    pub events: UnboundedSender<SpeechEvent>,
    pub arrived: Instant,
}

pub enum SpeechEvent {
    Accepted,
    /// One frame's samples (24 kHz mono for Mimi), as decoded.
    Audio(Vec<f32>),
    Done {
        usage: Usage,
    },
    Failed(ApiError),
}

pub enum Job {
    Text(TextJob),
    Speech(SpeechJob),
}

/// The jobs that have arrived: waits for one when `idle`, else takes what is there. `None` once the
/// HTTP side is gone and the loop is idle (time to stop).
pub fn gather(jobs: &std::sync::mpsc::Receiver<Job>, idle: bool) -> Option<Vec<Job>> {
    let mut incoming = Vec::new();
    if idle {
        incoming.push(jobs.recv().ok()?);
    }
    while let Ok(job) = jobs.try_recv() {
        incoming.push(job);
    }
    Some(incoming)
}

/// Takes a request refused before it ran (its error already sent) off the queue; the HTTP side counts
/// its outcome with every other 4xx.
pub fn refused(metrics: &Metrics) {
    metrics.waiting.fetch_sub(1, Ordering::Relaxed);
}

/// Counts a session that starts: its bytes come out of the budget, its prompt is counted.
pub fn started(budget: &mut Budget, bytes: usize, prompt_rows: usize, metrics: &Metrics) {
    budget.take(bytes);
    metrics.running.fetch_add(1, Ordering::Relaxed);
    metrics.prompt_tokens.fetch_add(prompt_rows as u64, Ordering::Relaxed);
}

/// Takes a queued request whose client left off the queue, counted as cancelled.
pub fn departed(metrics: &Metrics) {
    metrics.waiting.fetch_sub(1, Ordering::Relaxed);
    metrics.requests_cancelled.fetch_add(1, Ordering::Relaxed);
}

/// Drops the queued requests whose clients left (`gone`).
pub fn drop_departed<P>(pending: &mut std::collections::VecDeque<P>, gone: impl Fn(&P) -> bool, metrics: &Metrics) {
    pending.retain(|p| {
        let gone = gone(p);
        if gone {
            departed(metrics);
        }
        !gone
    });
}

/// What the loop knows of a running session: answered (done or failed), its client gone, its bytes.
pub struct SessionState {
    pub finished: bool,
    pub gone: bool,
    pub bytes: usize,
}

/// Ends finished and cancelled sessions: their bytes go back to the budget (whose `used` also counts
/// `prefix_bytes` of cached prefixes); returns them.
pub fn retire<S>(
    running: &mut Vec<S>,
    state: impl Fn(&S) -> SessionState,
    budget: &mut Budget,
    prefix_bytes: usize,
    metrics: &Metrics,
) -> Vec<S> {
    let mut ended = Vec::new();
    for s in std::mem::take(running) {
        let SessionState { finished, gone, bytes } = state(&s);
        if finished || gone {
            budget.give_back(bytes);
            if !finished {
                metrics.requests_cancelled.fetch_add(1, Ordering::Relaxed);
            }
            metrics.running.fetch_sub(1, Ordering::Relaxed);
            ended.push(s);
        } else {
            running.push(s);
        }
    }
    publish_kv_bytes(budget, prefix_bytes, metrics);
    ended
}

/// Publishes the sessions' share of the budget's use (cached prefixes have their own gauge).
pub fn publish_kv_bytes(budget: &Budget, prefix_bytes: usize, metrics: &Metrics) {
    metrics.kv_bytes.store(budget.used.saturating_sub(prefix_bytes), Ordering::Relaxed);
}

/// When nothing runs but the queue's head cannot start: only an arrival or a cancellation changes
/// that, so wait a little instead of spinning.
pub fn wait_for_change() {
    std::thread::sleep(std::time::Duration::from_millis(5));
}

/// Cells a session's cache gets for `needed` cells: rounded up to the attention window's granularity
/// (at most `n_ctx`). The attention kernel splits a step's cells by the window, so with the same window
/// a session's sums, and so its output, are the single-session path's bit for bit.
pub fn session_cells(needed: usize, n_ctx: usize) -> usize {
    needed.max(1).div_ceil(ccsm::kv_cache::DECODE_WINDOW).saturating_mul(ccsm::kv_cache::DECODE_WINDOW).min(n_ctx)
}
