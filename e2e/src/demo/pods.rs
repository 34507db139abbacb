//! The inference workload: the Deployment, its injected pods, and their sidecar containers run
//! as local processes on the pods' IPs.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use ttc_crds::labels::SIDECAR_CONTAINER_NAME;

use super::kubelet::{self, ConfigMaps, HostMount};
use super::workload::Endpoint;
use super::{DemoConfig, NAMESPACE, Running, detail, wait_for};
use crate::process::Component;

fn has_sidecar(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .any(|c| c.name == SIDECAR_CONTAINER_NAME)
    })
}

/// Creates the Deployment and waits for its pods to run with the sidecar injected.
pub(super) async fn start_workload(
    client: &Client,
    config: &DemoConfig,
) -> anyhow::Result<Vec<Pod>> {
    let mut deployment: Deployment = serde_yaml::from_str(&std::fs::read_to_string(
        config.repo_root.join("e2e/demo/deployment.yaml"),
    )?)?;
    if let Some(spec) = deployment.spec.as_mut() {
        spec.replicas = Some(config.replicas as i32);
    }
    Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &deployment)
        .await
        .context("creating the Deployment")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let replicas = config.replicas as usize;
    wait_for("the pods to run with the sidecar", Duration::from_secs(180), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app=chat")).await?;
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
                    pods.delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
                        .await?;
                    continue;
                }
                let running = pod
                    .status
                    .as_ref()
                    .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some());
                if running {
                    ready.push(pod);
                }
            }
            ready.sort_by_key(|p| p.name_any());
            Ok((ready.len() >= replicas).then(|| ready.into_iter().take(replicas).collect()))
        }
    })
    .await
}

/// Threads for a container: its CPU limit rounded up (the demo's stand-in for a cgroup quota),
/// else an equal part of this machine's cores.
fn threads_for(container: &Container, replicas: u32) -> usize {
    let limit = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("cpu"))
        .and_then(|q| parse_cpu(&q.0));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match limit {
        Some(cpu) => (cpu.ceil() as usize).clamp(1, cores),
        None => (cores / replicas.max(1) as usize).max(1),
    }
}

/// A CPU quantity (`2`, `1.5`, `500m`) in cores.
fn parse_cpu(quantity: &str) -> Option<f64> {
    match quantity.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok().map(|m| m / 1000.0),
        None => quantity.parse().ok(),
    }
}

/// Starts the sidecar container of `pod` as a local process on the pod's IP.
pub(super) async fn start_sidecar(
    client: &Client,
    running: &Running,
    config: &DemoConfig,
    pod: &Pod,
) -> anyhow::Result<(Component, Endpoint)> {
    let name = pod.name_any();
    let spec = pod.spec.as_ref().context("the pod has no spec")?;
    let container = spec
        .containers
        .iter()
        .find(|c| c.name == SIDECAR_CONTAINER_NAME)
        .context("the pod has no sidecar")?;
    let dir = running.state.path().join("pods").join(&name);
    // emptyDir volumes get a directory each (the model cache is seeded from this machine's);
    // projected service-account tokens are minted into theirs, bound to the pod.
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let Some(volume) = spec.volumes.iter().flatten().find(|v| v.name == mount.name) else {
            continue;
        };
        let tokens: Vec<_> = volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
            .filter_map(|source| source.service_account_token.as_ref())
            .collect();
        if volume.empty_dir.is_none() && tokens.is_empty() {
            continue;
        }
        let host_dir = dir.join("volumes").join(&mount.name);
        std::fs::create_dir_all(&host_dir)?;
        for projection in tokens {
            let token = kubelet::projected_token(
                client,
                pod,
                projection.audience.as_deref(),
                projection.expiration_seconds,
            )
            .await?;
            std::fs::write(host_dir.join(&projection.path), token)?;
        }
        mounts.push(HostMount {
            mount_path: mount.mount_path.clone(),
            host_dir,
        });
    }
    let mut env = kubelet::container_env(pod, container, &ConfigMaps::new(), &mounts)?;
    let lookup = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    if let Some(cache) = lookup(ttc_crds::report::sidecar_env::MODEL_CACHE) {
        kubelet::link_tree(&config.model_cache, Path::new(&cache))?;
    }
    let listen = lookup(ttc_crds::report::sidecar_env::LISTEN)
        .context("the sidecar container has no listen address")?;
    let account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let namespace = pod.namespace().unwrap_or_else(|| NAMESPACE.into());
    let kubeconfig =
        kubelet::service_account_kubeconfig(client, &running.cluster, &namespace, &account, &dir)
            .await?;
    env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
    let threads = threads_for(container, config.replicas);
    env.push(("TTC_THREADS".into(), threads.to_string()));
    let log = dir.join("sidecar.log");
    detail(&format!(
        "{name}: ttc-sidecar {} on {listen}, {threads} thread(s), as ServiceAccount {namespace}/{account}, log {}",
        container.args.clone().unwrap_or_default().join(" "),
        log.display()
    ));
    let component = Component::start_with_env(
        &format!("sidecar of {name}"),
        &config.sidecar_bin,
        &container.args.clone().unwrap_or_default(),
        &env,
        &log,
    )?;
    Ok((
        component,
        Endpoint {
            pod: name,
            url: format!("http://{listen}"),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cpu_quantities_parse() {
        assert_eq!(parse_cpu("2"), Some(2.0));
        assert_eq!(parse_cpu("500m"), Some(0.5));
        assert_eq!(parse_cpu("1.5"), Some(1.5));
        assert_eq!(parse_cpu("lots"), None);
    }

    #[test]
    fn threads_follow_the_cpu_limit() {
        let container: Container = serde_json::from_value(json!({
            "name": "c", "resources": {"limits": {"cpu": "500m"}}
        }))
        .unwrap();
        assert_eq!(threads_for(&container, 4), 1);
    }
}
