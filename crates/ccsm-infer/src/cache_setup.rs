//! The cache flags parsed into the library's `CachePolicy` (flag combinations that make no sense are
//! usage errors, exit 2), applied with the library's own code, and reported.

use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};

use ccsm::kv_cache::KvLayout;
use ccsm::kv_plan::{self, SensitivityProfile};
use ccsm::memory::{CachePolicy, CacheSetup, CacheTypes, MemoryBudget, MemoryReport, MemoryStrategy};
use ccsm::{CacheType, GGMLModel, Model};

use crate::args::{CacheArgs, KvLayoutArgs, MemoryArgs, MemoryStrategyArg};
use crate::UsageError;

impl KvLayoutArgs {
    /// Whether any per-layer option was given (speech models refuse them).
    pub fn any(&self) -> bool {
        self.kv_layout.is_some() || self.kv_plan.is_some() || self.kv_profile.is_some() || self.kv_bits.is_some()
    }

    /// Whether any option for text caches only was given (per-layer types or the recent window).
    pub fn any_text_only(&self) -> bool {
        self.any() || self.kv_recent.is_some()
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

    /// How the flags choose per-layer types (the cache's own K/V types when none is given).
    pub fn types(&self) -> Result<CacheTypes> {
        if self.kv_plan.is_none() && self.kv_bits.is_some() {
            return Err(UsageError("--kv-bits goes with --kv-plan auto".into()).into());
        }
        Ok(match (&self.kv_layout, self.kv_plan, self.kv_bits) {
            (Some(spec), _, _) => CacheTypes::Layout(spec.clone()),
            (None, Some(_), Some(bits)) => CacheTypes::Planned { bits },
            (None, Some(_), None) => CacheTypes::PlannedForBudget,
            (None, None, _) => CacheTypes::Uniform,
        })
    }
}

impl CacheArgs {
    /// The policy of a run's own caches: these flags with `memory`'s budget (types default to `default`).
    pub fn policy(&self, memory: &MemoryArgs, model_path: &Path, default: CacheType) -> Result<CachePolicy> {
        let layers = &self.layers;
        if layers.kv_profile.is_some() && layers.kv_plan.is_none() && memory.memory_strategy != Some(MemoryStrategyArg::Plan) {
            return Err(UsageError("--kv-profile goes with --kv-plan auto or --memory-strategy plan".into()).into());
        }
        let types = layers.types()?;
        // The profile first: without one no plan can run, whatever the budget.
        let wants_profile = layers.kv_plan.is_some() || memory.memory_strategy == Some(MemoryStrategyArg::Plan);
        let profile = if wants_profile { Some(layers.profile(model_path)?) } else { None };
        if types == CacheTypes::PlannedForBudget && memory.max_memory_mb.is_none() {
            return Err(UsageError("--kv-plan auto needs a budget: --kv-bits B or --max-memory-mb N".into()).into());
        }
        // --kv-bits fixes the types; a budget beside it then escalates (unless asked otherwise).
        let strategy = match memory.memory_strategy {
            Some(MemoryStrategyArg::Plan) => MemoryStrategy::Plan,
            Some(MemoryStrategyArg::Escalate) => MemoryStrategy::Escalate,
            None if types == CacheTypes::PlannedForBudget => MemoryStrategy::Plan,
            None => MemoryStrategy::Escalate,
        };
        Ok(CachePolicy {
            k_type: self.k_type(default),
            v_type: self.v_type(default),
            types,
            recent: layers.kv_recent,
            budget: memory.max_memory_mb.map(|mb| MemoryBudget { bytes: (mb as usize) << 20, strategy }),
            eviction: memory.policy(),
            profile,
        })
    }
}

/// Applies `policy` to a freshly made text model, saying what it did on stderr (unless `quiet`).
/// A layout spec or window the model cannot take is a usage error.
pub fn apply_text(policy: &CachePolicy, model: &mut GGMLModel, quiet: bool) -> Result<CacheSetup> {
    if let CacheTypes::Layout(spec) = &policy.types {
        KvLayout::parse(spec, model.cache().config().n_layer).map_err(|e| UsageError(format!("--kv-layout: {e}")))?;
    }
    if let Some(cells) = policy.recent {
        let capacity = model.cache().capacity();
        if cells > capacity {
            return Err(UsageError(format!("--kv-recent {cells} exceeds the cache's {capacity} cells (-c)")).into());
        }
    }
    let cells = model.cache().capacity();
    let setup = policy.apply(model).map_err(|e| match &policy.types {
        CacheTypes::Planned { bits } => anyhow::Error::from(UsageError(format!("--kv-bits {bits}: {e}"))),
        _ => e.into(),
    })?;
    if !quiet {
        if let (Some(p), None) = (&setup.plan, &setup.memory) {
            eprintln!(
                "KV plan: {}{} ({:.3} bits per element, {} of {cells} cells, predicted KLD {:.5})",
                p.spec,
                if p.recent > 0 { format!(" + the newest {} cells in f16", p.recent) } else { String::new() },
                p.bits_per_element,
                p.capacity,
                p.predicted_kld
            );
        }
        if let Some(report) = &setup.memory {
            log_budget(report);
        }
    }
    Ok(setup)
}

/// Applies `policy`'s budget to a model of uniform caches (CSM), saying what it did.
pub fn apply_budget(policy: &CachePolicy, model: &mut impl Model, quiet: bool) -> Result<Option<MemoryReport>> {
    let report = policy.apply_budget(model)?;
    if let (Some(report), false) = (&report, quiet) {
        log_budget(report);
    }
    Ok(report)
}

/// One stderr line per converted cache.
pub fn log_conversion(reports: &[ccsm::CacheReport], after: usize, unit: &str) {
    for r in reports {
        eprintln!(
            "converted the {} KV cache after {after} {unit}: {} -> {} bytes (peak {} during the conversion)",
            r.cache, r.report.bytes_before, r.report.bytes_after, r.report.peak_bytes
        );
    }
}

fn log_budget(report: &MemoryReport) {
    let mb = report.budget_bytes >> 20;
    let actions = report.actions.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    eprintln!(
        "KV budget {mb} MiB: r = {:.3}, {:?}{}; caches now {} bytes",
        report.ratio,
        report.strategy,
        if actions.is_empty() { String::new() } else { format!(" ({actions})") },
        report.bytes_after()
    );
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
