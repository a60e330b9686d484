//! What the fuzz targets found, replayed on stable Rust, and a short seeded mutation run over the
//! fuzz seeds (so CI exercises the loader with broken files even without cargo-fuzz).
//!
//! `fuzz/regressions/TARGET/expected.tsv` lists every input beside it with a fragment of the error it
//! must give now (or `ok`): a regression that starts crashing again, or starts failing differently,
//! fails here.

mod common;

use std::path::{Path, PathBuf};

use ccsm::csm::CsmGenerator;
use ccsm::exercise;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn regressions(target: &str) -> Vec<(PathBuf, String)> {
    let dir = common::repo_root().join("fuzz/regressions").join(target);
    let table = std::fs::read_to_string(dir.join("expected.tsv")).expect("expected.tsv");
    let listed: Vec<(PathBuf, String)> = table
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (file, expected) = l.split_once('\t').unwrap_or_else(|| panic!("expected.tsv: `{l}` has no tab"));
            (dir.join(file), expected.to_owned())
        })
        .collect();
    let mut on_disk: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap() != "expected.tsv").collect();
    on_disk.sort();
    let mut names: Vec<PathBuf> = listed.iter().map(|(p, _)| p.clone()).collect();
    names.sort();
    assert_eq!(on_disk, names, "every file in {} is listed in expected.tsv, and only those", dir.display());
    listed
}

fn check(path: &Path, result: ccsm::Result<()>, expected: &str) {
    match result {
        Ok(()) => assert_eq!(expected, "ok", "{}: loaded and ran, expected an error containing `{expected}`", path.display()),
        Err(e) => {
            let message = e.to_string();
            assert!(expected != "ok" && message.contains(expected), "{}: error `{message}`, expected `{expected}`", path.display());
        }
    }
}

fn tiny_csm_generator() -> CsmGenerator {
    exercise::batch_generator(&common::model("tiny-csm.gguf")).unwrap()
}

#[test]
fn the_fuzz_seeds_load_and_run() {
    for seed in ["micro-llama.gguf", "micro-csm.gguf", "micro-mimi.gguf"] {
        exercise::model_file(&common::model(seed)).unwrap_or_else(|e| panic!("{seed}: {e}"));
    }
    let mut generator = tiny_csm_generator();
    for entry in std::fs::read_dir(common::repo_root().join("fuzz/seeds/batch_line")).unwrap() {
        let path = entry.unwrap().path();
        exercise::batch_line(&std::fs::read(&path).unwrap(), &mut generator).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn model_loader_regressions() {
    for (path, expected) in regressions("model_loader") {
        check(&path, exercise::model_file(&path), &expected);
        // `info` checks without loading: it must refuse exactly the files loading refuses, with the same error.
        let loaded = ccsm::load_model(&path).err().map(|e| e.to_string());
        let inspected = ccsm::inspect(&path, None).err().map(|e| e.to_string());
        assert_eq!(inspected, loaded, "{}: inspect and load disagree", path.display());
    }
}

#[test]
fn batch_line_regressions() {
    let mut generator = tiny_csm_generator();
    for (path, expected) in regressions("batch_line") {
        check(&path, exercise::batch_line(&std::fs::read(&path).unwrap(), &mut generator), &expected);
    }
}

/// Values that break size arithmetic when they land in a count, a length, a dimension or a type.
const INTERESTING: [u64; 10] = [0, 1, 2, 31, 255, 0x7fff_ffff, 0xffff_ffff, 1 << 32, i64::MAX as u64, u64::MAX];

/// Mutants per seed: about a second of loading in all.
const MUTANTS: usize = 2000;

/// One random mutation, aimed at the header (metadata and tensor infos) three times in four.
fn mutate(rng: &mut ChaCha8Rng, bytes: &mut Vec<u8>, header_len: usize) {
    let len = bytes.len();
    let at = if rng.random_ratio(3, 4) { rng.random_range(0..header_len.min(len)) } else { rng.random_range(0..len) };
    match rng.random_range(0..5) {
        0 => bytes[at] ^= 1 << rng.random_range(0..8),
        1 => bytes[at] = rng.random(),
        2 | 3 => {
            let value = INTERESTING[rng.random_range(0..INTERESTING.len())].to_le_bytes();
            let width = if rng.random() { 4 } else { 8 };
            let end = (at + width).min(len);
            bytes[at..end].copy_from_slice(&value[..end - at]);
        }
        _ => bytes.truncate(at.max(1)),
    }
}

#[test]
fn seeded_mutations_of_the_seeds_never_crash() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("mutant.gguf");
    let mut rng = ChaCha8Rng::seed_from_u64(20_261_129);
    for seed in ["micro-llama.gguf", "micro-csm.gguf", "micro-mimi.gguf"] {
        let original = std::fs::read(common::model(seed)).unwrap();
        let header_len = ggml::gguf::GgufFile::open(common::model(seed)).unwrap().data_offset() as usize;
        let (mut ok, mut failed) = (0, 0);
        for _ in 0..MUTANTS {
            let mut bytes = original.clone();
            for _ in 0..rng.random_range(1..=3) {
                mutate(&mut rng, &mut bytes, header_len);
            }
            std::fs::write(&scratch, &bytes).unwrap();
            match exercise::model_file(&scratch) {
                Ok(()) => ok += 1,
                Err(e) => {
                    assert!(!e.to_string().trim().is_empty(), "an empty error message");
                    failed += 1;
                }
            }
        }
        eprintln!("{seed}: {MUTANTS} mutants, {ok} loaded and ran, {failed} refused");
        // Most mutations hit the header and must be refused; some (weights, unused keys) are harmless.
        assert!(failed > MUTANTS / 2 && ok > 0, "{seed}: {ok} ran, {failed} refused");
    }
}

/// Audio mutants per fixture: corrupt headers, frames and lengths through every format's reader.
const AUDIO_MUTANTS: usize = 300;

#[test]
fn seeded_mutations_of_the_audio_fixtures_never_crash() {
    let dir = common::repo_root().join("tools/reference/fixtures/audio");
    let mut rng = ChaCha8Rng::seed_from_u64(20_261_205);
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("tone-") && !p.to_string_lossy().ends_with(".f32"))
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 8, "every format has a seed");
    for seed in seeds {
        let original = std::fs::read(&seed).unwrap();
        let (mut ok, mut failed) = (0, 0);
        for _ in 0..AUDIO_MUTANTS {
            let mut bytes = original.clone();
            for _ in 0..rng.random_range(1..=3) {
                mutate(&mut rng, &mut bytes, 64);
            }
            match ccsm::audio_in::read_bytes(bytes, "mutant", 10.0) {
                Ok(audio) => {
                    assert!(audio.samples.iter().all(|s| s.is_finite()) && audio.sample_rate > 0);
                    ok += 1;
                }
                Err(e) => {
                    let message = e.to_string();
                    assert!(message.starts_with("mutant: ") && !message.contains('\n'), "{message}");
                    failed += 1;
                }
            }
        }
        eprintln!("{}: {AUDIO_MUTANTS} mutants, {ok} read, {failed} refused", seed.display());
    }
}
