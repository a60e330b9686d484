//! Calibration: measures a `SensitivityProfile` on a text.
//!
//! The reference is the model with an f32 cache. Each layer's K, then V, is stored at the probe type
//! with the rest of the cache f32, and the text's mean KLD against the reference is that half's probe
//! cost (2 × n_layer runs). The other types' costs are scaled from it by each type's relative squared
//! error on that half's own rows (KLD grows with the square of a small logit perturbation, and the
//! perturbation with the stored rows' error): one run per half instead of one per half and type.
//! `exhaustive` measures every type directly instead, which is how the proxy is checked.

use crate::error::{Error, Result};
use crate::ggml_model::GGMLModel;
use crate::kv_cache::{rotate_heads, Half, KvLayout, LayerTypes, Rotation};
use crate::kv_plan::{CalibrationRun, HalfCost, ProfileShape, SensitivityProfile, WindowGain, PROFILE_FORMAT};
use crate::perplexity::{score, PerplexityRun};
use crate::CacheType;
use crate::Model;

/// What to calibrate with.
#[derive(Clone, Debug)]
pub struct CalibrationOptions {
    /// Tokens per scored chunk (each chunk from an empty cache, as in perplexity).
    pub ctx: usize,
    /// Most chunks of the text to score; None scores every whole chunk.
    pub chunks: Option<usize>,
    /// The types to cost (f32 is always free).
    pub types: Vec<CacheType>,
    /// The type each half is measured at.
    pub probe: CacheType,
    /// Measure every type directly (2 × n_layer × types runs) instead of scaling the probe's cost.
    pub exhaustive: bool,
    /// A name for the calibration text, recorded in the profile.
    pub text_name: String,
    /// Whether the model's weights were dequantized to f32 (recorded in the profile).
    pub f32_weights: bool,
    /// Recent windows to measure (the whole cache at the probe type with each), for the planner's
    /// choice of window; those not shorter than `ctx` are skipped.
    pub windows: Vec<usize>,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions {
            ctx: 512,
            chunks: Some(4),
            types: vec![
                CacheType::F16,
                CacheType::Q8_0,
                CacheType::Q5_1,
                CacheType::Q5_0,
                CacheType::Q4_1,
                CacheType::IQ4NL,
                CacheType::Q4_0,
                CacheType::MXFP4,
            ],
            probe: CacheType::Q4_0,
            exhaustive: false,
            text_name: String::new(),
            f32_weights: false,
            windows: vec![8, 16, 32, 64],
        }
    }
}

/// ‖x̂ − x‖² / ‖x‖² of `rows` stored as `t` (rows of `width`; heads of `head_dim` rotated first when
/// `rotate`, as the cache stores them).
pub fn relative_mse(rows: &[f32], width: usize, head_dim: usize, t: CacheType, rotate: bool) -> Result<f64> {
    let mut values = rows.to_vec();
    if rotate {
        rotate_heads(&mut values, head_dim);
    }
    let stored = t.dtype().dequantize(&t.dtype().quantize(&values, width)?, values.len())?;
    let err: f64 = stored.iter().zip(&values).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
    let norm: f64 = values.iter().map(|&v| (v as f64).powi(2)).sum();
    Ok(if norm > 0.0 { err / norm } else { 0.0 })
}

