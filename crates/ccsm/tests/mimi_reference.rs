//! The Mimi decoder against the upstream implementations' own output: fixtures written by moshi
//! (batch and streaming(1) decoding) and by transformers for one small random codec, converted from
//! both checkpoint namings (tools/reference/make_mimi_fixtures.py, committed; no torch here).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ccsm::csm::Frame;
use ccsm::mimi::{MimiDecoder, MimiModel, MimiOptions};
use ccsm::CacheType;
use common::{python, read_f64, repo_root};

fn fixtures() -> PathBuf {
    repo_root().join("tools/reference/fixtures/mimi")
}

/// The fixture codec converted by tools/convert_mimi.py from one naming.
fn convert(dir: &Path, naming: &str, outtype: &str) -> PathBuf {
    let out = dir.join(format!("{naming}-{outtype}.gguf"));
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("tools/convert_mimi.py"));
    match naming {
        "hf" => cmd.arg(fixtures().join("hf")),
        // Written by mimi_checkpoint_variants.py into `dir`.
        "csm-1b" => cmd.arg(dir.join("csm-1b")),
        "weight-norm" => cmd.arg(dir.join("weight-norm.safetensors")).arg("--config").arg(fixtures().join("moshi-config.json")),
        _ => cmd.arg(fixtures().join("moshi.safetensors")).arg("--config").arg(fixtures().join("moshi-config.json")),
    };
    let status = cmd.arg("-o").arg(&out).args(["--outtype", outtype]).output().unwrap();
    assert!(status.status.success(), "convert_mimi.py failed: {}", String::from_utf8_lossy(&status.stderr));
    out
}

fn fixture_frames() -> Vec<Frame> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("codes.json")).unwrap()).unwrap();
    let codes: Vec<Vec<u32>> = serde_json::from_value(v["codes"].clone()).unwrap();
    (0..codes[0].len()).map(|t| codes.iter().map(|k| k[t]).collect()).collect()
}

fn read_f32(path: &Path) -> Vec<f64> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
}

/// Decodes `frames` in calls of `chunk` frames (1: streaming frame by frame).
fn decode(model: &Path, frames: &[Frame], chunk: usize, cache: CacheType) -> Vec<f64> {
    let options = MimiOptions { n_threads: 2, k_type: cache, v_type: cache, max_chunk_frames: chunk.clamp(1, 16) };
    let mut d = MimiDecoder::new(MimiModel::load(model).unwrap(), options).unwrap();
    let mut out = Vec::new();
    for call in frames.chunks(chunk) {
        let samples = d.decode(call).unwrap();
        assert_eq!(samples.len(), call.len() * d.frame_samples(), "samples per frame");
        out.extend(samples.into_iter().map(f64::from));
    }
    out
}

/// Signal-to-noise ratio of `got` against `reference`, in dB.
fn snr_db(reference: &[f64], got: &[f64]) -> f64 {
    assert_eq!(reference.len(), got.len(), "sample counts differ");
    assert!(!reference.is_empty());
    let signal: f64 = reference.iter().map(|x| x * x).sum();
    let noise: f64 = reference.iter().zip(got).map(|(a, b)| (a - b) * (a - b)).sum();
    assert!(signal > 0.0, "a silent reference");
    10.0 * (signal / noise.max(1e-300)).log10()
}

/// Frames 0..8 (16 steps) are inside the fixture's 16-step attention window.
const INSIDE_WINDOW: usize = 8 * 1920;

