//! Writing GGUF v3 files (for tools, sample models and tests).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::{GgufError, GgufResult, Value, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC};
use crate::DType;

struct PendingTensor {
    name: String,
    dtype: DType,
    shape: Vec<i64>,
    data: Vec<u8>,
}

/// Collects metadata and tensors, then writes them out in one go.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    /// An empty writer: no metadata, no tensors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a key (replacing an earlier value of the same key).
    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_owned(), value)),
        }
        self
    }

    /// Adds a tensor from its raw bytes in `dtype` (ggml shape order).
    pub fn add_tensor(&mut self, name: &str, dtype: DType, shape: &[i64], data: Vec<u8>) -> GgufResult<()> {
        let bad = |why: String| GgufError::Tensor { name: name.to_owned(), why };
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(bad("added twice".into()));
        }
        if shape.is_empty() || shape.len() > 4 || shape.iter().any(|&d| d <= 0) {
            return Err(bad(format!("bad shape {shape:?}")));
        }
        let elements: i64 = shape.iter().product();
        let expected = dtype.row_size(elements as usize).map_err(|e| bad(e.to_string()))?;
        dtype.check_row_len("add_tensor", shape[0]).map_err(|e| bad(e.to_string()))?;
        if data.len() != expected {
            return Err(bad(format!("{} bytes given, {dtype} {shape:?} needs {expected}", data.len())));
        }
        self.tensors.push(PendingTensor { name: name.to_owned(), dtype, shape: shape.to_vec(), data });
        Ok(())
    }

    /// Adds a tensor from F32 values, converted (quantized) to `dtype`.
    pub fn add_tensor_f32(&mut self, name: &str, dtype: DType, shape: &[i64], values: &[f32]) -> GgufResult<()> {
        let data = dtype
            .quantize(values, shape.first().copied().unwrap_or(1).max(1) as usize)
            .map_err(|e| GgufError::Tensor { name: name.to_owned(), why: e.to_string() })?;
        self.add_tensor(name, dtype, shape, data)
    }

    /// Writes a GGUF v3 file at `path` (replacing any file there): header, metadata in insertion order,
    /// tensor infos, then each tensor's data padded to the alignment.
    pub fn write(&self, path: impl AsRef<Path>) -> GgufResult<()> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io { path: path.to_path_buf(), source };
        let mut out = BufWriter::new(File::create(path).map_err(io_err)?);
        self.write_to(&mut out).map_err(io_err)?;
        out.flush().map_err(io_err)
    }

    fn alignment(&self) -> u64 {
        self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY).and_then(|(_, v)| v.as_i128()).map_or(DEFAULT_ALIGNMENT, |a| a as u64)
    }

    fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let alignment = self.alignment();
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            header.extend(encode_string(key));
            header.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            header.extend(encode_value(value));
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            header.extend(encode_string(&t.name));
            header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in &t.shape {
                header.extend_from_slice(&(d as u64).to_le_bytes());
            }
            header.extend_from_slice(&t.dtype.to_sys().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).div_ceil(alignment) * alignment;
        }
        out.write_all(&header)?;
        let mut pos = header.len() as u64;
        for t in &self.tensors {
            let pad = pos.div_ceil(alignment) * alignment - pos;
            out.write_all(&vec![0u8; pad as usize])?;
            out.write_all(&t.data)?;
            pos += pad + t.data.len() as u64;
        }
        Ok(())
    }
}

fn encode_string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

fn encode_value(value: &Value) -> Vec<u8> {
    match value {
        Value::U8(v) => vec![*v],
        Value::I8(v) => vec![*v as u8],
        Value::U16(v) => v.to_le_bytes().to_vec(),
        Value::I16(v) => v.to_le_bytes().to_vec(),
        Value::U32(v) => v.to_le_bytes().to_vec(),
        Value::I32(v) => v.to_le_bytes().to_vec(),
        Value::F32(v) => v.to_le_bytes().to_vec(),
        Value::Bool(v) => vec![*v as u8],
        Value::String(s) => encode_string(s),
        Value::U64(v) => v.to_le_bytes().to_vec(),
        Value::I64(v) => v.to_le_bytes().to_vec(),
        Value::F64(v) => v.to_le_bytes().to_vec(),
        Value::Array { element, items } => {
            let mut b = (*element as u32).to_le_bytes().to_vec();
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                debug_assert_eq!(item.value_type(), *element, "array items must share the element type");
                b.extend(encode_value(item));
            }
            b
        }
    }
}
