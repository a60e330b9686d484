//! Misuse of the library gets typed errors, never stale results or out-of-bounds panics.

mod common;

use ccsm::csm::{CsmGenerator, CsmModel, CsmOptions, Row};
use ccsm::llama::LlamaModel;
use ccsm::perplexity::{score, PerplexityRun, ScoredPosition};
use ccsm::{CacheType, Error, GGMLModel, Logits, Model, ModelOptions};
use common::{model, TINY_LLAMA};

/// An empty step used to return the previous step's codebook-0 logits as if it had run.
#[test]
fn an_empty_csm_step_is_refused_not_answered_with_stale_logits() {
    let options = CsmOptions { n_ctx: 32, k_type: CacheType::F32, v_type: CacheType::F32, n_threads: 1, n_batch: 8 };
    let mut g = CsmGenerator::new(CsmModel::load(model("tiny-csm.gguf")).unwrap(), options).unwrap();
    assert!(matches!(g.forward(&[]), Err(Error::EmptyInput(_))), "before any step");
    let logits = g.forward(&[Row::Text(1), Row::Text(2)]).unwrap();
    assert!(!logits.is_empty());
    assert!(matches!(g.forward(&[]), Err(Error::EmptyInput(_))), "after a step");
    assert!(matches!(g.prefill(&[]), Err(Error::EmptyInput(_))));
    assert_eq!(g.backbone_cache().len(), 2, "a refused step changes nothing");
}

#[test]
fn an_empty_text_step_is_refused() {
    let options = ModelOptions { n_ctx: 32, k_type: CacheType::F32, v_type: CacheType::F32, n_threads: 1, n_batch: 8 };
    let mut m = GGMLModel::new(LlamaModel::load(model(TINY_LLAMA)).unwrap(), options).unwrap();
    assert!(matches!(m.eval(&[], Logits::Last), Err(Error::EmptyInput(_))));
    assert!(matches!(m.forward(&[]), Err(Error::EmptyInput(_))));
}

/// A KL reference made with another vocabulary names tokens this model has no logits for: the
/// library refuses it (only the CLI used to check).
#[test]
fn perplexity_refuses_reference_tokens_outside_the_vocabulary() {
    let options = ModelOptions { n_ctx: 16, k_type: CacheType::F32, v_type: CacheType::F32, n_threads: 1, n_batch: 16 };
    let mut m = GGMLModel::new(LlamaModel::load(model(TINY_LLAMA)).unwrap(), options).unwrap();
    let vocab = m.model().vocab_size();
    let tokens: Vec<u32> = (0..32).map(|i| 3 + i % 50).collect();
    let (run, _) = score(&mut m, &tokens, 16, None, None, |_, _| {}).unwrap();
    // The run compared with itself is fine.
    let (_, kl) = score(&mut m, &tokens, 16, None, Some(&run), |_, _| {}).unwrap();
    assert!(kl.unwrap().kld.mean.abs() < 1e-6);
    let mut foreign = PerplexityRun { positions: run.positions.clone(), chunks: run.chunks, ctx: run.ctx };
    foreign.positions[3] = ScoredPosition { target_logprob: -1.0, top: vec![(vocab as u32 + 7, -0.5)] };
    match score(&mut m, &tokens, 16, None, Some(&foreign), |_, _| {}) {
        Err(Error::TokenOutOfRange { id, vocab: v }) => assert_eq!((id, v), (vocab as u32 + 7, vocab)),
        other => panic!("expected TokenOutOfRange, got {:?}", other.map(|_| ())),
    }
    // Text token ids beyond the vocabulary are refused the same way.
    let mut bad = tokens.clone();
    bad[20] = vocab as u32;
    assert!(matches!(score(&mut m, &bad, 16, None, None, |_, _| {}), Err(Error::TokenOutOfRange { .. })));
}
