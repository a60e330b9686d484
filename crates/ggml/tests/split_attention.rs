//! The split-by-cells attention kernel against naive f64 attention over the values the cache holds
//! (decoded from its bytes independently of ggml), for every K×V type pair, grouped-query heads, causal
//! masks with masked padding, and cell counts around its block (32) and part (256) sizes.

mod common;

use common::{decode, Rng, CACHE_TYPES};
use ggml::{Backend, Context, DType, Tensor};

struct Case {
    hd: usize,
    n_q: usize,
    n_kv: usize,
    /// Cells past this are padding (masked for every query).
    live: usize,
    n_head: usize,
    n_head_kv: usize,
}

fn tensor_from<'c>(ctx: &'c Context, dtype: DType, shape: &[i64], values: &[f32]) -> Tensor<'c> {
    let t = ctx.new_tensor(dtype, shape).unwrap();
    t.write_f32(values).unwrap();
    t
}

/// Query t sits at position live - n_q + t and sees the cells up to it.
fn mask(c: &Case) -> Vec<f32> {
    (0..c.n_q).flat_map(|t| (0..c.n_kv).map(move |j| if j < c.live - c.n_q + t + 1 { 0.0 } else { f32::NEG_INFINITY })).collect()
}

/// Naive attention in f64: q [n_q][n_head][hd], k/v [n_kv][n_head_kv][hd] → [n_q][n_head][hd].
fn naive(c: &Case, q: &[f32], k: &[f32], v: &[f32], mask: &[f32]) -> Vec<f64> {
    let scale = 1.0 / (c.hd as f64).sqrt();
    let mut out = Vec::new();
    for t in 0..c.n_q {
        for h in 0..c.n_head {
            let g = h / (c.n_head / c.n_head_kv);
            let qh = &q[(t * c.n_head + h) * c.hd..][..c.hd];
            let scores: Vec<f64> = (0..c.n_kv)
                .map(|j| {
                    let kj = &k[(j * c.n_head_kv + g) * c.hd..][..c.hd];
                    scale * qh.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + mask[t * c.n_kv + j] as f64
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for i in 0..c.hd {
                out.push((0..c.n_kv).map(|j| w[j] / z * v[(j * c.n_head_kv + g) * c.hd + i] as f64).sum());
            }
        }
    }
    out
}

/// Runs split_attention on random rows of the case; returns its worst error against naive attention
/// over the stored K and V values (see `worst_relative`).
fn split_error(c: &Case, k_type: DType, v_type: DType, rng: &mut Rng) -> f64 {
    let (hd, n_q, n_kv) = (c.hd as i64, c.n_q as i64, c.n_kv as i64);
    let q = rng.normals(c.hd * c.n_head * c.n_q);
    let (k, v) = (rng.normals(c.hd * c.n_head_kv * c.n_kv), rng.normals(c.hd * c.n_head_kv * c.n_kv));
    let m = mask(c);
    let ctx = Context::with_data(32, 64 << 20).unwrap();
    // As the cache lays them out: [hd, n_head_kv, n_kv] and queries [hd, n_head, n_q], then permuted.
    let qt = ctx.permute(tensor_from(&ctx, DType::F32, &[hd, c.n_head as i64, n_q], &q), [0, 2, 1, 3]).unwrap();
    let k_raw = tensor_from(&ctx, k_type, &[hd, c.n_head_kv as i64, n_kv], &k);
    let v_raw = tensor_from(&ctx, v_type, &[hd, c.n_head_kv as i64, n_kv], &v);
    let kt = ctx.permute(k_raw, [0, 2, 1, 3]).unwrap();
    let vt = ctx.permute(v_raw, [0, 2, 1, 3]).unwrap();
    let mt = tensor_from(&ctx, DType::F16, &[n_kv, n_q], &m);
    let scale = 1.0 / (c.hd as f32).sqrt();
    let out = ctx.split_attention(qt, kt, vt, mt, scale).unwrap();
    assert_eq!(out.shape(), [hd, c.n_head as i64, n_q, 1]);
    let mut graph = ctx.new_graph(64).unwrap();
    graph.expand(out).unwrap();
    Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
    let k_stored = decode(k_type, &k_raw.read_bytes().unwrap(), k.len());
    let v_stored = decode(v_type, &v_raw.read_bytes().unwrap(), v.len());
    worst_relative(&out.read_f32().unwrap(), &naive(c, &q, &k_stored, &v_stored, &m), &v_stored)
}

/// The worst |Δ| over the largest |v| (outputs are convex combinations of V rows).
fn worst_relative(got: &[f32], want: &[f64], v: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let v_max = v.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
    got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max) / v_max
}

#[test]
fn split_attention_matches_naive_attention_for_all_64_pairs() {
    let mut rng = Rng::new(20261201);
    // 700 cells: three parts of 256 and a half-filled last block; 9 query heads over 3 KV heads.
    let c = Case { hd: 64, n_q: 1, n_kv: 700, live: 650, n_head: 9, n_head_kv: 3 };
    for k_type in CACHE_TYPES {
        for v_type in CACHE_TYPES {
            let err = split_error(&c, k_type, v_type, &mut rng);
            // The kernel reads the stored values exactly; only f32 rounding remains.
            assert!(err < 2e-5, "K {k_type} V {v_type}: {err:.2e}");
        }
    }
}

#[test]
fn split_attention_handles_every_cell_count_and_query_count() {
    let mut rng = Rng::new(7);
    for (n_kv, live) in [(1, 1), (31, 31), (32, 20), (33, 33), (255, 255), (256, 256), (257, 130), (512, 300), (1100, 1099)] {
        for n_q in [1, 2, 3] {
            if live < n_q {
                continue;
            }
            for (n_head, n_head_kv, hd) in [(4, 4, 64), (6, 2, 128), (8, 1, 32)] {
                let c = Case { hd, n_q, n_kv, live, n_head, n_head_kv };
                let err = split_error(&c, DType::Q8_0, DType::Q4_1, &mut rng);
                assert!(err < 2e-5, "{n_kv} cells ({live} live), {n_q} queries, {n_head}/{n_head_kv} heads of {hd}: {err:.2e}");
            }
        }
    }
}

/// Prompt-sized batches: query counts around one of ggml's 64-row tiles, and a 512-row prompt over
/// 2100 cells, where the parts are capped by the bytes of their partial results (fewer, longer parts).
#[test]
fn split_attention_handles_prompt_batches() {
    let mut rng = Rng::new(11);
    for (n_q, n_kv, live) in [(63, 300, 300), (64, 300, 200), (65, 1100, 1099), (512, 2100, 2100)] {
        let c = Case { hd: 64, n_q, n_kv, live, n_head: 9, n_head_kv: 3 };
        for (k_type, v_type) in [(DType::F16, DType::F16), (DType::Q4_0, DType::Q8_0)] {
            let err = split_error(&c, k_type, v_type, &mut rng);
            assert!(err < 2e-5, "{k_type}/{v_type}: {n_q} queries over {n_kv} cells ({live} live): {err:.2e}");
        }
    }
}

/// A quantized cache dequantized to f32 for ggml's tiled flash attention (what prefill does at and
/// above 64 queries) gives naive attention over the stored values too, without the query rounding of
/// the quantized path.
#[test]
fn flash_attention_over_dequantized_rows_matches_naive_attention() {
    let mut rng = Rng::new(99);
    for n_q in [63, 64, 65] {
        let c = Case { hd: 64, n_q, n_kv: 300, live: 300, n_head: 4, n_head_kv: 2 };
        for t in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            let (hd, n_kv) = (c.hd as i64, c.n_kv as i64);
            let q = rng.normals(c.hd * c.n_head * c.n_q);
            let (k, v) = (rng.normals(c.hd * c.n_head_kv * c.n_kv), rng.normals(c.hd * c.n_head_kv * c.n_kv));
            let m = mask(&c);
            let ctx = Context::with_data(32, 64 << 20).unwrap();
            let qt = ctx.permute(tensor_from(&ctx, DType::F32, &[hd, c.n_head as i64, n_q as i64], &q), [0, 2, 1, 3]).unwrap();
            let k_raw = tensor_from(&ctx, t, &[hd, c.n_head_kv as i64, n_kv], &k);
            let v_raw = tensor_from(&ctx, t, &[hd, c.n_head_kv as i64, n_kv], &v);
            let f32_copy = |x| ctx.cpy(x, ctx.new_tensor(DType::F32, &Tensor::shape(x)[..3]).unwrap()).unwrap();
            let (kt, vt) = (ctx.permute(f32_copy(k_raw), [0, 2, 1, 3]).unwrap(), ctx.permute(f32_copy(v_raw), [0, 2, 1, 3]).unwrap());
            let mt = tensor_from(&ctx, DType::F16, &[n_kv, n_q as i64], &m);
            let out = ctx.flash_attn_ext(qt, kt, vt, Some(mt), 1.0 / 8.0).unwrap();
            let mut graph = ctx.new_graph(64).unwrap();
            graph.expand(out).unwrap();
            Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
            let (k_s, v_s) = (decode(t, &k_raw.read_bytes().unwrap(), k.len()), decode(t, &v_raw.read_bytes().unwrap(), v.len()));
            let err = worst_relative(&out.read_f32().unwrap(), &naive(&c, &q, &k_s, &v_s, &m), &v_s);
            assert!(err < 2e-5, "{t}, {n_q} queries: {err:.2e}");
        }
    }
}

