//! Batched CSM frames (each decoder step one graph over every session, one backbone step for all)
//! give each session the frames it makes alone through `generate_frame`, with the same samplers:
//! sessions with different prompts, seeds and cache types, one joining after the others started.

mod common;

use ccsm::csm::{CsmGenerator, CsmModel, CsmOptions, CsmSession, FrameRequest, Segment};
use ccsm::sampling::{Sampler, SamplerConfig};
use ccsm::CacheType;

use common::model;

const TEXTS: [&str; 3] = ["Hello there, how are you?", "The Jargon File is a glossary.", "One two three."];
const FRAMES: usize = 6;

fn generator() -> CsmGenerator {
    let csm = CsmModel::load(model("tiny-csm.gguf")).unwrap();
    CsmGenerator::new(csm, CsmOptions { n_ctx: 256, k_type: CacheType::F16, v_type: CacheType::F16, n_threads: 2, n_batch: 256 }).unwrap()
}

fn sampler(seed: u64) -> Sampler {
    Sampler::new(SamplerConfig { temperature: 0.9, top_k: Some(50), top_p: 1.0, seed }).unwrap()
}

fn rows(g: &CsmGenerator, i: usize) -> Vec<ccsm::csm::Row> {
    let c = g.model().config();
    Segment { speaker: i as u32, text: TEXTS[i].into(), frames: vec![] }.rows(g.model().tokenizer(), c.n_codebooks, c.audio_vocab).unwrap()
}

fn types(i: usize) -> CacheType {
    [CacheType::F16, CacheType::Q8_0, CacheType::Q4_0][i]
}

/// Session `i` alone, one frame at a time.
fn alone(g: &mut CsmGenerator, i: usize) -> Vec<Vec<u32>> {
    let mut session = g.new_session(256, types(i), types(i)).unwrap();
    let mut s = sampler(10 + i as u64);
    g.swap_session(&mut session);
    g.prefill(&rows(g, i)).unwrap();
    let frames = (0..FRAMES).map_while(|_| g.generate_frame(&mut s, None).unwrap()).collect();
    g.swap_session(&mut session);
    frames
}

fn prefill(g: &mut CsmGenerator, session: &mut CsmSession, i: usize) {
    g.swap_session(session);
    g.prefill(&rows(g, i)).unwrap();
    g.swap_session(session);
}

#[test]
fn batched_frames_equal_each_session_alone() {
    let mut g = generator();
    let want: Vec<Vec<Vec<u32>>> = (0..TEXTS.len()).map(|i| alone(&mut g, i)).collect();
    assert!(want.iter().all(|f| f.len() == FRAMES), "every session speaks {FRAMES} frames alone");

    let mut sessions: Vec<CsmSession> = (0..TEXTS.len()).map(|i| g.new_session(256, types(i), types(i)).unwrap()).collect();
    let mut samplers: Vec<Sampler> = (0..TEXTS.len()).map(|i| sampler(10 + i as u64)).collect();
    let mut got: Vec<Vec<Vec<u32>>> = vec![Vec::new(); TEXTS.len()];
    let late = TEXTS.len() - 1;
    for (i, session) in sessions.iter_mut().enumerate().take(late) {
        prefill(&mut g, session, i);
    }
    for round in 0..FRAMES + 2 {
        // The last session joins after two rounds.
        if round == 2 {
            prefill(&mut g, &mut sessions[late], late);
        }
        let active: Vec<usize> = (0..TEXTS.len()).filter(|&i| (i != late || round >= 2) && got[i].len() < FRAMES).collect();
        if active.is_empty() {
            break;
        }
        let mut requests: Vec<FrameRequest> = sessions
            .iter_mut()
            .zip(samplers.iter_mut())
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .map(|(_, (session, sampler))| FrameRequest { session, sampler })
            .collect();
        let frames = g.generate_frames(&mut requests).unwrap();
        assert_eq!(frames.len(), active.len());
        for (&i, frame) in active.iter().zip(frames) {
            got[i].push(frame.expect("the random model keeps speaking"));
        }
    }
    assert_eq!(got, want);
    assert!(g.generate_frames(&mut []).unwrap().is_empty());
}

#[test]
fn batched_frames_need_prefilled_sessions() {
    let mut g = generator();
    let mut session = g.new_session(64, CacheType::F16, CacheType::F16).unwrap();
    let mut s = sampler(1);
    let err = g.generate_frames(&mut [FrameRequest { session: &mut session, sampler: &mut s }]).unwrap_err();
    assert!(err.to_string().contains("prefill"), "{err}");
    assert!(g.new_session(0, CacheType::F16, CacheType::F16).is_err());
}
