//! The engine on a device (ggml's Vulkan backend; in CI Mesa's lavapipe, a CPU Vulkan driver ggml uses
//! only when `GGML_VK_VISIBLE_DEVICES` names it) against the same engine on the CPU: text logits, CSM
//! frames (greedy) and Mimi decoding, for f16 and each quantized cache type the device's attention
//! takes; a type it does not take is refused with a message naming the device and the type. Without
//! a device the tests say so and pass, unless `CCSM_REQUIRE_VULKAN=1` (CI) makes that a failure.
#![cfg(feature = "vulkan")]

mod common;

use ccsm::csm::{CsmEngine, CsmModel, FrameRequest, PrefillRequest, Segment, SessionCaches};
use ccsm::engine::{SequenceStep, TextEngine};
use ccsm::kv_cache::{KvLayout, LayerTypes};
use ccsm::llama::LlamaModel;
use ccsm::mimi::{MimiCodec, MimiModel, MimiOptions};
use ccsm::sampling::{Sampler, SamplerConfig};
use ccsm::{CacheType, Logits, Placement};
use ggml::gguf::GgufFile;

use common::model;

/// Cache types tried on the device: f16 and every quantized type of ours it may take.
const TYPES: [CacheType; 7] =
    [CacheType::F16, CacheType::Q8_0, CacheType::Q4_0, CacheType::Q4_1, CacheType::Q5_0, CacheType::Q5_1, CacheType::IQ4NL];

/// The first Vulkan device, or None (a failure when CI requires one).
fn vulkan() -> Option<Placement> {
    match Placement::parse("vulkan") {
        Ok(p) => Some(p),
        Err(e) => {
            assert!(std::env::var("CCSM_REQUIRE_VULKAN").is_err(), "CCSM_REQUIRE_VULKAN is set but: {e}");
            eprintln!("no Vulkan device ({e}; lavapipe needs GGML_VK_VISIBLE_DEVICES=0): skipped");
            None
        }
    }
}

/// Runs each of `cases` of the test `test` in a process of its own (a child running this test binary
/// with `CCSM_DEVICE_CASE` set), or, in that child, runs its case. Mesa 22.3's lavapipe (Debian 12)
/// crashes compiling flash-attention pipelines once a process has compiled a few (a segfault inside
/// the driver, with ggml's own op tests passing type by type): one case per process keeps clear of it.
/// A case ending in `@f32` runs with ggml's f32 shaders (`GGML_VK_DISABLE_F16`, read when the device
/// starts): without them a device with f16 arithmetic rounds the activations of its products and its
/// attention to f16, which the CPU does not.
fn each_in_own_process(test: &str, cases: &[String], run: impl Fn(&str)) {
    if let Ok(case) = std::env::var("CCSM_DEVICE_CASE") {
        run(&case);
        return;
    }
    for case in cases {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env("CCSM_DEVICE_CASE", case)
            .envs(case.ends_with("@f32").then_some(("GGML_VK_DISABLE_F16", "1")))
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        // Every case body reports itself: a child that ran no test (a renamed test) fails here.
        assert!(log.contains(&format!("case {}", case.trim_end_matches("@f32"))), "{test}, case {case} did not run:\n{log}");
        eprint!("{}", log.lines().filter(|l| l.starts_with("case ")).map(|l| format!("{l}\n")).collect::<String>());
        assert!(out.status.success(), "{test}, case {case}: {}\n{log}", out.status);
    }
}

/// `k/v` as named in a case.
fn pair(case: &str) -> (CacheType, CacheType) {
    let (k, v) = case.split_once('/').unwrap();
    (k.parse().unwrap(), v.parse().unwrap())
}

