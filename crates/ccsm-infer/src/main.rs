//! `ccsm-infer`: the command-line front end of the ccsm engine.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ccsm-infer", version, about = "CSM-1B and Llama inference on ggml with a quantized KV cache")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the engine version, the ggml version and the CPU features ggml was built with.
    System,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::System => {
            println!("ccsm {}", ccsm::VERSION);
            println!("ggml {} ({})", ggml::ggml_version(), ggml::ggml_source_dir());
            println!("cpu features: {}", ggml::cpu_features().join(" "));
        }
    }
    ExitCode::SUCCESS
}
