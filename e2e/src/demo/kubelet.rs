//! The demo plays the kubelet for the containers it runs as local processes.
//!
//! kwok marks pods Running and gives them an IP on loopback (127.1.N.M), but runs nothing. For
//! the containers the demo does run (the operator, the injected sidecars) it does what a kubelet
//! would do with the container spec the API server holds: the environment from `env` and
//! `envFrom` (values, field references, ConfigMap keys, `$(VAR)` expansion), the volumes mounted
//! at their paths, the pod's network, and a ServiceAccount token. A process cannot have its own
//! network namespace or mount table here, so two rewrites stand in for them: an address bound to
//! `0.0.0.0` binds to the pod IP instead, and a path under a volume mount points at the volume's
//! directory on this machine. Projected service-account token volumes get a pod-bound token for
//! their audience, as the kubelet mints them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::Value;

use crate::LocalCluster;

/// The ConfigMaps a container's environment may refer to: name → data.
pub type ConfigMaps = BTreeMap<String, BTreeMap<String, String>>;

/// A volume mount as this machine sees it: the path in the container and the directory here.
#[derive(Debug, Clone, PartialEq)]
pub struct HostMount {
    /// Where the container expects the volume.
    pub mount_path: String,
    /// The directory standing in for it.
    pub host_dir: PathBuf,
}

/// The value of a downward-API field of `pod` (the `fieldPath`s the kubelet supports for env).
pub fn pod_field(pod: &Pod, path: &str) -> anyhow::Result<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let missing = || anyhow!("the pod has no value for fieldPath {path} yet");
    let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
        let key = path
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))?;
        map.and_then(|m| m.get(key)).cloned()
    };
    let value = match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()),
        p if p.starts_with("metadata.labels['") => keyed("metadata.labels['", meta.labels.as_ref()),
        p if p.starts_with("metadata.annotations['") => {
            keyed("metadata.annotations['", meta.annotations.as_ref())
        }
        other => bail!("fieldPath {other} is not supported in an environment variable"),
    };
    value.ok_or_else(missing)
}

/// Expands `$(NAME)` references to variables defined so far, as the kubelet does: `$$` is a
/// literal `$`, and a reference to an undefined variable stays as written.
pub fn expand(value: &str, defined: &[(String, String)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = defined.iter().rev().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The environment of `container` in `pod`, in the kubelet's order (`envFrom`, then `env`), with
/// the two stand-ins of this machine applied to every value: `0.0.0.0:<port>` becomes
/// `<pod IP>:<port>`, and a path under a mount becomes the path under its host directory.
pub fn container_env(
    pod: &Pod,
    container: &Container,
    config_maps: &ConfigMaps,
    mounts: &[HostMount],
) -> anyhow::Result<Vec<(String, String)>> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let set = |vars: &mut Vec<(String, String)>, name: String, value: String| {
        vars.retain(|(k, _)| k != &name);
        vars.push((name, value));
    };
    for source in container.env_from.iter().flatten() {
        let Some(reference) = &source.config_map_ref else {
            bail!("envFrom supports configMapRef only here");
        };
        let data = match config_maps.get(&reference.name) {
            Some(data) => data,
            None if reference.optional == Some(true) => continue,
            None => bail!("envFrom: ConfigMap {} not found", reference.name),
        };
        let prefix = source.prefix.as_deref().unwrap_or_default();
        for (key, value) in data {
            set(&mut vars, format!("{prefix}{key}"), value.clone());
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    pod_field(pod, &field.field_path)
                        .with_context(|| format!("env {}", var.name))?
                } else if let Some(key) = &from.config_map_key_ref {
                    config_maps
                        .get(&key.name)
                        .and_then(|data| data.get(&key.key))
                        .cloned()
                        .with_context(|| {
                            format!(
                                "env {}: ConfigMap key {}/{} not found",
                                var.name, key.name, key.key
                            )
                        })?
                } else {
                    bail!(
                        "env {}: only fieldRef and configMapKeyRef are supported here",
                        var.name
                    );
                }
            }
            (Some(value), None) => expand(value, &vars),
            (None, None) => String::new(),
        };
        set(&mut vars, var.name.clone(), value);
    }
    let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
    Ok(vars
        .into_iter()
        .map(|(name, value)| {
            let value = match (&pod_ip, value.strip_prefix("0.0.0.0:")) {
                (Some(ip), Some(port)) => format!("{ip}:{port}"),
                _ => on_host(&value, mounts),
            };
            (name, value)
        })
        .collect())
}

/// `value` with a leading mount path replaced by the mount's host directory.
fn on_host(value: &str, mounts: &[HostMount]) -> String {
    // The longest mount path that is a whole-component prefix wins, as in a mount table.
    let best = mounts
        .iter()
        .filter(|m| {
            value == m.mount_path
                || value
                    .strip_prefix(&m.mount_path)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|m| m.mount_path.len());
    match best {
        Some(m) => format!("{}{}", m.host_dir.display(), &value[m.mount_path.len()..]),
        None => value.to_string(),
    }
}

/// Makes `to` a copy of the directory tree `from` whose files are hard links (no data copied):
/// how the demo pre-seeds a pod's emptyDir with the model cache, as a node image cache would.
pub fn link_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            link_tree(&source, &target)?;
        } else if kind.is_file() && !target.exists() {
            std::fs::hard_link(&source, &target)
                .or_else(|_| std::fs::copy(&source, &target).map(|_| ()))
                .with_context(|| format!("linking {} to {}", source.display(), target.display()))?;
        }
    }
    Ok(())
}

