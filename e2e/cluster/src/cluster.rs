//! Starting and stopping a local cluster: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kwok with simulated GPU nodes, all as child processes on loopback.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};

use crate::error::{Error, Result};
use crate::kubeconfig;
use crate::node::{NodeConfig, RealNode};
use crate::nodes::{self, GpuNodeSpec};
use crate::pki::Pki;
use crate::process::Component;

/// The Kubernetes release the control plane is built from (see `e2e/controlplane/build.sh`).
pub const K8S_VERSION: &str = "v1.35.4";

/// The kwok stages, written next to the cluster's other files at start.
const KWOK_STAGES: &str = include_str!("../../controlplane/kwok-stages.yaml");

/// The binaries a cluster needs in its binary directory, and the component name of each.
pub const BINARIES: [&str; 5] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
];

/// How to start a local cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Directory with the binaries (the last line printed by `e2e/controlplane/build.sh`).
    pub bin_dir: PathBuf,
    /// Directory for etcd data, certificates, logs and the kubeconfig. Must exist.
    pub state_dir: PathBuf,
    /// Number of simulated GPU nodes (at most 255).
    pub gpu_nodes: u8,
    /// What each GPU node looks like.
    pub node_spec: GpuNodeSpec,
    /// How long each component may take to become ready.
    pub ready_timeout: Duration,
    /// A real node (kubelet, containerd, kube-proxy) running the project's images; `None` runs
    /// pods on the simulated GPU nodes only (kwok marks them Running and runs nothing).
    pub node: Option<NodeConfig>,
}

impl ClusterConfig {
    /// Three default GPU nodes, two minutes per component to become ready.
    pub fn new(bin_dir: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        ClusterConfig {
            bin_dir: bin_dir.into(),
            state_dir: state_dir.into(),
            gpu_nodes: 3,
            node_spec: GpuNodeSpec::default(),
            ready_timeout: Duration::from_secs(120),
            node: None,
        }
    }
}

/// Loopback ports of the cluster's servers.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// etcd's client port.
    pub etcd_client: u16,
    /// etcd's peer port.
    pub etcd_peer: u16,
    /// The API server's secure port.
    pub api_server: u16,
    /// kube-controller-manager's health/metrics port.
    pub controller_manager: u16,
    /// kube-scheduler's health/metrics port.
    pub scheduler: u16,
}

impl Ports {
    /// Asks the kernel for five free loopback ports. They are released before the servers bind
    /// them, so another process could take one in between; startup then fails with the
    /// component's log saying "address already in use".
    fn pick() -> Result<Self> {
        let listeners = (0..5)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::Port)?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::Port)?;
        Ok(Ports {
            etcd_client: ports[0],
            etcd_peer: ports[1],
            api_server: ports[2],
            controller_manager: ports[3],
            scheduler: ports[4],
        })
    }
}

/// A running local cluster. Dropping it stops every process it started.
#[derive(Debug)]
pub struct LocalCluster {
    /// In start order; stopped in reverse.
    components: Vec<Component>,
    /// The real node, stopped before the control plane.
    node: Option<RealNode>,
    kubeconfig: PathBuf,
    state_dir: PathBuf,
    ports: Ports,
}

