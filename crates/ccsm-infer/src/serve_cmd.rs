//! `ccsm-infer serve`: the HTTP server (crate `ccsm-server`) from the command line.

use anyhow::Result;
use ccsm::kv_cache::Rotation;
use ccsm::CacheType;
use std::time::Duration;

use ccsm_server::{ConnectionLimits, ServeConfig};

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
    for key in &api_keys {
        ccsm_server::check_api_key(key).map_err(|e| UsageError(format!("--api-key: {e}")))?;
    }
    // Set means keys are wanted: a blank entry is a mistake, not a request for an open server.
    if let Some(keys) = std::env::var_os("CCSM_API_KEY") {
        let keys = keys.into_string().map_err(|_| UsageError("CCSM_API_KEY is not UTF-8".into()))?;
        for key in keys.split(',').map(str::trim) {
            ccsm_server::check_api_key(key)
                .map_err(|e| UsageError(format!("CCSM_API_KEY: {e}; give the keys comma-separated, or unset it to serve without keys")))?;
            api_keys.push(key.to_owned());
        }
    }
    let seconds = Duration::from_secs_f64;
    let limits = ConnectionLimits {
        header_timeout: seconds(args.header_timeout),
        idle_timeout: seconds(args.idle_timeout),
        max_connections: ccsm_server::connections_within_files(args.max_connections as usize),
        shutdown_timeout: seconds(args.shutdown_timeout),
    };
    if limits.max_connections < args.max_connections as usize {
        tracing::warn!(
            "--max-connections {} lowered to {}: the open-files limit (ulimit -n) is {}",
            args.max_connections,
            limits.max_connections,
            ccsm_server::open_files_limit().unwrap_or_default()
        );
    }
    let config = ServeConfig {
        model: args.model.clone(),
        codec: args.codec.clone(),
        host: args.host.clone(),
        port: args.port,
        parallel: args.parallel as usize,
        max_memory_bytes: args.max_memory_mb.map(|mb| mb as usize * (1 << 20)),
        api_keys,
        allowed_hosts: args.allowed_hosts.clone(),
        limits,
        body_timeout: seconds(args.body_timeout),
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
