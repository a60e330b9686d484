//! Reading a GGUF file: header, metadata and tensor infos are parsed with every length bounded by the
//! bytes left in the file; tensor data is read on demand, straight into the caller's memory.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{FromValue, GgufError, GgufResult, Value, ValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC};
use crate::DType;

/// Arrays may nest (arrays of arrays); deeper nesting than this is refused.
const MAX_ARRAY_DEPTH: usize = 3;
/// Metadata items (values and array entries) in one file; keeps memory bounded on hostile files.
const MAX_METADATA_ITEMS: u64 = 16 << 20;
const MAX_DIMS: u32 = 4;

/// Where one tensor's data lies in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name in the file (unique within it).
    pub name: String,
    /// Element type the data is stored in.
    pub dtype: DType,
    /// ggml order: `shape[0]` is the contiguous dimension.
    pub shape: Vec<i64>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of the data.
    pub size: u64,
}

impl TensorInfo {
    /// Total elements: the product of the shape.
    pub fn nelements(&self) -> i64 {
        self.shape.iter().product()
    }

    /// The shape padded to 4 dims with 1s.
    pub fn shape4(&self) -> [i64; 4] {
        let mut s = [1; 4];
        s[..self.shape.len()].copy_from_slice(&self.shape);
        s
    }
}

/// A parsed GGUF file: metadata in memory, tensor data left on disk until read.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    file_len: u64,
}

/// A reader that knows its position and how many bytes are left, so no length can over-allocate.
struct Source {
    reader: BufReader<File>,
    path: PathBuf,
    pos: u64,
    len: u64,
    items: u64,
}

impl Source {
    fn truncated(&self, what: &str) -> GgufError {
        GgufError::Truncated { path: self.path.clone(), offset: self.len, what: what.to_owned() }
    }

    fn malformed(&self, at: u64, why: impl Into<String>) -> GgufError {
        GgufError::Malformed { path: self.path.clone(), offset: at, why: why.into() }
    }

    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> GgufResult<[u8; N]> {
        if self.remaining() < N as u64 {
            return Err(self.truncated(what));
        }
        let mut buf = [0u8; N];
        self.reader.read_exact(&mut buf).map_err(|source| GgufError::Io { path: self.path.clone(), source })?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> GgufResult<u32> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> GgufResult<u64> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> GgufResult<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(self.malformed(at, format!("{what}: string length {len} exceeds the {} bytes left", self.remaining())));
        }
        let mut buf = vec![0u8; len as usize];
        self.reader.read_exact(&mut buf).map_err(|source| GgufError::Io { path: self.path.clone(), source })?;
        self.pos += len;
        String::from_utf8(buf).map_err(|e| self.malformed(at + 8, format!("{what}: string is not UTF-8 ({e})")))
    }

    fn count_item(&mut self, at: u64) -> GgufResult<()> {
        self.items += 1;
        if self.items > MAX_METADATA_ITEMS {
            return Err(self.malformed(at, format!("more than {MAX_METADATA_ITEMS} metadata items")));
        }
        Ok(())
    }

    fn value(&mut self, ty: ValueType, what: &str, depth: usize) -> GgufResult<Value> {
        let at = self.pos;
        self.count_item(at)?;
        Ok(match ty {
            ValueType::U8 => Value::U8(self.bytes::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.bytes::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.bytes(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.bytes(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.bytes(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.bytes(what)?)),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.bytes(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.bytes(what)?)),
            ValueType::Bool => match self.bytes::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.malformed(at, format!("{what}: bool byte {b} is neither 0 nor 1"))),
            },
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(at, format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let type_id = self.u32(what)?;
                let element = ValueType::from_id(type_id)
                    .ok_or_else(|| self.malformed(at, format!("{what}: unknown array element type {type_id}")))?;
                let count = self.u64(what)?;
                if count.saturating_mul(element.min_size()) > self.remaining() {
                    return Err(
                        self.malformed(at, format!("{what}: array of {count} items cannot fit in the {} bytes left", self.remaining()))
                    );
                }
                let items = (0..count).map(|_| self.value(element, what, depth + 1)).collect::<GgufResult<Vec<_>>>()?;
                Value::Array { element, items }
            }
        })
    }
}

