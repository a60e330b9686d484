//! `ccsm-infer info`: what a model file holds and what its KV caches cost per cache type. The file is
//! checked as loading checks it: a file that would not load is reported, exit 1.

use anyhow::{Context, Result};
use serde_json::json;

use ccsm::CacheType;

use crate::cli::InfoArgs;
use crate::output;

pub fn run(args: &InfoArgs) -> Result<()> {
    let facts =
        ccsm::inspect(&args.model, args.ctx_size.map(|c| c as usize)).with_context(|| format!("loading {}", args.model.display()))?;
    let mut per_type = Vec::new();
    for t in CacheType::ALL {
        let mut entry = json!({ "type": t, "bits_per_element": t.dtype().bits_per_element() });
        let mut total = 0;
        for cache in &facts.caches {
            match cache.config(t, t).bytes() {
                Ok(b) => {
                    entry[cache.role.name()] = json!(b);
                    total += b;
                }
                Err(e) => entry[cache.role.name()] = json!(format!("refused: {e}")),
            }
        }
        entry["total"] = json!(total);
        per_type.push(entry);
    }
    // A device's memory against the weights and each type's caches (all of them on the device).
    let device = match &args.device {
        Some(spec) => {
            let placement = ccsm::Placement::parse(spec).map_err(|e| crate::UsageError(e.to_string()))?;
            placement.device_memory().map(|(free, total)| {
                // A type fits when every cache of it is one the device attends over and all of them
                // fit beside the weights.
                let fits: Vec<_> = CacheType::ALL
                    .iter()
                    .zip(&per_type)
                    .filter(|(&t, e)| {
                        e["total"].as_u64().is_some_and(|b| facts.weight_bytes + b <= free as u64)
                            && facts.caches.iter().all(|c| placement.check_cache(&c.config(t, t)).is_ok())
                    })
                    .map(|(t, _)| json!(t))
                    .collect();
                json!({ "name": placement.name(), "free_bytes": free, "total_bytes": total, "weight_bytes": facts.weight_bytes, "cache_types_that_fit": fits })
            })
        }
        None => None,
    };
    let cache_info: Vec<_> = facts
        .caches
        .iter()
        .map(|c| json!({ "cache": c.role, "cells": c.cells, "layers": c.n_layer, "kv_heads": c.n_head_kv, "head_dim": c.head_dim }))
        .collect();
    if args.json {
        let v = json!({
            "model": args.model.display().to_string(),
            "name": facts.name,
            "architecture": facts.architecture,
            "params": facts.params,
            "weight_bytes": facts.weight_bytes,
            "tensors": facts.tensors,
            "caches": cache_info,
            "kv_bytes": per_type,
            "device": device,
        });
        output::println(&v.to_string());
        return Ok(());
    }
    let arch = serde_json::to_value(facts.architecture)?;
    output::println(&format!(
        "{} ({}): {} tensors, {:.2} M parameters, {:.2} MiB of weights",
        facts.name,
        arch.as_str().unwrap_or_default(),
        facts.tensors,
        facts.params as f64 / 1e6,
        facts.weight_bytes as f64 / 1048576.0
    ));
    for c in &facts.caches {
        output::println(&format!(
            "{} cache: {} cells × {} layers × {} KV heads × head dim {}",
            c.role, c.cells, c.n_layer, c.n_head_kv, c.head_dim
        ));
    }
    if let Some(d) = &device {
        let mib = |k: &str| d[k].as_u64().unwrap_or(0) as f64 / 1048576.0;
        let fits: Vec<&str> = d["cache_types_that_fit"].as_array().into_iter().flatten().filter_map(|t| t.as_str()).collect();
        output::println(&format!(
            "device {}: {:.1} MiB free of {:.1} MiB; weights {:.2} MiB; cache types it attends over that fit beside them: {}",
            d["name"].as_str().unwrap_or(""),
            mib("free_bytes"),
            mib("total_bytes"),
            mib("weight_bytes"),
            if fits.is_empty() { "none".to_string() } else { fits.join(" ") }
        ));
    }
    output::println("| cache type | bits/element | KV bytes | MiB |");
    output::println("| --- | ---: | ---: | ---: |");
    for e in &per_type {
        let total = e["total"].as_u64().unwrap_or(0);
        output::println(&format!(
            "| {} | {:.4} | {total} | {:.2} |",
            e["type"].as_str().unwrap_or(""),
            e["bits_per_element"].as_f64().unwrap_or(0.0),
            total as f64 / 1048576.0
        ));
    }
    Ok(())
}
