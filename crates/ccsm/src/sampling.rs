//! Next-token sampling: greedy at temperature 0, otherwise temperature → top-k → top-p with a seeded
//! ChaCha20 generator (portable: the same seed gives the same draws on every platform). A server request
//! may also adjust the logits first (`adjust`: bias and penalties) and ask for logprobs (`logprobs`);
//! `TokenPicker` does all three in the order that defines what the logprobs mean.

mod adjust;
mod logprobs;

pub use adjust::{LogitAdjust, LogitAdjustConfig, MAX_BIAS, MAX_BIASED_TOKENS, MAX_PENALTY};
pub use logprobs::{log_sum_exp, logprobs, Logprobs, TokenLogprob};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Error, Result};

/// How a `Sampler` picks tokens; `validate` checks the ranges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (and any tied with the k-th); `None` keeps all.
    pub top_k: Option<usize>,
    /// Keep the smallest set whose probability reaches p; 1 keeps all.
    pub top_p: f32,
    /// Seed of the ChaCha20 generator: the same seed gives the same draws on every platform.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { temperature: 0.8, top_k: Some(40), top_p: 0.95, seed: 42 }
    }
}

impl SamplerConfig {
    /// CSM's defaults (Sesame's generator): temperature 0.9, top-k 50, no top-p, with `seed`.
    pub fn csm(seed: u64) -> Self {
        SamplerConfig { temperature: 0.9, top_k: Some(50), top_p: 1.0, seed }
    }

