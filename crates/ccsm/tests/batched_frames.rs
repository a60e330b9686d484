//! Batched CSM frames (each decoder step one graph over every session, one backbone step for all)
//! give each session the frames it makes alone through `generate_frame`, with the same samplers:
//! sessions with different prompts, seeds and cache types, one joining after the others started,
//! prompts prefilled together or one by one.

mod common;

use ccsm::csm::{CsmEngine, CsmGenerator, CsmModel, CsmOptions, CsmSession, FrameRequest, PrefillRequest, Segment, SessionCaches};
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

fn rows(m: &CsmModel, i: usize) -> Vec<ccsm::csm::Row> {
    let c = m.config();
    Segment { speaker: i as u32, text: TEXTS[i].into(), frames: vec![], audio: None }
        .rows(m.tokenizer(), c.n_codebooks, c.audio_vocab)
        .unwrap()
}

fn types(i: usize) -> CacheType {
    [CacheType::F16, CacheType::Q8_0, CacheType::Q4_0][i]
}

fn caches(i: usize) -> SessionCaches {
    SessionCaches { capacity: 256, k_type: types(i), v_type: types(i) }
}

/// Session `i` alone (a batch of one), one frame at a time.
fn alone(i: usize) -> Vec<Vec<u32>> {
    let mut e = generator().into_engine();
    let mut session = e.new_session(&caches(i)).unwrap();
    let mut s = sampler(10 + i as u64);
    prefill(&mut e, &mut [(&mut session, i)]);
    (0..FRAMES).map_while(|_| e.step_frames(&mut [FrameRequest::new(&mut session, &mut s)]).unwrap().pop().flatten()).collect()
}

fn prefill(e: &mut CsmEngine, sessions: &mut [(&mut CsmSession, usize)]) {
    let prompts: Vec<_> = sessions.iter().map(|(_, i)| rows(e.model(), *i)).collect();
    let mut requests: Vec<PrefillRequest> =
        sessions.iter_mut().zip(&prompts).map(|((session, _), rows)| PrefillRequest { session, rows }).collect();
    e.prefill(&mut requests).unwrap();
}

#[test]
fn batched_frames_equal_each_session_alone() {
    let want: Vec<Vec<Vec<u32>>> = (0..TEXTS.len()).map(alone).collect();
    assert!(want.iter().all(|f| f.len() == FRAMES), "every session speaks {FRAMES} frames alone");
    for together in [true, false] {
        assert_eq!(batched(together), want, "prompts prefilled {}", if together { "together" } else { "one by one" });
    }
}

/// Every session's frames made in batched rounds, the last session joining after two rounds; the first
/// sessions' prompts prefilled in one call (`together`) or one call each.
fn batched(together: bool) -> Vec<Vec<Vec<u32>>> {
    let mut e = generator().into_engine();
    let mut sessions: Vec<CsmSession> = (0..TEXTS.len()).map(|i| e.new_session(&caches(i)).unwrap()).collect();
    let mut samplers: Vec<Sampler> = (0..TEXTS.len()).map(|i| sampler(10 + i as u64)).collect();
    let mut got: Vec<Vec<Vec<u32>>> = vec![Vec::new(); TEXTS.len()];
    let late = TEXTS.len() - 1;
    let mut first: Vec<(&mut CsmSession, usize)> = sessions.iter_mut().take(late).zip(0..).collect();
    if together {
        prefill(&mut e, &mut first);
    } else {
        first.into_iter().for_each(|one| prefill(&mut e, &mut [one]));
    }
    for round in 0..FRAMES + 2 {
        // The last session joins after two rounds.
        if round == 2 {
            prefill(&mut e, &mut [(&mut sessions[late], late)]);
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
            .map(|(_, (session, sampler))| FrameRequest::new(session, sampler))
            .collect();
        let frames = e.step_frames(&mut requests).unwrap();
        assert_eq!(frames.len(), active.len());
        for (&i, frame) in active.iter().zip(frames) {
            got[i].push(frame.expect("the random model keeps speaking"));
        }
    }
    assert!(e.step_frames(&mut []).unwrap().is_empty());
    got
}

#[test]
fn batched_frames_need_prefilled_sessions() {
    let mut e = generator().into_engine();
    let mut session = e.new_session(&SessionCaches { capacity: 64, k_type: CacheType::F16, v_type: CacheType::F16 }).unwrap();
    let mut s = sampler(1);
    let err = e.step_frames(&mut [FrameRequest::new(&mut session, &mut s)]).unwrap_err();
    assert!(err.to_string().contains("prefill"), "{err}");
    assert!(e.new_session(&SessionCaches { capacity: 0, k_type: CacheType::F16, v_type: CacheType::F16 }).is_err());
}
