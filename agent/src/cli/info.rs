//! `info`: what this agent would run on here — the device and what it says of itself, the
//! hardware profile it picks, this build's features, and the engine defaults they resolve to
//! (flags given alongside are applied, as `serve` would).

use super::EngineArgs;
use crate::engine::backend::{self, BackendKind, KvCacheType};
use clap::Args;
use serde_json::json;

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// This build's cargo features.
fn features() -> Vec<&'static str> {
    let mut features = Vec::new();
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    if cfg!(feature = "fault-injection") {
        features.push("fault-injection");
    }
    features
}

pub fn info(args: &InfoArgs) -> anyhow::Result<()> {
    let engine = &args.engine;
    let gpu = backend::gpu_facts(engine.device)?;
    let profile = backend::profile::profile(engine.device, gpu.as_ref());
    let config = engine.config(&profile)?;
    let backend = engine.backend();
    backend.check_kv_cache()?;
    let kind = match backend.resolved_kind() {
        BackendKind::Int8 => "int8",
        _ => "candle",
    };
    let summary = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "build": {"features": features(), "target_cpu_features": target_features()},
        "device": {
            "name": engine.device.to_string(),
            "gpu": gpu.as_ref().map(|g| json!({"name": g.name, "total_memory_bytes": g.total_memory})),
        },
        "gpus": super::gpu::inventory(),
        "backend": kind,
        "tensor_parallel": {
            "size": backend.tensor_parallel_size.max(1),
            "sums": if backend.uses_nccl()? { "nccl" } else { "host" },
        },
        "dtype": if kind == "int8" { "int8".to_owned() } else { format!("{:?}", backend.resolved_precision()).to_lowercase() },
        "profile": profile.name,
        "defaults": {
            "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_batched_tokens,
            "block_size": config.block_size,
            "step_weights": config.step_weights,
            "slow_prefill_chunk": config.slow_prefill_chunk,
            "kv_cache": format!("{:?}", config.kv_cache),
            "kv_cache_dtype": match backend.kv_cache {
                KvCacheType::Auto => "auto",
                KvCacheType::Int8 => "int8",
            },
            "prefix_caching": config.prefix_caching,
            "cuda_graphs": backend.cuda_graphs,
        },
    });
    if args.json {
        println!("{summary}");
    } else {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// The x86 vector extensions this binary was built for and the CPU has.
fn target_features() -> Vec<&'static str> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            found.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            found.push("avx512vnni");
        }
    }
    found
}
