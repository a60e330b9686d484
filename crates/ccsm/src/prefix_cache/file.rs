//! Cached prefixes on disk: one GGUF file each, holding every layer's rows in their types (as stored,
//! rotated or not), the rows' keys and positions, the cache's shape and rotation, the identity of the
//! model that computed them, and a CRC-32 over all of it. A file is read with the hostile-GGUF reader
//! (every length bounded by the file) and then checked field by field; a file made for another
//! model, another cache shape, truncated or altered is refused with a one-line reason, never trusted.
//! Files are written to a temporary name and renamed, so a crash leaves no half-written file.

use std::path::{Path, PathBuf};

use ggml::gguf::{GgufFile, GgufWriter, Value};
use ggml::DType;

use crate::error::{Error, Result};
use crate::kv_cache::{Half, KvCache, KvCacheConfig, KvLayout, LayerTypes, Rotation};
use crate::CacheType;

const ARCHITECTURE: &str = "ccsm-prefix";
const VERSION: u32 = 1;
/// Bytes of each weight tensor's data the model identity reads (beside every tensor's name, type and
/// shape): enough to tell two models of one shape apart, small enough to read at start-up.
const IDENTITY_SAMPLE: usize = 64;

/// The identity of a model file: a CRC-32 of its metadata, its tensors' names, types and shapes, and
/// the first bytes of each tensor's data, as hex. Prefix files carry it; a file of another model is
/// refused.
pub fn model_identity(path: &Path) -> Result<String> {
    let file = GgufFile::open(path)?;
    let mut h = crc32fast::Hasher::new();
    for (key, value) in file.metadata() {
        h.update(key.as_bytes());
        h.update(format!("{value:?}").as_bytes());
    }
    for info in file.tensors() {
        h.update(info.name.as_bytes());
        h.update(format!("{:?}{:?}", info.dtype, info.shape).as_bytes());
        let mut sample = vec![0u8; (info.size as usize).min(IDENTITY_SAMPLE)];
        let head = ggml::gguf::TensorInfo { size: sample.len() as u64, ..info.clone() };
        file.read_tensor_data(&head, &mut sample)?;
        h.update(&sample);
    }
    Ok(format!("{:08x}-{:x}", h.finalize(), file.tensors().len()))
}

/// The file a prefix of `rows` is kept in, in `dir`: named by a hash of its rows.
pub fn path_for(dir: &Path, rows: &[u64]) -> PathBuf {
    dir.join(format!("prefix-{:016x}-{}.gguf", super::fnv1a(rows.iter().flat_map(|r| r.to_le_bytes())), rows.len()))
}

fn refused(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::PrefixFile { path: path.to_owned(), why: why.to_string() }
}

/// The checksum a file carries: over the model identity, the shape, the rotation, the keys, the
/// positions and every layer's bytes, in that order.
fn checksum(
    identity: &str,
    config: &KvCacheConfig,
    rotation: Rotation,
    keys: &[u8],
    positions: &[u8],
    layers: &[(Vec<u8>, Vec<u8>)],
) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(identity.as_bytes());
    for n in [config.n_layer, config.head_dim, config.n_head_kv] {
        h.update(&(n as u64).to_le_bytes());
    }
    h.update(rotation.name().as_bytes());
    h.update(keys);
    h.update(positions);
    for (layer, (k, v)) in layers.iter().enumerate() {
        let t = config.types(layer);
        h.update(format!("{}{}", t.k, t.v).as_bytes());
        h.update(k);
        h.update(v);
    }
    h.finalize()
}

fn words_le(values: impl Iterator<Item = [u8; 4]>) -> Vec<u8> {
    values.flatten().collect()
}

/// Writes `cache`'s first `rows.len()` rows, keyed by `rows`, to `path` (through a temporary file).
pub fn save(path: &Path, identity: &str, rows: &[u64], cache: &KvCache) -> Result<()> {
    let n = rows.len();
    if n == 0 || n > cache.len() {
        return Err(Error::Input(format!("a prefix of {n} rows from a cache of {}", cache.len())));
    }
    let config = cache.config();
    let width = config.head_dim * config.n_head_kv;
    let layers: Vec<(Vec<u8>, Vec<u8>)> =
        (0..config.n_layer).map(|l| Ok((cache.stored_rows(l, Half::K, n)?, cache.stored_rows(l, Half::V, n)?))).collect::<Result<_>>()?;
    let keys = words_le(rows.iter().flat_map(|&r| [(r as u32).to_le_bytes(), ((r >> 32) as u32).to_le_bytes()]));
    let positions = words_le(cache.positions()[..n].iter().map(|p| p.to_le_bytes()));
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(ARCHITECTURE.into()));
    w.set("ccsm.prefix.version", Value::U32(VERSION));
    w.set("ccsm.prefix.model", Value::String(identity.into()));
    w.set("ccsm.prefix.n_layer", Value::U32(config.n_layer as u32));
    w.set("ccsm.prefix.head_dim", Value::U32(config.head_dim as u32));
    w.set("ccsm.prefix.n_head_kv", Value::U32(config.n_head_kv as u32));
    w.set("ccsm.prefix.rotation", Value::String(cache.rotation().name().into()));
    w.set("ccsm.prefix.rows", Value::U32(n as u32));
    w.set("ccsm.prefix.checksum", Value::U32(checksum(identity, config, cache.rotation(), &keys, &positions, &layers)));
    w.add_tensor("keys", DType::I32, &[2, n as i64], keys)?;
    w.add_tensor("positions", DType::I32, &[n as i64], positions)?;
    for (l, (k, v)) in layers.into_iter().enumerate() {
        let t = config.types(l);
        w.add_tensor(&format!("k.{l}"), t.k.dtype(), &[width as i64, n as i64], k)?;
        w.add_tensor(&format!("v.{l}"), t.v.dtype(), &[width as i64, n as i64], v)?;
    }
    let partial = path.with_extension("gguf.partial");
    w.write(&partial)?;
    std::fs::rename(&partial, path).map_err(|source| Error::Io { path: path.to_owned(), source })
}

