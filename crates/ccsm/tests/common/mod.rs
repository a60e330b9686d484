//! Test helpers: where the sample models are, and running the independent Python references.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// A file under `models/` (made by `make models`, which `make test` runs first).
pub fn model(name: &str) -> PathBuf {
    let path = repo_root().join("models").join(name);
    assert!(path.is_file(), "{} is missing: run `make models`", path.display());
    path
}

/// The first `bytes` of the Jargon File (`data/jargon.txt`, made by `make data`, which `make test` runs
/// first): real text that no profile was calibrated on and that does not change with this repository.
pub fn jargon_prefix(bytes: usize) -> String {
    let path = repo_root().join("data/jargon.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; run `make data`", path.display()));
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const TINY_LLAMA: &str = "tiny-llama.gguf";
/// tiny-llama with Llama 3's pre-tokenizer (`llama-bpe`).
pub const TINY_LLAMA3: &str = "tiny-llama3.gguf";

/// Runs `tools/reference/<script>` with `args`; panics with its stderr on failure.
pub fn python(script: &str, args: &[&str]) -> String {
    let path = repo_root().join("tools/reference").join(script);
    let out = Command::new("python3").arg(&path).args(args).output().expect("python3 runs");
    assert!(out.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Reads raw little-endian f64 values.
pub fn read_f64(path: &Path) -> Vec<f64> {
    std::fs::read(path).expect("reference output").chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The numpy reference's logits `[n][vocab]` for `tokens`.
pub fn reference_logits(model: &Path, tokens: &[u32]) -> Vec<f64> {
    run_reference(model, tokens, &[])
}

/// The same, with activations rounded as ggml's quantized dot products round them.
pub fn reference_logits_emulating_activations(model: &Path, tokens: &[u32]) -> Vec<f64> {
    run_reference(model, tokens, &["--emulate-activations"])
}

fn run_reference(model: &Path, tokens: &[u32], extra: &[&str]) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.f64");
    let ids: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let ids = ids.join(",");
    let mut args = vec![model.to_str().unwrap(), "--tokens", &ids, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    python("llama_ref.py", &args);
    read_f64(&out)
}

/// The largest |a − b| of two runs' values; they must be equally many, and not none (a comparison of
/// two empty runs proves nothing).
pub fn max_abs_diff<'a>(a: impl IntoIterator<Item = &'a f32>, b: impl IntoIterator<Item = &'a f32>) -> f32 {
    let (a, b): (Vec<f32>, Vec<f32>) = (a.into_iter().copied().collect(), b.into_iter().copied().collect());
    assert_eq!(a.len(), b.len(), "the runs made different numbers of values");
    assert!(!a.is_empty(), "nothing to compare");
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// Agreement of engine logits with reference logits, row by row.
pub struct Agreement {
    /// max |Δ| over a row divided by that row's reference spread (max − min), worst row.
    pub worst_relative_error: f64,
    pub top1_matches: usize,
    /// Rows whose top-1 differs although the reference's margin between the two picks exceeds
    /// `near_tie` of the spread (a near tie within the tolerance may flip; a clear winner may not).
    pub clear_top1_mismatches: usize,
    /// The smallest reference margin (top-1 minus the engine's pick, over the spread) among mismatches.
    pub smallest_mismatch_margin: f64,
    pub rows: usize,
}

pub fn compare(engine: &[f32], reference: &[f64], vocab: usize) -> Agreement {
    compare_with_ties(engine, reference, vocab, 0.0)
}

/// `compare`, counting as clear mismatches only rows whose reference margin exceeds `near_tie`.
pub fn compare_with_ties(engine: &[f32], reference: &[f64], vocab: usize, near_tie: f64) -> Agreement {
    assert_eq!(engine.len(), reference.len(), "logit counts differ");
    assert!(!engine.is_empty() && engine.len().is_multiple_of(vocab), "{} logits are not whole rows of {vocab}", engine.len());
    let mut worst = 0f64;
    let mut matches = 0;
    let (mut clear_mismatches, mut smallest_margin) = (0, f64::INFINITY);
    for (e, r) in engine.chunks(vocab).zip(reference.chunks(vocab)) {
        let spread = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max) - r.iter().cloned().fold(f64::INFINITY, f64::min);
        let max_diff = e.iter().zip(r).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
        worst = worst.max(max_diff / spread);
        let argmax_e = e.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let argmax_r = r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        if argmax_e == argmax_r {
            matches += 1;
        } else {
            let margin = (r[argmax_r] - r[argmax_e]) / spread;
            smallest_margin = smallest_margin.min(margin);
            clear_mismatches += (margin > near_tie) as usize;
        }
    }
    Agreement {
        worst_relative_error: worst,
        top1_matches: matches,
        clear_top1_mismatches: clear_mismatches,
        smallest_mismatch_margin: smallest_margin,
        rows: engine.len() / vocab,
    }
}

/// Bytes per element of each cache type from ggml's documented block layouts (independent of ggml).
pub fn bytes_per_element(t: ccsm::CacheType) -> f64 {
    use ccsm::CacheType;
    match t {
        CacheType::F32 => 4.0,
        CacheType::F16 => 2.0,
        CacheType::Q8_0 => 34.0 / 32.0,
        CacheType::Q4_1 => 20.0 / 32.0,
        CacheType::Q4_0 => 18.0 / 32.0,
        // f16 scale + 4 bytes of high bits + 16 bytes of nibbles (+ f16 min for q5_1).
        CacheType::Q5_0 => 22.0 / 32.0,
        CacheType::Q5_1 => 24.0 / 32.0,
        // f16 scale + 16 bytes of grid indices.
        CacheType::IQ4NL => 18.0 / 32.0,
        // one E8M0 exponent byte + 16 bytes of E2M1 nibbles.
        CacheType::MXFP4 => 17.0 / 32.0,
    }
}

/// Largest difference between two logit rows as a fraction of the reference's (`b`'s) spread.
pub fn relative_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    let spread = b.iter().fold(f32::MIN, |m, &x| m.max(x)) - b.iter().fold(f32::MAX, |m, &x| m.min(x));
    a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max) / spread as f64
}

