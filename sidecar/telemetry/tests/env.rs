//! The OTLP endpoint and the pod's identity come from the environment the operator's webhook
//! injects (`OTEL_EXPORTER_OTLP_ENDPOINT`, `TTC_POD_NAME`, ...). Alone in its test binary, since
//! it sets process environment variables.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry_proto::tonic::common::v1::any_value;
use ttc_telemetry::{OtlpExport, SidecarMetrics, TelemetryConfig};

#[test]
fn endpoint_and_identity_from_the_environment() {
    let (url, rx) = common::otlp_receiver();
    let base = url.trim_end_matches("/v1/metrics").to_string();
    // SAFETY: the only test in this binary, so no other thread reads the environment.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &base);
        std::env::set_var("TTC_POD_NAME", "infer-7");
        std::env::set_var("TTC_POD_NAMESPACE", "team-a");
        std::env::set_var("TTC_POLICY_NAME", "silver");
        std::env::remove_var("OTEL_METRICS_EXPORTER");
        std::env::remove_var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT");
    }
    let mut config = TelemetryConfig::from_env("tiny");
    assert_eq!(config.otlp, OtlpExport::FromEnv);
    config.export_interval = Some(Duration::from_secs(3600));
    let metrics = SidecarMetrics::new(&config, None).unwrap();
    metrics.record_ttc_depth("vote", 2);
    metrics.force_flush().unwrap();
    let req = rx.recv_timeout(Duration::from_secs(10)).expect("an export");
    let resource: BTreeMap<String, String> = req.resource_metrics[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(resource["k8s.pod.name"], "infer-7");
    assert_eq!(resource["k8s.namespace.name"], "team-a");
    assert_eq!(resource["ttc.policy.name"], "silver");
    assert_eq!(resource["service.name"], "ttc-sidecar");
    metrics.shutdown().unwrap();

    // OTEL_METRICS_EXPORTER=none turns OTLP off.
    unsafe { std::env::set_var("OTEL_METRICS_EXPORTER", "none") };
    assert_eq!(TelemetryConfig::from_env("tiny").otlp, OtlpExport::Disabled);
}
