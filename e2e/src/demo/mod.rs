//! The one-command demo: the whole loop on a local cluster with a real node.
//!
//! A real control plane and one real node (kubelet, containerd, kube-proxy: see
//! [`ttc_cluster::node`]) that runs the project's container images; the Helm chart installed with its
//! defaults (two operator replicas from the operator image, the webhook called through the
//! chart's Service); a sample InferencePolicy and an inference Deployment in an opted-in
//! namespace, whose pods get the sidecar container, which serves the real default model from
//! the chart's model volume; a stream of questions with known answers; the budget changed with
//! `kubectl patch`; a summary, `kubectl get ipol`, the nodes and pods, and a plot at the end.
//! Everything it starts is stopped when the demo ends, fails or is interrupted: child processes
//! die with it, the node removes its pods and network, the state directory is temporary.

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
use ttc_api::InferencePolicy;
use ttc_api::labels::{INJECTION_ENABLED, INJECTION_NAMESPACE_LABEL};

use self::pods::{endpoints, operator_pods, start_workload};
use self::workload::{Phase, Record};
use std::net::{Ipv4Addr, SocketAddr};
use ttc_cluster::images::Images;
use ttc_cluster::node::{NodeConfig, model_volume};
use ttc_cluster::pki::NODE_IP;
use ttc_cluster::testing::eventually;
use ttc_cluster::{ClusterConfig, LocalCluster};
use ttc_eval::checker::CheckerServer;
use ttc_eval::tasks::TaskFamily;

/// Namespace of the inference workload (opted in to injection).
pub const NAMESPACE: &str = "ttc-demo";
/// Namespace of the chart's release.
pub const SYSTEM_NAMESPACE: &str = "ttc-system";
/// The Helm release (and the operator's object names).
pub const RELEASE: &str = "ttc-operator";
/// The model the demo serves (the default model, from the chart's model volume).
pub const MODEL: &str = "smollm2-135m-instruct";

/// What the demo needs and how it runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Control-plane binaries, kubectl and helm (the directory `e2e/controlplane/build.sh` prints).
    pub control_plane_bin: PathBuf,
    /// The container images (the directory `e2e/images/build.sh` prints).
    pub images: Images,
    /// The model file the sidecars serve (mounted into them through the chart's model volume).
    pub model_file: PathBuf,
    /// The repository root (chart, demo manifests).
    pub repo_root: PathBuf,
    /// Where the records, summary and plot go.
    pub out_dir: PathBuf,
    /// Inference pods per policy.
    pub replicas: u32,
    /// Questions per phase and policy.
    pub questions_per_phase: usize,
    /// The joules-per-request budget of each phase: the policy starts with the first, then is
    /// patched to each next one.
    pub budgets: Vec<f64>,
    /// Requests in flight at once, per policy.
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

/// Everything the demo started; dropped in this order (the cluster, then its state).
struct Running {
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
    validate(&config)?;
    let started = Instant::now();
    let running = start_cluster(&config).await?;
    let client = running.cluster.client().await?;
    install_chart(&running, &config, &client).await?;
    // The checking tool the `checked` policy's verifier calls, on the node's address (pods
    // reach the node at their gateway).
    let checker = CheckerServer::start_on(SocketAddr::from((NODE_IP.parse::<Ipv4Addr>()?, 0)))
        .await
        .context("starting the checking tool")?;
    let policies: Api<InferencePolicy> = Api::namespaced(client.clone(), NAMESPACE);
    let mut workloads = Vec::new();
    for mut workload in Workload::all() {
        apply_policy(&client, &config, &workload, &checker.url()).await?;
        step(&format!(
            "Creating the inference Deployment {} ({} {}): the webhook injects the sidecar, the kubelet starts it from its image",
            workload.name,
            config.replicas,
            if config.replicas == 1 {
                "replica"
            } else {
                "replicas"
            }
        ));
        let pods = start_workload(&client, &config, workload.name).await?;
        workload.endpoints = endpoints(&pods);
        for (pod, endpoint) in pods.iter().zip(&workload.endpoints) {
            detail(&format!(
                "{} on {} serving at {} ({})",
                pod.name_any(),
                pod.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                endpoint.url,
                containers(pod)
            ));
        }
        workloads.push(workload);
    }
    let views = write_cluster_views(&running, &config.out_dir)?;

