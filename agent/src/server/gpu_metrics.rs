//! The GPUs' readings and health at scrape time: `parallax_gpu_*` (labels `gpu`, `uuid`,
//! `model`), and the same readings under dcgm-exporter's names and labels (`gpu`, `UUID`,
//! `modelName`) so GPU dashboards built for it work unchanged.

use crate::gpu::health::State;
use crate::gpu::monitor::{GpuView, GpuWatch};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::sync::{Arc, OnceLock};

type Labels = Vec<(&'static str, String)>;

/// Reads the GPU watch at scrape time.
#[derive(Debug)]
pub(super) struct GpuCollector {
    pub(super) watch: Arc<OnceLock<Arc<GpuWatch>>>,
}

type Read = fn(&GpuView) -> Option<f64>;
/// Gauges (name, help, reading) and the labels they are written with.
type Table = (
    &'static [(&'static str, &'static str, Read)],
    fn(&GpuView) -> Labels,
);

/// `parallax_gpu_*` gauges: name, help, reading.
const GAUGES: &[(&str, &str, Read)] = &[
    (
        "parallax_gpu_utilization_ratio",
        "Share of the last sample period a kernel ran on the GPU",
        |v| Some(v.reading.as_ref()?.utilization_gpu? / 100.0),
    ),
    (
        "parallax_gpu_memory_utilization_ratio",
        "Share of the last sample period the GPU's memory was read or written",
        |v| Some(v.reading.as_ref()?.utilization_memory? / 100.0),
    ),
    ("parallax_gpu_memory_used_bytes", "GPU memory in use", |v| {
        Some(v.reading.as_ref()?.memory_used_bytes? as f64)
    }),
    ("parallax_gpu_memory_free_bytes", "GPU memory free", |v| {
        Some(v.reading.as_ref()?.memory_free_bytes? as f64)
    }),
    (
        "parallax_gpu_memory_total_bytes",
        "GPU memory installed",
        |v| Some(v.info.memory_bytes as f64),
    ),
    ("parallax_gpu_temperature_celsius", "GPU temperature", |v| {
        v.reading.as_ref()?.temperature_celsius
    }),
    ("parallax_gpu_power_watts", "GPU power draw", |v| {
        v.reading.as_ref()?.power_watts
    }),
    (
        "parallax_gpu_power_limit_watts",
        "GPU power limit in force",
        |v| v.reading.as_ref()?.power_limit_watts,
    ),
    (
        "parallax_gpu_sm_clock_hertz",
        "Streaming multiprocessor clock",
        |v| Some(v.reading.as_ref()?.sm_clock_mhz? * 1e6),
    ),
    (
        "parallax_gpu_retired_pages",
        "Memory pages retired for ECC errors",
        |v| Some(v.reading.as_ref()?.retired_pages? as f64),
    ),
    (
        "parallax_gpu_row_remap_pending",
        "1 while a row remap waits for a GPU reset",
        |v| Some(f64::from(u8::from(v.reading.as_ref()?.row_remap_pending?))),
    ),
    (
        "parallax_gpu_row_remap_failed",
        "1 once a row could not be remapped",
        |v| Some(f64::from(u8::from(v.reading.as_ref()?.row_remap_failed?))),
    ),
];

/// dcgm-exporter's names for the same readings, in its units.
const DCGM: &[(&str, &str, Read)] = &[
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", |v| {
        v.reading.as_ref()?.utilization_gpu
    }),
    (
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "Memory utilization (in %).",
        |v| v.reading.as_ref()?.utilization_memory,
    ),
    (
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        |v| Some((v.reading.as_ref()?.memory_used_bytes? >> 20) as f64),
    ),
    (
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        |v| Some((v.reading.as_ref()?.memory_free_bytes? >> 20) as f64),
    ),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", |v| {
        v.reading.as_ref()?.temperature_celsius
    }),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", |v| {
        v.reading.as_ref()?.power_watts
    }),
    (
        "DCGM_FI_DEV_SM_CLOCK",
        "SM clock frequency (in MHz).",
        |v| v.reading.as_ref()?.sm_clock_mhz,
    ),
    (
        "DCGM_FI_DEV_XID_ERRORS",
        "Value of the last XID error encountered.",
        |v| Some(v.last_xid.unwrap_or(0) as f64),
    ),
    (
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "Total number of single-bit volatile ECC errors.",
        |v| Some(v.reading.as_ref()?.ecc_corrected? as f64),
    ),
    (
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "Total number of double-bit volatile ECC errors.",
        |v| Some(v.reading.as_ref()?.ecc_uncorrected? as f64),
    ),
    (
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "Whether remapping of rows has failed",
        |v| Some(f64::from(u8::from(v.reading.as_ref()?.row_remap_failed?))),
    ),
];

