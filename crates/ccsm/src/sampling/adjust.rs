//! What a request may do to the logits before sampling: OpenAI's `logit_bias`, `presence_penalty` and
//! `frequency_penalty`. The adjusted logits are the distribution sampling and reported logprobs start from.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// The largest penalty either way (OpenAI's range).
pub const MAX_PENALTY: f32 = 2.0;
/// The largest bias either way (OpenAI's range).
pub const MAX_BIAS: f32 = 100.0;

/// A request's changes to the logits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogitAdjustConfig {
    /// (token id, bias added to its logit), the bias within ±`MAX_BIAS`.
    pub logit_bias: Vec<(u32, f32)>,
    /// Subtracted once from the logit of every token generated so far, within ±`MAX_PENALTY`.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated so far, within ±`MAX_PENALTY`.
    pub frequency_penalty: f32,
}

impl LogitAdjustConfig {
    /// Checks the ranges, and that every biased token is in a vocabulary of `vocab` tokens.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        for (name, value) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(value.is_finite() && value.abs() <= MAX_PENALTY) {
                return Err(Error::Input(format!("{name} {value} must be within -{MAX_PENALTY}..={MAX_PENALTY}")));
            }
        }
        for &(token, bias) in &self.logit_bias {
            if token as usize >= vocab {
                return Err(Error::Input(format!(
                    "logit_bias names token {token}, outside the model's vocabulary of {vocab} tokens (ids 0..{vocab})"
                )));
            }
            if !(bias.is_finite() && bias.abs() <= MAX_BIAS) {
                return Err(Error::Input(format!("logit_bias for token {token} is {bias}; it must be within -{MAX_BIAS}..={MAX_BIAS}")));
            }
        }
        Ok(())
    }

    /// Whether it changes nothing.
    pub fn is_identity(&self) -> bool {
        self.presence_penalty == 0.0 && self.frequency_penalty == 0.0 && self.logit_bias.iter().all(|&(_, b)| b == 0.0)
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
    pub fn new(config: LogitAdjustConfig, vocab: usize) -> Result<Self> {
        config.validate(vocab)?;
        Ok(LogitAdjust { config, counts: HashMap::new() })
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
        let config = LogitAdjustConfig { logit_bias: vec![(3, 5.0), (0, -100.0)], presence_penalty: 0.5, frequency_penalty: 0.25 };
        let mut adjust = LogitAdjust::new(config, 4).unwrap();
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
        let refuse = |c: LogitAdjustConfig| LogitAdjust::new(c, 10).unwrap_err().to_string();
        assert!(refuse(LogitAdjustConfig { presence_penalty: 2.5, ..Default::default() }).contains("presence_penalty"));
        assert!(refuse(LogitAdjustConfig { frequency_penalty: f32::NAN, ..Default::default() }).contains("frequency_penalty"));
        assert!(refuse(LogitAdjustConfig { logit_bias: vec![(10, 1.0)], ..Default::default() }).contains("vocabulary"));
        assert!(refuse(LogitAdjustConfig { logit_bias: vec![(1, 101.0)], ..Default::default() }).contains("logit_bias"));
        assert!(
            LogitAdjust::new(LogitAdjustConfig { logit_bias: vec![(9, -100.0)], presence_penalty: -2.0, ..Default::default() }, 10).is_ok()
        );
    }
}
