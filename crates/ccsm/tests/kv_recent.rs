//! The recent window (`--kv-recent N`): the newest cells also kept in f16 beside the cache's typed
//! rows. Bytes follow the block math plus the rings; through appends, truncations and prunes the
//! ring holds only cells among the newest N, loses none it should keep, and holds each as layer 0's
//! rows of an independent f32-cache run (f16-rounded); every visible cell is read from exactly one
//! source; a window that covers the context gives the f32 cache's logits for a prompt and the f16
//! cache's for decoding.

mod common;

use std::collections::BTreeSet;

use ccsm::kv_cache::{rotate_heads, EvictionPolicy, Half, KvCache, KvCacheConfig, Rotation};
use ccsm::llama::LlamaModel;
use ccsm::{CacheType, GGMLModel, Logits, Model, ModelOptions};
use common::{bytes_per_element, model, TINY_LLAMA};
use proptest::prelude::*;

fn tiny(n_ctx: usize, t: CacheType, recent: usize) -> GGMLModel {
    let llama = LlamaModel::load(model(TINY_LLAMA)).unwrap();
    let mut m = GGMLModel::new(llama, ModelOptions { n_ctx, k_type: t, v_type: t, n_threads: 1, n_batch: 64 }).unwrap();
    m.set_kv_recent(recent).unwrap();
    m
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 7) % 200 + 3).collect()
}

