//! Loading GGUF tensors into one backend buffer: each tensor is declared with the shape the
//! architecture expects (checked against the file), then all are read straight into place.

use ggml::gguf::{GgufFile, TensorInfo};
use ggml::{DType, TensorId, TensorStore};

use crate::error::{Error, Result};
use crate::placement::Placement;

/// Weight types ggml's CPU backend can multiply with (and look rows up in).
pub fn is_matmul_type(dtype: DType) -> bool {
    !matches!(dtype, DType::I8 | DType::I16 | DType::I32 | DType::I64 | DType::F64 | DType::Q8_1 | DType::Q8K)
}

enum Fill {
    /// Bytes copied as they are in the file.
    Raw,
    /// Bytes written whole, re-laid out for matrix products (ggml's repack buffer, our interleave).
    Repacked,
    /// Values converted to F32 on load (norm scales stored in other types).
    ToF32,
}

/// What a matrix is used for, which decides the layouts it may be stored in.
#[derive(Clone, Copy)]
enum Uses {
    Any,
    Products,
    ProductsAndRows,
}

/// Declares tensors against a GGUF file, then loads them into a `TensorStore`.
pub struct WeightLoader<'f> {
    file: &'f GgufFile,
    store: TensorStore,
    pending: Vec<(TensorId, &'f TensorInfo, Fill)>,
    /// Hold every matrix as F32 (dequantized on load).
    f32_matrices: bool,
    /// Where the weights go; on a device every matrix keeps ggml's own layout.
    placement: Placement,
}

impl<'f> WeightLoader<'f> {
    /// A loader over `file` that keeps each tensor in its stored type.
    pub fn new(file: &'f GgufFile) -> Result<Self> {
        Ok(WeightLoader {
            file,
            store: TensorStore::new(file.tensors().len().max(1))?,
            pending: Vec::new(),
            f32_matrices: false,
            placement: Placement::Cpu,
        })
    }

    /// A loader putting the weights in `placement`'s memory (a device's: every matrix in ggml's own
    /// layout, which its products read).
    pub fn placed(file: &'f GgufFile, placement: &Placement) -> Result<Self> {
        Ok(WeightLoader { placement: placement.clone(), ..Self::new(file)? })
    }

    /// Where the weights go.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// A loader that dequantizes every weight matrix to F32: the same function computed without
    /// ggml quantizing activations to 8 bits for quantized weights (which makes any perturbation,
    /// however small, move the logits by a step: the floor under every KV cache measurement).
    pub fn dequantizing(file: &'f GgufFile) -> Result<Self> {
        Ok(WeightLoader { f32_matrices: true, ..Self::new(file)? })
    }

    fn info(&self, name: &str, shape: &[usize]) -> Result<&'f TensorInfo> {
        let info = self.file.tensor(name)?;
        let expected: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        // Trailing 1-dims are equivalent (a [n, 1] tensor is a [n] vector).
        let trim = |s: &[i64]| -> Vec<i64> {
            let mut v = s.to_vec();
            while v.len() > 1 && v.last() == Some(&1) {
                v.pop();
            }
            v
        };
        if trim(&info.shape) != trim(&expected) {
            return Err(Error::TensorShape { name: name.to_owned(), expected, found: info.shape.clone() });
        }
        Ok(info)
    }

    /// A weight matrix `[shape[0] (contiguous), shape[1], …]` used in matrix products or row lookups.
    pub fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<TensorId> {
        self.declare_matrix(name, shape, Uses::Any)
    }

    /// A weight matrix used only whole as the first operand of matrix products (never looked up by
    /// rows, viewed only as whole matrices of a stack): where ggml has a faster repacked layout for its type on this CPU (Q4_0 on
    /// AVX2: 1.3× at one column, 1.6× at 128, `docs/kernel-choices.md`) it is stored so.
    /// (Q4_1 and Q8_0 on AVX-512 VNNI: interleaved for our own products, `docs/kernel-choices.md`.)
    pub fn product_matrix(&mut self, name: &str, shape: &[usize]) -> Result<TensorId> {
        self.declare_matrix(name, shape, Uses::Products)
    }

    /// A weight matrix used whole in matrix products and looked up by rows (embeddings tied to the
    /// output head): interleaved where `product_matrix` would interleave it, else as `matrix`.
    pub fn tied_matrix(&mut self, name: &str, shape: &[usize]) -> Result<TensorId> {
        self.declare_matrix(name, shape, Uses::ProductsAndRows)
    }

    fn declare_matrix(&mut self, name: &str, shape: &[usize], uses: Uses) -> Result<TensorId> {
        let info = self.info(name, shape)?;
        if !is_matmul_type(info.dtype) {
            return Err(Error::TensorType { name: name.to_owned(), dtype: info.dtype, why: "cannot be used as a weight matrix" });
        }
        if self.f32_matrices && info.dtype != DType::F32 && info.dtype.can_dequantize() {
            let id = self.store.add(name, DType::F32, &info.shape)?;
            self.pending.push((id, info, Fill::ToF32));
            return Ok(id);
        }
        let uses = if self.placement.is_device() { Uses::Any } else { uses };
        let id = match uses {
            Uses::Any => self.store.add(name, info.dtype, &info.shape)?,
            Uses::Products => self.store.add_for_products(name, info.dtype, &info.shape)?,
            Uses::ProductsAndRows => self.store.add_for_products_and_rows(name, info.dtype, &info.shape)?,
        };
        self.pending.push((id, info, if self.store.written_whole(id) { Fill::Repacked } else { Fill::Raw }));
        Ok(id)
    }

    /// Like `matrix`, or `None` when the file has no tensor of that name.
    pub fn optional_matrix(&mut self, name: &str, shape: &[usize]) -> Result<Option<TensorId>> {
        if self.file.tensor(name).is_err() {
            return Ok(None);
        }
        self.matrix(name, shape).map(Some)
    }

    /// A vector (norm scale, frequency factors) held as F32 whatever its type in the file.
    pub fn vector_f32(&mut self, name: &str, len: usize) -> Result<TensorId> {
        self.dense_f32(name, &[len])
    }

    /// A tensor held as F32 whatever its type in the file (element-wise operands such as conv taps).
    pub fn dense_f32(&mut self, name: &str, shape: &[usize]) -> Result<TensorId> {
        let info = self.info(name, shape)?;
        if !info.dtype.can_dequantize() {
            return Err(Error::TensorType { name: name.to_owned(), dtype: info.dtype, why: "cannot be read as f32" });
        }
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let id = self.store.add(name, DType::F32, &dims)?;
        let fill = if info.dtype == DType::F32 { Fill::Raw } else { Fill::ToF32 };
        self.pending.push((id, info, fill));
        Ok(id)
    }

    /// Allocates the buffer and reads every declared tensor into it.
    pub fn finish(mut self) -> Result<TensorStore> {
        self.placement.allocate(&mut self.store)?;
        let host = !self.placement.is_device();
        for (id, info, fill) in &self.pending {
            match fill {
                Fill::Raw if host => self.file.read_tensor_data(info, self.store.data_mut(*id)?)?,
                Fill::Raw | Fill::Repacked => {
                    let mut bytes = vec![0u8; self.store.get(*id).nbytes()];
                    self.file.read_tensor_data(info, &mut bytes)?;
                    self.store.get(*id).write_bytes(&bytes)?;
                }
                Fill::ToF32 => {
                    let values = self.file.read_tensor_f32(&info.name)?;
                    self.store.get(*id).write_f32(&values)?;
                }
            }
        }
        Ok(self.store)
    }
}
