use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::attribution::split_by_tokens;
use crate::estimate::{EstimateModel, EstimateSensor};
use crate::nvml::{NvmlConfig, NvmlSensor};
use crate::rapl::{RaplConfig, RaplSensor};
use crate::sensor::{DeviceReading, EnergySensor};
use crate::{EnergyError, EnergySource, uj_to_j};

/// Which source to meter with; `auto` tries nvml, then rapl, then falls back to estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceChoice {
    /// The first source that works: nvml, rapl, estimate.
    #[default]
    Auto,
    /// NVML only; start-up fails without it.
    Nvml,
    /// RAPL only; start-up fails without it.
    Rapl,
    /// The declared estimate.
    Estimate,
}

impl FromStr for SourceChoice {
    type Err = EnergyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(SourceChoice::Auto),
            "nvml" => Ok(SourceChoice::Nvml),
            "rapl" => Ok(SourceChoice::Rapl),
            "estimate" => Ok(SourceChoice::Estimate),
            _ => Err(EnergyError::UnknownSource(s.to_string())),
        }
    }
}

/// Start-up configuration of the meter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeterConfig {
    /// Which source to use.
    pub source: SourceChoice,
    /// NVML settings.
    pub nvml: NvmlConfig,
    /// RAPL settings.
    pub rapl: RaplConfig,
    /// The estimate model, used when chosen and for windows whose closing read failed.
    pub estimate: EstimateModel,
}

/// One request's share of a batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestEnergy<R> {
    /// The engine's request identifier.
    pub request_id: R,
    /// Tokens this request processed in the batch (prompt and generated).
    pub tokens: u64,
    /// Its share, in microjoules.
    pub energy_uj: u64,
    /// Where the figure came from.
    pub source: EnergySource,
}

impl<R> RequestEnergy<R> {
    /// Its share in joules.
    pub fn joules(&self) -> f64 {
        uj_to_j(self.energy_uj)
    }
}

/// The energy of one finished batch and its split among the batch's requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchEnergy<R> {
    /// The batch's energy in microjoules; the requests' shares add up to it exactly.
    pub energy_uj: u64,
    /// `estimate` when any part of the batch could not be measured, else the meter's source.
    pub source: EnergySource,
    /// Wall time from `begin_batch` to `finish`.
    pub duration: Duration,
    /// Per-request shares, in the order given to `finish`.
    pub requests: Vec<RequestEnergy<R>>,
}

impl<R> BatchEnergy<R> {
    /// The batch's energy in joules.
    pub fn joules(&self) -> f64 {
        uj_to_j(self.energy_uj)
    }
}

/// Where all energy read so far went. `requests_uj + idle_uj + unattributed_uj + in_flight_uj`
/// equals `metered_uj + pending_estimate_uj`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeterTotals {
    /// The meter's source.
    pub source: EnergySource,
    /// What the sensor counted since the meter started.
    pub metered_uj: u64,
    /// Shared out to requests.
    pub requests_uj: u64,
    /// Of `requests_uj`, estimated because a read failed (labelled `estimate` on the requests).
    pub estimated_uj: u64,
    /// Spent while no batch ran.
    pub idle_uj: u64,
    /// Spent in batches finished without requests or dropped without `finish`.
    pub unattributed_uj: u64,
    /// Accumulated by batches still running.
    pub in_flight_uj: u64,
    /// Estimates handed out whose span the sensor has not read yet; later readings pay them
    /// back, so this returns to zero once reads succeed again.
    pub pending_estimate_uj: u64,
    /// Sensor reads that failed.
    pub read_errors: u64,
    /// Per-device cumulative energy and power at the last successful read.
    #[serde(skip)]
    pub devices: Vec<DeviceReading>,
}

impl MeterTotals {
    /// All energy so far (microjoules) by the source of its figure: estimates handed out when a
    /// read failed count under `estimate`, the rest under the meter's source. Each entry only
    /// grows, and they add up to `metered_uj + pending_estimate_uj`. Sources with nothing to
    /// report are left out, so a measuring meter never shows an empty `estimate` entry.
    pub fn by_source(&self) -> Vec<(EnergySource, u64)> {
        let all = self.metered_uj + self.pending_estimate_uj;
        if self.source == EnergySource::Estimate {
            return vec![(EnergySource::Estimate, all)];
        }
        let mut out = vec![(self.source, all - self.estimated_uj.min(all))];
        if self.estimated_uj > 0 {
            out.push((EnergySource::Estimate, self.estimated_uj));
        }
        out
    }

    /// Current power draw of all metered devices, where the source reports one.
    pub fn power_w(&self) -> Option<f64> {
        let powers: Vec<f64> = self.devices.iter().filter_map(|d| d.power_w).collect();
        (!powers.is_empty()).then(|| powers.iter().sum())
    }
}

