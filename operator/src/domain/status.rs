//! The status of a policy, computed from what the operator observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use ttc_api::policy::trim;
use ttc_api::{
    ClusterShare, EnergySource, InferencePolicySpec, InferencePolicyStatus, ObservedEnergy,
    PodAllocation,
};

use crate::domain::allocation::{PolicyBudget, round};
use crate::domain::selection::PodSelection;

/// Condition type: the policy is in force.
pub const READY: &str = "Ready";
/// Condition type: observed energy is within the budget.
pub const BUDGET_MET: &str = "BudgetMet";
/// Condition type: the policy works only partly.
pub const DEGRADED: &str = "Degraded";

/// Reason: pods selected by this and another policy.
pub const REASON_OVERLAP: &str = "OverlappingPolicies";
/// Reason: governed pods without the injected sidecar.
pub const REASON_NO_SIDECAR: &str = "PodsWithoutSidecar";
/// Reason: sidecars that stopped reporting.
pub const REASON_STALE: &str = "StaleReports";
/// Reason: the budget is exceeded.
pub const REASON_OVER_BUDGET: &str = "OverBudget";
/// Reason: the spec cannot be acted on.
pub const REASON_INVALID: &str = "InvalidSpec";

/// Energy of one pod over the budget window, from its fresh reports.
#[derive(Debug, Clone, PartialEq)]
pub struct PodEnergy {
    /// Pod name.
    pub pod: String,
    /// Joules spent in the window.
    pub joules: f64,
    /// Requests completed in the window.
    pub requests: u64,
    /// TTC samples generated in the window.
    pub samples: u64,
    /// Seconds the window's reports span.
    pub span_seconds: f64,
    /// Current (or average) power, in watts.
    pub watts: f64,
    /// Where the figures come from.
    pub source: EnergySource,
}

impl PodEnergy {
    /// Requests per second over the window; `None` when the reports span no time.
    pub fn requests_per_second(&self) -> Option<f64> {
        (self.span_seconds > 0.0).then(|| self.requests as f64 / self.span_seconds)
    }
}

/// Everything the status is computed from.
#[derive(Debug, Clone)]
pub struct StatusInputs<'a> {
    /// The policy's spec.
    pub spec: &'a InferencePolicySpec,
    /// Its metadata.generation.
    pub generation: Option<i64>,
    /// Name of the policy.
    pub policy: &'a str,
    /// Whether the namespace has opted into injection.
    pub namespace_opted_in: bool,
    /// The pods it selects.
    pub selection: &'a PodSelection,
    /// Fresh energy per governed pod.
    pub energy: &'a [PodEnergy],
    /// Governed pods with a sidecar whose reports are stale or never came.
    pub silent_pods: &'a [String],
    /// The effective budget (after the cluster split).
    pub budget: PolicyBudget,
    /// Its cluster share, when the operator has a cluster cap.
    pub cluster_share: Option<ClusterShare>,
    /// Per-pod allocation.
    pub allocations: Vec<PodAllocation>,
    /// The status now stored, for condition transition times.
    pub previous: Option<&'a InferencePolicyStatus>,
    /// Now.
    pub now: Time,
    /// The report receiver's CA, where sidecars trust it.
    pub report_ca_bundle: Option<String>,
}

/// Aggregates the energy of a policy's pods.
pub fn observe(energy: &[PodEnergy]) -> Option<(ObservedEnergy, Option<f64>)> {
    let first = energy.first()?;
    let source = energy
        .iter()
        .fold(first.source, |acc, e| acc.combine(e.source));
    let joules: f64 = energy.iter().map(|e| e.joules).sum();
    let requests: u64 = energy.iter().map(|e| e.requests).sum();
    let samples: u64 = energy.iter().map(|e| e.samples).sum();
    let watts: f64 = energy.iter().map(|e| e.watts).sum();
    let per_request = (requests > 0).then(|| round(joules / requests as f64));
    let depth = (requests > 0).then(|| round(samples as f64 / requests as f64));
    let observed = ObservedEnergy {
        joules_per_request: per_request,
        watts: round(watts),
        joules: round(joules),
        requests,
        source,
        reporting_pods: energy.len() as u32,
    };
    Some((observed, depth))
}

