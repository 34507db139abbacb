//! The one-command demo: the whole loop on a local cluster.
//!
//! A real control plane with simulated GPU nodes; the Helm chart installed; the operator run as
//! a local process with the chart's configuration, certificate and ServiceAccount; a sample
//! InferencePolicy and an inference Deployment in an opted-in namespace; the sidecars the webhook
//! injected run as local processes on their pods' IPs (see [`kubelet`]) with the real default
//! model; a stream of questions with known answers; the budget changed with `kubectl patch`; a
//! summary, `kubectl get ipol` and a plot at the end. Everything it starts is stopped when the
//! demo ends, fails or is interrupted: child processes die with it, the state directory is
//! temporary.

pub mod kubelet;
pub mod report;
pub mod workload;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Pod, Secret, ServiceAccount};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use ttc_crds::InferencePolicy;
use ttc_crds::labels::{INJECTION_ENABLED, INJECTION_NAMESPACE_LABEL, SIDECAR_CONTAINER_NAME};

use self::kubelet::{ConfigMaps, HostMount};
use self::workload::{Endpoint, Phase, Record};
use crate::process::Component;
use crate::{ClusterConfig, LocalCluster};

/// Namespace of the inference workload (opted in to injection).
pub const NAMESPACE: &str = "ttc-demo";
/// Namespace of the chart's release.
pub const SYSTEM_NAMESPACE: &str = "ttc-system";
/// The Helm release (and the operator's object names).
pub const RELEASE: &str = "ttc-operator";
/// The model the demo serves (the operator's default).
pub const MODEL: &str = "smollm2-135m-instruct";

/// What the demo needs and how it runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Control-plane binaries, kubectl and helm (the directory `e2e/controlplane/build.sh` prints).
    pub control_plane_bin: PathBuf,
    /// The `ttc-operator` binary.
    pub operator_bin: PathBuf,
    /// The `ttc-sidecar` binary.
    pub sidecar_bin: PathBuf,
    /// The repository root (chart, demo manifests).
    pub repo_root: PathBuf,
    /// Where the records, summary and plot go.
    pub out_dir: PathBuf,
    /// The model cache of this machine (the sidecars' caches are seeded from it).
    pub model_cache: PathBuf,
    /// Inference pods.
    pub replicas: u32,
    /// Questions per phase.
    pub questions_per_phase: usize,
    /// The joules-per-request budget of each phase: the policy starts with the first, then is
    /// patched to each next one.
    pub budgets: Vec<f64>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Seed of the questions.
    pub seed: u64,
}

/// Prints a step of the demo.
fn step(text: &str) {
    println!("\n==> {text}");
    let _ = std::io::stdout().flush();
}

/// Prints an indented detail line.
fn detail(text: &str) {
    println!("    {text}");
    let _ = std::io::stdout().flush();
}