/// Reads a prefix file for a model of `identity` whose caches have `shape`'s layers, heads and head
/// width and at most `shape.capacity` rows: the keys and a cache holding the rows. Anything that
/// does not match or does not add up is an error naming the file and the reason.
pub fn load(path: &Path, identity: &str, shape: &KvCacheConfig) -> Result<(Vec<u64>, KvCache)> {
    let file = GgufFile::open(path).map_err(|e| refused(path, e))?;
    let text = |key: &str| file.get::<String>(key).map_err(|e| refused(path, e));
    let number = |key: &str| file.get::<u32>(key).map_err(|e| refused(path, e));
    if text("general.architecture")? != ARCHITECTURE {
        return Err(refused(path, "not a ccsm prefix file"));
    }
    if number("ccsm.prefix.version")? != VERSION {
        return Err(refused(path, format!("version {} (this build reads {VERSION})", number("ccsm.prefix.version")?)));
    }
    let made_for = text("ccsm.prefix.model")?;
    if made_for != identity {
        return Err(refused(path, format!("made for another model ({made_for}; this one is {identity})")));
    }
    let dims = [number("ccsm.prefix.n_layer")?, number("ccsm.prefix.n_head_kv")?, number("ccsm.prefix.head_dim")?].map(|n| n as usize);
    if dims != [shape.n_layer, shape.n_head_kv, shape.head_dim] {
        return Err(refused(
            path,
            format!(
                "its rows are {} layers × {} heads × {}, this model's {} × {} × {}",
                dims[0], dims[1], dims[2], shape.n_layer, shape.n_head_kv, shape.head_dim
            ),
        ));
    }
    let rotation: Rotation = text("ccsm.prefix.rotation")?.parse().map_err(|e| refused(path, e))?;
    let n = number("ccsm.prefix.rows")? as usize;
    if n == 0 || n > shape.capacity {
        return Err(refused(path, format!("{n} rows (a session holds 1 to {})", shape.capacity)));
    }
    let read = |name: &str, shape: &[i64]| -> Result<(DType, Vec<u8>)> {
        let info = file.tensor(name).map_err(|e| refused(path, e))?;
        if info.shape != shape {
            return Err(refused(path, format!("tensor {name} has shape {:?}, expected {shape:?}", info.shape)));
        }
        let mut data = vec![0u8; info.size as usize];
        file.read_tensor_data(info, &mut data).map_err(|e| refused(path, e))?;
        Ok((info.dtype, data))
    };
    let cache_type = |name: &str, dtype: DType| {
        CacheType::ALL
            .into_iter()
            .find(|t| t.dtype() == dtype)
            .ok_or_else(|| refused(path, format!("tensor {name} is {dtype:?}, not a cache type")))
    };
    let width = (shape.head_dim * shape.n_head_kv) as i64;
    let (key_type, keys) = read("keys", &[2, n as i64])?;
    let (position_type, positions) = read("positions", &[n as i64])?;
    if key_type != DType::I32 || position_type != DType::I32 {
        return Err(refused(path, "keys and positions must be I32"));
    }
    let mut types = Vec::with_capacity(shape.n_layer);
    let mut layers = Vec::with_capacity(shape.n_layer);
    for l in 0..shape.n_layer {
        let (k_name, v_name) = (format!("k.{l}"), format!("v.{l}"));
        let (k_dtype, k) = read(&k_name, &[width, n as i64])?;
        let (v_dtype, v) = read(&v_name, &[width, n as i64])?;
        types.push(LayerTypes::new(cache_type(&k_name, k_dtype)?, cache_type(&v_name, v_dtype)?));
        layers.push((k, v));
    }
    let config =
        KvCacheConfig::uniform(shape.n_layer, shape.head_dim, shape.n_head_kv, n, types[0].k, types[0].v).with_layout(KvLayout::new(types));
    if number("ccsm.prefix.checksum")? != checksum(identity, &config, rotation, &keys, &positions, &layers) {
        return Err(refused(path, "its checksum does not match its contents (altered or damaged)"));
    }
    let positions: Vec<i32> = positions.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if positions.first().is_some_and(|&p| p < 0) || positions.windows(2).any(|w| w[1] <= w[0]) || positions[n - 1] >= i32::MAX / 2 {
        return Err(refused(path, "its positions are not increasing from 0"));
    }
    let words: Vec<u32> = keys.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let rows = words.chunks_exact(2).map(|w| u64::from(w[0]) | (u64::from(w[1]) << 32)).collect();
    let cache = KvCache::from_stored_rows(config, rotation, &layers, positions).map_err(|e| refused(path, e))?;
    Ok((rows, cache))
}