/// Whether the observed energy exceeds the budget, and the reasons.
fn budget_violations(
    observed: &ObservedEnergy,
    budget: &PolicyBudget,
    window_seconds: u32,
) -> Vec<String> {
    let mut over = Vec::new();
    if let (Some(target), Some(actual)) = (budget.joules_per_request, observed.joules_per_request)
        && actual > target
    {
        over.push(format!(
            "{}J/request > {}J/request",
            trim(actual),
            trim(target)
        ));
    }
    if let Some(cap) = budget.watts
        && observed.watts > cap
    {
        over.push(format!("{}W > {}W", trim(observed.watts), trim(cap)));
    }
    if let Some(limit) = budget.joules_per_window {
        let projected = observed.watts * f64::from(window_seconds);
        if projected > limit {
            over.push(format!(
                "{}J/window projected > {}J/window",
                trim(projected),
                trim(limit)
            ));
        }
    }
    over
}

fn condition(
    type_: &str,
    ok: Option<bool>,
    reason: &str,
    message: String,
    inputs: &StatusInputs<'_>,
) -> Condition {
    let status = match ok {
        Some(true) => "True",
        Some(false) => "False",
        None => "Unknown",
    };
    let previous = inputs
        .previous
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => inputs.now.clone(),
    };
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: inputs.generation,
        last_transition_time,
    }
}

