//! Reconciliation of InferencePolicies: gather from caches, decide with [`crate::domain`], write
//! status (leader only) with server-side apply, publish events on transitions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, instrument, warn};
use ttc_api::labels::{INJECTED_POLICY_ANNOTATION, INJECTION_ENABLED, INJECTION_NAMESPACE_LABEL};
use ttc_api::{ClusterShare, InferencePolicy, InferencePolicyStatus};

use crate::domain::allocation::{PodLoad, PolicyBudget, allocate};
use crate::domain::cluster_split::{BudgetSplit, PolicyDemand};
use crate::domain::selection::{PeerPolicy, PodSelection, PodView, select_pods, selects, validate};
use crate::domain::silence::Reporting;
use crate::domain::status::{self, PodEnergy, StatusInputs, compute_status, invalid_status};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::reports::{PodReports, ReportBook};

/// Field manager of the operator's server-side applies.
pub const FIELD_MANAGER: &str = "ttc-operator";

/// Settings of the reconciler.
#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    /// The cluster-wide power cap split among policies, if any.
    pub cluster_power_cap_watts: Option<f64>,
    /// How often a policy's status is recomputed while its pods report.
    pub requeue_after: Duration,
    /// A pod with a sidecar that has not reported this long after its creation is silent.
    pub stale_after: Duration,
    /// The report receiver's CA as now loaded, where sidecars trust it (`--receiver-tls`):
    /// published in each policy's status for its running sidecars.
    pub report_ca: Option<watch::Receiver<String>>,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        Self {
            cluster_power_cap_watts: None,
            requeue_after: Duration::from_secs(15),
            stale_after: Duration::from_secs(60),
            report_ca: None,
        }
    }
}

/// What reconcile needs: a client, the caches, the report book and the leadership state.
pub struct Context {
    /// API client.
    pub client: Client,
    /// All InferencePolicies.
    pub policies: Store<InferencePolicy>,
    /// Metadata of all pods.
    pub pods: Store<PartialObjectMeta<Pod>>,
    /// Metadata of all namespaces.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// Sidecar energy reports.
    pub reports: Arc<ReportBook>,
    /// Settings.
    pub settings: ReconcileSettings,
    /// True while this replica holds the leader lease.
    pub leader: watch::Receiver<bool>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive transient failures per policy, for backoff.
    failures: Mutex<HashMap<ObjectRef<InferencePolicy>, u32>>,
    /// When this replica's current term as leader began (its first reconcile as leader).
    leading_since: Mutex<Option<Instant>>,
}

impl Context {
    /// A context; `reporter` names this replica in events.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        policies: Store<InferencePolicy>,
        pods: Store<PartialObjectMeta<Pod>>,
        namespaces: Store<PartialObjectMeta<Namespace>>,
        reports: Arc<ReportBook>,
        settings: ReconcileSettings,
        leader: watch::Receiver<bool>,
        reporter: Reporter,
        metrics: Arc<Metrics>,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        Self {
            client,
            policies,
            pods,
            namespaces,
            reports,
            settings,
            leader,
            recorder,
            metrics,
            failures: Mutex::default(),
            leading_since: Mutex::default(),
        }
    }

    /// How long this replica has led, counted from its first reconcile as leader.
    fn leading_for(&self, now: Instant) -> Duration {
        let mut since = self
            .leading_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        now.duration_since(*since.get_or_insert(now))
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<InferencePolicy>, u32>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The view of a pod the domain code works on.
pub fn pod_view(pod: &PartialObjectMeta<Pod>) -> PodView {
    PodView {
        name: pod.name_any(),
        labels: pod.labels().clone(),
        injected_policy: pod.annotations().get(INJECTED_POLICY_ANNOTATION).cloned(),
        terminating: pod.metadata.deletion_timestamp.is_some(),
    }
}

/// What of a pod matters to its policies (labels, injected policy, deletion), as a hash: pod
/// events that leave it unchanged trigger no reconcile.
pub fn pod_fingerprint(pod: &PartialObjectMeta<Pod>) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pod.metadata.labels.hash(&mut hasher);
    pod.annotations()
        .get(INJECTED_POLICY_ANNOTATION)
        .hash(&mut hasher);
    pod.metadata.deletion_timestamp.is_some().hash(&mut hasher);
    Some(hasher.finish())
}

