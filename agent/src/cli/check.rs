//! Device checks for `scripts/gpu-check` (they run anywhere candle does):
//! - `check-kernels`: the device's fused kernels against the gathering path they replace, over a
//!   few steps of a mixed batch (prefill chunks, decode rows, a one-token prompt) with shuffled
//!   block tables; the largest logit difference and the lowest cosine per step; and the
//!   sampling kernel against the host's sampler (agreement, and its time against copying the
//!   rows to the host), and decode steps replayed from CUDA graphs against the same steps run
//!   eagerly, as JSON.
//! - `check-model`: for token-id prompts, the last-position logits (all prompts in one step,
//!   written as little-endian f32 rows) and greedy continuations through the real scheduler
//!   (every prompt submitted at once), for comparing with another implementation; on the
//!   backend the arguments choose, as `serve` would.

use super::EngineArgs;
use crate::engine::BackendKind;
use crate::engine::backend::candle::CandleExecutor;
use crate::engine::backend::{Executor, RowOutput, SeqInput, StepOutput, argmax};
use crate::engine::model::loader::ModelFiles;
use crate::engine::sampling::{Draw, Rng, draw_token};
use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

#[derive(Debug, Args)]
pub struct CheckKernelsArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Args)]
pub struct CheckModelArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// A JSON file: a list of prompts, each a list of token ids.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Where to write the logits: one row of `vocab` f32 per prompt, little-endian.
    #[arg(long)]
    pub out: PathBuf,
    /// Greedy tokens to generate per prompt through the scheduler.
    #[arg(long, default_value_t = 32)]
    pub greedy: usize,
}

/// The candle backend on the arguments' device, whatever `--backend` says.
fn candle(engine: &EngineArgs) -> anyhow::Result<CandleExecutor> {
    let source = engine.source()?;
    let mut files = ModelFiles::open(&source)?;
    let mut backend = engine.backend();
    backend.kind = BackendKind::Candle;
    Ok(CandleExecutor::load(
        &mut files,
        backend.device,
        backend.resolved_precision(),
    )?)
}

/// A sequence of the check: its tokens, its shuffled blocks, and how it runs (token counts per
/// step, 0 when it sits a step out).
struct Scenario {
    tokens: Vec<u32>,
    blocks: Vec<u32>,
    steps: Vec<usize>,
}

/// The kernels' scenario: a prompt prefilled whole then decoded; one in three chunks; a
/// one-token prompt; a long prompt whose decode starts late. With 8 KV heads the second step
/// (118 tokens) fills the device's grid and the others do not, so attention runs in both of its
/// launch shapes (4 warps a block, and the most the shape allows).
fn mixed_steps() -> Vec<Vec<usize>> {
    vec![
        vec![37, 1, 1, 1],
        vec![16, 16, 8, 1],
        vec![1, 1, 1, 1],
        vec![0, 100, 1, 1],
    ]
}

/// The graphs' scenario: nine prompts prefilled in one step, then decoded together for 8 steps
/// (9 rows padded to 16; positions crossing block boundaries). The longest sequence passes 16
/// blocks at the 7th decode step, which widens the tables from 16 to 32: two shapes, each run
/// eagerly once and captured, so 6 of the 8 decode steps replay.
fn decode_steps() -> Vec<Vec<usize>> {
    let decode = |prompt: usize| [prompt].into_iter().chain([1; 8]).collect();
    [14, 30, 3, 250, 7, 9, 11, 60, 100]
        .into_iter()
        .map(decode)
        .collect()
}

