//! The operator's own Prometheus metrics (labels are bounded: outcomes and error kinds, never
//! object names).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// All metrics of the operator and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciliations by outcome (`ok`, `error`, `skipped_not_leader`).
    pub reconciliations: Family<Labels, Counter>,
    /// Reconcile failures by error kind.
    pub reconcile_errors: Family<Labels, Counter>,
    /// Reconcile duration, in seconds.
    pub reconcile_duration: Histogram,
    /// Status writes to the API server.
    pub status_writes: Counter,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// Admission reviews by outcome (`injected`, `skipped`, `overlapping`, `error`).
    pub admissions: Family<Labels, Counter>,
    /// Admission review latency, in seconds.
    pub admission_duration: Histogram,
    /// Energy reports by format (`otlp`, `json`) and outcome (`accepted`, `rejected`).
    pub reports: Family<Labels, Counter>,
    /// Policy objects skipped because they failed to parse.
    pub malformed_objects: Counter,
    /// Policies in the cache.
    pub policies: Gauge,
    /// Reconciles running now (the controller's queue as far as it is visible).
    pub reconciles_in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ttc_operator");
        let reconciliations = Family::<Labels, Counter>::default();
        let reconcile_errors = Family::<Labels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let status_writes = Counter::default();
        let leader = Gauge::default();
        let admissions = Family::<Labels, Counter>::default();
        let admission_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 14));
        let reports = Family::<Labels, Counter>::default();
        let malformed_objects = Counter::default();
        let policies = Gauge::default();
        let reconciles_in_flight = Gauge::default();
        registry.register(
            "reconciliations",
            "Reconciliations by outcome",
            reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile failures by error kind",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            reconcile_duration.clone(),
        );
        registry.register(
            "status_writes",
            "Policy status writes",
            status_writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "admissions",
            "Admission reviews by outcome",
            admissions.clone(),
        );
        registry.register(
            "admission_duration_seconds",
            "Admission review latency",
            admission_duration.clone(),
        );
        registry.register(
            "energy_reports",
            "Sidecar energy reports by format and outcome",
            reports.clone(),
        );
        registry.register(
            "malformed_objects",
            "Policy objects skipped because they failed to parse",
            malformed_objects.clone(),
        );
        registry.register(
            "policies",
            "InferencePolicies in the cache",
            policies.clone(),
        );
        registry.register(
            "reconciles_in_flight",
            "Reconciles running now",
            reconciles_in_flight.clone(),
        );
        Self {
            registry,
            reconciliations,
            reconcile_errors,
            reconcile_duration,
            status_writes,
            leader,
            admissions,
            admission_duration,
            reports,
            malformed_objects,
            policies,
            reconciles_in_flight,
        }
    }
}

impl Metrics {
    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts one reconciliation.
    pub fn reconciled(&self, outcome: &'static str) {
        self.reconciliations
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// Counts one reconcile failure.
    pub fn reconcile_failed(&self, error: &'static str) {
        self.reconcile_errors
            .get_or_create(&vec![("error", error)])
            .inc();
    }

    /// Counts one admission review.
    pub fn admitted(&self, outcome: &'static str) {
        self.admissions
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// Counts one energy report.
    pub fn report(&self, format: &'static str, outcome: &'static str) {
        self.reports
            .get_or_create(&vec![("format", format), ("outcome", outcome)])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_bounded_labels() {
        let metrics = Metrics::default();
        metrics.reconciled("ok");
        metrics.reconcile_failed("kube");
        metrics.reconcile_duration.observe(0.01);
        let text = metrics.render();
        assert!(
            text.contains("ttc_operator_reconciliations_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ttc_operator_reconcile_errors_total{error=\"kube\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ttc_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }
}
