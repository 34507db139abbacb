use std::path::PathBuf;
use std::time::Duration;
use ttc_api::report::{self, sidecar_env};

/// Whether and where to push OTLP metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtlpExport {
    /// No OTLP export; Prometheus only.
    Disabled,
    /// Endpoint, headers, timeout and protocol from the standard `OTEL_EXPORTER_OTLP_*`
    /// variables.
    FromEnv,
    /// This OTLP/HTTP metrics URL (e.g. `http://collector:4318/v1/metrics`); other settings
    /// from the environment.
    Endpoint(String),
}

/// Telemetry settings of one sidecar.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// `service.name`; `OTEL_SERVICE_NAME` wins when set.
    pub service_name: String,
    /// `k8s.pod.name`.
    pub pod_name: Option<String>,
    /// `k8s.namespace.name`.
    pub namespace: Option<String>,
    /// `ttc.policy.name`: the InferencePolicy this pod serves under.
    pub policy: Option<String>,
    /// `gen_ai.request.model` on request metrics.
    pub model: String,
    /// OTLP export.
    pub otlp: OtlpExport,
    /// How often to export; `OTEL_METRIC_EXPORT_INTERVAL` (default 60 s) when unset.
    pub export_interval: Option<Duration>,
    /// How long one export may take; `OTEL_EXPORTER_OTLP_TIMEOUT` (default 10 s) when unset.
    pub export_timeout: Option<Duration>,
    /// A file holding a bearer token sent with every OTLP export, re-read each time
    /// (`TTC_REPORT_TOKEN_FILE`: the pod's projected service-account token for the operator's
    /// receiver).
    pub bearer_token_file: Option<PathBuf>,
    /// PEM CA certificates the OTLP export trusts, and the only ones (`TTC_REPORT_CA_PEM`: the
    /// operator's receiver CA, where the receiver serves TLS).
    pub ca_pem: Option<String>,
}

impl TelemetryConfig {
    /// Settings from the environment the operator's webhook injects: `TTC_POD_NAME`,
    /// `TTC_POD_NAMESPACE` (downward API; `POD_NAME`, `HOSTNAME` and `POD_NAMESPACE` otherwise) and
    /// `TTC_POLICY_NAME`. OTLP is on when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` is set, unless
    /// `OTEL_METRICS_EXPORTER=none`.
    pub fn from_env(model: impl Into<String>) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let otlp_wanted = var("OTEL_METRICS_EXPORTER").is_none_or(|v| v != "none")
            && (var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").is_some());
        Self {
            service_name: "ttc-sidecar".to_string(),
            pod_name: var(sidecar_env::POD_NAME)
                .or_else(|| var("POD_NAME"))
                .or_else(|| var("HOSTNAME")),
            namespace: var(sidecar_env::POD_NAMESPACE).or_else(|| var("POD_NAMESPACE")),
            policy: var(sidecar_env::POLICY_NAME),
            model: model.into(),
            otlp: if otlp_wanted {
                OtlpExport::FromEnv
            } else {
                OtlpExport::Disabled
            },
            export_interval: None,
            export_timeout: None,
            bearer_token_file: var(sidecar_env::REPORT_TOKEN_FILE).map(PathBuf::from),
            ca_pem: var(sidecar_env::REPORT_CA_PEM),
        }
    }

    /// The resource attributes, as (key, value) pairs, absent ones left out.
    pub fn resource_attributes(&self) -> Vec<(&'static str, String)> {
        let service = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| self.service_name.clone());
        let mut attrs = vec![("service.name", service)];
        let optional = [
            (report::ATTR_POD_NAME, &self.pod_name),
            (report::ATTR_NAMESPACE, &self.namespace),
            (report::ATTR_POLICY, &self.policy),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                attrs.push((k, v.clone()));
            }
        }
        attrs
    }
}