#[derive(Debug)]
struct Active {
    id: u64,
    started: Instant,
    acc_uj: u64,
    estimated: bool,
}

struct Ledger {
    sensor: Box<dyn EnergySensor>,
    source: EnergySource,
    estimate_watts: f64,
    start_uj: u64,
    last_uj: u64,
    last_at: Instant,
    /// Average power over the last measured span: the best guess when a read fails.
    last_power_w: f64,
    devices: Vec<DeviceReading>,
    active: Vec<Active>,
    next_id: u64,
    requests_uj: u64,
    estimated_uj: u64,
    idle_uj: u64,
    unattributed_uj: u64,
    pending_estimate_uj: u64,
    read_errors: u64,
}

impl Ledger {
    /// Reads the sensor and books the energy since the last good read to the running batches
    /// (equally, since their tokens are not known yet) or, with none running, to idle.
    fn boundary(&mut self) -> Result<(), EnergyError> {
        let reading = match self.sensor.read() {
            Ok(r) => r,
            Err(e) => {
                self.read_errors += 1;
                tracing::warn!(error = %e, source = %self.source, "energy read failed");
                return Err(e);
            }
        };
        let now = Instant::now();
        let delta = reading.total_uj.saturating_sub(self.last_uj);
        let span = now.duration_since(self.last_at).as_secs_f64();
        if span > 0.0 {
            self.last_power_w = delta as f64 / 1e6 / span;
        }
        // Spans that were estimated when a read failed are in this delta too: pay them back first.
        let repaid = delta.min(self.pending_estimate_uj);
        self.pending_estimate_uj -= repaid;
        let fresh = delta - repaid;
        if self.active.is_empty() {
            self.idle_uj += fresh;
        } else {
            let shares = split_by_tokens(fresh, &vec![1; self.active.len()]);
            for (batch, share) in self.active.iter_mut().zip(shares) {
                batch.acc_uj += share;
            }
        }
        self.last_uj = self.last_uj.max(reading.total_uj);
        self.last_at = now;
        self.devices = reading.devices;
        Ok(())
    }
}

/// The sidecar's energy meter. Cheap to clone; all clones share one sensor and ledger.
#[derive(Clone)]
pub struct EnergyMeter {
    ledger: Arc<Mutex<Ledger>>,
    source: EnergySource,
}

