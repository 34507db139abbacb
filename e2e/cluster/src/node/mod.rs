//! A real node for the local cluster: containerd and runc (Debian's), the kubelet and kube-proxy
//! (built from the same Kubernetes release as the control plane), pods on a CNI bridge of their
//! own, and a cluster DNS for Service names.
//!
//! The node runs the project's container images (imported from `e2e/images/build.sh`'s archives,
//! as no registry is reachable): the chart's operator Deployment and the injected sidecars run
//! here as they would on any cluster. It needs root (network and cgroups) and one node per
//! machine (the bridge and the pod range are fixed).
//!
//! What the sandbox this was built in demands, and where it is handled:
//! - cgroup v1 only: the kubelet's `failCgroupV1: false`, `cgroupDriver: cgroupfs` ([`config`]);
//! - no CAP_SYS_RESOURCE: containerd's `restrict_oom_score_adj`, the kubelet's `oomScoreAdj: 0`;
//! - no registry: images and the pause image imported into containerd's `k8s.io` namespace;
//! - no traffic off the machine: no masquerading, a FORWARD guard ([`network`]), a DNS that
//!   forwards nothing ([`dns`]).

pub mod config;
pub mod dns;
pub mod network;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::error::{Error, Result};
use crate::images::Images;
use crate::kubeconfig;
use crate::nodes::is_ready;
use crate::pki::{NODE_IP, NODE_NAME, Pki};
use crate::process::{Component, run};
use config::NodePaths;
use dns::ClusterDns;
use network::PodNetwork;

/// The binaries the node needs in the control plane's binary directory.
pub const BINARIES: [&str; 3] = ["kubelet", "kube-proxy", "crictl"];

/// The pod range of the node, with the gateway (the node's address) first.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The bridge the pods are attached to.
pub const BRIDGE: &str = "ttc0";

/// Where network namespaces of pods are kept by containerd.
const NETNS_DIR: &str = "/var/run/netns";

/// How to run the node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The images to import into containerd.
    pub images: Images,
}

/// A running node. Stopping it (or dropping it) removes its pods, its network and its rules.
#[derive(Debug)]
pub struct RealNode {
    paths: NodePaths,
    bin_dir: PathBuf,
    images: Images,
    components: Vec<Component>,
    dns: Option<ClusterDns>,
    network: Option<PodNetwork>,
    netns_before: BTreeSet<String>,
    kube_proxy_config: Option<PathBuf>,
}

fn netns() -> BTreeSet<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

impl RealNode {
    /// Creates the node's network (before the API server starts, which advertises the node's
    /// address to pods).
    pub fn prepare(state_dir: &Path, bin_dir: &Path, config: &NodeConfig) -> Result<Self> {
        for name in BINARIES {
            if !bin_dir.join(name).is_file() {
                return Err(Error::MissingBinary {
                    component: name.into(),
                    path: bin_dir.join(name),
                });
            }
        }
        let paths = NodePaths::new(state_dir);
        for dir in [&paths.root, &paths.file("pod-logs"), &paths.ipam_dir()] {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
        }
        let netns_before = netns();
        let network = PodNetwork::create(
            BRIDGE,
            &format!("{NODE_IP}/24"),
            POD_CIDR,
            &paths.cni_conf_dir(),
            &paths.ipam_dir(),
        )?;
        Ok(RealNode {
            paths,
            bin_dir: bin_dir.to_path_buf(),
            images: config.images.clone(),
            components: Vec::new(),
            dns: None,
            network: Some(network),
            netns_before,
            kube_proxy_config: None,
        })
    }

    /// Starts containerd (with the images), the cluster DNS, the kubelet and kube-proxy, and
    /// waits until the node is Ready.
    pub async fn start(
        &mut self,
        server: &str,
        pki: &Pki,
        client: kube::Client,
        timeout: Duration,
    ) -> Result<()> {
        let paths = self.paths.clone();
        let logs = paths.root.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| Error::io("creating directory", &logs, e))?;
        let log = |name: &str| logs.join(format!("{name}.log"));
        let write = |name: &str, text: String| -> Result<PathBuf> {
            let file = paths.file(name);
            std::fs::write(&file, text).map_err(|e| Error::io("writing", &file, e))?;
            Ok(file)
        };
        let json = |value: serde_json::Value| {
            serde_json::to_string_pretty(&value).map_err(|e| Error::Serialize {
                what: "a node configuration",
                reason: e.to_string(),
            })
        };