#[test]
fn matches_moshi_and_transformers_from_both_namings() {
    let dir = tempfile::tempdir().unwrap();
    let frames = fixture_frames();
    let moshi_batch = read_f32(&fixtures().join("moshi-batch.f32"));
    let moshi_stream = read_f32(&fixtures().join("moshi-stream.f32"));
    let hf_batch = read_f32(&fixtures().join("hf-batch.f32"));
    assert_eq!(moshi_batch.len(), frames.len() * 1920);
    let mut outputs = Vec::new();
    for naming in ["moshi", "hf"] {
        let model = convert(dir.path(), naming, "f32");
        for chunk in [16, 1] {
            let ours = decode(&model, &frames, chunk, CacheType::F32);
            let (batch, stream) = (snr_db(&moshi_batch, &ours), snr_db(&moshi_stream, &ours));
            let hf = snr_db(&hf_batch[..INSIDE_WINDOW], &ours[..INSIDE_WINDOW]);
            let stream_inside = snr_db(&moshi_stream[..INSIDE_WINDOW], &ours[..INSIDE_WINDOW]);
            eprintln!(
                "{naming} naming, f32 weights, {chunk} frame(s) per call: SNR vs moshi batch {batch:.1} dB, vs moshi streaming {stream:.1} dB \
                 ({stream_inside:.1} inside the window), vs transformers {hf:.1} dB inside the window"
            );
            assert!(batch >= 60.0 && hf >= 60.0 && stream_inside >= 60.0, "{naming}/{chunk}: {batch} {hf} {stream_inside}");
            // Past the window moshi's streaming ring buffer (exactly `context` entries) drops a key
            // that batch decoding keeps; this decoder keeps it, so it follows batch decoding there.
            assert!(stream >= 60.0 && stream < batch, "{naming}/{chunk}: vs streaming {stream}, vs batch {batch}");
            outputs.push(ours);
        }
    }
    // One checkpoint in two namings (q/k permuted for NeoX RoPE in one): the same samples within rounding.
    let same = snr_db(&outputs[0], &outputs[2]);
    eprintln!("moshi vs transformers naming, decoded: SNR {same:.1} dB");
    assert!(same >= 100.0, "the namings decode differently: {same} dB");
}

/// The codec inside a sharded sesame/csm-1b-style folder (under `codec_model.`), and a moshi file whose
/// convolutions are weight-normed, convert to the same codec.
#[test]
fn other_checkpoint_layouts_convert_to_the_same_codec() {
    let dir = tempfile::tempdir().unwrap();
    python("mimi_checkpoint_variants.py", &[fixtures().to_str().unwrap(), dir.path().to_str().unwrap()]);
    let frames = fixture_frames();
    let moshi_batch = read_f32(&fixtures().join("moshi-batch.f32"));
    for layout in ["csm-1b", "weight-norm"] {
        let snr = snr_db(&moshi_batch, &decode(&convert(dir.path(), layout, "f32"), &frames, 16, CacheType::F32));
        eprintln!("{layout}: SNR vs moshi batch {snr:.1} dB");
        assert!(snr >= 100.0, "{layout}: {snr} dB");
    }
}

#[test]
fn lower_precision_weights_and_caches_stay_close() {
    let dir = tempfile::tempdir().unwrap();
    let frames = fixture_frames();
    let moshi_batch = read_f32(&fixtures().join("moshi-batch.f32"));
    // (Quantized caches need heads of 32: this codec's are 8 wide.)
    for (outtype, cache, floor) in [("f16", CacheType::F32, 50.0), ("q8_0", CacheType::F32, 50.0), ("f32", CacheType::F16, 80.0)] {
        let model = convert(dir.path(), "moshi", outtype);
        let snr = snr_db(&moshi_batch, &decode(&model, &frames, 1, cache));
        eprintln!("{outtype} weights, {cache} KV cache: SNR vs moshi batch {snr:.1} dB");
        assert!(snr >= floor, "{outtype}/{cache}: {snr} dB");
    }
}