impl GgufFile {
    /// Parses the header, metadata and tensor infos, and checks that every tensor's data lies in the file.
    pub fn open(path: impl AsRef<Path>) -> GgufResult<Self> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| GgufError::Io { path: path.clone(), source };
        let file = File::open(&path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if meta.is_dir() {
            return Err(io_err(std::io::Error::other("is a directory, not a GGUF file")));
        }
        let mut src = Source { reader: BufReader::new(file), path: path.clone(), pos: 0, len: meta.len(), items: 0 };

        let magic = src.bytes::<4>("the magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { path, found: magic });
        }
        let version = src.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { path, version });
        }
        let counts_at = src.pos;
        let n_tensors = src.u64("the tensor count")?;
        let n_kv = src.u64("the metadata count")?;
        // Each key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info 8+4+8+4+8.
        if n_kv.saturating_mul(13) > src.remaining() || n_tensors.saturating_mul(32) > src.remaining() {
            return Err(
                src.malformed(counts_at, format!("{n_tensors} tensors and {n_kv} metadata keys cannot fit in a file of {} bytes", src.len))
            );
        }

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = HashMap::new();
        for i in 0..n_kv {
            let at = src.pos;
            let key = src.string(&format!("metadata key #{i}"))?;
            let type_id = src.u32(&format!("the type of `{key}`"))?;
            let ty =
                ValueType::from_id(type_id).ok_or_else(|| src.malformed(at, format!("key `{key}` has unknown value type {type_id}")))?;
            let value = src.value(ty, &format!("the value of `{key}`"), 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(src.malformed(at, format!("metadata key `{key}` appears twice")));
            }
            metadata.push((key, value));
        }

        let alignment = match index.get(ALIGNMENT_KEY).map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match u32::from_value(v) {
                Some(a) if a > 0 && a.is_power_of_two() => a as u64,
                _ => return Err(GgufError::WrongType { key: ALIGNMENT_KEY.into(), expected: "a power of two", found: format!("{v:?}") }),
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::new();
        let mut relative_offsets = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let at = src.pos;
            let name = src.string(&format!("the name of tensor #{i}"))?;
            let info = read_tensor_info(&mut src, &name, at)?;
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(src.malformed(at, format!("tensor `{name}` appears twice")));
            }
            relative_offsets.push((info.1, at));
            tensors.push(info.0);
        }

        let data_offset = src.pos.div_ceil(alignment) * alignment;
        for (tensor, (relative, at)) in tensors.iter_mut().zip(relative_offsets) {
            if relative % alignment != 0 {
                return Err(src.malformed(
                    at,
                    format!("tensor `{}` data offset {relative} is not a multiple of the alignment {alignment}", tensor.name),
                ));
            }
            let end = data_offset.checked_add(relative).and_then(|o| o.checked_add(tensor.size));
            match end {
                Some(end) if end <= src.len => tensor.offset = data_offset + relative,
                _ => {
                    return Err(src.malformed(
                        at,
                        format!(
                            "tensor `{}` data ({} bytes at offset {relative} after {data_offset}) runs past the end of the file ({} bytes)",
                            tensor.name, tensor.size, src.len
                        ),
                    ))
                }
            }
        }
        Ok(GgufFile { path, version, metadata, index, tensors, tensor_index, alignment, data_offset, file_len: src.len })
    }

    /// The path the file was opened from; tensor data is read from it again on demand.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version from the header (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Tensor data alignment in bytes: `general.alignment`, or 32 when the key is absent.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset where the tensor data section starts (the end of the tensor infos, aligned).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Length of the file in bytes when it was opened.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The raw value of a metadata key; `None` if the key is absent.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A required key of a given type; the error names the key.
    pub fn get<T: FromValue>(&self, key: &str) -> GgufResult<T> {
        let value = self.value(key).ok_or_else(|| GgufError::MissingKey { key: key.to_owned() })?;
        T::convert(key, value)
    }

    /// An optional key: absent is `None`, present with the wrong type is an error.
    pub fn get_opt<T: FromValue>(&self, key: &str) -> GgufResult<Option<T>> {
        self.value(key).map(|v| T::convert(key, v)).transpose()
    }

    /// Every tensor's info, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`; [`GgufError::MissingTensor`] if there is none.
    pub fn tensor(&self, name: &str) -> GgufResult<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i]).ok_or_else(|| GgufError::MissingTensor { name: name.to_owned() })
    }

    /// Reads a tensor's bytes into `dst`, which must be exactly its size.
    pub fn read_tensor_data(&self, info: &TensorInfo, dst: &mut [u8]) -> GgufResult<()> {
        if dst.len() as u64 != info.size {
            return Err(GgufError::Tensor {
                name: info.name.clone(),
                why: format!("destination holds {} bytes, data is {}", dst.len(), info.size),
            });
        }
        let io_err = |source| GgufError::Io { path: self.path.clone(), source };
        let mut file = File::open(&self.path).map_err(io_err)?;
        file.seek(SeekFrom::Start(info.offset)).map_err(io_err)?;
        file.read_exact(dst).map_err(io_err)
    }

    /// A tensor's data as F32 values (dequantized).
    pub fn read_tensor_f32(&self, name: &str) -> GgufResult<Vec<f32>> {
        let info = self.tensor(name)?;
        let mut bytes = vec![0u8; info.size as usize];
        self.read_tensor_data(info, &mut bytes)?;
        info.dtype
            .dequantize(&bytes, info.nelements() as usize)
            .map_err(|e| GgufError::Tensor { name: name.to_owned(), why: e.to_string() })
    }
}

/// Reads dims, type and relative offset of one tensor; returns the info and the relative offset.
fn read_tensor_info(src: &mut Source, name: &str, at: u64) -> GgufResult<(TensorInfo, u64)> {
    let n_dims = src.u32(&format!("the dims of `{name}`"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(src.malformed(at, format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
    }
    let mut shape = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        let d = src.u64(&format!("the shape of `{name}`"))?;
        if d == 0 || d > i64::MAX as u64 {
            return Err(src.malformed(at, format!("tensor `{name}` has dimension {d}")));
        }
        shape.push(d as i64);
    }
    let type_id = src.u32(&format!("the type of `{name}`"))?;
    let dtype = DType::from_sys(type_id)
        .map_err(|_| GgufError::Tensor { name: name.to_owned(), why: format!("ggml type id {type_id} is not supported by this engine") })?;
    let relative = src.u64(&format!("the offset of `{name}`"))?;
    let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    let block = dtype.block_size() as u64;
    if !(shape[0] as u64).is_multiple_of(block) {
        return Err(GgufError::Tensor {
            name: name.to_owned(),
            why: format!("rows of {} elements are not whole {dtype} blocks of {block}", shape[0]),
        });
    }
    let size = elements
        .and_then(|n| (n / block).checked_mul(dtype.type_size() as u64))
        .ok_or_else(|| src.malformed(at, format!("tensor `{name}` shape {shape:?} overflows")))?;
    Ok((TensorInfo { name: name.to_owned(), dtype, shape, offset: 0, size }, relative))
}
