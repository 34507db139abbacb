//! `InferencePolicy`: the energy budget and test-time-compute limits for a set of inference pods.
//!
//! Defaults live next to the fields (`default_*` functions) and end up in the CRD schema, so the
//! API server fills them in; validation is in the schema too (OpenAPI bounds and CEL rules), so an
//! invalid policy is rejected by `kubectl apply` with the field named.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default port of the sidecar's OpenAI-compatible HTTP API.
pub const DEFAULT_SIDECAR_PORT: u16 = 8090;
/// Default averaging window of a budget, in seconds.
pub const DEFAULT_WINDOW_SECONDS: u32 = 300;
/// Default priority of a policy in the cluster-wide split.
pub const DEFAULT_PRIORITY: u32 = 100;

/// An energy budget and test-time-compute (TTC) limits for the inference pods it selects.
///
/// The operator injects the TTC sidecar into the selected pods, splits the budget among them by
/// load and reports in the status whether the budget holds.
// The derive takes one printcolumn(...) per column, which repeats its keys.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "energy.ttc.dev",
    version = "v1alpha1",
    kind = "InferencePolicy",
    plural = "inferencepolicies",
    shortname = "ipol",
    namespaced,
    status = "InferencePolicyStatus",
    derive = "PartialEq",
    doc = "An energy budget and test-time-compute limits for the inference pods it selects.",
    printcolumn(
        name = "Budget",
        type_ = "string",
        description = "The policy's budget",
        json_path = ".status.budgetSummary"
    ),
    printcolumn(
        name = "Observed",
        type_ = "string",
        description = "Observed energy and its source",
        json_path = ".status.observedSummary"
    ),
    printcolumn(
        name = "Depth",
        type_ = "number",
        description = "Mean TTC depth (samples per request)",
        json_path = ".status.meanDepth"
    ),
    printcolumn(
        name = "Pods",
        type_ = "integer",
        description = "Pods the policy selects",
        json_path = ".status.matchedPods"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Ready condition",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePolicySpec {
    /// Which pods of this policy's namespace the policy governs. An empty selector selects every
    /// pod of the namespace. A pod selected by two policies is governed by neither (see the
    /// `Degraded` condition). Pods get the sidecar only in namespaces labelled
    /// `energy.ttc.dev/injection=enabled`.
    pub selector: LabelSelector,

    /// The energy budget of all selected pods together. At least one of joulesPerRequest,
    /// powerCapWatts and joulesPerWindow must be set.
    pub budget: EnergyBudget,

    /// How the sidecar spends test-time compute within the budget. Omitted: the Adaptive strategy
    /// with the defaults of its fields.
    #[serde(default)]
    pub ttc: TtcSpec,

    /// Which model the sidecar serves. When empty, the operator's default model is served.
    #[serde(default)]
    pub model: ModelSpec,

    /// The injected sidecar container. Unset fields take the operator's configured defaults.
    #[serde(default)]
    pub sidecar: SidecarSpec,

    /// Weight of this policy in the cluster-wide power split (0-1000): under a cluster power cap,
    /// each policy's share is proportional to its priority, capped at what it needs.
    #[serde(default = "default_priority")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: u32,
}

fn default_priority() -> u32 {
    DEFAULT_PRIORITY
}

/// The energy budget of a policy: any combination of an average per request, a power cap and an
/// amount of energy per window.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.joulesPerRequest) || has(self.powerCapWatts) || has(self.joulesPerWindow)").message("budget needs at least one of joulesPerRequest, powerCapWatts, joulesPerWindow"))]
pub struct EnergyBudget {
    /// Average energy per request over the window, in joules, across all selected pods. Each
    /// sidecar picks every request's TTC depth so that its average stays within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("budget.joulesPerRequest must be greater than 0"))]
    pub joules_per_request: Option<f64>,

    /// Average power of all selected pods together over the window, in watts, split among the
    /// pods by their share of the load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("budget.powerCapWatts must be greater than 0"))]
    pub power_cap_watts: Option<f64>,

