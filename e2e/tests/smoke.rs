//! Smoke test of the local control plane: the pinned version answers, the simulated GPU nodes
//! are Ready, GPU pods get scheduled and Running with loopback IPs, and garbage collection
//! removes them with their Deployment.
//!
//! Needs `KUBECONFIG_FOR_TESTS` or `TTC_CONTROL_PLANE_BIN` (see `e2e/test.sh`); without either
//! these tests fail.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, Pod, PodSpec, PodTemplateSpec, ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use ttc_cluster::testing::{TestNamespace, eventually, shared_cluster};
use ttc_cluster::{GPU_RESOURCE, K8S_VERSION};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[tokio::test]
async fn kubectl_reports_the_pinned_server_version() -> TestResult {
    let cluster = tokio::task::spawn_blocking(shared_cluster).await??;
    let output = cluster
        .kubectl()
        .args(["version", "--output=json"])
        .output()?;
    assert!(
        output.status.success(),
        "kubectl version failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let version: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(
        version["serverVersion"]["gitVersion"], K8S_VERSION,
        "kubectl version: {version}"
    );
    Ok(())
}

#[tokio::test]
async fn helm_reaches_the_cluster() -> TestResult {
    let cluster = tokio::task::spawn_blocking(shared_cluster).await??;
    let output = cluster
        .helm()
        .args(["list", "--all-namespaces", "--output=json"])
        .output()?;
    assert!(
        output.status.success(),
        "helm list failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let releases: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert!(releases.is_array(), "helm list: {releases}");
    Ok(())
}

#[tokio::test]
async fn simulated_gpu_nodes_are_ready() -> TestResult {
    let cluster = tokio::task::spawn_blocking(shared_cluster).await??;
    let nodes: Api<Node> = Api::all(cluster.client().await?);
    let gpu_nodes = nodes
        .list(&ListParams::default().labels("nvidia.com/gpu.present=true"))
        .await?;
    assert!(
        !gpu_nodes.items.is_empty(),
        "no node is labelled nvidia.com/gpu.present=true"
    );
    for node in &gpu_nodes.items {
        let name = node.metadata.name.as_deref().unwrap_or("?");
        assert!(
            ttc_cluster::nodes::is_ready(node),
            "node {name} is not Ready: {:?}",
            node.status
        );
        let capacity = node.status.as_ref().and_then(|s| s.capacity.as_ref());
        let gpus = capacity
            .and_then(|c| c.get(GPU_RESOURCE))
            .map(|q| q.0.as_str());
        assert!(
            gpus.is_some_and(|g| g != "0"),
            "node {name} has no {GPU_RESOURCE} capacity"
        );
    }
    Ok(())
}

#[tokio::test]
async fn gpu_deployment_runs_on_gpu_nodes_with_loopback_ips_and_is_garbage_collected() -> TestResult
{
    let ns = TestNamespace::create("smoke-gpu-deployment").await?;
    let deployments: Api<Deployment> = ns.api();
    let pods: Api<Pod> = ns.api();
    let nodes: Api<Node> = Api::all(ns.client().clone());
    let labels = BTreeMap::from([("app".to_string(), "gpu-smoke".to_string())]);
    let gpu = BTreeMap::from([(GPU_RESOURCE.to_string(), Quantity("1".into()))]);
    let deployment = Deployment {
        metadata: ObjectMeta {
            name: Some("gpu-smoke".into()),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(3),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "model".into(),
                        image: Some("registry.invalid/model:never-pulled".into()),
                        resources: Some(ResourceRequirements {
                            requests: Some(gpu.clone()),
                            limits: Some(gpu),
                            ..ResourceRequirements::default()
                        }),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;

    let selector = ListParams::default().labels("app=gpu-smoke");
    let running = eventually(
        "3 pods Running with pod IPs",
        Duration::from_secs(60),
        || async {
            let list = pods.list(&selector).await.map_err(|e| e.to_string())?;
            let running: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| {
                    let status = p.status.as_ref();
                    status.and_then(|s| s.phase.as_deref()) == Some("Running")
                        && status.and_then(|s| s.pod_ip.as_ref()).is_some()
                })
                .collect();
            Ok((running.len() == 3).then_some(running))
        },
    )
    .await?;

    let mut ips = Vec::new();
    for pod in &running {
        let name = pod.metadata.name.as_deref().unwrap_or("?");
        let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let node_name = node_name.ok_or_else(|| format!("pod {name} is not scheduled"))?;
        let node = nodes.get(&node_name).await?;
        let node_labels = node.metadata.labels.unwrap_or_default();
        assert_eq!(
            node_labels
                .get("nvidia.com/gpu.present")
                .map(String::as_str),
            Some("true"),
            "pod {name} runs on {node_name}, which is not a GPU node"
        );
        let ip_text = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        let ip: Ipv4Addr = ip_text.parse()?;
        assert!(
            ip.is_loopback(),
            "pod {name} has IP {ip}, not a loopback address"
        );
        ips.push(ip);
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "pods share IPs: {ips:?}");

    // A process bound to a pod's IP is reachable at that IP: the point of loopback pod IPs.
    let listener = tokio::net::TcpListener::bind((ips[0], 0)).await?;
    let addr = listener.local_addr()?;
    let (connected, accepted) =
        tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    connected?;
    accepted?;

    deployments
        .delete("gpu-smoke", &DeleteParams::background())
        .await?;
    eventually(
        "the Deployment's pods are garbage-collected",
        Duration::from_secs(60),
        || async {
            let list = pods.list(&selector).await.map_err(|e| e.to_string())?;
            Ok(list.items.is_empty().then_some(()))
        },
    )
    .await?;
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn test_namespaces_are_deleted_when_dropped() -> TestResult {
    let ns = TestNamespace::create("smoke-drop").await?;
    let name = ns.name().to_string();
    let namespaces: Api<Namespace> = Api::all(ns.client().clone());
    drop(ns);
    let found = namespaces.get_opt(&name).await?;
    let terminating = found.is_none_or(|n| n.metadata.deletion_timestamp.is_some());
    assert!(
        terminating,
        "namespace {name} is neither gone nor terminating after drop"
    );
    Ok(())
}
