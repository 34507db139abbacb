//! The pods of the demo: the operator's (from the chart) and the inference Deployment's, whose
//! sidecar containers the kubelet starts from the sidecar image.

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use ttc_api::labels::SIDECAR_CONTAINER_NAME;
use ttc_api::policy::DEFAULT_SIDECAR_PORT;

use super::workload::Endpoint;
use super::{DemoConfig, NAMESPACE, RELEASE, SYSTEM_NAMESPACE, detail, wait_for};

fn has_sidecar(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .any(|c| c.name == SIDECAR_CONTAINER_NAME)
    })
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits for the operator's pods of the release to be ready; returns their names.
pub(super) async fn operator_pods(client: &Client) -> anyhow::Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    wait_for(
        "the operator pods to be ready",
        Duration::from_secs(180),
        || {
            let pods = pods.clone();
            let selector = selector.clone();
            async move {
                let list = pods.list(&ListParams::default().labels(&selector)).await?;
                let ready: Vec<String> = list
                    .items
                    .iter()
                    .filter(|p| is_ready(p))
                    .map(|p| p.name_any())
                    .collect();
                Ok((!ready.is_empty() && ready.len() == list.items.len()).then_some(ready))
            }
        },
    )
    .await
}

/// Creates e2e/demo/deployment.yaml as Deployment `app` (its pods labelled `app=<app>`) and
/// waits until `replicas` of its pods serve: injected, and the sidecar past its readiness probe
/// (the model loaded).
pub(super) async fn start_workload(
    client: &Client,
    config: &DemoConfig,
    app: &str,
) -> anyhow::Result<Vec<Pod>> {
    let mut deployment: Deployment = serde_yaml::from_str(&std::fs::read_to_string(
        config.repo_root.join("e2e/demo/deployment.yaml"),
    )?)?;
    deployment.metadata.name = Some(app.to_string());
    let labels = std::collections::BTreeMap::from([("app".to_string(), app.to_string())]);
    if let Some(spec) = deployment.spec.as_mut() {
        spec.replicas = Some(config.replicas as i32);
        spec.selector.match_labels = Some(labels.clone());
        spec.template
            .metadata
            .get_or_insert_with(Default::default)
            .labels = Some(labels);
    }
    Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &deployment)
        .await
        .context("creating the Deployment")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let replicas = config.replicas as usize;
    wait_for("the pods to serve with the sidecar", Duration::from_secs(300), || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels(&format!("app={app}")))
                .await?;
            let mut ready = Vec::new();
            for pod in list.items {
                if pod.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                if !has_sidecar(&pod) {
                    // Created before the webhook knew the policy: let the ReplicaSet replace it.
                    detail(&format!(
                        "{} was created without the sidecar; deleting it so that it is recreated",
                        pod.name_any()
                    ));
                    pods.delete(&pod.name_any(), &DeleteParams::default())
                        .await?;
                    continue;
                }
                if is_ready(&pod) {
                    ready.push(pod);
                }
            }
            ready.sort_by_key(|p| p.name_any());
            Ok((ready.len() >= replicas).then(|| ready.into_iter().take(replicas).collect()))
        }
    })
    .await
}

/// Each pod's sidecar API at its pod address.
pub(super) fn endpoints(pods: &[Pod]) -> Vec<Endpoint> {
    pods.iter()
        .map(|pod| Endpoint {
            pod: pod.name_any(),
            url: format!(
                "http://{}:{DEFAULT_SIDECAR_PORT}",
                pod.status
                    .as_ref()
                    .and_then(|s| s.pod_ip.clone())
                    .unwrap_or_default()
            ),
        })
        .collect()
}
