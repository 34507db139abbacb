use std::time::Instant;

use crate::sensor::{DeviceReading, EnergySensor, HwType, SensorReading};
use crate::{EnergyError, EnergySource};

/// The declared model behind the `estimate` source: energy = CPU seconds of this process x
/// `watts_per_core` + wall seconds x `idle_watts`. Nothing here is measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EstimateModel {
    /// Watts one fully busy core draws.
    pub watts_per_core: f64,
    /// Watts drawn regardless of load (the share of the machine this pod stands for).
    pub idle_watts: f64,
}

impl Default for EstimateModel {
    /// Server cores draw roughly 5-10 W each under load; the idle share is left at zero so that
    /// an unconfigured pod does not invent a baseline.
    fn default() -> Self {
        Self {
            watts_per_core: 7.5,
            idle_watts: 0.0,
        }
    }
}

type CpuClock = Box<dyn FnMut() -> Result<f64, EnergyError> + Send>;

/// Estimates this process's energy from its CPU time; always labelled [`EnergySource::Estimate`].
pub struct EstimateSensor {
    model: EstimateModel,
    cpu_seconds: CpuClock,
    started_cpu: f64,
    started: Instant,
    last_uj: u64,
}

impl std::fmt::Debug for EstimateSensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EstimateSensor")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl EstimateSensor {
    /// Estimates from this process's CPU time (getrusage).
    pub fn new(model: EstimateModel) -> Result<Self, EnergyError> {
        Self::with_cpu_clock(model, process_cpu_seconds)
    }

    /// Estimates from the given CPU-seconds clock (tests use a scripted one).
    pub fn with_cpu_clock(
        model: EstimateModel,
        mut cpu_seconds: impl FnMut() -> Result<f64, EnergyError> + Send + 'static,
    ) -> Result<Self, EnergyError> {
        let valid = |w: f64| w.is_finite() && w >= 0.0;
        if !valid(model.watts_per_core) || !valid(model.idle_watts) {
            return Err(EnergyError::InvalidModel(format!(
                "watts per core ({}) and idle watts ({}) must be finite and not negative",
                model.watts_per_core, model.idle_watts
            )));
        }
        let started_cpu = cpu_seconds()?;
        Ok(Self {
            model,
            cpu_seconds: Box::new(cpu_seconds),
            started_cpu,
            started: Instant::now(),
            last_uj: 0,
        })
    }
}

impl EnergySensor for EstimateSensor {
    fn source(&self) -> EnergySource {
        EnergySource::Estimate
    }

    fn read(&mut self) -> Result<SensorReading, EnergyError> {
        let cpu = ((self.cpu_seconds)()? - self.started_cpu).max(0.0);
        let wall = self.started.elapsed().as_secs_f64();
        let joules = cpu * self.model.watts_per_core + wall * self.model.idle_watts;
        // Clocks are monotone, but float rounding must never make the total go backwards.
        self.last_uj = self.last_uj.max((joules * 1e6) as u64);
        let power_w = None;
        Ok(SensorReading {
            total_uj: self.last_uj,
            devices: vec![DeviceReading {
                id: "process".to_string(),
                hw_type: HwType::Process,
                energy_uj: self.last_uj,
                power_w,
            }],
        })
    }
}

/// User plus system CPU time of this process, all threads, in seconds.
fn process_cpu_seconds() -> Result<f64, EnergyError> {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return Err(EnergyError::CpuTime(std::io::Error::last_os_error()));
        }
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn cpu_time_times_watts_labelled_estimate() {
        let cpu = Arc::new(Mutex::new(10.0));
        let clock = cpu.clone();
        let model = EstimateModel {
            watts_per_core: 5.0,
            idle_watts: 0.0,
        };
        let mut sensor =
            EstimateSensor::with_cpu_clock(model, move || Ok(*clock.lock().unwrap())).unwrap();
        assert_eq!(sensor.source(), EnergySource::Estimate);
        *cpu.lock().unwrap() = 12.0;
        let reading = sensor.read().unwrap();
        assert_eq!(reading.total_uj, 10_000_000, "2 CPU seconds x 5 W");
        assert_eq!(reading.devices[0].hw_type, HwType::Process);
    }

    #[test]
    fn real_cpu_clock_advances_with_work() {
        let mut sensor = EstimateSensor::new(EstimateModel::default()).unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 50 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(sensor.read().unwrap().total_uj > 0);
    }

    #[test]
    fn rejects_negative_watts() {
        let model = EstimateModel {
            watts_per_core: -1.0,
            idle_watts: 0.0,
        };
        assert!(matches!(
            EstimateSensor::new(model),
            Err(EnergyError::InvalidModel(_))
        ));
    }
}