fn list(names: &[&str]) -> String {
    const SHOWN: usize = 5;
    let mut s = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// Keeps what `previous` observed in `status` when `status` has nothing measured to go on: a
/// replica that has just become the leader has heard no report yet, or one per pod (no span to
/// measure joules over: reports carry cumulative counters), and "no reports" or "0 W" from it
/// would only say that, not that the pods went silent. The caller applies this while the new
/// leader has led for less than one staleness period, after which pods it has not heard from
/// really are silent. An observation with joules measured always wins.
pub fn carry_over_observation(
    previous: &InferencePolicyStatus,
    status: &mut InferencePolicyStatus,
) {
    let measured = status.observed.as_ref().is_some_and(|o| o.joules > 0.0);
    if measured || previous.observed.is_none() {
        return;
    }
    status.observed = previous.observed.clone();
    status.observed_summary = previous.observed_summary.clone();
    status.mean_depth = previous.mean_depth;
    if let Some(budget_met) = previous.conditions.iter().find(|c| c.type_ == BUDGET_MET) {
        status.conditions.retain(|c| c.type_ != BUDGET_MET);
        status.conditions.push(budget_met.clone());
    }
}

/// Computes the status of a valid policy.
pub fn compute_status(inputs: &StatusInputs<'_>) -> InferencePolicyStatus {
    let selection = inputs.selection;
    let observed = observe(inputs.energy);
    let missing = selection.without_sidecar(inputs.policy);
    let conditions = vec![
        ready_condition(inputs),
        budget_condition(inputs, observed.as_ref().map(|(obs, _)| obs)),
        degraded_condition(inputs, &missing),
    ];
    let observed_summary = Some(observed_summary(observed.as_ref().map(|(obs, _)| obs)));
    let (observed, mean_depth) = match observed {
        Some((obs, depth)) => (Some(obs), depth),
        None => (None, None),
    };
    InferencePolicyStatus {
        observed_generation: inputs.generation,
        conditions,
        matched_pods: selection.governed.len() as u32,
        injected_pods: (selection.governed.len() - missing.len()) as u32,
        budget_summary: Some(inputs.spec.budget_summary()),
        observed_summary,
        observed,
        mean_depth,
        allocations: inputs.allocations.clone(),
        cluster_share: inputs.cluster_share.clone(),
        report_ca_bundle: inputs.report_ca_bundle.clone(),
    }
}

/// Ready: reconciled, unless the namespace has not opted into injection.
fn ready_condition(inputs: &StatusInputs<'_>) -> Condition {
    let selection = inputs.selection;
    if inputs.namespace_opted_in {
        condition(
            READY,
            Some(true),
            "Reconciled",
            format!("governs {} pods", selection.governed.len()),
            inputs,
        )
    } else {
        condition(
            READY,
            Some(false),
            "NamespaceNotOptedIn",
            format!(
                "label the namespace {}={} so that pods get the sidecar",
                ttc_api::labels::INJECTION_NAMESPACE_LABEL,
                ttc_api::labels::INJECTION_ENABLED
            ),
            inputs,
        )
    }
}

/// BudgetMet: the observed energy against the budget (unknown without fresh reports).
fn budget_condition(inputs: &StatusInputs<'_>, observed: Option<&ObservedEnergy>) -> Condition {
    match observed {
        None => condition(
            BUDGET_MET,
            None,
            "NoReports",
            "no fresh energy reports from the policy's pods".into(),
            inputs,
        ),
        Some(obs) => {
            let over = budget_violations(obs, &inputs.budget, inputs.spec.budget.window_seconds);
            let source = format!("energy source: {}", obs.source.as_str());
            if over.is_empty() {
                condition(
                    BUDGET_MET,
                    Some(true),
                    "WithinBudget",
                    format!("within budget ({source})"),
                    inputs,
                )
            } else {
                condition(
                    BUDGET_MET,
                    Some(false),
                    REASON_OVER_BUDGET,
                    format!("{} ({source})", over.join("; ")),
                    inputs,
                )
            }
        }
    }
}

/// Degraded: pods selected by another policy too, pods without the sidecar, silent sidecars.
fn degraded_condition(inputs: &StatusInputs<'_>, missing: &[&str]) -> Condition {
    let selection = inputs.selection;
    let mut problems: Vec<(&str, String)> = Vec::new();
    if !selection.overlapping.is_empty() {
        let pods: Vec<&str> = selection
            .overlapping
            .iter()
            .map(|(p, _)| p.as_str())
            .collect();
        let mut peers: Vec<&str> = selection
            .overlapping
            .iter()
            .flat_map(|(_, o)| o.iter().map(String::as_str))
            .collect();
        peers.sort();
        peers.dedup();
        problems.push((
            REASON_OVERLAP,
            format!(
                "{} pods also selected by {} and governed by neither: {}",
                pods.len(),
                list(&peers),
                list(&pods)
            ),
        ));
    }
    if !missing.is_empty() {
        problems.push((
            REASON_NO_SIDECAR,
            format!("{} pods without the sidecar (created before the policy or while the webhook was unavailable; restart them): {}", missing.len(), list(missing)),
        ));
    }
    if !inputs.silent_pods.is_empty() {
        let silent: Vec<&str> = inputs.silent_pods.iter().map(String::as_str).collect();
        problems.push((
            REASON_STALE,
            format!(
                "{} sidecars without fresh reports: {}",
                silent.len(),
                list(&silent)
            ),
        ));
    }
    match problems.first() {
        None => condition(
            DEGRADED,
            Some(false),
            "AsExpected",
            "all governed pods have a reporting sidecar".into(),
            inputs,
        ),
        Some((reason, _)) => {
            let message = problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            condition(DEGRADED, Some(true), reason, message, inputs)
        }
    }
}

/// `kubectl get ipol`'s OBSERVED column.
fn observed_summary(observed: Option<&ObservedEnergy>) -> String {
    match observed {
        None => "no reports".to_string(),
        Some(obs) => {
            let per_request = obs
                .joules_per_request
                .map(|j| format!("{}J/req ", trim(j)))
                .unwrap_or_default();
            format!(
                "{per_request}{}W ({})",
                trim(obs.watts),
                obs.source.as_str()
            )
        }
    }
}

/// The status of a policy that cannot be acted on: Ready=False with the reason; the rest kept.
pub fn invalid_status(
    previous: Option<&InferencePolicyStatus>,
    generation: Option<i64>,
    reason: &str,
    now: Time,
) -> InferencePolicyStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let last_transition_time = previous
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == READY && c.status == "False" && c.reason == REASON_INVALID)
        })
        .map_or(now, |c| c.last_transition_time.clone());
    status.conditions.retain(|c| c.type_ != READY);
    status.conditions.insert(
        0,
        Condition {
            type_: READY.into(),
            status: "False".into(),
            reason: REASON_INVALID.into(),
            message: reason.into(),
            observed_generation: generation,
            last_transition_time,
        },
    );
    status.observed_generation = generation;
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::selection::PodView;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn spec() -> InferencePolicySpec {
        serde_json::from_value(json!({
            "selector": {"matchLabels": {"app": "chat"}},
            "budget": {"joulesPerRequest": 2.0, "powerCapWatts": 100.0, "windowSeconds": 60}
        }))
        .expect("spec")
    }

    fn pod(name: &str, injected: bool) -> PodView {
        PodView {
            name: name.into(),
            labels: Default::default(),
            injected_policy: injected.then(|| "p".into()),
            terminating: false,
        }
    }

    fn energy(
        pod: &str,
        joules: f64,
        requests: u64,
        watts: f64,
        source: EnergySource,
    ) -> PodEnergy {
        PodEnergy {
            pod: pod.into(),
            joules,
            requests,
            samples: requests * 3,
            span_seconds: 60.0,
            watts,
            source,
        }
    }

    fn now(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("timestamp"))
    }

    fn inputs<'a>(
        spec: &'a InferencePolicySpec,
        selection: &'a PodSelection,
        energy: &'a [PodEnergy],
        silent: &'a [String],
    ) -> StatusInputs<'a> {
        StatusInputs {
            spec,
            generation: Some(3),
            policy: "p",
            namespace_opted_in: true,
            selection,
            energy,
            silent_pods: silent,
            budget: PolicyBudget::effective(&spec.budget, None),
            cluster_share: None,
            allocations: Vec::new(),
            previous: None,
            now: now(1_000),
            report_ca_bundle: None,
        }
    }

    fn cond<'a>(status: &'a InferencePolicyStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect(type_)
    }

    #[test]
    fn healthy_policy_within_budget() {
        let spec = spec();
        let selection = PodSelection {
            governed: vec![pod("a", true), pod("b", true)],
            overlapping: vec![],
        };
        let energy = [
            energy("a", 60.0, 40, 30.0, EnergySource::Nvml),
            energy("b", 30.0, 20, 20.0, EnergySource::Nvml),
        ];
        let status = compute_status(&inputs(&spec, &selection, &energy, &[]));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.matched_pods, 2);
        assert_eq!(status.injected_pods, 2);
        let obs = status.observed.as_ref().expect("observed");
        assert_eq!(obs.joules_per_request, Some(1.5));
        assert_eq!(obs.watts, 50.0);
        assert_eq!(obs.source, EnergySource::Nvml);
        assert_eq!(status.mean_depth, Some(3.0));
        assert_eq!(cond(&status, READY).status, "True");
        assert_eq!(cond(&status, BUDGET_MET).status, "True");
        assert_eq!(cond(&status, DEGRADED).status, "False");
        assert_eq!(
            status.observed_summary.as_deref(),
            Some("1.5J/req 50W (nvml)")
        );
        assert_eq!(status.budget_summary.as_deref(), Some("2J/req 100W /60s"));
    }

    #[test]
    fn a_new_leader_keeps_what_was_observed_until_it_hears_the_pods() {
        let spec = spec();
        let selection = PodSelection {
            governed: vec![pod("a", true)],
            overlapping: vec![],
        };
        let heard = [energy("a", 60.0, 40, 30.0, EnergySource::Nvml)];
        let previous = compute_status(&inputs(&spec, &selection, &heard, &[]));
        let unheard = compute_status(&inputs(&spec, &selection, &[], &[]));
        assert_eq!(cond(&unheard, BUDGET_MET).reason, "NoReports");

        // One report per pod so far: cumulative counters, nothing measured over a span yet.
        let once = [energy("a", 0.0, 0, 0.0, EnergySource::Nvml)];
        let heard_once = compute_status(&inputs(&spec, &selection, &once, &[]));
        for unmeasured in [unheard.clone(), heard_once] {
            let mut kept = unmeasured.clone();
            carry_over_observation(&previous, &mut kept);
            assert_eq!(kept.observed, previous.observed);
            assert_eq!(kept.observed_summary, previous.observed_summary);
            assert_eq!(kept.mean_depth, previous.mean_depth);
            assert_eq!(cond(&kept, BUDGET_MET), cond(&previous, BUDGET_MET));
            assert_eq!(cond(&kept, READY), cond(&unmeasured, READY));
        }

        // Fresh figures win, and nothing is invented where nothing was observed before.
        let fresh = [energy("a", 300.0, 100, 90.0, EnergySource::Nvml)];
        let mut now_heard = compute_status(&inputs(&spec, &selection, &fresh, &[]));
        let before = now_heard.clone();
        carry_over_observation(&previous, &mut now_heard);
        assert_eq!(now_heard, before);
        let mut still_unheard = unheard.clone();
        carry_over_observation(&unheard, &mut still_unheard);
        assert_eq!(still_unheard, unheard);
    }

    #[test]
    fn over_budget_and_estimates_are_reported_as_such() {
        let spec = spec();
        let selection = PodSelection {
            governed: vec![pod("a", true), pod("b", true)],
            overlapping: vec![],
        };
        let energy = [
            energy("a", 300.0, 100, 90.0, EnergySource::Nvml),
            energy("b", 30.0, 10, 20.0, EnergySource::Estimate),
        ];
        let status = compute_status(&inputs(&spec, &selection, &energy, &[]));
        let budget = cond(&status, BUDGET_MET);
        assert_eq!(budget.status, "False");
        assert_eq!(budget.reason, REASON_OVER_BUDGET);
        assert!(
            budget.message.contains("3J/request > 2J/request"),
            "{}",
            budget.message
        );
        assert!(budget.message.contains("110W > 100W"), "{}", budget.message);
        assert!(budget.message.contains("estimate"));
        assert_eq!(
            status.observed.expect("observed").source,
            EnergySource::Estimate
        );
    }

    #[test]
    fn degraded_names_overlaps_missing_sidecars_and_stale_reports() {
        let spec = spec();
        let selection = PodSelection {
            governed: vec![pod("a", true), pod("old", false)],
            overlapping: vec![("shared".into(), vec!["other".into()])],
        };
        let silent = vec!["a".to_string()];
        let status = compute_status(&inputs(&spec, &selection, &[], &silent));
        let degraded = cond(&status, DEGRADED);
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, REASON_OVERLAP);
        assert!(degraded.message.contains("other") && degraded.message.contains("shared"));
        assert!(
            degraded.message.contains("1 pods without the sidecar")
                && degraded.message.contains("old")
        );
        assert!(
            degraded
                .message
                .contains("1 sidecars without fresh reports: a")
        );
        assert_eq!(status.injected_pods, 1);
        assert_eq!(cond(&status, BUDGET_MET).status, "Unknown");
        assert_eq!(status.observed_summary.as_deref(), Some("no reports"));
    }

    #[test]
    fn transition_time_moves_only_on_change() {
        let spec = spec();
        let selection = PodSelection::default();
        let first = compute_status(&inputs(&spec, &selection, &[], &[]));
        let mut later = inputs(&spec, &selection, &[], &[]);
        later.previous = Some(&first);
        later.now = now(2_000);
        let second = compute_status(&later);
        assert_eq!(cond(&second, READY).last_transition_time, now(1_000));
        later.namespace_opted_in = false;
        let third = compute_status(&later);
        assert_eq!(cond(&third, READY).status, "False");
        assert_eq!(cond(&third, READY).last_transition_time, now(2_000));
    }

    #[test]
    fn invalid_status_keeps_the_rest() {
        let spec = spec();
        let selection = PodSelection::default();
        let valid = compute_status(&inputs(&spec, &selection, &[], &[]));
        let invalid = invalid_status(Some(&valid), Some(4), "bad selector", now(5));
        assert_eq!(invalid.conditions.len(), 3);
        assert_eq!(cond(&invalid, READY).reason, REASON_INVALID);
        assert_eq!(invalid.observed_generation, Some(4));
    }
}
