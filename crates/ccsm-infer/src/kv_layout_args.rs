//! Per-layer cache types on the command line: `--kv-layout SPEC`, and the planner (`--kv-plan auto`
//! with `--kv-profile`/the GGUF's profile and `--kv-bits` or `--max-memory-mb`).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use ccsm::kv_cache::{KvCacheConfig, KvLayout};
use ccsm::kv_plan::{self, KvPlan, PlanBudget, SensitivityProfile};
use ccsm::memory::MemoryReport;
use ccsm::{GGMLModel, Model};

use crate::cli::MemoryArgs;
use crate::UsageError;

/// How per-layer types are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanMode {
    /// The planner picks each layer's K and V types from the sensitivity profile.
    Auto,
}

/// Which memory optimizer strategy a budget runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MemoryStrategyArg {
    /// The seed's thresholds: resize, then q8_0, then q4_0 and prune.
    Seed,
    /// The planner: per-layer types of least predicted KLD within the budget (needs a profile).
    Plan,
}

#[derive(Args, Clone, Debug, Default)]
pub struct KvLayoutArgs {
    /// Per-layer K/V types (text models): comma-separated LAYERS:TYPES, LAYERS = `i`, `i-j` or `*`
    /// (the rest), TYPES = `k/v` or one type for both; e.g. `0:q8_0,1-3:q5_1/q5_0,*:iq4_nl`.
    /// Overrides --kv-quant/--ctk/--ctv.
    #[arg(long, value_name = "SPEC", conflicts_with = "kv_plan")]
    pub kv_layout: Option<String>,

    /// `auto`: the planner picks per-layer types from a sensitivity profile (`ccsm-infer calibrate`)
    /// to fit --kv-bits or --max-memory-mb with the least predicted KL divergence.
    #[arg(long, value_name = "PLAN", value_enum)]
    pub kv_plan: Option<PlanMode>,

    /// The sensitivity profile for --kv-plan (default: the one stored in the model's metadata).
    #[arg(long, value_name = "FILE")]
    pub kv_profile: Option<PathBuf>,

    /// --kv-plan's budget as mean bits per cached element (q4_0 = 4.5, q8_0 = 8.5, f16 = 16), the
    /// recent window included.
    #[arg(long, value_name = "B")]
    pub kv_bits: Option<f64>,

    /// Text models: keep each query's newest N cells also in f16 (KIVI's residual window) and read
    /// older ones in the cache's type. Costs N f16 rows per layer and half, counted in every budget.
    /// Without it, --kv-plan auto --kv-bits chooses the window too (none, or one the profile measured).
    #[arg(long, value_name = "N")]
    pub kv_recent: Option<usize>,
}

/// What the cache options did to a text model.
#[derive(Default)]
pub struct TextCacheSetup {
    pub plan: Option<KvPlan>,
    pub memory: Option<MemoryReport>,
}

impl KvLayoutArgs {
    /// Whether any per-layer option was given (speech models refuse them).
    pub fn any(&self) -> bool {
        self.kv_layout.is_some() || self.kv_plan.is_some() || self.kv_profile.is_some() || self.kv_bits.is_some()
    }

    /// Whether any option for text caches only was given (per-layer types or the recent window).
    pub fn any_text_only(&self) -> bool {
        self.any() || self.kv_recent.is_some()
    }

    /// Gives the model's cache the --kv-recent window (before planning: budgets count it).
    pub fn apply_recent(&self, model: &mut GGMLModel) -> Result<()> {
        let Some(cells) = self.kv_recent else { return Ok(()) };
        let capacity = model.cache().capacity();
        if cells > capacity {
            return Err(UsageError(format!("--kv-recent {cells} exceeds the cache's {capacity} cells (-c)")).into());
        }
        Ok(model.set_kv_recent(cells)?)
    }

    /// The profile --kv-plan plans with: --kv-profile's, else the model file's.
    pub fn profile(&self, model_path: &Path) -> Result<SensitivityProfile> {
        if let Some(path) = &self.kv_profile {
            return Ok(SensitivityProfile::load(path)?);
        }
        SensitivityProfile::from_gguf(model_path)?.ok_or_else(|| {
            UsageError(format!(
                "--kv-plan auto: {} has no KV profile in its metadata (`{}`); make one with `ccsm-infer calibrate` and pass --kv-profile",
                model_path.display(),
                kv_plan::GGUF_KEY
            ))
            .into()
        })
    }