impl LocalCluster {
    /// Starts all components and waits until the cluster can run pods: the API server is
    /// ready, the controller-manager and scheduler are healthy, every GPU node is `Ready` and
    /// the `default` service account exists.
    ///
    /// On failure, everything started so far is stopped, and the error names the component and
    /// its log file (under `<state_dir>/logs`).
    ///
    /// Free ports are picked before the servers bind them; when another process takes one in
    /// between, the start is retried (up to three attempts) with new ports. The logs of a
    /// failed attempt are kept in `<state_dir>/logs-attempt-<n>`.
    pub async fn start(config: ClusterConfig) -> Result<Self> {
        const ATTEMPTS: u32 = 3;
        let mut attempt = 1;
        loop {
            match Self::start_once(&config).await {
                Err(e) if attempt < ATTEMPTS && e.is_address_in_use() => {
                    tracing::warn!("attempt {attempt}: {e}; retrying with other ports");
                    let state = &config.state_dir;
                    let kept = state.join(format!("logs-attempt-{attempt}"));
                    let logs = state.join("logs");
                    std::fs::rename(&logs, &kept).map_err(|e| Error::io("renaming", &logs, e))?;
                    // etcd's data names its peer URL; the next attempt has another.
                    let etcd = state.join("etcd");
                    std::fs::remove_dir_all(&etcd).map_err(|e| Error::io("removing", &etcd, e))?;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(config: &ClusterConfig) -> Result<Self> {
        let bin = |name: &str| config.bin_dir.join(name);
        for name in BINARIES {
            if !bin(name).is_file() {
                return Err(Error::MissingBinary {
                    component: name.into(),
                    path: bin(name),
                });
            }
        }
        let state = &config.state_dir;
        let logs = state.join("logs");
        for dir in [&logs, &state.join("etcd")] {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
        }
        let log = |name: &str| logs.join(format!("{name}.log"));
        let ports = Ports::pick()?;
        let pki = Pki::generate(&state.join("pki"))?;
        let kubeconfig = state.join("kubeconfig");
        let server = format!("https://127.0.0.1:{}", ports.api_server);
        kubeconfig::write_admin(&kubeconfig, &server, &pki)?;
        let stages = state.join("kwok-stages.yaml");
        std::fs::write(&stages, KWOK_STAGES).map_err(|e| Error::io("writing", &stages, e))?;

        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| Error::Runtime(format!("building the health-check HTTP client: {e}")))?;
        let timeout = config.ready_timeout;
        let mut cluster = LocalCluster {
            components: Vec::new(),
            node: None,
            kubeconfig: kubeconfig.clone(),
            state_dir: state.clone(),
            ports,
        };

        if let Some(node) = &config.node {
            cluster.node = Some(RealNode::prepare(state, &config.bin_dir, node)?);
        }

        let etcd_args = etcd_args(state, &ports);
        cluster.components.push(Component::start(
            "etcd",
            &bin("etcd"),
            &etcd_args,
            &log("etcd"),
        )?);
        let url = format!("http://127.0.0.1:{}/readyz", ports.etcd_client);
        cluster
            .wait_ready(0, timeout, || http_ok(&http, &url))
            .await?;

        let args = api_server_args(state, &ports, &pki, config.node.is_some());
        let api = Component::start(
            "kube-apiserver",
            &bin("kube-apiserver"),
            &args,
            &log("kube-apiserver"),
        )?;
        cluster.components.push(api);
        let client = kubeconfig::client(&kubeconfig).await?;
        cluster
            .wait_ready(1, timeout, || api_ready(&client))
            .await?;

        let kcm_args = controller_manager_args(&kubeconfig, &pki, ports.controller_manager);
        let kcm = Component::start(
            "kube-controller-manager",
            &bin("kube-controller-manager"),
            &kcm_args,
            &log("kube-controller-manager"),
        )?;
        cluster.components.push(kcm);
        let sched_args = scheduler_args(&kubeconfig, ports.scheduler);
        let sched = Component::start(
            "kube-scheduler",
            &bin("kube-scheduler"),
            &sched_args,
            &log("kube-scheduler"),
        )?;
        cluster.components.push(sched);
        let kwok_args = kwok_args(&kubeconfig, &stages);
        cluster.components.push(Component::start(
            "kwok",
            &bin("kwok"),
            &kwok_args,
            &log("kwok"),
        )?);

        let node_api: Api<Node> = Api::all(client.clone());
        for index in 0..config.gpu_nodes {
            let node = nodes::gpu_node(index, &config.node_spec);
            match node_api.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.is_already_exists() => {}
                Err(e) => {
                    return Err(Error::kube(
                        format!("creating node {}", nodes::node_name(index)),
                        e,
                    ));
                }
            }
        }

        let url = format!("https://127.0.0.1:{}/healthz", ports.controller_manager);
        cluster
            .wait_ready(2, timeout, || http_ok(&http, &url))
            .await?;
        let url = format!("https://127.0.0.1:{}/healthz", ports.scheduler);
        cluster
            .wait_ready(3, timeout, || http_ok(&http, &url))
            .await?;
        let server = cluster.server_url();
        if let Some(node) = cluster.node.as_mut() {
            node.start(&server, &pki, client.clone(), timeout).await?;
        }
        let wanted = usize::from(config.gpu_nodes) + usize::from(config.node.is_some());
        cluster
            .wait_ready(4, timeout, || nodes_ready(&node_api, wanted))
            .await?;
        // The controller-manager creates each namespace's `default` service account; pods are
        // rejected until it exists, so a cluster without it is not ready for tests.
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        cluster
            .wait_ready(2, timeout, || service_account_exists(&accounts))
            .await?;
        Ok(cluster)
    }

    /// The admin kubeconfig of this cluster.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory holding the cluster's data, certificates and logs.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The API server's URL.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.api_server)
    }

    /// The loopback ports in use.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// The running components, in start order (for their names, pids and logs).
    pub fn components(&self) -> &[Component] {
        &self.components
    }

    /// A client with admin rights on this cluster.
    pub async fn client(&self) -> Result<kube::Client> {
        kubeconfig::client(&self.kubeconfig).await
    }

    /// The real node, when the cluster has one.
    pub fn node(&self) -> Option<&RealNode> {
        self.node.as_ref()
    }

    /// Kills the named component (`etcd`, `kube-apiserver`, ...; see [`BINARIES`]) with
    /// `SIGKILL`, as a crash would; its data, certificates and ports stay for
    /// [`LocalCluster::restart`].
    pub fn kill(&mut self, name: &str) -> Result<()> {
        let index = self.index_of(name)?;
        self.components[index].kill()
    }

    /// Starts the named component again with the same arguments (killing it first when it still
    /// runs), and waits up to `timeout` until the API server answers ready.
    pub async fn restart(&mut self, name: &str, timeout: Duration) -> Result<()> {
        let index = self.index_of(name)?;
        self.components[index].restart()?;
        let client = kubeconfig::client(&self.kubeconfig).await?;
        self.wait_ready(index, timeout, || api_ready(&client)).await
    }

    fn index_of(&self, name: &str) -> Result<usize> {
        self.components
            .iter()
            .position(|c| c.name() == name)
            .ok_or_else(|| {
                Error::Runtime(format!(
                    "the cluster runs no component named {name:?} (it runs {})",
                    self.components
                        .iter()
                        .map(Component::name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// Fails with [`Error::Exited`] when any component (of the node too) has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(node) = self.node.as_mut() {
            node.check_running()?;
        }
        self.components
            .iter_mut()
            .try_for_each(Component::check_running)
    }

    /// Stops every component, the last started first, each with `SIGTERM` and `grace` before
    /// `SIGKILL`. Returns the first component that would not stop, after trying all of them.
    pub fn stop(mut self, grace: Duration) -> Result<()> {
        self.stop_all(grace)
    }

    fn stop_all(&mut self, grace: Duration) -> Result<()> {
        let mut first_error = None;
        if let Some(node) = self.node.take()
            && let Err(e) = node.stop(grace)
        {
            first_error.get_or_insert(e);
        }
        while let Some(mut component) = self.components.pop() {
            if let Err(e) = component.stop(grace) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Polls `probe` until it succeeds; fails when any component exits or after `timeout`,
    /// naming the component at `target`.
    async fn wait_ready<F, Fut>(&mut self, target: usize, timeout: Duration, probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        if let Some(node) = self.node.as_mut() {
            node.check_running()?;
        }
        crate::process::wait_ready(&mut self.components, target, timeout, probe).await
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop_all(Duration::from_secs(5)) {
            tracing::error!("stopping the local cluster: {e}");
        }
    }
}

fn etcd_args(state: &Path, ports: &Ports) -> Vec<String> {
    let client = format!("http://127.0.0.1:{}", ports.etcd_client);
    let peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
    vec![
        "--name=default".into(),
        format!("--data-dir={}", state.join("etcd").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=default={peer}"),
        // Test data is thrown away; fsync only costs time.
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ]
}

fn api_server_args(state: &Path, ports: &Ports, pki: &Pki, node: bool) -> Vec<String> {
    let p = |path: &Path| path.display().to_string();
    let mut args = vec![
        format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd_client),
        format!("--secure-port={}", ports.api_server),
        format!("--cert-dir={}", state.join("pki").display()),
        format!("--tls-cert-file={}", p(&pki.serving_cert)),
        format!("--tls-private-key-file={}", p(&pki.serving_key)),
        format!("--client-ca-file={}", p(&pki.ca_cert)),
        format!(
            "--service-account-issuer=https://127.0.0.1:{}",
            ports.api_server
        ),
        format!("--service-account-key-file={}", p(&pki.sa_pub)),
        format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        // Front-proxy settings, so aggregated API servers and the controllers' request-header
        // authenticators find a CA bundle.
        format!("--requestheader-client-ca-file={}", p(&pki.ca_cert)),
        format!(
            "--requestheader-allowed-names={}",
            crate::pki::FRONT_PROXY_CLIENT
        ),
        "--requestheader-username-headers=X-Remote-User".into(),
        "--requestheader-group-headers=X-Remote-Group".into(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
        format!("--proxy-client-cert-file={}", p(&pki.front_proxy_cert)),
        format!("--proxy-client-key-file={}", p(&pki.front_proxy_key)),
        "--allow-privileged=true".into(),
    ];
    if node {
        // Pods reach the API server through the `kubernetes` Service, whose endpoint is the
        // node's address (the pod bridge's gateway); it calls webhooks at their pods' addresses
        // (the endpoints of their Services) and kubelets with a client certificate of its own.
        args.extend([
            "--bind-address=0.0.0.0".to_string(),
            format!("--advertise-address={}", crate::pki::NODE_IP),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            "--enable-aggregator-routing=true".into(),
            format!(
                "--kubelet-client-certificate={}",
                p(&pki.node.apiserver_kubelet_client.0)
            ),
            format!(
                "--kubelet-client-key={}",
                p(&pki.node.apiserver_kubelet_client.1)
            ),
            format!("--kubelet-certificate-authority={}", p(&pki.ca_cert)),
            "--kubelet-preferred-address-types=InternalIP".into(),
        ]);
    } else {
        args.extend([
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".into(),
            "--authorization-mode=RBAC".into(),
            // The `kubernetes` Service's endpoint would be 127.0.0.1, which Endpoints reject.
            "--endpoint-reconciler-type=none".into(),
        ]);
    }
    args
}

fn controller_manager_args(kubeconfig: &Path, pki: &Pki, port: u16) -> Vec<String> {
    let kc = kubeconfig.display();
    vec![
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        "--leader-elect=false".into(),
        format!("--root-ca-file={}", pki.ca_cert.display()),
        format!(
            "--service-account-private-key-file={}",
            pki.sa_key.display()
        ),
        format!("--cluster-signing-cert-file={}", pki.ca_cert.display()),
        format!("--cluster-signing-key-file={}", pki.ca_key.display()),
        "--controllers=*".into(),
    ]
}

fn scheduler_args(kubeconfig: &Path, port: u16) -> Vec<String> {
    let kc = kubeconfig.display();
    vec![
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        "--leader-elect=false".into(),
    ]
}

fn kwok_args(kubeconfig: &Path, stages: &Path) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--config={}", stages.display()),
        "--manage-all-nodes=false".into(),
        format!(
            "--manage-nodes-with-annotation-selector={}={}",
            nodes::KWOK_NODE_ANNOTATION.0,
            nodes::KWOK_NODE_ANNOTATION.1
        ),
        // Only for nodes without their own spec.podCIDR; ours all have one.
        "--cidr=127.1.255.0/24".into(),
        "--node-lease-duration-seconds=40".into(),
    ]
}

async fn http_ok(http: &reqwest::Client, url: &str) -> Result<(), String> {
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        let body = response.text().await.unwrap_or_default();
        Err(format!("GET {url}: {status}: {}", body.trim()))
    }
}

async fn api_ready(client: &kube::Client) -> Result<(), String> {
    let request = http::Request::get("/readyz?verbose")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    client
        .request_text(request)
        .await
        .map(|_| ())
        .map_err(|e| format!("GET /readyz: {e}"))
}

async fn nodes_ready(api: &Api<Node>, wanted: usize) -> Result<(), String> {
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing nodes: {e}"))?;
    let ready = list.items.iter().filter(|n| nodes::is_ready(n)).count();
    if ready >= wanted {
        Ok(())
    } else {
        Err(format!("{ready} of {wanted} GPU nodes Ready"))
    }
}

async fn service_account_exists(api: &Api<ServiceAccount>) -> Result<(), String> {
    match api.get_opt("default").await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("service account default/default not created yet".into()),
        Err(e) => Err(format!("reading service account default/default: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A binary directory whose programs are the given shell scripts (the rest sleep).
    fn fake_bin_dir(scripts: &[(&str, &str)]) -> Result<tempfile::TempDir> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("creating temp dir", "/tmp", e))?;
        for name in BINARIES {
            let body = scripts
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("sleep 60", |(_, s)| s);
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))
                .map_err(|e| Error::io("writing", &path, e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| Error::io("chmod", &path, e))?;
        }
        Ok(dir)
    }

    fn state_dir() -> Result<tempfile::TempDir> {
        tempfile::tempdir().map_err(|e| Error::io("creating temp dir", "/tmp", e))
    }

    #[tokio::test]
    async fn missing_binaries_are_named_before_anything_starts() -> Result<()> {
        let (bin, state) = (state_dir()?, state_dir()?);
        match LocalCluster::start(ClusterConfig::new(bin.path(), state.path())).await {
            Err(Error::MissingBinary { component, .. }) => assert_eq!(component, "etcd"),
            other => panic!("expected MissingBinary, got {other:?}"),
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_crashing_etcd_is_named_with_its_log() -> Result<()> {
        let bin = fake_bin_dir(&[("etcd", "echo 'etcd: bad flag' >&2; exit 2")])?;
        let state = state_dir()?;
        let err = LocalCluster::start(ClusterConfig::new(bin.path(), state.path()))
            .await
            .expect_err("a crashing etcd must fail the start");
        let message = err.to_string();
        assert!(matches!(err, Error::Exited { .. }), "{message}");
        assert!(message.starts_with("etcd exited"), "{message}");
        assert!(message.contains(&state.path().join("logs/etcd.log").display().to_string()));
        assert!(message.contains("etcd: bad flag"), "{message}");
        Ok(())
    }

    #[tokio::test]
    async fn a_port_taken_in_between_is_retried_with_new_ports() -> Result<()> {
        let state = state_dir()?;
        let attempts = state.path().join("attempts");
        let script = format!(
            "echo \"$@\" >> {}; echo 'listen tcp: bind: address already in use' >&2; exit 1",
            attempts.display()
        );
        let bin = fake_bin_dir(&[("etcd", &script)])?;
        let err = LocalCluster::start(ClusterConfig::new(bin.path(), state.path()))
            .await
            .expect_err("etcd never binds");
        assert!(err.is_address_in_use(), "{err}");
        let runs =
            std::fs::read_to_string(&attempts).map_err(|e| Error::io("reading", &attempts, e))?;
        let urls: std::collections::BTreeSet<&str> = runs
            .split_whitespace()
            .filter(|arg| arg.starts_with("--listen-client-urls="))
            .collect();
        assert_eq!(runs.lines().count(), 3, "expected three attempts: {runs}");
        assert!(urls.len() > 1, "every attempt used the same port: {runs}");
        assert!(state.path().join("logs-attempt-1/etcd.log").is_file());
        Ok(())
    }

    #[tokio::test]
    async fn an_etcd_that_never_gets_ready_times_out_and_is_stopped() -> Result<()> {
        let bin = fake_bin_dir(&[("etcd", "echo started; sleep 60")])?;
        let state = state_dir()?;
        let mut config = ClusterConfig::new(bin.path(), state.path());
        config.ready_timeout = Duration::from_secs(1);
        let err = LocalCluster::start(config)
            .await
            .expect_err("etcd never answers /readyz");
        let message = err.to_string();
        assert!(matches!(err, Error::NotReady { .. }), "{message}");
        assert!(message.starts_with("etcd was not ready"), "{message}");
        assert!(message.contains("logs/etcd.log"), "{message}");
        // The failed start stopped what it had started: no process runs the fake binary.
        let still_running = std::fs::read_dir("/proc")
            .map_err(|e| Error::io("reading", "/proc", e))?
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
            .any(|cmdline| {
                String::from_utf8_lossy(&cmdline).contains(&*bin.path().to_string_lossy())
            });
        assert!(!still_running, "a fake component outlived the failed start");
        Ok(())
    }
}
