//! Per-layer cache types: allocation and bytes per layer, stored rows in each layer's own type,
//! live conversion layer by layer, and the uniform case equal to the one-type path.

mod common;

use ccsm::kv_cache::{EvictionPolicy, Half, KvCache, KvCacheConfig, KvLayout, LayerTypes, Rotation};
use ccsm::llama::LlamaModel;
use ccsm::{CacheType, GGMLModel, Logits, Model, ModelOptions};
use common::{bytes_per_element, model, TINY_LLAMA};
use proptest::prelude::*;

fn any_type() -> impl Strategy<Value = CacheType> {
    proptest::sample::select(CacheType::ALL.to_vec())
}

fn tiny(n_ctx: usize, t: CacheType) -> GGMLModel {
    let llama = LlamaModel::load(model(TINY_LLAMA)).unwrap();
    GGMLModel::new(llama, ModelOptions { n_ctx, k_type: t, v_type: t, n_threads: 1, n_batch: 64 }).unwrap()
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 7) % 200 + 3).collect()
}

/// A naive cache: what every cell should hold, tracked beside the real one.
struct NaiveCache {
    positions: Vec<i32>,
    next: i32,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Bytes are the block math of each layer's own types (an independent table of ggml's block
    /// sizes), and positions follow a naive cache through appends, prunes, conversions and resizes.
    #[test]
    fn layouts_allocate_each_layers_block_math_and_keep_positions(
        layers in proptest::collection::vec((any_type(), any_type()), 1..5),
        ops in proptest::collection::vec((0u8..4, 1usize..40, proptest::collection::vec((any_type(), any_type()), 4)), 1..8),
    ) {
        let (head_dim, n_head_kv, capacity) = (64, 2, 96);
        let layout = KvLayout::new(layers.iter().map(|&(k, v)| LayerTypes::new(k, v)).collect());
        let n_layer = layout.len();
        let config = KvCacheConfig::uniform(n_layer, head_dim, n_head_kv, capacity, CacheType::F16, CacheType::F16).with_layout(layout.clone());
        let mut cache = KvCache::with_rotation(config, Rotation::Quantized).unwrap();
        let naive_bytes = |layout: &KvLayout, cells: usize| -> usize {
            let per: f64 = layout.layers().iter().map(|t| bytes_per_element(t.k) + bytes_per_element(t.v)).sum();
            (per * (head_dim * n_head_kv * cells) as f64).round() as usize
        };
        prop_assert_eq!(cache.memory_usage(), naive_bytes(&layout, capacity));
        prop_assert_eq!(cache.config().bytes().unwrap(), cache.memory_usage());
        let mut naive = NaiveCache { positions: Vec::new(), next: 0 };
        for (op, n, types) in ops {
            match op {
                0 => {
                    let room = cache.capacity() - cache.len();
                    let n = n.min(room);
                    cache.append(n).unwrap();
                    naive.positions.extend((0..n as i32).map(|i| naive.next + i));
                    naive.next += n as i32;
                }
                1 => {
                    let keep = cache.len() / 2;
                    cache.prune(keep, EvictionPolicy::SinkRecent { sinks: 2 }).unwrap();
                    // Sinks, then the most recent cells, in cell order.
                    let len = naive.positions.len();
                    let sinks = 2.min(keep);
                    let kept: Vec<i32> = naive.positions[..sinks].iter().chain(&naive.positions[len - (keep - sinks)..]).copied().collect();
                    naive.positions = kept;
                }
                2 => {
                    let to = KvLayout::new((0..n_layer).map(|l| LayerTypes::new(types[l % 4].0, types[l % 4].1)).collect());
                    let report = cache.quantize_layout(to.clone()).unwrap();
                    prop_assert_eq!(cache.layout(), to.clone());
                    prop_assert_eq!(report.bytes_after, naive_bytes(&to, cache.capacity()));
                }
                _ => {
                    let cells = (cache.len() + n).min(200);
                    cache.resize(cells.max(1), EvictionPolicy::SinkRecent { sinks: 2 }).unwrap();
                    let layout = cache.layout();
                    prop_assert_eq!(cache.memory_usage(), naive_bytes(&layout, cells.max(1)));
                }
            }
            prop_assert_eq!(cache.positions(), naive.positions.as_slice());
            prop_assert_eq!(cache.memory_usage(), cache.config().bytes().unwrap());
            for l in 0..n_layer {
                let t = cache.config().types(l);
                prop_assert_eq!(cache.rotates(l, Half::K), t.k.is_quantized());
                prop_assert_eq!(cache.rotates(l, Half::V), t.v.is_quantized());
            }
        }
    }
}

