//! Mixed-precision KV caches chosen to fit a budget: a per-layer sensitivity profile (measured by
//! `crate::calibrate`),
//! and a planner that picks each layer's K and V types to minimise the profile's predicted KL
//! divergence within a byte or bits-per-element budget (`docs/kv-planner.md`).

mod planner;
mod sensitivity;

pub use planner::{plan, plan_with_window, KvPlan, PlanBudget, UNIFORM_MARGIN};
pub use sensitivity::{CalibrationRun, HalfCost, ProfileShape, SensitivityProfile, WindowGain, GGUF_KEY, PROFILE_FORMAT};

use crate::kv_cache::{Half, KvLayout};

/// The profile's predicted KLD of a whole layout (the sum of its halves' costs, plus the floor when
/// anything is quantized), if it has them all.
pub fn predicted_kld(profile: &SensitivityProfile, layout: &KvLayout) -> Option<f64> {
    let mut sum = 0.0;
    for (l, t) in layout.layers().iter().enumerate() {
        for half in Half::BOTH {
            sum += profile.cost(l, half, t.get(half))?;
        }
    }
    Some(if sum > 0.0 { sum + profile.calibration.floor_kld } else { 0.0 })
}
