//! The planner: per-layer K/V types that minimise a profile's predicted KLD within a byte budget.
//!
//! Predicted KLD is the sum of each half's cost (the profile measures halves one at a time; the
//! calibration run records how well the sum predicts a whole cache). Choosing one type per half under
//! a bytes-per-cell limit is a multiple-choice knapsack, solved exactly by dynamic programming over
//! bytes per cell (in units of the gcd of the candidates' row sizes, so a few thousand states).

use serde::Serialize;

use super::sensitivity::{ProfileShape, SensitivityProfile};
use crate::error::{Error, Result};
use crate::kv_cache::MIN_CELLS;
use crate::kv_cache::{Half, KvCacheConfig, KvLayout, LayerTypes};
use crate::CacheType;

/// How much less predicted KLD a mixed layout must promise than the best uniform layout that fits
/// (one type for every layer's K, one for every V) to be chosen over it. The costs are predictions
/// and err: on SmolLM2 (profile from the Debian licenses, measured on this repository's docs) a plan
/// at 8.5 bits predicted 11.5 % better than uniform q8_0 measured 40 % worse, while the plans at 4.5–6
/// bits, predicted 33–60 % better, measured 13–61 % better (`docs/kv-planner.md`).
pub const UNIFORM_MARGIN: f64 = 0.25;

/// What a plan must fit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanBudget {
    /// Mean storage bits per element of the cache asked for (block scales included): the bytes of
    /// that many bits for every cell; below the smallest layout, fewer cells are kept.
    BitsPerElement(f64),
    /// Bytes for the whole cache; below the smallest layout at the full capacity, fewer cells are kept.
    Bytes(usize),
}

/// The planner's choice.
#[derive(Clone, Debug, Serialize)]
pub struct KvPlan {
    /// Each layer's K and V types.
    pub layout: KvLayout,
    /// `layout` in `--kv-layout` spelling.
    pub spec: String,
    /// Cells the cache keeps (the capacity asked for, unless the budget forced fewer).
    pub capacity: usize,
    /// Bytes of the planned cache at `capacity` cells, the recent window included; never over the budget.
    pub bytes: usize,
    /// Mean storage bits per cached element over the cells kept, block scales and window included.
    pub bits_per_element: f64,
    /// The profile's predicted mean KLD of this plan against an f32 cache (0 when nothing is quantized).
    pub predicted_kld: f64,
    /// The budget the plan was made for.
    pub budget: PlanBudget,
    /// Cells of the recent window kept in f16 (0: none), inside `bytes`.
    pub recent: usize,
}

impl KvPlan {
    /// The cache config of this plan on `shape`.
    pub fn config(&self, shape: &KvCacheConfig) -> KvCacheConfig {
        shape.clone().with_capacity(self.capacity).with_layout(self.layout.clone()).with_recent(self.recent)
    }
}

