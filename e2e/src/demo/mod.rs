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
mod operator;
mod pods;
pub mod report;
pub mod workload;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::json;
use ttc_crds::InferencePolicy;
use ttc_crds::labels::{INJECTION_ENABLED, INJECTION_NAMESPACE_LABEL};

use self::operator::{OperatorPorts, start_operator};
use self::pods::{start_sidecar, start_workload};
use self::workload::{Phase, Record};
use crate::process::Component;
use crate::testing::{eventually, free_port};
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

/// [`eventually`] for checks that fail with `anyhow` errors.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    eventually(what, limit, || {
        let checked = check();
        async move { checked.await.map_err(|e| format!("{e:#}")) }
    })
    .await
    .map_err(anyhow::Error::msg)
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
        // Sidecars authenticate their reports with pod-bound tokens (played kubelet: pods.rs).
        "operator.reportAuth=token-review".into(),
        format!("operator.ports.admin={}", ports.admin),
        format!("operator.ports.webhook={}", ports.webhook),
        format!("operator.ports.receiver={}", ports.receiver),
        // The API server reaches the local operator by URL, the sidecars its receiver directly.
        format!("webhook.url=https://127.0.0.1:{}/mutate", ports.webhook),
        // Over TLS (operator.receiverTls, on by default): the chart's certificate names
        // 127.0.0.1 for the webhook URL, and the sidecars get its CA.
        format!("sidecar.otlpEndpoint=https://127.0.0.1:{}", ports.receiver),
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
        workload::wait_until_up(&http, &format!("{admin}/readyz"), Duration::from_secs(60))
            .await
            .is_ok();
    if let Some(operator) = running.operator.as_mut() {
        operator.check_running()?;
        anyhow::ensure!(
            operator_up,
            "the operator did not become ready within 60 s; its log:\n{}",
            operator.tail()
        );
    }
    detail(&format!(
        "ready: webhook https://127.0.0.1:{}, report receiver https://127.0.0.1:{}, metrics {admin}/metrics",
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
        .await
        .is_ok();
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