/// Sequences that run `shapes` (tokens per step each) with random tokens and shuffled blocks.
fn scenario(shapes: Vec<Vec<usize>>, vocab: usize, block_size: usize) -> Vec<Scenario> {
    let mut rng = Rng::new(17);
    let total_blocks: usize = shapes
        .iter()
        .map(|steps| steps.iter().sum::<usize>().div_ceil(block_size))
        .sum();
    // Every block id once, shuffled, dealt out to the sequences.
    let mut ids: Vec<u32> = (0..total_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut next = 0;
    shapes
        .into_iter()
        .map(|steps| {
            let len: usize = steps.iter().sum();
            let count = len.div_ceil(block_size);
            let blocks = ids[next..next + count].to_vec();
            next += count;
            let tokens = (0..len)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect();
            Scenario {
                tokens,
                blocks,
                steps,
            }
        })
        .collect()
}

/// Runs the scenario from a fresh cache; every step's output (its logits rows).
fn run(
    executor: &mut CandleExecutor,
    scenario: &[Scenario],
    block_size: usize,
) -> anyhow::Result<Vec<StepOutput>> {
    let blocks: usize = scenario.iter().map(|s| s.blocks.len()).sum();
    executor.allocate_kv(blocks, block_size)?;
    let mut at = vec![0usize; scenario.len()];
    let mut steps = Vec::new();
    for step in 0..scenario[0].steps.len() {
        let batch: Vec<SeqInput<'_>> = scenario
            .iter()
            .zip(&at)
            .filter(|(s, _)| s.steps[step] > 0)
            .map(|(s, &start)| {
                let end = start + s.steps[step];
                SeqInput {
                    tokens: &s.tokens[start..end],
                    start,
                    // The blocks its positions so far take, as the scheduler gives them.
                    blocks: &s.blocks[..end.div_ceil(block_size)],
                    output: RowOutput::Logits,
                }
            })
            .collect();
        steps.push(executor.execute(&batch)?);
        for (s, start) in scenario.iter().zip(at.iter_mut()) {
            *start += s.steps[step];
        }
    }
    Ok(steps)
}

pub fn check_kernels(args: &CheckKernelsArgs) -> anyhow::Result<()> {
    let mut executor = candle(&args.engine)?;
    if !executor.has_kernels() {
        bail!("this device has no fused kernels to check (run with --device cuda on a CUDA build)");
    }
    let vocab = executor.config().vocab_size;
    let block_size = 16;
    let mixed = scenario(mixed_steps(), vocab, block_size);
    executor.use_kernels(true);
    let kernels = run(&mut executor, &mixed, block_size)?;
    executor.use_kernels(false);
    let gathered = run(&mut executor, &mixed, block_size)?;
    executor.use_kernels(true);
    let (worst, lowest, steps) = differences(&kernels, &gathered, vocab);
    let sampling = check_sampling(&executor, vocab)?;
    let graphs = check_graphs(&mut executor, vocab, block_size)?;
    println!(
        "{}",
        json!({"check": "kernels", "backend": executor.describe(), "max_abs_difference": worst,
               "lowest_cosine": lowest, "steps": steps, "sampling": sampling, "graphs": graphs})
    );
    Ok(())
}

/// Step by step, row by row, how far `a`'s logits are from `b`'s: the largest difference, the
/// lowest cosine, and each row's.
fn differences(
    a: &[StepOutput],
    b: &[StepOutput],
    vocab: usize,
) -> (f32, f32, Vec<serde_json::Value>) {
    let mut steps = Vec::new();
    let (mut worst, mut lowest) = (0f32, 1f32);
    for (step, (a, b)) in a.iter().zip(b).enumerate() {
        let mut rows = Vec::new();
        for (a, b) in a
            .logits
            .chunks_exact(vocab)
            .zip(b.logits.chunks_exact(vocab))
        {
            let difference = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            let cosine = cosine(a, b);
            worst = worst.max(difference);
            lowest = lowest.min(cosine);
            rows.push(json!({"max_abs_difference": difference, "cosine": cosine,
                             "same_top1": argmax(a) == argmax(b)}));
        }
        steps.push(json!({"step": step, "rows": rows}));
    }
    (worst, lowest, steps)
}

/// Decode steps replayed from CUDA graphs against the same steps run eagerly (both with the
/// kernels): how far the logits are, and how many steps replayed (6 of the 9: not the prefill,
/// nor the two that captured). A build or device without graphs says why instead.
fn check_graphs(
    executor: &mut CandleExecutor,
    vocab: usize,
    block_size: usize,
) -> anyhow::Result<serde_json::Value> {
    let decode = scenario(decode_steps(), vocab, block_size);
    let eager = run(executor, &decode, block_size)?;
    if let Err(e) = executor.use_cuda_graphs(true) {
        return Ok(json!({"error": e.to_string()}));
    }
    let graphed = run(executor, &decode, block_size);
    executor.use_cuda_graphs(false)?;
    // A failure here is reported beside the kernels' results, not in their place.
    let graphed = match graphed {
        Ok(graphed) => graphed,
        Err(e) => return Ok(json!({"error": format!("{e:#}")})),
    };
    let (worst, lowest, _) = differences(&graphed, &eager, vocab);
    let replayed = graphed.iter().filter(|s| s.replayed).count();
    Ok(
        json!({"steps": graphed.len(), "replayed": replayed, "max_abs_difference": worst,
              "lowest_cosine": lowest}),
    )
}

/// The device's sampling kernel against the host's `draw_token` on 256 rows of peaked random
/// logits (a few tokens stand out, as a model's do) under several draws: how many tokens agree
/// (float rounding at a boundary may move a few), and what sampling on the device costs
/// against copying the rows to the host.
fn check_sampling(executor: &CandleExecutor, vocab: usize) -> anyhow::Result<serde_json::Value> {
    let rows = 256;
    let mut rng = Rng::new(17);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|_| {
            let u = rng.next_f32();
            // Mostly low, a few high: a long tail under a handful of likely tokens.
            if u > 0.999 {
                8.0 + 4.0 * rng.next_f32()
            } else {
                6.0 * u - 3.0
            }
        })
        .collect();
    let shapes: [(f32, u32, f32); 5] = [
        (0.0, 0, 1.0),
        (1.0, 0, 1.0),
        (0.7, 50, 1.0),
        (1.0, 0, 0.9),
        (0.8, 40, 0.95),
    ];
    let mut parts = Vec::new();
    let (mut agreed, mut total) = (0usize, 0usize);
    for (temperature, top_k, top_p) in shapes {
        let draws: Vec<Draw> = (0..rows)
            .map(|_| Draw {
                temperature,
                top_k,
                top_p,
                uniform: rng.next_f32(),
            })
            .collect();
        let (device, seconds) = executor.sample_rows(&logits, vocab, &draws)?;
        let same = device
            .iter()
            .zip(logits.chunks_exact(vocab).zip(&draws))
            .filter(|(id, (row, draw))| **id == draw_token(row, draw))
            .count();
        agreed += same;
        total += rows;
        parts.push(
            json!({"temperature": temperature, "top_k": top_k, "top_p": top_p,
                          "rows": rows, "same_token": same, "device_ms": seconds * 1e3}),
        );
    }
    let copy = executor.copy_rows_seconds(&logits, vocab)?;
    Ok(
        json!({"vocab": vocab, "agreement": agreed as f64 / total.max(1) as f64,
              "copy_rows_to_host_ms": copy * 1e3, "draws": parts}),
    )
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b)).max(f32::MIN_POSITIVE)
}

