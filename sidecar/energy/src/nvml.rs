use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use crate::sensor::{CounterTracker, DeviceReading, EnergySensor, HwType, SensorReading};
use crate::{EnergyError, EnergySource};

/// Which GPUs belong to this pod, as the container runtime or CUDA was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VisibleDevices {
    /// Every GPU NVML can see (`all`, or nothing set).
    All,
    /// No GPU (`none`, `void`, empty, or `-1`).
    None,
    /// GPU UUIDs (`GPU-...`, unique prefixes allowed) or indices, as listed.
    List(Vec<String>),
}

impl VisibleDevices {
    /// Reads NVIDIA_VISIBLE_DEVICES (set by the NVIDIA device plugin and container runtime),
    /// falling back to CUDA_VISIBLE_DEVICES.
    pub fn from_env() -> Self {
        let nvidia = std::env::var("NVIDIA_VISIBLE_DEVICES").ok();
        let cuda = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        Self::from_vars(nvidia.as_deref(), cuda.as_deref())
    }

    /// Parses the two variables' values; the first one set wins.
    pub fn from_vars(nvidia_visible: Option<&str>, cuda_visible: Option<&str>) -> Self {
        match nvidia_visible.or(cuda_visible) {
            None => VisibleDevices::All,
            Some(spec) => Self::parse(spec),
        }
    }

    /// Parses one value: `all`, `none`/`void`/empty, or a comma-separated list.
    pub fn parse(spec: &str) -> Self {
        let spec = spec.trim();
        match spec.to_ascii_lowercase().as_str() {
            "all" => VisibleDevices::All,
            "" | "none" | "void" | "-1" | "nodevfiles" => VisibleDevices::None,
            _ => VisibleDevices::List(
                spec.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            ),
        }
    }
}

/// How to reach NVML and which GPUs to meter.
#[derive(Debug, Clone, PartialEq)]
pub struct NvmlConfig {
    /// The NVML library to load; `libnvidia-ml.so` from the loader path when unset.
    pub lib_path: Option<PathBuf>,
    /// The pod's GPUs.
    pub visible: VisibleDevices,
    /// How often the driver refreshes the energy counter (20-100 ms depending on the GPU).
    /// Windows shorter than this are bridged with instantaneous power (see [`NvmlSensor`]).
    pub counter_update_period: Duration,
    /// Power sampling interval for GPUs without an energy counter (pre-Volta).
    pub power_sample_interval: Duration,
}

impl Default for NvmlConfig {
    fn default() -> Self {
        Self {
            lib_path: None,
            visible: VisibleDevices::from_env(),
            counter_update_period: Duration::from_millis(100),
            power_sample_interval: Duration::from_millis(50),
        }
    }
}

/// Power samples integrated over time, shared with the sampler thread.
#[derive(Debug, Default)]
struct Integrated {
    uj: u64,
    last_mw: Option<u32>,
    last_at: Option<Instant>,
    errors: u64,
}

#[derive(Debug)]
enum Method {
    /// The driver's total-energy counter (mJ since driver load).
    Counter {
        counter: CounterTracker,
        /// Best estimate of when the driver last refreshed the counter.
        refreshed_at: Instant,
        /// When this GPU was last read.
        read_at: Instant,
        last_power_mw: Option<u32>,
    },
    /// Integrated power samples, for GPUs without the counter.
    Sampled(Arc<Mutex<Integrated>>),
}

#[derive(Debug)]
struct Gpu {
    index: u32,
    uuid: String,
    method: Method,
    /// The highest total handed out; readings never go below it.
    issued_uj: u64,
}

/// Meters the pod's GPUs through NVML.
///
/// With an energy counter (Volta and newer) each read takes the counter. The driver refreshes it
/// only every 20-100 ms, so a window shorter than that could read zero; like Zeus for short
/// windows, each read adds power x time since the counter's estimated last refresh (at most one
/// update period). Totals stay monotone: when the counter catches up, bridged joules are taken
/// out of the next window, so over time the total equals the counter exactly. A counter that goes
/// backwards was reset (driver reload, GPU reset) and counts again from zero. Without a counter a
/// thread samples power and integrates it (trapezoids).
pub struct NvmlSensor {
    nvml: Arc<Nvml>,
    gpus: Vec<Gpu>,
    update_period: Duration,
    sampler: Option<Sampler>,
}

