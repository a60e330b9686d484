//! ggml ops through the wrapper against naive f64 Rust math, with error bounds derived from the
//! element formats involved.

mod common;

use common::{decode, element_error_bounds, vec_dot_type, Rng, CACHE_TYPES};
use ggml::{Backend, Context, DType, RopeMode, RopeParams, Tensor};

fn compute(ctx: &Context, out: Tensor<'_>) -> Vec<f32> {
    let mut graph = ctx.new_graph(256).unwrap();
    graph.expand(out).unwrap();
    Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
    out.read_f32().unwrap()
}

fn tensor_from<'c>(ctx: &'c Context, dtype: DType, shape: &[i64], values: &[f32]) -> Tensor<'c> {
    let t = ctx.new_tensor(dtype, shape).unwrap();
    t.write_f32(values).unwrap();
    t
}

/// Naive causal GQA attention in f64. q: [n_q][n_head][d], k/v: [n_kv][n_head_kv][d].
struct AttnCase {
    d: usize,
    n_q: usize,
    n_kv: usize,
    n_head: usize,
    n_head_kv: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl AttnCase {
    fn new(rng: &mut Rng) -> Self {
        let (d, n_q, n_kv, n_head, n_head_kv) = (64, 5, 40, 4, 2);
        AttnCase {
            d,
            n_q,
            n_kv,
            n_head,
            n_head_kv,
            q: rng.normals(d * n_head * n_q),
            k: rng.normals(d * n_head_kv * n_kv),
            v: rng.normals(d * n_head_kv * n_kv),
        }
    }

    fn q_at(&self, t: usize, h: usize) -> &[f32] {
        &self.q[(t * self.n_head + h) * self.d..][..self.d]
    }

    fn kv_at<'a>(&self, data: &'a [f32], j: usize, h: usize) -> &'a [f32] {
        &data[(j * self.n_head_kv + h) * self.d..][..self.d]
    }

    /// Query t sits at position n_kv - n_q + t and sees cells 0..=that position.
    fn visible(&self, t: usize) -> usize {
        self.n_kv - self.n_q + t + 1
    }

    /// Output [n_q][n_head][d] in f64 over the K/V values the cache actually holds (`k`, `v`
    /// decoded from its bytes), and per (t, h) a bound on |Δoutput| from what is left: the kernel
    /// converts q to K's dot-product type (δ on each score), and an f16 V is accumulated in f16.
    ///
    /// Scores moved by at most δ change each softmax weight by a factor within e^{±2δ}, so the output
    /// moves by at most (e^{2δ} − 1)·Σ p_j |v_j − o|.
    fn reference(&self, k: &[f32], v: &[f32], k_type: DType, v_type: DType) -> (Vec<f64>, Vec<f64>) {
        let scale = 1.0 / (self.d as f64).sqrt();
        let q_type = vec_dot_type(k_type);
        let mut out = Vec::new();
        let mut bounds = Vec::new();
        for t in 0..self.n_q {
            for h in 0..self.n_head {
                let hk = h / (self.n_head / self.n_head_kv);
                let q = self.q_at(t, h);
                let q_err = element_error_bounds(q_type, q);
                let n = self.visible(t);
                let mut scores = Vec::new();
                let mut delta = 0f64;
                for j in 0..n {
                    let kj = self.kv_at(k, j, hk);
                    scores.push(scale * q.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>());
                    let ds: f64 = kj.iter().zip(&q_err).map(|(kv, e)| (kv.abs() * e) as f64).sum();
                    delta = delta.max(scale * ds);
                }
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = w.iter().sum();
                let v_max = (0..n).flat_map(|j| self.kv_at(v, j, hk)).fold(0f64, |a, x| a.max(x.abs() as f64));
                let mut spread = 0f64;
                for i in 0..self.d {
                    let o: f64 = (0..n).map(|j| w[j] / z * self.kv_at(v, j, hk)[i] as f64).sum();
                    let dev: f64 = (0..n).map(|j| w[j] / z * (self.kv_at(v, j, hk)[i] as f64 - o).abs()).sum();
                    spread = spread.max(dev);
                    out.push(o);
                }
                let f16_accumulation = if v_type == DType::F16 { n as f64 * v_max / 2048.0 } else { 0.0 };
                bounds.push(((2.0 * delta).exp() - 1.0) * spread + f16_accumulation + 1e-5);
            }
        }
        (out, bounds)
    }
}