/// Worst |a − b| over the largest |b|.
fn relative(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

#[test]
fn window_bytes_are_the_block_math_plus_f16_rings() {
    for (t, recent) in [(CacheType::Q4_0, 16), (CacheType::Q8_0, 1), (CacheType::IQ4NL, 100), (CacheType::F16, 0)] {
        let config = KvCacheConfig::uniform(3, 64, 2, 100, t, t).with_recent(recent);
        let cache = KvCache::new(config.clone()).unwrap();
        let rows = 3.0 * 100.0 * 2.0 * 128.0 * bytes_per_element(t);
        let rings = 3 * 2 * recent * 128 * 2;
        assert_eq!(cache.memory_usage(), rows.round() as usize + rings, "{t} with {recent}");
        assert_eq!(config.bytes().unwrap(), cache.memory_usage());
        assert_eq!(config.recent_bytes().unwrap(), rings);
        assert_eq!(config.cell_bytes().unwrap() as f64, (rows / 100.0).round());
        assert_eq!(cache.recent_cells(), recent);
    }
}

/// Each live cell's (position, layer 0 K row, layer 0 V row) in `m`'s cache, unrotated to f32.
fn layer0_rows(m: &GGMLModel) -> (Vec<f32>, Vec<f32>) {
    let c = m.cache();
    (c.rows_f32(0, Half::K).unwrap(), c.rows_f32(0, Half::V).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Against a naive account of what the window may and must hold, and an f32-cache run of the same
    /// operations as the reference for its contents (layer 0's rows depend only on token and position).
    #[test]
    fn the_window_holds_the_newest_cells_through_appends_truncations_and_prunes(
        recent in 1usize..12,
        ops in proptest::collection::vec((0u8..5, 1usize..20, any::<u32>()), 1..10),
    ) {
        let capacity = 64;
        let mut m = tiny(capacity, CacheType::Q4_0, recent);
        let mut reference = tiny(capacity, CacheType::F32, 0);
        let width = m.cache().config().n_embd_kv().unwrap();
        let head_dim = m.cache().config().head_dim;
        // Positions the window must hold: those appended since anything last dropped or moved cells.
        let mut must: BTreeSet<i32> = BTreeSet::new();
        for (op, n, seed) in ops {
            let len = m.cache().len();
            match op {
                0 | 1 => {
                    let n = n.min(capacity - len);
                    if n == 0 { continue; }
                    let toks = tokens(n, seed);
                    m.eval(&toks, Logits::Last).unwrap();
                    reference.eval(&toks, Logits::Last).unwrap();
                    let newest = m.cache().positions()[len..].iter().rev().take(recent);
                    must.extend(newest);
                }
                2 => {
                    let keep = len.saturating_sub(n);
                    m.truncate(keep);
                    reference.truncate(keep);
                    // Cells after `keep` overwrote older slots: nothing more can be required.
                    must.clear();
                }
                3 => {
                    let keep = len.saturating_sub(n).max(1);
                    let policy = EvictionPolicy::SinkRecent { sinks: 2 };
                    let before: Vec<i32> = (0..len).filter(|&c| m.cache().recent_holds(c)).map(|c| m.cache().positions()[c]).collect();
                    m.cache_prune(keep, policy);
                    reference.cache_prune(keep, policy);
                    // A held cell still among the newest stays held.
                    let now = m.cache().len();
                    must = (0..now).filter(|&c| c + recent >= now && before.contains(&m.cache().positions()[c])).map(|c| m.cache().positions()[c]).collect();
                }
                _ => {
                    m.reset();
                    reference.reset();
                    must.clear();
                }
            }
            let cache = m.cache();
            prop_assert_eq!(cache.positions(), reference.cache().positions());
            let len = cache.len();
            let (ref_k, ref_v) = layer0_rows(&reference);
            let (ring_k, ring_v) = (cache.recent_rows_f32(0, Half::K).unwrap(), cache.recent_rows_f32(0, Half::V).unwrap());
            for c in 0..len {
                let p = cache.positions()[c];
                let held = cache.recent_holds(c);
                prop_assert!(!held || c + recent >= len, "cell {} of {} held outside the newest {}", c, len, recent);
                prop_assert!(held || c + recent < len || !must.contains(&p), "position {} (cell {} of {}) lost from the window", p, c, len);
                if held {
                    let slot = c % recent;
                    for (half, ring, rows) in [(Half::K, &ring_k, &ref_k), (Half::V, &ring_v, &ref_v)] {
                        let mut want = rows[c * width..(c + 1) * width].to_vec();
                        if cache.rotates(0, half) {
                            rotate_heads(&mut want, head_dim);
                        }
                        let got = &ring[slot * width..(slot + 1) * width];
                        prop_assert!(relative(got, &want) < 2e-3, "cell {} {:?}: {}", c, half, relative(got, &want));
                    }
                }
            }
            prop_assert_eq!(cache.memory_usage(), cache.config().bytes().unwrap());
        }
    }

    /// Every cell a query may see is read from exactly one source: the query's newest N from this step
    /// or the ring when either has them, every other visible cell (and nothing else) from the cache.
    #[test]
    fn step_masks_read_each_visible_cell_once(recent in 1usize..10, steps in proptest::collection::vec(1usize..12, 1..6), pad in 0usize..5) {
        let mut cache = KvCache::new(KvCacheConfig::uniform(1, 32, 1, 80, CacheType::Q8_0, CacheType::Q8_0).with_recent(recent)).unwrap();
        for n in steps {
            let cells = cache.append(n).unwrap();
            let n_kv = cache.len() + pad;
            let masks = cache.step_masks(cells.clone(), n_kv);
            for (i, query) in cells.clone().enumerate() {
                for c in 0..n_kv {
                    let visible = c <= query;
                    let newest = visible && query - c < recent;
                    let from_step = cells.contains(&c) && masks.step[i * n + c - cells.start] == 0.0;
                    let from_ring = !cells.contains(&c) && c < cache.len() && cache.recent_holds(c) && masks.ring[i * recent + c % recent] == 0.0;
                    let from_cache = masks.cache[i * n_kv + c] == 0.0;
                    let sources = [from_step, from_ring, from_cache].iter().filter(|&&s| s).count();
                    prop_assert_eq!(sources, usize::from(visible), "query {} cell {}", query, c);
                    if newest && (cells.contains(&c) || cache.recent_holds(c)) {
                        prop_assert!(!from_cache, "query {} reads its newest cell {} quantized", query, c);
                    }
                    prop_assert!(!(from_step || from_ring) || newest, "query {} reads cell {} exactly outside its window", query, c);
                }
                // The ring mask opens only slots of cells the ring holds.
                for slot in 0..recent {
                    if masks.ring[i * recent + slot] == 0.0 {
                        let holder = (0..cache.len()).find(|&c| c % recent == slot && cache.recent_holds(c));
                        prop_assert!(holder.is_some_and(|c| !cells.contains(&c)), "slot {} open for query {}", slot, query);
                    }
                }
            }
        }
    }
}

/// A window as long as the context: a prompt in one step reads every cell from the step's own rows
/// (the f32 cache's logits), decoding token by token reads earlier cells from the f16 ring (the f16
/// cache's logits), whatever the cache's own type.
#[test]
fn a_window_over_the_whole_context_gives_full_precision_logits() {
    let prompt = tokens(40, 3);
    for t in [CacheType::Q4_0, CacheType::IQ4NL] {
        let mut windowed = tiny(64, t, 64);
        let mut exact = tiny(64, CacheType::F32, 0);
        let mut plain = tiny(64, t, 0);
        let (w, e, p) = (
            windowed.eval(&prompt, Logits::All).unwrap(),
            exact.eval(&prompt, Logits::All).unwrap(),
            plain.eval(&prompt, Logits::All).unwrap(),
        );
        let (err, quantized) = (relative(&w, &e), relative(&p, &e));
        assert!(err < 1e-4, "{t} prompt: {err:.2e}");
        assert!(quantized > 20.0 * err, "{t}: the plain cache should differ ({quantized:.2e} vs {err:.2e})");

        let mut windowed = tiny(64, t, 64);
        let mut half = tiny(64, CacheType::F16, 0);
        let mut plain = tiny(64, t, 0);
        for (i, &tok) in prompt.iter().enumerate() {
            let (w, h, p) = (
                windowed.eval(&[tok], Logits::Last).unwrap(),
                half.eval(&[tok], Logits::Last).unwrap(),
                plain.eval(&[tok], Logits::Last).unwrap(),
            );
            let (err, quantized) = (relative(&w, &h), relative(&p, &h));
            // The newest cell comes from the step in f32 where the f16 cache rounds it.
            assert!(err < 3e-3, "{t} token {i}: {err:.2e}");
            if i >= 8 {
                assert!(quantized > 5.0 * err, "{t} token {i}: the plain cache should differ ({quantized:.2e} vs {err:.2e})");
            }
        }
    }
}

/// A window shorter than the prompt: the queries' older cells come from the quantized rows, so the
/// logits sit between the plain quantized cache's and the f32 cache's.
#[test]
fn a_short_window_moves_logits_toward_full_precision() {
    let prompt = tokens(60, 5);
    let mut exact = tiny(64, CacheType::F32, 0);
    let e = exact.eval(&prompt, Logits::All).unwrap();
    let mut errors = Vec::new();
    for recent in [0, 8, 32] {
        let mut m = tiny(64, CacheType::Q4_0, recent);
        errors.push(relative(&m.eval(&prompt, Logits::All).unwrap(), &e));
    }
    assert!(errors[0] > errors[1] && errors[1] > errors[2], "errors by window 0/8/32: {errors:?}");
}

#[test]
fn the_window_refuses_what_it_cannot_do() {
    let mut m = tiny(64, CacheType::Q4_0, 8);
    m.set_eviction(Some(EvictionPolicy::Attention { sinks: 2 }));
    let err = m.eval(&tokens(10, 1), Logits::Last).unwrap_err().to_string();
    assert!(err.contains("recent window"), "{err}");
    assert!(m.cache().is_empty(), "a failed step leaves no cells");
}

trait Prune {
    fn cache_prune(&mut self, keep: usize, policy: EvictionPolicy);
}

impl Prune for GGMLModel {
    fn cache_prune(&mut self, keep: usize, policy: EvictionPolicy) {
        let len = self.cache().len();
        if len > 0 {
            self.prune_caches(keep as f64 / len as f64, policy).unwrap();
        }
    }
}

/// Changing the rotation rotates the rings too: after turning it off, the held rows are layer 0's rows
/// of an f32-cache run as computed, and on again, rotated per head.
#[test]
fn rotation_changes_rotate_the_rings() {
    let toks = tokens(20, 9);
    let mut m = tiny(64, CacheType::Q4_0, 8);
    let mut reference = tiny(64, CacheType::F32, 0);
    m.eval(&toks, Logits::Last).unwrap();
    reference.eval(&toks, Logits::Last).unwrap();
    let width = m.cache().config().n_embd_kv().unwrap();
    let head_dim = m.cache().config().head_dim;
    let (ref_k, _) = layer0_rows(&reference);
    for rotation in [Rotation::Off, Rotation::Quantized] {
        m.set_kv_rotation(rotation).unwrap();
        let ring = m.cache().recent_rows_f32(0, Half::K).unwrap();
        assert_eq!(m.cache().rotates(0, Half::K), rotation == Rotation::Quantized);
        assert!((12..20).filter(|&c| m.cache().recent_holds(c)).count() >= 7, "the ring holds the newest cells");
        for c in (12..20).filter(|&c| m.cache().recent_holds(c)) {
            let mut want = ref_k[c * width..(c + 1) * width].to_vec();
            if m.cache().rotates(0, Half::K) {
                rotate_heads(&mut want, head_dim);
            }
            let got = &ring[(c % 8) * width..(c % 8 + 1) * width];
            assert!(relative(got, &want) < 2e-3, "{rotation:?} cell {c}: {}", relative(got, &want));
        }
        // Generation goes on over the converted cache.
        m.eval(&toks[..1], Logits::Last).unwrap();
        reference.eval(&toks[..1], Logits::Last).unwrap();
    }
}