/// Relative L2 distance of `a` from `b`.
fn relative(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// A text engine over tiny-llama's weights on `placement`.
fn text_engine(placement: &Placement) -> ccsm::Result<TextEngine> {
    let path = model("tiny-llama.gguf");
    let file = GgufFile::open(&path).unwrap();
    TextEngine::new(LlamaModel::from_file_placed(&file, &path, placement)?, 2)
}

/// Every row's logits of a prompt, then the last row's of four one-token steps (the decode path,
/// its graph kept from the second), with a `k`/`v` cache.
fn text_logits(engine: &mut TextEngine, k: CacheType, v: CacheType) -> ccsm::Result<Vec<Vec<f32>>> {
    let mut cache = engine.new_cache(64, k, v)?;
    let prompt: Vec<u32> = (0..19).map(|i| (i * 37 + 11) % 200).collect();
    let mut out = engine.step(&mut [SequenceStep { cache: &mut cache, tokens: &prompt, logits: Logits::All }], false)?;
    for t in [5u32, 77, 130, 9] {
        out.extend(engine.step(&mut [SequenceStep { cache: &mut cache, tokens: &[t], logits: Logits::Last }], false)?);
    }
    Ok(out)
}

/// The K/V pairs tried: f16 and each quantized type, K and V alike, and q8_0 beside f16 either way
/// (K and V are typed separately).
fn pairs() -> Vec<(CacheType, CacheType)> {
    let mut pairs: Vec<_> = TYPES.iter().map(|&t| (t, t)).collect();
    pairs.extend([(CacheType::Q8_0, CacheType::F16), (CacheType::F16, CacheType::Q8_0)]);
    pairs
}

/// Worst relative distance of `a`'s logits rows from `b`'s.
fn worst(a: &[Vec<f32>], b: &[Vec<f32>], vocab: usize) -> f64 {
    a.iter().zip(b).flat_map(|(a, b)| a.chunks(vocab).zip(b.chunks(vocab)).map(|(a, b)| relative(a, b))).fold(0.0, f64::max)
}

/// The floor of the device's own rounding: with an f16 cache (no cache quantization to differ in) its
/// logits were 1.2e-3 to 1.8e-3 from the CPU's on lavapipe (its f16 shaders round the activations of
/// products and attention to f16); a few times that. The CPU side's own spread between AVX2 and
/// AVX-512 kernels is far below it (ggml's products agree to about 1e-6 there).
const PRODUCT_FLOOR: f64 = 5e-3;

#[test]
fn text_logits_on_the_device_match_the_cpu() {
    let Some(device) = vulkan() else { return };
    let cases: Vec<String> = pairs().iter().map(|(k, v)| format!("{k}/{v}")).collect();
    each_in_own_process("text_logits_on_the_device_match_the_cpu", &cases, |case| {
        let (k, v) = pair(case);
        let (mut on_cpu, mut on_device) = (text_engine(&Placement::Cpu).unwrap(), text_engine(&device).unwrap());
        let exact = text_logits(&mut on_cpu, CacheType::F32, CacheType::F32).unwrap();
        let vocab = exact.last().unwrap().len();
        let cpu = text_logits(&mut on_cpu, k, v).unwrap();
        let gpu = text_logits(&mut on_device, k, v).unwrap_or_else(|e| panic!("{k}/{v} cache on {device:?}: {e}"));
        assert_eq!(cpu.len(), gpu.len());
        // The device's f16 activations put some stored rows of a quantized cache one quantization
        // step from the CPU's: the two may differ by up to what the cache type itself moves the
        // logits from an f32 cache, never more (a wrong cell, mask or conversion does).
        let (apart, cache_error) = (worst(&gpu, &cpu, vocab), worst(&cpu, &exact, vocab));
        eprintln!("case {k}/{v}: device vs CPU {apart:.2e}; the CPU's {k}/{v} vs an f32 cache {cache_error:.2e}");
        assert!(apart <= cache_error.max(PRODUCT_FLOOR), "{k}/{v} cache: the device's logits {apart:.2e} from the CPU's");
        if (k, v) == (CacheType::F16, CacheType::F16) {
            let tops = |l: &[Vec<f32>]| l.iter().flat_map(|r| r.chunks(vocab).map(argmax).collect::<Vec<_>>()).collect::<Vec<_>>();
            assert_eq!(tops(&gpu), tops(&cpu), "f16 cache: the device's top tokens differ");
        }
    });
}

/// A cache's life beyond plain steps, on the device as on the CPU: per-layer types (`layers`),
/// re-quantized to `later` after the prompt (rows converted through host copies), and a prefix
/// snapshot (kept in host memory) copied into a fresh device cache that goes on decoding.
fn cache_life(engine: &mut TextEngine, layers: [(CacheType, CacheType); 2], later: CacheType) -> ccsm::Result<Vec<Vec<f32>>> {
    let layout = KvLayout::new(layers.iter().map(|&(k, v)| LayerTypes::new(k, v)).collect());
    let mut cache = engine.new_cache_with(engine.cache_config(64, CacheType::F16, CacheType::F16).with_layout(layout))?;
    let prompt: Vec<u32> = (0..12).map(|i| (i * 53 + 7) % 200).collect();
    let mut out = engine.step(&mut [SequenceStep { cache: &mut cache, tokens: &prompt, logits: Logits::Last }], false)?;
    cache.quantize(later, later)?;
    out.extend(engine.step(&mut [SequenceStep { cache: &mut cache, tokens: &[42], logits: Logits::Last }], false)?);
    let snapshot = cache.snapshot(cache.len(), cache.config().clone(), cache.rotation())?;
    let mut resumed = engine.new_cache(64, later, later)?;
    resumed.copy_prefix_from(&snapshot, snapshot.len())?;
    for t in [3u32, 99] {
        out.extend(engine.step(&mut [SequenceStep { cache: &mut resumed, tokens: &[t], logits: Logits::Last }], false)?);
    }
    Ok(out)
}

#[test]
fn layouts_requantization_and_prefixes_work_on_the_device() {
    let Some(device) = vulkan() else { return };
    each_in_own_process("layouts_requantization_and_prefixes_work_on_the_device", &["layouts".to_string()], |_| {
        let (q8, f16, q4) = (CacheType::Q8_0, CacheType::F16, CacheType::Q4_0);
        let run = |p: &Placement| cache_life(&mut text_engine(p).unwrap(), [(q8, f16), (f16, q4)], q8);
        let cpu = run(&Placement::Cpu).unwrap();
        let gpu = run(&device).unwrap_or_else(|e| panic!("on {device:?}: {e}"));
        // The same life with f32 caches throughout, on the CPU: what the cache types themselves cost.
        let f32 = CacheType::F32;
        let exact = cache_life(&mut text_engine(&Placement::Cpu).unwrap(), [(f32, f32), (f32, f32)], f32).unwrap();
        let vocab = cpu[0].len();
        let (apart, cache_error) = (worst(&gpu, &cpu, vocab), worst(&cpu, &exact, vocab));
        eprintln!("case layouts: device vs CPU {apart:.2e}; the CPU's types vs f32 caches {cache_error:.2e}");
        assert_eq!(gpu.len(), cpu.len());
        assert!(apart <= cache_error.max(PRODUCT_FLOOR), "device {apart:.2e} from the CPU");
    });
}

#[test]
fn a_cache_type_the_device_does_not_attend_over_is_refused_by_name() {
    let Some(device) = vulkan() else { return };
    let engine = text_engine(&device).unwrap();
    let e = engine.new_cache(64, CacheType::MXFP4, CacheType::F16).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("Vulkan0") && e.contains("mxfp4"), "{e}");
    let e = engine.new_cache_with(engine.cache_config(64, CacheType::Q8_0, CacheType::Q8_0).with_recent(16)).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("recent"), "{e}");
}

