//! The command line as a black box: exit codes, stdout/stderr separation, JSON, determinism.

use std::path::PathBuf;

use assert_cmd::Command;
use predicates::prelude::*;

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn tiny() -> String {
    models().join("tiny-llama.gguf").display().to_string()
}

fn infer() -> Command {
    Command::cargo_bin("ccsm-infer").unwrap()
}

#[test]
fn generation_prints_text_on_stdout_and_the_summary_on_stderr() {
    let out = infer().args(["-m", &tiny(), "-p", "Hello there", "-n", "6", "--temp", "0"]).assert().success();
    let out = out.get_output();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.trim().is_empty(), "no text on stdout");
    assert!(!stdout.contains("t/s"), "summary leaked into stdout: {stdout}");
    assert!(stderr.contains("prompt:") && stderr.contains("decode:") && stderr.contains("KV cache:"), "{stderr}");
}

#[test]
fn json_output_is_one_object_with_text_tokens_timings_and_memory() {
    let out = infer().args([&tiny(), "-p", "Hello", "-n", "5", "--temp", "0", "--json", "-q"]).assert().success();
    let stdout = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(out.get_output().stderr.is_empty(), "-q leaves stderr empty");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert!(v["text"].is_string());
    let tokens = v["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 5);
    assert!(v["timings"]["decode_tokens_per_second"].is_number());
    // 2 layers × 256 cells × (K + V) × 64 values × 2 bytes (f16).
    assert_eq!(v["memory"]["kv_bytes"], 2 * 256 * 2 * 64 * 2);
}

#[test]
fn the_same_seed_gives_the_same_tokens() {
    let run = |seed: &str| {
        let out = infer().args([&tiny(), "-p", "Hello", "-n", "12", "--temp", "0.9", "-s", seed, "--json"]).assert().success();
        let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
        v["tokens"].clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["-p", "x"],
        vec![tiny().as_str(), "-p", "x", "--temp", "-1"],
        vec![tiny().as_str(), "-p", "x", "--kv-quant", "q3_k"],
        vec![tiny().as_str(), "-p", "x", "-t", "0"],
        vec![tiny().as_str(), "-p", "x", "-c", "0"],
        vec![tiny().as_str(), "-p", "x", "--top-p", "0"],
        vec![tiny().as_str(), "-p", "x", "--top-k", "-3"],
        vec![tiny().as_str(), "-p", "x", "--kv-rotation", "sometimes"],
        vec![tiny().as_str(), "--no-such-flag"],
    ] {
        infer().args(&args).assert().code(2).stderr(predicate::str::is_empty().not());
    }
    infer().args([&tiny(), "-p", "x", "--top-k", "0"]).assert().code(2).stderr(predicate::str::contains("keep no token"));
}

/// `--device`: a spec that names no device kind, and (in this CPU-only build) a Vulkan device, are
/// usage errors that say what to do; `cpu` is the default and runs.
#[test]
fn device_choices_are_checked_before_loading() {
    infer().args([&tiny(), "-p", "x", "--device", "tpu"]).assert().code(2).stderr(predicate::str::contains("cpu, vulkan or vulkan:N"));
    infer().args([&tiny(), "-p", "x", "--device", "vulkan:x"]).assert().code(2).stderr(predicate::str::contains("vulkan:N"));
    if !cfg!(feature = "vulkan") {
        infer().args([&tiny(), "-p", "x", "--device", "vulkan"]).assert().code(2).stderr(predicate::str::contains("--features vulkan"));
    }
    infer().args([&tiny(), "-p", "x", "-n", "2", "--device", "cpu"]).assert().success();
}

#[test]
fn top_k_all_is_no_limit() {
    let tokens = |top_k: &str| {
        let out = infer()
            .args([&tiny(), "-p", "Hello", "-n", "12", "--temp", "1.5", "--top-p", "1", "--top-k", top_k, "--json"])
            .assert()
            .success();
        let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
        v["tokens"].clone()
    };
    // tiny-llama has fewer than 1000 tokens: a limit above that keeps all of them, as `all` does; a limit of 1 is greedy.
    assert_eq!(tokens("all"), tokens("100000"));
    assert_ne!(tokens("all"), tokens("1"));
}

#[test]
fn runtime_failures_exit_1_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    infer().args([missing.to_str().unwrap(), "-p", "x"]).assert().code(1).stderr(predicate::str::contains("missing.gguf"));
    infer().args([dir.path().to_str().unwrap(), "-p", "x"]).assert().code(1).stderr(predicate::str::contains("directory"));
    let not_gguf = dir.path().join("text.gguf");
    std::fs::write(&not_gguf, "hello").unwrap();
    infer().args([not_gguf.to_str().unwrap(), "-p", "x"]).assert().code(1).stderr(predicate::str::contains("GGUF"));
    // Prompt + n-predict beyond the context, or a context beyond the model's: usage errors.
    infer().args([&tiny(), "-p", "Hello there", "-n", "50", "-c", "8"]).assert().code(2).stderr(predicate::str::contains("ctx-size"));
    infer().args([&tiny(), "-p", "Hello", "-c", "100000"]).assert().code(2).stderr(predicate::str::contains("context"));
}