/// A kubeconfig that authenticates with a ServiceAccount token (what the projected token and
/// the in-cluster configuration give a pod); `ca_data` is the base64 PEM of the cluster's CA.
pub fn token_kubeconfig(server: &str, ca_data: &str, token: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca_data}\nusers:\n- name: sa\n  user:\n    token: {token}\n\
         contexts:\n- name: sa\n  context:\n    cluster: local\n    user: sa\n    namespace: {namespace}\n\
         current-context: sa\n"
    )
}

/// A token of `account` in `namespace`, valid for a day.
pub async fn service_account_token(
    client: &Client,
    namespace: &str,
    account: &str,
) -> anyhow::Result<String> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(24 * 3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let issued = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("issuing a token for ServiceAccount {namespace}/{account}"))?;
    issued
        .status
        .map(|s| s.token)
        .context("the token request returned no token")
}

/// What a kubelet writes into a projected service-account token volume: a token of the pod's
/// ServiceAccount for `audience`, bound to `pod` (so it dies with the pod and names it when
/// reviewed).
pub async fn projected_token(
    client: &Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration_seconds: Option<i64>,
) -> anyhow::Result<String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.map(str::to_owned).into_iter().collect(),
            expiration_seconds: Some(expiration_seconds.unwrap_or(3600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let issued = Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!("issuing a pod-bound token for ServiceAccount {namespace}/{account}")
        })?;
    issued
        .status
        .map(|s| s.token)
        .context("the token request returned no token")
}

/// Writes a kubeconfig for `account` in `namespace` into `dir` and returns its path.
pub async fn service_account_kubeconfig(
    client: &Client,
    cluster: &LocalCluster,
    namespace: &str,
    account: &str,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let token = service_account_token(client, namespace, account).await?;
    let admin: Value = serde_yaml::from_str(&std::fs::read_to_string(cluster.kubeconfig())?)?;
    let ca = admin
        .pointer("/clusters/0/cluster/certificate-authority-data")
        .and_then(Value::as_str)
        .context("the admin kubeconfig has no certificate-authority-data")?;
    let path = dir.join("kubeconfig");
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        &path,
        token_kubeconfig(&cluster.server_url(), ca, &token, namespace),
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "chat-1", "namespace": "demo", "uid": "u-1",
                         "labels": {"app": "chat"}},
            "spec": {"nodeName": "gpu-0", "containers": []},
            "status": {"podIP": "127.1.0.7"}
        }))
        .unwrap()
    }

    #[test]
    fn expands_defined_references_only() {
        let defined = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("k=$(A),m=$(B)", &defined), "k=x,m=$(B)");
        assert_eq!(expand("$$(A) costs $5", &defined), "$(A) costs $5");
        assert_eq!(expand("$(A", &defined), "$(A");
    }

    #[test]
    fn resolves_fields_config_maps_and_the_pod_view_of_the_host() {
        let container: Container = serde_json::from_value(json!({
            "name": "c",
            "envFrom": [{"configMapRef": {"name": "cfg"}}],
            "env": [
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "ATTRS", "value": "ns=$(NS),pod=$(POD)"},
                {"name": "LISTEN", "value": "0.0.0.0:8080"},
                {"name": "CACHE", "value": "/tmp/models"},
                {"name": "OTHER", "value": "/tmpfoo"},
                {"name": "KEY", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "LEVEL"}}}
            ]
        }))
        .unwrap();
        let config_maps = ConfigMaps::from([(
            "cfg".to_string(),
            BTreeMap::from([("LEVEL".to_string(), "info".to_string())]),
        )]);
        let mounts = [HostMount {
            mount_path: "/tmp".into(),
            host_dir: "/run/demo/chat-1/tmp".into(),
        }];
        let env = container_env(&pod(), &container, &config_maps, &mounts).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("LEVEL"), Some("info"));
        assert_eq!(get("NS"), Some("demo"));
        assert_eq!(get("APP"), Some("chat"));
        assert_eq!(get("ATTRS"), Some("ns=demo,pod=$(POD)"));
        assert_eq!(get("LISTEN"), Some("127.1.0.7:8080"));
        assert_eq!(get("CACHE"), Some("/run/demo/chat-1/tmp/models"));
        assert_eq!(get("OTHER"), Some("/tmpfoo"));
        assert_eq!(get("KEY"), Some("info"));
    }

    #[test]
    fn a_missing_field_or_config_map_names_the_variable() {
        let mut pod = pod();
        pod.status = None;
        let container: Container = serde_json::from_value(json!({
            "name": "c",
            "env": [{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
        }))
        .unwrap();
        let err = container_env(&pod, &container, &ConfigMaps::new(), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("env IP"), "{err:#}");
        let container: Container = serde_json::from_value(json!({
            "name": "c", "envFrom": [{"configMapRef": {"name": "gone"}}]
        }))
        .unwrap();
        let err = container_env(&pod, &container, &ConfigMaps::new(), &[]).unwrap_err();
        assert!(err.to_string().contains("ConfigMap gone"), "{err}");
    }

    #[test]
    fn link_tree_mirrors_files() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(from.join("sub")).unwrap();
        std::fs::write(from.join("sub/m.gguf"), b"weights").unwrap();
        link_tree(&from, &to).unwrap();
        assert_eq!(std::fs::read(to.join("sub/m.gguf")).unwrap(), b"weights");
    }
}
