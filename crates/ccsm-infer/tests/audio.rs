//! Audio out of the command line: WAV files and streams from generation, `decode`, batch outputs, and
//! the errors when there is no codec or the frames are wrong. WAV files are read back with Python's
//! `wave` module (an independent reader) or parsed by hand for float WAVs, which it cannot read.

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use assert_cmd::Command;
use predicates::prelude::*;

fn model(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models").join(name).display().to_string()
}

/// A run with `args` and one ggml thread: tests run side by side on few cores, and ggml's barriers spin.
fn infer<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> Command {
    let mut cmd = Command::cargo_bin("ccsm-infer").unwrap();
    cmd.args(args).args(["-t", "1"]);
    cmd
}

/// (channels, sample width in bytes, rate, samples) by Python's wave module, and the samples.
fn read_wav(path: &Path) -> ((u64, u64, u64, u64), Vec<i64>) {
    let script = "import sys, wave, array\nw = wave.open(sys.argv[1])\nprint(w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes())\n\
                  print(' '.join(map(str, array.array('h', w.readframes(w.getnframes())))))";
    let out = Process::new("python3").args(["-c", script]).arg(path).output().unwrap();
    assert!(out.status.success(), "wave could not read {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let head: Vec<u64> = lines.next().unwrap().split_whitespace().map(|v| v.parse().unwrap()).collect();
    let samples = lines.next().unwrap_or("").split_whitespace().map(|v| v.parse().unwrap()).collect();
    ((head[0], head[1], head[2], head[3]), samples)
}

fn json(out: &assert_cmd::assert::Assert) -> serde_json::Value {
    serde_json::from_slice(&out.get_output().stdout).unwrap()
}

#[test]
fn generation_writes_a_wav_a_player_opens_and_reports_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("hello.wav");
    let out = infer([&model("tiny-csm.gguf"), "-p", "Hello there", "-n", "6", "--json", "-o", wav.to_str().unwrap()]).assert().success();
    let v = json(&out);
    let n = v["n_frames"].as_u64().unwrap();
    assert!(n > 0 && v["frames"].is_null() && v["output"] == wav.to_str().unwrap());
    let ((channels, width, rate, frames), samples) = read_wav(&wav);
    assert_eq!((channels, width, rate, frames), (1, 2, 24000, n * 1920));
    assert!(samples.iter().any(|&s| s != 0), "silence");
    assert_eq!(v["audio"]["samples"], n * 1920);
    let t = &v["timings"];
    assert!(t["time_to_first_audio_seconds"].as_f64().unwrap() > 0.0 && t["codec_seconds"].as_f64().unwrap() > 0.0);
    assert!(t["time_to_first_audio_seconds"].as_f64().unwrap() <= t["seconds"].as_f64().unwrap());
    assert!(!dir.path().join("hello.wav.partial").exists());
}

/// The frames of a run, decoded by `decode` (16 frames per call), give the audio the run streamed
/// frame by frame (within one 16-bit step: float rounding may round the other way).
#[test]
fn decode_gives_what_generation_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let (frames, streamed, decoded) = (dir.path().join("f.json"), dir.path().join("a.wav"), dir.path().join("b.wav"));
    let run = |out: &Path| {
        infer([&model("tiny-csm.gguf"), "-p", "Say it twice", "-n", "20", "-s", "7", "-q", "-o", out.to_str().unwrap()]).assert().success()
    };
    run(&frames);
    run(&streamed);
    infer(["decode", frames.to_str().unwrap(), "--codec", &model("tiny-mimi.gguf"), "-o", decoded.to_str().unwrap(), "-q"])
        .assert()
        .success();
    let (head_a, a) = read_wav(&streamed);
    let (head_b, b) = read_wav(&decoded);
    assert_eq!(head_a, head_b);
    assert_eq!(head_a.3, 20 * 1920);
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).max().unwrap();
    assert!(worst <= 1, "streamed and decoded audio differ by {worst}");
}

