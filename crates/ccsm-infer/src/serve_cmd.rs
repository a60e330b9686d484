//! `ccsm-infer serve`: the HTTP server (crate `ccsm-server`) from the command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use ccsm::kv_cache::Rotation;
use ccsm::memory::{CachePolicy, CacheTypes, MemoryBudget, MemoryStrategy};
use ccsm::CacheType;
use clap::Args;

use ccsm_server::{ConnectionLimits, PrefixOptions, ServeConfig};

use crate::args::{default_threads, CacheArgs};
use crate::UsageError;

/// `ccsm-infer serve`'s flags.
#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Model file (GGUF): a CSM model (speech) or a Llama model (text). One model per server.
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,

    /// The Mimi codec for a CSM model without one embedded.
    #[arg(long, value_name = "FILE")]
    pub codec: Option<PathBuf>,

    /// Address to listen on (loopback unless told otherwise). Beyond loopback without an API key, the
    /// server warns that anyone who can reach it can use it.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// On a loopback address, also answer requests addressed (Host header) to NAME; repeatable; `*`
    /// answers any. Without it a loopback server answers only localhost, 127.0.0.1 and `[::1]`, so a web
    /// page cannot reach it through DNS rebinding. On other addresses, limits the names when given.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,

    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// Sessions generating at once (their steps are batched into one graph).
    #[arg(long, visible_alias = "np", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parallel: u32,

    /// KV cache bytes all sessions and cached prefixes share, in MiB [default: --parallel sessions of a
    /// full context, and one more for cached prefixes; on a device at most 80 % of its free memory].
    #[arg(long, value_name = "MB", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_memory_mb: Option<u32>,

    /// Prompt prefixes are not cached: every request prefills its whole prompt. By default a request
    /// starts from the longest cached prefix of its prompt (a system prompt, a chat so far, a voice)
    /// and finished requests' rows are cached, inside --max-memory-mb, evicted first under pressure.
    #[arg(long)]
    pub no_prefix_cache: bool,

    /// The type cached prefixes are stored in (f16, q8_0, q4_0, ...) [default: each session's own
    /// types; a smaller type keeps more prefixes in the budget, at that type's accuracy].
    #[arg(long, value_name = "TYPE")]
    pub prefix_cache_type: Option<CacheType>,

    /// A folder cached prefixes are written to (one GGUF each) and loaded from at start-up, so voices
    /// and conversations stay warm across restarts. Files of another model, altered or truncated are
    /// refused with a reason and left alone.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// How long a speech conversation ("conversation": ID in a request) is kept after its last turn.
    #[arg(long, value_name = "SECS", default_value_t = 600.0, value_parser = positive_seconds)]
    pub conversation_ttl: f64,

    /// Admit sessions only at the cache types given; without this, a session that does not fit the
    /// memory left starts with q8_0 or q4_0 caches instead of waiting.
    #[arg(long)]
    pub no_adapt: bool,

    /// Requests that may wait for admission (arrivals not yet given a session count); past that, new
    /// ones get 429 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queue: u32,

    /// API key clients must send (Authorization: Bearer KEY); repeat for several. Also read from
    /// CCSM_API_KEY (comma-separated; set but empty or blank is refused, as an empty --api-key is).
    /// Without any, the server is open. /health never asks.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,

    /// Seconds a request's head (request line and headers) may take to arrive from its first byte.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = positive_seconds)]
    pub header_timeout: f64,

    /// Seconds a request's body may take to arrive (408 past it).
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = positive_seconds)]
    pub body_timeout: f64,

    /// Seconds a connection with no request under way (kept alive, or never used) stays open.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = positive_seconds)]
    pub idle_timeout: f64,

    /// Seconds a connection may go without the client taking any of its pending output (it stopped
    /// reading) before it is closed and its request cancelled.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = positive_seconds)]
    pub write_timeout: f64,

    /// Connections open at once (at most the open-files limit less 32). When all are taken, idle ones
    /// are closed to let new ones in.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Seconds running requests have to finish after Ctrl-C or SIGTERM; then they are cancelled and the
    /// server exits. Connections with no request under way close at once; a second signal stops at once.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = non_negative_seconds)]
    pub shutdown_timeout: f64,

    /// Folder of voices: NAME.json = {"speaker": N, "context": [{"speaker", "text", "frames"}]}.
    #[arg(long, value_name = "DIR")]
    pub voices: Option<PathBuf>,

    /// Cache cells one session may use (prompt plus output) [default: the model's context, at most 4096].
    #[arg(short = 'c', long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub ctx_size: Option<u32>,

    #[arg(short = 't', long, default_value_t = default_threads(), value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,

    /// Where the model runs: `cpu`, or `vulkan` / `vulkan:N` (a build with `--features vulkan`). On a
    /// device the weights, KV caches and graphs live in its memory, and the default budget is at most
    /// 80 % of what it has free once the weights are in.
    #[arg(long, default_value = "cpu", value_name = "cpu|vulkan[:N]")]
    pub device: String,

    /// Most rows one engine step runs (prompts are fed in chunks within it).
    #[arg(short = 'b', long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,

    #[command(flatten)]
    pub cache: CacheArgs,
}

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
        write_timeout: seconds(args.write_timeout),
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
    // Sessions are planned at --kv-bits when given; with a profile, admitted under pressure at the
    // planner's layouts of q8_0's and q4_0's bytes. The budget is every session's together.
    let types = match layers.types()? {
        CacheTypes::PlannedForBudget => CacheTypes::Uniform,
        types => types,
    };
    let cache = CachePolicy {
        types,
        recent: layers.kv_recent,
        budget: args.max_memory_mb.map(|mb| MemoryBudget { bytes: mb as usize * (1 << 20), strategy: MemoryStrategy::Escalate }),
        profile: if layers.kv_plan.is_some() { Some(layers.profile(&args.model)?) } else { None },
        ..CachePolicy::uniform(args.cache.k_type(CacheType::F16), args.cache.v_type(CacheType::F16))
    };
    let config = ServeConfig {
        model: args.model.clone(),
        codec: args.codec.clone(),
        host: args.host.clone(),
        port: args.port,
        parallel: args.parallel as usize,
        api_keys,
        allowed_hosts: args.allowed_hosts.clone(),
        limits,
        body_timeout: seconds(args.body_timeout),
        voices: args.voices.clone(),
        cache,
        adapt: !args.no_adapt,
        n_ctx: args.ctx_size.map(|c| c as usize),
        n_threads: args.threads as usize,
        device: args.device.clone(),
        n_batch: args.batch_size as usize,
        max_queue: args.max_queue as usize,
        prefixes: PrefixOptions {
            enabled: !args.no_prefix_cache,
            store_type: args.prefix_cache_type,
            dir: args.cache_dir.clone(),
            model: args.model.clone(),
        },
        conversation_ttl: seconds(args.conversation_ttl),
    };
    ccsm_server::serve(config)
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        Ok(v) => Err(format!("{v} must be a number of seconds above 0 (at most 86400)")),
        Err(e) => Err(format!("{e}: expected seconds, such as 10 or 0.5")),
    }
}

fn non_negative_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v == 0.0 => Ok(v),
        _ => positive_seconds(s),
    }
}
