//! The GPUs through NVML (`libnvidia-ml`, loaded at run time: the agent builds and runs where
//! there is none, and says so once).

use super::{Event, GpuInfo, GpuSource, Reading, Throttle};
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_REMAPPED_FAILURE, NVML_FI_DEV_REMAPPED_PENDING,
};
use nvml_wrapper::{Device, EventSet, Nvml};
use std::time::Duration;

/// Every GPU NVML sees (in a container: those the device plugin gave it).
pub struct NvmlSource {
    devices: Vec<Device<'static>>,
    inventory: Vec<GpuInfo>,
    /// Critical XIDs and double-bit ECC errors, where the GPUs support events.
    events: Option<EventSet<'static>>,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("inventory", &self.inventory)
            .field("events", &self.events.is_some())
            .finish()
    }
}

impl NvmlSource {
    /// NVML, when the driver's library loads and sees a GPU; otherwise why not.
    pub fn open() -> Result<Self, String> {
        let nvml = Nvml::init().map_err(|e| match e {
            NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
                "no NVML library (libnvidia-ml.so.1): not a GPU machine".to_owned()
            }
            NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded".to_owned(),
            other => format!("NVML did not start: {other}"),
        })?;
        // One NVML handle for the life of the agent: devices and event sets borrow it.
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let count = nvml
            .device_count()
            .map_err(|e| format!("NVML cannot count GPUs: {e}"))?;
        if count == 0 {
            return Err("NVML sees no GPU".into());
        }
        let driver_version = nvml.sys_driver_version().unwrap_or_default();
        let mut devices = Vec::new();
        let mut inventory = Vec::new();
        for index in 0..count {
            let device = nvml
                .device_by_index(index)
                .map_err(|e| format!("NVML cannot open GPU {index}: {e}"))?;
            let capability = device
                .cuda_compute_capability()
                .map(|c| format!("{}.{}", c.major, c.minor))
                .unwrap_or_default();
            inventory.push(GpuInfo {
                index: device.index().unwrap_or(index),
                uuid: device.uuid().unwrap_or_default(),
                name: device.name().unwrap_or_default(),
                memory_bytes: device.memory_info().map(|m| m.total).unwrap_or(0),
                compute_capability: capability,
                driver_version: driver_version.clone(),
            });
            devices.push(device);
        }
        let events = register_events(nvml, &devices);
        Ok(Self {
            devices,
            inventory,
            events,
        })
    }
}

/// An event set over every GPU that supports critical XID and double-bit ECC events.
fn register_events(nvml: &'static Nvml, devices: &[Device<'static>]) -> Option<EventSet<'static>> {
    let wanted = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
    let mut set = nvml.create_event_set().ok()?;
    let mut registered = 0;
    for (index, device) in devices.iter().enumerate() {
        let supported = device
            .supported_event_types()
            .map(|s| s & wanted)
            .unwrap_or(EventTypes::empty());
        if supported.is_empty() {
            tracing::info!(
                gpu = index,
                "no XID or ECC events from this GPU; its readings are still watched"
            );
            continue;
        }
        match device.register_events(supported, set) {
            Ok(kept) => {
                set = kept;
                registered += 1;
            }
            Err(error) => {
                tracing::warn!(gpu = index, %error, "could not watch this GPU's events");
                set = nvml.create_event_set().ok()?;
            }
        }
    }
    (registered > 0).then_some(set)
}

