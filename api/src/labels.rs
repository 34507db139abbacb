//! Label and annotation keys under the `energy.ttc.dev/` prefix.

/// Namespace label that opts a namespace into sidecar injection (value `enabled`).
pub const INJECTION_NAMESPACE_LABEL: &str = "energy.ttc.dev/injection";
/// Value of [`INJECTION_NAMESPACE_LABEL`] that enables injection.
pub const INJECTION_ENABLED: &str = "enabled";
/// Pod annotation that opts a single pod out of injection (value `false`).
pub const INJECT_POD_ANNOTATION: &str = "energy.ttc.dev/inject";
/// Pod annotation the webhook sets: the name of the policy whose sidecar was injected.
pub const INJECTED_POLICY_ANNOTATION: &str = "energy.ttc.dev/policy";
/// Pod annotation the webhook sets when it selected the pod but did not inject, and why.
pub const INJECTION_SKIPPED_ANNOTATION: &str = "energy.ttc.dev/injection-skipped";
/// Name of the injected sidecar container.
pub const SIDECAR_CONTAINER_NAME: &str = "ttc-sidecar";
/// Name of the injected sidecar's HTTP port (the API, `/metrics`, the probes; the chart's
/// PodMonitor finds the sidecars by it).
pub const SIDECAR_PORT_NAME: &str = "ttc-http";
