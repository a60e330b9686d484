//! Token ids of the engine's tokenizers against the `tokenizers` Python package built from the same
//! vocabulary and merges with the original models' pre-tokenizers.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use ccsm::tokenizer::Tokenizer;
use common::{model, repo_root, SMOLLM2, TINY_LLAMA};
use ggml::gguf::GgufFile;

const TEXTS: &[&str] = &[
    "The capital of France is",
    "  leading spaces,\ttabs\tand\n\nnewlines\r\n  end  ",
    "Digits: 0 12 345 6789 2,000.50 1e-5 3rd 2026-11-29",
    "Punctuation!!! (brackets) [x] {y} <z> ... -- --- ?!? 'quoted' \"double\"",
    "Contractions: it's, we'll, they're, I'd, you've, I'M, DON'T",
    "Non-ASCII: café naïve résumé Привет мир 東京 こんにちは 🙂👍🏽",
    "Specials inline <|im_start|>user\nhi<|im_end|> done",
    "",
    " ",
    "a",
];

fn reference_ids(model_path: &std::path::Path) -> Vec<Vec<u32>> {
    let script = repo_root().join("tools/reference/tokenize_ref.py");
    let mut child = Command::new("python3").arg(script).arg(model_path).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(serde_json::to_string(TEXTS).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check(name: &str) {
    let path = model(name);
    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let reference = reference_ids(&path);
    assert_eq!(reference.len(), TEXTS.len(), "{name}: the reference tokenized every text");
    for (text, want) in TEXTS.iter().zip(reference) {
        let got = tokenizer.encode_plain(text).unwrap();
        assert_eq!(got, want, "{name}: {text:?}");
        // Decoding gives the text back (special tokens are left out of decoded text).
        if !text.contains("<|") {
            assert_eq!(tokenizer.decode(&got).unwrap(), *text, "{name}: round trip");
        }
    }
}

#[test]
fn smollm2_ids_match_the_reference() {
    check(SMOLLM2);
}

#[test]
fn tiny_llama_ids_match_the_reference() {
    check(TINY_LLAMA);
}

#[test]
fn llama_bpe_ids_match_the_reference() {
    check(common::TINY_LLAMA3);
}

#[test]
fn unknown_pre_tokenizers_are_errors() {
    assert!(ccsm::tokenizer::PreTokenizer::from_name("qwen2").is_err());
}