fn causal_mask(case: &AttnCase) -> Vec<f32> {
    let mut mask = vec![0f32; case.n_kv * case.n_q];
    for t in 0..case.n_q {
        for j in case.visible(t)..case.n_kv {
            mask[t * case.n_kv + j] = f32::NEG_INFINITY;
        }
    }
    mask
}

#[test]
fn flash_attention_matches_naive_attention_for_all_64_cache_type_pairs() {
    let mut rng = Rng::new(11);
    let case = AttnCase::new(&mut rng);
    let (d, n_q, n_kv) = (case.d as i64, case.n_q as i64, case.n_kv as i64);
    for k_type in CACHE_TYPES {
        for v_type in CACHE_TYPES {
            let ctx = Context::with_data(16, 4 << 20).unwrap();
            // ggml layouts: q [d, n_q, n_head] after a permute of [d, n_head, n_q]; k/v [d, n_kv, n_head_kv].
            let q = tensor_from(&ctx, DType::F32, &[d, case.n_head as i64, n_q], &case.q);
            let q = ctx.permute(q, [0, 2, 1, 3]).unwrap();
            let k_raw = tensor_from(&ctx, k_type, &[d, case.n_head_kv as i64, n_kv], &case.k);
            let k = ctx.permute(k_raw, [0, 2, 1, 3]).unwrap();
            let v_raw = tensor_from(&ctx, v_type, &[d, case.n_head_kv as i64, n_kv], &case.v);
            let v = ctx.permute(v_raw, [0, 2, 1, 3]).unwrap();
            let mask = tensor_from(&ctx, DType::F16, &[n_kv, n_q], &causal_mask(&case));
            let out = ctx.flash_attn_ext(q, k, v, Some(mask), 1.0 / (d as f32).sqrt()).unwrap();
            assert_eq!(out.shape(), [d, case.n_head as i64, n_q, 1]);
            let got = compute(&ctx, out);
            // K/V as stored (after quantize-on-write), decoded independently of ggml.
            let k_stored = decode(k_type, &k_raw.read_bytes().unwrap(), case.k.len());
            let v_stored = decode(v_type, &v_raw.read_bytes().unwrap(), case.v.len());
            let (want, bounds) = case.reference(&k_stored, &v_stored, k_type, v_type);
            let mut worst = 0f64;
            assert_eq!(got.len(), want.len(), "K {k_type} V {v_type}: output size");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let bound = bounds[i / case.d];
                let err = (*g as f64 - w).abs();
                worst = worst.max(err / bound);
                assert!(err <= bound, "K {k_type} V {v_type}: element {i}: got {g}, want {w}, error {err} > bound {bound}");
            }
            eprintln!("K {k_type:>4} V {v_type:>4}: worst error {:.3} of its bound", worst);
        }
    }
}

#[test]
fn mul_mat_with_quantized_weights_matches_naive_math() {
    let mut rng = Rng::new(3);
    let (k, m, n) = (128usize, 8usize, 5usize);
    let a = rng.normals(k * m);
    let b = rng.normals(k * n);
    for a_type in CACHE_TYPES.into_iter().chain([DType::BF16]) {
        let ctx = Context::with_data(8, 1 << 20).unwrap();
        let ta = tensor_from(&ctx, a_type, &[k as i64, m as i64], &a);
        let tb = tensor_from(&ctx, DType::F32, &[k as i64, n as i64], &b);
        let out = ctx.mul_mat(ta, tb).unwrap();
        assert_eq!(out.shape(), [m as i64, n as i64, 1, 1]);
        let got = compute(&ctx, out);
        // The weights as stored, decoded independently; what is left is b's conversion to the
        // weight's dot-product type.
        let a_stored = decode(a_type, &ta.read_bytes().unwrap(), a.len());
        let b_type = if a_type == DType::BF16 { DType::BF16 } else { vec_dot_type(a_type) };
        for col in 0..n {
            let brow = &b[col * k..][..k];
            let b_err = element_error_bounds(b_type, brow);
            for row in 0..m {
                let arow = &a_stored[row * k..][..k];
                let want: f64 = arow.iter().zip(brow).map(|(x, y)| *x as f64 * *y as f64).sum();
                let bound: f64 = arow.iter().zip(&b_err).map(|(x, e)| (x.abs() * e) as f64).sum::<f64>() + 1e-4;
                let g = got[col * m + row] as f64;
                assert!((g - want).abs() <= bound, "{a_type}: [{row},{col}] got {g}, want {want}, bound {bound}");
            }
        }
    }
}

