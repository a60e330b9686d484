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
use crate::mimi::{MimiCodec, MimiStream, StreamChunk};
use crate::sampling::Sampler;

/// Where one turn stands: frames made, the limit, and the codec's share of its time.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TurnProgress {
    /// Frames made so far.
    pub frames: usize,
    /// Frames it may make at most.
    pub max_frames: usize,
    /// Why the turn stopped, once it has.
    pub stop: Option<StopReason>,
    /// Its last frame could not be decoded (the step said why): it makes no more frames.
    pub failed: bool,
    /// Time the codec spent decoding this turn's frames.
    pub codec_seconds: f64,
}

impl TurnProgress {
    /// A turn that has made nothing yet (a limit of 0 stops it at once).
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
    /// The session that speaks.
    pub session: &'a mut CsmSession,
    /// Draws its codes.
    pub sampler: &'a mut Sampler,
    /// Its codec stream, when its frames become audio.
    pub stream: Option<&'a mut MimiStream>,
    /// Where it stands (updated by the step).
    pub progress: &'a mut TurnProgress,
}

/// What a step gave one turn.
#[derive(Debug)]
pub enum TurnStep {
    /// A frame and, with a codec stream, its samples.
    Frame {
        /// Its codes.
        frame: Frame,
        /// Its samples, when the turn has a codec stream.
        samples: Option<Vec<f32>>,
    },
    /// The turn stopped (it makes no frame this step).
    Stopped(StopReason),
    /// Its frame could not be decoded: the turn stops here.
    Failed(crate::Error),
    /// The turn was over before this step.
    Over,
}

/// The next frame of every turn that is not over, in one engine step, decoded by the turns' codec
/// streams together (one codec graph): one entry per turn, in order. A turn that reaches its limit
/// or the end of speech gets its stop recorded in its progress (a frame at the limit is still
/// returned). An engine error fails the whole step; a frame the codec cannot decode fails its turn.
pub fn speech_step(engine: &mut CsmEngine, codec: Option<&mut MimiCodec>, turns: &mut [SpeechTurn<'_>]) -> Result<Vec<TurnStep>> {
    let active: Vec<usize> = (0..turns.len()).filter(|&i| !turns[i].progress.is_over()).collect();
    let made = {
        let mut requests: Vec<FrameRequest> = turns
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .map(|(_, t)| FrameRequest::new(t.session, t.sampler))
            .collect();
        engine.step_frames(&mut requests)?
    };
    let mut frames: Vec<Option<Frame>> = vec![None; turns.len()];
    for (&i, frame) in active.iter().zip(made) {
        frames[i] = frame;
    }
    let mut samples = match codec {
        Some(codec) => decode(codec, turns, &frames),
        None => (0..turns.len()).map(|_| None).collect(),
    };
    let mut steps = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter_mut().enumerate() {
        let progress = &mut *turn.progress;
        if !active.contains(&i) {
            steps.push(TurnStep::Over);
            continue;
        }
        let Some(frame) = frames[i].take() else {
            progress.stop = Some(StopReason::EndOfSpeech);
            steps.push(TurnStep::Stopped(StopReason::EndOfSpeech));
            continue;
        };
        let samples = match samples[i].take() {
            Some(Err(e)) => {
                progress.failed = true;
                steps.push(TurnStep::Failed(e));
                continue;
            }
            Some(Ok(samples)) => Some(samples),
            None => None,
        };
        progress.frames += 1;
        if progress.frames >= progress.max_frames {
            progress.stop = Some(StopReason::Limit);
        }
        steps.push(TurnStep::Frame { frame, samples });
    }
    Ok(steps)
}

/// Each new frame's samples by its turn's stream, all streams in one codec graph; when that fails,
/// each stream alone, so the error is its own turn's. `None` for turns without a frame or a stream.
fn decode(codec: &mut MimiCodec, turns: &mut [SpeechTurn<'_>], frames: &[Option<Frame>]) -> Vec<Option<Result<Vec<f32>>>> {
    let started = Instant::now();
    let n = turns.len();
    let mut which = Vec::new();
    let mut chunks = Vec::new();
    for (i, (turn, frame)) in turns.iter_mut().zip(frames).enumerate() {
        if let (Some(stream), Some(frame)) = (turn.stream.as_deref_mut(), frame) {
            which.push(i);
            chunks.push(StreamChunk { stream, frames: std::slice::from_ref(frame) });
        }
    }
    let mut out: Vec<Option<Result<Vec<f32>>>> = (0..n).map(|_| None).collect();
    match codec.decode_streams(&mut chunks) {
        Ok(decoded) => which.iter().zip(decoded).for_each(|(&i, s)| out[i] = Some(Ok(s))),
        Err(_) => {
            // Nothing was decoded (every stream's frames are checked first, and a failed graph
            // changes no cache): decode one by one to find whose frame it was.
            for (&i, chunk) in which.iter().zip(chunks.iter_mut()) {
                out[i] = Some(codec.decode(chunk.stream, chunk.frames));
            }
        }
    }
    let share = started.elapsed().as_secs_f64() / which.len().max(1) as f64;
    for &i in &which {
        turns[i].progress.codec_seconds += share;
    }
    out
}
