use serde::{Deserialize, Serialize};

use crate::meter::RequestEnergy;
use crate::{EnergySource, uj_to_j};

/// What a response's `usage` says about energy: `{"joules": 1.25, "source": "nvml"}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EnergyUsage {
    /// The request's joules.
    pub joules: f64,
    /// Where they came from; `estimate` if any part was estimated.
    pub source: EnergySource,
}

/// Adds up one request's shares over the batches it took part in (with continuous batching,
/// every decode step is a batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestTally {
    energy_uj: u64,
    source: Option<EnergySource>,
}

impl RequestTally {
    /// Adds one batch's share.
    pub fn add<R>(&mut self, share: &RequestEnergy<R>) {
        self.energy_uj = self.energy_uj.saturating_add(share.energy_uj);
        self.source = Some(match self.source {
            // One estimated part makes the whole figure an estimate.
            Some(EnergySource::Estimate) => EnergySource::Estimate,
            Some(_) if share.source == EnergySource::Estimate => EnergySource::Estimate,
            Some(s) => s,
            None => share.source,
        });
    }

    /// Microjoules so far.
    pub fn energy_uj(&self) -> u64 {
        self.energy_uj
    }

    /// The figure for the response, once at least one share was added.
    pub fn usage(&self) -> Option<EnergyUsage> {
        self.source.map(|source| EnergyUsage {
            joules: uj_to_j(self.energy_uj),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(energy_uj: u64, source: EnergySource) -> RequestEnergy<()> {
        RequestEnergy {
            request_id: (),
            tokens: 1,
            energy_uj,
            source,
        }
    }

    #[test]
    fn sums_shares_and_an_estimate_taints_the_whole() {
        let mut tally = RequestTally::default();
        assert_eq!(tally.usage(), None);
        tally.add(&share(1_500_000, EnergySource::Nvml));
        tally.add(&share(500_000, EnergySource::Nvml));
        assert_eq!(
            tally.usage(),
            Some(EnergyUsage {
                joules: 2.0,
                source: EnergySource::Nvml
            })
        );
        tally.add(&share(1, EnergySource::Estimate));
        tally.add(&share(1, EnergySource::Nvml));
        let usage = tally.usage().unwrap();
        assert_eq!(usage.source, EnergySource::Estimate);
        assert_eq!(tally.energy_uj(), 2_000_002);
        assert_eq!(
            serde_json::to_string(&usage).unwrap(),
            r#"{"joules":2.000002,"source":"estimate"}"#
        );
    }
}
