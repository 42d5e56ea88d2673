//! `--gpu-*`: where the agent's GPU readings come from and how their health is judged.

use super::seconds;
use crate::gpu::GpuSource;
use crate::gpu::health::Policy;
use crate::gpu::monitor::{GpuWatch, MonitorConfig};
use crate::gpu::nvml::NvmlSource;
use crate::gpu::sim::SimSource;
use anyhow::{Context, bail};
use clap::Args;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct GpuArgs {
    /// Where GPU readings and events come from: `auto` (NVML where the driver has it, else
    /// nothing, said once), `nvml` (required), `none`, or `sim:FILE` (a scripted file of
    /// readings and events, for machines without a GPU).
    #[arg(long, env = "PARALLAX_GPU_SOURCE", default_value = "auto")]
    pub gpu_source: String,
    /// Seconds between GPU samples.
    #[arg(long, default_value_t = 5.0)]
    pub gpu_sample_interval: f64,
    /// XID codes counted but not fatal (application faults), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = Policy::default().ignored_xids)]
    pub gpu_ignored_xids: Vec<u64>,
    /// Seconds without a fatal signal before an unhealthy GPU goes on probation.
    #[arg(long, default_value_t = 60.0)]
    pub gpu_quiet_period: f64,
    /// Seconds of probation before a GPU is healthy again.
    #[arg(long, default_value_t = 300.0)]
    pub gpu_probation: f64,
    /// Share of the engine's batch admitted while a GPU is on probation (0 < share ≤ 1).
    #[arg(long, default_value_t = 0.25)]
    pub gpu_probation_batch: f64,
}

impl GpuArgs {
    fn config(&self) -> anyhow::Result<MonitorConfig> {
        if !(self.gpu_probation_batch > 0.0 && self.gpu_probation_batch <= 1.0) {
            bail!(
                "--gpu-probation-batch must be a share above 0 and at most 1, not {}",
                self.gpu_probation_batch
            );
        }
        let sample_every = seconds(self.gpu_sample_interval, "--gpu-sample-interval")?;
        if sample_every < Duration::from_millis(10) {
            bail!("--gpu-sample-interval must be at least 0.01 s");
        }
        Ok(MonitorConfig {
            policy: Policy {
                ignored_xids: self.gpu_ignored_xids.clone(),
                quiet: seconds(self.gpu_quiet_period, "--gpu-quiet-period")?,
                probation: seconds(self.gpu_probation, "--gpu-probation")?,
            },
            sample_every,
            probation_batch: self.gpu_probation_batch,
        })
    }

    /// The GPU watch these flags ask for, started; `None` where there is nothing to watch.
    pub fn watch(&self) -> anyhow::Result<Option<Arc<GpuWatch>>> {
        let config = self.config()?;
        let source: Box<dyn GpuSource> = match self.gpu_source.as_str() {
            "none" => return Ok(None),
            "auto" => match NvmlSource::open() {
                Ok(nvml) => Box::new(nvml),
                Err(why) => {
                    tracing::info!("GPU health is not watched: {why}");
                    return Ok(None);
                }
            },
            "nvml" => Box::new(
                NvmlSource::open()
                    .map_err(anyhow::Error::msg)
                    .context("--gpu-source nvml")?,
            ),
            other => match other.strip_prefix("sim:") {
                Some(path) => Box::new(SimSource::from_file(Path::new(path))?),
                None => bail!("--gpu-source must be auto, nvml, none or sim:FILE, not {other:?}"),
            },
        };
        let name = if self.gpu_source == "auto" {
            "nvml"
        } else {
            self.gpu_source.as_str()
        };
        Ok(Some(GpuWatch::start(name, source, config)))
    }
}

/// The GPUs NVML sees, for `info`: each one's inventory and one sample of every reading, or
/// why there is none.
pub fn inventory() -> serde_json::Value {
    match NvmlSource::open() {
        Ok(mut nvml) => {
            let sample = nvml.sample();
            let gpus: Vec<serde_json::Value> = nvml
                .inventory()
                .iter()
                .zip(sample)
                .map(|(gpu, reading)| match reading {
                    Ok(reading) => serde_json::json!({"gpu": gpu, "reading": reading}),
                    Err(event) => {
                        serde_json::json!({"gpu": gpu, "unreadable": format!("{event:?}")})
                    }
                })
                .collect();
            serde_json::json!(gpus)
        }
        Err(why) => serde_json::json!({"unavailable": why}),
    }
}
