//! Model files that parse as GGUF but are wrong for their architecture: one clear line, exit 1.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use ggml::gguf::{GgufFile, GgufWriter, Value};
use ggml::DType;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama.gguf")
}

/// Tensors as the tests edit them: name, type, shape, bytes.
type Tensors = Vec<(String, DType, Vec<i64>, Vec<u8>)>;

type Edit<'a> = &'a dyn Fn(&mut Vec<(String, Value)>, &mut Vec<(String, DType, Vec<i64>, Vec<u8>)>);

/// A copy of tiny-llama with metadata and tensors changed by `edit`.
fn altered(dir: &Path, name: &str, edit: impl Fn(&mut Vec<(String, Value)>, &mut Vec<(String, DType, Vec<i64>, Vec<u8>)>)) -> PathBuf {
    altered_copy(&tiny(), dir, name, &edit)
}

/// A copy of `source` with metadata and tensors changed by `edit`.
fn altered_copy(source: &Path, dir: &Path, name: &str, edit: Edit) -> PathBuf {
    let file = GgufFile::open(source).unwrap();
    let mut metadata: Vec<(String, Value)> = file.metadata().to_vec();
    let mut tensors: Vec<(String, DType, Vec<i64>, Vec<u8>)> = file
        .tensors()
        .iter()
        .map(|t| {
            let mut data = vec![0u8; t.size as usize];
            file.read_tensor_data(t, &mut data).unwrap();
            (t.name.clone(), t.dtype, t.shape.clone(), data)
        })
        .collect();
    edit(&mut metadata, &mut tensors);
    let mut w = GgufWriter::new();
    for (k, v) in metadata {
        w.set(&k, v);
    }
    for (n, t, s, d) in tensors {
        w.add_tensor(&n, t, &s, d).unwrap();
    }
    let path = dir.join(name);
    w.write(&path).unwrap();
    path
}

/// Generation and `info` both refuse the file with one line naming the problem, exit 1.
fn fails_with(path: &Path, expected: &str) {
    for args in [vec![path.to_str().unwrap(), "-p", "hi", "-n", "2"], vec!["info", path.to_str().unwrap()]] {
        let out = Command::cargo_bin("ccsm-infer").unwrap().args(&args).assert().code(1);
        let stderr = String::from_utf8(out.get_output().stderr.clone()).unwrap();
        assert!(stderr.contains(expected), "{args:?}: expected `{expected}` in: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(out.get_output().stdout.is_empty(), "{args:?}: printed facts of a file that does not load");
    }
}

#[test]
fn architecture_level_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing_key = altered(d, "missing-key.gguf", |m, _| m.retain(|(k, _)| k != "llama.block_count"));
    fails_with(&missing_key, "llama.block_count");
    let wrong_type = altered(d, "wrong-type.gguf", |m, _| {
        m.iter_mut().filter(|(k, _)| k == "llama.embedding_length").for_each(|(_, v)| *v = Value::String("128".into()))
    });
    fails_with(&wrong_type, "llama.embedding_length");
    let missing_tensor = altered(d, "missing-tensor.gguf", |_, t| t.retain(|(n, ..)| n != "blk.1.ffn_up.weight"));
    fails_with(&missing_tensor, "blk.1.ffn_up.weight");
    let wrong_shape = altered(d, "wrong-shape.gguf", |_, t| {
        for (n, _, s, _) in t.iter_mut().filter(|(n, ..)| n == "blk.0.attn_q.weight") {
            let _ = n;
            s.swap(0, 1);
            s[0] /= 2;
            s[1] *= 2;
        }
    });
    fails_with(&wrong_shape, "blk.0.attn_q.weight");
    let int_weights = altered(d, "int-weights.gguf", |_, t| {
        t.iter_mut().filter(|(n, ..)| n == "blk.0.ffn_gate.weight").for_each(|(_, ty, _, _)| *ty = DType::I32)
    });
    fails_with(&int_weights, "blk.0.ffn_gate.weight");
    let short_vocab = altered(d, "short-vocab.gguf", |m, _| {
        for (k, v) in m.iter_mut() {
            if k == "tokenizer.ggml.tokens" || k == "tokenizer.ggml.token_type" {
                if let Value::Array { items, .. } = v {
                    items.truncate(items.len() - 3);
                }
            }
        }
    });
    fails_with(&short_vocab, "vocabulary");
    let unknown_pre = altered(d, "unknown-pre.gguf", |m, _| {
        m.iter_mut().filter(|(k, _)| k == "tokenizer.ggml.pre").for_each(|(_, v)| *v = Value::String("qwen9".into()))
    });
    fails_with(&unknown_pre, "qwen9");
    let other_arch = altered(d, "other-arch.gguf", |m, _| {
        m.iter_mut().filter(|(k, _)| k == "general.architecture").for_each(|(_, v)| *v = Value::String("mamba".into()))
    });
    fails_with(&other_arch, "mamba");
    // Counts that multiply into sizes are bounded: a head dim of 2^62 made every KV byte count wrap to 0.
    let huge_head = altered(d, "huge-head-dim.gguf", |m, _| m.push(("llama.attention.key_length".into(), Value::U64(1 << 62))));
    fails_with(&huge_head, "llama.attention.key_length");
    let huge_kv_heads = altered(d, "huge-kv-heads.gguf", |m, _| {
        m.iter_mut().filter(|(k, _)| k == "llama.attention.head_count_kv").for_each(|(_, v)| *v = Value::U64(1 << 40))
    });
    fails_with(&huge_kv_heads, "llama.attention.head_count_kv");
}

