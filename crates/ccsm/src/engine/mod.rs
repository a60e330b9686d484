//! Engines and sessions: an engine holds what every session shares (weights, backend, compute
//! buffers, kept graphs); a session holds one sequence's state (its caches and positions). A step runs
//! any number of sessions' rows through one graph, so the weights are read once for all of them.

pub(crate) mod step;
mod text;

pub(crate) use text::PER_SEQUENCE_NODES;
pub use text::{SequenceStep, TextEngine};
