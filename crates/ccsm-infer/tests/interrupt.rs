//! Ctrl-C during a long generation stops cleanly and keeps what was generated.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn ctrl_c_stops_frames_generation_and_writes_what_was_made() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-csm.gguf");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("frames.json");
    // A budget makes the context unbounded (eviction), so this would run for minutes.
    let child = Command::new(env!("CARGO_BIN_EXE_ccsm-infer"))
        .arg(&model)
        .args(["-p", "Hello there", "-n", "1000000", "--max-memory-mb", "1", "-q", "-o"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", String::from_utf8_lossy(&output.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).expect("frames written")).unwrap();
    assert_eq!(v["stop"], "interrupted");
    let frames = v["frames"].as_array().unwrap();
    assert!(!frames.is_empty() && frames.len() < 1_000_000);
    assert!(frames.iter().all(|f| f.as_array().unwrap().len() == 32));
    assert!(!dir.path().join("frames.json.partial").exists());
}