/// Streaming equals decoding a clip in chunks, for clips far past the attention window (48 frames are
/// 96 steps, 6 windows of the fixture codec), and both equal the independent numpy reference.
#[test]
fn streaming_equals_batch_past_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "moshi", "f32");
    let frames: Vec<Frame> = (0..48u32).map(|t| (0..8u32).map(|k| (t * 37 + k * 11 + t * k) % 64).collect()).collect();
    let codes: Vec<Vec<u32>> = (0..8).map(|k| frames.iter().map(|f| f[k]).collect()).collect();
    let codes_path = dir.path().join("codes.json");
    std::fs::write(&codes_path, serde_json::json!({ "codes": codes }).to_string()).unwrap();
    let reference_path = dir.path().join("reference.f64");
    python("mimi_ref.py", &[model.to_str().unwrap(), "--codes", codes_path.to_str().unwrap(), "--out", reference_path.to_str().unwrap()]);
    let reference = read_f64(&reference_path);
    let streamed = decode(&model, &frames, 1, CacheType::F32);
    for chunk in [16, 5] {
        let chunked = decode(&model, &frames, chunk, CacheType::F32);
        let snr = snr_db(&chunked, &streamed);
        eprintln!("48 frames, streamed vs {chunk}-frame calls: SNR {snr:.1} dB");
        assert!(snr >= 100.0, "chunk {chunk}: {snr} dB");
    }
    let snr = snr_db(&reference, &streamed);
    eprintln!("48 frames, streamed vs the numpy reference: SNR {snr:.1} dB");
    assert!(snr >= 60.0, "{snr} dB");
}

#[test]
fn bad_frames_name_the_frame() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "moshi", "f16");
    let mut d = MimiDecoder::new(MimiModel::load(&model).unwrap(), MimiOptions::default()).unwrap();
    let good: Frame = vec![1; 8];
    let error = |d: &mut MimiDecoder, frames: &[Frame]| d.decode(frames).unwrap_err().to_string();
    assert!(error(&mut d, &[good.clone(), vec![1; 7]]).contains("frame 1 has 7 codes"));
    assert!(error(&mut d, &[good.clone(), good.clone(), vec![1, 2, 64, 0, 0, 0, 0, 0]]).contains("frame 2: code 64 of codebook 2"));
    assert!(error(&mut d, &[vec![1; 9]]).contains("1 to 8 codebooks"));
    assert!(error(&mut d, &[vec![]]).contains("1 to 8 codebooks"));
    // Fewer codebooks than the codec has decode (as moshi's set_num_codebooks does).
    assert_eq!(d.decode(&[vec![3, 4]]).unwrap().len(), 1920);
    assert_eq!(d.frames_decoded(), 1);
}

/// The encoder's tensors of a converted file, by name (their bytes as stored).
fn encoder_tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let file = ggml::gguf::GgufFile::open(path).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = file
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("encoder.") || t.name.ends_with("_in_proj.weight"))
        .map(|t| {
            let mut bytes = vec![0u8; t.size as usize];
            file.read_tensor_data(t, &mut bytes).unwrap();
            (t.name.clone(), bytes)
        })
        .collect();
    out.sort();
    out
}

/// Both namings carry the same encode path: every SEANet encoder conv, the encoder transformer (its own
/// weights), the downsampling conv and the quantizer's input projections, equal tensor by tensor.
#[test]
fn both_namings_carry_the_same_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let moshi = encoder_tensors(&convert(dir.path(), "moshi", "f32"));
    let hf = encoder_tensors(&convert(dir.path(), "hf", "f32"));
    let names: Vec<&str> = moshi.iter().map(|(n, _)| n.as_str()).collect();
    // conv_in, conv_out, 4 strided convs and 4 residual units of two convs: 14 convs of weight and bias.
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("encoder.") && !n.starts_with("encoder.transformer.") && *n != &"encoder.downsample.weight")
            .count(),
        28,
        "{names:?}"
    );
    assert!(
        names.contains(&"encoder.downsample.weight")
            && names.contains(&"quantizer.semantic_in_proj.weight")
            && names.contains(&"quantizer.acoustic_in_proj.weight")
    );
    assert!(names.iter().any(|n| n.starts_with("encoder.transformer.blk.1.")), "{names:?}");
    let hf_names: Vec<&str> = hf.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, hf_names);
    for ((name, a), (_, b)) in moshi.iter().zip(&hf) {
        // q/k rows of transformers' naming are permuted for rotate-half RoPE: the layout records it.
        if name.ends_with("attn_qkv.weight") {
            assert_eq!(a.len(), b.len(), "{name}");
            continue;
        }
        assert_eq!(a, b, "{name}: the two namings convert to other bytes");
    }
}

