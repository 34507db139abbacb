//! The test helper: one shared cluster per test process, a fresh namespace per test.
//!
//! Where the cluster comes from, in order:
//! 1. `KUBECONFIG_FOR_TESTS` names a kubeconfig: its current context is used as is (the cluster
//!    `e2e/test.sh` starts once for the whole test run, or a cluster of your own).
//! 2. `TTC_CONTROL_PLANE_BIN` names the directory printed by `e2e/controlplane/build.sh`: a
//!    [`LocalCluster`] is started on first use, once per test binary, and killed when the
//!    test binary exits.
//! 3. Neither: every call fails with [`Error::NoControlPlane`], so that tests needing a cluster
//!    fail instead of passing without having checked anything.
//!
//! ```no_run
//! # async fn example() -> ttc_cluster::Result<()> {
//! use k8s_openapi::api::core::v1::ConfigMap;
//! let ns = ttc_cluster::testing::TestNamespace::create("my-test").await?;
//! let config_maps = ns.api::<ConfigMap>();
//! // ... use ns.client(), ns.name(), ns.kubectl() ...
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};

use crate::cluster::{ClusterConfig, LocalCluster};
use crate::error::{Error, Result};
use crate::kubeconfig;

/// Names a kubeconfig the tests should use instead of starting a cluster.
pub const KUBECONFIG_ENV: &str = "KUBECONFIG_FOR_TESTS";
/// Names the directory with the control-plane binaries, kubectl and helm.
pub const BIN_DIR_ENV: &str = "TTC_CONTROL_PLANE_BIN";
/// Number of simulated GPU nodes when the helper starts its own cluster (default 3).
pub const GPU_NODES_ENV: &str = "TTC_E2E_GPU_NODES";
/// Set to `1` to keep test namespaces (and the helper-started cluster's state directory).
pub const KEEP_ENV: &str = "TTC_E2E_KEEP";

/// The label put on every namespace made by [`TestNamespace::create`].
pub const TEST_NAMESPACE_LABEL: &str = "ttc-e2e/test-namespace";

/// The cluster the tests of this process use.
#[derive(Debug)]
pub struct TestCluster {
    kubeconfig: PathBuf,
    bin_dir: Option<PathBuf>,
    started_here: bool,
}

static SHARED: OnceLock<std::result::Result<TestCluster, String>> = OnceLock::new();
/// The cluster this process started, if any, taken down by [`teardown_at_exit`].
static OWNED: Mutex<Option<(LocalCluster, tempfile::TempDir)>> = Mutex::new(None);

/// The shared cluster of this test process, started on first use (see the module docs).
///
/// This blocks while a cluster starts (seconds with cached binaries); call it from
/// `tokio::task::spawn_blocking` in async code, or use [`TestNamespace::create`], which does.
/// A failed start is remembered: later calls fail at once with the same message.
pub fn shared_cluster() -> Result<&'static TestCluster> {
    SHARED
        .get_or_init(|| locate_or_start().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|message| Error::SharedClusterUnavailable(message.clone()))
}

fn locate_or_start() -> Result<TestCluster> {
    let bin_dir = std::env::var_os(BIN_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    if let Some(path) = std::env::var_os(KUBECONFIG_ENV).filter(|v| !v.is_empty()) {
        let kubeconfig = PathBuf::from(path);
        if !kubeconfig.is_file() {
            return Err(Error::Kubeconfig {
                path: kubeconfig,
                reason: format!("{KUBECONFIG_ENV} names a file that does not exist"),
            });
        }
        return Ok(TestCluster {
            kubeconfig,
            bin_dir,
            started_here: false,
        });
    }
    let bin_dir = bin_dir.ok_or(Error::NoControlPlane)?;
    let state = tempfile::Builder::new()
        .prefix("ttc-e2e-cluster-")
        .tempdir()
        .map_err(|e| Error::io("creating a temporary directory", std::env::temp_dir(), e))?;
    let mut config = ClusterConfig::new(&bin_dir, state.path());
    if let Some(n) = std::env::var(GPU_NODES_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.gpu_nodes = n;
    }
    // The cluster must not depend on the runtime of whichever test came first: that runtime
    // ends with its test. Start it on a thread with its own runtime.
    let started = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Runtime(format!("building a tokio runtime: {e}")))?;
        runtime.block_on(LocalCluster::start(config))
    })
    .join()
    .map_err(|_| Error::Runtime("the cluster start-up thread panicked".into()))?;
    let cluster = match started {
        Ok(cluster) => cluster,
        Err(e) => {
            // Keep the logs the error points at.
            let _ = state.keep();
            return Err(e);
        }
    };
    let kubeconfig = cluster.kubeconfig().to_path_buf();
    let mut owned = OWNED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *owned = Some((cluster, state));
    // SAFETY: registering a plain extern "C" function with atexit has no preconditions.
    if unsafe { libc::atexit(teardown_at_exit) } != 0 {
        tracing::warn!("atexit registration failed; the cluster dies with the process anyway");
    }
    Ok(TestCluster {
        kubeconfig,
        bin_dir: Some(bin_dir),
        started_here: true,
    })
}

