//! `CachePolicy`: everything that decides a model's KV caches, in one place — their types (uniform,
//! a per-layer layout, or the planner's layout at B bits or within a byte budget), the f16 recent
//! window, a memory budget with the strategy that meets it, and the eviction policy of full caches.
//! The command line and the server parse their flags into one and call it: `apply` for a model's
//! own caches, `session_layouts` for the layouts a server admits sessions at.

use crate::error::{Error, Result};
use crate::ggml_model::GGMLModel;
use crate::kv_cache::{EvictionPolicy, KvCacheConfig, KvLayout};
use crate::kv_plan::{self, KvPlan, PlanBudget, SensitivityProfile};
use crate::model::Model;
use crate::CacheType;

use super::admission::ESCALATION;
use super::MemoryReport;

/// How the cache's per-layer types are chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum CacheTypes {
    /// Every layer the policy's K and V types.
    Uniform,
    /// A per-layer layout (`KvLayout::parse`'s spelling, e.g. `0:q8_0,*:q4_0`).
    Layout(String),
    /// The planner's layout of least predicted KL divergence at this mean bits per element (the recent
    /// window too, when the policy does not fix it).
    Planned {
        /// Mean bits per cached element, the window included.
        bits: f64,
    },
    /// The planner's layout within the memory budget's bytes.
    PlannedForBudget,
}

/// How a memory budget is met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryStrategy {
    /// By the budget ratio: resize, then narrow to `ESCALATION`'s types (q8_0, then q4_0 and prune).
    Escalate,
    /// The planner's per-layer types for the budget (text models, with a profile).
    Plan,
}

/// Bytes a model's caches (or, on a server, every session's) must stay within, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    /// The bytes.
    pub bytes: usize,
    /// How they are met.
    pub strategy: MemoryStrategy,
}

/// See the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct CachePolicy {
    /// K type of uniform caches (and of the cache before a layout converts it).
    pub k_type: CacheType,
    /// V type, likewise.
    pub v_type: CacheType,
    /// How per-layer types are chosen.
    pub types: CacheTypes,
    /// Cells each query also reads in f16 (`None`: none, or the planner's choice with `Planned`).
    pub recent: Option<usize>,
    /// Bytes to stay within, and how.
    pub budget: Option<MemoryBudget>,
    /// Which cells a full (or shrunk) cache gives up.
    pub eviction: EvictionPolicy,
    /// The sensitivity profile plans come from.
    pub profile: Option<SensitivityProfile>,
}

/// What applying a policy did to a model's cache.
#[derive(Debug, Default)]
pub struct CacheSetup {
    /// The plan its layout came from.
    pub plan: Option<KvPlan>,
    /// What the memory budget did.
    pub memory: Option<MemoryReport>,
}

/// The layouts a server's sessions are admitted at: the configured one, then (under pressure) the
/// fallbacks in escalation order, with the recent window every session keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionLayouts {
    /// The layout sessions start with when memory allows.
    pub configured: KvLayout,
    /// Smaller layouts, in escalation order, for when it does not.
    pub fallbacks: Vec<KvLayout>,
    /// Newest cells every session also keeps in f16.
    pub recent: usize,
}

impl CachePolicy {
    /// Uniform caches of these types, no window, no budget, evicting sink-recent when full.
    pub fn uniform(k_type: CacheType, v_type: CacheType) -> Self {
        CachePolicy {
            k_type,
            v_type,
            types: CacheTypes::Uniform,
            recent: None,
            budget: None,
            eviction: EvictionPolicy::SinkRecent { sinks: 4 },
            profile: None,
        }
    }

    /// Whether anything but uniform types and a budget that escalates is asked for (what only text
    /// models' caches can take).
    pub fn is_per_layer(&self) -> bool {
        self.types != CacheTypes::Uniform || self.recent.is_some() || self.budget.is_some_and(|b| b.strategy == MemoryStrategy::Plan)
    }

    /// Refuses a policy that cannot be carried out: a plan without a profile, a budget plan without a budget.
    pub fn check(&self) -> Result<()> {
        let plans = matches!(self.types, CacheTypes::Planned { .. } | CacheTypes::PlannedForBudget)
            || self.budget.is_some_and(|b| b.strategy == MemoryStrategy::Plan);
        if plans && self.profile.is_none() {
            return Err(Error::NeedsProfile);
        }
        if self.types == CacheTypes::PlannedForBudget && self.budget.is_none() {
            return Err(Error::Input("a plan for the memory budget needs a budget (or a bits-per-element target)".into()));
        }
        if let CacheTypes::Planned { bits } = self.types {
            if !(bits.is_finite() && bits > 0.0) {
                return Err(Error::Input(format!("{bits} bits per element is not a budget")));
            }
        }
        Ok(())
    }