    /// Energy all selected pods together may spend per window, in joules (3.6e6 J = 1 kWh). The
    /// operator checks it against the current power times windowSeconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("budget.joulesPerWindow must be greater than 0"))]
    pub joules_per_window: Option<f64>,

    /// Length of the averaging window, in seconds (10 s to 24 h). The observed figures in the
    /// status are over the same window.
    #[serde(default = "default_window_seconds")]
    #[schemars(range(min = 10, max = 86400))]
    pub window_seconds: u32,
}

fn default_window_seconds() -> u32 {
    DEFAULT_WINDOW_SECONDS
}

/// The test-time-compute strategy of the sidecar.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TtcStrategy {
    /// Sample several answers and return the most frequent one, stopping early on agreement.
    MajorityVote,
    /// Sample answers until the verifier accepts one (needs `verifier`).
    BestOfN,
    /// One answer with a budget of reasoning tokens.
    ReasoningBudget,
    /// BestOfN when a verifier is set, else ReasoningBudget for a reasoning model, else
    /// MajorityVote; the depth of each request by its estimated difficulty and the budget left.
    #[default]
    Adaptive,
}

/// Limits on test-time compute per request.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minSamples <= self.maxSamples").message("ttc.minSamples must be less than or equal to ttc.maxSamples").field_path(".minSamples"))]
#[x_kube(validation = Rule::new("self.minReasoningTokens <= self.maxReasoningTokens").message("ttc.minReasoningTokens must be less than or equal to ttc.maxReasoningTokens").field_path(".minReasoningTokens"))]
#[x_kube(validation = Rule::new("self.strategy != 'BestOfN' || has(self.verifier)").message("ttc.verifier is required when ttc.strategy is BestOfN").field_path(".verifier"))]
pub struct TtcSpec {
    /// The TTC strategy. MajorityVote: sample several answers and return the most frequent one,
    /// stopping early on agreement. BestOfN: sample answers until the verifier accepts one (needs
    /// verifier). ReasoningBudget: one answer with a budget of reasoning tokens. Adaptive: BestOfN
    /// when a verifier is set, else ReasoningBudget for a reasoning model, else MajorityVote.
    /// Every strategy picks the depth of each request within the bounds below so that the budget
    /// holds.
    #[serde(default)]
    pub strategy: TtcStrategy,

    /// Fewest samples per request (1-64), however tight the budget.
    #[serde(default = "default_min_samples")]
    #[schemars(range(min = 1, max = 64))]
    pub min_samples: u32,

    /// Most samples per request (1-64), however much budget is left.
    #[serde(default = "default_max_samples")]
    #[schemars(range(min = 1, max = 64))]
    pub max_samples: u32,

    /// Fewest reasoning tokens per sample under ReasoningBudget (0-32768).
    #[serde(default)]
    #[schemars(range(min = 0, max = 32768))]
    pub min_reasoning_tokens: u32,

    /// Most reasoning tokens per sample under ReasoningBudget (0-32768); 0 keeps Adaptive from
    /// choosing ReasoningBudget.
    #[serde(default = "default_max_reasoning_tokens")]
    #[schemars(range(min = 0, max = 32768))]
    pub max_reasoning_tokens: u32,

    /// Stop sampling early once this fraction of the samples drawn so far agree on one answer
    /// (0.5-1.0).
    #[serde(default = "default_early_stop_agreement")]
    #[schemars(range(min = 0.5, max = 1.0))]
    pub early_stop_agreement: f64,

    /// Stop a vote early, even on its first (greedy) sample, once the model's own token
    /// probabilities make it at least this likely (0.5-1.0) that the vote of all its samples
    /// would give the answer it leads with; 1 turns this off, keeping a vote's answer that of
    /// its full depth or its agreement rule.
    #[serde(default = "default_stop_confidence")]
    #[schemars(range(min = 0.5, max = 1.0))]
    pub stop_confidence: f64,

    /// Spend more samples on queries estimated to be hard, fewer on easy ones.
    #[serde(default = "default_difficulty_aware")]
    pub difficulty_aware: bool,

