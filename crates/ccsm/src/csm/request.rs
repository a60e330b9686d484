//! One speech request: what `--batch` files hold, one JSON object per line.

use serde::Deserialize;

use super::model::CsmModel;
use super::prompt::{Row, Segment};
use crate::error::{Error, Result};

/// One thing to say, with optional context turns said before it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The text to say.
    pub text: String,
    /// The speaker id to say it as.
    #[serde(default)]
    pub speaker: u32,
    /// Turns said before it (their text and frames).
    #[serde(default)]
    pub context: Vec<Segment>,
    /// The sampling seed (default: the run's).
    pub seed: Option<u64>,
    /// Most frames to make (default: the run's).
    pub max_frames: Option<u32>,
    /// A WAV file the request's audio goes to (the command line's `--batch`; needs a codec).
    #[serde(default)]
    pub output: Option<std::path::PathBuf>,
}

impl Request {
    /// Parses one JSONL line as read from a file (any bytes; a trailing CR is ignored).
    pub fn from_line_bytes(line: &[u8]) -> Result<Request> {
        let line = std::str::from_utf8(line).map_err(|e| Error::Input(format!("line is not UTF-8 ({e})")))?;
        Self::from_json_line(line.strip_suffix('\r').unwrap_or(line))
    }

    /// Parses one JSONL line; the error says what is wrong (and where, by serde's column).
    pub fn from_json_line(line: &str) -> Result<Request> {
        let request: Request = serde_json::from_str(line).map_err(|e| {
            // serde counts lines within the JSON; a batch line is one line, so the column is what locates it.
            let message = e.to_string();
            let what = message.rsplit_once(" at line ").map_or(message.as_str(), |(what, _)| what);
            Error::Input(format!("malformed request at column {}: {what}", e.column()))
        })?;
        if request.max_frames == Some(0) {
            return Err(Error::Input("max_frames must be at least 1".into()));
        }
        Ok(request)
    }

    /// The backbone rows of the context turns and then the text to say (no frames yet), checked
    /// against the model's codebooks and audio vocabulary.
    pub fn rows(&self, model: &CsmModel) -> Result<Vec<Row>> {
        Ok(self.rows_after_context(model)?.0)
    }

    /// `rows`, and how many of them are the context's (the rest say the text).
    pub fn rows_after_context(&self, model: &CsmModel) -> Result<(Vec<Row>, usize)> {
        let c = model.config();
        let mut rows = context_rows(model, &self.context)?;
        let context = rows.len();
        let target = Segment { speaker: self.speaker, text: self.text.clone(), frames: Vec::new(), audio: None };
        rows.extend(target.rows(model.tokenizer(), c.n_codebooks, c.audio_vocab)?);
        Ok((rows, context))
    }
}

/// The backbone rows of context turns (a voice, a conversation so far), checked as `Request::rows` does.
pub fn context_rows(model: &CsmModel, context: &[Segment]) -> Result<Vec<Row>> {
    let c = model.config();
    let mut rows = Vec::new();
    for segment in context {
        rows.extend(segment.rows(model.tokenizer(), c.n_codebooks, c.audio_vocab)?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(line: &[u8]) -> String {
        Request::from_line_bytes(line).unwrap_err().to_string()
    }

    #[test]
    fn lines_parse_or_say_what_is_wrong_and_where() {
        let r = Request::from_line_bytes(b"{\"text\": \"hi\", \"speaker\": 2, \"max_frames\": 5}\r").unwrap();
        assert_eq!((r.text.as_str(), r.speaker, r.max_frames, r.seed), ("hi", 2, Some(5), None));
        // serde points at the end of the offending value: column 11 is the `2` of `12`.
        assert_eq!(
            error(b"{\"text\": 12 }"),
            "invalid input: malformed request at column 11: invalid type: integer `12`, expected a string"
        );
        assert!(error(b"{\"text\": \"x\", \"voice\": 1}").contains("unknown field `voice`"));
        assert!(error(b"{\"speaker\": 1}").contains("missing field `text`"));
        assert!(error(b"{\"text\": \"x\", \"max_frames\": 0}").contains("max_frames must be at least 1"));
        assert!(error(b"{\"text\": \"\xff\"}").contains("not UTF-8"));
    }
}
