//! Inputs run end to end the way the CLI runs them, for the fuzz targets (`fuzz/`) and the tests that
//! replay what they found. Each returns an error for bad input; a panic or an abort is a bug.

use std::path::Path;

use ggml::gguf::GgufFile;

use crate::csm::{CsmGenerator, CsmModel, CsmOptions, Frame, Request};
use crate::error::{Error, Result};
use crate::ggml_model::GGMLModel;
use crate::load::{load_model, AnyModel};
use crate::mimi::{has_codec, MimiDecoder, MimiModel, MimiOptions};
use crate::model::{Logits, Model, ModelOptions};
use crate::sampling::{Sampler, SamplerConfig};
use crate::CacheType;

/// Small enough to keep a fuzz execution fast, large enough for a prompt and a few decode steps.
const N_CTX: usize = 16;

fn greedy() -> Result<Sampler> {
    Sampler::new(SamplerConfig { temperature: 0.0, top_k: None, top_p: 1.0, seed: 0 })
}

/// Loads a model file of any architecture and, when it loads, tokenizes a prompt with its tokenizer,
/// evaluates the prompt and one decode step (text), prefills a turn and generates a frame (CSM; decoded
/// by its embedded codec when it has one), or decodes two frames (a codec).
pub fn model_file(path: &Path) -> Result<()> {
    let codec = match GgufFile::open(path) {
        Ok(file) if has_codec(&file) && file.get::<String>("general.architecture").is_ok_and(|a| a == "csm") => {
            Some(MimiModel::from_file(&file, path)?)
        }
        _ => None,
    };
    match load_model(path)? {
        AnyModel::Llama(model) => {
            let mut ids = model.tokenizer().encode("Hello, wörld 42!")?;
            ids.truncate(N_CTX - 1);
            if ids.is_empty() {
                ids.push(0);
            }
            let options = ModelOptions { n_ctx: N_CTX, n_threads: 1, n_batch: 4, ..ModelOptions::default() };
            let mut model = GGMLModel::new(model, options)?;
            let logits = model.eval(&ids, Logits::Last)?;
            let next = crate::sampling::argmax(&logits) as u32;
            model.eval(&[next], Logits::Last)?;
            Ok(())
        }
        AnyModel::Csm(model) => {
            let options = CsmOptions { n_ctx: N_CTX, k_type: CacheType::F16, v_type: CacheType::F16, n_threads: 1, n_batch: 4 };
            let mut generator = CsmGenerator::new(model, options)?;
            generator.set_code_limit(codec.as_ref().map(|c| c.config().codebook_size));
            let request = Request { text: "Hi".into(), speaker: 0, context: Vec::new(), seed: None, max_frames: Some(1), output: None };
            let frame = request_in(&request, &mut generator)?;
            match (codec, frame) {
                (Some(codec), Some(frame)) => codec_decoder(codec)?.decode(&[frame]).map(|_| ()),
                _ => Ok(()),
            }
        }
        AnyModel::Mimi(codec) => {
            let c = codec.config().clone();
            let frame: Frame = (0..c.n_q).map(|k| (k * 7 % c.codebook_size) as u32).collect();
            codec_decoder(codec)?.decode(&[frame.clone(), frame]).map(|_| ())
        }
    }
}

fn codec_decoder(codec: MimiModel) -> Result<MimiDecoder> {
    MimiDecoder::new(codec, MimiOptions { n_threads: 1, max_chunk_frames: 2, ..MimiOptions::default() })
}

/// The generator `batch_line` runs on (tiny-csm in the fuzz target, its tests and its corpus report):
/// 64 backbone cells, a q8_0 K cache so quantized attention and rotation are on the path.
pub fn batch_generator(csm: &Path) -> Result<CsmGenerator> {
    let options = CsmOptions { n_ctx: 64, k_type: CacheType::Q8_0, v_type: CacheType::F16, n_threads: 1, n_batch: 16 };
    CsmGenerator::new(CsmModel::load(csm)?, options)
}

/// One `--batch` line: parsed, checked against the model, prefilled and one frame generated.
pub fn batch_line(line: &[u8], generator: &mut CsmGenerator) -> Result<()> {
    request_in(&Request::from_line_bytes(line)?, generator).map(|_| ())
}

fn request_in(request: &Request, generator: &mut CsmGenerator) -> Result<Option<Frame>> {
    generator.reset();
    let rows = request.rows(generator.model())?;
    let capacity = generator.backbone_cache().capacity();
    if rows.len() >= capacity {
        return Err(Error::CacheFull { needed: rows.len() + 1, capacity });
    }
    generator.prefill(&rows)?;
    let mut sampler = match request.seed {
        Some(seed) => Sampler::new(SamplerConfig::csm(seed))?,
        None => greedy()?,
    };
    generator.generate_frame(&mut sampler, None)
}
