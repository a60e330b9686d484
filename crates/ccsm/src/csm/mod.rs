//! Sesame's Conversational Speech Model: a Llama backbone over text and audio-frame rows, and a small
//! Llama decoder that turns each backbone state into the 32 codes of a Mimi frame.

mod config;
mod engine;
mod generator;
mod graphs;
mod model;
mod prompt;
mod request;
mod session;
mod speech;
pub mod voice;

pub use config::CsmConfig;
pub use engine::{CsmEngine, FrameRequest, PrefillRequest, SessionCaches};
pub use generator::{CsmGenerator, CsmOptions};
pub use model::CsmModel;
pub use prompt::{frame_key, row_keys, Frame, Row, Segment};
pub use request::{context_rows, Request};
pub use session::{CsmSession, FrameTimings};
pub use speech::{speech_step, SpeechTurn, TurnProgress, TurnStep};
