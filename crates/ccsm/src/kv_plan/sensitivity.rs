//! A sensitivity profile: what storing one layer's K or V in each cache type costs in KL divergence
//! (against an f32 cache), measured by `calibrate` and read by the planner.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kv_cache::Half;
use crate::CacheType;

/// The format string every profile file carries.
pub const PROFILE_FORMAT: &str = "ccsm-kv-profile/1";

/// The GGUF metadata key a profile can be stored under (its JSON text).
pub const GGUF_KEY: &str = "ccsm.kv_profile";

/// The model shape a profile was measured on; a profile applies only to a cache of this shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileShape {
    /// Layers of the cache.
    pub n_layer: usize,
    /// Width of one K/V head.
    pub head_dim: usize,
    /// K/V heads per layer.
    pub n_head_kv: usize,
}

/// How the profile was measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRun {
    /// The calibration text (a path or name, for the record).
    pub text: String,
    /// Tokens per scored chunk; windows are scaled from this context to a cache's (see `window_ratio`).
    pub ctx: usize,
    /// Chunks of the text that were scored.
    pub chunks: usize,
    /// The type every half was measured at directly (the others are scaled from it, see `HalfCost`).
    pub probe: CacheType,
    /// Whether every type was measured directly (no proxy).
    pub exhaustive: bool,
    /// Mean KLD of a perturbation that changes nothing in exact arithmetic (the f32 cache stored
    /// Hadamard-rotated): the floor any change to the cache costs, from the model's rounding (8-bit
    /// activations of quantized weights), subtracted from every measured cost.
    pub floor_kld: f64,
    /// Whether the weights were dequantized to f32 for calibration (no activation floor).
    pub f32_weights: bool,
    /// Mean KLD of the whole cache at the probe type, measured (what the sum of the halves predicts
    /// is in `predicted_uniform_probe_kld`: their ratio checks that costs add up).
    /// None when the calibration was exhaustive or that run was skipped.
    pub measured_uniform_probe_kld: Option<f64>,
    /// The sum over every half of its cost at the probe type: the whole-cache cost the planner predicts.
    pub predicted_uniform_probe_kld: f64,
    /// What recent windows (`--kv-recent`) did to the whole cache at the probe type (profiles made
    /// before windows have none: the planner then keeps none).
    #[serde(default)]
    pub windows: Vec<WindowGain>,
}

/// The whole cache at the probe type with a recent window of `cells`, measured.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowGain {
    /// Cells of the recent window, at the calibration's context.
    pub cells: usize,
    /// Mean KLD, the floor subtracted.
    pub kld: f64,
    /// `kld` over the same cache's without a window: the factor the planner scales a layout's
    /// predicted cost by when it keeps this window.
    pub ratio: f64,
}

/// One layer's half: its predicted KLD cost per cache type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HalfCost {
    /// The layer, from 0.
    pub layer: usize,
    /// K or V.
    pub half: Half,
    /// Mean KLD with only this half quantized to the probe type, the rest of the cache f32.
    pub probe_kld: f64,
    /// Per type: the relative squared error of this half's stored rows (‖x̂ − x‖² / ‖x‖², rotated as
    /// the cache would store them), measured on the calibration text's rows.
    pub relative_mse: Vec<(CacheType, f64)>,
    /// Per type: predicted KLD = probe_kld × mse(type) / mse(probe), or measured when exhaustive.
    pub kld: Vec<(CacheType, f64)>,
}

/// Costs of every layer's K and V at every measured type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SensitivityProfile {
    /// Always `PROFILE_FORMAT`; `check` refuses any other.
    pub format: String,
    /// Name of the model it was measured on (for the record and error messages).
    pub model: String,
    /// The cache shape it was measured on; it applies only to caches of this shape.
    pub shape: ProfileShape,
    /// How it was measured.
    pub calibration: CalibrationRun,
    /// One entry per layer and half, in layer order, K before V.
    pub halves: Vec<HalfCost>,
}

impl SensitivityProfile {
    /// The types every half has a cost for (f32 costs nothing and is always allowed).
    pub fn types(&self) -> Vec<CacheType> {
        let mut types: Vec<CacheType> = self.halves.first().map(|h| h.kld.iter().map(|(t, _)| *t).collect()).unwrap_or_default();
        types.retain(|t| self.halves.iter().all(|h| h.kld.iter().any(|(u, _)| u == t)));
        if !types.contains(&CacheType::F32) {
            types.push(CacheType::F32);
        }
        types
    }

