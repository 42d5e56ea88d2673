//! `generate`: one prompt through the engine, streamed to stdout.

use super::EngineArgs;
use crate::engine::{Event, Message, SamplingParams};
use anyhow::bail;
use clap::Args;
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long)]
    pub seed: Option<u64>,
    /// A string that ends the output (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long)]
    pub ignore_eos: bool,
}

/// How `generate` and `bench` sample.
#[derive(Debug, Clone, Copy, Args)]
pub struct SamplingArgs {
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens when sampling (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the nucleus of this much probability when sampling (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
}

impl SamplingArgs {
    /// `base` sampling as these flags say; an error names a value out of range.
    pub fn params(&self, base: SamplingParams) -> anyhow::Result<SamplingParams> {
        let params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            ..base
        };
        params.validate().map_err(anyhow::Error::msg)?;
        Ok(params)
    }
}

pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let params = args.sampling.params(SamplingParams {
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..SamplingParams::default()
    })?;
    let engine = args.engine.start()?;
    let text = if args.chat {
        engine.codec.chat_prompt(&[Message {
            role: "user".into(),
            content: args.prompt.clone(),
        }])?
    } else {
        args.prompt.clone()
    };
    let prompt = engine.codec.encode(&text)?;
    let started = Instant::now();
    let mut stream = engine.submit(prompt, params)?;
    let mut stdout = std::io::stdout().lock();
    let mut first = None;
    while let Some(event) = stream.next_blocking() {
        match event {
            Event::Started { .. } => {}
            Event::Failed { message } => bail!("{message}"),
            Event::Token { text, .. } => {
                first.get_or_insert_with(Instant::now);
                write!(stdout, "{text}")?;
                stdout.flush()?;
            }
            Event::Finished {
                text,
                reason,
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                writeln!(stdout, "{text}")?;
                let decode = first.map_or(Duration::ZERO, |f| f.elapsed());
                eprintln!(
                    "[{} prompt + {} completion tokens, finish {}, first token {:.0} ms, decode {:.1} tok/s]",
                    prompt_tokens,
                    completion_tokens,
                    reason.as_str(),
                    first.map_or(0.0, |f| (f - started).as_secs_f64() * 1e3),
                    completion_tokens.saturating_sub(1) as f64 / decode.as_secs_f64().max(1e-9)
                );
                return Ok(());
            }
        }
    }
    bail!("the engine stopped before the request finished")
}