/// `plan`, also choosing the recent window: no window or one the profile measured (`WindowGain`),
/// whichever plan keeps every cell asked for with the least predicted KLD (the window's rings come
/// out of the budget, its measured factor scales the layout's cost). When no plan keeps every cell,
/// the one without a window (the most cells).
pub fn plan_with_window(
    profile: &SensitivityProfile,
    shape: &KvCacheConfig,
    candidates: &[CacheType],
    budget: PlanBudget,
) -> Result<KvPlan> {
    let unwindowed = plan(profile, &shape.clone().with_recent(0), candidates, budget)?;
    let mut best = unwindowed;
    for cells in profile.window_candidates(shape.capacity) {
        let Ok(p) = plan(profile, &shape.clone().with_recent(cells), candidates, budget) else { continue };
        if p.capacity == shape.capacity && (best.capacity < shape.capacity || p.predicted_kld < best.predicted_kld) {
            best = p;
        }
    }
    Ok(best)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Plans `shape` (its capacity is the cells wanted) within `budget`, choosing among `candidates`
/// (the profile's types when empty).
pub fn plan(profile: &SensitivityProfile, shape: &KvCacheConfig, candidates: &[CacheType], budget: PlanBudget) -> Result<KvPlan> {
    let profile_shape = ProfileShape { n_layer: shape.n_layer, head_dim: shape.head_dim, n_head_kv: shape.n_head_kv };
    profile.check(profile_shape)?;
    let width = shape.n_embd_kv()?;
    let mut types: Vec<CacheType> = if candidates.is_empty() { profile.types() } else { candidates.to_vec() };
    types.retain(|&t| shape.head_dim.is_multiple_of(t.dtype().block_size()));
    types.sort_by_key(|t| t.name());
    types.dedup();
    if types.is_empty() {
        return Err(Error::Input("the planner has no cache type to choose from".into()));
    }
    let row = |t: CacheType| -> Result<usize> { Ok(t.dtype().row_size(width)?) };
    let unit = types.iter().try_fold(0, |g, &t| row(t).map(|r| gcd(g, r)))?;
    let halves: Vec<(usize, Half)> = (0..shape.n_layer).flat_map(|l| Half::BOTH.map(|h| (l, h))).collect();
    // Each half's choices: (units per cell, cost, type), cheapest in bytes first.
    let mut choices: Vec<Vec<(usize, f64, CacheType)>> = Vec::with_capacity(halves.len());
    for &(l, h) in &halves {
        let mut c = Vec::new();
        for &t in &types {
            let cost = profile
                .cost(l, h, t)
                .ok_or_else(|| Error::Input(format!("the KV profile has no cost for {t} (layer {l} {})", h.name())))?;
            c.push((row(t)? / unit, cost, t));
        }
        c.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        choices.push(c);
    }
    let min_units: usize = choices.iter().map(|c| c[0].0).sum();
    let max_units: usize = choices.iter().map(|c| c.iter().map(|x| x.0).max().unwrap_or(0)).sum();
    let elements_per_cell = (2 * shape.n_layer * width) as f64;
    // A bits budget is the bytes of that many bits for every element of every cell asked for.
    let bytes = match budget {
        PlanBudget::BitsPerElement(bits) if !(bits.is_finite() && bits > 0.0) => {
            return Err(Error::Input(format!("--kv-bits {bits} must be a positive number")));
        }
        PlanBudget::BitsPerElement(bits) => (bits * elements_per_cell / 8.0 * shape.capacity as f64).floor() as usize,
        PlanBudget::Bytes(bytes) => bytes,
    };
    // The recent window's rings are a fixed cost; the layout gets what they leave.
    let ring = shape.recent_bytes()?;
    let cells_bytes = bytes.checked_sub(ring).ok_or(Error::BudgetTooSmall { budget: bytes, minimum: ring, min_cells: 0 })?;
    let full = cells_bytes / shape.capacity.max(1) / unit;
    let (capacity, cell_units) = if full >= min_units {
        (shape.capacity, full)
    } else {
        // Even the smallest layout does not fit every cell: keep as many cells as it allows.
        let cells = cells_bytes / (min_units * unit);
        let least = shape.capacity.min(MIN_CELLS);
        if cells < least {
            return Err(Error::BudgetTooSmall { budget: bytes, minimum: ring + least * min_units * unit, min_cells: least });
        }
        (cells, min_units)
    };
    let limit = cell_units.min(max_units);
    let picks = knapsack(&choices, limit);
    let mut layout = KvLayout::new(
        (0..shape.n_layer).map(|l| LayerTypes::new(choices[2 * l][picks[2 * l]].2, choices[2 * l + 1][picks[2 * l + 1]].2)).collect(),
    );
    let mut costs: f64 = picks.iter().zip(&choices).map(|(&p, c)| c[p].1).sum();
    // The costs are predictions (one half at a time, other types scaled by their squared error): a
    // mixed layout must beat the best uniform one that fits by a margin to be worth its risk.
    let cost_of = |k: CacheType, v: CacheType| -> Option<(usize, f64)> {
        let (ku, vu) = (row(k).ok()? / unit, row(v).ok()? / unit);
        let cost = (0..shape.n_layer).map(|l| Some(profile.cost(l, Half::K, k)? + profile.cost(l, Half::V, v)?)).sum::<Option<f64>>()?;
        Some(((ku + vu) * shape.n_layer, cost))
    };
    let uniform = types
        .iter()
        .flat_map(|&k| types.iter().map(move |&v| (k, v)))
        .filter_map(|(k, v)| cost_of(k, v).filter(|(units, _)| *units <= limit).map(|(_, c)| (k, v, c)))
        .min_by(|a, b| a.2.total_cmp(&b.2));
    if let Some((k, v, c)) = uniform.filter(|u| costs >= (1.0 - UNIFORM_MARGIN) * u.2) {
        layout = KvLayout::uniform(shape.n_layer, k, v);
        costs = c;
    }
    // A window scales the cost by its measured factor (an unmeasured one is not counted); any change to
    // the cache costs the profile's floor (see `CalibrationRun::floor_kld`).
    let window = profile.window_ratio(shape.recent, shape.capacity).unwrap_or(1.0);
    let predicted_kld = if costs > 0.0 { costs * window + profile.calibration.floor_kld } else { 0.0 };
    let config = shape.clone().with_capacity(capacity).with_layout(layout.clone());
    let planned = config.bytes()?;
    if planned > bytes {
        return Err(Error::Invariant(format!("the planner chose {planned} bytes for a budget of {bytes}")));
    }
    Ok(KvPlan {
        spec: layout.to_string(),
        // Over the cells kept, the window included.
        bits_per_element: planned as f64 * 8.0 / (elements_per_cell * capacity as f64),
        layout,
        capacity,
        bytes: planned,
        predicted_kld,
        budget,
        recent: shape.recent,
    })
}

/// Picks one choice per item with total units ≤ `limit` and the least total cost (exact DP).
fn knapsack(choices: &[Vec<(usize, f64, CacheType)>], limit: usize) -> Vec<usize> {
    let width = limit + 1;
    // best[u]: least cost of the items so far using exactly u units (∞ if impossible).
    let mut best = vec![f64::INFINITY; width];
    best[0] = 0.0;
    let mut picked: Vec<Vec<u8>> = Vec::with_capacity(choices.len());
    for item in choices {
        let mut next = vec![f64::INFINITY; width];
        let mut pick = vec![0u8; width];
        for (u, &b) in best.iter().enumerate().filter(|(_, b)| b.is_finite()) {
            for (i, &(units, cost, _)) in item.iter().enumerate() {
                let to = u + units;
                if to < width && b + cost < next[to] {
                    next[to] = b + cost;
                    pick[to] = i as u8;
                }
            }
        }
        best = next;
        picked.push(pick);
    }
    // The cheapest end state, then walk back through the choices.
    let mut u = (0..width).min_by(|&a, &b| best[a].total_cmp(&best[b]).then(a.cmp(&b))).unwrap_or(0);
    let mut picks = vec![0; choices.len()];
    for i in (0..choices.len()).rev() {
        let p = picked[i][u] as usize;
        picks[i] = p;
        u -= choices[i][p].0;
    }
    picks
}
