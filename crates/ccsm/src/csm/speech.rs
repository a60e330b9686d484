//! The speech loop, written once for the command line and the server: each turn (an utterance being
//! spoken) makes its next frame with every other turn in one engine step, has it decoded to samples by
//! its own codec stream, and stops at the end of speech or its frame limit. Callers prefill the turns'
//! prompts first (`CsmEngine::prefill`) and decide what to do with each frame's samples.

use std::time::Instant;

use serde::Serialize;

use super::engine::{CsmEngine, FrameRequest};
use super::prompt::Frame;
use super::session::CsmSession;
use crate::error::Result;
use crate::generate::StopReason;
use crate::mimi::{MimiCodec, MimiStream};
use crate::sampling::Sampler;

/// Where one turn stands: frames made, the limit, and the codec's share of its time.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TurnProgress {
    pub frames: usize,
    pub max_frames: usize,
    /// Why the turn stopped, once it has.
    pub stop: Option<StopReason>,
    /// Its last frame could not be decoded (the step said why): it makes no more frames.
    pub failed: bool,
    /// Time the codec spent decoding this turn's frames.
    pub codec_seconds: f64,
}

impl TurnProgress {
    pub fn new(max_frames: usize) -> Self {
        TurnProgress { frames: 0, max_frames, stop: (max_frames == 0).then_some(StopReason::Limit), failed: false, codec_seconds: 0.0 }
    }

    /// Whether the turn makes no more frames.
    pub fn is_over(&self) -> bool {
        self.stop.is_some() || self.failed
    }
}

/// One utterance's part of a speech step.
pub struct SpeechTurn<'a> {
    pub session: &'a mut CsmSession,
    pub sampler: &'a mut Sampler,
    /// Its codec stream, when its frames become audio.
    pub stream: Option<&'a mut MimiStream>,
    pub progress: &'a mut TurnProgress,
}

/// What a step gave one turn.
#[derive(Debug)]
pub enum TurnStep {
    /// A frame and, with a codec stream, its samples.
    Frame { frame: Frame, samples: Option<Vec<f32>> },
    /// The turn stopped (it makes no frame this step).
    Stopped(StopReason),
    /// Its frame could not be decoded: the turn stops here.
    Failed(crate::Error),
    /// The turn was over before this step.
    Over,
}

/// The next frame of every turn that is not over, in one engine step, each decoded by its codec
/// stream: one entry per turn, in order. A turn that reaches its limit or the end of
/// speech gets its stop recorded in its progress (a frame at the limit is still returned). An engine
/// error fails the whole step.
pub fn speech_step(engine: &mut CsmEngine, mut codec: Option<&mut MimiCodec>, turns: &mut [SpeechTurn<'_>]) -> Result<Vec<TurnStep>> {
    let active: Vec<usize> = (0..turns.len()).filter(|&i| !turns[i].progress.is_over()).collect();
    let frames = {
        let mut requests: Vec<FrameRequest> = turns
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .map(|(_, t)| FrameRequest::new(t.session, t.sampler))
            .collect();
        engine.step_frames(&mut requests)?
    };
    let mut made = frames.into_iter();
    let mut steps = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter_mut().enumerate() {
        let progress = &mut *turn.progress;
        if !active.contains(&i) {
            steps.push(TurnStep::Over);
            continue;
        }
        let Some(frame) = made.next().flatten() else {
            progress.stop = Some(StopReason::EndOfSpeech);
            steps.push(TurnStep::Stopped(StopReason::EndOfSpeech));
            continue;
        };
        let samples = match (codec.as_deref_mut(), turn.stream.as_deref_mut()) {
            (Some(codec), Some(stream)) => {
                let started = Instant::now();
                let decoded = codec.decode(stream, std::slice::from_ref(&frame));
                progress.codec_seconds += started.elapsed().as_secs_f64();
                match decoded {
                    Ok(samples) => Some(samples),
                    Err(e) => {
                        progress.failed = true;
                        steps.push(TurnStep::Failed(e));
                        continue;
                    }
                }
            }
            _ => None,
        };
        progress.frames += 1;
        if progress.frames >= progress.max_frames {
            progress.stop = Some(StopReason::Limit);
        }
        steps.push(TurnStep::Frame { frame, samples });
    }
    Ok(steps)
}
