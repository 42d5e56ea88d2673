//! `parallax-agent`: the node agent. The engine, scheduler and HTTP server land with their own
//! issues; today the agent reads and checks the configuration the operator hands it.

use parallax_crds::AgentConfig;
use std::process::ExitCode;

const USAGE: &str = "usage: parallax-agent check-config FILE   validate an agent configuration (the operator's ConfigMap key agent.json)\n       parallax-agent --version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--version"] => {
            println!("parallax-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        ["check-config", path] => match check_config(path) {
            Ok(config) => {
                println!(
                    "{path}: ok (model {}, tensor parallel size {}, port {})",
                    config.model.served_name, config.tensor_parallel_size, config.port
                );
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("parallax-agent: {message}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn check_config(path: &str) -> Result<AgentConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))
}
