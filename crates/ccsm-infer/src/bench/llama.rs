//! Text models: prompt processing (`-p` tokens at once) and decode (`-n` single-token steps).

use std::time::Instant;

use anyhow::{Context, Result};

use ccsm::llama::LlamaModel;
use ccsm::memory::{CachePolicy, CacheTypes};
use ccsm::{GGMLModel, Logits, Model, ModelOptions};

use super::{filler_tokens, model_name, reset_peak_rss, BenchRow, BenchTest, RowSource};
use crate::args::LogArgs;
use crate::cli::BenchArgs;
use crate::progress;

pub fn bench_llama(args: &BenchArgs, log: &LogArgs, file: &ggml::gguf::GgufFile, placement: &ccsm::Placement) -> Result<Vec<BenchRow>> {
    let mut weights =
        Some(LlamaModel::from_file_placed(file, &args.model, placement).with_context(|| format!("loading {}", args.model.display()))?);
    let name = model_name(args);
    let tests: Vec<BenchTest> =
        [(BenchTest::Pp, args.n_prompt), (BenchTest::Tg, args.n_gen)].into_iter().filter(|t| t.1 > 0).map(|t| t.0).collect();
    // One per-layer layout replaces the list of uniform types.
    let cache_types = if args.layers.any() { &args.cache_types[..1] } else { &args.cache_types[..] };
    let total = (cache_types.len() * args.attention.len() * args.depths.len() * tests.len()) as u64;
    let bar = progress::bar(total, "bench", log.quiet);
    let mut rows = Vec::new();
    for (&cache, &attention) in cache_types.iter().flat_map(|c| args.attention.iter().map(move |a| (c, a))) {
        for &depth in &args.depths {
            let llama = weights.take().expect("weights are returned after each run");
            let n_ctx = depth as usize + args.n_prompt.max(args.n_gen) as usize + 1;
            let options = ModelOptions { n_ctx, k_type: cache, v_type: cache, n_threads: args.threads as usize, n_batch: 512 };
            let mut model = GGMLModel::new(llama, options).with_context(|| format!("a {cache} cache of {n_ctx} cells"))?;
            model.set_kv_rotation(args.kv_rotation)?;
            if args.layers.kv_profile.is_some() && args.layers.kv_plan.is_none() {
                return Err(crate::UsageError("--kv-profile goes with --kv-plan auto".into()).into());
            }
            let types = args.layers.types()?;
            if args.layers.any() && !matches!(types, CacheTypes::Layout(_) | CacheTypes::Planned { .. }) {
                return Err(crate::UsageError("bench takes --kv-layout SPEC or --kv-plan auto --kv-bits B".into()).into());
            }
            let profile = if args.layers.kv_plan.is_some() { Some(args.layers.profile(&args.model)?) } else { None };
            let per_layer = types != CacheTypes::Uniform;
            // A plan's layout, window and cells, as generation applies it (a full cache evicts).
            let policy = CachePolicy { types, recent: args.layers.kv_recent, profile, ..CachePolicy::uniform(cache, cache) };
            crate::cache_setup::apply_text(&policy, &mut model, true)?;
            let layout = per_layer.then(|| model.cache().layout());
            model.set_attention(attention);
            reset_peak_rss();
            let vocab = model.model().vocab_size();
            if depth > 0 {
                model.eval(&filler_tokens(depth as usize, vocab, 1), Logits::Last)?;
            }
            for &test in &tests {
                let mut samples = Vec::new();
                for rep in 0..args.repetitions {
                    model.truncate(depth as usize);
                    let seconds = if test == BenchTest::Pp {
                        let prompt = filler_tokens(args.n_prompt as usize, vocab, 100 + rep as u64);
                        let start = Instant::now();
                        model.eval(&prompt, Logits::Last)?;
                        start.elapsed().as_secs_f64() / args.n_prompt as f64
                    } else {
                        let tokens = filler_tokens(args.n_gen as usize, vocab, 200 + rep as u64);
                        let start = Instant::now();
                        for &t in &tokens {
                            model.eval(&[t], Logits::Last)?;
                        }
                        start.elapsed().as_secs_f64() / args.n_gen as f64
                    };
                    samples.push(1.0 / seconds);
                }
                let source = RowSource {
                    args,
                    model: &name,
                    size_bytes: model.model().weight_bytes(),
                    params: model.model().params(),
                    cache,
                    rotated: model.cache().is_rotated(),
                    attention,
                    depth,
                };
                let mut row = source.row(test, samples, model.kv_memory_usage(), None);
                row.kv_layout = layout.as_ref().map(|l| l.to_string());
                row.kv_recent = Some(model.cache().recent_cells()).filter(|&n| n > 0);
                if args.profile {
                    row.profile = Some(profile_one(&mut model, test, args, depth as usize)?);
                }
                rows.push(row);
                bar.inc(1);
            }
            weights = Some(model.into_model());
        }
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// Time per op kind of one prompt evaluation (pp) or one decode step (tg), at the test's depth.
fn profile_one(model: &mut GGMLModel, test: BenchTest, args: &BenchArgs, depth: usize) -> Result<Vec<ccsm::profile::OpTotal>> {
    let vocab = model.model().vocab_size();
    model.truncate(depth);
    let tokens = filler_tokens(if test == BenchTest::Pp { args.n_prompt as usize } else { 2 }, vocab, 300);
    if test == BenchTest::Tg {
        // A first step builds the kept decode graph, so the profiled step is a steady one.
        model.eval(&tokens[..1], Logits::Last)?;
    }
    model.set_profiling(true);
    let run = model.eval(if test == BenchTest::Pp { &tokens } else { &tokens[1..] }, Logits::Last);
    let times = model.take_profile();
    model.set_profiling(false);
    run?;
    Ok(ccsm::profile::by_op(&times))
}
