//! Log-probabilities of tokens under a step's logits (log-softmax in f64), for OpenAI's `logprobs`.

/// A token and its log-probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token id.
    pub token: u32,
    /// Its natural-log probability (≤ 0; −∞ for a token with a non-finite logit).
    pub logprob: f32,
}

/// One position's log-probabilities: the token there and the most likely tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Logprobs {
    /// The token actually at this position (sampled or from the prompt).
    pub chosen: TokenLogprob,
    /// The `n` most likely tokens, most likely first (the lower id first on ties).
    pub top: Vec<TokenLogprob>,
}

/// `ln Σ exp(logit)` over the finite logits, in f64 (shifted by the largest, so nothing overflows): a
/// token's log-probability is its logit less this. Non-finite logits have no probability.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().filter(|l| l.is_finite()).fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().filter(|l| l.is_finite()).map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln()
}

/// `chosen`'s and the `n` most likely tokens' log-softmax over `logits`. Tokens with non-finite logits
/// have no probability (−∞).
pub fn logprobs(logits: &[f32], chosen: u32, n: usize) -> Logprobs {
    let log_z = log_sum_exp(logits);
    let of = |token: u32| {
        let l = logits.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
        TokenLogprob { token, logprob: if l.is_finite() { (l as f64 - log_z) as f32 } else { f32::NEG_INFINITY } }
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
    let n = n.min(ids.len());
    let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if n > 0 && n < ids.len() {
        ids.select_nth_unstable_by(n - 1, order);
    }
    ids.truncate(n);
    ids.sort_by(order);
    Logprobs { chosen: of(chosen), top: ids.into_iter().map(of).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_of_a_small_row() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, f32::NEG_INFINITY];
        let z: f64 = [1.0f64, 3.0, 3.0, -2.0].iter().map(|l| l.exp()).sum();
        let lp = logprobs(&logits, 0, 3);
        assert!((lp.chosen.logprob as f64 - (1.0 - z.ln())).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.token).collect::<Vec<_>>(), vec![1, 2, 0]);
        assert!((lp.top[0].logprob as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert_eq!(logprobs(&logits, 4, 9).chosen.logprob, f32::NEG_INFINITY);
        assert_eq!(logprobs(&logits, 4, 9).top.len(), 4);
        assert!(logprobs(&logits, 1, 0).top.is_empty());
    }
}
