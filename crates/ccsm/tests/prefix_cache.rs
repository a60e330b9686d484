//! Cached prefixes: a session that starts from a cached prefix and prefills only the rest gives the
//! tokens and logits of a session that prefilled everything (tiny-llama, f16 and q8_0 caches); the
//! longest prefix is found through hashed blocks and checked row by row; eviction is least recently
//! used, never of an entry in use, and the byte count is the entries' own.

mod common;

use ccsm::engine::{SequenceStep, TextEngine};
use ccsm::kv_cache::{KvCache, KvCacheConfig, LayerTypes};
use ccsm::llama::LlamaModel;
use ccsm::prefix_cache::{PrefixCache, BLOCK_ROWS};
use ccsm::sampling::argmax;
use ccsm::{CacheType, Logits};

use common::{mean_kld, model, relative_diff, CHUNKING_TOLERANCE, SMOLLM2, TINY_LLAMA};

const DECODE: usize = 8;

/// Greedy decoding from `cache` (which may already hold a prefix of `prompt`): the logits of the
/// prompt's last row, then of each step.
fn greedy(engine: &mut TextEngine, cache: &mut KvCache, prompt: &[u32]) -> Vec<Vec<f32>> {
    let rest = &prompt[cache.len()..];
    let mut steps = vec![engine.step(&mut [SequenceStep { cache, tokens: rest, logits: Logits::Last }], false).unwrap().remove(0)];
    for _ in 0..DECODE {
        let next = [argmax(steps.last().unwrap()) as u32];
        steps.push(engine.step(&mut [SequenceStep { cache, tokens: &next, logits: Logits::Last }], false).unwrap().remove(0));
    }
    steps
}

fn keys(tokens: &[u32]) -> Vec<u64> {
    tokens.iter().map(|&t| t as u64).collect()
}

#[test]
fn a_session_from_a_cached_prefix_speaks_as_one_that_prefilled_it() {
    let mut engine = TextEngine::new(LlamaModel::load(model(TINY_LLAMA)).unwrap(), 2).unwrap();
    let tok = |s: &str| engine.model().tokenizer().encode(s).unwrap();
    let system = "You are a terse assistant who knows the Jargon File, the hacker's lexicon, by heart, and answers in one line.";
    let first = tok(&format!("{system} What is a kludge?"));
    let second = tok(&format!("{system} What does grok mean?"));
    let shared = first.iter().zip(&second).take_while(|(a, b)| a == b).count();
    assert!(shared >= 2 * BLOCK_ROWS, "the prompts share {shared} tokens");
    for t in [CacheType::F16, CacheType::Q8_0] {
        let mut alone = engine.new_cache(256, t, t).unwrap();
        let want = greedy(&mut engine, &mut alone, &second);

        // The first conversation runs and is cached; the second starts from its shared rows.
        let mut prefixes = PrefixCache::new(64 << 20, None);
        let mut earlier = engine.new_cache(256, t, t).unwrap();
        greedy(&mut engine, &mut earlier, &first);
        assert!(prefixes.insert(&keys(&first), &earlier).unwrap().is_some());
        let hit = prefixes.longest(&keys(&second)).expect("the shared rows are found");
        assert_eq!(hit.rows, shared, "the longest prefix: whole blocks, then row by row");
        let mut warm = engine.new_cache(256, t, t).unwrap();
        prefixes.restore(hit, &mut warm).unwrap();
        assert_eq!(warm.len(), shared);
        let got = greedy(&mut engine, &mut warm, &second);
        let tokens = |s: &[Vec<f32>]| s.iter().map(|l| argmax(l)).collect::<Vec<_>>();
        assert_eq!(tokens(&got), tokens(&want), "{t:?}: the same greedy tokens");
        // The restored rows are the bytes prefilling stores; the rest is prefilled in a second chunk,
        // which ggml's products may round differently from one chunk (measured 0 of the spread here,
        // on AVX-512 and AVX2 kernels).
        let diff = got.iter().zip(&want).map(|(a, b)| relative_diff(a, b)).fold(0.0, f64::max);
        eprintln!("{t:?}: warm vs cold logits differ by {diff:.2e} of the spread");
        assert!(diff <= CHUNKING_TOLERANCE, "{t:?}: logits differ by {diff:.2e} of the spread");
        assert_eq!(prefixes.stats().hits, 1);
    }
}