/// The copy that would feed f16 flash attention from a quantized cache aborts inside ggml (its CPU
/// `dup` has no quantized → f16 path, and supports_op says yes): the wrapper refuses it.
#[test]
fn quantized_to_f16_copies_are_refused() {
    let ctx = Context::with_data(8, 1 << 20).unwrap();
    for t in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        let q = ctx.new_tensor(t, &[64, 4]).unwrap();
        let err = ctx.cpy(q, ctx.new_tensor(DType::F16, &[64, 4]).unwrap()).unwrap_err().to_string();
        assert!(err.contains("quantized sources copy row by row into f32"), "{t}: {err}");
    }
}

/// Several sources of cells, each in its own type under its own mask, are one softmax: naive attention
/// over their cells side by side. One source's cells are all masked for some queries (a recent window
/// that does not reach them), and every query sees a cell somewhere.
#[test]
fn split_attention_over_sources_matches_naive_attention_over_their_union() {
    let mut rng = Rng::new(41);
    let (hd, n_head, n_head_kv, n_q) = (64usize, 6usize, 2usize, 5usize);
    let parts = [(DType::Q4_0, 300usize), (DType::F16, 40), (DType::F32, 5)];
    let n_kv: usize = parts.iter().map(|p| p.1).sum();
    // Query t sees source 0's first 200 + 20·t cells, source 1's cells from 30 − 7·t on, and source 2's first t.
    let visible = |t: usize, source: usize, j: usize| match source {
        0 => j < 200 + 20 * t,
        1 => j + 7 * t >= 30,
        _ => j < t,
    };
    let q = rng.normals(hd * n_head * n_q);
    let ctx = Context::with_data(64, 64 << 20).unwrap();
    let qt = ctx.permute(tensor_from(&ctx, DType::F32, &[hd as i64, n_head as i64, n_q as i64], &q), [0, 2, 1, 3]).unwrap();
    let (mut k_all, mut v_all, mut mask_all) = (Vec::new(), Vec::new(), vec![Vec::new(); n_q]);
    let mut sources = Vec::new();
    for (i, &(t, cells)) in parts.iter().enumerate() {
        let (k, v) = (rng.normals(hd * n_head_kv * cells), rng.normals(hd * n_head_kv * cells));
        let shape = [hd as i64, n_head_kv as i64, cells as i64];
        let (k_raw, v_raw) = (tensor_from(&ctx, t, &shape, &k), tensor_from(&ctx, t, &shape, &v));
        k_all.extend(decode(t, &k_raw.read_bytes().unwrap(), k.len()));
        v_all.extend(decode(t, &v_raw.read_bytes().unwrap(), v.len()));
        let m: Vec<f32> =
            (0..n_q).flat_map(|qi| (0..cells).map(move |j| if visible(qi, i, j) { 0.0 } else { f32::NEG_INFINITY })).collect();
        for (qi, row) in m.chunks(cells).enumerate() {
            mask_all[qi].extend_from_slice(row);
        }
        let mask = tensor_from(&ctx, DType::F16, &[cells as i64, n_q as i64], &m);
        let (k, v) = (ctx.permute(k_raw, [0, 2, 1, 3]).unwrap(), ctx.permute(v_raw, [0, 2, 1, 3]).unwrap());
        sources.push(ggml::AttentionSource { k, v, mask });
    }
    let out = ctx.split_attention_over(qt, &sources, 0.125).unwrap();
    let mut graph = ctx.new_graph(64).unwrap();
    graph.expand(out).unwrap();
    Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
    let c = Case { hd, n_q, n_kv, live: n_kv, n_head, n_head_kv };
    let mask: Vec<f32> = mask_all.concat();
    let err = worst_relative(&out.read_f32().unwrap(), &naive(&c, &q, &k_all, &v_all, &mask), &v_all);
    assert!(err < 2e-5, "{err:.2e}");
    assert!(ctx.split_attention_over(qt, &[], 0.125).is_err(), "no sources");
}