impl std::fmt::Debug for EnergyMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnergyMeter")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl EnergyMeter {
    /// Opens the configured source. With `auto`, the first of nvml, rapl and estimate that
    /// opens is used and the others' failures are logged.
    pub fn from_config(config: &MeterConfig) -> Result<Self, EnergyError> {
        let sensor: Box<dyn EnergySensor> = match config.source {
            SourceChoice::Nvml => Box::new(NvmlSensor::open(&config.nvml)?),
            SourceChoice::Rapl => Box::new(RaplSensor::open(&config.rapl)?),
            SourceChoice::Estimate => Box::new(EstimateSensor::new(config.estimate)?),
            SourceChoice::Auto => match NvmlSensor::open(&config.nvml) {
                Ok(s) => Box::new(s),
                Err(nvml) => match RaplSensor::open(&config.rapl) {
                    Ok(s) => {
                        tracing::info!(%nvml, "energy source: rapl");
                        Box::new(s)
                    }
                    Err(rapl) => {
                        tracing::warn!(%nvml, %rapl, "nothing to measure energy with; figures are estimates");
                        Box::new(EstimateSensor::new(config.estimate)?)
                    }
                },
            },
        };
        Self::with_sensor(sensor, config.estimate)
    }

    /// Meters with the given sensor. `fallback` prices windows whose closing read failed when no
    /// power has been measured yet.
    pub fn with_sensor(
        mut sensor: Box<dyn EnergySensor>,
        fallback: EstimateModel,
    ) -> Result<Self, EnergyError> {
        let first = sensor.read()?;
        let source = sensor.source();
        let ledger = Ledger {
            sensor,
            source,
            estimate_watts: fallback.idle_watts + fallback.watts_per_core,
            start_uj: first.total_uj,
            last_uj: first.total_uj,
            last_at: Instant::now(),
            last_power_w: 0.0,
            devices: first.devices,
            active: Vec::new(),
            next_id: 0,
            requests_uj: 0,
            estimated_uj: 0,
            idle_uj: 0,
            unattributed_uj: 0,
            pending_estimate_uj: 0,
            read_errors: 0,
        };
        Ok(Self {
            ledger: Arc::new(Mutex::new(ledger)),
            source,
        })
    }

    /// The source chosen at start-up.
    pub fn source(&self) -> EnergySource {
        self.source
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // A panic while booking leaves numbers, not broken invariants of memory; keep metering.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the start of a batch. Energy from now until [`BatchGuard::finish`] is the batch's
    /// (shared equally with any batch running at the same time). Never fails: a failed read
    /// books the gap to this batch at the next good read.
    pub fn begin_batch(&self) -> BatchGuard {
        let mut ledger = self.lock();
        let _ = ledger.boundary();
        let id = ledger.next_id;
        ledger.next_id += 1;
        let started = Instant::now();
        ledger.active.push(Active {
            id,
            started,
            acc_uj: 0,
            estimated: false,
        });
        BatchGuard {
            meter: self.clone(),
            id,
            started,
            finished: false,
        }
    }

    /// Reads the sensor (booking the time since the last read to idle or running batches) and
    /// returns where all energy went.
    pub fn totals(&self) -> MeterTotals {
        let mut ledger = self.lock();
        let _ = ledger.boundary();
        MeterTotals {
            source: ledger.source,
            metered_uj: ledger.last_uj - ledger.start_uj,
            requests_uj: ledger.requests_uj,
            estimated_uj: ledger.estimated_uj,
            idle_uj: ledger.idle_uj,
            unattributed_uj: ledger.unattributed_uj,
            in_flight_uj: ledger.active.iter().map(|a| a.acc_uj).sum(),
            pending_estimate_uj: ledger.pending_estimate_uj,
            read_errors: ledger.read_errors,
            devices: ledger.devices.clone(),
        }
    }

    /// Ends batch `id` and books its energy to requests (or, with none, as unattributed) in
    /// the same critical section, so `totals()` never sees it in neither place.
    fn close(&self, id: u64, has_requests: bool) -> Option<(Active, EnergySource)> {
        let mut ledger = self.lock();
        let read = ledger.boundary();
        let pos = ledger.active.iter().position(|a| a.id == id)?;
        let mut batch = ledger.active.swap_remove(pos);
        if read.is_err() {
            // The closing read failed: price the unread tail at the last measured power (or the
            // estimate model before any) and label the batch an estimate. The sensor's next good
            // read covers that tail again; `pending_estimate_uj` makes sure it is not paid twice.
            let since = ledger.last_at.max(batch.started);
            let watts = if ledger.last_power_w > 0.0 {
                ledger.last_power_w
            } else {
                ledger.estimate_watts
            };
            let tail = (watts * since.elapsed().as_secs_f64() * 1e6) as u64;
            batch.acc_uj += tail;
            ledger.pending_estimate_uj += tail;
            batch.estimated = true;
        }
        let source = if batch.estimated {
            EnergySource::Estimate
        } else {
            ledger.source
        };
        if has_requests {
            ledger.requests_uj += batch.acc_uj;
            if batch.estimated {
                ledger.estimated_uj += batch.acc_uj;
            }
        } else {
            ledger.unattributed_uj += batch.acc_uj;
        }
        Some((batch, source))
    }
}

/// A running batch. Call [`finish`](Self::finish) when it is done; dropping it unfinished books
/// its energy as unattributed.
#[must_use = "a batch's energy is only attributed when it is finished"]
pub struct BatchGuard {
    meter: EnergyMeter,
    id: u64,
    started: Instant,
    finished: bool,
}

impl std::fmt::Debug for BatchGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchGuard")
            .field("id", &self.id)
            .field("started", &self.started)
            .finish()
    }
}

impl BatchGuard {
    /// Ends the batch and shares its energy among `requests` (request id, tokens processed in
    /// this batch) in proportion to their tokens.
    pub fn finish<R: Clone>(mut self, requests: &[(R, u64)]) -> BatchEnergy<R> {
        self.finished = true;
        let duration = self.started.elapsed();
        let Some((batch, source)) = self.meter.close(self.id, !requests.is_empty()) else {
            // Unreachable while guards are only made by begin_batch; report nothing measured.
            return BatchEnergy {
                energy_uj: 0,
                source: EnergySource::Estimate,
                duration,
                requests: Vec::new(),
            };
        };
        let tokens: Vec<u64> = requests.iter().map(|(_, t)| *t).collect();
        let shares = split_by_tokens(batch.acc_uj, &tokens);
        BatchEnergy {
            energy_uj: batch.acc_uj,
            source,
            duration,
            requests: requests
                .iter()
                .zip(shares)
                .map(|((id, tokens), energy_uj)| RequestEnergy {
                    request_id: id.clone(),
                    tokens: *tokens,
                    energy_uj,
                    source,
                })
                .collect(),
        }
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        if !self.finished {
            // Booked as unattributed: nobody said which requests it served.
            let _ = self.meter.close(self.id, false);
        }
    }
}
