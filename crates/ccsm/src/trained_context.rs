//! Noticing positions past the context a model was trained for.

/// Notices when positions pass the context a model was trained for. Only a memory budget lets that
/// happen (full caches evict instead of failing); generation goes on, with one warning per run, since
/// RoPE positions beyond the trained range may degrade the output.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TrainedContext {
    limit: usize,
    passed: bool,
}

impl TrainedContext {
    pub(crate) fn new(limit: usize) -> Self {
        TrainedContext { limit, passed: false }
    }

    /// Records the next position of a cache; warns the first time it passes the limit.
    pub(crate) fn observe(&mut self, next_position: i32, what: &str) {
        if !self.passed && next_position as usize > self.limit {
            self.passed = true;
            tracing::warn!(
                "{what} positions passed the model's trained context of {} (the memory budget evicts instead of stopping); output may degrade from here",
                self.limit
            );
        }
    }

    pub(crate) fn passed(&self) -> bool {
        self.passed
    }

    pub(crate) fn reset(&mut self) {
        self.passed = false;
    }
}