/// A small cache with `rows` live rows (contents do not matter to the bookkeeping).
fn filled(rows: usize) -> KvCache {
    let mut c = KvCache::new(KvCacheConfig::uniform(2, 64, 2, 256, CacheType::F16, CacheType::F16)).unwrap();
    c.append(rows).unwrap();
    c
}

#[test]
fn lookups_take_the_longest_match_and_eviction_spares_entries_in_use() {
    let entry_bytes = filled(64).snapshot(64, filled(64).config().clone(), Default::default()).unwrap().memory_usage();
    let mut prefixes = PrefixCache::new(2 * entry_bytes, None);
    let a: Vec<u64> = (0..64).collect();
    let mut b = a.clone();
    b[40] = 1000; // shares 40 rows with a: two whole blocks and 8 rows of the third
    let id_a = prefixes.insert(&a, &filled(64)).unwrap().unwrap();
    assert!(prefixes.insert(&a[..32], &filled(64)).unwrap().is_none(), "a prefix of an entry is not cached twice");
    assert!(prefixes.insert(&a[..10], &filled(64)).unwrap().is_none(), "shorter than a block");
    let hit = prefixes.longest(&b).unwrap();
    assert_eq!((hit.entry, hit.rows), (id_a, 40));
    assert_eq!(prefixes.longest(&a).unwrap().rows, 63, "one row is left to run");
    assert!(prefixes.longest(&(500..600).collect::<Vec<u64>>()).is_none());
    assert_eq!((prefixes.stats().hits, prefixes.stats().misses), (2, 1));

    let id_b = prefixes.insert(&b, &filled(64)).unwrap().unwrap();
    assert_eq!(prefixes.bytes(), 2 * entry_bytes);
    prefixes.pin(id_a);
    prefixes.longest(&b); // b is now the most recent, a the least, but a is pinned
    let c: Vec<u64> = (2000..2064).collect();
    assert!(prefixes.insert(&c, &filled(64)).unwrap().is_some());
    assert_eq!(prefixes.len(), 2);
    assert_eq!(prefixes.longest(&a).unwrap().entry, id_a, "the pinned entry stays");
    assert_ne!(prefixes.longest(&b).map(|h| h.entry), Some(id_b), "the unpinned one went");
    assert_eq!(prefixes.stats().evictions, 1);
    assert_eq!(prefixes.bytes(), 2 * entry_bytes);
    prefixes.unpin(id_a);
    assert_eq!(prefixes.shrink_by(1), entry_bytes);
    assert_eq!(prefixes.len(), 1);
}

#[test]
fn prefixes_stored_smaller_convert_on_the_way_back() {
    let mut engine = TextEngine::new(LlamaModel::load(model(TINY_LLAMA)).unwrap(), 2).unwrap();
    let prompt = engine
        .model()
        .tokenizer()
        .encode("The Jargon File is a glossary of hacker slang, collected over decades of hacker culture.")
        .unwrap();
    let mut session = engine.new_cache(256, CacheType::Q8_0, CacheType::Q8_0).unwrap();
    let want = greedy(&mut engine, &mut session, &prompt);
    let mut f16 = engine.new_cache(256, CacheType::F16, CacheType::F16).unwrap();
    greedy(&mut engine, &mut f16, &prompt);
    // An f16 session's rows stored as q8_0 (converted through f32) and restored into a q8_0 session:
    // quantized from the f16 rounding of the values rather than from the f32 ones, so close to what
    // the q8_0 session stored itself, not equal; the next token agrees.
    let mut prefixes = PrefixCache::new(64 << 20, Some(LayerTypes::new(CacheType::Q8_0, CacheType::Q8_0)));
    let id = prefixes.insert(&keys(&prompt), &f16).unwrap().unwrap();
    let small = prefixes.bytes();
    let mut full = PrefixCache::new(64 << 20, None);
    full.insert(&keys(&prompt), &f16).unwrap();
    assert!(small * 17 < full.bytes() * 10, "q8_0 rows take {small} bytes against f16's {}", full.bytes());
    let hit = prefixes.longest(&keys(&prompt)).unwrap();
    assert_eq!(hit.entry, id);
    let mut warm = engine.new_cache(256, CacheType::Q8_0, CacheType::Q8_0).unwrap();
    prefixes.restore(hit, &mut warm).unwrap();
    let got = greedy(&mut engine, &mut warm, &prompt);
    assert_eq!(argmax(&got[0]), argmax(&want[0]));
}

