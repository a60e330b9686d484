//! What a request may do to the logits before sampling: OpenAI's `logit_bias`, `presence_penalty` and
//! `frequency_penalty`. The adjusted logits are the distribution sampling and reported logprobs start from.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};

/// The largest penalty either way (OpenAI's range).
pub const MAX_PENALTY: f32 = 2.0;
/// The largest bias either way (OpenAI's range).
pub const MAX_BIAS: f32 = 100.0;
/// Most tokens one request may bias (OpenAI's limit).
pub const MAX_BIASED_TOKENS: usize = 300;

/// A request's changes to the logits, checked: a value of this type is within every limit, so nothing
/// downstream checks it again.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogitAdjustConfig {
    /// (token id, bias added to its logit): distinct ids in the vocabulary, biases within ±`MAX_BIAS`.
    logit_bias: Vec<(u32, f32)>,
    /// Subtracted once from the logit of every token generated so far, within ±`MAX_PENALTY`.
    presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated so far, within ±`MAX_PENALTY`.
    frequency_penalty: f32,
}

impl LogitAdjustConfig {
    /// Checks the ranges, that at most `MAX_BIASED_TOKENS` tokens are biased, each once (a repeated id
    /// would add its bias again, past the range), and that each is in a vocabulary of `vocab` tokens.
    pub fn new(logit_bias: Vec<(u32, f32)>, presence_penalty: f32, frequency_penalty: f32, vocab: usize) -> Result<Self> {
        for (name, value) in [("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)] {
            if !(value.is_finite() && value.abs() <= MAX_PENALTY) {
                return Err(Error::Input(format!("{name} {value} must be within -{MAX_PENALTY}..={MAX_PENALTY}")));
            }
        }
        if logit_bias.len() > MAX_BIASED_TOKENS {
            return Err(Error::Input(format!("logit_bias has {} entries; at most {MAX_BIASED_TOKENS}", logit_bias.len())));
        }
        let mut seen = HashSet::with_capacity(logit_bias.len());
        for &(token, bias) in &logit_bias {
            if token as usize >= vocab {
                return Err(Error::Input(format!(
                    "logit_bias names token {token}, outside the model's vocabulary of {vocab} tokens (ids 0..{vocab})"
                )));
            }
            if !seen.insert(token) {
                return Err(Error::Input(format!("logit_bias names token {token} more than once")));
            }
            if !(bias.is_finite() && bias.abs() <= MAX_BIAS) {
                return Err(Error::Input(format!("logit_bias for token {token} is {bias}; it must be within -{MAX_BIAS}..={MAX_BIAS}")));
            }
        }
        Ok(LogitAdjustConfig { logit_bias, presence_penalty, frequency_penalty })
    }

    /// (token id, bias) pairs added to the logits, distinct ids.
    pub fn logit_bias(&self) -> &[(u32, f32)] {
        &self.logit_bias
    }

    /// Subtracted once from the logit of every token already generated.
    pub fn presence_penalty(&self) -> f32 {
        self.presence_penalty
    }

    /// Subtracted from a token's logit once per time it was generated.
    pub fn frequency_penalty(&self) -> f32 {
        self.frequency_penalty
    }
}

/// A request's adjustment with what it has generated so far.
#[derive(Clone, Debug)]
pub struct LogitAdjust {
    config: LogitAdjustConfig,
    /// Times each token has been generated.
    counts: HashMap<u32, u32>,
}

impl LogitAdjust {
    /// The adjustment `config` before any token is generated (no penalties yet).
    pub fn new(config: LogitAdjustConfig) -> Self {
        LogitAdjust { config, counts: HashMap::new() }
    }

    /// OpenAI's definition: `logit[j] += bias[j] − count[j]·frequency_penalty − (count[j] > 0)·presence_penalty`,
    /// counting the tokens generated so far (not the prompt's).
    pub fn apply(&self, logits: &mut [f32]) {
        for &(token, bias) in &self.config.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        let c = &self.config;
        if c.presence_penalty == 0.0 && c.frequency_penalty == 0.0 {
            return;
        }
        for (&token, &count) in &self.counts {
            if let Some(l) = logits.get_mut(token as usize) {
                *l -= count as f32 * c.frequency_penalty + c.presence_penalty;
            }
        }
    }

    /// Counts a generated token.
    pub fn record(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_follow_openais_formula_and_bias_adds() {
        let config = LogitAdjustConfig::new(vec![(3, 5.0), (0, -100.0)], 0.5, 0.25, 4).unwrap();
        let mut adjust = LogitAdjust::new(config);
        for token in [1, 1, 1, 2] {
            adjust.record(token);
        }
        let mut logits = vec![1.0f32; 4];
        adjust.apply(&mut logits);
        // Token 1 three times: 1 − 3·0.25 − 0.5; token 2 once: 1 − 0.25 − 0.5.
        assert_eq!(logits, vec![-99.0, -0.25, 0.25, 6.0]);
    }

    #[test]
    fn out_of_range_settings_name_their_field() {
        let refuse =
            |bias: Vec<(u32, f32)>, presence, frequency| LogitAdjustConfig::new(bias, presence, frequency, 10).unwrap_err().to_string();
        assert!(refuse(vec![], 2.5, 0.0).contains("presence_penalty"));
        assert!(refuse(vec![], 0.0, f32::NAN).contains("frequency_penalty"));
        assert!(refuse(vec![(10, 1.0)], 0.0, 0.0).contains("vocabulary"));
        assert!(refuse(vec![(1, 101.0)], 0.0, 0.0).contains("logit_bias"));
        assert!(LogitAdjustConfig::new(vec![(9, -100.0)], -2.0, 0.0, 10).is_ok());
    }

    #[test]
    fn a_token_is_biased_once_and_only_so_many_are() {
        // Twice +100 would be +200, past the range.
        let twice = LogitAdjustConfig::new(vec![(1, 100.0), (1, 100.0)], 0.0, 0.0, 10).unwrap_err().to_string();
        assert!(twice.contains("token 1 more than once"), "{twice}");
        let all = |n: u32| (0..n).map(|t| (t, 1.0)).collect::<Vec<_>>();
        assert!(LogitAdjustConfig::new(all(MAX_BIASED_TOKENS as u32), 0.0, 0.0, 1000).is_ok());
        let many = LogitAdjustConfig::new(all(MAX_BIASED_TOKENS as u32 + 1), 0.0, 0.0, 1000).unwrap_err().to_string();
        assert!(many.contains("at most 300"), "{many}");
    }
}
