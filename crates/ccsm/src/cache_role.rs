//! Which of a model's caches a cache is: reports, budgets and the server name them by role.

use serde::{Serialize, Serializer};

/// A KV cache's role in its model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheRole {
    /// A Llama model's cache.
    Text,
    /// CSM's backbone cache (prompt rows and frames).
    Backbone,
    /// CSM's decoder cache (one frame's codebooks, reset every frame).
    Decoder,
    /// Mimi's transformer cache (the codec's recent steps).
    Codec,
}

impl CacheRole {
    /// Its name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            CacheRole::Text => "text",
            CacheRole::Backbone => "backbone",
            CacheRole::Decoder => "decoder",
            CacheRole::Codec => "codec",
        }
    }
}

impl std::fmt::Display for CacheRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for CacheRole {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}