/// Whether a namespace opted into injection.
pub fn opted_in(namespace: Option<&PartialObjectMeta<Namespace>>) -> bool {
    namespace.is_some_and(|ns| {
        ns.labels()
            .get(INJECTION_NAMESPACE_LABEL)
            .is_some_and(|v| v == INJECTION_ENABLED)
    })
}

/// The policies whose selectors select a pod (for mapping pod events to policies).
pub fn policies_selecting(
    policies: &Store<InferencePolicy>,
    pod: &PartialObjectMeta<Pod>,
) -> Vec<ObjectRef<InferencePolicy>> {
    let Some(namespace) = pod.namespace() else {
        return Vec::new();
    };
    policies
        .state_filter(|p| p.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .into_iter()
        .filter(|p| selects(&p.spec.selector, pod.labels()).unwrap_or(false))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The outcome of planning a policy's status.
enum Plan {
    Valid(InferencePolicyStatus),
    Invalid {
        reason: String,
        status: InferencePolicyStatus,
    },
}

fn plan(
    policy: &InferencePolicy,
    namespace: &str,
    name: &str,
    ctx: &Context,
    now: Instant,
    time: Time,
) -> Plan {
    let peers_owned = ctx.policies.state_filter(|p| {
        p.metadata.namespace.as_deref() == Some(namespace)
            && p.metadata.name.as_deref() != Some(name)
    });
    let peers: Vec<PeerPolicy<'_>> = peers_owned
        .iter()
        .filter_map(|p| {
            Some(PeerPolicy {
                name: p.metadata.name.as_deref()?,
                selector: &p.spec.selector,
            })
        })
        .collect();
    let selector = &policy.spec.selector;
    // Only the pods this policy selects are copied out of the cache; with thousands of pods in a
    // namespace, copying all of them per reconcile dominated the reconcile time.
    let selected = validate(selector).map(|()| {
        ctx.pods.state_filter(|p| {
            p.metadata.namespace.as_deref() == Some(namespace)
                && selects(selector, p.labels()).unwrap_or(false)
        })
    });
    let pods = selected.as_deref().unwrap_or_default();
    let views: Vec<PodView> = pods.iter().map(|p| pod_view(p)).collect();
    let selection = match selected
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|_| select_pods(selector, &peers, &views))
    {
        Ok(selection) => selection,
        Err(invalid) => {
            let reason = format!("spec.selector: {}", invalid.0);
            let status = invalid_status(
                policy.status.as_ref(),
                policy.metadata.generation,
                &reason,
                time,
            );
            return Plan::Invalid { reason, status };
        }
    };
    let namespace_opted_in = opted_in(ctx.namespaces.get(&ObjectRef::new(namespace)).as_deref());

    let window = Duration::from_secs(u64::from(policy.spec.budget.window_seconds));
    let Reports {
        energy,
        silent,
        loads,
    } = reports(ctx, policy, pods, &selection, window, now, &time);
    let cluster_share = cluster_share(ctx, &format!("{namespace}/{name}"));
    let budget =
        PolicyBudget::effective(&policy.spec.budget, cluster_share.as_ref().map(|s| s.watts));
    let allocations = allocate(&budget, &loads);
    let inputs = StatusInputs {
        spec: &policy.spec,
        generation: policy.metadata.generation,
        policy: name,
        namespace_opted_in,
        selection: &selection,
        energy: &energy,
        silent_pods: &silent,
        budget,
        cluster_share,
        allocations,
        previous: policy.status.as_ref(),
        now: time,
        report_ca_bundle: ctx
            .settings
            .report_ca
            .as_ref()
            .map(|ca| ca.borrow().clone()),
    };
    Plan::Valid(compute_status(&inputs))
}

/// What the governed pods reported: the fresh figures, the silent pods, each pod's load.
struct Reports {
    energy: Vec<PodEnergy>,
    silent: Vec<String>,
    loads: Vec<PodLoad>,
}

fn reports(
    ctx: &Context,
    policy: &InferencePolicy,
    pods: &[Arc<PartialObjectMeta<Pod>>],
    selection: &PodSelection,
    window: Duration,
    now: Instant,
    time: &Time,
) -> Reports {
    let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
    let name = policy.metadata.name.as_deref().unwrap_or_default();
    let mut out = Reports {
        energy: Vec::new(),
        silent: Vec::new(),
        loads: Vec::new(),
    };
    for pod in &selection.governed {
        let (reporting, load) = match ctx.reports.pod_energy(namespace, &pod.name, window, now) {
            PodReports::Fresh(e) => {
                let rps = e.requests_per_second();
                out.energy.push(e);
                (Reporting::Fresh, rps)
            }
            PodReports::Stale => (Reporting::Stale, None),
            PodReports::None => {
                let created = pods
                    .iter()
                    .find(|p| p.metadata.name.as_deref() == Some(pod.name.as_str()))
                    .and_then(|p| p.metadata.creation_timestamp.clone());
                let age = created.and_then(|c| Duration::try_from(time.0.duration_since(c.0)).ok());
                let injected_here = pod.injected_policy.as_deref() == Some(name);
                (Reporting::Never { injected_here, age }, None)
            }
        };
        if reporting.is_silent(ctx.settings.stale_after) {
            out.silent.push(pod.name.clone());
        }
        out.loads.push(PodLoad {
            pod: pod.name.clone(),
            requests_per_second: load,
        });
    }
    out
}

/// This policy's share (`key`: namespace/name) of the cluster's power cap, when there is one.
fn cluster_share(ctx: &Context, key: &str) -> Option<ClusterShare> {
    let cap = ctx.settings.cluster_power_cap_watts?;
    let demands: Vec<PolicyDemand> = ctx
        .policies
        .state()
        .iter()
        .map(|p| {
            let observed = p
                .status
                .as_ref()
                .and_then(|s| s.observed.as_ref())
                .map(|o| o.watts);
            PolicyDemand::new(
                format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()),
                p.spec.priority,
                p.spec.budget.power_cap_watts,
                observed,
            )
        })
        .collect();
    BudgetSplit::compute(cap, &demands).shares.remove(key)
}