#[test]
fn help_explains_the_cache_flags_and_exit_codes() {
    infer().arg("--help").assert().success().stdout(predicate::str::contains("--ctk").and(predicate::str::contains("Exit codes")));
}

/// Under a memory budget a full cache evicts, so positions can pass the trained context (tiny models:
/// 256). Generation goes on, warns once on stderr and says so in the JSON; within the context it is quiet.
#[test]
fn running_past_the_trained_context_warns_once_and_says_so() {
    let csm = models().join("tiny-csm.gguf").display().to_string();
    for (model, n, past) in [(tiny(), "300", true), (tiny(), "20", false), (csm.clone(), "300", true), (csm, "20", false)] {
        let out = infer()
            .args([&model, "-p", "Hello there", "-n", n, "-c", "64", "--max-memory-mb", "1", "--temp", "0", "--json"])
            .assert()
            .success();
        let out = out.get_output();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let warnings = stderr.lines().filter(|l| l.contains("passed the model's trained context of 256")).count();
        assert_eq!(v["past_trained_context"], past, "{model} -n {n}: {v}");
        assert_eq!(warnings, past as usize, "{model} -n {n}: {stderr}");
        assert!(!stderr.contains('\u{1b}'), "colour codes in a log that is not a terminal: {stderr:?}");
    }
}

#[test]
fn chat_applies_the_models_template_and_refuses_models_without_one() {
    let smollm2 = models().join("SmolLM2-135M-Instruct.Q4_1.gguf").display().to_string();
    let run = |chat: bool| {
        let mut cmd = infer();
        cmd.args([&smollm2, "-p", "What is the capital of France?", "-n", "12", "--temp", "0", "-t", "1", "--json", "-q"]);
        if chat {
            cmd.arg("--chat");
        }
        let out = cmd.assert().success().get_output().stdout.clone();
        serde_json::from_slice::<serde_json::Value>(&out).unwrap()
    };
    // An instruct model answers an instruction only inside its chat turns: bare, it ends at once.
    let (plain, chat) = (run(false), run(true));
    assert_eq!(plain["stop"], "end_of_text", "{plain}");
    assert_eq!(plain["text"], "", "{plain}");
    assert!(chat["text"].as_str().unwrap().split_whitespace().count() >= 3, "{chat}");
    // The template adds the system turn and the role markers around the prompt.
    assert!(chat["prompt_tokens"].as_u64().unwrap() > plain["prompt_tokens"].as_u64().unwrap() + 10, "{chat} {plain}");
    infer()
        .args([&tiny(), "-p", "hi", "--chat", "-n", "2", "-t", "1"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("has no chat template"));
}

#[test]
fn serve_refuses_what_it_cannot_serve() {
    let mimi = models().join("tiny-mimi.gguf").display().to_string();
    infer().args(["serve", &mimi, "--port", "0"]).assert().code(1).stderr(predicate::str::contains("is a codec"));
    infer().args(["serve", "/nonexistent.gguf", "--port", "0"]).assert().code(1).stderr(predicate::str::contains("nonexistent.gguf"));
    infer().args(["serve", &tiny(), "--parallel", "0"]).assert().code(2);
    infer().args(["serve", &tiny(), "--api-key", ""]).assert().code(2).stderr(predicate::str::contains("must not be empty"));
}