/// Greedy frames of a tiny CSM on `placement`: a spoken prompt prefilled, then `n` frames.
fn csm_frames(placement: &Placement, t: CacheType, n: usize) -> ccsm::Result<Vec<Vec<u32>>> {
    let path = model("tiny-csm.gguf");
    let file = GgufFile::open(&path).unwrap();
    let model = CsmModel::from_file_placed(&file, &path, placement)?;
    let c = model.config().clone();
    let mut engine = CsmEngine::new(model, 2, 64, (t, t))?;
    let mut session = engine.new_session(&SessionCaches { capacity: 128, k_type: t, v_type: t })?;
    let rows = Segment { speaker: 0, text: "Hello there, how are you?".into(), frames: vec![], audio: None }.rows(
        engine.model().tokenizer(),
        c.n_codebooks,
        c.audio_vocab,
    )?;
    engine.prefill(&mut [PrefillRequest { session: &mut session, rows: &rows }])?;
    let mut greedy = Sampler::new(SamplerConfig { temperature: 0.0, top_k: None, top_p: 1.0, seed: 1 })?;
    let mut frames = Vec::new();
    for _ in 0..n {
        match engine.step_frames(&mut [FrameRequest::new(&mut session, &mut greedy)])?.pop().flatten() {
            Some(frame) => frames.push(frame),
            None => break,
        }
    }
    Ok(frames)
}

