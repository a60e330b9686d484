//! GGUF written by our writer, read back by our reader and by ggml's own C parser (the independent
//! reference), with every metadata type.

mod common;

use std::ffi::{CStr, CString};

use common::Rng;
use ggml::gguf::{GgufError, GgufFile, GgufWriter, Value, ValueType};
use ggml::DType;
use ggml_sys as sys;

fn every_type_metadata() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60_000)),
        ("t.i16", Value::I16(-30_000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(3.5)),
        ("t.bool", Value::Bool(true)),
        ("t.string", Value::String("héllo wörld ✓".into())),
        ("t.u64", Value::U64(u64::MAX - 5)),
        ("t.i64", Value::I64(i64::MIN + 7)),
        ("t.f64", Value::F64(-1.0e300)),
        ("t.arr.i32", Value::Array { element: ValueType::I32, items: vec![Value::I32(1), Value::I32(-2), Value::I32(3)] }),
        ("t.arr.f32", Value::Array { element: ValueType::F32, items: vec![Value::F32(0.25), Value::F32(-8.0)] }),
        ("t.arr.u8", Value::Array { element: ValueType::U8, items: vec![Value::U8(1), Value::U8(255)] }),
        ("t.arr.str", Value::strings(&["a", "", "ünï"])),
        ("t.arr.bool", Value::Array { element: ValueType::Bool, items: vec![Value::Bool(false), Value::Bool(true)] }),
        ("t.arr.empty", Value::Array { element: ValueType::U64, items: vec![] }),
    ]
}

/// Reads `key` through ggml's C parser as our `Value`.
fn c_value(ctx: *const sys::gguf_context, id: i64) -> Value {
    // SAFETY: `ctx` is a live gguf context and `id` a valid key index; each getter is called only for
    // the type gguf_get_kv_type reports (ggml asserts that).
    unsafe {
        let ty = sys::gguf_get_kv_type(ctx, id);
        let scalar = |ty: u32| -> Value {
            match ValueType::from_id(ty).unwrap() {
                ValueType::U8 => Value::U8(sys::gguf_get_val_u8(ctx, id)),
                ValueType::I8 => Value::I8(sys::gguf_get_val_i8(ctx, id)),
                ValueType::U16 => Value::U16(sys::gguf_get_val_u16(ctx, id)),
                ValueType::I16 => Value::I16(sys::gguf_get_val_i16(ctx, id)),
                ValueType::U32 => Value::U32(sys::gguf_get_val_u32(ctx, id)),
                ValueType::I32 => Value::I32(sys::gguf_get_val_i32(ctx, id)),
                ValueType::F32 => Value::F32(sys::gguf_get_val_f32(ctx, id)),
                ValueType::U64 => Value::U64(sys::gguf_get_val_u64(ctx, id)),
                ValueType::I64 => Value::I64(sys::gguf_get_val_i64(ctx, id)),
                ValueType::F64 => Value::F64(sys::gguf_get_val_f64(ctx, id)),
                ValueType::Bool => Value::Bool(sys::gguf_get_val_bool(ctx, id)),
                ValueType::String => Value::String(CStr::from_ptr(sys::gguf_get_val_str(ctx, id)).to_str().unwrap().into()),
                ValueType::Array => unreachable!(),
            }
        };
        if ty != sys::GGUF_TYPE_ARRAY {
            return scalar(ty);
        }
        let element = ValueType::from_id(sys::gguf_get_arr_type(ctx, id)).unwrap();
        let n = sys::gguf_get_arr_n(ctx, id);
        let items = (0..n)
            .map(|i| {
                if element == ValueType::String {
                    return Value::String(CStr::from_ptr(sys::gguf_get_arr_str(ctx, id, i)).to_str().unwrap().into());
                }
                let data = sys::gguf_get_arr_data(ctx, id).cast::<u8>();
                let size = element.min_size() as usize;
                let b = std::slice::from_raw_parts(data.add(i * size), size);
                match element {
                    ValueType::I32 => Value::I32(i32::from_le_bytes(b.try_into().unwrap())),
                    ValueType::F32 => Value::F32(f32::from_le_bytes(b.try_into().unwrap())),
                    ValueType::U8 => Value::U8(b[0]),
                    ValueType::Bool => Value::Bool(b[0] != 0),
                    ValueType::U64 => Value::U64(u64::from_le_bytes(b.try_into().unwrap())),
                    other => panic!("array of {other:?} not covered"),
                }
            })
            .collect();
        Value::Array { element, items }
    }
}

