//! CSM frame generation against the independent numpy reference (tools/reference/csm_ref.py).

mod common;

use ccsm::csm::{CsmGenerator, CsmModel, CsmOptions, Row, Segment};
use ccsm::sampling::{Sampler, SamplerConfig};
use ccsm::CacheType;
use common::{model, python};

const TINY_CSM: &str = "tiny-csm.gguf";

fn generator(name: &str) -> CsmGenerator {
    let csm = CsmModel::load(model(name)).unwrap();
    let options = CsmOptions { n_ctx: 128, k_type: CacheType::F32, v_type: CacheType::F32, n_threads: 2, n_batch: 64 };
    CsmGenerator::new(csm, options).unwrap()
}

fn prompt(generator: &CsmGenerator) -> Vec<Row> {
    let c = generator.model().config();
    let context =
        Segment { speaker: 1, text: "Hello there.".into(), frames: vec![(0..32).map(|k| (k * 7 + 3) % 65).collect(); 2], audio: None };
    let target = Segment { speaker: 0, text: "How are you today?".into(), frames: vec![], audio: None };
    let mut rows = context.rows(generator.model().tokenizer(), c.n_codebooks, c.audio_vocab).unwrap();
    rows.extend(target.rows(generator.model().tokenizer(), c.n_codebooks, c.audio_vocab).unwrap());
    rows
}

fn rows_json(rows: &[Row]) -> String {
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| match r {
            Row::Text(id) => serde_json::json!({ "text": id }),
            Row::Audio(codes) => serde_json::json!({ "audio": codes }),
        })
        .collect();
    serde_json::to_string(&items).unwrap()
}

#[test]
fn greedy_frames_and_logits_match_the_numpy_reference() {
    const FRAMES: usize = 4;
    let mut engine = generator(TINY_CSM);
    let rows = prompt(&engine);
    let dir = tempfile::tempdir().unwrap();
    let rows_path = dir.path().join("rows.json");
    std::fs::write(&rows_path, rows_json(&rows)).unwrap();
    let out =
        python("csm_ref.py", &[model(TINY_CSM).to_str().unwrap(), "--rows", rows_path.to_str().unwrap(), "--frames", &FRAMES.to_string()]);
    let reference: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ref_frames: Vec<Vec<u32>> = serde_json::from_value(reference["frames"].clone()).unwrap();
    let ref_logits: Vec<Vec<Vec<f64>>> = serde_json::from_value(reference["logits"].clone()).unwrap();
    assert_eq!(ref_frames.len(), FRAMES, "the reference ended early");
    assert_eq!(ref_logits.len(), FRAMES, "the reference's logits are one list per frame");

    engine.prefill(&rows).unwrap();
    let mut sampler = Sampler::new(SamplerConfig { temperature: 0.0, ..Default::default() }).unwrap();
    let mut worst = 0f64;
    for (f, (want_frame, want_logits)) in ref_frames.iter().zip(&ref_logits).enumerate() {
        let mut trace = Vec::new();
        let frame = engine.generate_frame(&mut sampler, Some(&mut trace)).unwrap().expect("a frame");
        assert_eq!(&frame, want_frame, "frame {f}");
        let codebooks = engine.model().config().n_codebooks;
        assert_eq!((trace.len(), want_logits.len()), (codebooks, codebooks), "frame {f}: one logit row per codebook on both sides");
        for (k, (got, want)) in trace.iter().zip(want_logits).enumerate() {
            let spread = want.iter().cloned().fold(f64::NEG_INFINITY, f64::max) - want.iter().cloned().fold(f64::INFINITY, f64::min);
            assert_eq!(got.len(), want.len(), "frame {f} codebook {k}: vocabulary sizes differ");
            let diff = got.iter().zip(want).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
            worst = worst.max(diff / spread);
            assert!(diff / spread < 1e-4, "frame {f} codebook {k}: max |Δ| {diff} of spread {spread}");
        }
    }
    eprintln!("tiny-csm: {FRAMES} frames identical, logits within {worst:.2e} of the spread");
    assert_eq!(engine.backbone_cache().len(), rows.len() + FRAMES);
}
