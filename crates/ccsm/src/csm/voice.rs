//! Voices and context from recordings: a segment's `audio` (a WAV, FLAC, MP3 or Ogg Vorbis file) read,
//! resampled to the codec's rate and encoded into the frames CSM reads, so a recording of a speaker can
//! be the voice and the conversation so far.

use std::path::Path;

use super::prompt::Segment;
use crate::audio_in::{self, MAX_SECONDS};
use crate::error::Result;
use crate::mimi::{Frame, MimiCodec};

/// The frames of an audio file: read (mono, at most `MAX_SECONDS`), resampled to the codec's rate,
/// zero-padded to whole frames and encoded into `codebooks` codebooks.
pub fn encode_file(codec: &mut MimiCodec, path: &Path, codebooks: usize) -> Result<Vec<Frame>> {
    let audio = audio_in::read_file(path, MAX_SECONDS)?;
    encode_audio(codec, audio, codebooks)
}

/// The frames of audio already read (see `encode_file`).
pub fn encode_audio(codec: &mut MimiCodec, audio: audio_in::Audio, codebooks: usize) -> Result<Vec<Frame>> {
    let rate = codec.model().config().sample_rate as u32;
    let audio = audio.resampled(rate)?;
    codec.encode_all(&audio.samples, codebooks)
}

/// Encodes the `audio` of every segment that has one into its `frames` (all of CSM's codebooks);
/// relative paths are taken from `base` (the folder of the file that named them).
pub fn encode_segments(codec: &mut MimiCodec, segments: &mut [Segment], base: &Path, codebooks: usize) -> Result<()> {
    for segment in segments.iter_mut() {
        let Some(audio) = &segment.audio else { continue };
        let path = if audio.is_absolute() { audio.clone() } else { base.join(audio) };
        segment.frames = encode_file(codec, &path, codebooks)?;
        segment.audio = Some(path);
    }
    Ok(())
}