#[test]
fn a_wav_streams_to_stdout_with_an_open_length() {
    let out = infer([&model("tiny-csm.gguf"), "-p", "Hi", "-n", "3", "-q", "-o", "-"]).assert().success();
    let bytes = &out.get_output().stdout;
    assert_eq!(&bytes[..4], b"RIFF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), u32::MAX, "unknown RIFF size");
    assert_eq!(&bytes[36..40], b"data");
    assert_eq!(u32::from_le_bytes(bytes[40..44].try_into().unwrap()), u32::MAX, "unknown data size");
    assert_eq!(bytes.len(), 44 + 3 * 1920 * 2);
}

#[test]
fn float_wavs_hold_the_codec_output() {
    let dir = tempfile::tempdir().unwrap();
    let (frames, f32_wav, s16_wav) = (dir.path().join("f.json"), dir.path().join("f32.wav"), dir.path().join("s16.wav"));
    infer([&model("tiny-csm.gguf"), "-p", "Hi", "-n", "4", "-q", "-o", frames.to_str().unwrap()]).assert().success();
    for (out, format) in [(&f32_wav, "f32"), (&s16_wav, "s16")] {
        infer([
            "decode",
            frames.to_str().unwrap(),
            "--codec",
            &model("tiny-mimi.gguf"),
            "--sample-format",
            format,
            "-q",
            "-o",
            out.to_str().unwrap(),
        ])
        .assert()
        .success();
    }
    let bytes = std::fs::read(&f32_wav).unwrap();
    let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap());
    assert_eq!((&bytes[..4], &bytes[12..16], u16_at(20), u16_at(34)), (&b"RIFF"[..], &b"fmt "[..], 3, 32), "IEEE float, 32 bits");
    assert_eq!(&bytes[50..54], b"data");
    let floats: Vec<f32> = bytes[58..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let (_, pcm) = read_wav(&s16_wav);
    assert_eq!(floats.len(), pcm.len());
    for (f, p) in floats.iter().zip(&pcm) {
        assert!(((f.clamp(-1.0, 1.0) * 32767.0).round() as i64 - p).abs() <= 0, "{f} vs {p}");
    }
}

#[test]
fn audio_without_a_codec_is_a_usage_error_and_a_codec_can_be_given() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("x.wav");
    infer([&model("micro-csm.gguf"), "-p", "hi", "-n", "2", "-o", wav.to_str().unwrap()])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("needs a Mimi codec").and(predicate::str::contains("--codec")));
    assert!(!wav.exists());
    // micro-csm's 4 codebooks decode with tiny-mimi's first 4.
    infer([&model("micro-csm.gguf"), "-p", "hi", "-n", "2", "-q", "--codec", &model("tiny-mimi.gguf"), "-o", wav.to_str().unwrap()])
        .assert()
        .success();
    assert_eq!(read_wav(&wav).0 .3 % 1920, 0);
    infer([&model("tiny-csm.gguf"), "-p", "hi", "-o", "x.mp3"]).assert().code(2).stderr(predicate::str::contains(".wav"));
}

#[test]
fn bad_frame_files_get_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("ragged", r#"{"frames": [[1, 2, 3], [1, 2]]}"#, "frame 1 has 2 codes"),
        ("range", r#"{"frames": [[1, 2, 3], [1, 64, 3]]}"#, "frame 1: code 64 of codebook 1"),
        ("negative", r#"{"frames": [[1, -2]]}"#, "frame 0 has a code that is not a whole number"),
        ("too-many", &format!(r#"{{"frames": [{:?}]}}"#, vec![0; 33]), "1 to 32 codebooks"),
        ("no-frames", r#"{"codes": []}"#, "no \"frames\" list"),
        ("not-json", "frames", "not JSON"),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, text).unwrap();
        let out = infer([
            "decode",
            path.to_str().unwrap(),
            "--codec",
            &model("tiny-mimi.gguf"),
            "-o",
            dir.path().join("o.wav").to_str().unwrap(),
        ])
        .assert()
        .code(1);
        let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
        assert!(stderr.contains(expected) && stderr.trim().lines().count() == 1, "{name}: {stderr}");
    }
}

#[test]
fn batch_lines_may_name_a_wav() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.wav"), dir.path().join("b.wav"));
    let batch = dir.path().join("batch.jsonl");
    let lines = [
        serde_json::json!({ "text": "first", "max_frames": 3, "output": a }),
        serde_json::json!({ "text": "no audio", "max_frames": 2 }),
        serde_json::json!({ "text": "second", "max_frames": 2, "seed": 3, "output": b }),
    ];
    std::fs::write(&batch, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let out = infer([&model("tiny-csm.gguf"), "--batch", batch.to_str().unwrap(), "-q"]).assert().success();
    let results: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.get_output().stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), 3);
    assert_eq!(read_wav(&a).0 .3, results[0]["n_frames"].as_u64().unwrap() * 1920);
    assert_eq!(read_wav(&b).0 .3, results[2]["n_frames"].as_u64().unwrap() * 1920);
    assert!(results[1]["audio"].is_null() && results[0]["audio"]["output"] == a.to_str().unwrap());
}
