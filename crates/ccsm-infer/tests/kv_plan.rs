//! Per-layer cache types from the command line: --kv-layout, calibrate, --kv-plan auto (profile file
//! or GGUF metadata, --kv-bits or --max-memory-mb), and the refusals.

use std::path::PathBuf;

use assert_cmd::Command;
use predicates::prelude::*;

fn model(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models").join(name).display().to_string()
}

fn readme() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../README.md").display().to_string()
}

fn ccsm(args: &[&str]) -> assert_cmd::assert::Assert {
    Command::cargo_bin("ccsm-infer").unwrap().args(args).assert()
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = ccsm(args).success();
    serde_json::from_slice(&out.get_output().stdout).unwrap()
}

/// tiny-llama's cache: 2 layers, rows of 2 KV heads x 32.
const ROW: usize = 64;

#[test]
fn a_layout_is_allocated_and_reported_per_layer() {
    let out = json(&[&model("tiny-llama.gguf"), "-p", "hello", "-n", "3", "-c", "64", "--json", "--kv-layout", "0:q8_0/q4_0,*:f16"]);
    let cache = &out["memory"]["cache"];
    assert_eq!(cache["layout"], "0:q8_0/q4_0,1:f16/f16");
    assert!(cache["k_type"].is_null(), "a mixed cache has no one K type");
    assert_eq!(cache["layers"][0]["v"], "q4_0");
    // q8_0 34 bytes and q4_0 18 bytes per 32 elements, f16 2 bytes per element.
    let per_cell = ROW / 32 * 34 + ROW / 32 * 18 + 2 * ROW * 2;
    assert_eq!(out["memory"]["kv_bytes"], per_cell * 64);
    for (spec, says) in [("0:q8_0", "does not name every layer"), ("0-7:q4_0", "layers 0-1"), ("*:q4_K", "k-quant")] {
        ccsm(&[&model("tiny-llama.gguf"), "-p", "x", "-n", "1", "--kv-layout", spec]).code(2).stderr(predicate::str::contains(says));
    }
}

#[test]
fn bench_measures_one_layout_and_says_which() {
    let out =
        ccsm(&["bench", &model("tiny-llama.gguf"), "-p", "8", "-n", "2", "-r", "1", "-o", "json", "--kv-layout", "0:q8_0,*:mxfp4/q4_0"])
            .success();
    let rows: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "pp and tg, one layout");
    // 9 cells (the larger test, 8, + 1): q8_0 34 + 34, mxfp4 17 + q4_0 18 bytes per 32 elements, rows of 64.
    let per_cell = 2 * 34 * 2 + 2 * 17 + 2 * 18;
    for r in rows {
        assert_eq!(r["kv_layout"], "0:q8_0/q8_0,1:mxfp4/q4_0");
        assert_eq!(r["kv_bytes"], per_cell * 9);
    }
    ccsm(&["bench", &model("tiny-csm.gguf"), "-p", "8", "-n", "1", "-r", "1", "--kv-layout", "*:q4_0"])
        .code(2)
        .stderr(predicate::str::contains("for text models"));
}

#[test]
fn calibrate_then_plan_from_the_file_or_the_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.json");
    let gguf = dir.path().join("with-profile.gguf");
    let (p, g) = (profile.display().to_string(), gguf.display().to_string());
    ccsm(&["calibrate", &model("tiny-llama.gguf"), "-f", &readme(), "-c", "64", "--chunks", "2", "-o", &p, "--gguf-out", &g])
        .success()
        .stdout(predicate::str::contains("profiled 2 layers"));
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&profile).unwrap()).unwrap();
    assert_eq!(saved["halves"].as_array().unwrap().len(), 4);

    // A planned perplexity run: within the bits asked, the plan and a measured KLD reported.
    let base = dir.path().join("base.kld").display().to_string();
    let text = readme();
    ccsm(&["perplexity", &model("tiny-llama.gguf"), "-f", &text, "-c", "64", "--chunks", "2", "--kv-quant", "f32", "--kl-base", &base])
        .success();
    for (source, file) in [("--kv-profile", Some(p.as_str())), ("gguf", None)] {
        let m = if file.is_some() { model("tiny-llama.gguf") } else { g.clone() };
        let mut args = vec![
            "perplexity",
            &m,
            "-f",
            &text,
            "-c",
            "64",
            "--chunks",
            "2",
            "--kl",
            &base,
            "--json",
            "--kv-plan",
            "auto",
            "--kv-bits",
            "6",
        ];
        if let Some(f) = file {
            args.extend(["--kv-profile", f]);
        }
        let out = json(&args);
        let bits = out["cache"]["bits_per_element"].as_f64().unwrap();
        assert!((4.5..=6.0).contains(&bits), "{source}: {bits} bits");
        assert_eq!(out["kv_plan"]["spec"], out["cache"]["layout"], "{source}");
        assert!(out["kv_plan"]["predicted_kld"].as_f64().unwrap() > 0.0 && out["kl"]["kld"]["mean"].as_f64().unwrap() > 0.0);
    }

    // Under a memory budget the optimizer's plan strategy picks the layout and stays within it.
    let out = json(&[
        &model("tiny-llama.gguf"),
        "-p",
        "hello",
        "-n",
        "4",
        "-c",
        "256",
        "--json",
        "--kv-plan",
        "auto",
        "--kv-profile",
        &p,
        "--max-memory-mb",
        "1",
    ]);
    assert_eq!(out["memory_optimizer"]["strategy"], "plan");
    assert!(out["memory"]["kv_bytes"].as_u64().unwrap() <= 1 << 20);
    assert_eq!(out["kv_plan"]["spec"], out["memory"]["cache"]["layout"]);
}

