//! The memory optimizer: strategy thresholds, cache operations against a naive model of the cache,
//! and a long run under a budget.

mod common;

use ccsm::csm::{CsmGenerator, CsmModel, CsmOptions, Row};
use ccsm::kv_cache::{EvictionPolicy, KvCache, KvCacheConfig};
use ccsm::llama::LlamaModel;
use ccsm::memory::Strategy as Plan;
use ccsm::memory::{self, ManagedCache};
use ccsm::sampling::argmax;
use ccsm::sampling::{Sampler, SamplerConfig};
use ccsm::{CacheType, GGMLModel, Logits, Model, ModelOptions};
use common::{bytes_per_element, model, SMOLLM2, TINY_LLAMA};
use ggml::{Backend, ComputeBuffer, DType};
use proptest::prelude::*;

#[test]
fn strategy_thresholds_at_and_around_each_boundary() {
    let cases = [
        (10.0, Plan::Nothing),
        (1.0, Plan::Nothing),
        (0.999_999, Plan::Resize),
        (0.5, Plan::Resize),
        (0.499_999, Plan::Q8ThenResize),
        (0.25, Plan::Q8ThenResize),
        (0.249_999, Plan::Q4ThenPrune),
        (0.0, Plan::Q4ThenPrune),
    ];
    for (r, want) in cases {
        assert_eq!(Plan::for_ratio(r), want, "r = {r}");
    }
}

fn tiny(n_ctx: usize) -> GGMLModel {
    let options = ModelOptions { n_ctx, k_type: CacheType::F32, v_type: CacheType::F32, n_threads: 1, n_batch: 64 };
    GGMLModel::new(LlamaModel::load(model(TINY_LLAMA)).unwrap(), options).unwrap()
}

#[test]
fn the_optimizer_takes_the_branch_the_ratio_selects() {
    let tokens: Vec<u32> = (0..100).map(|i| 10 + i % 200).collect();
    let full = tiny(256).kv_memory_usage(); // f32, 256 cells
    let policy = EvictionPolicy::SinkRecent { sinks: 4 };
    // Bytes per cell from the block math: 2 layers × (K + V) × 64 values × bytes per element.
    let per_cell = |t: CacheType| {
        (2.0 * 2.0
            * 64.0
            * match t {
                CacheType::F32 => 4.0,
                CacheType::Q8_0 => 34.0 / 32.0,
                _ => 18.0 / 32.0,
            }) as usize
    };
    // (budget, expected strategy, expected type): q8_0 is 26.6 % of f32, q4_0 14 %.
    let cases = [
        (full, Plan::Nothing, CacheType::F32),
        (full - 1, Plan::Resize, CacheType::F32),
        (full / 2, Plan::Resize, CacheType::F32),
        (full / 2 - 1, Plan::Q8ThenResize, CacheType::Q8_0), // fits without resizing
        (full / 4, Plan::Q8ThenResize, CacheType::Q8_0),     // resized
        (full / 4 - 1, Plan::Q4ThenPrune, CacheType::Q4_0),  // fits without pruning
        (full / 10, Plan::Q4ThenPrune, CacheType::Q4_0),     // pruned and resized
    ];
    for (budget, strategy, t) in cases {
        let max_cells = (budget / per_cell(t)).min(256);
        let mut m = tiny(256);
        m.eval(&tokens, Logits::Last).unwrap();
        let report = m.optimize_memory(budget, policy).unwrap();
        assert_eq!(report.strategy, strategy, "budget {budget} of {full}");
        assert_eq!(m.cache().k_type(), t);
        assert_eq!(m.cache().capacity(), max_cells, "{budget}: {} cells", m.cache().capacity());
        assert!(m.kv_memory_usage() <= budget, "{budget}: {} bytes after", m.kv_memory_usage());
        assert_eq!(report.bytes_after(), m.kv_memory_usage());
        // Generation goes on at the next position.
        let next_position = m.cache().next_position();
        m.set_eviction(Some(policy));
        m.eval(&[42], Logits::Last).unwrap();
        assert_eq!(*m.cache().positions().last().unwrap(), next_position);
    }
    // Extremes: no budget at all is refused before anything changes; a huge one changes nothing.
    let mut m = tiny(256);
    assert!(m.optimize_memory(100, policy).is_err());
    assert_eq!(m.cache().k_type(), CacheType::F32);
    assert_eq!(m.optimize_memory(usize::MAX / 2, policy).unwrap().strategy, Plan::Nothing);
}