pub fn check_model(args: &CheckModelArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.prompts)
        .with_context(|| format!("cannot read {}", args.prompts.display()))?;
    let prompts: Vec<Vec<u32>> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a list of token-id lists", args.prompts.display()))?;
    let source = args.engine.source()?;
    let (mut executor, codec) = crate::engine::load_with_tokenizer(
        &source,
        args.engine.tokenizer.as_deref(),
        &args.engine.backend(),
    )?;
    // The logits: every prompt in one step, on a fresh cache.
    let block_size = 16;
    let mut next = 0u32;
    let tables: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let n = p.len().div_ceil(block_size) as u32;
            next += n;
            (next - n..next).collect()
        })
        .collect();
    executor.allocate_kv(next as usize, block_size)?;
    let batch: Vec<SeqInput<'_>> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, blocks)| SeqInput {
            tokens: p,
            start: 0,
            blocks,
            output: RowOutput::Logits,
        })
        .collect();
    let logits = executor.execute(&batch)?.logits;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&args.out, bytes)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let described = executor.describe();
    let vocab = executor.config().vocab_size;
    // Greedy continuations: the same executor behind the real engine, every prompt at once.
    let profile = args.engine.profile()?;
    let engine = crate::engine::start(executor, codec, args.engine.config(&profile)?)?;
    let params = crate::engine::SamplingParams {
        max_tokens: args.greedy.max(1),
        ignore_eos: true,
        ..crate::engine::SamplingParams::default()
    };
    let streams = prompts
        .iter()
        .map(|p| engine.submit(p.clone(), params.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut greedy = Vec::new();
    for mut stream in streams {
        let mut ids = Vec::new();
        while let Some(event) = stream.next_blocking() {
            match event {
                crate::engine::Event::Token { id, .. } => ids.push(id),
                crate::engine::Event::Failed { message } => bail!("a prompt failed: {message}"),
                crate::engine::Event::Finished { .. } => break,
                crate::engine::Event::Started { .. } => {}
            }
        }
        greedy.push(ids);
    }
    println!(
        "{}",
        json!({"prompts": prompts.len(), "vocab": vocab, "backend": described,
               "logits": args.out, "greedy": greedy,
               "graph_steps": engine.stats.graph_steps.load(Ordering::Relaxed)})
    );
    Ok(())
}
