//! CSM generation through the command line: frames files, seeds, scripted batch runs.

use std::path::PathBuf;

use assert_cmd::Command;
use predicates::prelude::*;

fn tiny_csm() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-csm.gguf").display().to_string()
}

fn infer() -> Command {
    Command::cargo_bin("ccsm-infer").unwrap()
}

fn frames_of(v: &serde_json::Value) -> Vec<Vec<u64>> {
    serde_json::from_value(v["frames"].clone()).unwrap()
}

#[test]
fn frames_are_written_to_the_output_file_with_32_codes_each() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("frames.json");
    infer()
        .args([&tiny_csm(), "-p", "Hello there", "--speaker", "1", "-n", "6", "-o", out.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::contains("frames/s").and(predicate::str::contains("real-time factor")));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let frames = frames_of(&v);
    assert!(!frames.is_empty() && frames.len() <= 6);
    assert_eq!(v["n_frames"].as_u64().unwrap() as usize, frames.len());
    assert!(frames.iter().all(|f| f.len() == 32 && f.iter().all(|&c| c < 65)));
    assert!(frames.iter().all(|f| f.iter().any(|&c| c != 0)), "an all-zero frame ends speech and is not emitted");
    assert_eq!(v["speaker"], 1);
    assert!(!dir.path().join("frames.json.partial").exists());
}

#[test]
fn the_same_seed_gives_the_same_frames() {
    let run = |seed: &str| {
        let out = infer().args([&tiny_csm(), "-p", "Hello", "-n", "4", "-s", seed, "-q"]).assert().success();
        frames_of(&serde_json::from_slice(&out.get_output().stdout).unwrap())
    };
    assert_eq!(run("3"), run("3"));
    assert_ne!(run("3"), run("4"));
}

#[test]
fn batch_runs_every_good_line_and_reports_bad_ones_by_number() {
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("requests.jsonl");
    let context = r#"[{"speaker": 1, "text": "Hi.", "frames": [[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32]]}]"#;
    let mut requests = format!(
        "{{\"text\": \"Hello there\", \"seed\": 1, \"max_frames\": 3}}\n{{\"text\": \"broken\"\n{{\"text\": \"x\", \"voice\": 2}}\n\n{{\"text\": \"With context\", \"speaker\": 0, \"context\": {context}, \"max_frames\": 2}}\n{{\"speaker\": 3}}\n"
    )
    .into_bytes();
    // Line 7 is not UTF-8, line 8 asks for no frames, line 9 ends in CRLF (and is fine).
    requests.extend_from_slice(
        b"{\"text\": \"\xff\xfe\"}\n{\"text\": \"none\", \"max_frames\": 0}\n{\"text\": \"crlf\", \"max_frames\": 1}\r\n",
    );
    std::fs::write(&batch, requests).unwrap();
    let out = infer().args([&tiny_csm(), "--batch", batch.to_str().unwrap(), "-q"]).assert().code(1);
    let stdout = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 8, "one result per non-empty line");
    assert_eq!(lines.iter().map(|l| l["line"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3, 5, 6, 7, 8, 9]);
    assert!(lines[0]["error"].is_null() && frames_of(&lines[0]).len() <= 3);
    assert!(lines[1]["error"].as_str().unwrap().contains("malformed"));
    assert!(lines[2]["error"].as_str().unwrap().contains("voice"), "unknown fields are named");
    assert!(lines[3]["error"].is_null() && frames_of(&lines[3]).len() <= 2);
    assert!(lines[4]["error"].as_str().unwrap().contains("text"), "missing text is named");
    assert!(lines[5]["error"].as_str().unwrap().contains("UTF-8"));
    assert!(lines[6]["error"].as_str().unwrap().contains("max_frames"));
    assert!(lines[7]["error"].is_null() && frames_of(&lines[7]).len() <= 1);
    let stderr = String::from_utf8(out.get_output().stderr.clone()).unwrap();
    assert!(stderr.contains("line 2") && stderr.contains("line 3") && stderr.contains("line 6"), "{stderr}");
}

#[test]
fn a_prompt_that_cannot_fit_is_refused_before_any_work() {
    infer().args([&tiny_csm(), "-p", "Hello", "-n", "300"]).assert().code(2).stderr(predicate::str::contains("-c"));
    infer().args([&tiny_csm(), "-p", "Hello", "-c", "5000"]).assert().code(2).stderr(predicate::str::contains("context"));
}