        // containerd, with the images it cannot pull.
        let containerd_config = write(
            "containerd.toml",
            config::containerd(&paths, &self.images.pause),
        )?;
        self.components.push(Component::start(
            "containerd",
            Path::new("/usr/bin/containerd"),
            &[format!("--config={}", containerd_config.display())],
            &log("containerd"),
        )?);
        let socket = paths.containerd_socket();
        self.wait(0, timeout, || {
            let ready = socket.exists();
            async move {
                if ready {
                    Ok(())
                } else {
                    Err("no socket yet".to_string())
                }
            }
        })
        .await?;
        for (archive, image) in self.images.archives() {
            let socket = socket.display().to_string();
            run(
                "ctr",
                &[
                    "--address",
                    &socket,
                    "--namespace",
                    "k8s.io",
                    "images",
                    "import",
                    &archive.display().to_string(),
                ],
            )
            .map_err(|e| Error::Node(format!("importing {image}: {e}")))?;
        }

        // The cluster DNS, before any pod asks.
        let dns_addr: SocketAddr = format!("{NODE_IP}:53")
            .parse()
            .map_err(|e| Error::Node(format!("the DNS address: {e}")))?;
        self.dns = Some(ClusterDns::start(client.clone(), dns_addr).await?);

        // The kubelet, as system:node:<name>.
        std::fs::write(paths.file("resolv.conf"), "")
            .map_err(|e| Error::io("writing", paths.file("resolv.conf"), e))?;
        let kubelet_kubeconfig = paths.file("kubelet.kubeconfig");
        kubeconfig::write_client(&kubelet_kubeconfig, server, pki, &pki.node.kubelet_client)?;
        let port = crate::testing::free_port().map_err(Error::Port)?;
        let healthz = crate::testing::free_port().map_err(Error::Port)?;
        let kubelet_config = write(
            "kubelet.json",
            json(config::kubelet(&paths, pki, port, healthz))?,
        )?;
        let p = |path: &Path| path.display().to_string();
        self.components.push(Component::start(
            "kubelet",
            &self.bin_dir.join("kubelet"),
            &[
                format!("--config={}", p(&kubelet_config)),
                format!("--kubeconfig={}", p(&kubelet_kubeconfig)),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={NODE_IP}"),
                format!("--root-dir={}", p(&paths.file("kubelet"))),
                format!("--cert-dir={}", p(&paths.file("kubelet-pki"))),
                "--v=1".into(),
            ],
            &log("kubelet"),
        )?);

        // kube-proxy, as system:kube-proxy.
        let proxy_kubeconfig = paths.file("kube-proxy.kubeconfig");
        kubeconfig::write_client(&proxy_kubeconfig, server, pki, &pki.node.kube_proxy_client)?;
        let proxy_healthz = crate::testing::free_port().map_err(Error::Port)?;
        let proxy_metrics = crate::testing::free_port().map_err(Error::Port)?;
        let proxy_config = write(
            "kube-proxy.json",
            json(config::kube_proxy(
                &proxy_kubeconfig,
                POD_CIDR,
                proxy_healthz,
                proxy_metrics,
            ))?,
        )?;
        self.components.push(Component::start(
            "kube-proxy",
            &self.bin_dir.join("kube-proxy"),
            &[format!("--config={}", p(&proxy_config))],
            &log("kube-proxy"),
        )?);
        self.kube_proxy_config = Some(proxy_config);