    /// Errors unless temperature is finite and ≥ 0, top-k is not 0 and top-p is in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Input(format!("temperature {} must be a finite number >= 0", self.temperature)));
        }
        if self.top_k == Some(0) {
            return Err(Error::Input("top-k 0 would keep no token: give at least 1 (or no limit to keep all)".into()));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!("top-p {} must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// A seeded sampler: draws tokens from logits under a `SamplerConfig`.
pub struct Sampler {
    config: SamplerConfig,
    rng: ChaCha20Rng,
}

/// Index of the largest value (the first on ties); NaNs never win.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best
}

impl Sampler {
    /// A sampler with its generator seeded from `config.seed`; errors if the config is out of range.
    pub fn new(config: SamplerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Sampler { config, rng: ChaCha20Rng::seed_from_u64(config.seed) })
    }

    /// The settings it samples with.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Picks a token id from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::EmptyInput("no logits to sample from"));
        }
        if self.config.temperature == 0.0 {
            return Ok(argmax(logits) as u32);
        }
        let probs = self.candidates(logits);
        let total: f64 = probs.iter().map(|&(_, p)| p).sum();
        let mut draw = self.rng.random::<f64>() * total;
        for &(id, p) in &probs {
            if draw < p {
                return Ok(id as u32);
            }
            draw -= p;
        }
        Ok(probs.last().map_or(0, |&(id, _)| id as u32))
    }

    /// Surviving (token, unnormalised probability) pairs, most likely first.
    fn candidates(&self, logits: &[f32]) -> Vec<(usize, f64)> {
        let c = &self.config;
        let mut order: Vec<usize> = (0..logits.len()).filter(|&i| logits[i].is_finite()).collect();
        if order.is_empty() {
            return vec![(argmax(logits), 1.0)];
        }
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = c.top_k.filter(|&k| k < order.len()) {
            let kth = logits[order[k - 1]];
            let keep = order.iter().take_while(|&&i| logits[i] >= kth).count();
            order.truncate(keep);
        }
        let max = logits[order[0]] as f64;
        let t = c.temperature as f64;
        let mut probs: Vec<(usize, f64)> = order.iter().map(|&i| (i, ((logits[i] as f64 - max) / t).exp())).collect();
        if c.top_p < 1.0 {
            let total: f64 = probs.iter().map(|&(_, p)| p).sum();
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&(_, p)| {
                    acc += p / total;
                    acc >= c.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        probs
    }
}

/// Most `top` log-probabilities a request may ask for at each position (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A request's way to its next tokens: the step's logits adjusted (`logit_bias`, penalties over what
/// it generated), then sampled. Reported logprobs are the log-softmax of the adjusted logits, before
/// temperature, top-k and top-p (what OpenAI reports): at temperature 1 without top-k/top-p, a token's
/// probability of being sampled.
pub struct TokenPicker {
    sampler: Sampler,
    adjust: LogitAdjust,
    /// Report logprobs with this many top tokens (`None`: none).
    logprobs: Option<usize>,
}

impl TokenPicker {
    /// A picker sampling with `sampler` after `adjust`, reporting `logprobs` top tokens per position
    /// (at most `MAX_TOP_LOGPROBS`; `None`: no logprobs).
    pub fn new(sampler: SamplerConfig, adjust: LogitAdjustConfig, logprobs: Option<usize>) -> Result<Self> {
        if logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(Error::Input(format!("at most {MAX_TOP_LOGPROBS} top logprobs per token")));
        }
        Ok(TokenPicker { sampler: Sampler::new(sampler)?, adjust: LogitAdjust::new(adjust), logprobs })
    }

    /// Whether logprobs are reported.
    pub fn reports_logprobs(&self) -> bool {
        self.logprobs.is_some()
    }

    /// The next token from a step's `logits` (adjusted in place), with its logprobs when asked for;
    /// the token counts toward the penalties from now on.
    pub fn pick(&mut self, logits: &mut [f32]) -> Result<(u32, Option<Logprobs>)> {
        self.adjust.apply(logits);
        let token = self.sampler.sample(logits)?;
        let reported = self.logprobs.map(|n| logprobs(logits, token, n));
        self.adjust.record(token);
        Ok((token, reported))
    }

    /// The logprobs of `token` following a prompt row with these `logits` (adjusted in place as a
    /// generated token's would be), when logprobs are reported.
    pub fn score(&self, logits: &mut [f32], token: u32) -> Option<Logprobs> {
        let n = self.logprobs?;
        self.adjust.apply(logits);
        Some(logprobs(logits, token, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplerConfig { temperature: 0.0, ..Default::default() }).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]).unwrap(), 1);
    }

    #[test]
    fn same_seed_same_draws_and_top_k_keeps_ties() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let config = SamplerConfig { temperature: 0.9, top_k: Some(5), top_p: 1.0, seed: 7 };
        let draws = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, ..config }).unwrap();
            (0..50).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        // The top value 3.0 (10 × 0.3) is shared by every i with 37i ≡ 10 (mod 11): all of them are kept.
        let top: Vec<u32> = (0..100u32).filter(|i| (i * 37) % 11 == 10).collect();
        let s = Sampler::new(config).unwrap();
        let kept: Vec<u32> = s.candidates(&logits).iter().map(|&(i, _)| i as u32).collect();
        assert!(top.iter().all(|t| kept.contains(t)), "ties with the k-th were dropped");
        assert!(draws(7).iter().all(|d| kept.contains(d)));
    }

    #[test]
    fn the_picker_reports_the_adjusted_distribution_and_greedy_takes_its_top() {
        let config = SamplerConfig { temperature: 0.0, ..Default::default() };
        let bias = LogitAdjustConfig::new(vec![(2, 10.0)], 0.0, 2.0, 4).unwrap();
        let mut picker = TokenPicker::new(config, bias, Some(3)).unwrap();
        let row = [0.5f32, 4.0, -1.0, 0.0];
        // Biased, token 2 (9.0) wins; penalised by 2 per time it wins again at 7 and 5, then 3 loses to token 1 (4.0).
        let mut picks = Vec::new();
        for _ in 0..4 {
            let (token, lp) = picker.pick(&mut row.clone()).unwrap();
            let lp = lp.unwrap();
            assert_eq!(lp.top[0].token, token);
            assert_eq!(lp.chosen, lp.top[0]);
            assert!(lp.top.iter().map(|t| (t.logprob as f64).exp()).sum::<f64>() <= 1.0 + 1e-6);
            picks.push(token);
        }
        assert_eq!(picks, vec![2, 2, 2, 1]);
        assert!(TokenPicker::new(config, LogitAdjustConfig::default(), Some(MAX_TOP_LOGPROBS + 1)).is_err());
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(Sampler::new(SamplerConfig { temperature: -1.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplerConfig { top_p: 0.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplerConfig { top_k: Some(0), ..Default::default() }).is_err());
    }
}