/// Ignores a previous transition time so that unchanged statuses compare equal.
fn same_status(a: Option<&InferencePolicyStatus>, b: &InferencePolicyStatus) -> bool {
    a.is_some_and(|a| a == b)
}

fn condition<'a>(
    status: Option<&'a InferencePolicyStatus>,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

/// Events for condition transitions between `before` and `after`.
fn transition_events(
    before: Option<&InferencePolicyStatus>,
    after: &InferencePolicyStatus,
) -> Vec<Event> {
    let mut events = Vec::new();
    let changed = |type_: &str| {
        let old = condition(before, type_).map(|c| (c.status.as_str(), c.reason.as_str()));
        let new = condition(Some(after), type_);
        new.filter(|n| old != Some((n.status.as_str(), n.reason.as_str())))
    };
    if let Some(c) = changed(status::READY).filter(|c| c.reason == status::REASON_INVALID) {
        events.push(Event {
            type_: EventType::Warning,
            reason: "InvalidSpec".into(),
            note: Some(c.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    if let Some(c) = changed(status::DEGRADED).filter(|c| c.status == "True") {
        events.push(Event {
            type_: EventType::Warning,
            reason: c.reason.clone(),
            note: Some(truncate(&c.message)),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    if let Some(c) = changed(status::BUDGET_MET).filter(|c| c.status != "Unknown") {
        let (type_, reason) = if c.status == "True" {
            (EventType::Normal, "BudgetMet")
        } else {
            (EventType::Warning, status::REASON_OVER_BUDGET)
        };
        events.push(Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(&c.message)),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    events
}

/// Event notes are limited to 1 kB.
fn truncate(message: &str) -> String {
    message.chars().take(1000).collect()
}

/// Reconciles one policy.
#[instrument(skip_all, fields(policy = %policy.name_any(), namespace = policy.namespace().unwrap_or_default()))]
pub async fn reconcile(policy: Arc<InferencePolicy>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    ctx.metrics.reconciles_in_flight.inc();
    let result = reconcile_policy(&policy, &ctx).await;
    ctx.metrics.reconciles_in_flight.dec();
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            ctx.failures().remove(&ObjectRef::from_obj(policy.as_ref()));
        }
        Err(e) => ctx.metrics.reconcile_failed(e.metric_label()),
    }
    result
}

async fn reconcile_policy(policy: &InferencePolicy, ctx: &Context) -> Result<Action> {
    let namespace = policy
        .metadata
        .namespace
        .as_deref()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let name = policy
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingMetadata("name"))?;
    if !*ctx.leader.borrow() {
        *ctx.leading_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        ctx.metrics.reconciled("skipped_not_leader");
        return Ok(Action::requeue(ctx.settings.requeue_after));
    }
    let time = Time(Timestamp::now());
    let now = Instant::now();
    let (mut status, invalid) = match plan(policy, namespace, name, ctx, now, time) {
        Plan::Valid(status) => (status, None),
        Plan::Invalid { reason, status } => (status, Some(reason)),
    };
    // Reports go to the leader only: a new leader has heard nothing for up to one staleness
    // period, and keeps what its predecessor observed until it does.
    if ctx.leading_for(now) < ctx.settings.stale_after
        && let Some(previous) = policy.status.as_ref()
    {
        status::carry_over_observation(previous, &mut status);
    }
    if !same_status(policy.status.as_ref(), &status) {
        write_status(policy, namespace, name, &status, ctx).await?;
        let reference = policy.object_ref(&());
        for event in transition_events(policy.status.as_ref(), &status) {
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                warn!(error = %e, reason = %event.reason, "could not publish event");
            }
        }
    }
    if let Some(reason) = invalid {
        ctx.metrics.reconciled("invalid");
        return Err(Error::InvalidPolicy {
            policy: format!("{namespace}/{name}"),
            reason,
        });
    }
    ctx.metrics.reconciled("ok");
    // Without fresh reports only staleness can change the status, on the staleness scale; a
    // pod's first report wakes the policy at once (see the receiver).
    let requeue = if status.observed.is_some() {
        ctx.settings.requeue_after
    } else {
        ctx.settings.stale_after.max(ctx.settings.requeue_after)
    };
    Ok(Action::requeue(requeue))
}

async fn write_status(
    policy: &InferencePolicy,
    namespace: &str,
    name: &str,
    status: &InferencePolicyStatus,
    ctx: &Context,
) -> Result<()> {
    let api: Api<InferencePolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({
        "apiVersion": InferencePolicy::api_version(&()),
        "kind": InferencePolicy::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.metrics.status_writes.inc();
    info!(generation = ?policy.metadata.generation, matched = status.matched_pods, "status updated");
    Ok(())
}

/// Invalid policies wait for a change; transient failures back off exponentially (1 s to 5 min).
pub fn error_policy(policy: Arc<InferencePolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    if !error.is_transient() {
        warn!(policy = %policy.name_any(), %error, "policy cannot be reconciled until it changes");
        return Action::await_change();
    }
    let mut failures = ctx.failures();
    let count = failures
        .entry(ObjectRef::from_obj(policy.as_ref()))
        .or_insert(0);
    *count = count.saturating_add(1);
    let delay = backoff(*count);
    warn!(policy = %policy.name_any(), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Delay before retry `attempt` (1-based): 1 s doubling to at most 5 min.
pub fn backoff(attempt: u32) -> Duration {
    let secs = 1u64
        .checked_shl(attempt.saturating_sub(1).min(20))
        .unwrap_or(u64::MAX);
    Duration::from_secs(secs.min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_fingerprint_ignores_what_policies_do_not_read() {
        let pod = |labels: serde_json::Value, extra: &str| -> PartialObjectMeta<Pod> {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "ns", "labels": labels, "resourceVersion": extra,
                    "annotations": {"energy.ttc.dev/policy": "chat", "other": extra}}
            }))
            .expect("pod")
        };
        let base = pod_fingerprint(&pod(json!({"app": "chat"}), "1"));
        assert_eq!(base, pod_fingerprint(&pod(json!({"app": "chat"}), "2")));
        assert_ne!(base, pod_fingerprint(&pod(json!({"app": "search"}), "1")));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(40), Duration::from_secs(300));
    }
}
