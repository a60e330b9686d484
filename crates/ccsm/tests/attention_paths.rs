//! The attention kernels (ggml's flash attention as stored, over an f32 copy, and our split kernel)
//! compute the same attention: on SmolLM2 their logits' KL divergence from an f32 cache must agree
//! within rounding, for every cache type, with and without rotation, and for prompt batches just
//! below, at and above a tile of ggml's tiled kernel. Kernel-level checks against naive f64
//! attention are in the ggml crate (`tests/split_attention.rs`).

mod common;

use ccsm::attention::{AttentionChoice, AttentionPath};
use ccsm::csm::{CsmGenerator, CsmModel, CsmOptions, Segment};
use ccsm::kv_cache::Rotation;
use ccsm::llama::LlamaModel;
use ccsm::sampling::{Sampler, SamplerConfig};
use ccsm::{CacheType, GGMLModel, Logits, Model, ModelOptions};
use std::sync::{Mutex, MutexGuard, OnceLock};

use common::{max_abs_diff, mean_kld, model, SMOLLM2, TINY_LLAMA};

const TEXT: &str = "The Jargon File is a glossary and usage dictionary of slang used by computer programmers. \
    The original Jargon File was a collection of terms from technical cultures such as the MIT AI Lab, \
    the Stanford AI Lab and others of the old ARPANET AI/LISP/PDP-10 communities, including Bolt, Beranek \
    and Newman, Carnegie Mellon University, and Worcester Polytechnic Institute. It was published in \
    paperback form in 1983 as The Hacker's Dictionary, revised in 1991 as The New Hacker's Dictionary, and \
    its maintainers kept adding the words that hackers used in their mail, their code and their talk.";

/// Prompt tokens evaluated at once (split into ubatches of `n_batch`), then decode steps of one token.
const PROMPT: usize = 130;
const DECODE: usize = 4;

/// Query rows of one tile of ggml's tiled kernel (which the direct path takes for f16 prompts).
const GGML_TILE: usize = 64;

const DIRECT: AttentionChoice = AttentionChoice::Only(AttentionPath::Direct);

/// Every prompt position's logits and then `DECODE` teacher-forced single-token steps' logits.
fn logits(t: CacheType, rotation: Rotation, attention: AttentionChoice, n_batch: usize, tokens: &[u32]) -> Vec<f32> {
    logits_of(SMOLLM2, t, rotation, attention, n_batch, tokens)
}

fn logits_of(name: &str, t: CacheType, rotation: Rotation, attention: AttentionChoice, n_batch: usize, tokens: &[u32]) -> Vec<f32> {
    let options = ModelOptions { n_ctx: 256, k_type: t, v_type: t, n_threads: 2, n_batch };
    let mut m = GGMLModel::new(LlamaModel::load(model(name)).unwrap(), options).unwrap();
    m.set_kv_rotation(rotation).unwrap();
    m.set_attention(attention);
    let mut all = m.eval(&tokens[..PROMPT], Logits::All).unwrap();
    for &token in &tokens[PROMPT..PROMPT + DECODE] {
        all.extend(m.eval(&[token], Logits::Last).unwrap());
    }
    all
}

fn smollm2_tokens() -> (Vec<u32>, usize) {
    let m = LlamaModel::load(model(SMOLLM2)).unwrap();
    let tokens = m.tokenizer().encode(TEXT).unwrap();
    assert!(tokens.len() >= PROMPT + DECODE, "the text has {} tokens", tokens.len());
    (tokens, m.vocab_size())
}