fn labels(view: &GpuView) -> Labels {
    vec![
        ("gpu", view.info.index.to_string()),
        ("uuid", view.info.uuid.clone()),
        ("model", view.info.name.clone()),
    ]
}

/// dcgm-exporter's labels for the GPU.
fn dcgm_labels(view: &GpuView) -> Labels {
    vec![
        ("gpu", view.info.index.to_string()),
        ("UUID", view.info.uuid.clone()),
        ("modelName", view.info.name.clone()),
    ]
}

fn with(view: &GpuView, key: &'static str, value: String) -> Labels {
    let mut labels = labels(view);
    labels.push((key, value));
    labels
}

impl Collector for GpuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(watch) = self.watch.get() else {
            return Ok(());
        };
        let views = watch.views();
        // Parallax's names with its labels, dcgm-exporter's with its own.
        let tables: [Table; 2] = [(GAUGES, labels), (DCGM, dcgm_labels)];
        for (table, labelled) in tables {
            for (name, help, read) in table {
                let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for view in &views {
                    if let Some(value) = read(view) {
                        ConstGauge::new(value).encode(metric.encode_family(&labelled(view))?)?;
                    }
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "parallax_gpu_health",
            "1 for each GPU's health state (healthy, degraded, probation, unhealthy)",
            None,
            MetricType::Gauge,
        )?;
        for view in &views {
            for state in State::ALL {
                let labels = with(view, "state", state.as_str().into());
                ConstGauge::new(i64::from(view.state == state))
                    .encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "parallax_gpu_throttled",
            "1 while the GPU's clocks are held down, by reason (thermal, power)",
            None,
            MetricType::Gauge,
        )?;
        for view in &views {
            if let Some(reading) = &view.reading {
                for (reason, on) in [
                    ("thermal", reading.throttle.thermal),
                    ("power", reading.throttle.power),
                ] {
                    ConstGauge::new(i64::from(on)).encode(metric.encode_family(&with(
                        view,
                        "reason",
                        reason.into(),
                    ))?)?;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "parallax_gpu_ecc_errors",
            "Volatile ECC errors since the driver loaded, by type (corrected, uncorrected)",
            None,
            MetricType::Counter,
        )?;
        for view in &views {
            let Some(reading) = &view.reading else {
                continue;
            };
            for (kind, count) in [
                ("corrected", reading.ecc_corrected),
                ("uncorrected", reading.ecc_uncorrected),
            ] {
                if let Some(count) = count {
                    ConstCounter::new(count).encode(metric.encode_family(&with(
                        view,
                        "type",
                        kind.into(),
                    ))?)?;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "parallax_gpu_xid_errors",
            "XID errors the GPU reported, by code (fatal or not)",
            None,
            MetricType::Counter,
        )?;
        for view in &views {
            for (xid, count) in &view.xids {
                ConstCounter::new(*count).encode(metric.encode_family(&with(
                    view,
                    "xid",
                    xid.to_string(),
                ))?)?;
            }
        }
        Ok(())
    }
}