    /// With difficultyAware and clients' verdicts on answers (the sidecar's POST
    /// /v1/ttc/feedback): the share of answers (0-1) extra depth must make right over minimum
    /// depth for a class of request to keep paying for it; 0.03 gives depth up where it is shown
    /// to buy less than three points.
    #[serde(default = "default_min_depth_gain")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_depth_gain: f64,

    /// How candidate answers are checked: required by BestOfN; under Adaptive, setting one makes
    /// every request BestOfN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifier: Option<Verifier>,
}

fn default_min_samples() -> u32 {
    1
}
fn default_max_samples() -> u32 {
    8
}
fn default_max_reasoning_tokens() -> u32 {
    1024
}
fn default_early_stop_agreement() -> f64 {
    0.75
}
fn default_stop_confidence() -> f64 {
    0.95
}
fn default_min_depth_gain() -> f64 {
    0.03
}
fn default_difficulty_aware() -> bool {
    true
}

impl Default for TtcSpec {
    fn default() -> Self {
        Self {
            strategy: TtcStrategy::default(),
            min_samples: default_min_samples(),
            max_samples: default_max_samples(),
            min_reasoning_tokens: 0,
            max_reasoning_tokens: default_max_reasoning_tokens(),
            early_stop_agreement: default_early_stop_agreement(),
            stop_confidence: default_stop_confidence(),
            difficulty_aware: default_difficulty_aware(),
            min_depth_gain: default_min_depth_gain(),
            verifier: None,
        }
    }
}

/// How candidate answers are checked. Exactly one of jsonSchema, regex and http.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.jsonSchema), has(self.regex), has(self.http)].filter(x, x).size() == 1").message("ttc.verifier needs exactly one of jsonSchema, regex, http"))]
pub struct Verifier {
    /// A JSON Schema (as JSON text) that the first JSON object or array in the answer must
    /// validate against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<String>,

    /// A regular expression the answer must match (anywhere in it, unless anchored with ^ and $).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,

    /// An HTTP endpoint that scores answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpVerifier>,
}

/// An HTTP endpoint that scores candidate answers.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpVerifier {
    /// URL the sidecar POSTs `{"prompt", "answer"}` to; it answers `{"score": <number>}`.
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("ttc.verifier.http.url must be an http:// or https:// URL"))]
    pub url: String,

    /// Timeout of one verification call, in milliseconds (1-60000).
    #[serde(default = "default_verifier_timeout_ms")]
    #[schemars(range(min = 1, max = 60000))]
    pub timeout_ms: u32,

    /// Score at or above which a candidate is accepted (0-1).
    #[serde(default = "default_verifier_accept_score")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub accept_score: f64,
}

fn default_verifier_timeout_ms() -> u32 {
    2000
}

fn default_verifier_accept_score() -> f64 {
    0.5
}

/// Which model the sidecar serves: a named model known to the sidecar image, or a GGUF file on a
/// volume. Empty means the operator's default model.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.name) && has(self.path))").message("model takes name or path, not both").field_path(".path"))]
#[x_kube(validation = Rule::new("!has(self.volumeClaim) || has(self.path)").message("model.path is required when model.volumeClaim is set").field_path(".path"))]
pub struct ModelSpec {
    /// A named model known to the sidecar image (for example `smollm2-135m-instruct`), fetched
    /// and checksummed into the sidecar's cache when it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,

    /// Absolute path of a GGUF file inside the sidecar container. With volumeClaim, the claim is
    /// mounted read-only at /models, so the path starts with /models/.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("model.path must be an absolute path"))]
    pub path: Option<String>,

    /// A PersistentVolumeClaim in the pod's namespace holding the model, mounted read-only at
    /// /models in the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_claim: Option<String>,
}

/// The injected sidecar container. Unset fields take the operator's configured defaults.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Container image of the sidecar. Default: the operator's `--sidecar-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Port of the sidecar's OpenAI-compatible HTTP API (1024-65535; default 8090).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: Option<u16>,

    /// Compute resources of the sidecar container (for example nvidia.com/gpu). Default: the
    /// operator's `--sidecar-resources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// OTLP/HTTP endpoint the sidecar exports its metrics to. Default: the operator's receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("sidecar.otlpEndpoint must be an http:// or https:// URL"))]
    pub otlp_endpoint: Option<String>,
}

