//! Helpers of the operator's tests against the real local control plane.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use ttc_api::InferencePolicy;
use ttc_cluster::testing::free_port;
pub use ttc_cluster::testing::install_crd;
use ttc_operator::run::OperatorConfig;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub fn api_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../api")
}

pub fn policy_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::erase::<InferencePolicy>(&()),
    )
}

/// Loopback ports of an operator run in-process.
#[derive(Debug, Clone, Copy)]
pub struct LocalPorts {
    pub admin: u16,
    pub receiver: u16,
    pub webhook: u16,
}

/// The configuration of an operator run in-process on free loopback ports, with its Lease in
/// `lease_namespace` and, when named, a webhook configuration pointing at it by URL.
pub fn local_operator(
    lease_namespace: &str,
    webhook_config: Option<String>,
) -> Result<(OperatorConfig, LocalPorts), std::io::Error> {
    let ports = LocalPorts {
        admin: free_port()?,
        receiver: free_port()?,
        webhook: free_port()?,
    };
    let config = OperatorConfig {
        admin_addr: ([127, 0, 0, 1], ports.admin).into(),
        webhook_addr: ([127, 0, 0, 1], ports.webhook).into(),
        receiver_addr: ([127, 0, 0, 1], ports.receiver).into(),
        report_auth: Default::default(),
        receiver_tls: false,
        sidecar_image: "ttc-sidecar:test".into(),
        default_model: "smollm2-135m-instruct".into(),
        otlp_endpoint: format!("http://127.0.0.1:{}", ports.receiver),
        sidecar_resources: None,
        cluster_power_cap_watts: None,
        resync_seconds: 1,
        stale_seconds: 60,
        lease_name: "ttc-operator".into(),
        lease_namespace: lease_namespace.into(),
        identity: Some("test-replica".into()),
        tls_cert_file: None,
        tls_key_file: None,
        tls_ca_file: None,
        certificate_check_seconds: 60,
        tls_names: vec!["127.0.0.1".into(), "localhost".into()],
        webhook_url: webhook_config
            .as_ref()
            .map(|_| format!("https://127.0.0.1:{}", ports.webhook)),
        webhook_config_name: webhook_config,
        webhook_service: None,
    };
    Ok((config, ports))
}