        let nodes: Api<Node> = Api::all(client);
        self.wait(1, timeout, || {
            let nodes = nodes.clone();
            async move {
                match nodes.get_opt(NODE_NAME).await {
                    Ok(Some(node)) if is_ready(&node) => Ok(()),
                    Ok(Some(_)) => Err(format!("node {NODE_NAME} is not Ready yet")),
                    Ok(None) => Err(format!("node {NODE_NAME} has not registered yet")),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await?;
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{proxy_healthz}/healthz");
        self.wait(2, timeout, || {
            let request = http.get(&url).send();
            async move {
                match request.await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("/healthz: {}", r.status())),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await
    }

    /// Fails with [`Error::Exited`] when a node component has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.components
            .iter_mut()
            .try_for_each(Component::check_running)
    }

    /// Kills a running container of a pod with `SIGKILL`, as the kernel's OOM killer or a crash
    /// would end it: no signal it can handle, no grace. The kubelet sees it exit and restarts it
    /// under the pod's restart policy. Returns the process id it killed.
    pub fn kill_container(&self, namespace: &str, pod: &str, container: &str) -> Result<u32> {
        let ids = self.crictl(&[
            "ps",
            "--quiet",
            "--state",
            "running",
            "--label",
            &format!("io.kubernetes.pod.namespace={namespace}"),
            "--label",
            &format!("io.kubernetes.pod.name={pod}"),
            "--label",
            &format!("io.kubernetes.container.name={container}"),
        ])?;
        let id = match ids.split_whitespace().collect::<Vec<_>>()[..] {
            [id] => id.to_string(),
            ref found => {
                return Err(Error::Node(format!(
                    "{namespace}/{pod} has {} running containers named {container}, not one",
                    found.len()
                )));
            }
        };
        let pid = self.crictl(&[
            "inspect",
            "--output",
            "go-template",
            "--template",
            "{{.info.pid}}",
            &id,
        ])?;
        let pid: i32 = pid
            .trim()
            .parse()
            .map_err(|_| Error::Node(format!("crictl inspect {id} gave no process id: {pid:?}")))?;
        if pid <= 1 {
            return Err(Error::Node(format!("container {id} has process id {pid}")));
        }
        // SAFETY: kill(2) with a process id read from the runtime; no memory is shared.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            return Err(Error::Node(format!(
                "killing {namespace}/{pod} {container} (pid {pid}): {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(pid as u32)
    }

    /// Runs `crictl` against the node's containerd (30 s at most); its stdout.
    fn crictl(&self, args: &[&str]) -> Result<String> {
        let crictl = self.bin_dir.join("crictl").display().to_string();
        let endpoint = format!("unix://{}", self.paths.containerd_socket().display());
        let mut all = vec!["--runtime-endpoint", &endpoint, "--timeout", "30s"];
        all.extend_from_slice(args);
        run(&crictl, &all)
    }

    async fn wait<F, Fut>(&mut self, target: usize, timeout: Duration, probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<(), String>>,
    {
        crate::process::wait_ready(&mut self.components, target, timeout, probe).await
    }

    /// Stops the node: the kubelet and kube-proxy first, then every pod (their containers,
    /// network namespaces and addresses, through the CRI), containerd, kube-proxy's rules, the
    /// DNS and the network.
    pub fn stop(mut self, grace: Duration) -> Result<()> {
        self.stop_all(grace)
    }

    fn stop_all(&mut self, grace: Duration) -> Result<()> {
        let mut first_error = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                tracing::warn!("stopping the node: {e}");
                first_error.get_or_insert(e);
            }
        };
        // kubelet and kube-proxy, so that nothing restarts what goes next.
        while self.components.len() > 1 {
            if let Some(mut component) = self.components.pop() {
                note(component.stop(grace));
            }
        }
        if let Some(mut containerd) = self.components.pop() {
            note(self.crictl(&["rmp", "--all", "--force"]).map(drop));
            note(containerd.stop(grace));
        }
        if let Some(config) = self.kube_proxy_config.take() {
            let kube_proxy = self.bin_dir.join("kube-proxy").display().to_string();
            note(
                run(
                    &kube_proxy,
                    &["--cleanup", &format!("--config={}", config.display())],
                )
                .map(drop),
            );
        }
        network::remove_kubelet_rules();
        // The kubelet mounts each pod's secret and projected volumes (tmpfs) under its root
        // directory and unmounts them only while it runs; stopped first, it leaves them.
        unmount_below(&self.paths.root);
        // Namespaces of pods that the CRI could not remove (containerd gone first, say).
        for name in netns().difference(&self.netns_before) {
            let path = Path::new(NETNS_DIR).join(name);
            let _ = run("umount", &[&path.display().to_string()]);
            let _ = std::fs::remove_file(&path);
        }
        self.dns.take();
        self.network.take();
        first_error.map_or(Ok(()), Err)
    }
}

/// Unmounts every mount point below `dir`, deepest first (detached: nothing uses them any more).
fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        // mountinfo escapes spaces and other specials as octal; such paths are not ours.
        .filter(|point| !point.contains('\\'))
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir) && point != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        let Ok(c) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: umount2 with a valid NUL-terminated path; no memory is shared.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            tracing::warn!(
                "unmounting {}: {}",
                point.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if let Err(e) = self.stop_all(Duration::from_secs(5)) {
            tracing::error!("stopping the node: {e}");
        }
    }
}

/// A model directory for the chart's hostPath model volume (`model.hostPath`): `model` linked
/// (or copied) into `dir/models`, readable by the sidecar's uid 65532, which cannot traverse the
/// model cache under /root. Returns the directory and the file's name in it.
pub fn model_volume(dir: &Path, model: &Path) -> Result<(PathBuf, String)> {
    use std::os::unix::fs::PermissionsExt as _;
    let name = model
        .file_name()
        .ok_or_else(|| Error::Node(format!("{} names no file", model.display())))?
        .to_string_lossy()
        .into_owned();
    let models = dir.join("models");
    std::fs::create_dir_all(&models).map_err(|e| Error::io("creating directory", &models, e))?;
    let readable = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("setting permissions of", path, e))
    };
    readable(dir, 0o755)?;
    readable(&models, 0o755)?;
    let target = models.join(&name);
    if !target.exists() && std::fs::hard_link(model, &target).is_err() {
        std::fs::copy(model, &target).map_err(|e| Error::io("copying", model, e))?;
    }
    readable(&target, 0o644)?;
    Ok((models, name))
}
