//! Batched steps (several sequences' rows in one graph, each attending over its own cache) give the
//! logits each sequence gets alone, through the single-session path (`GGMLModel`): prompts of
//! different lengths prefilled together, decode steps together, a sequence joining while others
//! decode, and every-row logits.

mod common;

use ccsm::engine::{SequenceStep, TextEngine};
use ccsm::kv_cache::KvCache;
use ccsm::llama::LlamaModel;
use ccsm::sampling::argmax;
use ccsm::{CacheType, GGMLModel, Logits, ModelOptions};

use common::{model, relative_diff, SMOLLM2, TINY_LLAMA};

const PROMPTS: [&str; 4] = [
    "The Jargon File is a glossary of hacker slang.",
    "Hello",
    "A hacker is a person who enjoys exploring the details of programmable systems and how to stretch their capabilities.",
    "Once upon a time there was a machine with two cores",
];
const DECODE: usize = 6;

/// Greedy decoding alone: the logits of the prompt's last row, then of each decode step.
fn alone(name: &str, t: CacheType, prompt: &[u32]) -> Vec<Vec<f32>> {
    let options = ModelOptions { n_ctx: 128, k_type: t, v_type: t, n_threads: 2, n_batch: 512 };
    let mut m = GGMLModel::new(LlamaModel::load(model(name)).unwrap(), options).unwrap();
    let mut steps = vec![m.eval(prompt, Logits::Last).unwrap()];
    for _ in 0..DECODE {
        let next = argmax(steps.last().unwrap()) as u32;
        steps.push(m.eval(&[next], Logits::Last).unwrap());
    }
    steps
}

fn tokens(engine: &TextEngine) -> Vec<Vec<u32>> {
    PROMPTS.iter().map(|p| engine.model().tokenizer().encode(p).unwrap()).collect()
}

/// All sequences prefilled in one step, then decoded together, the last joining after two steps.
fn batched(name: &str, t: CacheType, tolerance: f64) {
    let mut engine = TextEngine::new(LlamaModel::load(model(name)).unwrap(), 2).unwrap();
    let prompts = tokens(&engine);
    let reference: Vec<Vec<Vec<f32>>> = prompts.iter().map(|p| alone(name, t, p)).collect();
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| engine.new_cache(128, t, t).unwrap()).collect();
    let late = PROMPTS.len() - 1;
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); PROMPTS.len()];
    for step in 0..DECODE + 4 {
        // Step 0 prefills all prompts but the last together; at step 2 the last joins with its whole
        // prompt while the others decode.
        let joined = |i: usize| i != late || step >= 2;
        let next: Vec<Vec<u32>> =
            (0..PROMPTS.len()).map(|i| got[i].last().map_or_else(|| prompts[i].clone(), |l| vec![argmax(l) as u32])).collect();
        let active: Vec<usize> = (0..PROMPTS.len()).filter(|&i| joined(i) && got[i].len() <= DECODE).collect();
        if active.is_empty() {
            break;
        }
        let mut steps: Vec<SequenceStep> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .map(|(i, cache)| SequenceStep { cache, tokens: &next[i], logits: Logits::Last })
            .collect();
        for (&i, logits) in active.iter().zip(engine.step(&mut steps, false).unwrap()) {
            got[i].push(logits);
        }
    }
    for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
        let per_step: Vec<f64> = g.iter().zip(r).map(|(a, b)| relative_diff(a, b)).collect();
        let worst = per_step.iter().copied().fold(0.0, f64::max);
        eprintln!("{name} {t} sequence {i}: {} steps, worst difference {worst:.2e} of the spread", g.len());
        assert_eq!(g.len(), DECODE + 1, "sequence {i}");
        assert!(worst <= tolerance, "sequence {i}: batched logits differ from alone by {worst:.2e} of the spread");
    }
}

#[test]
fn batched_steps_equal_single_sequences_on_tiny_llama() {
    // f32 weights: only the order of sums may differ.
    batched(TINY_LLAMA, CacheType::F16, 1e-5);
    batched(TINY_LLAMA, CacheType::Q4_0, 1e-5);
}

