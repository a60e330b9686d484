//! A long run under a memory budget: resident memory must stay flat once warmed up.
//! Ignored by default (about five minutes): `cargo test --release -p ccsm --test soak -- --ignored --nocapture`.

mod common;

use ccsm::kv_cache::EvictionPolicy;
use ccsm::llama::LlamaModel;
use ccsm::sampling::{Sampler, SamplerConfig};
use ccsm::{CacheType, GGMLModel, Logits, Model, ModelOptions};
use common::{model, SMOLLM2};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let num: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = points.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    num / den
}

#[test]
#[ignore]
fn twenty_thousand_tokens_under_a_budget_keep_rss_flat() {
    const TOKENS: usize = 20_000;
    const WARM_UP: usize = 2_000;
    let options = ModelOptions { n_ctx: 2048, k_type: CacheType::F16, v_type: CacheType::F16, n_threads: 2, n_batch: 256 };
    let mut m = GGMLModel::new(LlamaModel::load(model(SMOLLM2)).unwrap(), options).unwrap();
    let budget = 8 << 20;
    let policy = EvictionPolicy::SinkRecent { sinks: 4 };
    m.optimize_memory(budget, policy).unwrap();
    m.set_eviction(Some(policy));
    let mut sampler = Sampler::new(SamplerConfig { temperature: 0.9, top_k: Some(40), top_p: 0.95, seed: 1 }).unwrap();
    let prompt = m.model().tokenizer().encode("The Jargon File is a glossary of hacker slang.").unwrap();
    let mut logits = m.eval(&prompt, Logits::Last).unwrap();
    let mut samples = Vec::new();
    for i in 0..TOKENS {
        let next = sampler.sample(&logits).unwrap();
        logits = m.eval(&[next], Logits::Last).unwrap();
        assert!(m.kv_memory_usage() <= budget);
        if i % 500 == 0 {
            samples.push((i as f64, rss_bytes() as f64));
        }
    }
    let after: Vec<(f64, f64)> = samples.iter().copied().filter(|(i, _)| *i as usize >= WARM_UP).collect();
    let per_1000 = slope(&after) * 1000.0;
    let (lo, hi) = after.iter().fold((f64::MAX, 0f64), |(lo, hi), (_, r)| (lo.min(*r), hi.max(*r)));
    eprintln!(
        "soak: {TOKENS} tokens, RSS after warm-up {:.1}–{:.1} MiB, slope {:+.1} KiB per 1000 tokens, KV {} bytes",
        lo / 1048576.0,
        hi / 1048576.0,
        per_1000 / 1024.0,
        m.kv_memory_usage()
    );
    assert!(per_1000.abs() < 64.0 * 1024.0, "RSS grows {per_1000} bytes per 1000 tokens");
}
