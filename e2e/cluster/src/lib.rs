//! A real local Kubernetes cluster for tests and the demo.
//!
//! [`LocalCluster`] runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
//! kwok (with simulated GPU nodes) as child processes on loopback, from binaries built by
//! `e2e/controlplane/build.sh`. With a [`node`] it also runs a real kubelet, kube-proxy
//! and containerd on this machine. [`testing`] gives tests one shared cluster per test run and
//! a fresh namespace per test.

pub mod cluster;
pub mod error;
pub mod images;
pub mod kubeconfig;
pub mod node;
pub mod nodes;
pub mod pki;
pub mod process;
pub mod testing;

pub use cluster::{ClusterConfig, K8S_VERSION, LocalCluster};
pub use error::{Error, Result};
pub use nodes::{GPU_RESOURCE, GpuNodeSpec};