/// Every row's logits of `tokens` run on top of what `cache` holds.
fn scored(engine: &mut TextEngine, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
    engine.step(&mut [SequenceStep { cache, tokens, logits: Logits::All }], false).unwrap().remove(0)
}

#[test]
fn prefixes_stored_as_q8_0_or_q4_0_score_as_sessions_of_that_type_against_an_f32_cache() {
    let mut engine = TextEngine::new(LlamaModel::load(model(SMOLLM2)).unwrap(), 2).unwrap();
    let vocab = engine.model().vocab_size();
    let text = "HACKER n. [originally, someone who makes furniture with an axe] 1. A person who enjoys exploring \
        the details of programmable systems and how to stretch their capabilities, as opposed to most users, who \
        prefer to learn only the minimum necessary. 2. One who programs enthusiastically (even obsessively) or \
        who enjoys programming rather than just theorizing about programming. 3. A person capable of \
        appreciating hack value. 4. A person who is good at programming quickly. 5. An expert at a particular \
        program, or one who frequently does work using it or on it; as in `a Unix hacker'.";
    let prompt = engine.model().tokenizer().encode(text).unwrap();
    let split = prompt.len() - 32;
    let (head, tail) = prompt.split_at(split);
    let mut f32_cache = engine.new_cache(256, CacheType::F32, CacheType::F32).unwrap();
    let reference = scored(&mut engine, &mut f32_cache, &prompt)[split * vocab..].to_vec();
    let mut f16 = engine.new_cache(256, CacheType::F16, CacheType::F16).unwrap();
    scored(&mut engine, &mut f16, head);
    for t in [CacheType::Q8_0, CacheType::Q4_0] {
        // A session whose own cache is t, prefilling everything.
        let mut own = engine.new_cache(256, t, t).unwrap();
        let own_logits = scored(&mut engine, &mut own, &prompt)[split * vocab..].to_vec();
        // An f16 session's rows stored as t, restored into a session of t, the last 32 tokens run.
        let mut prefixes = PrefixCache::new(64 << 20, Some(LayerTypes::new(t, t)));
        prefixes.insert(&keys(head), &f16).unwrap().unwrap();
        let hit = prefixes.longest(&keys(&prompt)).unwrap();
        assert_eq!(hit.rows, split);
        let mut warm = engine.new_cache(256, t, t).unwrap();
        prefixes.restore(hit, &mut warm).unwrap();
        let warm_logits = scored(&mut engine, &mut warm, tail);
        let (own_kld, warm_kld) = (mean_kld(&reference, &own_logits, vocab), mean_kld(&reference, &warm_logits, vocab));
        eprintln!("{t}: mean KLD against an f32 cache over 32 tokens: own cache {own_kld:.6}, from a stored prefix {warm_kld:.6}");
        // The stored rows are quantized from f16-rounded values instead of f32 ones, and the last rows
        // run as their own chunk. Measured warm / own: q8_0 1.01 (AVX-512 kernels), 1.20 (AVX2); q4_0
        // 0.66, 0.89. q8_0's KLD (0.0034) is the floor between attention paths over an f32 cache
        // (attention_paths.rs), not q8_0's own error. Bound: 1.5 × own, plus 1e-4 for that floor.
        assert!(warm_kld <= 1.5 * own_kld + 1e-4, "{t}: {warm_kld} against the own cache's {own_kld}");
    }
}
