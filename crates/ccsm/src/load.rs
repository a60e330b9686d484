//! Opening a model file whatever its architecture: the one entry point the CLI and the loader fuzz
//! target share.

use std::path::Path;

use ggml::gguf::GgufFile;

use crate::csm::CsmModel;
use crate::error::{Error, Result};
use crate::llama::LlamaModel;

/// A loaded model of one of the supported architectures.
#[allow(clippy::large_enum_variant)] // made once per process; boxing would buy nothing
pub enum AnyModel {
    Llama(LlamaModel),
    Csm(CsmModel),
}

/// Parses the file (in Rust: ggml's C parser never sees it), checks it against its architecture and
/// loads the weights.
pub fn load_model(path: impl AsRef<Path>) -> Result<AnyModel> {
    let path = path.as_ref();
    let file = GgufFile::open(path)?;
    let arch: String = file.get("general.architecture")?;
    match arch.as_str() {
        "llama" => LlamaModel::from_file(&file, path).map(AnyModel::Llama),
        "csm" => CsmModel::from_file(&file, path).map(AnyModel::Csm),
        _ => Err(Error::Architecture { path: path.display().to_string(), found: arch, expected: "llama or csm" }),
    }
}
