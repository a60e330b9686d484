//! Prefix files: a prefix saved and loaded gives the session the bytes it had (and so the same logits);
//! a file of another model or cache shape, truncated anywhere, or with any byte flipped is refused
//! with a reason, never loaded and never a panic.

mod common;

use ccsm::engine::{SequenceStep, TextEngine};
use ccsm::kv_cache::{Half, KvCache};
use ccsm::llama::LlamaModel;
use ccsm::prefix_cache::file::{load, model_identity, save, PromptFile, Resumed};
use ccsm::prefix_cache::token_keys;
use ccsm::{CacheType, Logits};

use common::{model, relative_diff, CHUNKING_TOLERANCE, TINY_LLAMA, TINY_LLAMA3};

fn prompt(engine: &TextEngine) -> Vec<u32> {
    engine
        .model()
        .tokenizer()
        .encode("The Jargon File is a glossary of hacker slang, collected over decades by the people who spoke it.")
        .unwrap()
}

/// The last row's logits after running `tokens` on top of what `cache` holds.
fn run(engine: &mut TextEngine, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
    engine.step(&mut [SequenceStep { cache, tokens, logits: Logits::Last }], false).unwrap().remove(0)
}

fn stored(cache: &KvCache, rows: usize) -> Vec<Vec<u8>> {
    (0..cache.config().n_layer).flat_map(|l| [Half::K, Half::V].map(|h| cache.stored_rows(l, h, rows).unwrap())).collect()
}

#[test]
fn a_saved_prefix_loads_to_the_same_rows_and_logits() {
    let path = model(TINY_LLAMA);
    let identity = model_identity(&path).unwrap();
    let mut engine = TextEngine::new(LlamaModel::load(&path).unwrap(), 2).unwrap();
    let tokens = prompt(&engine);
    let dir = tempfile::tempdir().unwrap();
    for t in [CacheType::F16, CacheType::Q8_0, CacheType::Q4_0] {
        let mut cold = engine.new_cache(256, t, t).unwrap();
        let want = run(&mut engine, &mut cold, &tokens);
        let keep = tokens.len() - 1;
        let file = dir.path().join(format!("prefix-{t}.gguf"));
        save(&file, &identity, &token_keys(&tokens[..keep]), &cold).unwrap();
        let (keys, loaded) = load(&file, &identity, cold.config()).unwrap();
        assert_eq!(keys, token_keys(&tokens[..keep]));
        assert_eq!(loaded.positions(), &cold.positions()[..keep]);
        assert_eq!(stored(&loaded, keep), stored(&cold, keep), "{t}: the rows come back byte for byte (rotated as stored)");
        let mut warm = engine.new_cache(256, t, t).unwrap();
        warm.copy_prefix_from(&loaded, keep).unwrap();
        let got = run(&mut engine, &mut warm, &tokens[keep..]);
        // One row run alone against the prompt run at once: ggml's products may round a chunk of
        // rows differently from one row (the batched-steps floor; measured below it here).
        let diff = relative_diff(&got, &want);
        eprintln!("{t}: loaded vs prefilled logits differ by {diff:.2e} of the spread");
        assert!(diff <= CHUNKING_TOLERANCE, "{t}: logits differ by {diff:.2e} of the spread");
    }
}

