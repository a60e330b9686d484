//! `ccsm-infer info`: what a model file holds and what its KV caches cost per cache type.

use anyhow::{Context, Result};
use serde_json::json;

use ccsm::csm::CsmConfig;
use ccsm::kv_cache::KvCacheConfig;
use ccsm::llama::LlamaConfig;
use ccsm::CacheType;
use ggml::gguf::GgufFile;
use ggml::RopeMode;

use crate::cli::InfoArgs;
use crate::generate_cmd::DEFAULT_CTX_CAP;
use crate::output;

/// The caches a model runs with: (name, stack, cells).
fn caches(file: &GgufFile, ctx: Option<usize>) -> Result<(String, Vec<(&'static str, LlamaConfig, usize)>)> {
    let arch: String = file.get("general.architecture")?;
    Ok(match arch.as_str() {
        "csm" => {
            let c = CsmConfig::from_gguf(file)?;
            let cells = ctx.unwrap_or(c.backbone.n_ctx_train.min(DEFAULT_CTX_CAP));
            (arch, vec![("backbone", c.backbone.clone(), cells), ("decoder", c.decoder.clone(), c.n_codebooks)])
        }
        "llama" => {
            let c = LlamaConfig::from_gguf(file, "llama", RopeMode::Normal)?;
            let cells = ctx.unwrap_or(c.n_ctx_train.min(DEFAULT_CTX_CAP));
            (arch, vec![("text", c, cells)])
        }
        other => anyhow::bail!("architecture `{other}` is not supported (llama, csm)"),
    })
}

/// KV bytes of one cache, sized by the same code that allocates caches.
pub fn kv_bytes(stack: &LlamaConfig, cells: usize, k: CacheType, v: CacheType) -> Result<usize> {
    let config = KvCacheConfig {
        n_layer: stack.n_layer,
        head_dim: stack.head_dim,
        n_head_kv: stack.n_head_kv,
        capacity: cells,
        k_type: k,
        v_type: v,
    };
    Ok(config.bytes()?)
}

pub fn run(args: &InfoArgs) -> Result<()> {
    let file = GgufFile::open(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let (arch, caches) = caches(&file, args.ctx_size.map(|c| c as usize))?;
    let weight_bytes: u64 = file.tensors().iter().map(|t| t.size).sum();
    let params: u64 = file.tensors().iter().map(|t| t.nelements() as u64).sum();
    let name = file.get_opt::<String>("general.name")?.unwrap_or_default();
    let mut per_type = Vec::new();
    for t in CacheType::ALL {
        let mut entry = json!({ "type": t, "bits_per_element": t.dtype().bits_per_element() });
        let mut total = 0;
        for (cache, stack, cells) in &caches {
            match kv_bytes(stack, *cells, t, t) {
                Ok(b) => {
                    entry[*cache] = json!(b);
                    total += b;
                }
                Err(e) => entry[*cache] = json!(format!("refused: {e}")),
            }
        }
        entry["total"] = json!(total);
        per_type.push(entry);
    }
    let cache_info: Vec<_> = caches
        .iter()
        .map(|(cache, s, cells)| json!({ "cache": cache, "cells": cells, "layers": s.n_layer, "kv_heads": s.n_head_kv, "head_dim": s.head_dim }))
        .collect();
    if args.json {
        let v = json!({
            "model": args.model.display().to_string(),
            "name": name,
            "architecture": arch,
            "params": params,
            "weight_bytes": weight_bytes,
            "tensors": file.tensors().len(),
            "caches": cache_info,
            "kv_bytes": per_type,
        });
        output::println(&v.to_string());
        return Ok(());
    }
    output::println(&format!(
        "{} ({arch}): {} tensors, {:.2} M parameters, {:.2} MiB of weights",
        name,
        file.tensors().len(),
        params as f64 / 1e6,
        weight_bytes as f64 / 1048576.0
    ));
    for (cache, s, cells) in &caches {
        output::println(&format!(
            "{cache} cache: {cells} cells × {} layers × {} KV heads × head dim {}",
            s.n_layer, s.n_head_kv, s.head_dim
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
