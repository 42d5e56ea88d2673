//! `parallax-agent`: generate, bench, check-config.

use clap::Parser;
use parallax_agent::cli::{self, Cli, Command};
use parallax_crds::AgentConfig;

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate(args) => cli::generate(&args),
        Command::Bench(args) => cli::bench(&args),
        Command::CheckConfig { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let config: AgentConfig = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!(
                "{}: ok (model {}, tensor parallel size {}, port {})",
                file.display(),
                config.model.served_name,
                config.tensor_parallel_size,
                config.port
            );
            Ok(())
        }
    }
}
