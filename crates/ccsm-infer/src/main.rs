//! `ccsm-infer`: the command-line front end of the ccsm engine.
#![forbid(unsafe_code)]

mod args;
mod audio;
mod bench;
mod cache_setup;
mod calibrate_cmd;
mod cli;
mod decode_cmd;
mod encode_cmd;
mod generate_cmd;
mod info_cmd;
mod interrupt;
mod output;
mod perplexity_cmd;
mod progress;
mod serve_cmd;
mod speech_cmd;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use args::LogArgs;
use cli::{Cli, Command};

/// A failure that is the user's invocation, not the run (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn init_logging(log: &LogArgs) {
    let default = match (log.quiet, log.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).with_target(true).init();
}

/// Generation with whatever model the file holds: text for `llama`, audio frames for `csm`.
fn generate(args: &cli::GenerateArgs, log: &LogArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let path = args.model_path()?;
    let placement = ccsm::Placement::parse(&args.device).map_err(|e| UsageError(e.to_string()))?;
    match ccsm::load_model_placed(&path, &placement).with_context(|| format!("loading {}", path.display()))? {
        ccsm::AnyModel::Csm(model) => speech_cmd::run(args, log, &path, model),
        ccsm::AnyModel::Llama(model) => generate_cmd::run(args, log, path, model),
        ccsm::AnyModel::Mimi(_) => Err(UsageError(format!(
            "{} is a codec (mimi): it decodes frames, it does not generate; use `ccsm-infer decode FRAMES.json --codec {}`",
            path.display(),
            path.display()
        ))
        .into()),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    init_logging(&cli.log);
    // The server has its own shutdown on Ctrl-C (stop accepting, let running requests finish).
    if !matches!(cli.command, Some(Command::Serve(_))) {
        interrupt::install();
    }
    let result = match cli.command {
        Some(Command::System) => {
            output::println(&format!("ccsm {}", ccsm::VERSION));
            output::println(&format!("ggml {} ({})", ggml::ggml_version(), ggml::ggml_source_dir()));
            output::println(&format!("cpu features: {}", ggml::cpu_features().join(" ")));
            output::println(&format!("own kernels: {}", ggml::own_kernels().join(", ")));
            let backends = ggml::gpu_backends();
            output::println(&format!(
                "gpu backends: {}",
                if backends.is_empty() { "none (built without --features vulkan)".into() } else { backends.join(", ") }
            ));
            for d in ggml::devices() {
                let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
                output::println(&format!(
                    "device {}: {} ({}), {:.0} MiB free of {:.0} MiB",
                    d.name,
                    d.description,
                    d.kind.name(),
                    mib(d.free_bytes),
                    mib(d.total_bytes)
                ));
                if d.kind != ggml::DeviceKind::Cpu {
                    if let Ok(device) = ggml::Device::open(&d.name) {
                        for head in [64, 128] {
                            let types: Vec<String> = ccsm::device_cache_types(&device, head).iter().map(|t| t.to_string()).collect();
                            output::println(&format!("  KV cache types its attention takes at head size {head}: {}", types.join(" ")));
                        }
                    }
                }
            }
            Ok(())
        }
        Some(Command::Info(args)) => info_cmd::run(&args),
        Some(Command::Perplexity(args)) => perplexity_cmd::run(&args, &cli.log),
        Some(Command::Bench(args)) => bench::run(&args, &cli.log),
        Some(Command::Calibrate(args)) => calibrate_cmd::run(&args, &cli.log),
        Some(Command::Decode(args)) => decode_cmd::run(&args, &cli.log),
        Some(Command::Encode(args)) => encode_cmd::run(&args, &cli.log),
        Some(Command::Serve(args)) => serve_cmd::run(&args),
        None => generate(&cli.generate, &cli.log),
    };
    match result {
        Ok(()) if interrupt::requested() => ExitCode::from(interrupt::EXIT_CODE),
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