    let records = run_phases(&running, &config, &workloads, &policies).await?;
    drop(checker);

    step("Waiting for the sidecars' next energy report to reach the operator (every 10 s)");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let get = run_tool(
        running
            .kubectl()
            .args(["-n", NAMESPACE, "get", "ipol", "-o", "wide"]),
    )?;
    println!("\n$ kubectl -n {NAMESPACE} get ipol -o wide\n{get}");
    for workload in &workloads {
        print_allocations(&policies, workload.name).await?;
    }

    step("Summary");
    let summaries = report::summarise(&records);
    print!("{}", report::table(&summaries));
    for line in report::changes(&summaries) {
        detail(&line);
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
    files.extend(views);
    for file in &files {
        detail(&format!("wrote {}", file.display()));
    }

    step(&format!(
        "Done in {:.0} s; stopping the node (its pods, network and rules) and the control plane",
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

fn validate(config: &DemoConfig) -> anyhow::Result<()> {
    anyhow::ensure!(!config.budgets.is_empty(), "give at least one budget");
    anyhow::ensure!(
        config.budgets.iter().all(|b| b.is_finite() && *b > 0.0),
        "budgets must be positive joules per request, got {:?}",
        config.budgets
    );
    anyhow::ensure!(config.replicas > 0, "replicas must be at least 1");
    anyhow::ensure!(
        config.model_file.is_file(),
        "the model file {} does not exist; fetch it with `ttc-sidecar fetch-model`",
        config.model_file.display()
    );
    Ok(())
}

/// The control plane and the real node, with the model directory the chart's volume offers.
async fn start_cluster(config: &DemoConfig) -> anyhow::Result<Running> {
    let state = tempfile::Builder::new()
        .prefix("ttc-demo.")
        .tempdir()
        .context("creating the demo's state directory")?;
    step(
        "Starting a local Kubernetes cluster: etcd, kube-apiserver, controller-manager, scheduler, and one real node (kubelet, containerd + runc, kube-proxy, pods on a CNI bridge of their own) with the project's images",
    );
    let cluster_dir = state.path().join("cluster");
    std::fs::create_dir_all(&cluster_dir)?;
    let mut cluster_config = ClusterConfig::new(&config.control_plane_bin, &cluster_dir);
    cluster_config.gpu_nodes = 0;
    cluster_config.node = Some(NodeConfig {
        images: config.images.clone(),
    });
    let cluster = LocalCluster::start(cluster_config)
        .await
        .context("starting the local cluster")?;
    detail(&format!(
        "API server {} (kubeconfig {}); images {}, {}",
        cluster.server_url(),
        cluster.kubeconfig().display(),
        config.images.operator,
        config.images.sidecar
    ));
    Ok(Running {
        cluster,
        state,
        tools: config.control_plane_bin.clone(),
    })
}

/// The namespace of the inference pods, and the chart with its defaults (two operator replicas
/// from the image, the webhook through the Service) plus the model volume and the sidecars'
/// read access to their policy.
async fn install_chart(
    running: &Running,
    config: &DemoConfig,
    client: &kube::Client,
) -> anyhow::Result<()> {
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

    step("Installing the Helm chart charts/ttc-operator");
    let (models, _) = model_volume(running.state.path(), &config.model_file)?;
    let chart = config.repo_root.join("charts/ttc-operator");
    let sets = [
        // Quicker than the defaults, for a demo of minutes.
        "operator.resyncSeconds=5".to_string(),
        "operator.staleSeconds=30".into(),
        // The model directory of the node, offered to the demo namespace as a claim.
        format!("model.hostPath={}", models.display()),
        format!("model.namespaces={{{NAMESPACE}}}"),
        format!("sidecar.rbac.bindings[0].namespace={NAMESPACE}"),
        "sidecar.rbac.bindings[0].serviceAccount=default".into(),
    ];
    let mut helm = running.helm();
    helm.args(["install", RELEASE]).arg(&chart).args([
        "--namespace",
        SYSTEM_NAMESPACE,
        "--create-namespace",
        "--wait",
        "--timeout",
        "5m",
    ]);
    for set in &sets {
        helm.args(["--set", set]);
    }
    detail(&format!(
        "helm install {RELEASE} charts/ttc-operator -n {SYSTEM_NAMESPACE} --create-namespace --wait --set {}",
        sets.join(" --set ")
    ));
    run_tool(&mut helm).context("helm install")?;
    let operators = operator_pods(client).await?;
    detail(&format!(
        "the operator runs from its image: {} (one holds the Lease); the API server calls its webhook through the Service {RELEASE}.{SYSTEM_NAMESPACE}.svc",
        operators.join(", ")
    ));
    Ok(())
}

/// One inference service of the demo: its policy (and Deployment, and pods' label `app`), the
/// manifest of the policy, the families of questions it is asked, and its pods once they serve.
struct Workload {
    name: &'static str,
    manifest: &'static str,
    what: &'static str,
    families: &'static [TaskFamily],
    endpoints: Vec<workload::Endpoint>,
}

impl Workload {
    /// `chat`, where a vote over samples buys little, and `checked`, where best-of-N with a
    /// checking tool buys accuracy.
    fn all() -> [Workload; 2] {
        [
            Workload {
                name: "chat",
                manifest: "e2e/demo/policy.yaml",
                what: "adaptive vote over 1-8 samples, mixed questions",
                families: &workload::FAMILIES,
                endpoints: Vec::new(),
            },
            Workload {
                name: "checked",
                manifest: "e2e/demo/checked-policy.yaml",
                what: "best-of-N (1-8 samples) with the checking tool as verifier, questions a tool can check",
                families: &workload::CHECKED_FAMILIES,
                endpoints: Vec::new(),
            },
        ]
    }
}

/// Applies the workload's policy with the first budget (a verifier pointed at `checker_url`)
/// and waits until it is Ready.
async fn apply_policy(
    client: &kube::Client,
    config: &DemoConfig,
    workload: &Workload,
    checker_url: &str,
) -> anyhow::Result<()> {
    step(&format!(
        "Applying the InferencePolicy {} ({}; budget {} J/request)",
        workload.manifest, workload.what, config.budgets[0]
    ));
    let policies = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource::erase::<InferencePolicy>(&()),
    );
    let mut policy: DynamicObject = serde_yaml::from_str(&std::fs::read_to_string(
        config.repo_root.join(workload.manifest),
    )?)?;
    policy.data["spec"]["budget"]["joulesPerRequest"] = json!(config.budgets[0]);
    if policy.data["spec"]["ttc"]["verifier"]["http"].is_object() {
        policy.data["spec"]["ttc"]["verifier"]["http"]["url"] = json!(checker_url);
        detail(&format!("its verifier: the checking tool at {checker_url}"));
    }
    let policy_name = policy.name_any();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .with_context(|| format!("creating the InferencePolicy {policy_name}"))?;
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
    Ok(())
}

fn containers(pod: &k8s_openapi::api::core::v1::Pod) -> String {
    pod.spec
        .as_ref()
        .map(|s| {
            s.containers
                .iter()
                .map(|c| format!("{} {}", c.name, c.image.as_deref().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// `kubectl get nodes -o wide` and `kubectl get pods -A -o wide` while the pods serve, into
/// `nodes.txt` and `pods.txt`.
fn write_cluster_views(
    running: &Running,
    out_dir: &std::path::Path,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut files = Vec::new();
    for (name, args) in [
        ("nodes.txt", &["get", "nodes", "-o", "wide"][..]),
        ("pods.txt", &["get", "pods", "-A", "-o", "wide"][..]),
    ] {
        let text = run_tool(running.kubectl().args(args))?;
        println!("\n$ kubectl {}\n{text}", args.join(" "));
        let path = out_dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        files.push(path);
    }
    Ok(files)
}

/// Each budget in turn: patch every policy (after the first), wait for the operator to re-split
/// them, then ask the phase's questions of every workload at once.
async fn run_phases(
    running: &Running,
    config: &DemoConfig,
    workloads: &[Workload],
    policies: &Api<InferencePolicy>,
) -> anyhow::Result<Vec<Record>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let total = config.questions_per_phase * config.budgets.len();
    let mut plans = Vec::new();
    for workload in workloads {
        let first = workload
            .endpoints
            .first()
            .with_context(|| format!("no {} pod to ask", workload.name))?;
        let model = workload::served_model(&http, first).await?;
        let questions = workload::questions(workload.families, total, config.seed);
        plans.push((workload, model, questions));
    }
    let stream_started = Instant::now();
    let mut records: Vec<Record> = Vec::new();
    for (index, budget) in config.budgets.iter().copied().enumerate() {
        if index > 0 {
            step(&format!("Changing the budget to {budget} J/request"));
            let patch = json!({"spec": {"budget": {"joulesPerRequest": budget}}}).to_string();
            for workload in workloads {
                detail(&format!(
                    "kubectl -n {NAMESPACE} patch ipol {} --type merge -p '{patch}'",
                    workload.name
                ));
                run_tool(running.kubectl().args([
                    "-n",
                    NAMESPACE,
                    "patch",
                    "ipol",
                    workload.name,
                    "--type",
                    "merge",
                    "-p",
                    &patch,
                ]))?;
            }
            for workload in workloads {
                wait_for_allocation(policies, workload.name, budget, workload.endpoints.len())
                    .await?;
            }
            detail("the operator re-split the budgets; the sidecars follow their policy's status");
            // The sidecars see the status through their watch; give it a moment.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        step(&format!(
            "Phase {} of {}: {} questions per policy at {budget} J/request, {} in flight per policy",
            index + 1,
            config.budgets.len(),
            config.questions_per_phase,
            config.concurrency
        ));
        let progress = Progress::new(config.questions_per_phase * plans.len());
        let show = |record: &Record| progress.show(record);
        let drives = plans.iter().map(|(workload, model, questions)| {
            let items = &questions
                [index * config.questions_per_phase..(index + 1) * config.questions_per_phase];
            workload::drive(
                &http,
                &workload.endpoints,
                model,
                Phase {
                    policy: workload.name,
                    index,
                    budget_joules_per_request: budget,
                    items,
                },
                config.concurrency,
                stream_started,
                &show,
            )
        });
        for phase_records in futures::future::try_join_all(drives).await? {
            records.extend(phase_records);
        }
    }
    records.sort_by(|a, b| a.at_seconds.total_cmp(&b.at_seconds));
    Ok(records)
}

async fn print_allocations(policies: &Api<InferencePolicy>, name: &str) -> anyhow::Result<()> {
    let current = policies.get(name).await?;
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
    Ok(())
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

/// The running figures of a phase, one line per answer, with each policy's figures so far.
struct Progress {
    total: usize,
    /// Per policy: joules, samples and rightness of each answer.
    seen: std::sync::Mutex<std::collections::BTreeMap<String, Vec<Seen>>>,
}

/// One answer's joules, samples and rightness.
type Seen = (f64, usize, bool);

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
        let answered = seen.values().map(Vec::len).sum::<usize>() + 1;
        let policy = seen.entry(record.policy.clone()).or_default();
        policy.push((record.joules, record.samples, record.correct));
        let n = policy.len() as f64;
        let joules = policy.iter().map(|s| s.0).sum::<f64>() / n;
        let depth = policy.iter().map(|s| s.1 as f64).sum::<f64>() / n;
        let right = policy.iter().filter(|s| s.2).count() as f64 / n;
        detail(&format!(
            "{:>3}/{} {:<30} {:<30} depth {:>2} {:>7.2} J {:<9} {:<5} | {} so far: {:.2} J/req, depth {:.2}, {:.0}% right",
            answered,
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
            record.policy,
            joules,
            depth,
            right * 100.0
        ));
    }
}
