//! Quantized KV caches: bytes per element, attention accuracy, and live conversion mid-generation.

mod common;

use ccsm::csm::{CsmGenerator, CsmModel, CsmOptions, Segment};
use ccsm::kv_cache::{KvCache, KvCacheConfig};
use ccsm::llama::LlamaModel;
use ccsm::sampling::{argmax, Sampler, SamplerConfig};
use ccsm::{CacheType, GGMLModel, Logits, Model, ModelOptions};
use common::{bytes_per_element, kl, model, softmax, SMOLLM2, TINY_LLAMA};
use ggml::{Backend, ComputeBuffer, DType};

#[test]
fn both_csm_caches_and_a_llama_cache_allocate_the_block_math() {
    for t in CacheType::ALL {
        let csm = CsmModel::load(model("tiny-csm.gguf")).unwrap();
        let c = csm.config().clone();
        let g = CsmGenerator::new(csm, CsmOptions { n_ctx: 100, k_type: t, v_type: t, n_threads: 1, n_batch: 32 }).unwrap();
        let elements =
            |stack: &ccsm::llama::LlamaConfig, cells: usize| (stack.n_layer * cells * 2 * stack.n_head_kv * stack.head_dim) as f64;
        assert_eq!(g.backbone_cache().memory_usage() as f64, elements(&c.backbone, 100) * bytes_per_element(t), "{t} backbone");
        assert_eq!(g.decoder_cache().memory_usage() as f64, elements(&c.decoder, c.n_codebooks) * bytes_per_element(t), "{t} decoder");

        let llama = LlamaModel::load(model(TINY_LLAMA)).unwrap();
        let lc = llama.config().clone();
        let m = GGMLModel::new(llama, ModelOptions { n_ctx: 64, k_type: t, v_type: t, n_threads: 1, n_batch: 32 }).unwrap();
        assert_eq!(m.kv_memory_usage() as f64, elements(&lc, 64) * bytes_per_element(t), "{t} llama");
    }
}

