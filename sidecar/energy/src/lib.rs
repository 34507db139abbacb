//! Energy meters and per-request attribution for the sidecar.
//!
//! One [`EnergyMeter`] is built at start-up from a [`MeterConfig`] and reads one of three
//! sources ([`EnergySource`]): the GPU's NVML energy counter, the host's RAPL counters, or a
//! declared estimate from CPU time. Every figure it hands out carries that source, so an estimate
//! is never shown as a measurement.
//!
//! The engine wraps each batch in [`EnergyMeter::begin_batch`] / [`BatchGuard::finish`]; the
//! batch's joules are shared among its requests by the tokens each processed, and energy spent
//! while no batch runs is booked as idle. Per-request figures, idle and unattributed energy add
//! up exactly (in microjoules) to what the meter read.
//!
//! ```
//! use ttc_energy::{EnergyMeter, EnergySource, MeterConfig, SourceChoice};
//!
//! # fn main() -> Result<(), ttc_energy::EnergyError> {
//! // At start-up: `auto` takes NVML, else RAPL, else the declared estimate.
//! let meter = EnergyMeter::from_config(&MeterConfig {
//!     source: SourceChoice::Estimate,
//!     ..MeterConfig::default()
//! })?;
//!
//! // Around each batch (one decode step, or one whole generate call) of the engine:
//! let guard = meter.begin_batch();
//! // ... run the batch ...
//! let batch = guard.finish(&[("req-1", 120), ("req-2", 40)]); // tokens processed in it
//! let mut tally = ttc_energy::RequestTally::default(); // one per request, kept by the engine
//! for r in &batch.requests {
//!     if r.request_id == "req-1" {
//!         tally.add(r);
//!     }
//! }
//! // In the response: "usage": {..., "energy": {"joules": ..., "source": "estimate"}}
//! let usage = tally.usage().expect("req-1 took part in a batch");
//! assert_eq!(usage.source, EnergySource::Estimate);
//! assert_eq!(batch.requests.iter().map(|r| r.energy_uj).sum::<u64>(), batch.energy_uj);
//! assert_eq!(batch.source, EnergySource::Estimate);
//!
//! // Where all energy went; telemetry reads this too.
//! let totals = meter.totals();
//! assert_eq!(totals.requests_uj + totals.idle_uj, totals.metered_uj);
//! # Ok(())
//! # }
//! ```

mod attribution;
pub mod cross_check;
mod error;
mod estimate;
mod meter;
mod nvml;
mod rapl;
mod sensor;
mod usage;

pub use attribution::split_by_tokens;
pub use error::EnergyError;
pub use estimate::{EstimateModel, EstimateSensor};
pub use meter::{
    BatchEnergy, BatchGuard, EnergyMeter, MeterConfig, MeterTotals, RequestEnergy, SourceChoice,
};
pub use nvml::{NvmlConfig, NvmlSensor, VisibleDevices};
pub use rapl::{RaplConfig, RaplSensor};
pub use sensor::{DeviceReading, EnergySensor, HwType, SensorReading};
pub use usage::{EnergyUsage, RequestTally};

/// Where a figure comes from: part of the InferencePolicy API, which reports it.
pub use ttc_api::EnergySource;

/// Microjoules to joules.
pub fn uj_to_j(uj: u64) -> f64 {
    uj as f64 / 1e6
}