/// On SmolLM2 any change of rounding moves the logits far more than its size (every product rounds
/// its activations to 8 bits, and a flipped rounding step travels through 30 layers): two f32
/// kernels over an f32 cache differ by a mean KLD of a few 1e-3. That difference is the floor below
/// which KLDs cannot be told apart; each kernel's KLD from the f32 cache must be no worse than the
/// direct kernel's beyond it. (The new kernels are often better: ggml rounds the queries to the
/// keys' dot-product type, f16 or q8_0, and ours keep them in f32.)
fn check_paths(t: CacheType, rotation: Rotation, runs: &[(AttentionChoice, usize)]) {
    let _one_at_a_time = serial();
    let (tokens, vocab, reference, floor) = f32_reference();
    let (vocab, floor) = (*vocab, *floor);
    let direct_kld = mean_kld(reference, &logits(t, rotation, DIRECT, 64, tokens), vocab);
    eprintln!("{t} (rotation {rotation:?}): direct KLD vs f32 {direct_kld:.3e}; f32 kernels apart {floor:.3e}");
    let mut worse = Vec::new();
    for &(attention, n_batch) in runs {
        let kld = mean_kld(reference, &logits(t, rotation, attention, n_batch, tokens), vocab);
        eprintln!("  {attention} batch {n_batch}: KLD vs f32 {kld:.3e}");
        if kld > 1.1 * direct_kld + 2.0 * floor {
            worse.push(format!("{attention} batch {n_batch}: {kld:.3e}"));
        }
    }
    assert!(floor > 0.0 && floor < 0.01, "f32 kernels {floor:.3e} apart: more than rounding");
    assert!(worse.is_empty(), "{t}: worse than direct ({direct_kld:.3e}) beyond rounding ({floor:.3e}): {worse:?}");
}

/// Runs one model at a time: two-thread models side by side on two cores spin in each other's way.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SmolLM2's tokens, vocabulary, logits over an f32 cache with ggml's kernel, and the KLD between
/// them and the same over our kernel (the rounding floor), computed once.
fn f32_reference() -> &'static (Vec<u32>, usize, Vec<f32>, f64) {
    static REFERENCE: OnceLock<(Vec<u32>, usize, Vec<f32>, f64)> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let (tokens, vocab) = smollm2_tokens();
        let reference = logits(CacheType::F32, Rotation::Off, DIRECT, 64, &tokens);
        let split = logits(CacheType::F32, Rotation::Off, AttentionChoice::Only(AttentionPath::Split), 64, &tokens);
        let floor = mean_kld(&reference, &split, vocab);
        (tokens, vocab, reference, floor)
    })
}

/// `auto` (our kernel) at prompt batches just below, at and above one of ggml's tiles, and ggml's
/// kernel on an f32 copy.
fn all_runs(t: CacheType) -> Vec<(AttentionChoice, usize)> {
    let mut runs = vec![];
    if t.is_quantized() {
        runs.push((AttentionChoice::Only(AttentionPath::Dequantized), 64));
    }
    runs.extend([GGML_TILE - 1, GGML_TILE, GGML_TILE + 1].map(|b| (AttentionChoice::Auto, b)));
    runs
}

#[test]
fn kernels_agree_on_every_cache_type() {
    for t in [CacheType::F16, CacheType::Q8_0, CacheType::Q4_0, CacheType::Q4_1] {
        check_paths(t, Rotation::Quantized, &all_runs(t));
    }
}

#[test]
fn kernels_agree_without_rotation() {
    let split = AttentionChoice::Only(AttentionPath::Split);
    check_paths(CacheType::Q4_0, Rotation::Off, &[(split, 64)]);
    check_paths(CacheType::F16, Rotation::All, &[(split, 64)]);
}

