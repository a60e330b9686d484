//! The memory optimizer: fits a model's KV caches into a byte budget by the seed's strategy.
//!
//! With r = budget / current bytes: r ≥ 1 → nothing; 0.5 ≤ r < 1 → resize (evicting by the policy);
//! 0.25 ≤ r < 0.5 → Q8_0, then resize if still over; r < 0.25 → Q4_0, then prune (evict and resize)
//! if still over; when a step's result would not fit (capacities never go below `MIN_CELLS`), the next
//! step is taken. Only caches that persist across steps are resized or pruned (for CSM the backbone;
//! the decoder's is reset every frame); all are quantized.

mod admission;
mod policy;

pub use admission::{admit, uniform_fallbacks, Admission, Budget, ESCALATION};
pub use policy::{CachePolicy, CacheSetup, CacheTypes, MemoryBudget, MemoryStrategy, SessionLayouts};

use serde::Serialize;

use crate::cache_role::CacheRole;
use crate::error::{Error, Result};
use crate::kv_cache::{EvictionPolicy, KvCache, KvCacheConfig, KvLayout};
use crate::kv_plan::{self, KvPlan, PlanBudget, SensitivityProfile};
use crate::CacheType;

pub use crate::kv_cache::MIN_CELLS;

/// Which branch of the strategy a budget ratio selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The caches already fit.
    Nothing,
    /// Fewer cells (0.5 ≤ r < 1), evicting by the policy.
    Resize,
    /// q8_0, then fewer cells if still over (0.25 ≤ r < 0.5).
    Q8ThenResize,
    /// q4_0, then evict and shrink if still over (r < 0.25).
    Q4ThenPrune,
    /// The planner's per-layer types for the budget (`kv_plan`), fewer cells only below its smallest
    /// layout: not one of the seed's thresholds, chosen by asking for it.
    Plan,
}

impl Strategy {
    /// The seed's thresholds on r = budget / current bytes.
    pub fn for_ratio(r: f64) -> Strategy {
        if r >= 1.0 {
            Strategy::Nothing
        } else if r >= 0.5 {
            Strategy::Resize
        } else if r >= 0.25 {
            Strategy::Q8ThenResize
        } else {
            Strategy::Q4ThenPrune
        }
    }

    /// The step after this one when its result would not fit (None after the last).
    pub fn next(self) -> Option<Strategy> {
        match self {
            Strategy::Nothing => Some(Strategy::Resize),
            Strategy::Resize => Some(Strategy::Q8ThenResize),
            Strategy::Q8ThenResize => Some(Strategy::Q4ThenPrune),
            Strategy::Q4ThenPrune | Strategy::Plan => None,
        }
    }

    /// The type the strategy narrows caches to, if any (`ESCALATION`'s, in order).
    fn quantize_to(self) -> Option<CacheType> {
        match self {
            Strategy::Q8ThenResize => Some(ESCALATION[0]),
            Strategy::Q4ThenPrune => Some(ESCALATION[1]),
            Strategy::Nothing | Strategy::Resize | Strategy::Plan => None,
        }
    }
}

/// A cache the optimizer may act on.
pub struct ManagedCache<'a> {
    /// Which cache it is (for reports).
    pub role: CacheRole,
    /// The cache.
    pub cache: &'a mut KvCache,
    /// Whether its capacity may change (false for CSM's per-frame decoder cache).
    pub resizable: bool,
}

