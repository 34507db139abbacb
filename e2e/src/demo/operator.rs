//! The operator as the chart's Deployment would run it, as a local process on 127.0.0.1: its
//! container's environment (the chart's ConfigMap), the webhook certificate Secret as files, and
//! a token of the chart's ServiceAccount.

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Client;
use kube::api::Api;
use serde_json::json;

use super::kubelet::{self, ConfigMaps, HostMount};
use super::{DemoConfig, RELEASE, Running, SYSTEM_NAMESPACE, detail};
use crate::process::Component;

/// The operator's ports on loopback.
pub(super) struct OperatorPorts {
    pub(super) admin: u16,
    pub(super) webhook: u16,
    pub(super) receiver: u16,
}

/// Starts the operator as the chart's Deployment would run it, on 127.0.0.1.
pub(super) async fn start_operator(
    client: &Client,
    running: &Running,
    config: &DemoConfig,
    ports: &OperatorPorts,
) -> anyhow::Result<Component> {
    let deployment = Api::<Deployment>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .get(RELEASE)
        .await
        .context("reading the chart's operator Deployment")?;
    let template = deployment
        .spec
        .and_then(|s| s.template.spec)
        .context("the operator Deployment has no pod template")?;
    let container = template
        .containers
        .first()
        .context("the operator Deployment has no container")?
        .clone();
    let dir = running.state.path().join("operator");
    // Volumes: the webhook certificate Secret, written where the container mounts it.
    let mut mounts = Vec::new();
    let secrets = Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE);
    for mount in container.volume_mounts.iter().flatten() {
        let Some(volume) = template
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
        else {
            continue;
        };
        let Some(secret_name) = volume.secret.as_ref().and_then(|s| s.secret_name.clone()) else {
            continue;
        };
        let secret = secrets
            .get(&secret_name)
            .await
            .with_context(|| format!("reading Secret {secret_name}"))?;
        let host_dir = dir.join("volumes").join(&mount.name);
        std::fs::create_dir_all(&host_dir)?;
        for (key, value) in secret.data.iter().flatten() {
            std::fs::write(host_dir.join(key), &value.0)?;
        }
        mounts.push(HostMount {
            mount_path: mount.mount_path.clone(),
            host_dir,
        });
    }
    let mut config_maps = ConfigMaps::new();
    for source in container.env_from.iter().flatten() {
        if let Some(reference) = &source.config_map_ref {
            let map = Api::<ConfigMap>::namespaced(client.clone(), SYSTEM_NAMESPACE)
                .get(&reference.name)
                .await
                .with_context(|| format!("reading ConfigMap {}", reference.name))?;
            config_maps.insert(reference.name.clone(), map.data.unwrap_or_default());
        }
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("{RELEASE}-local"), "namespace": SYSTEM_NAMESPACE, "uid": "local"},
        "spec": {"nodeName": "localhost", "containers": []},
        "status": {"podIP": "127.0.0.1"}
    }))?;
    let mut env = kubelet::container_env(&pod, &container, &config_maps, &mounts)?;
    let account = template
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let kubeconfig = kubelet::service_account_kubeconfig(
        client,
        &running.cluster,
        SYSTEM_NAMESPACE,
        &account,
        &dir,
    )
    .await?;
    env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
    detail(&format!(
        "as ServiceAccount {SYSTEM_NAMESPACE}/{account}, admin port {}, log {}",
        ports.admin,
        dir.join("operator.log").display()
    ));
    Component::start_with_env(
        "ttc-operator",
        &config.operator_bin,
        &container.args.clone().unwrap_or_default(),
        &env,
        &dir.join("operator.log"),
    )
    .map_err(Into::into)
}