/// tiny-llama's weights are f32, so nothing but attention rounds differently between the kernels and
/// their logits can be compared directly. Over the same stored rows, ours must equal ggml's kernel on
/// an f32 copy (`dequantized`; on f32 caches ggml's kernel itself) within float rounding; ggml's
/// kernel over f16 or quantized rows rounds the queries too (to f16 or q8_0), and is held to that.
#[test]
fn kernels_agree_where_nothing_else_rounds() {
    let _one_at_a_time = serial();
    let m = LlamaModel::load(model(TINY_LLAMA)).unwrap();
    let tokens = m.tokenizer().encode(TEXT).unwrap();
    assert!(tokens.len() >= PROMPT + DECODE, "{} tokens", tokens.len());
    let split = AttentionChoice::Only(AttentionPath::Split);
    for t in [CacheType::F32, CacheType::F16, CacheType::Q8_0, CacheType::Q4_0, CacheType::Q4_1] {
        let run = |attention, n_batch| logits_of(TINY_LLAMA, t, Rotation::Quantized, attention, n_batch, &tokens);
        let want = if t == CacheType::F32 { run(DIRECT, 64) } else { run(AttentionChoice::Only(AttentionPath::Dequantized), 64) };
        let spread = want.iter().cloned().fold(f32::NEG_INFINITY, f32::max) - want.iter().cloned().fold(f32::INFINITY, f32::min);
        let direct = max_abs_diff(&want, &run(DIRECT, 64)) / spread;
        eprintln!("tiny-llama {t}: direct vs reference {direct:.2e} of the spread");
        // A quantized cache stores rows computed by the layers before: a last-bit difference there
        // can move a stored value by a whole quantization step, which the next layers carry.
        let tolerance = if t.is_quantized() { 1e-3 } else { 1e-4 };
        for (attention, n_batch) in [(split, 64), (AttentionChoice::Auto, GGML_TILE - 1), (AttentionChoice::Auto, GGML_TILE + 1)] {
            let worst = max_abs_diff(&want, &run(attention, n_batch)) / spread;
            eprintln!("  {attention} batch {n_batch}: {worst:.2e} of the spread");
            assert!(worst <= tolerance, "{t} {attention} batch {n_batch}: max |Δ| {worst:.2e} of the spread");
        }
        assert!(direct <= if t == CacheType::F32 { 1e-4 } else { 3e-2 }, "{t}: ggml's kernel {direct:.2e} of the spread away");
    }
}

/// tiny-csm: the backbone's prompt rows (one ubatch of more than a tile) and the decoder's steps
/// give the same logits under `auto` as under ggml's kernel on an f32 copy of the rows, and the same
/// greedy frames.
#[test]
fn csm_frames_agree_across_kernels() {
    let _one_at_a_time = serial();
    let run = |t: CacheType, attention: AttentionChoice| {
        let csm = CsmModel::load(model("tiny-csm.gguf")).unwrap();
        let c = csm.config().clone();
        let options = CsmOptions { n_ctx: 256, k_type: t, v_type: t, n_threads: 2, n_batch: 256 };
        let mut g = CsmGenerator::new(csm, options).unwrap();
        g.set_attention(attention);
        let rows = Segment { speaker: 0, text: TEXT[..200].into(), frames: vec![], audio: None }
            .rows(g.model().tokenizer(), c.n_codebooks, c.audio_vocab)
            .unwrap();
        assert!(rows.len() >= GGML_TILE, "{} prompt rows", rows.len());
        g.prefill(&rows).unwrap();
        let mut trace = vec![g.c0_logits().unwrap().to_vec()];
        let mut greedy = Sampler::new(SamplerConfig { temperature: 0.0, ..Default::default() }).unwrap();
        let frames: Vec<_> =
            (0..3).map(|i| g.generate_frame(&mut greedy, Some(&mut trace)).unwrap().unwrap_or_else(|| panic!("frame {i}"))).collect();
        (frames, trace.concat())
    };
    for t in [CacheType::F16, CacheType::Q8_0, CacheType::Q4_0] {
        // ggml's kernel over f16 or quantized rows rounds the queries to f16 or q8_0, which flips
        // near-tied greedy codes of a random model; over an f32 copy of the rows it computes what
        // ours should.
        let (want_frames, want) = run(t, AttentionChoice::Only(AttentionPath::Dequantized));
        let (frames, got) = run(t, AttentionChoice::Auto);
        let spread = want.iter().cloned().fold(f32::NEG_INFINITY, f32::max) - want.iter().cloned().fold(f32::INFINITY, f32::min);
        let worst = max_abs_diff(&want, &got);
        eprintln!("tiny-csm {t}: auto vs ggml on f32 rows: max |Δlogit| {worst:.2e} of a spread of {spread:.2}");
        assert!(worst <= 2e-3 * spread, "{t}: max |Δ| {worst} (spread {spread})");
        assert_eq!(frames, want_frames, "{t}: greedy frames differ");
    }
}