fn codes_of(json: &serde_json::Value, key: &str) -> Vec<Vec<u32>> {
    json[key].as_array().unwrap().iter().map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()).collect()
}

/// Frames (`[T][n_q]`) as upstream's codes `[n_q][T]`.
fn by_codebook(frames: &[Vec<u32>]) -> Vec<Vec<u32>> {
    (0..frames[0].len()).map(|k| frames.iter().map(|f| f[k]).collect()).collect()
}

/// Ours against moshi's and transformers' encoders on the same inputs (espeak-ng speech and noise):
/// the latent before quantization, the codes of a whole clip, and frame-by-frame streaming.
#[test]
fn encoder_matches_moshi_and_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for naming in ["moshi", "hf"] {
        let path = convert(dir.path(), naming, "f32");
        let mut codec = ccsm::mimi::MimiCodec::new(MimiModel::load(&path).unwrap(), MimiOptions::default()).unwrap();
        let n_q = codec.model().config().n_q;
        let hidden = codec.model().config().hidden;
        for input in ["speech", "noise"] {
            let samples: Vec<f32> = read_f32(&fixtures().join(format!("enc-{input}.f32"))).iter().map(|&v| v as f32).collect();
            let expected: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("enc-{input}-codes.json"))).unwrap()).unwrap();
            // The latent: ours is [frames][hidden], moshi's [hidden][frames].
            let latent = codec.encode_latent(&samples).unwrap();
            let frames = latent.len() / hidden;
            let moshi_latent = read_f32(&fixtures().join(format!("enc-{input}-moshi-latent.f32")));
            let ours: Vec<f64> =
                (0..hidden).flat_map(|d| (0..frames).map(move |t| (t, d))).map(|(t, d)| latent[t * hidden + d] as f64).collect();
            let snr = snr_db(&moshi_latent, &ours);
            eprintln!("{naming} {input}: latent SNR {snr:.1} dB against moshi's");
            assert!(snr >= 60.0, "{naming} {input}: latent SNR {snr:.1} dB");
            let batch = by_codebook(&codec.encode_all(&samples, n_q).unwrap());
            let moshi_batch = codes_of(&expected, "moshi_batch");
            let differing: usize = batch.iter().flatten().zip(moshi_batch.iter().flatten()).filter(|(a, b)| a != b).count();
            eprintln!("{naming} {input}: {differing} of {} codes differ from moshi's", n_q * frames);
            assert_eq!(batch, moshi_batch, "{naming} {input}: codes differ from moshi's batch encode");
            assert_eq!(batch, codes_of(&expected, "hf_batch"), "{naming} {input}: codes differ from transformers' encode");
            // Streaming: one frame in, one frame out, the state carried.
            let mut stream = codec.new_encode_stream().unwrap();
            let per_frame = codec.frame_samples();
            let streamed: Vec<Vec<u32>> =
                samples.chunks(per_frame).flat_map(|chunk| codec.encode(&mut stream, chunk, n_q).unwrap()).collect();
            assert_eq!(by_codebook(&streamed), codes_of(&expected, "moshi_stream"), "{naming} {input}: streaming codes");
        }
    }
}

