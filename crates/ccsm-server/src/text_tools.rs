//! The text model's tokenizer and chat template, shared by the HTTP side once loaded: a client's
//! prompt becomes tokens here, on tokio's blocking threads, never on the engine thread.

use ccsm::chat::{ChatTemplate, Message};
use ccsm::tokenizer::Tokenizer;

use crate::api::ApiError;

/// What the HTTP side needs to turn a request into tokens: the model's tokenizer, chat template and
/// vocabulary size, shared once it is loaded. Tokenizing (and rendering a chat) runs on tokio's
/// blocking threads, never on the engine thread, so one large request cannot stall every session.
pub struct TextTools {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// Token ids `logit_bias` may name: the model's output size.
    pub(crate) vocab: usize,
}

impl TextTools {
    pub fn new(tokenizer: &Tokenizer, vocab: usize) -> Self {
        let template = ChatTemplate::of(tokenizer).unwrap_or_else(|e| {
            tracing::warn!("the model's chat template is unusable, /v1/chat/completions will refuse: {e}");
            None
        });
        TextTools { tokenizer: tokenizer.clone(), template, vocab }
    }

    /// A client's prompt as tokens: spellings of control tokens stay text (in a chat, only the
    /// template's own text makes control tokens).
    pub(crate) fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
        let tokens = match prompt {
            Prompt::Plain(text) => self.tokenizer.encode_untrusted(text),
            Prompt::Chat(messages) => match &self.template {
                Some(t) => t.encode(&self.tokenizer, messages),
                None => return Err(ApiError::invalid("this model has no chat template (tokenizer.chat_template); use /v1/completions")),
            },
        };
        tokens.map_err(|e| ApiError::invalid(e.to_string()))
    }
}

/// A text request's prompt as the client sent it.
pub(crate) enum Prompt {
    Plain(String),
    Chat(Vec<Message>),
}