#[test]
fn set_rows_writes_the_same_bytes_as_cpy() {
    let mut rng = Rng::new(5);
    let (d, n_new, capacity) = (64i64, 5i64, 10i64);
    let rows = rng.normals((d * n_new) as usize);
    let cells = [7i64, 0, 3, 9, 2];
    for dtype in CACHE_TYPES {
        let ctx = Context::with_data(16, 1 << 20).unwrap();
        let src = tensor_from(&ctx, DType::F32, &[d, n_new], &rows);
        let cache = ctx.new_tensor(dtype, &[d, capacity]).unwrap();
        cache.write_bytes(&vec![0u8; cache.nbytes()]).unwrap();
        let idx = ctx.new_tensor(DType::I64, &[n_new]).unwrap();
        idx.write_i64(&cells).unwrap();
        let copy_dst = ctx.new_tensor(dtype, &[d, n_new]).unwrap();
        let stored = ctx.set_rows(cache, src, idx).unwrap();
        let copied = ctx.cpy(src, copy_dst).unwrap();
        let mut graph = ctx.new_graph(16).unwrap();
        graph.expand(stored).unwrap();
        graph.expand(copied).unwrap();
        Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
        let row_bytes = dtype.row_size(d as usize).unwrap();
        let cache_bytes = cache.read_bytes().unwrap();
        let copy_bytes = copy_dst.read_bytes().unwrap();
        for (i, &cell) in cells.iter().enumerate() {
            assert_eq!(
                &cache_bytes[cell as usize * row_bytes..][..row_bytes],
                &copy_bytes[i * row_bytes..][..row_bytes],
                "{dtype}: row {i} stored at cell {cell}"
            );
        }
        let untouched = (0..capacity as usize).filter(|c| !cells.contains(&(*c as i64)));
        for c in untouched {
            assert!(cache_bytes[c * row_bytes..][..row_bytes].iter().all(|&b| b == 0), "{dtype}: cell {c} was written");
        }
    }
}

#[test]
fn rms_norm_softmax_swiglu_and_rope_match_naive_math() {
    let mut rng = Rng::new(9);
    let (d, n) = (64usize, 3usize);
    let x = rng.normals(d * n);
    let y = rng.normals(d * n);
    let ctx = Context::with_data(32, 1 << 20).unwrap();
    let tx = tensor_from(&ctx, DType::F32, &[d as i64, n as i64], &x);
    let ty = tensor_from(&ctx, DType::F32, &[d as i64, n as i64], &y);

    let norm = compute(&ctx, ctx.rms_norm(tx, 1e-5).unwrap());
    let soft = compute(&ctx, ctx.soft_max_ext(tx, None, 0.5).unwrap());
    let glu = compute(&ctx, ctx.swiglu(tx, ty).unwrap());
    for r in 0..n {
        let row = &x[r * d..][..d];
        let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
        let m = row.iter().fold(f64::NEG_INFINITY, |a, v| a.max(*v as f64 * 0.5));
        let z: f64 = row.iter().map(|v| (*v as f64 * 0.5 - m).exp()).sum();
        for i in 0..d {
            let (xi, yi) = (row[i] as f64, y[r * d + i] as f64);
            assert!((norm[r * d + i] as f64 - xi / (ms + 1e-5).sqrt()).abs() < 1e-5);
            assert!((soft[r * d + i] as f64 - (xi * 0.5 - m).exp() / z).abs() < 1e-6);
            assert!((glu[r * d + i] as f64 - xi / (1.0 + (-xi).exp()) * yi).abs() < 1e-5);
        }
    }

    // RoPE on [head_dim, 1 head, n tokens] at positions 3, 10, 100, both pair layouts.
    let pos = ctx.new_tensor(DType::I32, &[n as i64]).unwrap();
    let positions = [3, 10, 100];
    pos.write_i32(&positions).unwrap();
    let x3 = ctx.reshape(tx, &[d as i64, 1, n as i64]).unwrap();
    for mode in [RopeMode::Normal, RopeMode::Neox] {
        let params = RopeParams { n_dims: d as i32, mode, freq_base: 10_000.0, ..Default::default() };
        let got = compute(&ctx, ctx.rope_ext(x3, pos, None, &params).unwrap());
        for (t, &p) in positions.iter().enumerate() {
            let row = &x[t * d..][..d];
            for pair in 0..d / 2 {
                let theta = p as f64 * 10_000f64.powf(-2.0 * pair as f64 / d as f64);
                let (i0, i1) = match mode {
                    RopeMode::Normal => (2 * pair, 2 * pair + 1),
                    RopeMode::Neox => (pair, pair + d / 2),
                };
                let (a, b) = (row[i0] as f64, row[i1] as f64);
                let (want0, want1) = (a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos());
                assert!((got[t * d + i0] as f64 - want0).abs() < 1e-4, "{mode:?} pos {p} pair {pair}");
                assert!((got[t * d + i1] as f64 - want1).abs() < 1e-4, "{mode:?} pos {p} pair {pair}");
            }
        }
    }
}