/// A codec file without the encode path still decodes, and asking it to encode says what is missing.
#[test]
fn a_decoder_only_codec_says_it_cannot_encode() {
    let dir = tempfile::tempdir().unwrap();
    // The fixture checkpoint without its encoder and downsampling conv.
    let source = dir.path().join("decoder-only.safetensors");
    let script = "import sys; sys.path.insert(0, sys.argv[3]); import safetensors_io as io; \
                  t = io.load(sys.argv[1]); io.save(sys.argv[2], {k: v for k, v in t.items() if not k.startswith(('encoder', 'downsample'))})";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(fixtures().join("moshi.safetensors"))
        .arg(&source)
        .arg(repo_root().join("tools/samples"))
        .status()
        .unwrap();
    assert!(status.success());
    let gguf = dir.path().join("decoder-only.gguf");
    let out = Command::new("python3")
        .arg(repo_root().join("tools/convert_mimi.py"))
        .arg(&source)
        .arg("--config")
        .arg(fixtures().join("moshi-config.json"))
        .arg("-o")
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("decodes only"));
    let mut codec = ccsm::mimi::MimiCodec::new(MimiModel::load(&gguf).unwrap(), MimiOptions::default()).unwrap();
    assert!(!codec.model().can_encode());
    let mut stream = codec.new_stream().unwrap();
    assert_eq!(codec.decode(&mut stream, &[vec![1; 8]]).unwrap().len(), codec.frame_samples(), "it still decodes");
    let err = codec.encode_all(&[0.0; 1920], 1).unwrap_err().to_string();
    assert!(err.contains("only the decoder") && err.contains("convert_mimi.py"), "{err}");
}

/// Lower-precision weights (f16 everywhere; q8_0 matrices with f16 codebooks): how many codes still
/// equal moshi's (f32) encode. Reported, with a floor well under what was measured.
#[test]
fn encoder_codes_with_lower_precision_weights() {
    let dir = tempfile::tempdir().unwrap();
    let samples: Vec<f32> = read_f32(&fixtures().join("enc-speech.f32")).iter().map(|&v| v as f32).collect();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("enc-speech-codes.json")).unwrap()).unwrap();
    let moshi = codes_of(&expected, "moshi_batch");
    for outtype in ["f16", "q8_0"] {
        let path = convert(dir.path(), "moshi", outtype);
        let mut codec = ccsm::mimi::MimiCodec::new(MimiModel::load(&path).unwrap(), MimiOptions::default()).unwrap();
        let n_q = codec.model().config().n_q;
        let ours = by_codebook(&codec.encode_all(&samples, n_q).unwrap());
        let total = moshi.iter().map(Vec::len).sum::<usize>();
        let same = ours.iter().flatten().zip(moshi.iter().flatten()).filter(|(a, b)| a == b).count();
        let semantic = ours[0].iter().zip(&moshi[0]).filter(|(a, b)| a == b).count();
        eprintln!("{outtype} weights: {same} of {total} codes equal moshi's f32 encode ({semantic} of {} semantic)", moshi[0].len());
        // Residual stages amplify a flip (the next stage quantizes another residual); the floor is
        // far under what was measured, to hold on every CPU's rounding.
        assert!(same * 2 > total, "{outtype}: {same} of {total} codes equal");
    }
}

/// The round trip: our encode then our decode of a recording against moshi's encode then moshi's decode,
/// within the decoder's bar (60 dB against moshi's batch decoding).
#[test]
fn encode_then_decode_matches_moshis_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert(dir.path(), "moshi", "f32");
    for input in ["speech", "noise"] {
        let samples: Vec<f32> = read_f32(&fixtures().join(format!("enc-{input}.f32"))).iter().map(|&v| v as f32).collect();
        let mut codec = ccsm::mimi::MimiCodec::new(MimiModel::load(&path).unwrap(), MimiOptions::default()).unwrap();
        let frames = codec.encode_all(&samples, codec.model().config().n_q).unwrap();
        let mut stream = codec.new_stream().unwrap();
        let ours: Vec<f64> = codec.decode(&mut stream, &frames).unwrap().iter().map(|&v| v as f64).collect();
        let moshi = read_f32(&fixtures().join(format!("enc-{input}-moshi-roundtrip.f32")));
        assert_eq!(ours.len(), moshi.len(), "{input}: samples");
        let snr = snr_db(&moshi, &ours);
        eprintln!("{input}: encode → decode SNR {snr:.1} dB against moshi's round trip");
        assert!(snr >= 60.0, "{input}: {snr:.1} dB");
    }
}
