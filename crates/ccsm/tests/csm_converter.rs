//! The converter on synthetic checkpoints with the real names: the original naming (interleaved RoPE)
//! and the HF naming (q/k permuted for NeoX RoPE) must give the same model.

mod common;

use std::process::Command;

use ccsm::csm::{CsmGenerator, CsmModel, CsmOptions, Segment};
use ccsm::sampling::{Sampler, SamplerConfig};
use ccsm::CacheType;
use common::{max_abs_diff, repo_root};
use ggml::gguf::GgufFile;

fn frames_and_logits(path: &std::path::Path) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let csm = CsmModel::load(path).unwrap();
    let options = CsmOptions { n_ctx: 64, k_type: CacheType::F32, v_type: CacheType::F32, n_threads: 2, n_batch: 64 };
    let mut g = CsmGenerator::new(csm, options).unwrap();
    let c = g.model().config().clone();
    let rows = Segment { speaker: 0, text: "Hello there, 2026!".into(), frames: vec![], audio: None }
        .rows(g.model().tokenizer(), c.n_codebooks, c.audio_vocab)
        .unwrap();
    g.prefill(&rows).unwrap();
    let mut sampler = Sampler::new(SamplerConfig { temperature: 0.0, ..Default::default() }).unwrap();
    let (mut frames, mut logits) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let mut trace = Vec::new();
        frames.push(g.generate_frame(&mut sampler, Some(&mut trace)).unwrap().expect("a frame"));
        logits.extend(trace);
    }
    (frames, logits)
}

#[test]
fn both_checkpoint_namings_convert_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("python3").arg(repo_root().join("tools/samples/make_csm_pair.py")).arg(dir.path()).status().unwrap();
    assert!(status.success());
    let (original, hf) = (dir.path().join("original.gguf"), dir.path().join("hf.gguf"));
    assert_eq!(GgufFile::open(&original).unwrap().get::<String>("csm.rope_layout").unwrap(), "normal");
    assert_eq!(GgufFile::open(&hf).unwrap().get::<String>("csm.rope_layout").unwrap(), "neox");

    let (frames_a, logits_a) = frames_and_logits(&original);
    let (frames_b, logits_b) = frames_and_logits(&hf);
    assert_eq!(frames_a, frames_b);
    assert_eq!(logits_a.len(), 3 * 32, "3 frames of 32 codebooks' logits");
    let worst = max_abs_diff(logits_a.iter().flatten(), logits_b.iter().flatten());
    assert!(worst < 1e-4, "logits differ by {worst}");

    // The recorded layout matters: the HF file read with the original's pair layout is another model.
    let wrong = dir.path().join("hf-read-as-normal.gguf");
    relabel_rope_layout(&hf, &wrong, "normal");
    let (_, logits_wrong) = frames_and_logits(&wrong);
    let moved = max_abs_diff(logits_b.iter().flatten(), logits_wrong.iter().flatten());
    assert!(moved > 1e-2, "the layout did not change the logits ({moved})");
}

/// Copies a GGUF with `csm.rope_layout` set to `layout`.
fn relabel_rope_layout(from: &std::path::Path, to: &std::path::Path, layout: &str) {
    use ggml::gguf::{GgufWriter, Value};
    let file = GgufFile::open(from).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in file.metadata() {
        w.set(key, value.clone());
    }
    w.set("csm.rope_layout", Value::String(layout.into()));
    for info in file.tensors() {
        let mut data = vec![0u8; info.size as usize];
        file.read_tensor_data(info, &mut data).unwrap();
        w.add_tensor(&info.name, info.dtype, &info.shape, data).unwrap();
    }
    w.write(to).unwrap();
}
