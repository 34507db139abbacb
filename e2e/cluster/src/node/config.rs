//! The configuration files of the node's components: containerd, the kubelet and kube-proxy.

use std::path::Path;

use serde_json::json;

use super::dns::CLUSTER_DOMAIN;
use crate::pki::{NODE_IP, NODE_NAME, Pki};

/// Where the node keeps its files (under the cluster's state directory).
#[derive(Debug, Clone)]
pub struct NodePaths {
    pub root: std::path::PathBuf,
}

impl NodePaths {
    pub fn new(state_dir: &Path) -> Self {
        NodePaths {
            root: state_dir.join("node"),
        }
    }
    pub fn containerd_socket(&self) -> std::path::PathBuf {
        self.root.join("containerd.sock")
    }
    pub fn cni_conf_dir(&self) -> std::path::PathBuf {
        self.root.join("cni")
    }
    pub fn ipam_dir(&self) -> std::path::PathBuf {
        self.root.join("ipam")
    }
    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.root.join(name)
    }
}

/// containerd 1.6 (Debian's) with its CRI plugin: runc through the v2 shim, cgroupfs, overlay
/// snapshots, the pause image built here, CNI from Debian's plugins, and no lowering of
/// oom_score_adj (this sandbox lacks CAP_SYS_RESOURCE; the kubelet asks for -997 on Guaranteed
/// pods).
pub fn containerd(paths: &NodePaths, pause_image: &str) -> String {
    let root = paths.root.display();
    format!(
        r#"version = 2
root = "{root}/containerd/root"
state = "{root}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.opt", "io.containerd.grpc.v1.introspection"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
        socket = paths.containerd_socket().display(),
        cni = paths.cni_conf_dir().display(),
    )
}

/// The kubelet: cgroup v1 allowed (this sandbox has no v2), cgroupfs like containerd, x509 and
/// webhook authentication, the cluster DNS at the node's address, no swap check, no oom_score_adj
/// of its own, and image GC and eviction thresholds that a shared build machine does not trip.
pub fn kubelet(paths: &NodePaths, pki: &Pki, port: u16, healthz_port: u16) -> serde_json::Value {
    let p = |path: &Path| path.display().to_string();
    json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": format!("unix://{}", p(&paths.containerd_socket())),
        "address": NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": p(&pki.node.kubelet_serving.0),
        "tlsPrivateKeyFile": p(&pki.node.kubelet_serving.1),
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": p(&pki.ca_cert)}
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [NODE_IP],
        "resolvConf": p(&paths.file("resolv.conf")),
        "podLogsDir": p(&paths.file("pod-logs")),
        "failSwapOn": false,
        "oomScoreAdj": 0,
        "rotateCertificates": false,
        "serverTLSBootstrap": false,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%"
        },
        "maxPods": 110,
        "serializeImagePulls": false
    })
}

/// kube-proxy in iptables mode: Services of the pod range on this node only, node ports on the
/// bridge address only, no conntrack sysctls touched.
pub fn kube_proxy(kubeconfig: &Path, cidr: &str, healthz: u16, metrics: u16) -> serde_json::Value {
    json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": kubeconfig.display().to_string()},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": cidr,
        "healthzBindAddress": format!("127.0.0.1:{healthz}"),
        "metricsBindAddress": format!("127.0.0.1:{metrics}"),
        "nodePortAddresses": [format!("{NODE_IP}/32")],
        "iptables": {"localhostNodePorts": false},
        "conntrack": {"maxPerCore": 0, "min": 0}
    })
}