#[test]
fn sum_rows_and_concat_match_naive_math() {
    let ctx = Context::with_data(8, 1 << 16).unwrap();
    let a = tensor_from(&ctx, DType::F32, &[4, 3], &[1., 2., 3., 4., 5., 6., 7., 8., -1., -2., -3., -4.]);
    assert_eq!(compute(&ctx, ctx.sum_rows(a).unwrap()), vec![10.0, 26.0, -10.0]);
    let b = tensor_from(&ctx, DType::F32, &[4, 1], &[9., 9., 9., 9.]);
    let joined = ctx.concat(a, b, 1).unwrap();
    assert_eq!(joined.shape(), [4, 4, 1, 1]);
    assert_eq!(&compute(&ctx, joined)[12..], &[9.0; 4]);
    assert!(ctx.concat(a, b, 0).is_err(), "dim 1 differs (3 vs 1)");
}

/// Element (i0, i1, i2, i3) of a tensor of shape `ne` laid out contiguously.
fn at(values: &[f32], ne: [usize; 4], i: [usize; 4]) -> f32 {
    values[i[0] + ne[0] * (i[1] + ne[1] * (i[2] + ne[2] * i[3]))]
}

#[test]
fn concat_joins_along_every_dimension_and_reads_views() {
    let ctx = Context::with_data(64, 1 << 20).unwrap();
    let mut rng = Rng::new(5);
    let base = [3usize, 4, 2, 2];
    for dim in 0..4 {
        let mut nb = base;
        nb[dim] = 5;
        let va: Vec<f32> = (0..base.iter().product::<usize>()).map(|_| rng.uniform() as f32).collect();
        // b is a view with rows inside wider rows: every column of a [ne0 + 2, ...] tensor but the first two.
        let wide = [nb[0] + 2, nb[1], nb[2], nb[3]];
        let vw: Vec<f32> = (0..wide.iter().product::<usize>()).map(|_| rng.uniform() as f32).collect();
        let a = tensor_from(&ctx, DType::F32, &base.map(|d| d as i64), &va);
        let w = tensor_from(&ctx, DType::F32, &wide.map(|d| d as i64), &vw);
        let s = w.strides();
        let b = ctx.view(w, &nb.map(|d| d as i64), &[s[1], s[2], s[3]], 2 * s[0]).unwrap();
        let joined = ctx.concat(a, b, dim).unwrap();
        let mut ne = base;
        ne[dim] += nb[dim];
        assert_eq!(joined.shape(), ne.map(|d| d as i64));
        let got = compute(&ctx, joined);
        for (k, &g) in got.iter().enumerate() {
            let i = [k % ne[0], k / ne[0] % ne[1], k / (ne[0] * ne[1]) % ne[2], k / (ne[0] * ne[1] * ne[2])];
            let want = if i[dim] < base[dim] {
                at(&va, base, i)
            } else {
                let mut j = i;
                j[dim] -= base[dim];
                j[0] += 2;
                at(&vw, wide, j)
            };
            assert_eq!(g, want, "dim {dim} at {i:?}");
        }
    }
    let a = tensor_from(&ctx, DType::F32, &[4, 3], &[0.0; 12]);
    let b = tensor_from(&ctx, DType::F32, &[4, 1], &[0.0; 4]);
    assert!(ctx.concat(a, b, 0).is_err(), "dim 1 differs (3 vs 1)");
    let h = ctx.new_tensor(DType::F16, &[4, 1]).unwrap();
    assert!(ctx.concat(b, h, 1).is_err(), "f16 is refused");
}

#[test]
fn windows_copy_every_steps_columns() {
    let ctx = Context::with_data(16, 1 << 20).unwrap();
    let mut rng = Rng::new(9);
    let (c, n) = (3usize, 23usize);
    let values: Vec<f32> = (0..c * n).map(|_| rng.uniform() as f32).collect();
    let a = tensor_from(&ctx, DType::F32, &[c as i64, n as i64], &values);
    for (width, step) in [(1, 1), (3, 1), (8, 4), (10, 5), (23, 2)] {
        let out = ctx.windows(a, width, step).unwrap();
        let columns = (n - width) / step + 1;
        assert_eq!(out.shape(), [(c * width) as i64, columns as i64, 1, 1]);
        let got = compute(&ctx, out);
        for t in 0..columns {
            assert_eq!(&got[t * c * width..][..c * width], &values[t * step * c..][..c * width], "width {width} step {step} column {t}");
        }
    }
    assert!(ctx.windows(a, 24, 1).is_err(), "wider than the input");
    assert!(ctx.windows(a, 2, 0).is_err(), "step 0");
    let t = ctx.transpose(a).unwrap();
    assert!(ctx.windows(t, 2, 1).is_err(), "not contiguous");
}

