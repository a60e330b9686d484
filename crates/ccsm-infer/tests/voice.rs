//! Voices and context from recordings on the command line: `encode` writes the frames a recording
//! becomes, and a context given as audio (`"audio"` segments, `--voice-audio`) speaks exactly as the same
//! context given as those frames.

use std::path::PathBuf;

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::{json, Value};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn speech_wav() -> PathBuf {
    repo("tools/reference/fixtures/audio/speech-espeak.wav")
}

fn infer() -> Command {
    Command::cargo_bin("ccsm-infer").unwrap()
}

/// The command's one JSON object on stdout (one ggml thread: tests run side by side).
fn stdout_json(cmd: &mut Command) -> Value {
    let out = cmd.args(["-t", "1"]).assert().success();
    serde_json::from_slice(&out.get_output().stdout).unwrap()
}

fn frames_of(v: &Value) -> Vec<Vec<u64>> {
    v["frames"].as_array().unwrap().iter().map(|f| f.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect()).collect()
}

#[test]
fn encode_writes_the_frames_of_a_recording() {
    let csm = repo("models/tiny-csm.gguf");
    let v = stdout_json(infer().arg("encode").arg(speech_wav()).arg("--codec").arg(&csm).arg("-q"));
    let frames = frames_of(&v);
    // 2.034 s at 22050 Hz → 24 kHz, padded to whole frames of 1920 samples: 26 frames.
    assert_eq!(frames.len(), 26);
    assert!(frames.iter().all(|f| f.len() == 32 && f.iter().all(|&c| c < 64)), "32 codes below the codebook size per frame");
    assert_eq!(v["source_sample_rate"], 22050);
    // --codebooks keeps the first codebooks: the same codes, fewer of them.
    let v8 = stdout_json(infer().arg("encode").arg(speech_wav()).arg("--codec").arg(&csm).args(["--codebooks", "8", "-q"]));
    let eight = frames_of(&v8);
    assert!(eight.iter().zip(&frames).all(|(a, b)| a[..] == b[..8]));
    // What cannot be read: one line, naming the file.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wav");
    std::fs::write(&bad, b"RIFF\x10\x00\x00\x00WAVEjunk").unwrap();
    infer()
        .arg("encode")
        .arg(&bad)
        .arg("--codec")
        .arg(&csm)
        .assert()
        .failure()
        .stderr(predicate::str::contains("bad.wav:").and(predicate::str::contains("not audio this engine reads")));
}

#[test]
fn context_as_audio_speaks_as_context_as_frames() {
    let csm = repo("models/tiny-csm.gguf");
    let dir = tempfile::tempdir().unwrap();
    let encoded = stdout_json(infer().arg("encode").arg(speech_wav()).arg("--codec").arg(&csm).arg("-q"));
    let as_frames = dir.path().join("frames.json");
    std::fs::write(&as_frames, json!([{"speaker": 1, "text": "Hello, this is a voice to keep.", "frames": encoded["frames"]}]).to_string())
        .unwrap();
    std::fs::copy(speech_wav(), dir.path().join("voice.wav")).unwrap();
    let as_audio = dir.path().join("audio.json");
    // A path relative to the JSON file.
    std::fs::write(&as_audio, json!([{"speaker": 1, "text": "Hello, this is a voice to keep.", "audio": "voice.wav"}]).to_string())
        .unwrap();
    let speak = |extra: &[&std::ffi::OsStr]| {
        let mut cmd = infer();
        cmd.arg(&csm).args(["-p", "Nice to meet you.", "--speaker", "1", "-s", "3", "-n", "6", "-q"]).args(extra);
        frames_of(&stdout_json(&mut cmd))
    };
    let from_frames = speak(&["--context".as_ref(), as_frames.as_os_str()]);
    assert_eq!(from_frames.len(), 6);
    assert_eq!(speak(&["--context".as_ref(), as_audio.as_os_str()]), from_frames);
    let voice = speech_wav();
    let from_voice =
        speak(&["--voice-audio".as_ref(), voice.as_os_str(), "--voice-text".as_ref(), "Hello, this is a voice to keep.".as_ref()]);
    assert_eq!(from_voice, from_frames);
    // Batch lines take the same context, relative to the batch file.
    let batch = dir.path().join("batch.jsonl");
    let line = json!({"text": "Nice to meet you.", "speaker": 1, "seed": 3, "max_frames": 6,
                      "context": [{"speaker": 1, "text": "Hello, this is a voice to keep.", "audio": "voice.wav"}]});
    std::fs::write(&batch, line.to_string() + "\n").unwrap();
    let out = infer().arg(&csm).arg("--batch").arg(&batch).arg("-q").assert().success();
    let result: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(frames_of(&result), from_frames);
    // --voice-audio without its transcript is a usage error.
    infer().arg(&csm).args(["-p", "x", "--voice-audio"]).arg(speech_wav()).assert().code(2);
}