/// Greedy frames equal the CPU's: with an f16 cache under the device's own (f16) arithmetic, and with
/// quantized caches under f32 shaders. (Under f16 arithmetic a quantized cache stores some rows one
/// step apart from the CPU's — the device's f16-rounded K/V land on the other side of a rounding
/// boundary — and the random-weight model's near-ties then pick other codes: q4_0 differed from the
/// first frame, q5_0 from the third, q8_0 and iq4_nl not in 6; with f32 shaders none did.)
#[test]
fn csm_frames_on_the_device_equal_the_cpus() {
    let Some(device) = vulkan() else { return };
    let cases: Vec<String> = ["f16", "f16@f32", "q8_0@f32", "q4_0@f32", "q5_1@f32"].iter().map(|t| t.to_string()).collect();
    each_in_own_process("csm_frames_on_the_device_equal_the_cpus", &cases, |case| {
        let t: CacheType = case.trim_end_matches("@f32").parse().unwrap();
        let cpu = csm_frames(&Placement::Cpu, t, 6).unwrap();
        assert_eq!(cpu.len(), 6, "the CPU made 6 frames");
        let gpu = csm_frames(&device, t, 6).unwrap_or_else(|e| panic!("{t} cache on {device:?}: {e}"));
        let same = cpu.iter().zip(&gpu).take_while(|(a, b)| a == b).count();
        eprintln!("case {case}: {} greedy frames, the first {same} equal to the CPU's", cpu.len());
        assert_eq!(gpu, cpu, "{case} cache: greedy frames on the device differ from the CPU's");
    });
}

/// Samples of decoding fixed frames (any valid codes) with the codec on `placement`.
fn decoded(placement: &Placement, t: CacheType) -> ccsm::Result<Vec<f32>> {
    let path = model("tiny-mimi.gguf");
    let file = GgufFile::open(&path).unwrap();
    let model = MimiModel::from_file_placed(&file, &path, placement)?;
    let (books, size) = (model.config().n_q, model.config().codebook_size);
    let mut codec = MimiCodec::new(model, MimiOptions { n_threads: 2, k_type: t, v_type: t, max_chunk_frames: 4 })?;
    let frames = common::frames(0, 3, books, size);
    let mut stream = codec.new_stream()?;
    let mut samples = codec.decode(&mut stream, &frames[..2])?;
    for f in &frames[2..] {
        samples.extend(codec.decode(&mut stream, std::slice::from_ref(f))?);
    }
    Ok(samples)
}

#[test]
fn mimi_decoding_on_the_device_matches_the_cpu() {
    let Some(device) = vulkan() else { return };
    let cases: Vec<String> = ["f32", "f16", "q8_0"].iter().map(|t| t.to_string()).collect();
    each_in_own_process("mimi_decoding_on_the_device_matches_the_cpu", &cases, |case| {
        let t: CacheType = case.parse().unwrap();
        let cpu = decoded(&Placement::Cpu, t).unwrap();
        let gpu = decoded(&device, t).unwrap_or_else(|e| panic!("{t} cache on {device:?}: {e}"));
        assert_eq!(gpu.len(), cpu.len());
        let snr = -20.0 * relative(&gpu, &cpu).log10();
        eprintln!("case {t}: the device's audio {snr:.1} dB from the CPU's");
        assert!(snr >= 60.0, "{t} cache: the device's audio is {snr:.1} dB from the CPU's (want at least 60)");
    });
}