#[test]
fn narrow_product_matches_naive_math() {
    let ctx = Context::with_data(16, 1 << 22).unwrap();
    let mut rng = Rng::new(13);
    for (k, m, n) in [(7usize, 64usize, 301usize), (1, 5, 3), (16, 33, 17)] {
        let w: Vec<f32> = (0..k * m).map(|_| rng.uniform() as f32 - 0.5).collect();
        let x: Vec<f32> = (0..k * n).map(|_| rng.uniform() as f32 - 0.5).collect();
        let wt = tensor_from(&ctx, DType::F32, &[k as i64, m as i64], &w);
        let xt = tensor_from(&ctx, DType::F32, &[k as i64, n as i64], &x);
        let got = compute(&ctx, ctx.narrow_product(wt, xt).unwrap());
        for t in 0..n {
            for o in 0..m {
                let want: f64 = (0..k).map(|i| w[o * k + i] as f64 * x[t * k + i] as f64).sum();
                // k f32 roundings of terms below 0.25 each: k · 2⁻²⁴ relative to the terms' sum.
                let bound = k as f64 * f32::EPSILON as f64 * (0..k).map(|i| (w[o * k + i] * x[t * k + i]).abs() as f64).sum::<f64>();
                assert!((got[t * m + o] as f64 - want).abs() <= bound, "k {k} output {o} column {t}");
            }
        }
    }
    let wide = ctx.new_tensor(DType::F32, &[17, 4]).unwrap();
    assert!(ctx.narrow_product(wide, wide).is_err(), "17 inputs is past the kernel's width");
}

#[test]
fn argmax_picks_each_rows_largest_last_of_ties() {
    let ctx = Context::with_data(8, 1 << 16).unwrap();
    let mut rng = Rng::new(11);
    let (n, m) = (2048usize, 5usize);
    let mut values: Vec<f32> = (0..n * m).map(|_| rng.uniform() as f32).collect();
    // Row 3: a tie between positions 7 and 900 at the maximum; ggml's kernel keeps the last.
    values[3 * n + 7] = 2.0;
    values[3 * n + 900] = 2.0;
    let a = tensor_from(&ctx, DType::F32, &[n as i64, m as i64], &values);
    let out = ctx.argmax(a).unwrap();
    let mut graph = ctx.new_graph(16).unwrap();
    graph.expand(out).unwrap();
    Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
    let got = out.read_i32().unwrap();
    let want: Vec<i32> = values
        .chunks(n)
        .map(|row| row.iter().enumerate().fold((0, f32::MIN), |best, (i, &v)| if v >= best.1 { (i, v) } else { best }).0 as i32)
        .collect();
    assert_eq!(got, want);
    assert_eq!(got[3], 900);
    let cube = ctx.new_tensor(DType::F32, &[4, 2, 2]).unwrap();
    assert!(ctx.argmax(cube).is_err(), "argmax takes matrices only");
    assert!(ctx.argmax(ctx.new_tensor(DType::F16, &[4, 2]).unwrap()).is_err(), "f32 only");
}

#[test]
fn get_rows_reads_embedding_rows_of_any_cache_type() {
    let mut rng = Rng::new(13);
    let (d, vocab) = (64usize, 12usize);
    let table = rng.normals(d * vocab);
    for dtype in CACHE_TYPES {
        let ctx = Context::with_data(8, 1 << 20).unwrap();
        let t = tensor_from(&ctx, dtype, &[d as i64, vocab as i64], &table);
        let ids = ctx.new_tensor(DType::I32, &[3]).unwrap();
        ids.write_i32(&[11, 0, 4]).unwrap();
        let got = compute(&ctx, ctx.get_rows(t, ids).unwrap());
        for (r, id) in [11usize, 0, 4].into_iter().enumerate() {
            let row = &table[id * d..][..d];
            let bounds = element_error_bounds(dtype, row);
            for i in 0..d {
                assert!((got[r * d + i] - row[i]).abs() <= bounds[i] * 1.0001, "{dtype} row {id} element {i}");
            }
        }
    }
}