/// A cache operation for the property test.
#[derive(Clone, Debug)]
enum Op {
    Append(usize),
    Prune(usize, bool),
    Resize(usize, bool),
    Quantize(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..20).prop_map(Op::Append),
        (0usize..40, any::<bool>()).prop_map(|(k, a)| Op::Prune(k, a)),
        (16usize..80, any::<bool>()).prop_map(|(c, a)| Op::Resize(c, a)),
        (0usize..5).prop_map(Op::Quantize),
    ]
}

/// Writes rows whose every element is the cell's position (through the cache's own store nodes).
fn store_rows(cache: &KvCache, cells: std::ops::Range<usize>) {
    let width = cache.config().n_embd_kv().unwrap();
    let mut compute = ComputeBuffer::new().unwrap();
    let ctx = compute.context(16, 16).unwrap();
    let n = cells.len() as i64;
    let rows = ctx.new_tensor(DType::F32, &[width as i64, n]).unwrap().set_input();
    let idx = ctx.new_tensor(DType::I64, &[n]).unwrap().set_input();
    let mut graph = ctx.new_graph(16).unwrap();
    graph.expand(cache.store_k(&ctx, 0, rows, idx).unwrap()).unwrap();
    graph.expand(cache.store_v(&ctx, 0, rows, idx).unwrap()).unwrap();
    ctx.allocate(&graph).unwrap();
    let values: Vec<f32> = cells.clone().flat_map(|c| std::iter::repeat_n(cache.positions()[c] as f32, width)).collect();
    rows.write_f32(&values).unwrap();
    idx.write_i64(&KvCache::cell_indices(cells)).unwrap();
    Backend::cpu(1).unwrap().compute(&graph).unwrap();
}

