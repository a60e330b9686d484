//! The HTTP server against the real `openai` Python client (`tests/server/openai_clients.py`, which
//! starts `ccsm-infer serve` on free loopback ports): speech, completions, chat, keys, 4xx, cancellation,
//! 8 concurrent clients against their single-session outputs within a KV budget, memory over 200
//! requests, the queue's 429, and a client that stops reading cut off by the write deadline (a raw
//! socket with a small window, which std cannot set up); cached prefixes (`tests/server/prefix_clients.py`).
//! The parts run one at a time (each server computes on two threads).

mod serving;

use std::process::Command;

use serving::{serial, workspace};

fn run_part(part: &str) {
    run_script("openai_clients.py", part);
}

fn run_script(script: &str, part: &str) {
    let _guard = serial();
    let root = workspace();
    let out = Command::new("python3")
        .arg(root.join("tests/server").join(script))
        .arg(env!("CARGO_BIN_EXE_ccsm-infer"))
        .arg(root.join("models"))
        .arg(part)
        .output()
        .expect("python3 runs (make pydeps installs the openai package)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}");
    assert!(out.status.success(), "the {part} clients failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("{part}: ok")), "{stdout}");
}

#[test]
fn text_completions_and_chat_through_the_openai_client() {
    run_part("text");
}

#[test]
fn speech_through_the_openai_client() {
    run_part("speech");
}

#[test]
fn a_full_queue_answers_429_and_loses_nothing_accepted() {
    run_part("queue");
}

#[test]
fn clients_that_stop_reading_are_closed_at_the_write_timeout_and_health_answers() {
    run_part("stalled");
}

#[test]
fn sessions_take_per_layer_layouts_and_the_planner_admits_under_pressure() {
    run_part("layouts");
}

#[test]
fn text_prompts_start_from_cached_prefixes_within_the_budget_and_across_restarts() {
    run_script("prefix_clients.py", "text");
}

#[test]
fn voices_and_conversations_stay_warm_and_speak_as_the_cli() {
    run_script("prefix_clients.py", "speech");
}
