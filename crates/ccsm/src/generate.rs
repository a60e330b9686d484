//! Text generation with a Llama model: prompt, then one token at a time until EOS or the limit.

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::ggml_model::GGMLModel;
use crate::model::{CacheReport, Logits, Model};
use crate::sampling::Sampler;
use crate::tokenizer::Tokenizer;
use crate::CacheType;

/// Time spent in the model (tokenization and sampling excluded).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct GenerationTimings {
    /// Tokens of the prompt, evaluated in one step.
    pub prompt_tokens: usize,
    /// Wall-clock seconds of the prompt's evaluation.
    pub prompt_seconds: f64,
    /// Single-token steps run (the last sampled token is never fed back).
    pub decode_steps: usize,
    /// Wall-clock seconds of all single-token steps together.
    pub decode_seconds: f64,
}

impl GenerationTimings {
    /// Prompt throughput in tokens per second (0 when nothing was timed).
    pub fn prompt_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_seconds)
    }

    /// Decode throughput in steps (tokens) per second (0 when nothing was timed).
    pub fn decode_tokens_per_second(&self) -> f64 {
        rate(self.decode_steps, self.decode_seconds)
    }
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A text model sampled an end-of-text token.
    EndOfText,
    /// CSM produced an all-zero frame.
    EndOfSpeech,
    /// The token or frame limit was reached.
    Limit,
    /// The caller asked to stop (Ctrl-C).
    Interrupted,
}

/// What `generate` produced.
pub struct Generation {
    /// The new tokens, prompt and end-of-text token excluded.
    pub tokens: Vec<u32>,
    /// Why generation ended.
    pub stop: StopReason,
    /// Time spent evaluating the prompt and the decode steps.
    pub timings: GenerationTimings,
    /// The live cache conversion, when one ran.
    pub conversion: Option<Vec<CacheReport>>,
}

/// Convert the cache to other types once `after` tokens have been generated.
#[derive(Clone, Copy, Debug)]
pub struct LiveQuantize {
    /// Generated tokens after which the cache is converted (0: before the first is sampled).
    pub after: usize,
    /// The K type to convert to.
    pub k_type: CacheType,
    /// The V type to convert to.
    pub v_type: CacheType,
}

/// Generates up to `max_new` tokens after `prompt` (which must be non-empty), from the model's
/// current (usually empty) cache, converting the cache live when `live` says so. `on_token` sees each new token (with the tokenizer, to show it);
/// returning false stops early.
pub fn generate(
    model: &mut GGMLModel,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    live: Option<LiveQuantize>,
    mut on_token: impl FnMut(u32, &Tokenizer) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::EmptyInput("the prompt tokenized to no tokens"));
    }
    let capacity = model.cache().capacity();
    let needed = model.cache().len() + prompt.len() + max_new.saturating_sub(1);
    if needed > capacity && !model.evicts() {
        return Err(Error::Input(format!(
            "prompt ({} tokens) + n-predict ({max_new}) needs {needed} cache cells, but the context holds {capacity}; raise -c/--ctx-size",
            prompt.len()
        )));
    }
    let mut timings = GenerationTimings { prompt_tokens: prompt.len(), ..Default::default() };
    let started = Instant::now();
    let mut logits = model.eval(prompt, Logits::Last)?;
    timings.prompt_seconds = started.elapsed().as_secs_f64();

    let mut tokens = Vec::new();
    let mut stop = StopReason::Limit;
    let mut conversion = None;
    while tokens.len() < max_new {
        if let Some(l) = live.filter(|l| l.after == tokens.len() && conversion.is_none()) {
            conversion = Some(model.quantize_kv_cache(l.k_type, l.v_type)?);
        }
        let next = sampler.sample(&logits)?;
        if model.model().tokenizer().is_end(next) {
            stop = StopReason::EndOfText;
            break;
        }
        tokens.push(next);
        if !on_token(next, model.model().tokenizer()) {
            stop = StopReason::Interrupted;
            break;
        }
        if tokens.len() == max_new {
            break;
        }
        let step = Instant::now();
        logits = model.eval(&[next], Logits::Last)?;
        timings.decode_seconds += step.elapsed().as_secs_f64();
        timings.decode_steps += 1;
    }
    Ok(Generation { tokens, stop, timings, conversion })
}
