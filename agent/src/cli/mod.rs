//! The command line: `serve`, `route`, `generate`, `bench`, `bench-serve`, `info` and `check-config` —
//! arguments, the configuration they resolve to, and one module per command.

mod bench;
mod check;
mod engine;
mod generate;
mod gpu;
mod info;
mod route;
mod serve;

pub use bench::{BenchArgs, BenchMode, bench};
pub use check::{CheckKernelsArgs, CheckModelArgs, check_kernels, check_model};
pub use engine::{BackendArg, DtypeArg, EngineArgs, SchedulerKind, StepWeights};
pub use generate::{GenerateArgs, generate};
pub use gpu::GpuArgs;
pub use info::{InfoArgs, info};
pub use route::{RouteArgs, route};
pub use serve::{ServeArgs, check_config, serve};

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "parallax-agent", version, about = "Parallax node agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible API, health and metrics.
    Serve(Box<ServeArgs>),
    /// Route a pool's requests to its groups by live load, prefix affinity and priority.
    Route(RouteArgs),
    /// Generate a completion for one prompt and print it.
    Generate(GenerateArgs),
    /// Run a fixed offline workload and report throughput and latency.
    Bench(BenchArgs),
    /// Load a running server with Poisson arrivals and report latency and throughput.
    BenchServe(crate::loadgen::LoadArgs),
    /// Print the device, its hardware profile, this build's features and the engine defaults
    /// they resolve to.
    Info(InfoArgs),
    /// Validate an agent configuration file (the operator's ConfigMap key agent.json) as
    /// `serve --config FILE` would resolve it, refusing by name what the agent cannot honour.
    CheckConfig { file: PathBuf },
    /// Check the device's fused kernels against the gathering path they replace (GPU check).
    CheckKernels(CheckKernelsArgs),
    /// Write the last-position logits and greedy continuations of token-id prompts (GPU check).
    CheckModel(CheckModelArgs),
}

/// A flag given in seconds (`value`, from `flag`) as a duration; a negative, non-finite or
/// overflowing one is refused by name.
fn seconds(value: f64, flag: &str) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("{flag} must be seconds ≥ 0, not {value}"))
}
