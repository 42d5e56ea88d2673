//! The agent's GPUs: what they are, what they read, and whether they are fit to work.
//!
//! A [`GpuSource`] gives the inventory, readings and events: NVML on a GPU machine
//! ([`nvml::NvmlSource`]), a scripted file anywhere ([`sim::SimSource`], `--gpu-source
//! sim:FILE`). [`health`] turns what it says into a state per GPU; [`monitor`] runs the source
//! on its own thread and shares the result with the server (readiness, admission, metrics, the
//! `X-GPU-Utilization` header) and the engine (a smaller batch on probation).

pub mod health;
pub mod monitor;
pub mod nvml;
pub mod sim;

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One GPU as it is at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_bytes: u64,
    /// `major.minor`.
    pub compute_capability: String,
    pub driver_version: String,
}

/// Why a GPU's clocks are held down, where it says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttle {
    /// Thermal slowdown (software or hardware), or the hardware slowdown signal.
    #[serde(default)]
    pub thermal: bool,
    /// Power cap or power brake.
    #[serde(default)]
    pub power: bool,
}

/// One sample of a GPU's readings; a field the card does not report is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Percent of the last sample period a kernel ran.
    #[serde(default)]
    pub utilization_gpu: Option<f64>,
    /// Percent of the last sample period memory was read or written.
    #[serde(default)]
    pub utilization_memory: Option<f64>,
    #[serde(default)]
    pub memory_used_bytes: Option<u64>,
    #[serde(default)]
    pub memory_free_bytes: Option<u64>,
    #[serde(default)]
    pub temperature_celsius: Option<f64>,
    #[serde(default)]
    pub power_watts: Option<f64>,
    #[serde(default)]
    pub power_limit_watts: Option<f64>,
    #[serde(default)]
    pub sm_clock_mhz: Option<f64>,
    #[serde(default)]
    pub throttle: Throttle,
    /// ECC errors since the driver loaded.
    #[serde(default)]
    pub ecc_corrected: Option<u64>,
    #[serde(default)]
    pub ecc_uncorrected: Option<u64>,
    /// Pages retired for ECC errors (cards before Ampere).
    #[serde(default)]
    pub retired_pages: Option<u64>,
    /// A row remap waits for a reset (Ampere and later).
    #[serde(default)]
    pub row_remap_pending: Option<bool>,
    /// A row could not be remapped: the memory is bad.
    #[serde(default)]
    pub row_remap_failed: Option<bool>,
}

/// Something a GPU reported between samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// An XID error with its code.
    Xid(u64),
    /// A double-bit (uncorrectable) ECC error.
    DoubleBitEcc,
    /// The GPU cannot be reached any more (fallen off the bus, NVML lost it).
    Lost(String),
}

/// The inventory, readings and events of the agent's GPUs.
pub trait GpuSource: Send {
    /// What each GPU is, by position: the `gpu` of readings and events indexes this.
    fn inventory(&self) -> &[GpuInfo];
    /// One reading per GPU, or the event that stopped it from reading.
    fn sample(&mut self) -> Vec<Result<Reading, Event>>;
    /// Events that arrive within `timeout` (returns early with the first ones), as
    /// `(gpu, event)`.
    fn wait_events(&mut self, timeout: Duration) -> Vec<(usize, Event)>;
}

/// What XID `code` means, for the people reading a condition; NVIDIA's XID catalogue, the
/// common ones.
pub fn xid_description(code: u64) -> &'static str {
    match code {
        13 => "graphics engine exception (an application fault)",
        31 => "GPU memory page fault (an application fault)",
        43 => "GPU stopped processing (an application fault)",
        45 => "preemptive cleanup after an earlier error",
        48 => "double-bit ECC error",
        61 | 62 => "internal micro-controller error",
        63 | 64 => "ECC page retirement or row remapping event",
        68 => "video processor exception",
        69 => "graphics engine class error",
        74 => "NVLink error",
        79 => "GPU has fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        109 => "context switch timeout",
        119 | 120 => "GSP firmware error",
        _ => "see NVIDIA's XID catalogue",
    }
}