    /// The layout --kv-layout names or --kv-plan auto --kv-bits plans for a cache like `config` (None:
    /// neither given, or the plan waits for a memory budget).
    pub fn fixed_layout(&self, model_path: &Path, config: &KvCacheConfig) -> Result<Option<(KvLayout, Option<KvPlan>)>> {
        if self.kv_plan.is_none() && self.kv_bits.is_some() {
            return Err(UsageError("--kv-bits goes with --kv-plan auto".into()).into());
        }
        if let Some(spec) = &self.kv_layout {
            let layout = KvLayout::parse(spec, config.n_layer).map_err(|e| UsageError(format!("--kv-layout: {e}")))?;
            return Ok(Some((layout, None)));
        }
        let Some(bits) = self.kv_bits.filter(|_| self.kv_plan.is_some()) else { return Ok(None) };
        let profile = self.profile(model_path)?;
        // Without --kv-recent the planner also chooses the window (none, or one the profile measured).
        let planner = if self.kv_recent.is_some() { kv_plan::plan } else { kv_plan::plan_with_window };
        let plan =
            planner(&profile, config, &[], PlanBudget::BitsPerElement(bits)).map_err(|e| UsageError(format!("--kv-bits {bits}: {e}")))?;
        Ok(Some((plan.layout.clone(), Some(plan))))
    }

    /// Applies --kv-layout / --kv-plan and the memory budget to a freshly made text model.
    pub fn apply_text(&self, model: &mut GGMLModel, model_path: &Path, memory: &MemoryArgs, quiet: bool) -> Result<TextCacheSetup> {
        if self.kv_profile.is_some() && self.kv_plan.is_none() && memory.memory_strategy != Some(MemoryStrategyArg::Plan) {
            return Err(UsageError("--kv-profile goes with --kv-plan auto or --memory-strategy plan".into()).into());
        }
        self.apply_recent(model)?;
        let mut setup = TextCacheSetup::default();
        if let Some((layout, plan)) = self.fixed_layout(model_path, model.cache().config())? {
            match &plan {
                Some(p) => {
                    let cells = model.cache().capacity();
                    model.apply_kv_plan(p, memory.policy())?;
                    if p.capacity < cells {
                        // Below the smallest layout the plan keeps fewer cells: a full cache evicts.
                        model.set_eviction(Some(memory.policy()));
                    }
                    if !quiet {
                        eprintln!(
                            "KV plan: {}{} ({:.3} bits per element, {} of {cells} cells, predicted KLD {:.5})",
                            p.spec,
                            if p.recent > 0 { format!(" + the newest {} cells in f16", p.recent) } else { String::new() },
                            p.bits_per_element,
                            p.capacity,
                            p.predicted_kld
                        );
                    }
                }
                None => {
                    model.quantize_kv_layout(layout)?;
                }
            }
            setup.plan = plan;
        }
        // --kv-bits fixes the types; a budget beside it then runs the seed's strategy (unless asked).
        let planned_budget = self.kv_plan.is_some() && self.kv_bits.is_none();
        let strategy = memory.memory_strategy.unwrap_or(if planned_budget { MemoryStrategyArg::Plan } else { MemoryStrategyArg::Seed });
        let profile = if strategy == MemoryStrategyArg::Plan { Some(self.profile(model_path)?) } else { None };
        match (&profile, memory.max_memory_mb, strategy) {
            (Some(profile), Some(mb), MemoryStrategyArg::Plan) => {
                let report = model.optimize_memory_planned((mb as usize) << 20, memory.policy(), profile)?;
                model.set_eviction(Some(memory.policy()));
                if !quiet {
                    eprintln!("KV budget {mb} MiB, plan strategy: {}; cache now {} bytes", report.actions.join("; "), report.bytes_after());
                }
                setup.plan = report.plan.clone();
                setup.memory = Some(report);
            }
            (_, None, _) if self.kv_plan.is_some() && self.kv_bits.is_none() => {
                return Err(UsageError("--kv-plan auto needs a budget: --kv-bits B or --max-memory-mb N".into()).into());
            }
            _ => setup.memory = memory.apply(model, quiet)?,
        }
        Ok(setup)
    }
}

/// The cache layout for JSON reports: uniform types, or null and the per-layer list; bits per element
/// over every cell, the recent window's rings included.
pub fn layout_json(cache: &ccsm::kv_cache::KvCache) -> Value {
    let c = cache.config();
    let uniform = c.uniform_types();
    let layout = cache.layout();
    let elements = (2 * c.n_layer * c.head_dim * c.n_head_kv * c.capacity) as f64;
    json!({
        "k_type": uniform.map(|t| t.k),
        "v_type": uniform.map(|t| t.v),
        "layout": layout.to_string(),
        "layers": if uniform.is_some() { Value::Null } else { serde_json::to_value(&layout).unwrap_or(Value::Null) },
        "bits_per_element": cache.memory_usage() as f64 * 8.0 / elements,
        "recent_cells": cache.recent_cells(),
    })
}