#[test]
fn plans_without_what_they_need_are_refused() {
    let tiny = model("tiny-llama.gguf");
    ccsm(&[&tiny, "-p", "x", "-n", "1", "--kv-plan", "auto"]).code(2).stderr(predicate::str::contains("has no KV profile"));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.json").display().to_string();
    ccsm(&["calibrate", &tiny, "-f", &readme(), "-c", "64", "--chunks", "1", "-o", &p]).success();
    ccsm(&[&tiny, "-p", "x", "-n", "1", "--kv-plan", "auto", "--kv-profile", &p])
        .code(2)
        .stderr(predicate::str::contains("needs a budget"));
    ccsm(&[&tiny, "-p", "x", "-n", "1", "--kv-bits", "5"]).code(2).stderr(predicate::str::contains("goes with --kv-plan auto"));
    ccsm(&[&tiny, "-p", "x", "-n", "1", "--kv-profile", &p]).code(2).stderr(predicate::str::contains("goes with --kv-plan auto"));
    // The plan strategy alone takes the profile too.
    let out = json(&[&tiny, "-p", "x", "-n", "1", "--json", "--kv-profile", &p, "--memory-strategy", "plan", "--max-memory-mb", "1"]);
    assert_eq!(out["memory_optimizer"]["strategy"], "plan");
    // Below the smallest layout (mxfp4, 4.25 bits) the plan keeps fewer cells: 3 / 4.25 of 256.
    let out = json(&[&tiny, "-p", "x", "-n", "1", "--json", "--kv-plan", "auto", "--kv-profile", &p, "--kv-bits", "3"]);
    assert_eq!(out["memory"]["ctx_size"], 180);
    ccsm(&[&tiny, "-p", "x", "-n", "1", "--kv-plan", "auto", "--kv-profile", &p, "--kv-bits", "0.1"])
        .code(2)
        .stderr(predicate::str::contains("cannot hold"));
    // A profile of another shape.
    ccsm(&[&model("micro-llama.gguf"), "-p", "x", "-n", "1", "--kv-plan", "auto", "--kv-profile", &p, "--kv-bits", "8"])
        .code(2)
        .stderr(predicate::str::contains("measured on a cache of shape"));
    ccsm(&[&model("tiny-csm.gguf"), "-p", "x", "-n", "1", "--kv-layout", "*:q4_0"])
        .code(2)
        .stderr(predicate::str::contains("for text models"));
    ccsm(&["calibrate", &tiny, "-f", &readme()]).code(2).stderr(predicate::str::contains("needs -o"));
}

/// --kv-recent N: the rings are allocated and reported, counted in --kv-bits, benched, and refused
/// where they do not apply.
#[test]
fn a_recent_window_is_allocated_counted_and_refused_where_it_does_not_apply() {
    let tiny = model("tiny-llama.gguf");
    let out = json(&[&tiny, "-p", "hello", "-n", "3", "-c", "64", "--json", "--kv-quant", "q4_0", "--kv-recent", "16"]);
    let cache = &out["memory"]["cache"];
    assert_eq!(cache["recent_cells"], 16);
    // q4_0 rows: 18 bytes per 32 elements, K and V of 2 layers; rings: 16 f16 rows per layer and half.
    let rows = 2 * 2 * ROW / 32 * 18 * 64;
    let rings = 2 * 2 * 16 * ROW * 2;
    assert_eq!(out["memory"]["kv_bytes"], rows + rings);
    let bits = cache["bits_per_element"].as_f64().unwrap();
    assert!((bits - (rows + rings) as f64 * 8.0 / (4 * ROW * 64) as f64).abs() < 1e-9, "{bits}");

    // The planner fits the layout in what the rings leave of --kv-bits.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.json").display().to_string();
    ccsm(&["calibrate", &tiny, "-f", &readme(), "-c", "64", "--chunks", "1", "-o", &p]).success();
    let args = [&tiny, "-p", "x", "-n", "1", "-c", "256", "--json", "--kv-plan", "auto", "--kv-profile", &p, "--kv-bits", "8"];
    let plain = json(&args);
    let windowed = json(&[&args[..], &["--kv-recent", "32"]].concat());
    for out in [&plain, &windowed] {
        assert!(out["memory"]["cache"]["bits_per_element"].as_f64().unwrap() <= 8.0 + 1e-9);
        assert_eq!(out["memory"]["ctx_size"], 256);
    }
    let layout_bits = |o: &serde_json::Value| {
        o["memory"]["kv_bytes"].as_f64().unwrap() - o["memory"]["cache"]["recent_cells"].as_f64().unwrap() * 4.0 * ROW as f64 * 2.0
    };
    assert!(layout_bits(&windowed) < layout_bits(&plain), "the window's bytes come out of the layout's");

    let out = ccsm(&["bench", &tiny, "-p", "8", "-n", "2", "-r", "1", "-o", "json", "--kv-recent", "4"]).success();
    let rows: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert!(rows.as_array().unwrap().iter().all(|r| r["kv_recent"] == 4));
    ccsm(&[&tiny, "-p", "x", "-n", "1", "-c", "64", "--kv-recent", "65"])
        .code(2)
        .stderr(predicate::str::contains("exceeds the cache's 64 cells"));
    ccsm(&[&model("tiny-csm.gguf"), "-p", "x", "-n", "1", "--kv-recent", "8"]).code(2).stderr(predicate::str::contains("for text models"));
    ccsm(&["serve", &model("tiny-csm.gguf"), "--kv-recent", "8"]).failure().stderr(predicate::str::contains("for text models"));
}
