//! `ccsm-infer serve`: the HTTP server (crate `ccsm-server`) from the command line.

use anyhow::Result;
use ccsm::kv_cache::Rotation;
use ccsm::CacheType;
use ccsm_server::ServeConfig;

use crate::cli::ServeArgs;
use crate::UsageError;

pub fn run(args: &ServeArgs) -> Result<()> {
    if args.cache.kv_rotation != Rotation::default() {
        return Err(
            UsageError("serve stores quantized rows rotated (the default); --kv-rotation is for generation and bench".into()).into()
        );
    }
    let layers = &args.cache.layers;
    if layers.kv_plan.is_none() && (layers.kv_bits.is_some() || layers.kv_profile.is_some()) {
        return Err(UsageError("--kv-bits and --kv-profile go with --kv-plan auto".into()).into());
    }
    let mut api_keys = args.api_keys.clone();
    if let Ok(keys) = std::env::var("CCSM_API_KEY") {
        api_keys.extend(keys.split(',').map(str::trim).filter(|k| !k.is_empty()).map(str::to_owned));
    }
    if api_keys.iter().any(|k| k.is_empty()) {
        return Err(UsageError("--api-key must not be empty".into()).into());
    }
    let config = ServeConfig {
        model: args.model.clone(),
        codec: args.codec.clone(),
        host: args.host.clone(),
        port: args.port,
        parallel: args.parallel as usize,
        max_memory_bytes: args.max_memory_mb.map(|mb| mb as usize * (1 << 20)),
        api_keys,
        voices: args.voices.clone(),
        k_type: args.cache.k_type(CacheType::F16),
        v_type: args.cache.v_type(CacheType::F16),
        adapt: !args.no_adapt,
        n_ctx: args.ctx_size.map(|c| c as usize),
        n_threads: args.threads as usize,
        n_batch: args.batch_size as usize,
        max_queue: args.max_queue as usize,
        kv_layout: args.cache.layers.kv_layout.clone(),
        kv_profile: if args.cache.layers.kv_plan.is_some() { Some(args.cache.layers.profile(&args.model)?) } else { None },
        kv_bits: args.cache.layers.kv_bits,
        kv_recent: args.cache.layers.kv_recent,
    };
    ccsm_server::serve(config)
}