/// Every layer stores its rows in its own type: the rows a mixed cache holds after a prompt are
/// the f32 cache's rows put through that layer's type (ggml's quantizer, rotated where the cache
/// rotates), and a live conversion of an f32 cache to the layout stores the same bytes.
#[test]
fn each_layer_stores_rows_in_its_own_type() {
    let prompt = tokens(40, 1);
    let mut reference = tiny(64, CacheType::F32);
    reference.eval(&prompt, Logits::Last).unwrap();
    let n_layer = reference.cache().config().n_layer;
    let layout = KvLayout::new(
        (0..n_layer)
            .map(|l| [LayerTypes::new(CacheType::Q4_0, CacheType::Q8_0), LayerTypes::new(CacheType::F16, CacheType::IQ4NL)][l % 2])
            .collect(),
    );
    let mut mixed = tiny(64, CacheType::F16);
    mixed.quantize_kv_layout(layout.clone()).unwrap();
    mixed.eval(&prompt, Logits::Last).unwrap();
    let mut converted = tiny(64, CacheType::F32);
    converted.eval(&prompt, Logits::Last).unwrap();
    converted.quantize_kv_layout(layout.clone()).unwrap();
    let c = reference.cache().config().clone();
    let width = c.head_dim * c.n_head_kv;
    for l in 0..n_layer {
        for half in Half::BOTH {
            let t = layout.layers()[l].get(half);
            let mut rows = reference.cache().rows_f32(l, half).unwrap();
            if t.is_quantized() {
                ccsm::kv_cache::rotate_heads(&mut rows, c.head_dim);
            }
            let expected = t.dtype().dequantize(&t.dtype().quantize(&rows, width).unwrap(), rows.len()).unwrap();
            let scale = rows.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Layers past the first see their inputs through the earlier layers' quantized rows, so
            // only layer 0 of the stepped cache is comparable with the f32 run.
            let caches = if l == 0 {
                vec![("stepped", mixed.cache()), ("converted", converted.cache())]
            } else {
                vec![("converted", converted.cache())]
            };
            for (what, cache) in caches {
                let stored = cache.rows_f32(l, half).unwrap();
                let worst = stored.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                // The stepped cache's rows come from graph arithmetic, equal to the f32 run's up to
                // rounding; a quantization step away would be ≥ scale / 16 for 4-bit types.
                let tol = if what == "converted" { 0.0 } else { 1e-3 * scale.max(1.0) };
                assert!(worst <= tol + f32::EPSILON, "{what} layer {l} {}: {t} rows off by {worst} (scale {scale})", half.name());
            }
        }
    }
    assert_eq!(mixed.kv_memory_usage(), c.clone().with_layout(layout).bytes().unwrap());
}

/// A layout whose layers all share a type generates exactly what the one-type cache does.
#[test]
fn a_uniform_layout_equals_the_one_type_cache() {
    let prompt = tokens(30, 2);
    for t in [CacheType::Q4_0, CacheType::Q5_1, CacheType::F16] {
        let mut plain = tiny(64, t);
        let mut layered = tiny(64, CacheType::F32);
        let n_layer = layered.cache().config().n_layer;
        layered.quantize_kv_layout(KvLayout::uniform(n_layer, t, t)).unwrap();
        assert!(layered.cache().config().layout().is_some(), "the per-layer path is the one under test");
        let (a, b) = (plain.eval(&prompt, Logits::All).unwrap(), layered.eval(&prompt, Logits::All).unwrap());
        assert_eq!(a, b, "{t}: prompt logits");
        let mut next = *prompt.last().unwrap();
        for _ in 0..8 {
            let (a, b) = (plain.forward(&[next]).unwrap(), layered.forward(&[next]).unwrap());
            assert_eq!(a, b, "{t}: decode logits");
            next = ccsm::sampling::argmax(&a) as u32;
        }
    }
}

/// Errors of a layout name the layer.
#[test]
fn layout_errors_name_the_layer() {
    let config = KvCacheConfig::uniform(3, 64, 2, 16, CacheType::F16, CacheType::F16);
    let wrong_length = config.clone().with_layout(KvLayout::uniform(2, CacheType::Q4_0, CacheType::Q4_0));
    let err = wrong_length.validate().unwrap_err().to_string();
    assert!(err.contains("a layout of 2 layers for a cache of 3"), "{err}");
    let spec = KvLayout::parse("0-5:q4_0", 3).unwrap_err();
    assert!(spec.contains("layers 0-2"), "{spec}");
}
