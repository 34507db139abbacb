//! The cluster-wide power cap split among policies by priority.
//!
//! The operator's configuration may set one cluster power cap (`--cluster-power-cap-watts`). It is
//! split by weighted max-min fairness ("water filling"): each policy is offered a part of what is
//! left in proportion to its priority; a policy that needs less than its offer gets what it needs
//! and the rest is offered again to the others. Priority 0 policies share only what the others
//! leave. A policy's need is its own power cap, else its observed power with 25 % headroom, else
//! unbounded.

use std::collections::BTreeMap;

use ttc_api::ClusterShare;

use crate::domain::allocation::round;

/// Headroom over observed power when a policy has no power cap of its own.
pub const OBSERVED_HEADROOM: f64 = 1.25;

/// What one policy asks of the cluster cap.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyDemand {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// Its priority (weight).
    pub priority: u32,
    /// Watts it needs; `None` when unbounded.
    pub watts: Option<f64>,
}

impl PolicyDemand {
    /// The need of a policy from its own cap and its observed power.
    pub fn new(
        policy: String,
        priority: u32,
        power_cap_watts: Option<f64>,
        observed_watts: Option<f64>,
    ) -> Self {
        let watts = power_cap_watts.or(observed_watts.map(|w| w * OBSERVED_HEADROOM));
        Self {
            policy,
            priority,
            watts,
        }
    }
}

/// The split of a cluster power cap among policies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BudgetSplit {
    /// Share per policy (`namespace/name`).
    pub shares: BTreeMap<String, ClusterShare>,
}

impl BudgetSplit {
    /// Splits `cap_watts` among `demands`.
    pub fn compute(cap_watts: f64, demands: &[PolicyDemand]) -> Self {
        let mut granted: BTreeMap<&str, f64> = BTreeMap::new();
        let mut remaining = cap_watts.max(0.0);
        let weighted: Vec<&PolicyDemand> = demands.iter().filter(|d| d.priority > 0).collect();
        remaining = water_fill(
            remaining,
            &weighted,
            |d| f64::from(d.priority),
            &mut granted,
        );
        let best_effort: Vec<&PolicyDemand> = demands.iter().filter(|d| d.priority == 0).collect();
        water_fill(remaining, &best_effort, |_| 1.0, &mut granted);
        let shares = demands
            .iter()
            .map(|d| {
                let watts = granted.get(d.policy.as_str()).copied().unwrap_or(0.0);
                let fraction = if cap_watts > 0.0 {
                    watts / cap_watts
                } else {
                    0.0
                };
                (
                    d.policy.clone(),
                    ClusterShare {
                        watts: round(watts),
                        fraction: round(fraction),
                    },
                )
            })
            .collect();
        Self { shares }
    }
}

/// Grants `available` among `demands` by weight, capped at each need; returns what is left.
fn water_fill<'a>(
    mut available: f64,
    demands: &[&'a PolicyDemand],
    weight: impl Fn(&PolicyDemand) -> f64,
    granted: &mut BTreeMap<&'a str, f64>,
) -> f64 {
    let mut open: Vec<&PolicyDemand> = demands.to_vec();
    loop {
        let total_weight: f64 = open.iter().map(|d| weight(d)).sum();
        if open.is_empty() || total_weight <= 0.0 || available <= 0.0 {
            return available;
        }
        let (satisfied, unsatisfied): (Vec<&PolicyDemand>, Vec<&PolicyDemand>) =
            open.iter().partition(|d| {
                d.watts
                    .is_some_and(|need| need <= available * weight(d) / total_weight)
            });
        if satisfied.is_empty() {
            for d in &open {
                granted.insert(d.policy.as_str(), available * weight(d) / total_weight);
            }
            return 0.0;
        }
        for d in satisfied {
            let need = d.watts.unwrap_or(0.0);
            granted.insert(d.policy.as_str(), need);
            available -= need;
        }
        open = unsatisfied;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(policy: &str, priority: u32, watts: Option<f64>) -> PolicyDemand {
        PolicyDemand {
            policy: policy.into(),
            priority,
            watts,
        }
    }

    fn watts(split: &BudgetSplit, policy: &str) -> f64 {
        split.shares[policy].watts
    }

    #[test]
    fn unbounded_policies_split_by_priority() {
        let split = BudgetSplit::compute(1000.0, &[demand("a", 300, None), demand("b", 100, None)]);
        assert_eq!(watts(&split, "a"), 750.0);
        assert_eq!(watts(&split, "b"), 250.0);
        assert_eq!(split.shares["a"].fraction, 0.75);
    }

    #[test]
    fn a_modest_policy_leaves_its_unused_share_to_others() {
        let split = BudgetSplit::compute(
            1000.0,
            &[
                demand("small", 100, Some(100.0)),
                demand("big", 100, None),
                demand("mid", 100, Some(400.0)),
            ],
        );
        assert_eq!(watts(&split, "small"), 100.0);
        assert_eq!(watts(&split, "mid"), 400.0);
        assert_eq!(watts(&split, "big"), 500.0);
    }

    #[test]
    fn everyone_satisfied_leaves_cap_unused() {
        let split = BudgetSplit::compute(
            1000.0,
            &[demand("a", 1, Some(100.0)), demand("b", 1, Some(200.0))],
        );
        assert_eq!(watts(&split, "a"), 100.0);
        assert_eq!(watts(&split, "b"), 200.0);
    }

    #[test]
    fn priority_zero_gets_only_leftovers() {
        let split = BudgetSplit::compute(
            500.0,
            &[demand("prod", 100, Some(400.0)), demand("batch", 0, None)],
        );
        assert_eq!(watts(&split, "prod"), 400.0);
        assert_eq!(watts(&split, "batch"), 100.0);
        let starved = BudgetSplit::compute(
            500.0,
            &[demand("prod", 100, None), demand("batch", 0, None)],
        );
        assert_eq!(watts(&starved, "batch"), 0.0);
    }

    #[test]
    fn demand_uses_observed_power_with_headroom() {
        assert_eq!(
            PolicyDemand::new("p".into(), 1, None, Some(100.0)).watts,
            Some(125.0)
        );
        assert_eq!(
            PolicyDemand::new("p".into(), 1, Some(50.0), Some(100.0)).watts,
            Some(50.0)
        );
        assert_eq!(PolicyDemand::new("p".into(), 1, None, None).watts, None);
    }
}