/// One thing the optimizer did to a cache (shown in reports as a sentence).
#[derive(Clone, Debug, PartialEq)]
pub enum MemoryAction {
    /// The cache converted, with every cached token, to `layout`.
    Quantized {
        /// Which cache.
        cache: CacheRole,
        /// Its new types.
        layout: KvLayout,
    },
    /// Cells evicted to make a smaller cache hold what it keeps.
    Pruned {
        /// Which cache.
        cache: CacheRole,
        /// Cells evicted.
        evicted: usize,
        /// Cells it held before.
        of: usize,
        /// Which cells went.
        policy: EvictionPolicy,
    },
    /// The cache's capacity changed.
    Resized {
        /// Which cache.
        cache: CacheRole,
        /// Cells before.
        from: usize,
        /// Cells after.
        to: usize,
    },
    /// The cache keeps its newest cells also in f16.
    RecentWindow {
        /// Which cache.
        cache: CacheRole,
        /// Cells in the window.
        cells: usize,
    },
    /// The planner's per-layer types.
    Planned {
        /// Which cache.
        cache: CacheRole,
        /// The layout, as `--kv-layout` spells it.
        spec: String,
        /// Mean bits per cached element.
        bits_per_element: f64,
        /// The profile's predicted KL divergence of the layout.
        predicted_kld: f64,
    },
}

impl std::fmt::Display for MemoryAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryAction::Quantized { cache, layout } => write!(f, "{cache}: quantized to {layout}"),
            MemoryAction::Pruned { cache, evicted, of, policy } => write!(f, "{cache}: pruned {evicted} of {of} cells ({policy:?})"),
            MemoryAction::Resized { cache, from, to } => write!(f, "{cache}: resized from {from} to {to} cells"),
            MemoryAction::RecentWindow { cache, cells } => write!(f, "{cache}: a recent window of {cells} f16 cells"),
            MemoryAction::Planned { cache, spec, bits_per_element, predicted_kld } => {
                write!(f, "{cache}: planned {spec} ({bits_per_element:.3} bits per element, predicted KLD {predicted_kld:.5})")
            }
        }
    }
}

impl Serialize for MemoryAction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What the optimizer did.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    /// The budget.
    pub budget_bytes: usize,
    /// Budget over the caches' bytes before.
    pub ratio: f64,
    /// The strategy applied: the ratio's, or a later one when the ratio's result would not fit.
    pub strategy: Strategy,
    /// The ratio's strategy, when a later one had to be taken instead.
    pub escalated_from: Option<Strategy>,
    /// What was done, in order.
    pub actions: Vec<MemoryAction>,
    /// (cache, bytes) before.
    pub before: Vec<(CacheRole, usize)>,
    /// (cache, bytes) after.
    pub after: Vec<(CacheRole, usize)>,
    /// The planner's choice, under the `plan` strategy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<KvPlan>,
}

impl MemoryReport {
    /// Bytes of every cache after.
    pub fn bytes_after(&self) -> usize {
        self.after.iter().map(|(_, b)| b).sum()
    }
}