/// Rows attended together in a prompt batch give the bits each gives alone (one decode step's
/// query) or in a chunk of others, over every cache type pair's loops: what keeps a restored prefix
/// or a server step that splits a prompt differently from changing answers. 700 cells split into the
/// same 5 parts for any query count here.
#[test]
fn rows_attended_together_give_the_bits_they_give_alone() {
    let mut rng = Rng::new(20261205);
    let (hd, n_head, n_head_kv, n_kv, n_q) = (64i64, 9i64, 3i64, 700i64, 37i64);
    let q = rng.normals((hd * n_head * n_q) as usize);
    let (k, v) = (rng.normals((hd * n_head_kv * n_kv) as usize), rng.normals((hd * n_head_kv * n_kv) as usize));
    let c =
        Case { hd: hd as usize, n_q: n_q as usize, n_kv: n_kv as usize, live: 690, n_head: n_head as usize, n_head_kv: n_head_kv as usize };
    let m = mask(&c);
    for (k_type, v_type) in [(DType::F16, DType::F16), (DType::Q8_0, DType::Q4_0), (DType::F32, DType::Q5_1)] {
        // Rows first..first + count of the batch, attended on their own.
        let attend = |first: i64, count: i64| -> Vec<u32> {
            let ctx = Context::with_data(32, 64 << 20).unwrap();
            let rows = &q[(first * hd * n_head) as usize..((first + count) * hd * n_head) as usize];
            let qt = ctx.permute(tensor_from(&ctx, DType::F32, &[hd, n_head, count], rows), [0, 2, 1, 3]).unwrap();
            let kt = ctx.permute(tensor_from(&ctx, k_type, &[hd, n_head_kv, n_kv], &k), [0, 2, 1, 3]).unwrap();
            let vt = ctx.permute(tensor_from(&ctx, v_type, &[hd, n_head_kv, n_kv], &v), [0, 2, 1, 3]).unwrap();
            let mt = tensor_from(&ctx, DType::F16, &[n_kv, count], &m[(first * n_kv) as usize..((first + count) * n_kv) as usize]);
            let out = ctx.split_attention(qt, kt, vt, mt, 0.125).unwrap();
            let mut graph = ctx.new_graph(64).unwrap();
            graph.expand(out).unwrap();
            Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
            out.read_f32().unwrap().iter().map(|x| x.to_bits()).collect()
        };
        let whole = attend(0, n_q);
        let row = (hd * n_head) as usize;
        for (first, count) in [(0, 1), (5, 1), (36, 1), (3, 7), (30, 7)] {
            let got = attend(first, count);
            assert!(
                got == whole[first as usize * row..(first + count) as usize * row],
                "K {k_type} V {v_type}: rows {first}..+{count} differ"
            );
        }
    }
}
