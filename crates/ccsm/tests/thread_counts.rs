//! Results do not depend on how many threads compute them: a graph's thread count now follows its
//! size and the machine's load (ggml::threads), so a seeded answer must not change with either.
//! Products split their output rows between threads and our attention its fixed parts of the cells,
//! so every sum is taken in the same order whatever the count.

mod common;

use ccsm::llama::LlamaModel;
use ccsm::{CacheType, GGMLModel, Logits, ModelOptions};
use common::{model, SMOLLM2};

fn smollm2(n_threads: usize, kv: CacheType) -> GGMLModel {
    let options = ModelOptions { n_ctx: 256, k_type: kv, v_type: kv, n_threads, n_batch: 64 };
    GGMLModel::new(LlamaModel::load(model(SMOLLM2)).unwrap(), options).unwrap()
}

/// A prompt in two batches and eight greedy decode steps, every logit kept.
fn run(m: &mut GGMLModel) -> Vec<f32> {
    let text = "The Jargon File is a glossary of hacker slang. In 1983, it was printed as a book; the 4th edition has";
    let tokens = m.model().tokenizer().encode(text).unwrap();
    let mut logits = m.eval(&tokens, Logits::All).unwrap();
    let vocab = m.model().vocab_size();
    for _ in 0..8 {
        let last = &logits[logits.len() - vocab..];
        let next = (0..vocab).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32;
        logits.extend(m.eval(&[next], Logits::Last).unwrap());
    }
    logits
}

#[test]
fn smollm2_logits_are_the_same_on_one_thread_and_two() {
    for kv in [CacheType::F16, CacheType::Q4_0] {
        let one = run(&mut smollm2(1, kv));
        let two = run(&mut smollm2(2, kv));
        assert_eq!(one.len(), two.len());
        let differing = one.iter().zip(&two).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differing, 0, "{kv}: {differing} of {} logits differ between 1 and 2 threads", one.len());
    }
}