/// Measures the profile of `model` on `tokens`. `progress(done, total)` follows the runs.
pub fn calibrate(
    model: &mut GGMLModel,
    model_name: &str,
    tokens: &[u32],
    options: &CalibrationOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<SensitivityProfile> {
    if !options.types.contains(&options.probe) && !options.exhaustive {
        return Err(Error::Input(format!("the probe type {} must be one of the calibrated types", options.probe)));
    }
    let config = model.cache().config().clone();
    let shape = ProfileShape { n_layer: config.n_layer, head_dim: config.head_dim, n_head_kv: config.n_head_kv };
    let width = config.head_dim * config.n_head_kv;
    let rotation = model.cache().rotation();
    let f32_layout = KvLayout::uniform(config.n_layer, CacheType::F32, CacheType::F32);
    let measured: Vec<CacheType> = if options.exhaustive { options.types.clone() } else { vec![options.probe] };
    let windows: Vec<usize> = options.windows.iter().copied().filter(|&c| c > 0 && c < options.ctx).collect();
    let whole_run = !options.exhaustive || !windows.is_empty();
    let total = 2 + 2 * config.n_layer * measured.len() + usize::from(whole_run) + windows.len();
    let mut done = 0;
    let mut step = |n: &mut usize| {
        *n += 1;
        progress(*n, total);
    };

    model.quantize_kv_layout(f32_layout.clone())?;
    model.set_kv_rotation(Rotation::Quantized)?;
    let (reference, _) = score(model, tokens, options.ctx, options.chunks, None, |_, _| {})?;
    step(&mut done);
    // The reference run's last chunk is still cached: its rows give each half's error per type.
    let mut relative_errors = Vec::with_capacity(2 * config.n_layer);
    for layer in 0..config.n_layer {
        for half in Half::BOTH {
            let rows = model.cache().rows_f32(layer, half)?;
            let mut relative = Vec::new();
            for &t in &options.types {
                relative.push((t, relative_mse(&rows, width, config.head_dim, t, rotation.applies(t, config.head_dim))?));
            }
            relative_errors.push(relative);
        }
    }
    // The floor: rotated f32 rows are the same cache in exact arithmetic.
    model.set_kv_rotation(Rotation::All)?;
    let (_, kl) = score(model, tokens, options.ctx, options.chunks, Some(&reference), |_, _| {})?;
    let floor_kld = kl.map_or(0.0, |k| k.kld.mean);
    model.set_kv_rotation(Rotation::Quantized)?;
    step(&mut done);
    let mut halves = Vec::with_capacity(2 * config.n_layer);
    let mut relative_errors = relative_errors.into_iter();
    for layer in 0..config.n_layer {
        for half in Half::BOTH {
            let relative = relative_errors.next().expect("one entry per layer and half");
            let mut kld = Vec::new();
            for &t in &measured {
                let layout = one_half_at(&f32_layout, layer, half, t);
                kld.push((t, (kld_against(model, tokens, options, &reference, layout)? - floor_kld).max(0.0)));
                step(&mut done);
            }
            halves.push(HalfCost { layer, half, probe_kld: kld[0].1, relative_mse: relative, kld });
        }
    }
    if !options.exhaustive {
        for h in &mut halves {
            let probe_mse = h.relative_mse.iter().find(|(t, _)| *t == options.probe).map_or(0.0, |(_, m)| *m);
            h.kld = h.relative_mse.iter().map(|&(t, m)| (t, if probe_mse > 0.0 { h.probe_kld * m / probe_mse } else { 0.0 })).collect();
        }
    }
    let predicted_uniform_probe_kld = halves.iter().map(|h| h.kld.iter().find(|(t, _)| *t == options.probe).map_or(0.0, |(_, c)| *c)).sum();
    let whole = f32_layout.map(|_| options.probe);
    let whole_kld = if whole_run {
        let kld = (kld_against(model, tokens, options, &reference, whole.clone())? - floor_kld).max(0.0);
        step(&mut done);
        Some(kld)
    } else {
        None
    };
    // Each window over the same whole-probe cache: its factor on the cost.
    let mut gains = Vec::with_capacity(windows.len());
    for &cells in &windows {
        model.set_kv_recent(cells)?;
        let kld = (kld_against(model, tokens, options, &reference, whole.clone())? - floor_kld).max(0.0);
        let base = whole_kld.unwrap_or(0.0);
        gains.push(WindowGain { cells, kld, ratio: if base > 0.0 { (kld / base).min(1.0) } else { 1.0 } });
        step(&mut done);
    }
    model.set_kv_recent(config.recent)?;
    let measured_uniform_probe_kld = whole_kld.filter(|_| !options.exhaustive);
    model.quantize_kv_layout(config.kv_layout())?;
    model.set_kv_rotation(rotation)?;
    Ok(SensitivityProfile {
        format: PROFILE_FORMAT.into(),
        model: model_name.into(),
        shape,
        calibration: CalibrationRun {
            text: options.text_name.clone(),
            ctx: options.ctx,
            chunks: reference.chunks,
            probe: options.probe,
            exhaustive: options.exhaustive,
            floor_kld,
            f32_weights: options.f32_weights,
            measured_uniform_probe_kld,
            predicted_uniform_probe_kld,
            windows: gains,
        },
        halves,
    })
}

/// `base` with layer `layer`'s `half` set to `t`.
fn one_half_at(base: &KvLayout, layer: usize, half: Half, t: CacheType) -> KvLayout {
    let mut layers: Vec<LayerTypes> = base.layers().to_vec();
    layers[layer] = layers[layer].with(half, t);
    KvLayout::new(layers)
}

/// Mean KLD of the text with the cache laid out as `layout`, against `reference`.
fn kld_against(
    model: &mut GGMLModel,
    tokens: &[u32],
    options: &CalibrationOptions,
    reference: &PerplexityRun,
    layout: KvLayout,
) -> Result<f64> {
    model.quantize_kv_layout(layout)?;
    let (_, kl) = score(model, tokens, options.ctx, options.chunks, Some(reference), |_, _| {})?;
    kl.map(|k| k.kld.mean).ok_or_else(|| Error::Invariant("a scored run against a reference gave no KL".into()))
}
