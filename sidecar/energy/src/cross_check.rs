//! Checks of the NVML meter against NVML itself, for GPU acceptance runs (`e2e/gpu-check`): the
//! energy counter's delta over a window beside power samples integrated over the same window,
//! through a handle of their own; and whether this process may set the GPU's power limit.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use crate::EnergyError;

fn open(lib_path: Option<&Path>) -> Result<Nvml, EnergyError> {
    match lib_path {
        Some(path) => Nvml::builder().lib_path(OsStr::new(path)).init(),
        None => Nvml::init(),
    }
    .map_err(EnergyError::nvml("init"))
}

/// Power samples integrated (trapezoids) per GPU.
#[derive(Debug, Default, Clone)]
struct Integral {
    joules: Vec<f64>,
    samples: u64,
    errors: u64,
    power_read: Vec<Duration>,
}

/// The energy counters' delta and the integrated power samples of the given GPUs over one
/// window, from [`PowerIntegrator::start`] to [`PowerIntegrator::finish`].
pub struct PowerIntegrator {
    nvml: Arc<Nvml>,
    uuids: Vec<String>,
    counter_start: Vec<u64>,
    started: Instant,
    stop: Arc<AtomicBool>,
    integral: Arc<Mutex<Integral>>,
    sampler: Option<JoinHandle<()>>,
    every: Duration,
}

/// What a [`PowerIntegrator`] saw.
#[derive(Debug, Clone)]
pub struct CrossCheck {
    /// Seconds between start and finish.
    pub window_s: f64,
    /// The energy counters' delta, summed over the GPUs.
    pub counter_j: f64,
    /// Power samples integrated over the window, summed over the GPUs.
    pub integrated_j: f64,
    /// Power samples taken, and failed reads.
    pub samples: u64,
    pub sample_errors: u64,
    /// How long reading power took: median and 99th percentile.
    pub power_read_p50: Duration,
    pub power_read_p99: Duration,
    /// How often the samples were taken.
    pub sample_every: Duration,
}

impl CrossCheck {
    /// The integrated figure's difference from the counter's, in percent of the counter's
    /// (NaN when the counter did not move).
    pub fn diff_pct(&self) -> f64 {
        if self.counter_j > 0.0 {
            (self.integrated_j - self.counter_j) / self.counter_j * 100.0
        } else {
            f64::NAN
        }
    }
}

/// The `p` quantile of sorted durations (zero when empty).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

impl PowerIntegrator {
    /// Reads the counters of `uuids` and starts sampling their power every `every`.
    pub fn start(
        lib_path: Option<&Path>,
        uuids: &[String],
        every: Duration,
    ) -> Result<Self, EnergyError> {
        let nvml = Arc::new(open(lib_path)?);
        let counter_start = counters(&nvml, uuids)?;
        let stop = Arc::new(AtomicBool::new(false));
        let integral = Arc::new(Mutex::new(Integral {
            joules: vec![0.0; uuids.len()],
            ..Integral::default()
        }));
        let sampler = {
            let (nvml, stop, integral, uuids) =
                (nvml.clone(), stop.clone(), integral.clone(), uuids.to_vec());
            std::thread::spawn(move || sample(&nvml, &uuids, &stop, &integral, every))
        };
        Ok(Self {
            nvml,
            uuids: uuids.to_vec(),
            counter_start,
            started: Instant::now(),
            stop,
            integral,
            sampler: Some(sampler),
            every,
        })
    }

    /// Stops sampling and reads the counters again.
    pub fn finish(mut self) -> Result<CrossCheck, EnergyError> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
        let counter_end = counters(&self.nvml, &self.uuids)?;
        let window_s = self.started.elapsed().as_secs_f64();
        let counter_j = self
            .counter_start
            .iter()
            .zip(&counter_end)
            .map(|(a, b)| b.saturating_sub(*a) as f64 / 1e3)
            .sum();
        let g = self
            .integral
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut reads = g.power_read;
        reads.sort();
        Ok(CrossCheck {
            window_s,
            counter_j,
            integrated_j: g.joules.iter().sum(),
            samples: g.samples,
            sample_errors: g.errors,
            power_read_p50: percentile(&reads, 0.5),
            power_read_p99: percentile(&reads, 0.99),
            sample_every: self.every,
        })
    }
}

impl Drop for PowerIntegrator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The energy counters (mJ) of `uuids`.
fn counters(nvml: &Nvml, uuids: &[String]) -> Result<Vec<u64>, EnergyError> {
    uuids
        .iter()
        .map(|u| {
            nvml.device_by_uuid(u.as_str())
                .and_then(|d| d.total_energy_consumption())
                .map_err(EnergyError::nvml("total_energy_consumption"))
        })
        .collect()
}

fn sample(
    nvml: &Nvml,
    uuids: &[String],
    stop: &AtomicBool,
    integral: &Mutex<Integral>,
    every: Duration,
) {
    let mut last: Vec<Option<(Instant, f64)>> = vec![None; uuids.len()];
    while !stop.load(Ordering::Relaxed) {
        for (i, uuid) in uuids.iter().enumerate() {
            let t0 = Instant::now();
            let watts = nvml
                .device_by_uuid(uuid.as_str())
                .and_then(|d| d.power_usage())
                .map(|mw| f64::from(mw) / 1e3);
            let took = t0.elapsed();
            let mut g = integral.lock().unwrap_or_else(PoisonError::into_inner);
            g.power_read.push(took);
            match watts {
                Ok(w) => {
                    let now = Instant::now();
                    if let Some((at, prev)) = last[i] {
                        g.joules[i] += (prev + w) / 2.0 * now.duration_since(at).as_secs_f64();
                    }
                    last[i] = Some((now, w));
                    g.samples += 1;
                }
                Err(_) => g.errors += 1,
            }
        }
        std::thread::sleep(every);
    }
}

/// Whether this process may set a GPU's power limit (`nvmlDeviceSetPowerManagementLimit`), as
/// the budget controller would to cap a pod's draw instead of shedding depth.
#[derive(Debug, Clone, PartialEq)]
pub enum PowerLimitAccess {
    /// Setting the current limit again succeeded; the limit and its allowed range, watts.
    Permitted {
        limit_w: f64,
        min_w: f64,
        max_w: f64,
    },
    /// NVML refused: the error's words (no permission is the usual one in a container).
    Refused { reason: String },
}

/// Tries to set the GPU's power limit to what it is now (a no-op when permitted).
pub fn power_limit_access(
    lib_path: Option<&Path>,
    uuid: &str,
) -> Result<PowerLimitAccess, EnergyError> {
    let nvml = open(lib_path)?;
    let mut device = nvml
        .device_by_uuid(uuid)
        .map_err(EnergyError::nvml("device_by_uuid"))?;
    let refused = |e: NvmlError| PowerLimitAccess::Refused {
        reason: e.to_string(),
    };
    let limit = match device.power_management_limit() {
        Ok(mw) => mw,
        Err(e) => return Ok(refused(e)),
    };
    let (min, max) = match device.power_management_limit_constraints() {
        Ok(c) => (c.min_limit, c.max_limit),
        Err(_) => (limit, limit),
    };
    Ok(match device.set_power_management_limit(limit) {
        Ok(()) => PowerLimitAccess::Permitted {
            limit_w: f64::from(limit) / 1e3,
            min_w: f64::from(min) / 1e3,
            max_w: f64::from(max) / 1e3,
        },
        Err(e) => refused(e),
    })
}