impl std::fmt::Debug for NvmlSensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSensor")
            .field("gpus", &self.gpus)
            .field("update_period", &self.update_period)
            .finish_non_exhaustive()
    }
}

impl NvmlSensor {
    /// Loads NVML, finds the pod's GPUs and takes a first reading of each.
    pub fn open(config: &NvmlConfig) -> Result<Self, EnergyError> {
        if config.visible == VisibleDevices::None {
            return Err(EnergyError::NoVisibleGpu(
                "NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES".to_string(),
            ));
        }
        let nvml = match &config.lib_path {
            Some(path) => Nvml::builder().lib_path(OsStr::new(path)).init(),
            None => Nvml::init(),
        }
        .map_err(EnergyError::nvml("init"))?;
        let nvml = Arc::new(nvml);
        let indices = select_devices(&nvml, &config.visible)?;
        let mut gpus = Vec::with_capacity(indices.len());
        let mut sampled = Vec::new();
        for (index, uuid) in indices {
            let device = nvml
                .device_by_index(index)
                .map_err(EnergyError::nvml("device_by_index"))?;
            let method = match device.total_energy_consumption() {
                Ok(raw) => Method::Counter {
                    counter: CounterTracker::new(raw, None),
                    refreshed_at: Instant::now(),
                    read_at: Instant::now(),
                    last_power_mw: None,
                },
                Err(NvmlError::NotSupported) => {
                    let first_mw = match device.power_usage() {
                        Ok(mw) => mw,
                        Err(NvmlError::NotSupported) => {
                            return Err(EnergyError::NothingToMeasure { uuid });
                        }
                        Err(e) => return Err(EnergyError::nvml("power_usage")(e)),
                    };
                    tracing::info!(%uuid, "GPU has no energy counter; integrating power samples");
                    let state = Arc::new(Mutex::new(Integrated {
                        last_mw: Some(first_mw),
                        last_at: Some(Instant::now()),
                        ..Integrated::default()
                    }));
                    sampled.push((index, state.clone()));
                    Method::Sampled(state)
                }
                Err(e) => return Err(EnergyError::nvml("total_energy_consumption")(e)),
            };
            gpus.push(Gpu {
                index,
                uuid,
                method,
                issued_uj: 0,
            });
        }
        let sampler = (!sampled.is_empty())
            .then(|| Sampler::start(nvml.clone(), sampled, config.power_sample_interval));
        Ok(Self {
            nvml,
            gpus,
            update_period: config.counter_update_period,
            sampler,
        })
    }

    /// UUIDs of the metered GPUs, in NVML index order.
    pub fn uuids(&self) -> Vec<String> {
        self.gpus.iter().map(|g| g.uuid.clone()).collect()
    }

    /// Power samples that failed in the sampler thread so far.
    pub fn sampling_errors(&self) -> u64 {
        self.gpus
            .iter()
            .filter_map(|g| match &g.method {
                Method::Sampled(s) => Some(s.lock().unwrap_or_else(PoisonError::into_inner).errors),
                Method::Counter { .. } => None,
            })
            .sum()
    }
}

impl EnergySensor for NvmlSensor {
    fn source(&self) -> EnergySource {
        EnergySource::Nvml
    }

