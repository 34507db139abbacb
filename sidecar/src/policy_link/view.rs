//! What the policy tells this pod: its allocation and the TTC limits. Pure, no Kubernetes calls.

use ttc_api::{InferencePolicy, TtcSpec};

/// This pod's share of its policy: the TTC limits of the spec and this pod's allocation from the
/// status.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyView {
    /// The policy's test-time-compute limits.
    pub ttc: TtcSpec,
    /// This pod's target average joules per request; `None` until the operator allocates this
    /// pod one (new pod, or a budget without a per-request figure).
    pub joules_per_request: Option<f64>,
    /// This pod's power cap, in watts, when the operator allocates one.
    pub watts: Option<f64>,
    /// This pod's energy per window, in joules, when the operator allocates one.
    pub joules_per_window: Option<f64>,
    /// The policy's budget window (`spec.budget.windowSeconds`).
    pub window_seconds: u32,
    /// The spec generation the view was read from (`metadata.generation`).
    pub generation: Option<i64>,
    /// The operator's report receiver CA as published in the status, which the reports trust
    /// besides the CA the pod was created with.
    pub report_ca_bundle: Option<String>,
}

impl PolicyView {
    /// The view of `policy` for the pod named `pod`: its allocation is the status entry with that
    /// pod name (none when absent).
    pub fn from_policy(policy: &InferencePolicy, pod: &str) -> Self {
        let allocation = policy
            .status
            .as_ref()
            .and_then(|status| status.allocations.iter().find(|a| a.pod == pod));
        Self {
            ttc: policy.spec.ttc.clone(),
            joules_per_request: allocation.and_then(|a| a.joules_per_request),
            watts: allocation.and_then(|a| a.watts),
            joules_per_window: allocation.and_then(|a| a.joules_per_window),
            window_seconds: policy.spec.budget.window_seconds,
            generation: policy.metadata.generation,
            report_ca_bundle: policy
                .status
                .as_ref()
                .and_then(|status| status.report_ca_bundle.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ttc_api::{InferencePolicyStatus, PodAllocation, TtcStrategy};

    fn policy(allocations: Option<Vec<PodAllocation>>) -> InferencePolicy {
        let mut policy: InferencePolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "energy.ttc.dev/v1alpha1",
            "kind": "InferencePolicy",
            "metadata": {"name": "chat", "namespace": "team-a", "generation": 3},
            "spec": {
                "selector": {},
                "budget": {"joulesPerRequest": 2.0},
                "ttc": {"strategy": "MajorityVote", "maxSamples": 5}
            }
        }))
        .expect("a valid policy");
        policy.status = allocations.map(|allocations| InferencePolicyStatus {
            allocations,
            ..InferencePolicyStatus::default()
        });
        policy
    }

    fn allocation(pod: &str, joules_per_request: Option<f64>, watts: Option<f64>) -> PodAllocation {
        PodAllocation {
            pod: pod.into(),
            share: 0.5,
            joules_per_request,
            watts,
            joules_per_window: Some(100.0),
        }
    }

    #[test]
    fn the_view_takes_this_pods_allocation_and_the_spec() {
        let policy = policy(Some(vec![
            allocation("other", Some(9.0), Some(90.0)),
            allocation("p1", Some(1.5), Some(40.0)),
        ]));
        let view = PolicyView::from_policy(&policy, "p1");
        assert_eq!(view.joules_per_request, Some(1.5));
        assert_eq!(view.watts, Some(40.0));
        assert_eq!(view.joules_per_window, Some(100.0));
        assert_eq!(view.window_seconds, ttc_api::policy::DEFAULT_WINDOW_SECONDS);
        assert_eq!(view.generation, Some(3));
        assert_eq!(view.report_ca_bundle, None);
        assert_eq!(view.ttc.strategy, TtcStrategy::MajorityVote);
        assert_eq!(view.ttc.max_samples, 5);
        // Unset fields take the CRD's defaults.
        assert_eq!(view.ttc.min_samples, TtcSpec::default().min_samples);
    }

    #[test]
    fn the_view_carries_the_published_receiver_ca() {
        let mut policy = policy(Some(vec![]));
        if let Some(status) = policy.status.as_mut() {
            status.report_ca_bundle = Some("-----BEGIN CERTIFICATE-----".into());
        }
        let view = PolicyView::from_policy(&policy, "p1");
        assert_eq!(
            view.report_ca_bundle.as_deref(),
            Some("-----BEGIN CERTIFICATE-----")
        );
    }

    #[test]
    fn a_pod_without_an_entry_gets_no_allocation_but_the_limits() {
        for policy in [
            policy(None),
            policy(Some(vec![])),
            policy(Some(vec![allocation("other", Some(9.0), None)])),
        ] {
            let view = PolicyView::from_policy(&policy, "p1");
            assert_eq!(view.joules_per_request, None);
            assert_eq!(view.watts, None);
            assert_eq!(view.ttc.max_samples, 5);
        }
    }

    #[test]
    fn an_entry_without_a_per_request_figure_yields_none() {
        let policy = policy(Some(vec![allocation("p1", None, Some(30.0))]));
        let view = PolicyView::from_policy(&policy, "p1");
        assert_eq!(view.joules_per_request, None);
        assert_eq!(view.watts, Some(30.0));
    }
}
