//! Helpers of the operator's tests against the real local control plane.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use ttc_api::InferencePolicy;
use ttc_cluster::testing::{eventually, free_port};
use ttc_operator::run::OperatorConfig;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub fn api_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../api")
}

/// Applies the committed CRD manifest and waits until it is established.
pub async fn install_crd(client: &Client) -> TestResult {
    let text = std::fs::read_to_string(api_dir().join(ttc_api::CRD_MANIFEST_PATH))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
    let name = crd.metadata.name.clone().ok_or("CRD without a name")?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply("ttc-operator-tests").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    eventually("CRD established", Duration::from_secs(30), || {
        let api = api.clone();
        let name = name.clone();
        async move {
            let crd = api.get(&name).await.map_err(|e| e.to_string())?;
            let established = crd.status.and_then(|s| s.conditions).is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            Ok(established.then_some(()))
        }
    })
    .await?;
    Ok(())
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