    fn read(&mut self) -> Result<SensorReading, EnergyError> {
        let mut devices = Vec::with_capacity(self.gpus.len());
        let mut total_uj = 0u64;
        for gpu in &mut self.gpus {
            let now = Instant::now();
            let (estimate_uj, power_w) = match &mut gpu.method {
                Method::Counter {
                    counter,
                    refreshed_at,
                    read_at,
                    last_power_mw,
                } => {
                    let device = self
                        .nvml
                        .device_by_index(gpu.index)
                        .map_err(EnergyError::nvml("device_by_index"))?;
                    let raw_mj = device
                        .total_energy_consumption()
                        .map_err(EnergyError::nvml("total_energy_consumption"))?;
                    let before = counter.total();
                    counter.update(raw_mj);
                    if counter.total() != before {
                        // Refreshed somewhere after the last read and within one period of
                        // now, any moment as likely: the middle of that span is the unbiased guess.
                        let span = now
                            .saturating_duration_since(*read_at)
                            .min(self.update_period);
                        *refreshed_at = now.checked_sub(span / 2).unwrap_or(now);
                    }
                    *read_at = now;
                    let counted_uj = counter.total().saturating_mul(1_000);
                    // The counter holds energy up to its refresh; bridge from there to now with
                    // power. Past one period the driver should have refreshed, so no further.
                    let since = now
                        .saturating_duration_since(*refreshed_at)
                        .min(self.update_period);
                    if since >= Duration::from_millis(1) {
                        // A failed power read only loses the bridge, at the last known power.
                        if let Ok(mw) = device.power_usage() {
                            *last_power_mw = Some(mw);
                        }
                    }
                    let bridge = match *last_power_mw {
                        Some(mw) if since >= Duration::from_millis(1) => mw_times(mw, since),
                        _ => 0,
                    };
                    (
                        counted_uj.saturating_add(bridge),
                        last_power_mw.map(mw_to_w),
                    )
                }
                Method::Sampled(state) => {
                    let s = state.lock().unwrap_or_else(PoisonError::into_inner);
                    // Extend the integral from the last sample to now at the last power.
                    let tail = match (s.last_mw, s.last_at) {
                        (Some(mw), Some(at)) => mw_times(mw, now.saturating_duration_since(at)),
                        _ => 0,
                    };
                    (s.uj.saturating_add(tail), s.last_mw.map(mw_to_w))
                }
            };
            gpu.issued_uj = gpu.issued_uj.max(estimate_uj);
            total_uj = total_uj.saturating_add(gpu.issued_uj);
            devices.push(DeviceReading {
                id: gpu.uuid.clone(),
                hw_type: HwType::Gpu,
                energy_uj: gpu.issued_uj,
                power_w,
            });
        }
        Ok(SensorReading { total_uj, devices })
    }
}

fn mw_to_w(mw: u32) -> f64 {
    f64::from(mw) / 1e3
}

/// Microjoules drawn at `mw` milliwatts for `d`.
fn mw_times(mw: u32, d: Duration) -> u64 {
    (u128::from(mw) * d.as_micros() / 1_000) as u64
}

/// Resolves the visible-devices list to NVML indices and UUIDs.
fn select_devices(
    nvml: &Nvml,
    visible: &VisibleDevices,
) -> Result<Vec<(u32, String)>, EnergyError> {
    let count = nvml
        .device_count()
        .map_err(EnergyError::nvml("device_count"))?;
    let mut all = Vec::with_capacity(count as usize);
    for index in 0..count {
        let uuid = nvml
            .device_by_index(index)
            .and_then(|d| d.uuid())
            .map_err(EnergyError::nvml("device uuid"))?;
        all.push((index, uuid));
    }
    let ids = match visible {
        VisibleDevices::None => return Err(EnergyError::NoVisibleGpu("none".to_string())),
        VisibleDevices::All => {
            if all.is_empty() {
                return Err(EnergyError::NoVisibleGpu("NVML reports 0 GPUs".to_string()));
            }
            return Ok(all);
        }
        VisibleDevices::List(ids) => ids,
    };
    let numeric = ids.iter().all(|id| id.parse::<u32>().is_ok());
    if numeric && ids.len() == all.len() {
        // The container runtime already hid the other GPUs and NVML renumbered the rest from 0,
        // so host indices no longer match; every GPU NVML sees is ours.
        return Ok(all);
    }
    let available = || all.iter().map(|(_, u)| u.clone()).collect::<Vec<_>>();
    let mut chosen: Vec<(u32, String)> = Vec::with_capacity(ids.len());
    for id in ids {
        if id.starts_with("MIG-") {
            return Err(EnergyError::MigInstance(id.clone()));
        }
        let found = match id.parse::<u32>() {
            // NVML orders by PCI bus id, as CUDA does with CUDA_DEVICE_ORDER=PCI_BUS_ID.
            Ok(index) => all.iter().find(|(i, _)| *i == index),
            Err(_) => {
                let matches: Vec<_> = all
                    .iter()
                    .filter(|(_, u)| u.starts_with(id.as_str()))
                    .collect();
                // A prefix (CUDA accepts them) must name exactly one GPU.
                if matches.len() == 1 {
                    Some(matches[0])
                } else {
                    None
                }
            }
        };
        match found {
            Some(gpu) if !chosen.contains(gpu) => chosen.push(gpu.clone()),
            Some(_) => {}
            None => {
                return Err(EnergyError::DeviceNotFound {
                    id: id.clone(),
                    available: available(),
                });
            }
        }
    }
    Ok(chosen)
}

