//! Conversations a speech client names (`"conversation": ID`): each turn's context is the turns said
//! so far (with the frames they were said with), then the request's own context; an answered turn
//! joins it. Their rows are the prefix cache's to keep warm; this keeps only the segments, for a
//! time-to-live after their last turn, and at most `MAX_CONVERSATIONS` of them (the oldest go first).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ccsm::csm::Segment;

/// Conversations kept at once at most.
const MAX_CONVERSATIONS: usize = 4096;

struct Conversation {
    context: Vec<Segment>,
    used: Instant,
}

/// The conversations the engine thread keeps.
pub struct Conversations {
    kept: HashMap<String, Conversation>,
    ttl: Duration,
}

impl Conversations {
    /// No conversations; each forgotten `ttl` after its last turn.
    pub fn new(ttl: Duration) -> Self {
        Conversations { kept: HashMap::new(), ttl }
    }

    /// The context a turn runs with: the conversation's turns so far (when it exists) and then the
    /// request's own context (`context` less its first `voice_segments`, which a continued
    /// conversation already holds); without a known conversation, `context` as it is.
    pub fn context_for(&mut self, id: Option<&str>, context: &[Segment], voice_segments: usize) -> Vec<Segment> {
        self.expire();
        match id.and_then(|id| self.kept.get(id)) {
            Some(c) => c.context.iter().chain(&context[voice_segments.min(context.len())..]).cloned().collect(),
            None => context.to_vec(),
        }
    }

    /// Records an answered turn: the context it ran with, then what it said and the frames it said it with.
    pub fn add_turn(&mut self, id: &str, mut context: Vec<Segment>, said: Segment) {
        context.push(said);
        self.kept.insert(id.to_owned(), Conversation { context, used: Instant::now() });
        if self.kept.len() > MAX_CONVERSATIONS {
            if let Some(oldest) = self.kept.iter().min_by_key(|(_, c)| c.used).map(|(k, _)| k.clone()) {
                self.kept.remove(&oldest);
            }
        }
    }

    fn expire(&mut self) {
        let ttl = self.ttl;
        self.kept.retain(|_, c| c.used.elapsed() < ttl);
    }
}