fn total(caches: &[ManagedCache<'_>]) -> usize {
    caches.iter().map(|c| c.cache.memory_usage()).sum()
}

/// `from`, or `to` when `to` takes fewer bits (the optimizer only narrows).
fn narrowed(from: CacheType, to: CacheType) -> CacheType {
    if from.dtype().bits_per_element() > to.dtype().bits_per_element() {
        to
    } else {
        from
    }
}

/// The least memory the caches can be brought to: fixed caches at q4_0, resizable ones at q4_0 with
/// `MIN_CELLS` cells.
pub fn minimum_bytes(caches: &[ManagedCache<'_>]) -> Result<usize> {
    caches
        .iter()
        .map(|c| {
            let mut config = c.cache.config().clone().map_types(|t| narrowed(t, ESCALATION[ESCALATION.len() - 1]));
            if c.resizable {
                config.capacity = config.capacity.min(MIN_CELLS);
            }
            config.bytes()
        })
        .sum()
}

/// The target of one cache under a strategy: its types and capacity.
#[derive(Clone, Debug)]
struct Target {
    config: KvCacheConfig,
    /// Fewest cells the cache may be given.
    min_cells: usize,
}

/// The caches' configs under `strategy` for `budget`: types narrowed, then (when still over) the
/// resizable caches' capacities shared out of what the fixed ones leave, and trimmed if the clamp to
/// `MIN_CELLS` pushed them over. The result may still exceed the budget: the caller escalates.
fn plan(caches: &[ManagedCache<'_>], strategy: Strategy, budget: usize) -> Result<Vec<Target>> {
    let mut targets: Vec<Target> = caches
        .iter()
        .map(|c| {
            let mut config = c.cache.config().clone();
            if let Some(t) = strategy.quantize_to() {
                config = config.map_types(|from| narrowed(from, t));
            }
            let min_cells = if c.resizable { MIN_CELLS.min(config.capacity) } else { config.capacity };
            Target { config, min_cells }
        })
        .collect();
    let bytes = |targets: &[Target]| targets.iter().map(|t| t.config.bytes()).sum::<Result<usize>>();
    if strategy == Strategy::Nothing || bytes(&targets)? <= budget {
        return Ok(targets);
    }
    let per_cell = |t: &Target| t.config.cell_bytes();
    let fixed: usize = targets.iter().filter(|t| t.min_cells == t.config.capacity).map(|t| t.config.bytes()).sum::<Result<usize>>()?;
    let resizable: Vec<usize> = (0..targets.len()).filter(|&i| targets[i].min_cells < targets[i].config.capacity).collect();
    // Share what the fixed caches leave in proportion to each resizable cache's size.
    let room = budget.saturating_sub(fixed);
    let sizes: usize = resizable.iter().map(|&i| targets[i].config.bytes()).sum::<Result<usize>>()?;
    for &i in &resizable {
        let t = &mut targets[i];
        let share = room as f64 * t.config.bytes()? as f64 / sizes as f64;
        t.config.capacity = (share as usize / per_cell(t)?).clamp(t.min_cells, t.config.capacity);
    }
    // The clamp may have pushed the total over: take the excess back, largest rows first.
    let mut over = bytes(&targets)?.saturating_sub(budget);
    let mut by_row = resizable.clone();
    by_row.sort_by_key(|&i| std::cmp::Reverse(per_cell(&targets[i]).unwrap_or(0)));
    for i in by_row {
        if over == 0 {
            break;
        }
        let t = &mut targets[i];
        let row = per_cell(t)?;
        let cut = over.div_ceil(row).min(t.config.capacity - t.min_cells);
        t.config.capacity -= cut;
        over = over.saturating_sub(cut * row);
    }
    Ok(targets)
}

/// Fits `caches` into `budget` bytes. The ratio budget / current bytes picks the seed's strategy; when
/// its result would not fit (the capacity clamp at `MIN_CELLS`), the next, stronger one is taken. The
/// whole plan is checked before any cache is touched: a budget below the minimal layout is refused
/// with nothing changed, and an accepted one is met exactly as planned.
pub fn optimize(mut caches: Vec<ManagedCache<'_>>, budget: usize, policy: EvictionPolicy) -> Result<MemoryReport> {
    let before: Vec<_> = caches.iter().map(|c| (c.role, c.cache.memory_usage())).collect();
    let current = total(&caches);
    let ratio = budget as f64 / current as f64;
    let minimum = minimum_bytes(&caches)?;
    if budget < minimum {
        return Err(Error::BudgetTooSmall { budget, minimum, min_cells: MIN_CELLS });
    }
    let chosen = Strategy::for_ratio(ratio);
    let mut strategy = chosen;
    let targets = loop {
        let targets = plan(&caches, strategy, budget)?;
        if targets.iter().map(|t| t.config.bytes()).sum::<Result<usize>>()? <= budget {
            break targets;
        }
        strategy = strategy.next().ok_or(Error::BudgetTooSmall { budget, minimum, min_cells: MIN_CELLS })?;
    };
    let mut actions = Vec::new();
    for (c, target) in caches.iter_mut().zip(&targets) {
        let layout = target.config.kv_layout();
        if layout != c.cache.layout() {
            match target.config.layout().cloned() {
                Some(per_layer) => c.cache.quantize_layout(per_layer)?,
                None => c.cache.quantize(target.config.k_type(), target.config.v_type())?,
            };
            actions.push(MemoryAction::Quantized { cache: c.role, layout });
        }
        let (len, from, cells) = (c.cache.len(), c.cache.capacity(), target.config.capacity);
        if cells != from {
            if strategy == Strategy::Q4ThenPrune && len > cells {
                let evicted = c.cache.prune(cells, policy)?;
                actions.push(MemoryAction::Pruned { cache: c.role, evicted, of: len, policy });
            }
            c.cache.resize(cells, policy)?;
            actions.push(MemoryAction::Resized { cache: c.role, from, to: cells });
        }
    }
    let after: Vec<_> = caches.iter().map(|c| (c.role, c.cache.memory_usage())).collect();
    let bytes_after = total(&caches);
    if bytes_after > budget {
        return Err(Error::Invariant(format!("the memory optimizer planned within {budget} bytes but the caches hold {bytes_after}")));
    }
    let escalated_from = (strategy != chosen).then_some(chosen);
    Ok(MemoryReport { budget_bytes: budget, ratio, strategy, escalated_from, actions, before, after, plan: None })
}

/// Fits one resizable cache into `budget` by the planner: the layout of least predicted KLD that
/// fits every cell, or, below the smallest layout, that layout with as many cells as fit (evicting
/// by `policy`). Planned in full before the cache is touched.
pub fn optimize_planned(
    cache: ManagedCache<'_>,
    budget: usize,
    policy: EvictionPolicy,
    profile: &SensitivityProfile,
) -> Result<MemoryReport> {
    let before = vec![(cache.role, cache.cache.memory_usage())];
    let ratio = budget as f64 / before[0].1 as f64;
    let chosen = kv_plan::plan(profile, cache.cache.config(), &[], PlanBudget::Bytes(budget))?;
    let actions = apply_plan(cache.cache, cache.role, &chosen, policy)?;
    let after = vec![(cache.role, cache.cache.memory_usage())];
    if after[0].1 > budget {
        return Err(Error::Invariant(format!("the planner planned within {budget} bytes but the cache holds {}", after[0].1)));
    }
    Ok(MemoryReport {
        budget_bytes: budget,
        ratio,
        strategy: Strategy::Plan,
        escalated_from: None,
        actions,
        before,
        after,
        plan: Some(chosen),
    })
}

/// Makes room for `needed` more cells in a full cache by evicting down to three quarters of its
/// capacity (so compaction happens every quarter of the capacity, not every token).
pub fn make_room(cache: &mut KvCache, needed: usize, policy: EvictionPolicy) -> Result<usize> {
    if cache.len() + needed <= cache.capacity() {
        return Ok(0);
    }
    let keep = (cache.capacity() * 3 / 4).min(cache.capacity().saturating_sub(needed));
    if keep < policy.sinks().min(cache.len()) || needed > cache.capacity() {
        return Err(Error::CacheFull { needed, capacity: cache.capacity() });
    }
    cache.prune(keep, policy)
}

/// Gives `cache` a plan's capacity (evicting by `policy` first if it holds more cells: the conversion
/// then works on the smaller cache) and its layout; returns what it did.
pub fn apply_plan(cache: &mut KvCache, role: CacheRole, plan: &KvPlan, policy: EvictionPolicy) -> Result<Vec<MemoryAction>> {
    let mut actions = Vec::new();
    let (len, from) = (cache.len(), cache.capacity());
    if plan.capacity < from {
        if len > plan.capacity {
            let evicted = cache.prune(plan.capacity, policy)?;
            actions.push(MemoryAction::Pruned { cache: role, evicted, of: len, policy });
        }
        cache.resize(plan.capacity, policy)?;
        actions.push(MemoryAction::Resized { cache: role, from, to: plan.capacity });
    }
    if plan.recent != cache.recent_cells() {
        cache.set_recent(plan.recent)?;
        actions.push(MemoryAction::RecentWindow { cache: role, cells: plan.recent });
    }
    if plan.layout != cache.layout() {
        cache.quantize_layout(plan.layout.clone())?;
        actions.push(MemoryAction::Planned {
            cache: role,
            spec: plan.spec.clone(),
            bits_per_element: plan.bits_per_element,
            predicted_kld: plan.predicted_kld,
        });
    }
    Ok(actions)
}
