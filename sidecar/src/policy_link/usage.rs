//! Cumulative usage of this sidecar since it started: what the energy reports carry.

use std::sync::atomic::{AtomicU64, Ordering};

/// Joules are counted in whole microjoules so that adding is one atomic `fetch_add`
/// (u64 microjoules hold 1.8e13 J, about 5 GWh).
const MICROJOULES_PER_JOULE: f64 = 1e6;
/// Bit pattern meaning "no power figure" in the watts cell (a NaN no meter produces).
const NO_WATTS: u64 = u64::MAX;

/// Cumulative energy, requests and TTC samples since the sidecar started, plus the current power.
///
/// Lock-free: recording is a few atomic adds, so the request path never waits on the reporter.
/// Share it through an `Arc`.
#[derive(Debug)]
pub struct UsageCounters {
    microjoules: AtomicU64,
    requests: AtomicU64,
    samples: AtomicU64,
    watts_bits: AtomicU64,
}

/// A reading of [`UsageCounters`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsageTotals {
    /// Joules spent since the sidecar started.
    pub joules_total: f64,
    /// Requests completed since the sidecar started.
    pub requests_total: u64,
    /// TTC samples generated since the sidecar started.
    pub samples_total: u64,
}

impl Default for UsageCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl UsageCounters {
    /// Counters at zero, with no power figure.
    pub fn new() -> Self {
        Self {
            microjoules: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            watts_bits: AtomicU64::new(NO_WATTS),
        }
    }

    /// Counts one completed request that spent `joules` over `samples` TTC samples. A negative
    /// or non-finite `joules` (a meter glitch) counts as zero so that the counter never goes down.
    pub fn record_request(&self, joules: f64, samples: u64) {
        let microjoules = if joules.is_finite() && joules > 0.0 {
            // Saturating float-to-int conversion: an absurd figure cannot wrap the counter.
            (joules * MICROJOULES_PER_JOULE).round() as u64
        } else {
            0
        };
        self.microjoules.fetch_add(microjoules, Ordering::Relaxed);
        self.samples.fetch_add(samples, Ordering::Relaxed);
        // Released last: a reader that sees this request also sees its joules and samples.
        self.requests.fetch_add(1, Ordering::Release);
    }

    /// Sets the current power draw of the pod's inference, in watts (`None`: no figure; a
    /// negative or non-finite value also counts as none).
    pub fn set_watts(&self, watts: Option<f64>) {
        let bits = match watts {
            Some(w) if w.is_finite() && w >= 0.0 => w.to_bits(),
            _ => NO_WATTS,
        };
        self.watts_bits.store(bits, Ordering::Relaxed);
    }

    /// The current power draw, if one was set.
    pub fn watts(&self) -> Option<f64> {
        match self.watts_bits.load(Ordering::Relaxed) {
            NO_WATTS => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    /// The totals so far. Each counted request's joules and samples are included; joules and
    /// samples of a request being recorded concurrently may be included before it is counted.
    pub fn snapshot(&self) -> UsageTotals {
        let requests_total = self.requests.load(Ordering::Acquire);
        let samples_total = self.samples.load(Ordering::Relaxed);
        let microjoules = self.microjoules.load(Ordering::Relaxed);
        UsageTotals {
            joules_total: microjoules as f64 / MICROJOULES_PER_JOULE,
            requests_total,
            samples_total,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn counters_start_at_zero_and_add_up() {
        let counters = UsageCounters::new();
        assert_eq!(
            counters.snapshot(),
            UsageTotals {
                joules_total: 0.0,
                requests_total: 0,
                samples_total: 0
            }
        );
        counters.record_request(1.25, 4);
        counters.record_request(0.5, 1);
        let totals = counters.snapshot();
        assert!((totals.joules_total - 1.75).abs() < 1e-9, "{totals:?}");
        assert_eq!(totals.requests_total, 2);
        assert_eq!(totals.samples_total, 5);
    }

    #[test]
    fn bad_joules_count_the_request_but_no_energy() {
        let counters = UsageCounters::new();
        counters.record_request(2.0, 1);
        counters.record_request(-3.0, 1);
        counters.record_request(f64::NAN, 1);
        counters.record_request(f64::INFINITY, 1);
        let totals = counters.snapshot();
        assert!((totals.joules_total - 2.0).abs() < 1e-9, "{totals:?}");
        assert_eq!(totals.requests_total, 4);
        assert_eq!(totals.samples_total, 4);
    }

    #[test]
    fn watts_are_optional() {
        let counters = UsageCounters::new();
        assert_eq!(counters.watts(), None);
        counters.set_watts(Some(42.5));
        assert_eq!(counters.watts(), Some(42.5));
        counters.set_watts(Some(f64::NAN));
        assert_eq!(counters.watts(), None);
        counters.set_watts(Some(3.0));
        counters.set_watts(None);
        assert_eq!(counters.watts(), None);
    }

    #[test]
    fn concurrent_recording_loses_nothing() {
        let counters = Arc::new(UsageCounters::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counters = counters.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        counters.record_request(0.001, 3);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("recording thread");
        }
        let totals = counters.snapshot();
        assert_eq!(totals.requests_total, 40_000);
        assert_eq!(totals.samples_total, 120_000);
        assert!((totals.joules_total - 40.0).abs() < 1e-6, "{totals:?}");
    }
}