fn reading(device: &Device<'static>) -> Result<Reading, Event> {
    // A lost GPU fails every call; the first one says so.
    let memory = device.memory_info().map_err(lost)?;
    let utilization = device.utilization_rates().ok();
    let throttle = device
        .current_throttle_reasons()
        .map(|r| Throttle {
            thermal: r.intersects(
                ThrottleReasons::SW_THERMAL_SLOWDOWN
                    | ThrottleReasons::HW_THERMAL_SLOWDOWN
                    | ThrottleReasons::HW_SLOWDOWN,
            ),
            power: r.intersects(
                ThrottleReasons::SW_POWER_CAP | ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
            ),
        })
        .unwrap_or_default();
    let retired = [
        RetirementCause::MultipleSingleBitEccErrors,
        RetirementCause::DoubleBitEccError,
    ]
    .into_iter()
    .map(|cause| device.retired_pages(cause).map(|p| p.len() as u64))
    .collect::<Result<Vec<_>, _>>()
    .ok()
    .map(|counts| counts.iter().sum());
    let remap = device
        .field_values_for(&[
            FieldId(NVML_FI_DEV_REMAPPED_PENDING),
            FieldId(NVML_FI_DEV_REMAPPED_FAILURE),
        ])
        .ok()
        .map(|samples| {
            samples
                .into_iter()
                .map(|s| s.ok().and_then(|s| s.value.ok()).map(|v| as_u64(&v) > 0))
                .collect::<Vec<_>>()
        });
    let (row_remap_pending, row_remap_failed) = match remap.as_deref() {
        Some([pending, failed]) => (*pending, *failed),
        _ => (None, None),
    };
    Ok(Reading {
        utilization_gpu: utilization.as_ref().map(|u| f64::from(u.gpu)),
        utilization_memory: utilization.as_ref().map(|u| f64::from(u.memory)),
        memory_used_bytes: Some(memory.used),
        memory_free_bytes: Some(memory.free),
        temperature_celsius: device
            .temperature(TemperatureSensor::Gpu)
            .ok()
            .map(f64::from),
        power_watts: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
        power_limit_watts: device
            .enforced_power_limit()
            .ok()
            .map(|mw| f64::from(mw) / 1000.0),
        sm_clock_mhz: device.clock_info(Clock::SM).ok().map(f64::from),
        throttle,
        ecc_corrected: device
            .total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
            .ok(),
        ecc_uncorrected: device
            .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
            .ok(),
        retired_pages: retired,
        row_remap_pending,
        row_remap_failed,
    })
}

fn lost(error: NvmlError) -> Event {
    Event::Lost(match error {
        NvmlError::GpuLost => "NVML says the GPU has fallen off the bus".to_owned(),
        other => format!("NVML cannot read it: {other}"),
    })
}

fn as_u64(value: &SampleValue) -> u64 {
    match *value {
        SampleValue::F64(v) => v.max(0.0) as u64,
        SampleValue::U32(v) => u64::from(v),
        SampleValue::U64(v) => v,
        SampleValue::I64(v) => v.max(0) as u64,
    }
}

impl GpuSource for NvmlSource {
    fn inventory(&self) -> &[GpuInfo] {
        &self.inventory
    }

    fn sample(&mut self) -> Vec<Result<Reading, Event>> {
        self.devices.iter().map(reading).collect()
    }

    fn wait_events(&mut self, timeout: Duration) -> Vec<(usize, Event)> {
        let Some(set) = &self.events else {
            std::thread::sleep(timeout);
            return Vec::new();
        };
        let mut events = Vec::new();
        let mut wait = timeout.as_millis().min(u128::from(u32::MAX)) as u32;
        loop {
            match set.wait(wait) {
                Ok(data) => {
                    let uuid = data.device.uuid().ok();
                    let gpu = self
                        .inventory
                        .iter()
                        .position(|g| Some(&g.uuid) == uuid.as_ref())
                        .unwrap_or(0);
                    if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                        let code = match data.event_data {
                            Some(nvml_wrapper::enums::event::XidError::Value(code)) => code,
                            _ => 0,
                        };
                        events.push((gpu, Event::Xid(code)));
                    }
                    if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                        events.push((gpu, Event::DoubleBitEcc));
                    }
                    // Collect what else is already there, then return.
                    wait = 0;
                }
                Err(NvmlError::Timeout) => return events,
                Err(NvmlError::GpuLost) => {
                    events.push((0, lost(NvmlError::GpuLost)));
                    return events;
                }
                Err(error) => {
                    tracing::debug!(%error, "waiting for GPU events");
                    if wait > 0 {
                        std::thread::sleep(Duration::from_millis(u64::from(wait)));
                    }
                    return events;
                }
            }
        }
    }
}
