//! Perplexity as llama-perplexity measures it (chunks of CTX tokens from token 0, each from an empty
//! cache, the second half of each chunk scored), and KL divergence against a saved reference run.
//!
//! The reference file keeps, per scored position, the reference's top `TOP_K` tokens with their
//! log-probabilities, and the log-probability of the actual next token. KL is computed over those
//! tokens plus one "everything else" bucket: by the data-processing inequality this is a lower bound
//! of the full KL, short of it only by the divergence inside the reference's tail (under 1 % of the
//! probability mass at K = 64 for the models here).

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use crate::error::{Error, Result};
use crate::ggml_model::GGMLModel;
use crate::model::Logits;
use crate::Model;

/// Tokens kept per position in a reference file.
pub const TOP_K: usize = 64;
const MAGIC: &[u8; 8] = b"CCSMKLD1";

/// One scored position of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredPosition {
    /// log p(actual next token).
    pub target_logprob: f32,
    /// The most likely tokens, most likely first, with their log-probabilities.
    pub top: Vec<(u32, f32)>,
}

/// What a perplexity run produced.
pub struct PerplexityRun {
    /// Every scored position, chunk after chunk (`ctx - 1 - ctx / 2` per chunk).
    pub positions: Vec<ScoredPosition>,
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens per chunk (the context each chunk was evaluated in).
    pub ctx: usize,
}

/// Splits `tokens` into (at most `max_chunks`) chunks of `ctx`, evaluates each from an empty cache
/// and scores the second half of each; with a `reference`, also compares each position's
/// distribution with it. `progress(chunk, total)` is called after each chunk.
pub fn score(
    model: &mut GGMLModel,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    reference: Option<&PerplexityRun>,
    mut progress: impl FnMut(usize, usize),
) -> Result<(PerplexityRun, Option<KlComparison>)> {
    if ctx < 4 {
        return Err(Error::Input(format!("context {ctx} is too small to score (at least 4)")));
    }
    if ctx > model.cache().capacity() && !model.evicts() {
        return Err(Error::Input(format!("context {ctx} exceeds the cache's {} cells", model.cache().capacity())));
    }
    let available = tokens.len() / ctx;
    if available == 0 {
        return Err(Error::Input(format!("the text has {} tokens, fewer than one chunk of {ctx}", tokens.len())));
    }
    let chunks = max_chunks.map_or(available, |m| m.min(available));
    let first = ctx / 2;
    let per_chunk = ctx - 1 - first;
    if let Some(r) = reference {
        if r.ctx != ctx || r.positions.len() != chunks * per_chunk {
            return Err(Error::Input(format!(
                "the reference scored {} positions at ctx {}, this run would score {} at ctx {ctx}: use the same text, -c and --chunks",
                r.positions.len(),
                r.ctx,
                chunks * per_chunk
            )));
        }
    }
    let vocab = model.model().vocab_size();
    // Every token id that will index this model's logits: the text's and the reference's.
    if let Some(&id) = tokens[..chunks * ctx].iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::TokenOutOfRange { id, vocab });
    }
    if let Some(r) = reference {
        if let Some(&(id, _)) = r.positions.iter().flat_map(|p| &p.top).find(|(id, _)| *id as usize >= vocab) {
            return Err(Error::TokenOutOfRange { id, vocab });
        }
    }
    let mut positions = Vec::with_capacity(chunks * per_chunk);
    let mut kl = KlAccumulator::default();
    for c in 0..chunks {
        let chunk = &tokens[c * ctx..(c + 1) * ctx];
        model.reset();
        let logits = model.eval(chunk, Logits::All)?;
        for j in first..ctx - 1 {
            let row = LogProbs::new(&logits[j * vocab..(j + 1) * vocab]);
            let scored = row.score(chunk[j + 1]);
            if let Some(r) = reference {
                kl.add(&row, &scored, &r.positions[positions.len()]);
            }
            positions.push(scored);
        }
        progress(c + 1, chunks);
    }
    Ok((PerplexityRun { positions, chunks, ctx }, reference.map(|_| kl.finish())))
}