/// Every live K and V row still holds its cell's position (within the type's rounding).
fn rows_hold_positions(cache: &KvCache) -> bool {
    if cache.is_empty() {
        return true;
    }
    let mut compute = ComputeBuffer::new().unwrap();
    let ctx = compute.context(8, 8).unwrap();
    let (k, v) = (cache.k_tensor(&ctx, 0, cache.len()).unwrap(), cache.v_tensor(&ctx, 0, cache.len()).unwrap());
    let width = cache.config().n_embd_kv().unwrap();
    [k, v].iter().zip([cache.k_type(), cache.v_type()]).all(|(t, ty)| {
        let values = ty.dtype().dequantize(&t.read_bytes().unwrap(), cache.len() * width).unwrap();
        values.chunks(width).zip(cache.positions()).all(|(row, &p)| row.iter().all(|&x| (x - p as f32).abs() <= 0.02 * (p as f32).max(1.0)))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Appends, prunes, resizes and conversions against a naive list of (cell → position).
    #[test]
    fn cache_operations_match_a_naive_model(ops in proptest::collection::vec(op(), 1..12)) {
        let mut cache = KvCache::new(KvCacheConfig::uniform(1, 32, 1, 40, CacheType::F32, CacheType::F32)).unwrap();
        let mut naive: Vec<i32> = Vec::new();
        let mut next = 0i32;
        for op in ops {
            let policy = |attention| if attention { EvictionPolicy::Attention { sinks: 2 } } else { EvictionPolicy::SinkRecent { sinks: 2 } };
            match op {
                Op::Append(n) => {
                    if cache.len() + n <= cache.capacity() {
                        let cells = cache.append(n).unwrap();
                        store_rows(&cache, cells);
                        naive.extend(next..next + n as i32);
                        next += n as i32;
                    } else {
                        prop_assert!(cache.append(n).is_err());
                    }
                }
                Op::Prune(keep, attention) => {
                    cache.prune(keep, policy(attention)).unwrap();
                    if keep < naive.len() {
                        // No scores were recorded, and ties favour the most recent: both policies agree.
                        let sinks = 2.min(keep);
                        let recent = keep - sinks;
                        let kept: Vec<i32> = naive[..sinks].iter().chain(&naive[naive.len() - recent..]).copied().collect();
                        naive = kept;
                    }
                }
                Op::Resize(capacity, attention) => {
                    cache.resize(capacity, policy(attention)).unwrap();
                    if capacity < naive.len() {
                        let sinks = 2.min(capacity);
                        let kept: Vec<i32> = naive[..sinks].iter().chain(&naive[naive.len() - (capacity - sinks)..]).copied().collect();
                        naive = kept;
                    }
                }
                Op::Quantize(t) => {
                    let t = CacheType::ALL[t];
                    cache.quantize(t, t).unwrap();
                }
            }
            prop_assert_eq!(cache.positions(), naive.as_slice());
            prop_assert!(cache.len() <= cache.capacity());
            prop_assert_eq!(cache.next_position(), next);
            let want = cache.config().bytes().unwrap();
            prop_assert_eq!(cache.memory_usage(), want);
            prop_assert!(rows_hold_positions(&cache), "rows moved away from their positions");
        }
    }

    /// Model-level actions under a budget: after each, the caches fit and generation still runs.
    #[test]
    fn generation_runs_after_every_action(actions in proptest::collection::vec((0usize..4, 1usize..60), 1..6)) {
        let mut m = tiny(128);
        let policy = EvictionPolicy::SinkRecent { sinks: 4 };
        m.set_eviction(Some(policy));
        let mut budget = usize::MAX;
        for (kind, amount) in actions {
            match kind {
                0 => { m.eval(&(0..amount as u32).map(|i| 5 + i).collect::<Vec<_>>(), Logits::Last).unwrap(); }
                1 => { m.prune_caches(amount as f64 / 60.0, policy).unwrap(); }
                2 => {
                    budget = budget.min(m.kv_memory_usage() * amount / 60 + 1);
                    if m.optimize_memory(budget, policy).is_err() {
                        budget = usize::MAX; // below the minimal cache: refused, nothing changed
                    }
                }
                // Narrowing only: a requested widening may exceed a budget by design.
                _ => { m.quantize_kv_cache(CacheType::Q4_0, CacheType::Q4_0).unwrap(); }
            }
            prop_assert!(m.cache().len() <= m.cache().capacity());
            prop_assert!(m.kv_memory_usage() <= budget);
            let logits = m.eval(&[7], Logits::Last).unwrap();
            prop_assert!(logits.iter().all(|l| l.is_finite()));
        }
    }
}

/// Bytes of a cache from the block math alone (independent of ggml and of the cache's own sizing).
fn block_math_bytes(n_layer: usize, width: usize, cells: usize, k: CacheType, v: CacheType) -> usize {
    (n_layer as f64 * cells as f64 * width as f64 * (bytes_per_element(k) + bytes_per_element(v))) as usize
}

/// The least a set of caches can be brought to: every half at q4_0 or its own type if that is smaller
/// (mxfp4: the optimizer only narrows), resizable ones at 16 cells (or fewer if they have fewer).
fn minimal_bytes(caches: &[(&KvCache, bool)]) -> usize {
    let narrowed = |t: CacheType| if bytes_per_element(t) < bytes_per_element(CacheType::Q4_0) { t } else { CacheType::Q4_0 };
    caches
        .iter()
        .map(|(c, resizable)| {
            let cfg = c.config();
            let cells = if *resizable { cfg.capacity.min(16) } else { cfg.capacity };
            block_math_bytes(cfg.n_layer, cfg.head_dim * cfg.n_head_kv, cells, narrowed(cfg.k_type()), narrowed(cfg.v_type()))
        })
        .sum()
}

fn cache(n_layer: usize, n_head_kv: usize, head_dim: usize, capacity: usize, k: CacheType, v: CacheType) -> KvCache {
    KvCache::new(KvCacheConfig::uniform(n_layer, head_dim, n_head_kv, capacity, k, v)).unwrap()
}

/// The example: CSM-1B's two caches at `-c 24` in f32 under 1 MiB. Resizing alone would clamp
/// the backbone to 16 cells (1.25 MiB with the decoder): the optimizer must take the next step.
#[test]
fn csm_1b_shape_with_24_cells_fits_one_mib() {
    let mut backbone = cache(16, 8, 64, 24, CacheType::F32, CacheType::F32);
    let mut decoder = cache(4, 2, 128, 32, CacheType::F32, CacheType::F32);
    backbone.append(20).unwrap();
    let budget = 1 << 20;
    let caches = vec![
        ManagedCache { role: ccsm::CacheRole::Backbone, cache: &mut backbone, resizable: true },
        ManagedCache { role: ccsm::CacheRole::Decoder, cache: &mut decoder, resizable: false },
    ];
    let report = memory::optimize(caches, budget, EvictionPolicy::default()).unwrap();
    let total = backbone.memory_usage() + decoder.memory_usage();
    eprintln!("{:?} (from {:?}): {total} bytes in {budget}; {:?}", report.strategy, report.escalated_from, report.actions);
    assert!(total <= budget, "{total} bytes in a budget of {budget}");
    assert_eq!(report.bytes_after(), total);
    assert_eq!(report.escalated_from, Some(Plan::Resize), "r = {} selects resize, which cannot fit", report.ratio);
    assert_eq!(
        total,
        block_math_bytes(16, 512, backbone.capacity(), backbone.k_type(), backbone.v_type())
            + block_math_bytes(4, 256, 32, decoder.k_type(), decoder.v_type())
    );
}

fn any_type() -> impl Strategy<Value = CacheType> {
    (0usize..CacheType::ALL.len()).prop_map(|i| CacheType::ALL[i])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any budget: at or above the minimal layout the caches end within it (by block math), below it
    /// the optimizer refuses and changes nothing. Small capacities make the 16-cell clamp bite; with
    /// `decoder` a fixed cache stands beside the resizable one, as in CSM.
    #[test]
    fn budgets_hold_where_the_cell_clamp_applies(
        (layers, heads, head_dim) in (1usize..5, 1usize..4, prop_oneof![Just(32usize), Just(64)]),
        capacity in 1usize..48,
        filled in 0usize..48,
        (k, v) in (any_type(), any_type()),
        decoder in proptest::option::of((1usize..4, 1usize..33, any_type())),
        per_mille in 1usize..1100,
    ) {
        let mut main = cache(layers, heads, head_dim, capacity, k, v);
        main.append(filled.min(capacity)).unwrap();
        let mut fixed = decoder.map(|(l, cells, t)| cache(l, 1, 32, cells, t, t));
        let minimum = minimal_bytes(&[(&main, true)]) + fixed.as_ref().map_or(0, |d| minimal_bytes(&[(d, false)]));
        let current = main.memory_usage() + fixed.as_ref().map_or(0, KvCache::memory_usage);
        let budget = (current * per_mille / 1000).max(1);
        let before = (main.config().clone(), fixed.as_ref().map(|d| d.config().clone()));
        let mut caches = vec![ManagedCache { role: ccsm::CacheRole::Text, cache: &mut main, resizable: true }];
        if let Some(d) = fixed.as_mut() {
            caches.push(ManagedCache { role: ccsm::CacheRole::Decoder, cache: d, resizable: false });
        }
        let result = memory::optimize(caches, budget, EvictionPolicy::default());
        let total = main.memory_usage() + fixed.as_ref().map_or(0, KvCache::memory_usage);
        if budget >= minimum {
            let report = result.unwrap();
            prop_assert!(total <= budget, "{total} bytes in {budget} ({report:?})");
            let block_math = block_math_bytes(layers, heads * head_dim, main.capacity(), main.k_type(), main.v_type())
                + fixed.as_ref().map_or(0, |d| block_math_bytes(d.config().n_layer, 32, d.capacity(), d.k_type(), d.v_type()));
            prop_assert_eq!(total, block_math);
            prop_assert!(main.len() <= main.capacity());
        } else {
            prop_assert!(result.is_err(), "{budget} below the minimum {minimum} was accepted");
            prop_assert_eq!((main.config().clone(), fixed.as_ref().map(|d| d.config().clone())), before, "a refused budget changed the caches");
        }
    }

    /// The same through the models: tiny-llama's cache, and tiny-csm's backbone and decoder caches,
    /// with contexts small enough for the clamp; generation runs after every accepted budget.
    #[test]
    fn model_budgets_hold_for_llama_and_both_csm_caches(n_ctx in 1usize..40, per_mille in 1usize..1100, csm in any::<bool>()) {
        let policy = EvictionPolicy::SinkRecent { sinks: 2 };
        let (total, budget, minimum, result) = if csm {
            let options = CsmOptions { n_ctx, k_type: CacheType::F32, v_type: CacheType::F32, n_threads: 1, n_batch: 16 };
            let mut g = CsmGenerator::new(CsmModel::load(model("tiny-csm.gguf")).unwrap(), options).unwrap();
            let minimum = minimal_bytes(&[(g.backbone_cache(), true), (g.decoder_cache(), false)]);
            let budget = (g.kv_memory_usage() * per_mille / 1000).max(1);
            let result = g.optimize_memory(budget, policy);
            // A cache of a few cells cannot keep 2 sinks and make room: generate where it can.
            if result.is_ok() && g.backbone_cache().capacity() >= 8 {
                g.set_eviction(Some(policy));
                g.prefill(&[Row::Text(1), Row::Text(2)]).unwrap();
                let mut greedy = Sampler::new(SamplerConfig { temperature: 0.0, ..Default::default() }).unwrap();
                g.generate_frame(&mut greedy, None).unwrap();
            }
            (g.kv_memory_usage(), budget, minimum, result)
        } else {
            let mut m = tiny(n_ctx);
            let minimum = minimal_bytes(&[(m.cache(), true)]);
            let budget = (m.kv_memory_usage() * per_mille / 1000).max(1);
            let result = m.optimize_memory(budget, policy);
            if result.is_ok() && m.cache().capacity() >= 8 {
                m.set_eviction(Some(policy));
                m.eval(&[5, 6, 7], Logits::Last).unwrap();
            }
            (m.kv_memory_usage(), budget, minimum, result)
        };
        prop_assert_eq!(result.is_ok(), budget >= minimum, "budget {} minimum {}: {:?}", budget, minimum, result.as_ref().err());
        if result.is_ok() {
            prop_assert!(total <= budget, "{total} bytes in {budget}");
        }
    }
}

/// A long greedy run on SmolLM2 under a budget far below its cache: bytes checked at every step.
#[test]
fn a_long_run_never_exceeds_its_budget() {
    let options = ModelOptions { n_ctx: 2048, k_type: CacheType::F32, v_type: CacheType::F32, n_threads: 2, n_batch: 256 };
    let mut m = GGMLModel::new(LlamaModel::load(model(SMOLLM2)).unwrap(), options).unwrap();
    let budget = 2 << 20; // 2 MiB, 2 % of the 90 MiB f32 cache
    let policy = EvictionPolicy::SinkRecent { sinks: 4 };
    let report = m.optimize_memory(budget, policy).unwrap();
    m.set_eviction(Some(policy));
    assert!(m.kv_memory_usage() <= budget, "{report:?}");
    let prompt = m.model().tokenizer().encode("The Jargon File is a glossary of hacker slang.").unwrap();
    let mut next = argmax(&m.eval(&prompt, Logits::Last).unwrap()) as u32;
    let capacity = m.cache().capacity();
    for step in 0..400 {
        next = argmax(&m.eval(&[next], Logits::Last).unwrap()) as u32;
        assert!(m.kv_memory_usage() <= budget, "step {step}: {} bytes", m.kv_memory_usage());
    }
    assert!(m.cache().next_position() as usize > capacity, "the run went past the cache's capacity");
    assert_eq!(m.cache().next_position() as usize, prompt.len() + 400);
}

/// The attention policy keeps the sinks and the cells with the most recorded attention, in order.
#[test]
fn attention_policy_keeps_the_most_attended_cells() {
    let mut cache = KvCache::new(KvCacheConfig::uniform(1, 32, 1, 16, CacheType::F32, CacheType::F32)).unwrap();
    cache.append(10).unwrap();
    cache.add_scores(&[9.0, 0.1, 5.0, 0.2, 7.0, 0.3, 0.4, 6.0, 0.5, 0.6]);
    let policy = EvictionPolicy::Attention { sinks: 1 };
    // Sink: cell 0; then the three largest of cells 1.. : 4 (7.0), 7 (6.0), 2 (5.0).
    assert_eq!(cache.cells_to_keep(4, policy), vec![0, 2, 4, 7]);
    cache.prune(4, policy).unwrap();
    assert_eq!(cache.positions(), &[0, 2, 4, 7]);
    assert_eq!(cache.scores(), &[9.0, 5.0, 7.0, 6.0]);
    assert_eq!(cache.next_position(), 10, "new tokens continue after the evicted ones");
    // Sink-recent on the same cache ignores the scores.
    assert_eq!(cache.cells_to_keep(2, EvictionPolicy::SinkRecent { sinks: 1 }), vec![0, 3]);
}