/// Runs `command`, returning its stdout; fails with its stderr.
fn run_tool(command: &mut Command) -> anyhow::Result<String> {
    let described = format!("{command:?}");
    let output = command
        .output()
        .with_context(|| format!("cannot run {described}"))?;
    if !output.status.success() {
        bail!(
            "{described} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A free port on loopback.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `check` every half second until it yields a value, for at most `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    let mut last = String::from("not yet");
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Everything the demo started; dropped in this order (processes before the cluster).
struct Running {
    sidecars: Vec<Component>,
    operator: Option<Component>,
    cluster: LocalCluster,
    state: tempfile::TempDir,
    /// Where kubectl and helm are.
    tools: PathBuf,
}

impl Running {
    fn kubectl(&self) -> Command {
        let mut command = Command::new(self.tools.join("kubectl"));
        command.env("KUBECONFIG", self.cluster.kubeconfig());
        command
    }

    fn helm(&self) -> Command {
        let mut command = Command::new(self.tools.join("helm"));
        command
            .env("KUBECONFIG", self.cluster.kubeconfig())
            // Helm's caches and configuration stay in the demo's state directory.
            .env("HELM_CACHE_HOME", self.state.path().join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.state.path().join("helm/config"))
            .env("HELM_DATA_HOME", self.state.path().join("helm/data"));
        command
    }
}

/// What a finished demo leaves.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    /// The figures of each phase.
    pub summaries: Vec<report::PhaseSummary>,
    /// Every answered question.
    pub records: Vec<Record>,
    /// What `kubectl get ipol -o wide` printed at the end.
    pub kubectl_get: String,
    /// The files written into the output directory.
    pub files: Vec<PathBuf>,
}

/// Runs the demo. Dropping the future (Ctrl-C) stops everything it started.
pub async fn run(config: DemoConfig) -> anyhow::Result<DemoOutcome> {
    anyhow::ensure!(!config.budgets.is_empty(), "give at least one budget");
    anyhow::ensure!(
        config.budgets.iter().all(|b| b.is_finite() && *b > 0.0),
        "budgets must be positive joules per request, got {:?}",
        config.budgets
    );
    anyhow::ensure!(config.replicas > 0, "replicas must be at least 1");
    for (what, path) in [
        ("ttc-operator", &config.operator_bin),
        ("ttc-sidecar", &config.sidecar_bin),
    ] {
        anyhow::ensure!(
            path.is_file(),
            "the {what} binary is not at {}; build it with `cargo build --release -p {what}`",
            path.display()
        );
    }
    let started = Instant::now();
    let state = tempfile::Builder::new()
        .prefix("ttc-demo.")
        .tempdir()
        .context("creating the demo's state directory")?;

    step(
        "Starting a local Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok) with 2 simulated GPU nodes",
    );
    let cluster_dir = state.path().join("cluster");
    std::fs::create_dir_all(&cluster_dir)?;
    let mut cluster_config = ClusterConfig::new(&config.control_plane_bin, &cluster_dir);
    cluster_config.gpu_nodes = 2;
    let cluster = LocalCluster::start(cluster_config)
        .await
        .context("starting the local control plane")?;
    detail(&format!(
        "API server {} (kubeconfig {})",
        cluster.server_url(),
        cluster.kubeconfig().display()
    ));
    let mut running = Running {
        sidecars: Vec::new(),
        operator: None,
        cluster,
        state,
        tools: config.control_plane_bin.clone(),
    };
    let client = running.cluster.client().await?;

    step(&format!(
        "Creating namespace {NAMESPACE}, opted in to sidecar injection ({INJECTION_NAMESPACE_LABEL}={INJECTION_ENABLED})"
    ));
    let namespace: Namespace = serde_json::from_value(json!({
        "metadata": {"name": NAMESPACE, "labels": {INJECTION_NAMESPACE_LABEL: INJECTION_ENABLED}}
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .context("creating the demo namespace")?;

    let ports = OperatorPorts {
        admin: free_port()?,
        webhook: free_port()?,
        receiver: free_port()?,
    };
    step("Installing the Helm chart charts/ttc-operator");
    let chart = config.repo_root.join("charts/ttc-operator");
    let sets = [
        // The operator runs as a local process below, not as a pod (kwok runs no containers).
        "operator.replicas=0".to_string(),
        "operator.logJson=false".into(),
        "operator.resyncSeconds=5".into(),
        "operator.staleSeconds=30".into(),
        format!("operator.ports.admin={}", ports.admin),
        format!("operator.ports.webhook={}", ports.webhook),
        format!("operator.ports.receiver={}", ports.receiver),
        // The API server reaches the local operator by URL, the sidecars its receiver directly.
        format!("webhook.url=https://127.0.0.1:{}/mutate", ports.webhook),
        format!("sidecar.otlpEndpoint=http://127.0.0.1:{}", ports.receiver),
        format!("sidecar.rbac.bindings[0].namespace={NAMESPACE}"),
        "sidecar.rbac.bindings[0].serviceAccount=default".into(),
    ];
    let mut helm = running.helm();
    helm.args(["install", RELEASE]).arg(&chart).args([
        "--namespace",
        SYSTEM_NAMESPACE,
        "--create-namespace",
    ]);
    for set in &sets {
        helm.args(["--set", set]);
    }
    detail(&format!(
        "helm install {RELEASE} charts/ttc-operator -n {SYSTEM_NAMESPACE} --create-namespace --set {}",
        sets.join(" --set ")
    ));
    run_tool(&mut helm).context("helm install")?;

    step(
        "Starting the operator (the chart's container spec, configuration, certificate and ServiceAccount) as a local process",
    );
    let operator = start_operator(&client, &running, &config, &ports).await?;
    running.operator = Some(operator);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let admin = format!("http://127.0.0.1:{}", ports.admin);
    let operator_up =
        workload::wait_until_up(&http, &format!("{admin}/readyz"), Duration::from_secs(60)).await;
    if let Some(operator) = running.operator.as_mut() {
        operator.check_running()?;
        anyhow::ensure!(
            operator_up,
            "the operator did not become ready within 60 s; its log:\n{}",
            operator.tail()
        );
    }
    detail(&format!(
        "ready: webhook https://127.0.0.1:{}, report receiver http://127.0.0.1:{}, metrics {admin}/metrics",
        ports.webhook, ports.receiver
    ));

    step(&format!(
        "Applying the InferencePolicy e2e/demo/policy.yaml (budget {} J/request)",
        config.budgets[0]
    ));
    let policies = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource::erase::<InferencePolicy>(&()),
    );
    let mut policy: DynamicObject = serde_yaml::from_str(&std::fs::read_to_string(
        config.repo_root.join("e2e/demo/policy.yaml"),
    )?)?;
    policy.data["spec"]["budget"]["joulesPerRequest"] = json!(config.budgets[0]);
    let policy_name = policy.name_any();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .context("creating the InferencePolicy")?;
    let typed: Api<InferencePolicy> = Api::namespaced(client.clone(), NAMESPACE);
    wait_for("the policy to be Ready", Duration::from_secs(60), || {
        let typed = typed.clone();
        let name = policy_name.clone();
        async move {
            let p = typed.get(&name).await?;
            Ok(p.status
                .filter(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
                .map(|_| ()))
        }
    })
    .await?;
    detail("the operator reconciled it: Ready");

    step(&format!(
        "Creating the inference Deployment e2e/demo/deployment.yaml ({} replicas) — the webhook injects the sidecar",
        config.replicas
    ));
    let pods = start_workload(&client, &config).await?;
    for pod in &pods {
        detail(&format!(
            "{} on {} at {} — containers: {}",
            pod.name_any(),
            pod.spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            pod.status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default(),
            pod.spec
                .as_ref()
                .map(|s| s
                    .containers
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ));
    }

    step(&format!(
        "Fetching the model {MODEL} into {}",
        config.model_cache.display()
    ));
    let status = Command::new(&config.sidecar_bin)
        .args(["fetch-model", "--model", MODEL, "--cache"])
        .arg(&config.model_cache)
        .status()
        .context("running ttc-sidecar fetch-model")?;
    anyhow::ensure!(status.success(), "fetching the model failed ({status})");

    step(
        "Running the injected sidecars as local processes (playing the kubelet: same command, env and pod IP)",
    );
    let mut endpoints = Vec::new();
    for pod in &pods {
        let (component, endpoint) = start_sidecar(&client, &running, &config, pod).await?;
        running.sidecars.push(component);
        endpoints.push(endpoint);
    }
    for (endpoint, sidecar) in endpoints.iter().zip(running.sidecars.iter_mut()) {
        let up = workload::wait_until_up(
            &http,
            &format!("{}/readyz", endpoint.url),
            Duration::from_secs(300),
        )
        .await;
        sidecar.check_running()?;
        anyhow::ensure!(
            up,
            "the sidecar of {} did not become ready; its log:\n{}",
            endpoint.pod,
            sidecar.tail()
        );
        detail(&format!("{} serving at {}", endpoint.pod, endpoint.url));
    }

    let questions = workload::questions(
        config.questions_per_phase * config.budgets.len(),
        config.seed,
    );
    let stream_started = Instant::now();
    let mut records: Vec<Record> = Vec::new();
    for (index, budget) in config.budgets.iter().copied().enumerate() {
        if index > 0 {
            step(&format!("Changing the budget to {budget} J/request"));
            let patch = json!({"spec": {"budget": {"joulesPerRequest": budget}}}).to_string();
            detail(&format!(
                "kubectl -n {NAMESPACE} patch ipol {policy_name} --type merge -p '{patch}'"
            ));
            run_tool(running.kubectl().args([
                "-n",
                NAMESPACE,
                "patch",
                "ipol",
                &policy_name,
                "--type",
                "merge",
                "-p",
                &patch,
            ]))?;
            wait_for_allocation(&typed, &policy_name, budget, pods.len()).await?;
            detail("the operator re-split the budget; the sidecars follow their policy's status");
            // The sidecars see the status through their watch; give it a moment.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        step(&format!(
            "Phase {} of {}: {} questions at {budget} J/request, {} in flight",
            index + 1,
            config.budgets.len(),
            config.questions_per_phase,
            config.concurrency
        ));
        let items = &questions
            [index * config.questions_per_phase..(index + 1) * config.questions_per_phase];
        let progress = Progress::new(config.questions_per_phase);
        let phase_records = workload::drive(
            &http,
            &endpoints,
            MODEL,
            Phase {
                index,
                budget_joules_per_request: budget,
                items,
            },
            config.concurrency,
            stream_started,
            &|record| progress.show(record),
        )
        .await?;
        records.extend(phase_records);
        for sidecar in &mut running.sidecars {
            sidecar.check_running()?;
        }
    }

    step("Waiting for the sidecars' next energy report to reach the operator (every 10 s)");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let get = run_tool(
        running
            .kubectl()
            .args(["-n", NAMESPACE, "get", "ipol", "-o", "wide"]),
    )?;
    println!("\n$ kubectl -n {NAMESPACE} get ipol -o wide\n{get}");
    let current = typed.get(&policy_name).await?;
    if let Some(status) = &current.status {
        if let Some(observed) = &status.observed_summary {
            detail(&format!("status.observedSummary: {observed}"));
        }
        for allocation in &status.allocations {
            detail(&format!(
                "allocation {}: share {:.2}, {} J/request",
                allocation.pod,
                allocation.share,
                allocation
                    .joules_per_request
                    .map_or("-".into(), |j| format!("{j:.2}"))
            ));
        }
    }

    step("Summary");
    let summaries = report::summarise(&records);
    print!("{}", report::table(&summaries));
    for pair in summaries.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        detail(&format!(
            "budget {:.1} -> {:.1} J/request: depth {:.2} -> {:.2} samples, settled {:.2} -> {:.2} J/request, accuracy {:.0}% -> {:.0}%",
            a.budget_joules_per_request,
            b.budget_joules_per_request,
            a.mean_depth,
            b.mean_depth,
            a.settled_joules_per_request,
            b.settled_joules_per_request,
            a.accuracy * 100.0,
            b.accuracy * 100.0
        ));
    }
    if records.iter().any(|r| !r.measured) {
        detail(
            "energy marked estimated comes from CPU time x watts per core (no NVML GPU or RAPL counter on this machine), not from a meter",
        );
    }
    let mut files = report::write_all(&config.out_dir, &records, &summaries, MODEL)?;
    let get_path = config.out_dir.join("kubectl-get-ipol.txt");
    std::fs::write(&get_path, &get)?;
    files.push(get_path);
    for file in &files {
        detail(&format!("wrote {}", file.display()));
    }

    step(&format!(
        "Done in {:.0} s; stopping the sidecars, the operator and the cluster",
        started.elapsed().as_secs_f64()
    ));
    drop(running);
    Ok(DemoOutcome {
        summaries,
        records,
        kubectl_get: get,
        files,
    })
}

/// The operator's ports on loopback.
struct OperatorPorts {
    admin: u16,
    webhook: u16,
    receiver: u16,
}

/// A token of `account` in `namespace`, valid for a day.
async fn service_account_token(
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

/// Writes a kubeconfig for `account` in `namespace` into `dir` and returns its path.
async fn service_account_kubeconfig(
    client: &Client,
    running: &Running,
    namespace: &str,
    account: &str,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let token = service_account_token(client, namespace, account).await?;
    let admin: Value =
        serde_yaml::from_str(&std::fs::read_to_string(running.cluster.kubeconfig())?)?;
    let ca = admin
        .pointer("/clusters/0/cluster/certificate-authority-data")
        .and_then(Value::as_str)
        .context("the admin kubeconfig has no certificate-authority-data")?;
    let path = dir.join("kubeconfig");
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        &path,
        kubelet::token_kubeconfig(&running.cluster.server_url(), ca, &token, namespace),
    )?;
    Ok(path)
}

/// Starts the operator as the chart's Deployment would run it, on 127.0.0.1.
async fn start_operator(
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
    let kubeconfig =
        service_account_kubeconfig(client, running, SYSTEM_NAMESPACE, &account, &dir).await?;
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

fn has_sidecar(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .any(|c| c.name == SIDECAR_CONTAINER_NAME)
    })
}

/// Creates the Deployment and waits for its pods to run with the sidecar injected.
async fn start_workload(client: &Client, config: &DemoConfig) -> anyhow::Result<Vec<Pod>> {
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
async fn start_sidecar(
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
    // emptyDir volumes get a directory each; the model cache is seeded from this machine's.
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = spec.volumes.iter().flatten().find(|v| v.name == mount.name);
        if volume.is_some_and(|v| v.empty_dir.is_some()) {
            let host_dir = dir.join("volumes").join(&mount.name);
            std::fs::create_dir_all(&host_dir)?;
            mounts.push(HostMount {
                mount_path: mount.mount_path.clone(),
                host_dir,
            });
        }
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
        service_account_kubeconfig(client, running, &namespace, &account, &dir).await?;
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

/// Waits until every pod's allocation in the policy's status carries `budget`.
async fn wait_for_allocation(
    policies: &Api<InferencePolicy>,
    name: &str,
    budget: f64,
    pods: usize,
) -> anyhow::Result<()> {
    wait_for(
        "the operator to re-split the budget",
        Duration::from_secs(60),
        || {
            let policies = policies.clone();
            let name = name.to_string();
            async move {
                let policy = policies.get(&name).await?;
                let allocations = policy.status.map(|s| s.allocations).unwrap_or_default();
                let done = allocations.len() >= pods
                    && allocations.iter().all(|a| {
                        a.joules_per_request
                            .is_some_and(|j| (j - budget).abs() <= 1e-6 * budget.max(1.0))
                    });
                Ok(done.then_some(()))
            }
        },
    )
    .await
}

/// The running figures of a phase, one line per answer.
struct Progress {
    total: usize,
    seen: std::sync::Mutex<Vec<(f64, usize, bool)>>,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            seen: Default::default(),
        }
    }

    fn show(&self, record: &Record) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        seen.push((record.joules, record.samples, record.correct));
        let n = seen.len() as f64;
        let joules = seen.iter().map(|s| s.0).sum::<f64>() / n;
        let depth = seen.iter().map(|s| s.1 as f64).sum::<f64>() / n;
        let right = seen.iter().filter(|s| s.2).count() as f64 / n;
        detail(&format!(
            "{:>3}/{} {:<28} {:<26} depth {:>2} {:>7.2} J {:<9} {}  | so far: {:.2} J/req, depth {:.2}, {:.0}% right",
            seen.len(),
            self.total,
            record.pod,
            record.item,
            record.samples,
            record.joules,
            if record.measured {
                "measured"
            } else {
                "estimated"
            },
            if record.correct { "right" } else { "wrong" },
            joules,
            depth,
            right * 100.0
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