/// Kills the cluster this process started and removes its state directory. The children would
/// die with the process anyway (parent-death signal); this also cleans up the files.
extern "C" fn teardown_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let taken = OWNED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some((cluster, state)) = taken {
            // Data is thrown away, so there is nothing to shut down gracefully for.
            let _ = cluster.stop(Duration::ZERO);
            if std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
                let _ = state.keep();
            }
        }
    });
}

impl TestCluster {
    /// The kubeconfig of the cluster.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// True when this test process started the cluster itself (no `KUBECONFIG_FOR_TESTS`).
    pub fn started_here(&self) -> bool {
        self.started_here
    }

    /// A new admin client for the cluster. Make one per test: a client belongs to the tokio
    /// runtime it was first used on, and each `#[tokio::test]` has its own.
    pub async fn client(&self) -> Result<kube::Client> {
        kubeconfig::client(&self.kubeconfig).await
    }

    /// `kubectl` with `KUBECONFIG` set to this cluster: from `TTC_CONTROL_PLANE_BIN` when set,
    /// otherwise from `PATH`.
    pub fn kubectl(&self) -> Command {
        self.tool("kubectl")
    }

    /// `helm` with `KUBECONFIG` set to this cluster, found like [`TestCluster::kubectl`].
    pub fn helm(&self) -> Command {
        self.tool("helm")
    }

    fn tool(&self, name: &str) -> Command {
        let local = self
            .bin_dir
            .as_ref()
            .map(|d| d.join(name))
            .filter(|p| p.is_file());
        let mut command = Command::new(local.unwrap_or_else(|| PathBuf::from(name)));
        command.env("KUBECONFIG", &self.kubeconfig);
        command
    }
}

/// A namespace of its own for one test, on the shared cluster. Deleted when dropped (unless
/// `TTC_E2E_KEEP=1`).
pub struct TestNamespace {
    name: String,
    client: kube::Client,
    cluster: &'static TestCluster,
    deleted: bool,
}

impl TestNamespace {
    /// Creates a namespace named `<prefix>-<random>` on the shared cluster (starting the cluster
    /// if needed) and waits until pods can be created in it (its `default` service account
    /// exists).
    pub async fn create(prefix: &str) -> Result<Self> {
        let cluster = tokio::task::spawn_blocking(shared_cluster)
            .await
            .map_err(|e| Error::Runtime(format!("the cluster start-up task failed: {e}")))??;
        let client = cluster.client().await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-", dns_label_prefix(prefix))),
                labels: Some(BTreeMap::from([(
                    TEST_NAMESPACE_LABEL.into(),
                    "true".into(),
                )])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .map_err(|e| {
                let kubeconfig = cluster.kubeconfig.display();
                Error::kube(
                    format!("creating a test namespace for {prefix} (cluster of {kubeconfig})"),
                    e,
                )
            })?;
        let name = created.metadata.name.ok_or_else(|| {
            Error::Runtime("the API server returned a namespace without a name".into())
        })?;
        let this = TestNamespace {
            name,
            client,
            cluster,
            deleted: false,
        };
        wait_for_default_service_account(&this.client, &this.name).await?;
        Ok(this)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An admin client for the cluster.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// The cluster the namespace lives on.
    pub fn cluster(&self) -> &'static TestCluster {
        self.cluster
    }

    /// An API handle for namespaced resources of kind `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// `kubectl --namespace <this>` against the cluster.
    pub fn kubectl(&self) -> Command {
        let mut command = self.cluster.kubectl();
        command.arg("--namespace").arg(&self.name);
        command
    }

    /// Deletes the namespace now (the API server removes its contents in the background).
    pub async fn delete(mut self) -> Result<()> {
        self.deleted = true;
        delete_namespace(&self.client, &self.name).await
    }
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.deleted || std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
            return;
        }
        // Drop cannot await, and the test's runtime may be shutting down: delete from a thread
        // with its own runtime and a client of its own.
        let name = self.name.clone();
        let kubeconfig = self.cluster.kubeconfig.clone();
        let deleted = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Runtime(format!("building a tokio runtime: {e}")))?;
            runtime.block_on(async {
                let client = kubeconfig::client(&kubeconfig).await?;
                delete_namespace(&client, &name).await
            })
        })
        .join();
        match deleted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("cleaning up test namespace {}: {e}", self.name),
            Err(_) => tracing::warn!("cleaning up test namespace {}: thread panicked", self.name),
        }
    }
}