#[test]
fn hostile_prefix_files_are_refused_with_a_reason() {
    let path = model(TINY_LLAMA);
    let identity = model_identity(&path).unwrap();
    assert_ne!(identity, model_identity(&model(TINY_LLAMA3)).unwrap(), "two models, two identities");
    let mut engine = TextEngine::new(LlamaModel::load(&path).unwrap(), 2).unwrap();
    let tokens = prompt(&engine);
    let mut cache = engine.new_cache(256, CacheType::Q8_0, CacheType::F16).unwrap();
    run(&mut engine, &mut cache, &tokens);
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    save(&good, &identity, &token_keys(&tokens), &cache).unwrap();
    let shape = cache.config().clone();
    assert!(load(&good, &identity, &shape).is_ok());

    let refused = |bytes: &[u8], what: &str| {
        let bad = dir.path().join("bad.gguf");
        std::fs::write(&bad, bytes).unwrap();
        let Err(e) = load(&bad, &identity, &shape) else { panic!("{what}: loaded") };
        let line = e.to_string();
        assert!(line.starts_with("prefix file ") && !line.contains('\n'), "{what}: {line}");
        line
    };
    let whole = std::fs::read(&good).unwrap();
    // Truncated anywhere: every length up to the end of the header, then every 97th byte.
    for len in (0..whole.len()).filter(|&n| n < 4096 || n % 97 == 0) {
        refused(&whole[..len], &format!("truncated to {len} bytes"));
    }
    // Any byte flipped: header, metadata, keys, positions, rows.
    for at in (0..whole.len()).step_by(7) {
        let mut flipped = whole.clone();
        flipped[at] ^= 0x40;
        let bad = dir.path().join("bad.gguf");
        std::fs::write(&bad, &flipped).unwrap();
        // A flip in padding between sections changes nothing that is read: it may load.
        if let Err(e) = load(&bad, &identity, &shape) {
            assert!(e.to_string().starts_with("prefix file "), "byte {at}: {e}");
        } else {
            let (_, loaded) = load(&bad, &identity, &shape).unwrap();
            assert_eq!(stored(&loaded, tokens.len()), stored(&cache, tokens.len()), "byte {at} flipped yet loaded with other rows");
        }
    }
    let mut altered = whole.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    assert!(refused(&altered, "the last row byte").contains("checksum"));
    // Another model, another shape, not a prefix file.
    let error = |file: &std::path::Path, identity: &str, shape: &ccsm::kv_cache::KvCacheConfig| match load(file, identity, shape) {
        Ok(_) => panic!("{} loaded", file.display()),
        Err(e) => e.to_string(),
    };
    assert!(error(&good, "another-model", &shape).contains("another model"));
    let wider =
        ccsm::kv_cache::KvCacheConfig::uniform(shape.n_layer, shape.head_dim * 2, shape.n_head_kv, 256, CacheType::F16, CacheType::F16);
    assert!(error(&good, &identity, &wider).contains("layers"));
    assert!(error(&model(TINY_LLAMA), &identity, &shape).contains("not a ccsm prefix file"));
    assert!(refused(b"", "empty").starts_with("prefix file"));
}

#[test]
fn a_prompt_file_resumes_a_prompt_that_starts_the_same_way() {
    let path = model(TINY_LLAMA);
    let mut engine = TextEngine::new(LlamaModel::load(&path).unwrap(), 2).unwrap();
    let tokens = prompt(&engine);
    let dir = tempfile::tempdir().unwrap();
    let file = PromptFile::new(&dir.path().join("prompt.gguf"), &path).unwrap();
    let mut cache = engine.new_cache(256, CacheType::F16, CacheType::F16).unwrap();
    assert_eq!(file.resume(&mut cache, &tokens), Resumed::Absent);
    let want = run(&mut engine, &mut cache, &tokens);
    file.save(&cache, &tokens).unwrap();
    // The same prompt: all but its last token come from the file.
    let mut again = engine.new_cache(256, CacheType::F16, CacheType::F16).unwrap();
    assert_eq!(file.resume(&mut again, &tokens), Resumed::Rows(tokens.len() - 1));
    let got = run(&mut engine, &mut again, &tokens[tokens.len() - 1..]);
    // The restored rows are the saved bytes; the last row now runs alone rather than in the prompt's
    // chunk, which ggml's products round a little differently (the batched-steps floor).
    let diff = relative_diff(&got, &want);
    eprintln!("resumed vs prefilled logits differ by {diff:.2e} of the spread");
    assert!(diff <= CHUNKING_TOLERANCE, "logits differ by {diff:.2e} of the spread");
    // Another model's file is refused, saying why.
    let other = PromptFile::new(&dir.path().join("prompt.gguf"), &model(TINY_LLAMA3)).unwrap();
    let mut c3 =
        TextEngine::new(LlamaModel::load(model(TINY_LLAMA3)).unwrap(), 2).unwrap().new_cache(256, CacheType::F16, CacheType::F16).unwrap();
    assert!(matches!(other.resume(&mut c3, &tokens), Resumed::Refused(why) if why.contains("another model")));
}
