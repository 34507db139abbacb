//! Where energy figures come from.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where an energy figure comes from. An estimate is never shown as a measurement. Serialised as
/// `nvml`, `rapl` or `estimate`, in the sidecar's APIs and in the InferencePolicy API alike.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum EnergySource {
    /// Measured by the GPU's NVML energy counter.
    Nvml,
    /// Measured by the CPU's RAPL (powercap) counters.
    Rapl,
    /// Estimated from CPU time and a declared watts-per-core figure.
    Estimate,
}

impl EnergySource {
    /// The label used in APIs, metrics, logs and status (`nvml`, `rapl`, `estimate`).
    pub fn as_str(self) -> &'static str {
        match self {
            EnergySource::Nvml => "nvml",
            EnergySource::Rapl => "rapl",
            EnergySource::Estimate => "estimate",
        }
    }

    /// Parses a label value; `None` for anything else.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "nvml" => Some(Self::Nvml),
            "rapl" => Some(Self::Rapl),
            "estimate" => Some(Self::Estimate),
            _ => None,
        }
    }

    /// Whether figures from this source were measured by hardware.
    pub fn is_measured(self) -> bool {
        !matches!(self, EnergySource::Estimate)
    }

    /// The source of an aggregate of figures: measured only when every part is measured.
    pub fn combine(self, other: Self) -> Self {
        if self == Self::Estimate || other == Self::Estimate {
            Self::Estimate
        } else if self == other {
            self
        } else {
            // nvml and rapl mixed: both measured; report the GPU meter, which dominates.
            Self::Nvml
        }
    }
}

impl std::fmt::Display for EnergySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