/// A folder of prefix files kept in step with a `PrefixCache`: what is cached is written, what is
/// dropped is deleted, and at start-up the files are loaded (newest first, while the budget has room).
pub struct PrefixDir {
    dir: PathBuf,
    identity: String,
}

/// What loading a folder found.
#[derive(Debug, Default)]
pub struct DirLoad {
    /// Prefixes loaded into the cache.
    pub loaded: usize,
    /// Files left out: refused (with the reason) or not fitting the budget.
    pub refused: Vec<String>,
}

impl PrefixDir {
    /// A folder (made if missing) for prefixes of the model with `identity`.
    pub fn new(dir: &Path, identity: String) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
        Ok(PrefixDir { dir: dir.to_owned(), identity })
    }

    /// Loads every `prefix-*.gguf` file, newest first, into `prefixes` within `budget`. A refused file
    /// stays on disk (it may be another model's) and is reported.
    pub fn load_into(
        &self,
        prefixes: &mut super::PrefixCache,
        budget: &mut crate::memory::Budget,
        shape: &KvCacheConfig,
    ) -> Result<DirLoad> {
        let read = std::fs::read_dir(&self.dir).map_err(|source| Error::Io { path: self.dir.clone(), source })?;
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = read
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("prefix-") && n.ends_with(".gguf")))
            .map(|p| (std::fs::metadata(&p).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), p))
            .collect();
        files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let mut found = DirLoad::default();
        for (_, path) in files {
            match load(&path, &self.identity, shape) {
                Ok((rows, cache)) => {
                    if budget.fits(cache.memory_usage()) {
                        prefixes.insert_snapshot_within(budget, &rows, cache);
                        found.loaded += 1;
                    } else {
                        found.refused.push(format!("{}: left out, the memory budget is full", path.display()));
                    }
                }
                Err(e) => found.refused.push(e.to_string()),
            }
        }
        prefixes.take_evicted();
        Ok(found)
    }

    /// Writes entry `id` (when it is cached) and deletes the files of dropped entries.
    pub fn sync(&self, prefixes: &mut super::PrefixCache, id: Option<super::EntryId>) -> Result<()> {
        for rows in prefixes.take_evicted() {
            let _ = std::fs::remove_file(path_for(&self.dir, &rows));
        }
        if let Some((rows, cache)) = id.and_then(|id| prefixes.entry(id)) {
            save(&path_for(&self.dir, rows), &self.identity, rows, cache)?;
        }
        Ok(())
    }
}

/// llama.cpp's `--prompt-cache FILE` for one run: the prompt's rows are loaded from the file when it
/// matches this model and starts like the prompt, and saved there after the run when it did not
/// hold them all.
pub struct PromptFile {
    path: PathBuf,
    identity: String,
}

/// What `PromptFile::resume` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resumed {
    /// No file yet.
    Absent,
    /// The file was refused (the reason); it will be written anew.
    Refused(String),
    /// This many of the prompt's rows came from the file (0: it held another prompt).
    Rows(usize),
}

impl PromptFile {
    /// The file for a model at `model` (its identity is read now).
    pub fn new(path: &Path, model: &Path) -> Result<Self> {
        Ok(PromptFile { path: path.to_owned(), identity: model_identity(model)? })
    }

    /// Fills `cache` (empty) with the longest start of `prompt` the file holds, leaving at least one
    /// token to run.
    pub fn resume(&self, cache: &mut KvCache, prompt: &[u32]) -> Resumed {
        if !self.path.exists() {
            return Resumed::Absent;
        }
        let mut shape = cache.config().clone();
        shape.capacity = shape.capacity.max(1);
        let (rows, saved) = match load(&self.path, &self.identity, &shape) {
            Ok(found) => found,
            Err(e) => return Resumed::Refused(e.to_string()),
        };
        let keys = super::token_keys(prompt);
        let shared = rows.iter().zip(&keys[..keys.len().saturating_sub(1)]).take_while(|(a, b)| a == b).count();
        if shared == 0 {
            return Resumed::Rows(0);
        }
        match cache.copy_prefix_from(&saved, shared) {
            Ok(()) => Resumed::Rows(shared),
            Err(e) => Resumed::Refused(e.to_string()),
        }
    }

    /// Saves the first `prompt.len()` rows of `cache` (which ran `prompt`) to the file.
    pub fn save(&self, cache: &KvCache, prompt: &[u32]) -> Result<()> {
        save(&self.path, &self.identity, &super::token_keys(prompt), cache)
    }
}
