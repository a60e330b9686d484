//! Byte-level BPE tokenizers from GGUF metadata (`tokenizer.ggml.model = gpt2`), built on the
//! `tokenizers` crate. The pre-tokenizer (how text is split before BPE) is chosen by
//! `tokenizer.ggml.pre`; an unknown one is an error, never a guess.

use std::collections::HashMap;

use ggml::gguf::GgufFile;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// Llama 3's split pattern (also CSM's text tokenizer).
const LLAMA3_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;

/// The pre-tokenizers this engine knows, by their `tokenizer.ggml.pre` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// SmolLM2: single digits split off, then GPT-2's pattern.
    Smollm,
    /// Llama 3: one pattern, digits in groups of up to three.
    LlamaBpe,
    /// GPT-2's pattern alone.
    Gpt2,
}

impl PreTokenizer {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "smollm" => Ok(PreTokenizer::Smollm),
            "llama-bpe" | "llama3" => Ok(PreTokenizer::LlamaBpe),
            "gpt2" | "default" => Ok(PreTokenizer::Gpt2),
            other => Err(Error::Tokenizer(format!(
                "pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported; known: smollm, llama-bpe, gpt2"
            ))),
        }
    }

    fn build(self) -> Result<PreTokenizerWrapper> {
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            let split = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| Error::Tokenizer(format!("bad split pattern: {e}")))?;
            Ok(split.into())
        };
        // ByteLevel maps bytes to GPT-2's printable alphabet; with `use_regex` it also applies
        // GPT-2's split pattern.
        let byte_level = |use_regex: bool| PreTokenizerWrapper::from(ByteLevel::new(false, false, use_regex));
        let steps = match self {
            PreTokenizer::Smollm => vec![split(r"\p{N}")?, byte_level(true)],
            PreTokenizer::LlamaBpe => vec![split(LLAMA3_PATTERN)?, byte_level(false)],
            PreTokenizer::Gpt2 => vec![byte_level(true)],
        };
        Ok(Sequence::new(steps).into())
    }
}

/// A text tokenizer with the model's special ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl Tokenizer {
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model: String = file.get("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!("tokenizer.ggml.model `{model}` is not supported (only gpt2 byte-level BPE)")));
        }
        let pre = PreTokenizer::from_name(&file.get::<String>("tokenizer.ggml.pre")?)?;
        let tokens: Vec<String> = file.get("tokenizer.ggml.tokens")?;
        let merges: Vec<String> = file.get("tokenizer.ggml.merges")?;
        let types: Option<Vec<i32>> = file.get_opt("tokenizer.ggml.token_type")?;
        if let Some(t) = &types {
            if t.len() != tokens.len() {
                return Err(Error::Tokenizer(format!("{} token types for {} tokens", t.len(), tokens.len())));
            }
        }
        let special_id = |key: &str| -> Result<Option<u32>> {
            match file.get_opt::<u32>(key)? {
                Some(id) if id as usize >= tokens.len() => {
                    Err(Error::Tokenizer(format!("{key} = {id} is outside the vocabulary of {}", tokens.len())))
                }
                other => Ok(other),
            }
        };
        let mut tokenizer = Self::build(&tokens, &merges, types.as_deref(), pre)?;
        tokenizer.bos = special_id("tokenizer.ggml.bos_token_id")?;
        tokenizer.eos = special_id("tokenizer.ggml.eos_token_id")?;
        tokenizer.eot = special_id("tokenizer.ggml.eot_token_id")?;
        tokenizer.add_bos = file.get_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        tokenizer.chat_template = file.get_opt("tokenizer.chat_template")?;
        Ok(tokenizer)
    }

    /// A tokenizer from a vocabulary (in GPT-2's byte alphabet), ranked merges ("a b") and token types.
    pub fn build(tokens: &[String], merges: &[String], types: Option<&[i32]>, pre: PreTokenizer) -> Result<Self> {
        let mut vocab: HashMap<String, u32, ahash::RandomState> = HashMap::default();
        for (id, token) in tokens.iter().enumerate() {
            // Later duplicates would silently shadow earlier ids; refuse them.
            if vocab.insert(token.clone(), id as u32).is_some() {
                return Err(Error::Tokenizer(format!("token `{token}` appears twice in the vocabulary")));
            }
        }
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) if vocab.contains_key(a) && vocab.contains_key(b) => Ok((a.to_owned(), b.to_owned())),
                _ => Err(Error::Tokenizer(format!("merge #{i} `{m}` is not two vocabulary tokens"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| Error::Tokenizer(format!("cannot build BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre.build()?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        if let Some(types) = types {
            let specials: Vec<AddedToken> = tokens
                .iter()
                .zip(types)
                .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
                .map(|(tok, _)| AddedToken::from(tok.clone(), true))
                .collect();
            inner.add_special_tokens(&specials);
        }
        Ok(Tokenizer { inner, vocab_size: tokens.len(), bos: None, eos: None, eot: None, add_bos: false, chat_template: None })
    }

    /// The Jinja chat template the file carries (`tokenizer.chat_template`).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The text of one token as the vocabulary spells it (special tokens included).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id).map(|t| self.inner.decode(&[id], false).unwrap_or(t))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `encode` puts BOS first (the model's `tokenizer.ggml.add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Ends generation: EOS or end-of-turn.
    pub fn is_end(&self, id: u32) -> bool {
        Some(id) == self.eos || Some(id) == self.eot
    }

    /// Token ids of `text` (special tokens written in the text are recognised), with BOS when the
    /// model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_plain(text)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Token ids of `text` without BOS/EOS.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::TokenOutOfRange { id: bad, vocab: self.vocab_size });
        }
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A vocabulary as a file declares it: tokens, merges, token types.
    type Vocabulary = (Vec<String>, Vec<String>, Option<Vec<i32>>);

    /// Vocabularies a hostile file can declare: each builds and encodes without panicking, or is refused.
    #[test]
    fn odd_vocabularies_encode_or_are_refused() {
        let cases: Vec<Vocabulary> = vec![
            (strings(&["", "a", "b"]), vec![], None),
            (strings(&["", "a", "b"]), vec![], Some(vec![3, 1, 1])),
            (strings(&["a", "b", "ab"]), strings(&["a b"]), Some(vec![3, 3, 3])),
            (strings(&["a", "b"]), strings(&["a b"]), None),
            (strings(&["a", "b", "ab"]), strings(&["a b", "a b"]), None),
            (strings(&["a", " ", "a "]), strings(&["a  "]), None),
            (strings(&["\u{0}", "\u{fffd}", "é"]), vec![], Some(vec![3, 3, 3])),
            (vec![], vec![], None),
        ];
        for (tokens, merges, types) in cases {
            for pre in [PreTokenizer::Smollm, PreTokenizer::LlamaBpe, PreTokenizer::Gpt2] {
                if let Ok(t) = Tokenizer::build(&tokens, &merges, types.as_deref(), pre) {
                    for text in ["", "ab ab", "Hello, wörld 42!", "\u{0}\u{fffd}"] {
                        if let Ok(ids) = t.encode(text) {
                            assert!(ids.iter().all(|&id| (id as usize) < tokens.len()), "{tokens:?}: id beyond the vocabulary");
                            let _ = t.decode(&ids);
                        }
                    }
                }
            }
        }
    }
}
