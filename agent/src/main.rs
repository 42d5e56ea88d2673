//! `parallax-agent`: serve, route, generate, bench, bench-serve, check-config.

use clap::Parser;
use parallax_agent::cli::{self, Cli, Command};
use parallax_agent::loadgen;

fn main() -> anyhow::Result<()> {
    // Logs go to stderr; `RUST_LOG` filters them, PARALLAX_LOG_FORMAT=json makes them JSON.
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("PARALLAX_LOG_FORMAT").as_deref() == Ok("json") {
        logs.json().init();
    } else {
        logs.init();
    }
    match Cli::parse().command {
        Command::Serve(args) => cli::serve(&args),
        Command::Route(args) => cli::route(&args),
        Command::Generate(args) => cli::generate(&args),
        Command::Bench(args) => cli::bench(&args),
        Command::BenchServe(args) => loadgen::run(&args),
        Command::Info(args) => cli::info(&args),
        Command::CheckKernels(args) => cli::check_kernels(&args),
        Command::CheckModel(args) => cli::check_model(&args),
        Command::CheckConfig { file } => {
            println!("{}", cli::check_config(&file)?);
            Ok(())
        }
    }
}