#[test]
fn batched_steps_equal_single_sequences_on_smollm2() {
    // Q4_1 weights round activations to 8 bits per column, which amplifies any change of summation
    // order; a batch keeps every sequence's order (per-column products, each sequence's own attention
    // window), so the logits come out identical.
    batched(SMOLLM2, CacheType::Q8_0, 1e-6);
}

#[test]
fn every_row_logits_in_a_batch_equal_alone() {
    let mut engine = TextEngine::new(LlamaModel::load(model(TINY_LLAMA)).unwrap(), 2).unwrap();
    let prompts = tokens(&engine);
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| engine.new_cache(128, CacheType::F16, CacheType::F16).unwrap()).collect();
    // Mixed: the first two want every row, the others only their last.
    let which = [Logits::All, Logits::Last, Logits::All, Logits::Last];
    let mut steps: Vec<SequenceStep> =
        caches.iter_mut().zip(&prompts).zip(which).map(|((cache, p), logits)| SequenceStep { cache, tokens: p, logits }).collect();
    let got = engine.step(&mut steps, false).unwrap();
    let vocab = engine.model().vocab_size();
    for (i, p) in prompts.iter().enumerate() {
        let options = ModelOptions { n_ctx: 128, k_type: CacheType::F16, v_type: CacheType::F16, n_threads: 2, n_batch: 512 };
        let mut m = GGMLModel::new(LlamaModel::load(model(TINY_LLAMA)).unwrap(), options).unwrap();
        let alone = m.eval(p, which[i]).unwrap();
        let rows = if which[i] == Logits::All { p.len() } else { 1 };
        assert_eq!(got[i].len(), rows * vocab, "sequence {i}");
        for (a, b) in got[i].chunks(vocab).zip(alone.chunks(vocab)) {
            assert!(relative_diff(a, b) < 1e-5, "sequence {i}: {:.2e}", relative_diff(a, b));
        }
    }
}

#[test]
fn a_failed_batched_step_changes_no_cache() {
    let mut engine = TextEngine::new(LlamaModel::load(model(TINY_LLAMA)).unwrap(), 2).unwrap();
    let mut a = engine.new_cache(16, CacheType::F16, CacheType::F16).unwrap();
    let mut b = engine.new_cache(4, CacheType::F16, CacheType::F16).unwrap();
    let long = [1u32; 5];
    let err = engine
        .step(
            &mut [
                SequenceStep { cache: &mut a, tokens: &[1, 2], logits: Logits::Last },
                SequenceStep { cache: &mut b, tokens: &long, logits: Logits::Last },
            ],
            false,
        )
        .unwrap_err();
    assert!(err.to_string().contains("cache"), "{err}");
    assert_eq!((a.len(), b.len()), (0, 0));
    let vocab = engine.model().vocab_size() as u32;
    assert!(engine.step(&mut [SequenceStep { cache: &mut a, tokens: &[vocab], logits: Logits::Last }], false).is_err());
    assert!(engine.step(&mut [], false).is_err());
    assert_eq!(a.len(), 0);
}

#[test]
fn sixteen_sequences_on_rotated_caches_fit_one_graph() {
    // Rotated (quantized) caches add the most nodes per sequence; 16 of them must still fit the graph.
    let mut engine = TextEngine::new(LlamaModel::load(model(TINY_LLAMA)).unwrap(), 2).unwrap();
    let mut caches: Vec<KvCache> = (0..16).map(|_| engine.new_cache(64, CacheType::Q8_0, CacheType::Q8_0).unwrap()).collect();
    assert!(caches[0].is_rotated());
    let options = ModelOptions { n_ctx: 64, k_type: CacheType::Q8_0, v_type: CacheType::Q8_0, n_threads: 2, n_batch: 512 };
    let mut alone = GGMLModel::new(LlamaModel::load(model(TINY_LLAMA)).unwrap(), options).unwrap();
    for token in [1u32, 5, 9] {
        let want = alone.eval(&[token], Logits::Last).unwrap();
        let tokens = [token];
        let mut steps: Vec<SequenceStep> =
            caches.iter_mut().map(|cache| SequenceStep { cache, tokens: &tokens, logits: Logits::Last }).collect();
        let got = engine.step(&mut steps, false).unwrap();
        assert_eq!(got.len(), 16);
        for logits in &got {
            assert!(relative_diff(logits, &want) < 1e-5, "{:.2e}", relative_diff(logits, &want));
        }
    }
}