/// One position's logits with their log-sum-exp, so any token's log-probability is one subtraction.
struct LogProbs<'a> {
    logits: &'a [f32],
    lse: f64,
}

impl<'a> LogProbs<'a> {
    fn new(logits: &'a [f32]) -> Self {
        LogProbs { logits, lse: crate::sampling::log_sum_exp(logits) }
    }

    fn of(&self, token: u32) -> f64 {
        self.logits[token as usize] as f64 - self.lse
    }

    fn score(&self, target: u32) -> ScoredPosition {
        let logits = self.logits;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let k = TOP_K.min(order.len());
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        order.select_nth_unstable_by(k - 1, by_logit);
        order.truncate(k);
        order.sort_by(by_logit);
        ScoredPosition { target_logprob: self.of(target) as f32, top: order.into_iter().map(|i| (i, self.of(i) as f32)).collect() }
    }
}

#[derive(Default)]
struct KlAccumulator {
    kld: Vec<f64>,
    delta_nll: Vec<f64>,
    same_top: Vec<f64>,
    delta_p_sq: f64,
}

impl KlAccumulator {
    fn add(&mut self, run: &LogProbs<'_>, scored: &ScoredPosition, reference: &ScoredPosition) {
        let mut kl = 0.0;
        let (mut ref_mass, mut run_mass) = (0.0, 0.0);
        for &(id, ref_lp) in &reference.top {
            let (ref_lp, run_lp) = (ref_lp as f64, run.of(id));
            kl += ref_lp.exp() * (ref_lp - run_lp);
            ref_mass += ref_lp.exp();
            run_mass += run_lp.exp();
        }
        // The rest of the vocabulary as one outcome.
        let (ref_tail, run_tail) = ((1.0 - ref_mass).max(0.0), (1.0 - run_mass).max(1e-30));
        if ref_tail > 0.0 {
            kl += ref_tail * (ref_tail.ln() - run_tail.ln());
        }
        self.kld.push(kl.max(0.0));
        self.delta_nll.push(reference.target_logprob as f64 - scored.target_logprob as f64);
        let same = scored.top.first().map(|t| t.0) == reference.top.first().map(|t| t.0);
        self.same_top.push(if same { 100.0 } else { 0.0 });
        self.delta_p_sq += ((scored.target_logprob as f64).exp() - (reference.target_logprob as f64).exp()).powi(2);
    }

    fn finish(self) -> KlComparison {
        let n = self.kld.len().max(1) as f64;
        KlComparison {
            kld: estimate(self.kld.iter().copied()),
            kld_max: self.kld.iter().cloned().fold(0.0, f64::max),
            delta_ln_ppl: estimate(self.delta_nll.iter().copied()),
            same_top_percent: estimate(self.same_top.iter().copied()),
            rms_delta_p_percent: 100.0 * (self.delta_p_sq / n).sqrt(),
            kld_per_position: self.kld,
        }
    }
}

/// Mean and standard error of the mean.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, PartialEq)]
pub struct Estimate {
    /// Sample mean.
    pub mean: f64,
    /// Standard error of the mean (0 with fewer than two samples).
    pub stderr: f64,
}

