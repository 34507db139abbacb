//! The contract by which sidecars report energy to the operator.
//!
//! A sidecar reports cumulative counters since it started (energy, requests, TTC samples) and its
//! current power. Cumulative counters survive lost reports: the operator takes differences between
//! reports across the budget window. A sidecar restart starts its counters again from zero; a
//! counter that goes down, or a new start time, marks one, and the operator carries the earlier
//! process's last figures over, so a restart loses only what was never reported.
//!
//! Two encodings carry the same figures:
//! - OTLP/HTTP metrics (`POST {endpoint}/v1/metrics`, `application/x-protobuf`), which any
//!   OpenTelemetry SDK exporter produces: the metric names below, cumulative monotonic sums and one
//!   gauge, with the resource attributes below naming the pod and policy.
//! - JSON (`POST {endpoint}/v1/reports`, `application/json`): one [`EnergyReport`].

use serde::{Deserialize, Serialize};

use crate::policy::EnergySource;

/// OTLP/HTTP path of metric exports, relative to the receiver's endpoint.
pub const OTLP_METRICS_PATH: &str = "/v1/metrics";
/// Path of JSON reports, relative to the receiver's endpoint.
pub const JSON_REPORTS_PATH: &str = "/v1/reports";
/// Default port of the operator's report receiver (the OTLP/HTTP port).
pub const DEFAULT_RECEIVER_PORT: u16 = 4318;
/// Response header of a receiver replica that does not hold the lease: it refuses the report
/// with 503 and closes the connection, so the sender's retry, on a new connection through the
/// Service, reaches another replica. Only the leader keeps reports, as only it writes status.
pub const NOT_LEADER_HEADER: &str = "ttc-not-leader";

/// Cumulative monotonic sum: joules spent since the sidecar started. Unit `J`.
pub const METRIC_ENERGY_JOULES: &str = "ttc.energy.joules";
/// Cumulative monotonic sum: requests completed since the sidecar started. Unit `{request}`.
pub const METRIC_REQUESTS: &str = "ttc.requests";
/// Cumulative monotonic sum: TTC samples generated since the sidecar started (depth = samples per
/// request). Unit `{sample}`.
pub const METRIC_SAMPLES: &str = "ttc.samples";
/// Gauge: current power draw of the pod's inference, in watts. Unit `W`.
pub const METRIC_POWER_WATTS: &str = "ttc.power.watts";

/// Resource attribute: namespace of the pod (OpenTelemetry semantic convention).
pub const ATTR_NAMESPACE: &str = "k8s.namespace.name";
/// Resource attribute: name of the pod (OpenTelemetry semantic convention).
pub const ATTR_POD_NAME: &str = "k8s.pod.name";
/// Resource attribute: name of the InferencePolicy governing the pod.
pub const ATTR_POLICY: &str = "ttc.policy.name";
/// Data point attribute of the energy metrics: `nvml`, `rapl` or `estimate`.
pub const ATTR_ENERGY_SOURCE: &str = "ttc.energy.source";

/// One report from one sidecar: cumulative counters since it started and its current power.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnergyReport {
    /// Namespace of the reporting pod.
    pub namespace: String,
    /// Name of the reporting pod.
    pub pod: String,
    /// Name of the InferencePolicy governing the pod.
    pub policy: String,
    /// Where the energy figures come from.
    pub source: EnergySource,
    /// Joules spent since the sidecar started.
    pub joules_total: f64,
    /// Requests completed since the sidecar started.
    pub requests_total: u64,
    /// TTC samples generated since the sidecar started.
    pub samples_total: u64,
    /// Current power draw, in watts, when the meter has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watts: Option<f64>,
    /// When the counters started (the sidecar process's start), in nanoseconds since the Unix
    /// epoch, where the sender says: a new start time marks a restart even before the new
    /// counters are lower than the old. In OTLP, the energy points' `start_time_unix_nano`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix_nanos: Option<u64>,
}

/// Environment variables the operator sets on the injected sidecar container.
pub mod sidecar_env {
    /// Name of the governing InferencePolicy.
    pub const POLICY_NAME: &str = "TTC_POLICY_NAME";
    /// Namespace of the pod and of the policy (downward API).
    pub const POD_NAMESPACE: &str = "TTC_POD_NAMESPACE";
    /// Name of the pod (downward API).
    pub const POD_NAME: &str = "TTC_POD_NAME";
    /// UID of the pod (downward API).
    pub const POD_UID: &str = "TTC_POD_UID";
    /// Node the pod runs on (downward API).
    pub const NODE_NAME: &str = "TTC_NODE_NAME";
    /// Model to serve: a known model name or the path of a GGUF file (the sidecar's `--model`).
    pub const MODEL: &str = "TTC_MODEL";
    /// Address the sidecar's HTTP API listens on, `0.0.0.0:<spec.sidecar.port>` (`--listen`).
    pub const LISTEN: &str = "TTC_LISTEN";
    /// `true`: test-time compute on, governed by the policy (`--ttc`).
    pub const ENABLE_TTC: &str = "TTC_ENABLE";
    /// Writable directory for fetched models (`--cache`); the root filesystem is read-only.
    pub const MODEL_CACHE: &str = "TTC_MODEL_CACHE";
    /// `true`: run on the first CUDA GPU (`--cuda`); set when the sidecar's resources give it
    /// an `nvidia.com/gpu`.
    pub const CUDA: &str = "TTC_CUDA";
    /// Keys that sign feedback tickets (`--feedback-key-file`): the namespace's
    /// [`FEEDBACK_KEY_SECRET`](super::FEEDBACK_KEY_SECRET), mounted when it exists.
    pub const FEEDBACK_KEY_FILE: &str = "TTC_FEEDBACK_KEY_FILE";
    /// OTLP/HTTP endpoint for metrics (the operator's receiver by default).
    pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    /// OpenTelemetry resource attributes naming the pod and policy.
    pub const OTEL_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
    /// File holding the pod's service-account token for the receiver (set when the operator
    /// authenticates reports): the sidecar sends it as `Authorization: Bearer` with every export
    /// and re-reads it as the kubelet rotates it.
    pub const REPORT_TOKEN_FILE: &str = "TTC_REPORT_TOKEN_FILE";
    /// PEM CA certificate(s) of the operator's receiver (set when the receiver serves TLS): the
    /// sidecar's OTLP export trusts them, and only them.
    pub const REPORT_CA_PEM: &str = "TTC_REPORT_CA_PEM";
}

/// Audience of the service-account tokens sidecars present to the receiver: a token minted for
/// the operator is good for nothing else, and no other token is good for the operator.
pub const REPORT_TOKEN_AUDIENCE: &str = "ttc-operator";

/// Where the injected sidecar finds its receiver token (a projected service-account token).
pub const REPORT_TOKEN_PATH: &str = "/var/run/secrets/ttc-operator/token";

/// The Secret, in a workload's namespace, whose `keys` sign the feedback tickets of every
/// sidecar there (one key per line; the first signs, every one is accepted). The operator mounts
/// it into injected sidecars when it exists (optional), so that the replicas behind one Service
/// take each other's tickets; rotate by listing a new key first.
pub const FEEDBACK_KEY_SECRET: &str = "ttc-feedback-keys";
/// The Secret's key holding the keys.
pub const FEEDBACK_KEY_SECRET_KEY: &str = "keys";
/// Where the sidecar finds them.
pub const FEEDBACK_KEY_PATH: &str = "/var/run/secrets/ttc-operator/feedback/keys";
