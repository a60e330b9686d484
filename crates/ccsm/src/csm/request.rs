//! One speech request: what `--batch` files hold, one JSON object per line.

use serde::Deserialize;

use super::model::CsmModel;
use super::prompt::{Row, Segment};
use crate::error::{Error, Result};

/// One thing to say, with optional context turns said before it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub text: String,
    #[serde(default)]
    pub speaker: u32,
    #[serde(default)]
    pub context: Vec<Segment>,
    pub seed: Option<u64>,
    pub max_frames: Option<u32>,
}

impl Request {
    /// Parses one JSONL line as read from a file (any bytes; a trailing CR is ignored).
    pub fn from_line_bytes(line: &[u8]) -> Result<Request> {
        let line = std::str::from_utf8(line).map_err(|e| Error::Input(format!("line is not UTF-8 ({e})")))?;
        Self::from_json_line(line.strip_suffix('\r').unwrap_or(line))
    }

    /// Parses one JSONL line; the error says what is wrong (and where, by serde's column).
    pub fn from_json_line(line: &str) -> Result<Request> {
        let request: Request = serde_json::from_str(line).map_err(|e| Error::Input(format!("malformed request: {e}")))?;
        if request.max_frames == Some(0) {
            return Err(Error::Input("max_frames must be at least 1".into()));
        }
        Ok(request)
    }

    /// The backbone rows of the context turns and then the text to say (no frames yet), checked
    /// against the model's codebooks and audio vocabulary.
    pub fn rows(&self, model: &CsmModel) -> Result<Vec<Row>> {
        let c = model.config();
        let target = Segment { speaker: self.speaker, text: self.text.clone(), frames: Vec::new() };
        let mut rows = Vec::new();
        for segment in self.context.iter().chain(std::iter::once(&target)) {
            rows.extend(segment.rows(model.tokenizer(), c.n_codebooks, c.audio_vocab)?);
        }
        Ok(rows)
    }
}