#[test]
fn written_files_read_back_identically_here_and_in_ggml() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roundtrip.gguf");
    let metadata = every_type_metadata();
    let mut w = GgufWriter::new();
    for (k, v) in &metadata {
        w.set(k, v.clone());
    }
    let mut rng = Rng::new(1);
    let tensors = [("w.q8", DType::Q8_0, vec![64i64, 3]), ("w.f16", DType::F16, vec![5, 7, 2]), ("w.f32", DType::F32, vec![3])];
    for (name, dtype, shape) in &tensors {
        let n: i64 = shape.iter().product();
        w.add_tensor_f32(name, *dtype, shape, &rng.normals(n as usize)).unwrap();
    }
    w.write(&path).unwrap();

    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.metadata().len(), metadata.len());
    for (k, v) in &metadata {
        assert_eq!(file.value(k), Some(v), "our reader, key {k}");
    }

    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
    // SAFETY: a valid NUL-terminated path; the context is freed below.
    let ctx = unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) };
    assert!(!ctx.is_null(), "ggml's parser refused our file");
    // SAFETY: `ctx` is live until gguf_free; indices stay below the counts ggml reports.
    unsafe {
        assert_eq!(sys::gguf_get_n_kv(ctx), metadata.len() as i64);
        for (id, (k, v)) in metadata.iter().enumerate() {
            let key = CStr::from_ptr(sys::gguf_get_key(ctx, id as i64)).to_str().unwrap();
            assert_eq!(key, *k);
            assert_eq!(&c_value(ctx, id as i64), v, "ggml's reader, key {k}");
        }
        assert_eq!(sys::gguf_get_n_tensors(ctx), tensors.len() as i64);
        for (id, info) in file.tensors().iter().enumerate() {
            let name = CStr::from_ptr(sys::gguf_get_tensor_name(ctx, id as i64)).to_str().unwrap();
            assert_eq!(name, info.name);
            assert_eq!(sys::gguf_get_tensor_type(ctx, id as i64), info.dtype.to_sys());
            let absolute = sys::gguf_get_data_offset(ctx) + sys::gguf_get_tensor_offset(ctx, id as i64);
            assert_eq!(absolute as u64, info.offset, "data offset of {name}");
            assert_eq!(sys::gguf_get_tensor_size(ctx, id as i64) as u64, info.size);
        }
        sys::gguf_free(ctx);
    }
    // Tensor data comes back as written.
    let info = file.tensor("w.f16").unwrap();
    assert_eq!(info.shape, vec![5, 7, 2]);
    assert_eq!(info.size, 5 * 7 * 2 * 2);
    assert_eq!(file.read_tensor_f32("w.f32").unwrap().len(), 3);
}

#[test]
fn typed_getters_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typed.gguf");
    let mut w = GgufWriter::new();
    w.set("a.count", Value::U32(7)).set("a.name", Value::String("x".into()));
    w.set("a.list", Value::Array { element: ValueType::Array, items: vec![Value::strings(&["nested"])] });
    w.write(&path).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.get::<u32>("a.count").unwrap(), 7);
    assert_eq!(file.get::<usize>("a.count").unwrap(), 7);
    assert_eq!(file.get_opt::<u32>("a.absent").unwrap(), None);
    assert_eq!(file.get::<Vec<Vec<String>>>("a.list").unwrap(), vec![vec!["nested".to_string()]]);
    match file.get::<u32>("a.missing") {
        Err(GgufError::MissingKey { key }) => assert_eq!(key, "a.missing"),
        other => panic!("expected MissingKey, got {other:?}"),
    }
    let err = file.get::<f32>("a.name").unwrap_err().to_string();
    assert!(err.contains("a.name") && err.contains("string"), "{err}");
}

#[test]
fn broken_files_get_specific_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    let mut w = GgufWriter::new();
    w.set("k", Value::String("value".into()));
    w.add_tensor_f32("t", DType::F32, &[8], &[1.0; 8]).unwrap();
    w.write(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let write = |name: &str, data: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    };

    let mut bad_magic = bytes.clone();
    bad_magic[0] = b'X';
    assert!(matches!(GgufFile::open(write("magic", &bad_magic)), Err(GgufError::BadMagic { .. })));

    let mut bad_version = bytes.clone();
    bad_version[4] = 9;
    assert!(matches!(GgufFile::open(write("version", &bad_version)), Err(GgufError::UnsupportedVersion { version: 9, .. })));

    // Truncated anywhere: in the header, the metadata, the tensor infos or the data.
    for cut in [2, 10, 30, bytes.len() - 40, bytes.len() - 1] {
        let err = GgufFile::open(write("cut", &bytes[..cut])).err().expect("truncated file accepted");
        assert!(matches!(err, GgufError::Truncated { .. } | GgufError::Malformed { .. }), "cut at {cut}: {err}");
    }

    // An absurd metadata count is refused before any allocation.
    let mut absurd = bytes.clone();
    absurd[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = GgufFile::open(write("absurd", &absurd)).err().unwrap().to_string();
    assert!(err.contains("cannot fit"), "{err}");

    assert!(matches!(GgufFile::open(dir.path()), Err(GgufError::Io { .. })));
    assert!(matches!(GgufFile::open(dir.path().join("absent.gguf")), Err(GgufError::Io { .. })));
}
