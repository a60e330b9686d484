//! CSM prompts: segments `[speaker]text` (BOS … EOS, one text row per token), each optionally followed
//! by its audio frames and one all-zero frame.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

pub use crate::mimi::Frame;

/// One backbone position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Row {
    /// A text token (column 32 of the 33-column row).
    Text(u32),
    /// A frame of audio codes (columns 0..32).
    Audio(Frame),
}

impl Row {
    /// The row's key in a prefix cache (stable: written to disk with cached prefixes).
    pub fn key(&self) -> u64 {
        match self {
            Row::Text(id) => crate::prefix_cache::row_key(0, &[*id]),
            Row::Audio(frame) => frame_key(frame),
        }
    }
}

/// The key of a frame's row (`Row::Audio(frame).key()` without the row).
pub fn frame_key(frame: &[u32]) -> u64 {
    crate::prefix_cache::row_key(1, frame)
}

/// The keys of backbone rows.
pub fn row_keys(rows: &[Row]) -> Vec<u64> {
    rows.iter().map(Row::key).collect()
}

/// A turn of the conversation: what a speaker said, and (for context) the frames of how it sounded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a segment {\"speaker\", \"text\", \"frames\" or \"audio\"}")]
pub struct Segment {
    /// Who speaks (CSM's speaker id, written as `[id]` before the text).
    pub speaker: u32,
    /// What they said.
    pub text: String,
    /// How it sounded (Mimi frames; empty for the text to say).
    #[serde(default)]
    pub frames: Vec<Frame>,
    /// How it sounded, as a recording (a path; relative paths are resolved by whoever read the segment):
    /// encoded into `frames` before the segment becomes rows (`csm::voice`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<std::path::PathBuf>,
}

impl Segment {
    /// The segment's backbone rows.
    pub fn rows(&self, tokenizer: &Tokenizer, n_codebooks: usize, audio_vocab: usize) -> Result<Vec<Row>> {
        if let (Some(audio), true) = (&self.audio, self.frames.is_empty()) {
            return Err(Error::Input(format!("the segment's audio {} is not encoded yet (csm::voice encodes it)", audio.display())));
        }
        let (bos, eos) = match (tokenizer.bos(), tokenizer.eos()) {
            (Some(b), Some(e)) => (b, e),
            _ => return Err(Error::Tokenizer("CSM segments need BOS and EOS ids".into())),
        };
        let mut rows = vec![Row::Text(bos)];
        // The text may be a client's: spellings of control tokens stay text.
        rows.extend(tokenizer.encode_literal(&format!("[{}]{}", self.speaker, self.text))?.into_iter().map(Row::Text));
        rows.push(Row::Text(eos));
        for (i, frame) in self.frames.iter().enumerate() {
            if frame.len() != n_codebooks {
                return Err(Error::BadFrame {
                    index: i,
                    why: format!("context frame {i} has {} codes, the model uses {n_codebooks}", frame.len()),
                });
            }
            if let Some(&bad) = frame.iter().find(|&&c| c as usize >= audio_vocab) {
                return Err(Error::BadFrame {
                    index: i,
                    why: format!("context frame {i} has code {bad}, beyond the audio vocabulary of {audio_vocab}"),
                });
            }
            rows.push(Row::Audio(frame.clone()));
        }
        if !self.frames.is_empty() {
            rows.push(Row::Audio(vec![0; n_codebooks]));
        }
        Ok(rows)
    }
}
