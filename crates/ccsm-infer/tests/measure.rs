//! `perplexity` and `bench` as black boxes: perplexity against the numpy reference, KL against its
//! own and another run, and the bench output's shape.

use std::path::PathBuf;
use std::process::Command as Process;

use assert_cmd::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny() -> String {
    repo().join("models/tiny-llama.gguf").display().to_string()
}

fn infer_json(args: &[&str]) -> serde_json::Value {
    let out = Command::cargo_bin("ccsm-infer").unwrap().args(args).arg("--json").assert().success();
    serde_json::from_slice(&out.get_output().stdout).expect("one JSON object")
}

const TEXT: &str = "The quick brown fox jumps over the lazy dog. Hello there, how are you today? \
In 1983 the Jargon File was printed as a book; the 4th edition has 2,000 entries! \
Speech models turn text into audio frames: 12.5 frames per second, 24 kHz, 32 codebooks.";

fn text_file(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("text.txt");
    std::fs::write(&path, TEXT.repeat(3)).unwrap();
    path.display().to_string()
}

#[test]
fn perplexity_matches_a_numpy_computation_from_the_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let text = text_file(&dir);
    let ours = infer_json(&["perplexity", &tiny(), "-f", &text, "-c", "32", "--chunks", "3", "--kv-quant", "f32"]);

    // The same token ids through the independent reference.
    let tokenizer = ccsm::tokenizer::Tokenizer::from_gguf(&ggml::gguf::GgufFile::open(tiny()).unwrap()).unwrap();
    let ids: Vec<String> = tokenizer.encode_plain(&TEXT.repeat(3)).unwrap().iter().map(|t| t.to_string()).collect();
    let out = Process::new("python3")
        .arg(repo().join("tools/reference/perplexity_ref.py"))
        .args([tiny().as_str(), "--tokens", &ids.join(","), "--ctx", "32", "--chunks", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(ours["scored_tokens"], reference["scored"]);
    let (a, b) = (ours["ppl"]["mean"].as_f64().unwrap(), reference["ppl"].as_f64().unwrap());
    // f32 engine vs f64 reference on f32 weights: agreement to 1e-5 relative.
    assert!((a - b).abs() / b < 1e-5, "engine PPL {a} vs reference {b}");
    assert!(ours["ppl"]["stderr"].as_f64().unwrap() > 0.0);
}

#[test]
fn kl_against_its_own_base_is_zero_and_against_another_cache_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let text = text_file(&dir);
    let base = dir.path().join("base.kld").display().to_string();
    infer_json(&["perplexity", &tiny(), "-f", &text, "-c", "32", "--kl-base", &base]);
    let same = infer_json(&["perplexity", &tiny(), "-f", &text, "-c", "32", "--kl", &base, "--kv-quant", "f32"]);
    assert!(same["kl"]["kld"]["mean"].as_f64().unwrap().abs() < 1e-6, "{}", same["kl"]);
    assert_eq!(same["kl"]["same_top_percent"]["mean"], 100.0);
    assert!(same["kl"]["delta_ln_ppl"]["mean"].as_f64().unwrap().abs() < 1e-6);

    let other = infer_json(&["perplexity", &tiny(), "-f", &text, "-c", "32", "--kl", &base, "--ctk", "q4_0", "--ctv", "q4_0"]);
    assert!(other["kl"]["kld"]["mean"].as_f64().unwrap() > 1e-5, "{}", other["kl"]);
    assert!(other["kl"]["rms_delta_p_percent"].as_f64().unwrap() > 0.0);

    // A reference made with another context does not silently compare.
    Command::cargo_bin("ccsm-infer").unwrap().args(["perplexity", &tiny(), "-f", &text, "-c", "16", "--kl", &base]).assert().code(1);
}

/// The keys of a bench JSON row: scripts read them, so they change only on purpose.
const BENCH_KEYS: &[&str] = &[
    "model",
    "size_bytes",
    "params",
    "threads",
    "k_type",
    "v_type",
    "kv_rotated",
    "attention",
    "test",
    "n_prompt",
    "n_gen",
    "depth",
    "avg_ts",
    "stddev_ts",
    "samples_ts",
    "kv_bytes",
    "peak_rss_bytes",
    "frame_detail",
];

#[test]
fn bench_json_keys_are_stable_and_markdown_has_a_row_per_combination() {
    let args = ["bench", &tiny(), "--kv-quant", "f32,q8_0", "-d", "0,16", "-p", "8", "-n", "4", "-r", "2"];
    let out = Command::cargo_bin("ccsm-infer").unwrap().args(args).args(["-o", "json"]).assert().success();
    let rows: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(rows.len(), 2 * 2 * 2, "types × depths × tests");
    let mut expected = BENCH_KEYS.to_vec();
    expected.sort_unstable();
    for row in &rows {
        assert_eq!(row.keys().map(String::as_str).collect::<Vec<_>>(), expected);
        assert!(row["avg_ts"].as_f64().unwrap() > 0.0);
        assert_eq!(row["samples_ts"].as_array().unwrap().len(), 2);
        // By default only quantized halves are rotated (tiny-llama's heads of 32 are a power of two).
        assert_eq!(row["kv_rotated"], row["k_type"] == "q8_0");
        assert_eq!(row["attention"], "auto");
    }
    // KV bytes are the block math: 2 layers × (K + V) × 64 values × cells (depth + 8 + 1).
    let q8 = rows.iter().find(|r| r["k_type"] == "q8_0" && r["depth"] == 16).unwrap();
    assert_eq!(q8["kv_bytes"].as_u64().unwrap(), 2 * 2 * (64 / 32 * 34) * (16 + 8 + 1));

    let md = Command::cargo_bin("ccsm-infer").unwrap().args(args).assert().success();
    let md = String::from_utf8(md.get_output().stdout.clone()).unwrap();
    let lines: Vec<&str> = md.lines().collect();
    assert!(lines[0].starts_with("| model | size | params | threads | cache | test | t/s |"));
    assert_eq!(lines.len(), 2 + 8);
    for test in ["pp8", "tg4", "pp8 @ d16", "tg4 @ d16"] {
        assert_eq!(lines.iter().filter(|l| l.contains(&format!("| {test} |"))).count(), 2, "{test}");
    }
}

#[test]
fn bench_measures_each_attention_kernel_asked_for() {
    let args = ["bench", &tiny(), "--kv-quant", "q4_0", "--attention", "direct,dequantized,split", "-p", "8", "-n", "2", "-r", "1"];
    let out = Command::cargo_bin("ccsm-infer").unwrap().args(args).args(["-o", "json", "-t", "1"]).assert().success();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let kernels: Vec<&str> = rows.iter().map(|r| r["attention"].as_str().unwrap()).collect();
    assert_eq!(kernels, ["direct", "direct", "dequantized", "dequantized", "split", "split"]);
    let bad = Command::cargo_bin("ccsm-infer").unwrap().args(["bench", &tiny(), "--attention", "tiled"]).assert().code(2);
    let err = String::from_utf8_lossy(&bad.get_output().stderr).into_owned();
    assert!(err.contains("unknown attention path 'tiled'"), "{err}");
}