    fn profile(&self) -> Result<&SensitivityProfile> {
        self.profile.as_ref().ok_or(Error::NeedsProfile)
    }

    /// The planner's layout for a cache like `shape` at `bits` (choosing the window too unless fixed).
    fn plan_at_bits(&self, shape: &KvCacheConfig, bits: f64) -> Result<KvPlan> {
        let planner = if self.recent.is_some() { kv_plan::plan } else { kv_plan::plan_with_window };
        planner(self.profile()?, shape, &[], PlanBudget::BitsPerElement(bits))
    }

    /// Gives a freshly made text model's cache the policy: the recent window, the layout (or plan), then
    /// the budget; a full cache then evicts by the policy when a budget or a plan's capacity asks for it.
    pub fn apply(&self, model: &mut GGMLModel) -> Result<CacheSetup> {
        self.check()?;
        let mut setup = CacheSetup::default();
        if let Some(cells) = self.recent {
            let capacity = model.cache().capacity();
            if cells > capacity {
                return Err(Error::Input(format!("a recent window of {cells} cells exceeds the cache's {capacity}")));
            }
            model.set_kv_recent(cells)?;
        }
        match &self.types {
            CacheTypes::Uniform | CacheTypes::PlannedForBudget => {}
            CacheTypes::Layout(spec) => {
                let layout = KvLayout::parse(spec, model.cache().config().n_layer).map_err(Error::Input)?;
                model.quantize_kv_layout(layout)?;
            }
            CacheTypes::Planned { bits } => {
                let plan = self.plan_at_bits(model.cache().config(), *bits)?;
                let cells = model.cache().capacity();
                model.apply_kv_plan(&plan, self.eviction)?;
                if plan.capacity < cells {
                    // Below the smallest layout the plan keeps fewer cells: a full cache evicts.
                    model.set_eviction(Some(self.eviction));
                }
                setup.plan = Some(plan);
            }
        }
        if let Some(budget) = self.budget {
            let report = match budget.strategy {
                MemoryStrategy::Plan => model.optimize_memory_planned(budget.bytes, self.eviction, self.profile()?)?,
                MemoryStrategy::Escalate => model.optimize_memory(budget.bytes, self.eviction)?,
            };
            model.set_eviction(Some(self.eviction));
            if report.plan.is_some() {
                setup.plan = report.plan.clone();
            }
            setup.memory = Some(report);
        }
        Ok(setup)
    }

    /// `apply` for a model whose caches take uniform types only (CSM): the budget, escalating.
    pub fn apply_budget(&self, model: &mut impl Model) -> Result<Option<MemoryReport>> {
        if self.is_per_layer() {
            return Err(Error::TextModelsOnly { what: "per-layer cache types, planned budgets and recent windows" });
        }
        let Some(budget) = self.budget else { return Ok(None) };
        let report = model.optimize_memory(budget.bytes, self.eviction)?;
        model.set_eviction(Some(self.eviction));
        Ok(Some(report))
    }

    /// The layouts sessions with caches shaped like `shape` are admitted at: the configured layout
    /// (uniform, the spec, or planned at its bits), then per `ESCALATION` type the planner's layout of
    /// that type's bits (with a profile) or the uniform type.
    pub fn session_layouts(&self, shape: &KvCacheConfig) -> Result<SessionLayouts> {
        self.check()?;
        let n_layer = shape.n_layer;
        let chosen = match self.types {
            CacheTypes::Planned { bits } => Some(self.plan_at_bits(shape, bits)?),
            _ => None,
        };
        let recent = chosen.as_ref().map_or(self.recent.unwrap_or(0), |p| p.recent);
        let windowed = shape.clone().with_recent(recent);
        let planned = |bits: f64| -> Result<Option<KvLayout>> {
            match &self.profile {
                Some(profile) => Ok(Some(kv_plan::plan(profile, &windowed, &[], PlanBudget::BitsPerElement(bits))?.layout)),
                None => Ok(None),
            }
        };
        let configured = match (&self.types, chosen) {
            (CacheTypes::Layout(spec), _) => KvLayout::parse(spec, n_layer).map_err(Error::Input)?,
            (_, Some(plan)) => plan.layout,
            _ => KvLayout::uniform(n_layer, self.k_type, self.v_type),
        };
        let mut fallbacks = Vec::new();
        for t in ESCALATION {
            fallbacks.push(planned(t.dtype().bits_per_element())?.unwrap_or_else(|| KvLayout::uniform(n_layer, t, t)));
        }
        Ok(SessionLayouts { configured, fallbacks, recent })
    }
}