fn estimate(values: impl Iterator<Item = f64> + Clone) -> Estimate {
    let n = values.clone().count() as f64;
    if n == 0.0 {
        return Estimate::default();
    }
    let mean = values.clone().sum::<f64>() / n;
    let var = if n > 1.0 { values.map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    Estimate { mean, stderr: (var / n).sqrt() }
}

impl PerplexityRun {
    /// Mean negative log-likelihood of the scored tokens.
    pub fn nll(&self) -> Estimate {
        estimate(self.positions.iter().map(|p| -(p.target_logprob as f64)))
    }

    /// exp(mean NLL), with its error propagated from the NLL's standard error.
    pub fn perplexity(&self) -> Estimate {
        let nll = self.nll();
        let ppl = nll.mean.exp();
        Estimate { mean: ppl, stderr: ppl * nll.stderr }
    }

    /// Writes the run as a KL reference file.
    pub fn save(&self, path: &Path, vocab: usize) -> Result<()> {
        let io = |source: std::io::Error| Error::Io { path: path.to_path_buf(), source };
        let mut out = BufWriter::new(std::fs::File::create(path).map_err(io)?);
        let mut put = |bytes: &[u8]| out.write_all(bytes).map_err(io);
        put(MAGIC)?;
        for v in [vocab as u64, self.ctx as u64, self.chunks as u64, TOP_K as u64, self.positions.len() as u64] {
            put(&v.to_le_bytes())?;
        }
        for p in &self.positions {
            put(&p.target_logprob.to_le_bytes())?;
            put(&(p.top.len() as u32).to_le_bytes())?;
            for &(id, lp) in &p.top {
                put(&id.to_le_bytes())?;
                put(&lp.to_le_bytes())?;
            }
        }
        out.flush().map_err(io)
    }

    /// Reads a KL reference file written by `save`; returns the run and its vocabulary size.
    pub fn load(path: &Path) -> Result<(Self, usize)> {
        let bad = |why: String| Error::KlReference { path: path.to_path_buf(), why };
        let io = |source: std::io::Error| Error::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut input = BufReader::new(file);
        let mut read = |buf: &mut [u8]| input.read_exact(buf).map_err(|e| bad(format!("truncated ({e})")));
        let mut magic = [0u8; 8];
        read(&mut magic)?;
        if &magic != MAGIC {
            return Err(bad("wrong magic".into()));
        }
        let mut header = [0u64; 5];
        for h in header.iter_mut() {
            let mut b = [0u8; 8];
            read(&mut b)?;
            *h = u64::from_le_bytes(b);
        }
        let [vocab, ctx, chunks, top_k, n] = header;
        if n.saturating_mul(8) > len || top_k > vocab || top_k == 0 {
            return Err(bad(format!("{n} positions of top {top_k} cannot be in {len} bytes")));
        }
        let mut positions = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let mut b4 = [0u8; 4];
            read(&mut b4)?;
            let target_logprob = f32::from_le_bytes(b4);
            read(&mut b4)?;
            let k = u32::from_le_bytes(b4) as u64;
            if k > top_k {
                return Err(bad(format!("a position lists {k} tokens, more than {top_k}")));
            }
            let mut top = Vec::with_capacity(k as usize);
            for _ in 0..k {
                let mut b = [0u8; 8];
                read(&mut b)?;
                let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if id as u64 >= vocab {
                    return Err(bad(format!("token {id} outside the vocabulary of {vocab}")));
                }
                top.push((id, f32::from_le_bytes([b[4], b[5], b[6], b[7]])));
            }
            positions.push(ScoredPosition { target_logprob, top });
        }
        Ok((PerplexityRun { positions, chunks: chunks as usize, ctx: ctx as usize }, vocab as usize))
    }
}

/// A run compared with its reference, llama-perplexity's KL statistics.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KlComparison {
    /// Mean KL divergence from the reference per position, in nats.
    pub kld: Estimate,
    /// Largest KL divergence of any one position, in nats.
    pub kld_max: f64,
    /// mean(ln p_ref(target) − ln p_run(target)) = ln(PPL_run / PPL_ref).
    pub delta_ln_ppl: Estimate,
    /// Share of positions whose most likely token is the reference's, in percent.
    pub same_top_percent: Estimate,
    /// Root mean square of p_run(target) − p_ref(target), in percent.
    pub rms_delta_p_percent: f64,
    /// Each position's KLD, in order: two runs over the same text compare position by position.
    #[serde(skip)]
    pub kld_per_position: Vec<f64>,
}

impl KlComparison {
    /// Mean and standard error of this run's KLD minus `other`'s, position by position (both against
    /// the same reference over the same text): far tighter than the two means' own errors, since
    /// the positions that are hard for one layout are hard for the other.
    pub fn paired_difference(&self, other: &KlComparison) -> Result<Estimate> {
        if self.kld_per_position.len() != other.kld_per_position.len() {
            return Err(Error::Input(format!(
                "runs of {} and {} positions cannot be paired",
                self.kld_per_position.len(),
                other.kld_per_position.len()
            )));
        }
        Ok(estimate(self.kld_per_position.iter().zip(&other.kld_per_position).map(|(a, b)| a - b)))
    }
}