impl SidecarSpec {
    /// The sidecar's port, defaulted.
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(DEFAULT_SIDECAR_PORT)
    }
}

pub use crate::energy::EnergySource;

/// What the operator observes of a policy. Written by the operator only.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InferencePolicyStatus {
    /// The spec generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready (the policy is in force; False when the namespace is not opted into injection or the
    /// spec cannot be acted on), BudgetMet (observed energy within budget, Unknown without fresh
    /// reports; the message names the energy source) and Degraded (pods without the sidecar,
    /// stale reports, overlapping policies).
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// Number of pods the policy selects (excluding pods also selected by another policy).
    #[serde(default)]
    pub matched_pods: u32,

    /// Number of selected pods that carry the injected sidecar.
    #[serde(default)]
    pub injected_pods: u32,

    /// The budget in one line, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_summary: Option<String>,

    /// The observed energy in one line, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_summary: Option<String>,

    /// Energy observed over the budget window, aggregated from fresh sidecar reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<ObservedEnergy>,

    /// Mean TTC depth (samples per request) over the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_depth: Option<f64>,

    /// The budget allocated to each selected pod. Sidecars read their own entry.
    #[serde(default)]
    pub allocations: Vec<PodAllocation>,

    /// This policy's share of the cluster-wide power cap, when the operator has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_share: Option<ClusterShare>,

    /// The CA certificates (PEM) of the operator's report receiver, when it serves TLS. Injected
    /// sidecars that report to it trust these besides the CA they were created with, so a CA
    /// change reaches running pods without recreating them.
    #[serde(
        default,
        rename = "reportCABundle",
        skip_serializing_if = "Option::is_none"
    )]
    pub report_ca_bundle: Option<String>,
}

/// Energy observed over the budget window.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObservedEnergy {
    /// Average joules per request; absent when no request completed in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joules_per_request: Option<f64>,
    /// Average power of all reporting pods together, in watts.
    pub watts: f64,
    /// Joules spent in the window by all reporting pods together.
    pub joules: f64,
    /// Requests completed in the window.
    pub requests: u64,
    /// Where the figures come from: nvml, rapl or estimate (estimate if any pod estimates).
    pub source: EnergySource,
    /// Number of pods whose reports are fresh.
    pub reporting_pods: u32,
}

/// The share of a policy's budget allocated to one pod.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodAllocation {
    /// Name of the pod.
    pub pod: String,
    /// Fraction of the policy budget given to this pod (0-1), by its share of the load.
    pub share: f64,
    /// The pod's target average joules per request (the policy's target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joules_per_request: Option<f64>,
    /// The pod's power cap, in watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watts: Option<f64>,
    /// The pod's energy per window, in joules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joules_per_window: Option<f64>,
}

/// A policy's share of the cluster-wide power cap.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterShare {
    /// Watts of the cluster power cap given to this policy.
    pub watts: f64,
    /// Fraction of the cluster power cap given to this policy (0-1).
    pub fraction: f64,
}

impl InferencePolicySpec {
    /// The budget in one line, for `kubectl get` (for example `2J/req 300W /300s`).
    pub fn budget_summary(&self) -> String {
        let b = &self.budget;
        let mut parts = Vec::new();
        if let Some(j) = b.joules_per_request {
            parts.push(format!("{}J/req", trim(j)));
        }
        if let Some(w) = b.power_cap_watts {
            parts.push(format!("{}W", trim(w)));
        }
        if let Some(j) = b.joules_per_window {
            parts.push(format!("{}J/win", trim(j)));
        }
        parts.push(format!("/{}s", b.window_seconds));
        parts.join(" ")
    }
}

/// Formats a figure with at most three significant decimals and no trailing zeros.
pub fn trim(value: f64) -> String {
    let s = format!("{value:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}
