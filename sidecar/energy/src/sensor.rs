use crate::{EnergyError, EnergySource};

/// What kind of hardware a device reading belongs to (the OTel `hw.type` attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HwType {
    /// A GPU (NVML).
    Gpu,
    /// A CPU package (RAPL).
    Cpu,
    /// The whole process, by the declared estimate model.
    Process,
}

impl HwType {
    /// The `hw.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            HwType::Gpu => "gpu",
            HwType::Cpu => "cpu",
            HwType::Process => "process",
        }
    }
}

/// One device's cumulative energy since the sensor started, and its latest power draw.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReading {
    /// Stable identifier (GPU UUID, RAPL domain name): the OTel `hw.id`.
    pub id: String,
    /// What the device is.
    pub hw_type: HwType,
    /// Microjoules since the sensor started; never decreases.
    pub energy_uj: u64,
    /// Latest known power draw in watts, where the source has one.
    pub power_w: Option<f64>,
}

/// A reading of all devices a sensor covers.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorReading {
    /// Sum of the devices' cumulative microjoules; never decreases between reads.
    pub total_uj: u64,
    /// Per-device figures.
    pub devices: Vec<DeviceReading>,
}

/// A source of cumulative energy. Implementations turn their hardware's counters (which wrap,
/// reset or update coarsely) into one monotone microjoule total since the sensor started.
pub trait EnergySensor: Send {
    /// Which source this is; every figure derived from it carries this label.
    fn source(&self) -> EnergySource;
    /// Reads all devices now.
    fn read(&mut self) -> Result<SensorReading, EnergyError>;
}

/// Folds raw readings of a hardware counter into a monotone total, across wraps and resets.
#[derive(Debug, Clone)]
pub(crate) struct CounterTracker {
    last_raw: u64,
    /// The value at which the hardware counter wraps to zero, where known (RAPL's
    /// max_energy_range_uj). Without it any decrease is taken as a reset to zero.
    wrap_at: Option<u64>,
    total: u64,
}

impl CounterTracker {
    pub(crate) fn new(first_raw: u64, wrap_at: Option<u64>) -> Self {
        Self {
            last_raw: first_raw,
            wrap_at,
            total: 0,
        }
    }

    /// Feeds a new raw value; returns the increase it represents.
    pub(crate) fn update(&mut self, raw: u64) -> u64 {
        let delta = if raw >= self.last_raw {
            raw - self.last_raw
        } else {
            match self.wrap_at {
                // Wrapped past the top of its range: count up to the top, then from zero.
                Some(top) if top >= self.last_raw => (top - self.last_raw) + raw,
                // A reset (driver reload, GPU reset): the counter restarted from zero.
                _ => raw,
            }
        };
        self.last_raw = raw;
        self.total = self.total.saturating_add(delta);
        delta
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_range_and_resets_without_one() {
        let mut rapl = CounterTracker::new(900, Some(1000));
        assert_eq!(rapl.update(950), 50);
        assert_eq!(rapl.update(20), 70);
        assert_eq!(rapl.total(), 120);

        let mut gpu = CounterTracker::new(5_000, None);
        assert_eq!(gpu.update(6_000), 1_000);
        assert_eq!(gpu.update(40), 40);
        assert_eq!(gpu.total(), 1_040);
    }
}