/// A prompt cut into other chunks is rounded differently by ggml's products: the batched-steps tests
/// measure that floor, and bound it (and so every warm-vs-cold comparison) at this fraction of the spread.
pub const CHUNKING_TOLERANCE: f64 = 1e-5;

/// The softmax of one logit row, in f64.
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&l| (l as f64 - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// KL(p ‖ q) of two distributions over the same vocabulary.
pub fn kl(p: &[f64], q: &[f64]) -> f64 {
    assert_eq!(p.len(), q.len(), "distributions over different vocabularies");
    p.iter().zip(q).filter(|(a, _)| **a > 0.0).map(|(a, b)| a * (a / b.max(1e-300)).ln()).sum()
}

/// Mean KL(reference ‖ logits) over every row of `vocab` (equally many rows, and some).
pub fn mean_kld(reference: &[f32], logits: &[f32], vocab: usize) -> f64 {
    assert!(
        reference.len() == logits.len() && !logits.is_empty() && logits.len().is_multiple_of(vocab),
        "{} vs {} logits",
        reference.len(),
        logits.len()
    );
    let klds: Vec<f64> = reference.chunks(vocab).zip(logits.chunks(vocab)).map(|(p, q)| kl(&softmax(p), &softmax(q))).collect();
    klds.iter().sum::<f64>() / klds.len() as f64
}

/// Frames of stream `s`: codes from a fixed xorshift recurrence (any valid codes do), `codebooks` per
/// frame, each below `codebook_size`.
pub fn frames(s: u64, n: usize, codebooks: usize, codebook_size: usize) -> Vec<Vec<u32>> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(s + 1);
    (0..n)
        .map(|_| {
            (0..codebooks)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % codebook_size as u64) as u32
                })
                .collect()
        })
        .collect()
}
