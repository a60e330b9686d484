//! Cache types from the command line: `info` sizes caches with the code that allocates them, and
//! `--quantize-after` converts the cache live.

use std::path::PathBuf;

use assert_cmd::Command;
use predicates::prelude::*;

fn model(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models").join(name).display().to_string()
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = Command::cargo_bin("ccsm-infer").unwrap().args(args).assert().success();
    serde_json::from_slice(&out.get_output().stdout).unwrap()
}

const TYPES: [&str; 9] = ["f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "mxfp4"];

#[test]
fn info_bytes_equal_what_generation_allocates() {
    for (name, args) in [("tiny-llama.gguf", vec!["-p", "Hello", "-n", "2"]), ("tiny-csm.gguf", vec!["-p", "Hi", "-n", "2"])] {
        let info = json(&["info", &model(name), "-c", "100", "--json"]);
        for (i, t) in TYPES.iter().enumerate() {
            assert_eq!(info["kv_bytes"][i]["type"], *t);
            let mut run = vec![model(name), "--json".into(), "-q".into(), "-c".into(), "100".into(), "--kv-quant".into(), t.to_string()];
            run.extend(args.iter().map(|a| a.to_string()));
            let out = json(&run.iter().map(String::as_str).collect::<Vec<_>>());
            let allocated = out["memory"]["kv_bytes"].as_u64().or(out["kv_bytes"].as_u64()).unwrap();
            assert_eq!(info["kv_bytes"][i]["total"].as_u64().unwrap(), allocated, "{name} {t}");
        }
    }
}

#[test]
fn quantize_after_converts_live_and_keeps_generating() {
    let out = json(&[
        &model("tiny-llama.gguf"),
        "-p",
        "Hello there",
        "-n",
        "10",
        "--kv-quant",
        "q4_1",
        "--quantize-after",
        "4",
        "--json",
        "-q",
        "-c",
        "64",
    ]);
    assert_eq!(out["tokens"].as_array().unwrap().len(), 10);
    assert_eq!(out["memory"]["k_type"], "q4_1");
    let report = &out["conversion"][0]["report"];
    assert_eq!(report["bytes_before"], 2 * 64 * 2 * 64 * 4, "started in f32");
    assert_eq!(report["bytes_after"], out["memory"]["kv_bytes"]);

    let speech =
        json(&[&model("tiny-csm.gguf"), "-p", "Hello", "-n", "6", "--ctk", "q8_0", "--ctv", "q4_0", "--quantize-after", "2", "-q"]);
    assert_eq!(speech["k_type"], "q8_0");
    assert_eq!(speech["v_type"], "q4_0");
    assert_eq!(speech["conversion"].as_array().unwrap().len(), 2, "backbone and decoder");
    assert!(speech["frames"].as_array().unwrap().len() > 2, "generation continued after the conversion");
}

#[test]
fn k_quants_are_refused_with_the_reason() {
    for t in ["q5_K", "q2_K", "Q4_K"] {
        Command::cargo_bin("ccsm-infer")
            .unwrap()
            .args([&model("tiny-llama.gguf"), "-p", "x", "-n", "1", "--kv-quant", t])
            .assert()
            .code(2)
            .stderr(predicates::str::contains("blocks of 256 elements").and(predicates::str::contains("head of 64")));
    }
    Command::cargo_bin("ccsm-infer")
        .unwrap()
        .args([&model("tiny-llama.gguf"), "-p", "x", "-n", "1", "--kv-quant", "q3_0"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("iq4_nl"));
}
