//! The simulated GPU nodes that kwok keeps alive.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;

/// The extended resource that GPU pods request.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// The annotation kwok is told to manage nodes by.
pub const KWOK_NODE_ANNOTATION: (&str, &str) = ("kwok.x-k8s.io/node", "fake");

/// What each simulated GPU node looks like.
#[derive(Debug, Clone)]
pub struct GpuNodeSpec {
    /// GPUs per node (`nvidia.com/gpu` capacity).
    pub gpus: u32,
    /// The GPU model, as NVIDIA's GPU feature discovery labels it.
    pub product: String,
    /// Memory per GPU in MiB (`nvidia.com/gpu.memory`).
    pub gpu_memory_mib: u32,
    /// The GPU architecture family (`nvidia.com/gpu.family`).
    pub family: String,
    /// CPU cores per node.
    pub cpus: u32,
    /// Memory per node in GiB.
    pub memory_gib: u32,
}

impl Default for GpuNodeSpec {
    /// An 8 x H100 80GB node, the most common inference box.
    fn default() -> Self {
        GpuNodeSpec {
            gpus: 8,
            product: "NVIDIA-H100-80GB-HBM3".into(),
            gpu_memory_mib: 81559,
            family: "hopper".into(),
            cpus: 96,
            memory_gib: 1024,
        }
    }
}

/// The name of the `index`-th simulated GPU node.
pub fn node_name(index: u8) -> String {
    format!("gpu-node-{index}")
}

/// The loopback /24 that pods on the `index`-th node get their IPs from.
pub fn pod_cidr(index: u8) -> String {
    format!("127.1.{index}.0/24")
}

/// The loopback address of the `index`-th node itself (host-network pods get it too).
pub fn node_ip(index: u8) -> String {
    format!("127.2.{index}.1")
}

/// The Node object for the `index`-th simulated GPU node.
///
/// Labels follow NVIDIA's GPU feature discovery and the well-known Kubernetes labels, so that
/// node selectors written for real GPU nodes match. The node is not tainted: every node of this
/// cluster is simulated, so workloads need no toleration.
pub fn gpu_node(index: u8, spec: &GpuNodeSpec) -> Node {
    let name = node_name(index);
    let labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), name.clone()),
        ("kubernetes.io/os".into(), "linux".into()),
        ("kubernetes.io/arch".into(), "amd64".into()),
        (
            "node.kubernetes.io/instance-type".into(),
            format!("sim-{}x{}", spec.gpus, spec.product),
        ),
        ("type".into(), "kwok".into()),
        ("nvidia.com/gpu.present".into(), "true".into()),
        ("nvidia.com/gpu.product".into(), spec.product.clone()),
        ("nvidia.com/gpu.count".into(), spec.gpus.to_string()),
        (
            "nvidia.com/gpu.memory".into(),
            spec.gpu_memory_mib.to_string(),
        ),
        ("nvidia.com/gpu.family".into(), spec.family.clone()),
        ("nvidia.com/gpu.deploy.device-plugin".into(), "true".into()),
    ]);
    let resources = BTreeMap::from([
        ("cpu".to_string(), Quantity(spec.cpus.to_string())),
        ("memory".into(), Quantity(format!("{}Gi", spec.memory_gib))),
        ("ephemeral-storage".into(), Quantity("1Ti".into())),
        ("pods".into(), Quantity("110".into())),
        (GPU_RESOURCE.into(), Quantity(spec.gpus.to_string())),
    ]);
    Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                KWOK_NODE_ANNOTATION.0.to_string(),
                KWOK_NODE_ANNOTATION.1.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(pod_cidr(index)),
            pod_cidrs: Some(vec![pod_cidr(index)]),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            allocatable: Some(resources.clone()),
            capacity: Some(resources),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: node_ip(index),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name,
                },
            ]),
            ..NodeStatus::default()
        }),
    }
}

/// True when the node reports the `Ready` condition as `True`.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_advertises_gpus_and_a_loopback_pod_cidr() {
        let node = gpu_node(2, &GpuNodeSpec::default());
        let status = node.status.as_ref().expect("status is set");
        let capacity = status.capacity.as_ref().expect("capacity is set");
        assert_eq!(capacity[GPU_RESOURCE].0, "8");
        let labels = node.metadata.labels.as_ref().expect("labels are set");
        assert_eq!(labels["nvidia.com/gpu.product"], "NVIDIA-H100-80GB-HBM3");
        let spec = node.spec.as_ref().expect("spec is set");
        assert_eq!(spec.pod_cidr.as_deref(), Some("127.1.2.0/24"));
        assert!(!is_ready(&node));
    }
}
