//! Allocation of a policy's budget among its pods by load.
//!
//! Each pod gets a floor (an equal part of [`FLOOR_FRACTION`] of the budget) so an idle pod can
//! still answer its next request, and the rest in proportion to its request rate. Pods without
//! fresh reports are assumed to carry the mean load of the pods that report.

use ttc_api::PodAllocation;

/// Part of the budget split equally among pods regardless of load.
pub const FLOOR_FRACTION: f64 = 0.2;

/// The budget of a whole policy after the cluster-wide split.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PolicyBudget {
    /// Target average joules per request (same for every pod: an average of equal targets holds).
    pub joules_per_request: Option<f64>,
    /// Power cap of all pods together, in watts: the policy's own cap or its cluster share,
    /// whichever is lower.
    pub watts: Option<f64>,
    /// Energy of all pods together per window, in joules.
    pub joules_per_window: Option<f64>,
}

impl PolicyBudget {
    /// The policy's own budget tightened by its cluster share.
    pub fn effective(spec: &ttc_api::EnergyBudget, cluster_watts: Option<f64>) -> Self {
        let watts = match (spec.power_cap_watts, cluster_watts) {
            (Some(own), Some(share)) => Some(own.min(share)),
            (own, share) => own.or(share),
        };
        Self {
            joules_per_request: spec.joules_per_request,
            watts,
            joules_per_window: spec.joules_per_window,
        }
    }
}

/// A pod's load: its request rate over the window, when it has fresh reports.
#[derive(Debug, Clone, PartialEq)]
pub struct PodLoad {
    /// Pod name.
    pub pod: String,
    /// Requests per second over the window; `None` without fresh reports.
    pub requests_per_second: Option<f64>,
}

/// Splits `budget` among `pods`; the result is sorted by pod name and its shares sum to 1.
pub fn allocate(budget: &PolicyBudget, pods: &[PodLoad]) -> Vec<PodAllocation> {
    if pods.is_empty() {
        return Vec::new();
    }
    let n = pods.len() as f64;
    let known: Vec<f64> = pods
        .iter()
        .filter_map(|p| p.requests_per_second)
        .map(|r| r.max(0.0))
        .collect();
    let mean = if known.is_empty() {
        1.0
    } else {
        known.iter().sum::<f64>() / known.len() as f64
    };
    let loads: Vec<f64> = pods
        .iter()
        .map(|p| p.requests_per_second.map_or(mean, |r| r.max(0.0)))
        .collect();
    let total: f64 = loads.iter().sum();
    let mut allocations: Vec<PodAllocation> = pods
        .iter()
        .zip(&loads)
        .map(|(pod, load)| {
            let by_load = if total > 0.0 { load / total } else { 1.0 / n };
            let share = FLOOR_FRACTION / n + (1.0 - FLOOR_FRACTION) * by_load;
            PodAllocation {
                pod: pod.pod.clone(),
                share: round(share),
                joules_per_request: budget.joules_per_request,
                watts: budget.watts.map(|w| round(w * share)),
                joules_per_window: budget.joules_per_window.map(|j| round(j * share)),
            }
        })
        .collect();
    allocations.sort_by(|a, b| a.pod.cmp(&b.pod));
    allocations
}

/// Rounds to 4 decimals so that status does not churn on float noise.
pub fn round(value: f64) -> f64 {
    (value * 1e4).round() / 1e4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pod: &str, rps: Option<f64>) -> PodLoad {
        PodLoad {
            pod: pod.into(),
            requests_per_second: rps,
        }
    }

    const BUDGET: PolicyBudget = PolicyBudget {
        joules_per_request: Some(2.0),
        watts: Some(100.0),
        joules_per_window: Some(1000.0),
    };

    #[test]
    fn no_pods_no_allocations() {
        assert!(allocate(&BUDGET, &[]).is_empty());
    }

    #[test]
    fn equal_load_splits_equally() {
        let a = allocate(&BUDGET, &[load("b", Some(3.0)), load("a", Some(3.0))]);
        assert_eq!(
            a.iter().map(|x| x.pod.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(a[0].watts, Some(50.0));
        assert_eq!(a[1].joules_per_window, Some(500.0));
        assert_eq!(a[0].joules_per_request, Some(2.0));
    }

    #[test]
    fn busier_pod_gets_more_but_idle_pod_keeps_its_floor() {
        let a = allocate(&BUDGET, &[load("busy", Some(9.0)), load("idle", Some(0.0))]);
        let busy = &a[0];
        let idle = &a[1];
        assert_eq!(idle.share, 0.1); // FLOOR_FRACTION / 2
        assert_eq!(busy.share, 0.9);
        assert_eq!(busy.watts, Some(90.0));
        assert!((a.iter().map(|x| x.share).sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn pods_without_reports_count_as_mean_load() {
        let a = allocate(
            &BUDGET,
            &[
                load("a", Some(4.0)),
                load("b", Some(2.0)),
                load("new", None),
            ],
        );
        let new = a.iter().find(|x| x.pod == "new").expect("allocated");
        // loads 4, 2, 3 of 9: 0.2/3 + 0.8 * 3/9
        assert!((new.share - 0.3333).abs() < 1e-4);
    }

    #[test]
    fn cluster_share_tightens_the_power_cap() {
        let spec = ttc_api::EnergyBudget {
            joules_per_request: None,
            power_cap_watts: Some(300.0),
            joules_per_window: None,
            window_seconds: 60,
        };
        assert_eq!(
            PolicyBudget::effective(&spec, Some(120.0)).watts,
            Some(120.0)
        );
        assert_eq!(
            PolicyBudget::effective(&spec, Some(500.0)).watts,
            Some(300.0)
        );
        assert_eq!(PolicyBudget::effective(&spec, None).watts, Some(300.0));
        let uncapped = ttc_api::EnergyBudget {
            power_cap_watts: None,
            ..spec
        };
        assert_eq!(
            PolicyBudget::effective(&uncapped, Some(80.0)).watts,
            Some(80.0)
        );
    }
}