/// Attention of one query over rows, in f64: softmax(q·k / √d) · v per query head (GQA); also, per
/// head, Σ_j p_j |v_j − o| (the spread the output can move by when the weights move).
fn naive_attention(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], head_dim: usize, n_head: usize, n_head_kv: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut spread) = (Vec::new(), Vec::new());
    for h in 0..n_head {
        let kv = h / (n_head / n_head_kv);
        let qh = &q[h * head_dim..][..head_dim];
        let scores: Vec<f64> = k
            .iter()
            .map(|row| {
                qh.iter().zip(&row[kv * head_dim..][..head_dim]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (head_dim as f64).sqrt()
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut dev = 0f64;
        for i in 0..head_dim {
            let o: f64 = w.iter().zip(v).map(|(w, row)| w / z * row[kv * head_dim + i] as f64).sum();
            dev = dev.max(w.iter().zip(v).map(|(w, row)| w / z * (row[kv * head_dim + i] as f64 - o).abs()).sum());
            out.push(o);
        }
        spread.push(dev);
    }
    (out, spread)
}

/// Rows stored through the cache (set_rows, quantize on write) hold exactly the bytes ggml's row
/// quantizer makes, and attention over the cache's views equals naive attention over those stored
/// values, up to the rounding of the query to K's dot-product type: scores move by at most
/// δ = Σ_i |k_i|·|Δq_i| / √d, weights by a factor within e^{±2δ}, the output by (e^{2δ} − 1)·Σ p|v − o|.
#[test]
fn attention_over_each_cache_type_reads_what_the_cache_stored() {
    let (head_dim, n_head, n_head_kv, cells) = (64usize, 4usize, 2usize, 40usize);
    let mut seed = 17u64;
    let mut normal = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let u = ((seed >> 11) as f64 / (1u64 << 53) as f64).max(1e-12);
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v = (seed >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    };
    let width = head_dim * n_head_kv;
    let k_rows: Vec<f32> = (0..cells * width).map(|_| normal()).collect();
    let v_rows: Vec<f32> = (0..cells * width).map(|_| normal()).collect();
    let q: Vec<f32> = (0..head_dim * n_head).map(|_| normal()).collect();
    for t in CacheType::ALL {
        let mut cache = KvCache::new(KvCacheConfig::uniform(1, head_dim, n_head_kv, 64, t, t)).unwrap();
        let cell_range = cache.append(cells).unwrap();
        let mut compute = ComputeBuffer::new().unwrap();
        let ctx = compute.context(32, 32).unwrap();
        let k_in = ctx.new_tensor(DType::F32, &[width as i64, cells as i64]).unwrap().set_input();
        let v_in = ctx.new_tensor(DType::F32, &[width as i64, cells as i64]).unwrap().set_input();
        let idx = ctx.new_tensor(DType::I64, &[cells as i64]).unwrap().set_input();
        let q_in = ctx.new_tensor(DType::F32, &[head_dim as i64, 1, n_head as i64]).unwrap().set_input();
        let mut graph = ctx.new_graph(32).unwrap();
        graph.expand(cache.store_k(&ctx, 0, k_in, idx).unwrap()).unwrap();
        graph.expand(cache.store_v(&ctx, 0, v_in, idx).unwrap()).unwrap();
        let (k_view, v_view) = (cache.k_tensor(&ctx, 0, cells).unwrap(), cache.v_tensor(&ctx, 0, cells).unwrap());
        let keys = ctx.permute(k_view, [0, 2, 1, 3]).unwrap();
        let values = ctx.permute(v_view, [0, 2, 1, 3]).unwrap();
        let out = ctx.flash_attn_ext(q_in, keys, values, None, 1.0 / (head_dim as f32).sqrt()).unwrap();
        graph.expand(out).unwrap();
        ctx.allocate(&graph).unwrap();
        k_in.write_f32(&k_rows).unwrap();
        v_in.write_f32(&v_rows).unwrap();
        idx.write_i64(&KvCache::cell_indices(cell_range.clone())).unwrap();
        q_in.write_f32(&q).unwrap();
        Backend::cpu_exact(2).unwrap().compute(&graph).unwrap();
        let got = out.read_f32().unwrap();

        let (k_bytes, v_bytes) = (k_view.read_bytes().unwrap(), v_view.read_bytes().unwrap());
        assert_eq!(k_bytes, t.dtype().quantize(&k_rows, width).unwrap(), "{t}: K bytes");
        assert_eq!(v_bytes, t.dtype().quantize(&v_rows, width).unwrap(), "{t}: V bytes");
        let stored = |bytes: &[u8]| -> Vec<Vec<f32>> {
            t.dtype().dequantize(bytes, cells * width).unwrap().chunks(width).map(<[f32]>::to_vec).collect()
        };
        let (k_stored, v_stored) = (stored(&k_bytes), stored(&v_bytes));
        let (want, spread) = naive_attention(&q, &k_stored, &v_stored, head_dim, n_head, n_head_kv);

        // The query's rounding: none for f32 K, f16 (2⁻¹¹ relative) for f16 K, else 8-bit blocks of 32
        // (half a step of amax/127 per element).
        let q_err: Vec<f64> = match t {
            CacheType::F32 => vec![0.0; q.len()],
            CacheType::F16 => q.iter().map(|x| x.abs() as f64 / 2048.0).collect(),
            _ => q
                .chunks(32)
                .flat_map(|b| {
                    let amax = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
                    vec![amax / 254.0 * (1.0 + 127.0 / 2048.0); b.len()]
                })
                .collect(),
        };
        for h in 0..n_head {
            let kv = h / (n_head / n_head_kv);
            let delta = k_stored
                .iter()
                .map(|row| {
                    row[kv * head_dim..][..head_dim].iter().zip(&q_err[h * head_dim..]).map(|(k, e)| k.abs() as f64 * e).sum::<f64>()
                })
                .fold(0f64, f64::max)
                / (head_dim as f64).sqrt();
            // An f16 V is accumulated in f16: one rounding per cell.
            let v_max = v_stored.iter().flatten().fold(0f64, |m, x| m.max(x.abs() as f64));
            let f16_acc = if t == CacheType::F16 { cells as f64 * v_max / 2048.0 } else { 0.0 };
            let bound = ((2.0 * delta).exp() - 1.0) * spread[h] + f16_acc + 1e-5;
            let worst = (0..head_dim).map(|i| (got[h * head_dim + i] as f64 - want[h * head_dim + i]).abs()).fold(0f64, f64::max);
            assert!(worst <= bound, "{t} head {h}: {worst} > {bound}");
            if h == 0 {
                eprintln!("{t}: max |Δ| {worst:.2e}, bound {bound:.2e}");
            }
        }
    }
}

fn smollm2(k: CacheType) -> GGMLModel {
    GGMLModel::new(LlamaModel::load(model(SMOLLM2)).unwrap(), ModelOptions { n_ctx: 256, k_type: k, v_type: k, n_threads: 2, n_batch: 256 })
        .unwrap()
}

/// The all-F32 greedy run: prompt + generated tokens, and each generated position's distribution.
fn f32_run(prompt_text: &str, steps: usize) -> (Vec<u32>, usize, Vec<Vec<f64>>) {
    let mut reference = smollm2(CacheType::F32);
    let prompt = reference.model().tokenizer().encode(prompt_text).unwrap();
    let mut tokens = prompt.clone();
    let mut dists = Vec::new();
    let mut logits = reference.eval(&prompt, Logits::Last).unwrap();
    for _ in 0..steps {
        dists.push(softmax(&logits));
        let next = argmax(&logits) as u32;
        tokens.push(next);
        logits = reference.eval(&[next], Logits::Last).unwrap();
    }
    (tokens, prompt.len(), dists)
}

/// A model that ran `history` with an F32 cache, then converted it to `t` live.
fn converted_after(history: &[u32], t: CacheType) -> GGMLModel {
    let mut m = smollm2(CacheType::F32);
    m.eval(history, Logits::Last).unwrap();
    let reports = m.quantize_kv_cache(t, t).unwrap();
    assert_eq!(m.cache().current_quantization_type(), Some(t));
    assert_eq!(m.cache().len(), history.len(), "every cached token kept");
    assert_eq!(reports[0].report.bytes_after, m.kv_memory_usage());
    m
}

/// Live conversion mid-generation on SmolLM2: F32 for the prompt and the first tokens, then the cache
/// is quantized and generation continues from the same history.
#[test]
fn live_quantization_continues_the_same_history() {
    const BEFORE: usize = 8;
    const AFTER: usize = 24;
    // A confident continuation (counting): a cache that lost or scrambled its history derails at once.
    let (tokens, n_prompt, _) = f32_run("Counting from one: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", BEFORE + AFTER);
    // A text continuation, teacher-forced, for the next-token distributions.
    let (text, text_prompt, dists) = f32_run("The Jargon File is a glossary of hacker slang. A hacker is a person who", BEFORE + AFTER);

    // (type, generated tokens after the switch that must equal F32's, bound on the mean KLD). q4_0's
    // 17th token ("19" after "18, ") is a near tie of "1" and "2" under q4_0 (logits 33.84 / 33.81
    // with ggml's kernel, 33.61 / 34.38 with ours, in a spread of about 20): it may count on from 18
    // to 20, but not lose the sequence before. q4_1 errs as much as q4_0 once rotated (KLD 0.021–0.023
    // here against q4_0's 0.025–0.026, AVX2 and AVX-512 kernels), so it may meet the same tie: it
    // matched all 24 tokens on both, and is held to q4_0's 16.
    for (t, must_match, kld_bound) in [(CacheType::Q8_0, AFTER, 0.01), (CacheType::Q4_1, 16, 0.15), (CacheType::Q4_0, 16, 0.15)] {
        let switch = n_prompt + BEFORE - 1;
        let mut m = converted_after(&tokens[..switch], t);
        let mut next = tokens[switch];
        let mut own = Vec::new();
        for _ in 0..AFTER {
            next = argmax(&m.eval(&[next], Logits::Last).unwrap()) as u32;
            own.push(next);
        }
        let matched = own.iter().zip(&tokens[switch + 1..]).take_while(|(a, b)| a == b).count();

        let switch = text_prompt + BEFORE - 1;
        let mut m = converted_after(&text[..switch], t);
        let klds: Vec<f64> =
            (0..AFTER).map(|i| kl(&dists[BEFORE + i], &softmax(&m.eval(&[text[switch + i]], Logits::Last).unwrap()))).collect();
        let mean = klds.iter().sum::<f64>() / klds.len() as f64;
        eprintln!("{t}: greedy counting matches F32 for {matched}/{AFTER} tokens after the switch; text mean KLD {mean:.5}");
        assert!(matched >= must_match, "{t}: only {matched} tokens match");
        assert!(mean < kld_bound, "{t}: mean KLD {mean}");
    }
}

#[test]
fn conversion_peaks_at_the_old_cache_plus_one_layer() {
    let mut m = smollm2(CacheType::F32);
    let prompt = m.model().tokenizer().encode("The quick brown fox jumps over the lazy dog.").unwrap();
    m.eval(&prompt, Logits::Last).unwrap();
    let c = m.cache().config().clone();
    for (from, to) in [(CacheType::F32, CacheType::Q8_0), (CacheType::Q8_0, CacheType::Q4_0), (CacheType::Q4_0, CacheType::F16)] {
        assert_eq!(m.cache().k_type(), from);
        let before = m.kv_memory_usage();
        let report = m.quantize_kv_cache(to, to).unwrap()[0].report;
        // One layer's new tensors: K and V rows of the new type for every cell. Quantizing shrinks the
        // cache, so the limit is the old cache plus that; a widening conversion ends larger than it began.
        let one_layer = 2 * c.capacity * to.dtype().row_size(c.n_embd_kv().unwrap()).unwrap();
        let limit = before.max(report.bytes_after) + one_layer;
        eprintln!("{from} -> {to}: before {} after {} peak {} (limit {limit})", report.bytes_before, report.bytes_after, report.peak_bytes);
        assert_eq!(report.bytes_before, before);
        assert!(report.peak_bytes <= limit, "{from} -> {to}: peak {} > {limit}", report.peak_bytes);
        assert!(report.peak_bytes > before, "the peak counts the tensor being written");
    }
}

#[test]
fn tiny_csm_keeps_generating_valid_frames_after_a_live_quantization() {
    let csm = CsmModel::load(model("tiny-csm.gguf")).unwrap();
    let c = csm.config().clone();
    let mut g =
        CsmGenerator::new(csm, CsmOptions { n_ctx: 128, k_type: CacheType::F32, v_type: CacheType::F32, n_threads: 2, n_batch: 64 })
            .unwrap();
    let rows = Segment { speaker: 0, text: "Hello there.".into(), frames: vec![], audio: None }
        .rows(g.model().tokenizer(), c.n_codebooks, c.audio_vocab)
        .unwrap();
    g.prefill(&rows).unwrap();
    let mut sampler = Sampler::new(SamplerConfig { temperature: 0.9, top_k: Some(50), top_p: 1.0, seed: 5 }).unwrap();
    let mut frames = 0;
    for i in 0..12 {
        if i == 4 {
            let reports = g.quantize_kv_cache(CacheType::Q8_0, CacheType::Q8_0).unwrap();
            assert_eq!(reports.len(), 2);
            assert_eq!(g.backbone_cache().current_quantization_type(), Some(CacheType::Q8_0));
            assert_eq!(g.backbone_cache().len(), rows.len() + frames);
        }
        match g.generate_frame(&mut sampler, None).unwrap() {
            Some(frame) => {
                assert_eq!(frame.len(), c.n_codebooks);
                assert!(frame.iter().all(|&code| (code as usize) < c.audio_vocab));
                frames += 1;
            }
            None => break,
        }
    }
    assert!(frames > 4, "generation continued after the conversion ({frames} frames)");
    assert_eq!(g.backbone_cache().len(), rows.len() + frames);
}