    /// The factor a window of `cells` scales a layout's cost by in a cache of `capacity` cells (1
    /// without a window; None when no window was measured). A window counts as the calibration's
    /// window scaled by the square root of the contexts' ratio (32 cells at 2048 as 16 at 512): on
    /// SmolLM2, 32 cells measured factors of 0.09–0.11 at ctx 512 and 0.10–0.29 at ctx 2048 (four
    /// type and text pairs, median 0.125), between the same cells (0.09) and the same share of the
    /// context (8 cells at 512: 0.39). Between measured windows the factor is interpolated in log
    /// cells, below the smallest toward 1 at none, above the largest it stays the largest's.
    pub fn window_ratio(&self, cells: usize, capacity: usize) -> Option<f64> {
        if cells == 0 {
            return Some(1.0);
        }
        let mut points: Vec<(f64, f64)> = self.calibration.windows.iter().map(|w| (w.cells as f64, w.ratio)).collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (&first, &last) = (points.first()?, points.last()?);
        let at = cells as f64 * self.context_scale(capacity).recip();
        if at <= first.0 {
            return Some(1.0 - (1.0 - first.1) * at / first.0);
        }
        let ratio = points.windows(2).find(|p| at <= p[1].0).map_or(last.1, |p| {
            let t = (at / p[0].0).ln() / (p[1].0 / p[0].0).ln();
            p[0].1 + t * (p[1].1 - p[0].1)
        });
        Some(ratio)
    }

    /// How many cells of a cache of `capacity` a calibration window's cell is worth (see `window_ratio`).
    fn context_scale(&self, capacity: usize) -> f64 {
        (capacity.max(1) as f64 / self.calibration.ctx.max(1) as f64).sqrt()
    }

    /// The windows worth planning in a cache of `capacity` cells: each measured one, scaled from the
    /// calibration's context to this one (see `window_ratio`).
    pub fn window_candidates(&self, capacity: usize) -> Vec<usize> {
        let scale = self.context_scale(capacity);
        let mut cells: Vec<usize> =
            self.calibration.windows.iter().map(|w| ((w.cells as f64 * scale).ceil() as usize).max(1)).filter(|&c| c < capacity).collect();
        cells.sort_unstable();
        cells.dedup();
        cells
    }

    /// Predicted KLD of storing `layer`'s `half` as `t` (f32: 0).
    pub fn cost(&self, layer: usize, half: Half, t: CacheType) -> Option<f64> {
        if t == CacheType::F32 {
            return Some(0.0);
        }
        let h = self.halves.iter().find(|h| h.layer == layer && h.half == half)?;
        h.kld.iter().find(|(u, _)| *u == t).map(|(_, c)| *c)
    }

    /// Errors unless the profile covers every half of a cache of `shape`.
    pub fn check(&self, shape: ProfileShape) -> Result<()> {
        let bad = |why: String| Err(Error::Input(format!("KV profile for {}: {why}", self.model)));
        if self.format != PROFILE_FORMAT {
            return bad(format!("format `{}`, expected `{PROFILE_FORMAT}`", self.format));
        }
        if self.shape != shape {
            return bad(format!("measured on a cache of shape {:?}, this one is {shape:?}", self.shape));
        }
        for l in 0..shape.n_layer {
            for half in Half::BOTH {
                let Some(h) = self.halves.iter().find(|h| h.layer == l && h.half == half) else {
                    return bad(format!("no costs for layer {l} {}", half.name()));
                };
                if let Some((t, c)) = h.kld.iter().find(|(_, c)| !c.is_finite() || *c < 0.0) {
                    return bad(format!("layer {l} {} at {t} costs {c}", half.name()));
                }
            }
        }
        Ok(())
    }

    /// The profile as pretty-printed JSON, the form files and GGUF metadata hold.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a profile serializes")
    }

    /// Parses a profile from JSON; `origin` names where the text came from in the error.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Input(format!("{origin}: not a KV profile: {e}")))
    }

    /// Writes the profile to `path` as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json() + "\n").map_err(|source| Error::Io { path: path.to_path_buf(), source })
    }

    /// Reads a profile written by `save` (not yet checked against a model: see `check`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// The profile stored in a GGUF file's metadata (`GGUF_KEY`), if any.
    pub fn from_gguf(path: &Path) -> Result<Option<Self>> {
        let file = ggml::gguf::GgufFile::open(path)?;
        match file.get_opt::<String>(GGUF_KEY)? {
            Some(text) => Self::from_json(&text, &format!("{} metadata `{GGUF_KEY}`", path.display())).map(Some),
            None => Ok(None),
        }
    }
}