async fn delete_namespace(client: &kube::Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(Error::kube(format!("deleting test namespace {name}"), e)),
    }
}

/// Lower-cases `prefix` and replaces what a DNS label may not hold, leaving room for the
/// random suffix the API server appends.
fn dns_label_prefix(prefix: &str) -> String {
    let cleaned: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let trimmed = cleaned.trim_matches('-');
    if trimmed.is_empty() {
        "test".into()
    } else {
        trimmed.into()
    }
}

/// Waits until kube-controller-manager has given `namespace` its `default` ServiceAccount: until
/// then the API server refuses pods there (403, "error looking up service account").
pub async fn wait_for_default_service_account(
    client: &kube::Client,
    namespace: &str,
) -> Result<()> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = accounts
            .get_opt("default")
            .await
            .map_err(|e| Error::kube(format!("reading service account {namespace}/default"), e))?;
        if found.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Runtime(format!(
                "namespace {namespace} has no default service account after 60s: is \
                 kube-controller-manager running?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; bind it soon).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after `limit` with the last state
/// it described: the way tests wait for a cluster to converge without fixed sleeps.
pub async fn eventually<T, F, Fut>(
    what: &str,
    limit: Duration,
    mut check: F,
) -> std::result::Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Option<T>, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "condition not met".to_string(),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!("{what}: not true after {limit:?} (last: {last})"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Applies the committed `InferencePolicy` CRD manifest (`api/inferencepolicy.crd.yaml`, by
/// server-side apply, so
/// that it may exist already) and waits until the API server reports it established.
pub async fn install_crd(client: &kube::Client) -> std::result::Result<(), String> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../api")
        .join(ttc_api::CRD_MANIFEST_PATH);
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
    let name = crd
        .metadata
        .name
        .clone()
        .ok_or("the CRD manifest names no CRD")?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply("ttc-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .map_err(|e| format!("applying the CRD {name}: {e}"))?;
    eventually("the CRD established", Duration::from_secs(30), || {
        let api = api.clone();
        let name = name.clone();
        async move {
            let crd = api.get(&name).await.map_err(|e| e.to_string())?;
            let established = crd.status.and_then(|s| s.conditions).is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            Ok(established.then_some(()))
        }
    })
    .await
}

/// Waits until `url` answers 200, for at most `limit` (a server coming up: its readiness probe).
pub async fn wait_until_up(
    http: &reqwest::Client,
    url: &str,
    limit: Duration,
) -> std::result::Result<(), String> {
    eventually(url, limit, || async move {
        let response = http.get(url).send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_success() {
            Ok(Some(()))
        } else {
            Err(status.to_string())
        }
    })
    .await
}

/// Asks the sidecar at `base` (`http://host:port`) one chat question with the model it serves
/// (the first of `/v1/models`); returns the response body, failing on a status other than 200.
pub async fn ask_sidecar(
    http: &reqwest::Client,
    base: &str,
    question: &str,
    max_tokens: u32,
) -> std::result::Result<serde_json::Value, String> {
    let models: serde_json::Value = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| format!("GET {base}/v1/models: {e}"))?
        .json()
        .await
        .map_err(|e| format!("GET {base}/v1/models: {e}"))?;
    let model = models["data"][0]["id"]
        .as_str()
        .ok_or_else(|| format!("{base}/v1/models lists no model: {models}"))?;
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
    });
    let response = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("POST {base}/v1/chat/completions: {e}"))?;
    let status = response.status();
    let answer: serde_json::Value = response
        .json()
        .await
        .map_err(|e| format!("POST {base}/v1/chat/completions: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "POST {base}/v1/chat/completions: {status}: {answer}"
        ));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::dns_label_prefix;

    #[test]
    fn prefixes_become_dns_labels() {
        assert_eq!(dns_label_prefix("Smoke_Test::deploy"), "smoke-test--deploy");
        assert_eq!(dns_label_prefix("__"), "test");
        assert_eq!(dns_label_prefix(&"a".repeat(100)).len(), 40);
    }
}