/// The power-sampling thread for GPUs without an energy counter.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(nvml: Arc<Nvml>, gpus: Vec<(u32, Arc<Mutex<Integrated>>)>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("nvml-power-sampler".to_string())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::park_timeout(every);
                    for (index, state) in &gpus {
                        let sample = nvml.device_by_index(*index).and_then(|d| d.power_usage());
                        let now = Instant::now();
                        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                        match sample {
                            Ok(mw) => {
                                if let (Some(prev), Some(at)) = (s.last_mw, s.last_at) {
                                    // Trapezoid: mean of the two samples over the interval.
                                    let mean = (u64::from(prev) + u64::from(mw)) / 2;
                                    let mean = u32::try_from(mean).unwrap_or(u32::MAX);
                                    s.uj =
                                        s.uj.saturating_add(mw_times(mean, now.duration_since(at)));
                                }
                                s.last_mw = Some(mw);
                                s.last_at = Some(now);
                            }
                            // A gap is bridged at the last known power when the next sample comes.
                            Err(_) => s.errors += 1,
                        }
                    }
                }
            });
        match thread {
            Ok(handle) => Self {
                stop,
                thread: Some(handle),
            },
            Err(e) => {
                // Without the thread readings extend the first sample: a flat-power estimate.
                tracing::error!(error = %e, "cannot start the NVML power sampler thread");
                Self { stop, thread: None }
            }
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

impl Drop for NvmlSensor {
    fn drop(&mut self) {
        // Stop the sampler before the last Arc<Nvml> goes, so nvmlShutdown runs after it.
        self.sampler.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_visible_devices() {
        assert_eq!(VisibleDevices::from_vars(None, None), VisibleDevices::All);
        assert_eq!(
            VisibleDevices::from_vars(Some("all"), Some("1")),
            VisibleDevices::All
        );
        assert_eq!(
            VisibleDevices::from_vars(Some("void"), None),
            VisibleDevices::None
        );
        assert_eq!(
            VisibleDevices::from_vars(None, Some("")),
            VisibleDevices::None
        );
        assert_eq!(
            VisibleDevices::from_vars(None, Some("-1")),
            VisibleDevices::None
        );
        assert_eq!(
            VisibleDevices::from_vars(Some("GPU-aa, GPU-bb"), None),
            VisibleDevices::List(vec!["GPU-aa".into(), "GPU-bb".into()])
        );
        assert_eq!(
            VisibleDevices::from_vars(None, Some("0,2")),
            VisibleDevices::List(vec!["0".into(), "2".into()])
        );
    }

    #[test]
    fn power_times_duration_in_microjoules() {
        assert_eq!(mw_times(250_000, Duration::from_millis(100)), 25_000_000);
        assert_eq!(mw_times(1, Duration::from_micros(999)), 0);
    }
}