#[test]
fn a_huge_declared_context_does_not_size_the_default_cache() {
    let dir = tempfile::tempdir().unwrap();
    let csm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-csm.gguf");
    let huge = altered_copy(&csm, dir.path(), "huge-context.gguf", &|m, _| {
        m.iter_mut().filter(|(k, _)| k == "csm.backbone.context_length").for_each(|(_, v)| *v = Value::U32(1 << 24))
    });
    let out = Command::cargo_bin("ccsm-infer").unwrap().arg(&huge).args(["-p", "hi", "-n", "2", "--json", "-q"]).assert().success();
    let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    // tiny-csm, f16: backbone 4096 cells (the default cap) and decoder 32 cells (one per codebook),
    // each 2 layers × (K + V) × 64 (backbone) or 32 (decoder) values × 2 bytes; and its embedded codec's
    // transformer, 512 cells × 2 layers × (K + V) × 64 values × 2 bytes (not sized by the CSM context).
    let expected = 4096 * 2 * 2 * 64 * 2 + 32 * 2 * 2 * 32 * 2 + 512 * 2 * 2 * 64 * 2;
    assert_eq!(v["kv_bytes"], expected);
}

/// Codec files that parse as GGUF but are wrong for a Mimi codec: `decode` and `info` both say what is
/// wrong in one line, exit 1.
#[test]
fn bad_codec_files_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mimi = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-mimi.gguf");
    let frames = d.join("frames.json");
    std::fs::write(&frames, r#"{"frames": [[1, 2, 3]]}"#).unwrap();
    let set = |key: &'static str, value: Value| {
        move |m: &mut Vec<(String, Value)>, _: &mut Tensors| m.iter_mut().filter(|(k, _)| k == key).for_each(|(_, v)| *v = value.clone())
    };
    type BoxedEdit = Box<dyn Fn(&mut Vec<(String, Value)>, &mut Tensors)>;
    let cases: Vec<(&str, BoxedEdit, &str)> = vec![
        (
            "no-key",
            Box::new(|m: &mut Vec<(String, Value)>, _: &mut Tensors| m.retain(|(k, _)| k != "mimi.codebook_size")),
            "mimi.codebook_size",
        ),
        ("string-key", Box::new(set("mimi.hidden_size", Value::String("64".into()))), "mimi.hidden_size"),
        ("huge-layers", Box::new(set("mimi.transformer.block_count", Value::U64(1 << 40))), "mimi.transformer.block_count"),
        ("bad-layout", Box::new(set("mimi.rope_layout", Value::String("spiral".into()))), "spiral"),
        (
            "bad-ratios",
            Box::new(set("mimi.seanet.ratios", Value::Array { element: ggml::gguf::ValueType::U32, items: vec![Value::U32(0)] })),
            "mimi.seanet.ratios",
        ),
        ("heads", Box::new(set("mimi.transformer.head_count", Value::U32(3))), "mimi.transformer"),
        (
            "no-tensor",
            Box::new(|_: &mut Vec<(String, Value)>, t: &mut Tensors| t.retain(|(n, ..)| n != "decoder.up.2.weight")),
            "decoder.up.2.weight",
        ),
        (
            "int-weights",
            Box::new(|_: &mut Vec<(String, Value)>, t: &mut Tensors| {
                t.iter_mut().filter(|(n, ..)| n == "transformer.blk.1.ffn_up.weight").for_each(|(_, ty, _, _)| *ty = DType::I32)
            }),
            "transformer.blk.1.ffn_up.weight",
        ),
        (
            "wrong-shape",
            Box::new(|_: &mut Vec<(String, Value)>, t: &mut Tensors| {
                t.iter_mut().filter(|(n, ..)| n == "decoder.conv_in.weight").for_each(|(_, _, s, _)| s.swap(0, 1))
            }),
            "decoder.conv_in.weight",
        ),
    ];
    for (name, edit, expected) in cases {
        let bad = altered_copy(&mimi, d, &format!("{name}.gguf"), &*edit);
        for args in [
            vec!["decode", frames.to_str().unwrap(), "--codec", bad.to_str().unwrap(), "-o", d.join("o.wav").to_str().unwrap()],
            vec!["info", bad.to_str().unwrap()],
        ] {
            let out = Command::cargo_bin("ccsm-infer").unwrap().args(&args).assert().code(1);
            let stderr = String::from_utf8(out.get_output().stderr.clone()).unwrap();
            assert!(stderr.contains(expected), "{name} {args:?}: expected `{expected}` in: {stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "{name}: one line: {stderr}");
        }
        assert!(!d.join("o.wav").exists(), "{name}: a WAV from a file that does not load");
    }
}
