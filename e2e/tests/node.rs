//! The chart on a real node, as a platform team runs it: `helm install` with the chart's defaults
//! starts the operator Deployment (2 replicas) from its image on a kubelet; the API server calls
//! the mutating webhook through the chart's Service; an inference Deployment in an opted-in
//! namespace gets the sidecar, which starts from its image, passes its probes, serves the
//! default model from the chart's model volume and reports its energy to the operator, whose
//! policy status shows it; the sidecar and then the leading operator killed with `SIGKILL`, and
//! kube-apiserver restarted, are ridden out (figures printed; docs/reliability.md has them);
//! `helm upgrade` rolls the operator without losing the lease or the
//! statuses; `helm rollback` restores the values; a namespace under Pod Security `restricted`
//! admits injected pods; `helm uninstall` leaves nothing of the release behind but what Helm
//! keeps by design (the CRD, and the policies that are its objects).
//!
//! Starts a cluster of its own with the real node (see `ttc_cluster::node`), so it needs root,
//! `TTC_CONTROL_PLANE_BIN` (with kubelet, kube-proxy and crictl), `TTC_IMAGES_DIR` and the default
//! model at `TTC_DEFAULT_MODEL_FILE`; `e2e/test.sh` provides all three.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use ttc_cluster::images::Images;
use ttc_cluster::node::{NodeConfig, model_volume};
use ttc_cluster::pki::NODE_NAME;
use ttc_cluster::testing::{BIN_DIR_ENV, ask_sidecar, eventually};
use ttc_cluster::{ClusterConfig, LocalCluster};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const RELEASE: &str = "ttc";
const SYSTEM: &str = "ttc-system";
const APPS: &str = "ml";
const RESTRICTED: &str = "ml-restricted";
const INSTANCE: &str = "app.kubernetes.io/instance=ttc";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// kubectl and helm against the node's cluster.
struct Tools {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Tools {
    fn command(&self, tool: &str, args: &[&str]) -> Command {
        let mut command = Command::new(self.bin.join(tool));
        command.args(args).env("KUBECONFIG", &self.kubeconfig);
        command
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let out = self
            .command(tool, args)
            .output()
            .map_err(|e| format!("{tool} {args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `helm` on the release's namespace, waiting (5 minutes at most) for what it changes.
    fn helm(&self, args: &[&str]) -> Result<String, String> {
        let mut all = args.to_vec();
        all.extend(["--namespace", SYSTEM, "--wait", "--timeout", "5m"]);
        self.run("helm", &all)
    }

    fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.run("kubectl", args)
    }

    fn get(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = vec!["get", "-o", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.kubectl(&all)?).map_err(|e| e.to_string())
    }

    fn apply(&self, manifest: &Value) -> Result<String, String> {
        let mut child = self
            .command("kubectl", &["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        use std::io::Write as _;
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(manifest.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What the cluster says about pods, for failure messages.
    fn describe(&self, namespace: &str) -> String {
        let pods = self.kubectl(&["get", "pods", "-o", "wide", "-n", namespace]);
        let events = self.kubectl(&["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"]);
        format!(
            "{}\n{}",
            pods.unwrap_or_else(|e| e),
            events.unwrap_or_else(|e| e)
        )
    }
}

fn items(list: &Value) -> Vec<Value> {
    list["items"].as_array().cloned().unwrap_or_default()
}

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn inference_deployment(namespace: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "chat"}},
            "template": {
                "metadata": {"labels": {"app": "chat"}},
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": true,
                        "seccompProfile": {"type": "RuntimeDefault"}
                    },
                    // The application: any container; the pause image is the one at hand.
                    "containers": [{
                        "name": "app",
                        "image": "registry.k8s.io/pause:3.10",
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "capabilities": {"drop": ["ALL"]},
                            "runAsUser": 65535
                        }
                    }]
                }
            }
        }
    })
}

fn policy(namespace: &str, model_file: &str) -> Value {
    json!({
        "apiVersion": "energy.ttc.dev/v1alpha1",
        "kind": "InferencePolicy",
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "chat"}},
            "budget": {"joulesPerRequest": 5, "windowSeconds": 300},
            "ttc": {"strategy": "Adaptive", "minSamples": 1, "maxSamples": 4},
            "model": {"path": format!("/models/{model_file}"), "volumeClaim": "ttc-models"}
        }
    })
}

/// The running pod of `chat` in `namespace` whose sidecar is ready.
async fn serving_pod(tools: &Tools, namespace: &str) -> Result<Value, String> {
    eventually(
        &format!("an injected chat pod in {namespace} is ready"),
        Duration::from_secs(300),
        || async {
            let pods = items(&tools.get(&["pods", "-n", namespace, "-l", "app=chat"])?);
            Ok(pods
                .into_iter()
                .find(|p| ready(p) && p["metadata"]["deletionTimestamp"].is_null()))
        },
    )
    .await
    .map_err(|e| format!("{e}\n{}", tools.describe(namespace)))
}

async fn operator_pods_ready(tools: &Tools, want: usize) -> Result<Vec<Value>, String> {
    eventually(
        &format!("{want} ready operator pods"),
        Duration::from_secs(180),
        || async {
            let pods = items(&tools.get(&["pods", "-n", SYSTEM, "-l", INSTANCE])?);
            let live: Vec<Value> = pods
                .into_iter()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .collect();
            Ok((live.len() == want && live.iter().all(ready)).then_some(live))
        },
    )
    .await
    .map_err(|e| format!("{e}\n{}", tools.describe(SYSTEM)))
}

fn lease_holder(tools: &Tools) -> Result<String, String> {
    let lease = tools.get(&["lease", "-n", SYSTEM, "ttc-ttc-operator"])?;
    Ok(lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

fn names(pods: &[Value]) -> Vec<String> {
    pods.iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .collect()
}

fn restarts(pod: &Value, container: &str) -> u64 {
    pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == container)
        .and_then(|c| c["restartCount"].as_u64())
        .unwrap_or(0)
}

fn name_of(pod: &Value) -> String {
    pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The pod once its killed `container` is restarted (once) and the pod ready again.
async fn restarted_once(
    tools: &Tools,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Result<Value, String> {
    let back = eventually(
        &format!("{container} of {pod} restarted and ready"),
        Duration::from_secs(180),
        || async {
            let pod = tools.get(&["pod", "-n", namespace, pod])?;
            Ok((restarts(&pod, container) >= 1 && ready(&pod)).then_some(pod))
        },
    )
    .await
    .map_err(|e| format!("{e}\n{}", tools.describe(namespace)))?;
    match restarts(&back, container) {
        1 => Ok(back),
        n => Err(format!(
            "{container} of {pod} restarted {n} times, not once: {back}"
        )),
    }
}

/// The sidecar killed with `SIGKILL`: the kubelet restarts it, it is ready and serves again, and
/// the policy's figures go on from what was reported before: a restarted sidecar counts from
/// zero, and the operator carries what its last process reported over (nothing counted twice,
/// nothing reported lost).
async fn sidecar_killed(
    tools: &Tools,
    node: &ttc_cluster::node::RealNode,
    http: &reqwest::Client,
    pod: &Value,
    before: &Value,
) -> TestResult {
    let name = name_of(pod);
    let requests_before = before["requests"].as_u64().unwrap_or(0);
    let killed_at = Instant::now();
    let pid = node.kill_container(APPS, &name, "ttc-sidecar")?;
    let back = restarted_once(tools, APPS, &name, "ttc-sidecar").await?;
    let ready_after = killed_at.elapsed();
    let ip = back["status"]["podIP"].as_str().unwrap_or_default();
    for question in ["What is 1 + 1?", "Name a fruit."] {
        ask_sidecar(http, &format!("http://{ip}:8090"), question, 16).await?;
    }
    let requests_after = requests_before + 2;
    let after = eventually(
        "the policy counts the requests of both processes",
        Duration::from_secs(90),
        || async {
            let policy = tools.get(&["inferencepolicy", "-n", APPS, "chat"])?;
            let observed = policy["status"]["observed"].clone();
            Ok((observed["requests"].as_u64() >= Some(requests_after)).then_some(observed))
        },
    )
    .await?;
    println!(
        "sidecar (pid {pid}) killed: restarted and ready in {ready_after:.1?}; policy counts {} \
         requests ({requests_before} before the kill, 2 after), {} J (was {} J)",
        after["requests"], after["joules"], before["joules"]
    );
    assert_eq!(after["requests"].as_u64(), Some(requests_after), "{after}");
    assert!(
        after["joules"].as_f64() > before["joules"].as_f64(),
        "{after} after {before}"
    );
    Ok(())
}

/// The leading operator replica killed with `SIGKILL`, and a policy changed while it is down:
/// leadership resumes within the lease's duration and grace (15 s + 5 s), either in the killed
/// pod's restarted container (the lease names the pod, and the kubelet restarts it at once) or in
/// the other replica, and the change is reconciled.
async fn operator_leader_killed(tools: &Tools, node: &ttc_cluster::node::RealNode) -> TestResult {
    let leader = lease_holder(tools)?;
    let killed_at = Instant::now();
    node.kill_container(SYSTEM, &leader, "operator")?;
    change_policy_and_wait(tools, 6, "the change made while the leader was down").await?;
    let converged = killed_at.elapsed();
    let holder = lease_holder(tools)?;
    restarted_once(tools, SYSTEM, &leader, "operator").await?;
    let resumed_by = if holder == leader {
        "its restarted container"
    } else {
        "the other replica"
    };
    println!(
        "operator leader {leader} killed: a change made meanwhile reconciled after \
         {converged:.1?}, the lease held by {resumed_by} ({holder}); the killed container ready \
         again after {:.1?}",
        killed_at.elapsed()
    );
    assert!(
        converged <= Duration::from_secs(25),
        "reconciled after {converged:?} (lease duration 15 s, grace 5 s)"
    );
    Ok(())
}

/// Changes the policy's budget to `joules` per request and waits (60 s at most) until the
/// operator has reconciled the change.
async fn change_policy_and_wait(tools: &Tools, joules: u32, what: &str) -> TestResult {
    let patch = format!(r#"{{"spec":{{"budget":{{"joulesPerRequest":{joules}}}}}}}"#);
    let merge = [
        "patch",
        "inferencepolicy",
        "-n",
        APPS,
        "chat",
        "--type=merge",
        "-p",
    ];
    tools.kubectl(&[&merge[..], &[patch.as_str()]].concat())?;
    let policy = tools.get(&["inferencepolicy", "-n", APPS, "chat"])?;
    let generation = policy["metadata"]["generation"].as_i64().unwrap_or(0);
    eventually(
        &format!("{what} is reconciled"),
        Duration::from_secs(60),
        || async {
            let policy = tools.get(&["inferencepolicy", "-n", APPS, "chat"])?;
            Ok((policy["status"]["observedGeneration"].as_i64() >= Some(generation)).then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// kube-apiserver killed, down 10 s, started again (etcd kept): the operator's pods reach it
/// through the `kubernetes` Service as any in-cluster client does, and their watches resume, so
/// a policy changed after the restart is reconciled within 30 s.
async fn api_server_restarted(tools: &Tools, cluster: &mut LocalCluster) -> TestResult {
    cluster.kill("kube-apiserver")?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let restarting = Instant::now();
    cluster
        .restart("kube-apiserver", Duration::from_secs(120))
        .await?;
    let ready = restarting.elapsed();
    let changed = Instant::now();
    change_policy_and_wait(tools, 7, "a change after the API server restart").await?;
    let converged = changed.elapsed();
    println!(
        "kube-apiserver killed, 10 s down: ready {ready:.1?} after its start; a change made then \
         reconciled after {converged:.1?}"
    );
    assert!(
        converged <= Duration::from_secs(30),
        "the change was reconciled {converged:?} after the API server restart"
    );
    operator_pods_ready(tools, 2).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_runs_from_images_on_a_real_node() -> TestResult {
    let bin = PathBuf::from(
        std::env::var_os(BIN_DIR_ENV)
            .ok_or("TTC_CONTROL_PLANE_BIN is not set (e2e/test.sh sets it)")?,
    );
    let images = Images::from_env()?;
    let dir = tempfile::tempdir()?;
    let model = PathBuf::from(std::env::var("TTC_DEFAULT_MODEL_FILE").map_err(
        |_| "TTC_DEFAULT_MODEL_FILE is not set (e2e/test.sh sets it to the fetched default model)",
    )?);
    let (models, model_file) = model_volume(dir.path(), &model)?;
    let state = dir.path().join("cluster");
    std::fs::create_dir_all(&state)?;
    let mut config = ClusterConfig::new(&bin, &state);
    config.gpu_nodes = 0;
    config.node = Some(NodeConfig {
        images: images.clone(),
    });
    let started = Instant::now();
    let mut cluster = LocalCluster::start(config).await?;
    println!(
        "cluster with a real node ready in {:.0?}",
        started.elapsed()
    );
    let tools = Tools {
        bin: bin.clone(),
        kubeconfig: cluster.kubeconfig().to_path_buf(),
    };

    // The namespace of the inference pods, opted in.
    tools.kubectl(&["create", "namespace", APPS])?;
    tools.kubectl(&[
        "label",
        "namespace",
        APPS,
        "energy.ttc.dev/injection=enabled",
    ])?;

    // Install: the chart's defaults, plus the model directory of the nodes and the sidecar's
    // read access to its policy in the apps namespace.
    let chart = repo_root().join("charts/ttc-operator");
    let chart = chart.to_string_lossy();
    let models_value = format!("model.hostPath={}", models.display());
    let bindings =
        format!(r#"sidecar.rbac.bindings=[{{"namespace":"{APPS}","serviceAccount":"default"}}]"#);
    let namespaces = format!("model.namespaces={{{APPS},{RESTRICTED}}}");
    tools.kubectl(&["create", "namespace", RESTRICTED])?;
    let install_started = Instant::now();
    tools.helm(&[
        "install",
        RELEASE,
        &chart,
        "--create-namespace",
        "--set",
        &models_value,
        "--set",
        &namespaces,
        "--set-json",
        &bindings,
    ])?;
    let operators = operator_pods_ready(&tools, 2).await?;
    println!("helm install --wait: {:.0?}", install_started.elapsed());
    for pod in &operators {
        assert_eq!(pod["spec"]["nodeName"], NODE_NAME, "{pod}");
        assert_eq!(
            pod["spec"]["containers"][0]["image"],
            images.operator.as_str()
        );
        assert_eq!(pod["status"]["containerStatuses"][0]["ready"], true);
    }
    let holder = eventually(
        "an operator holds the lease",
        Duration::from_secs(60),
        || async {
            let holder = lease_holder(&tools).unwrap_or_default();
            Ok(names(&operators).contains(&holder).then_some(holder))
        },
    )
    .await?;
    println!("lease held by {holder}");

    // A policy and its inference Deployment: the API server calls the webhook through the
    // chart's Service, which injects the sidecar.
    tools.apply(&policy(APPS, &model_file))?;
    tools.apply(&inference_deployment(APPS))?;
    let pod = serving_pod(&tools, APPS).await?;
    let containers: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        containers.contains(&"ttc-sidecar"),
        "the webhook injected no sidecar: {containers:?}"
    );
    let sidecar = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "ttc-sidecar")
        .cloned()
        .unwrap_or_default();
    assert_eq!(sidecar["image"], images.sidecar.as_str());
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert!(sidecar[probe].is_object(), "the sidecar has no {probe}");
    }

    // Requests to the sidecar at the pod's address.
    let ip = pod["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    for question in ["What is 2 + 3?", "Name a colour.", "What is 7 - 4?"] {
        let answer = ask_sidecar(&http, &format!("http://{ip}:8090"), question, 16).await?;
        assert!(
            answer["choices"][0]["message"]["content"].is_string(),
            "{answer}"
        );
        assert!(
            answer["usage"]["energy"]["joules"].as_f64().unwrap_or(0.0) > 0.0,
            "{answer}"
        );
    }

    // The sidecar's authenticated reports reach the policy's status.
    let observed = eventually(
        "the policy's status shows the pod's reports",
        Duration::from_secs(90),
        || async {
            let policy = tools.get(&["inferencepolicy", "-n", APPS, "chat"])?;
            let observed = &policy["status"]["observed"];
            Ok((observed["reportingPods"].as_u64() >= Some(1)
                && observed["requests"].as_u64() >= Some(3))
            .then(|| observed.clone()))
        },
    )
    .await
    .map_err(|e| format!("{e}\n{}", tools.describe(APPS)))?;
    println!("policy status: {observed}");
    assert_eq!(
        observed["source"], "estimate",
        "no GPU here: the energy is estimated"
    );

    // Faults on the node, first the sidecar killed as the OOM killer would kill it.
    let node = cluster.node().ok_or("the cluster has no real node")?;
    sidecar_killed(&tools, node, &http, &pod, &observed).await?;
    // Then the leading operator replica.
    operator_leader_killed(&tools, node).await?;
    // Then the API server, under the operator's pods and the kubelet alike.
    api_server_restarted(&tools, &mut cluster).await?;

    // Upgrade with a changed value: the operator rolls, the lease and the statuses stay.
    let before = tools.get(&["inferencepolicy", "-n", APPS, "chat"])?["status"].clone();
    tools.helm(&[
        "upgrade",
        RELEASE,
        &chart,
        "--reuse-values",
        "--set",
        "operator.logLevel=debug",
    ])?;
    let rolled = operator_pods_ready(&tools, 2).await?;
    let rolled_names = names(&rolled);
    assert!(
        rolled_names.iter().all(|n| !names(&operators).contains(n)),
        "the upgrade rolled no pod: {rolled_names:?}"
    );
    let holder = eventually(
        "a new operator holds the lease",
        Duration::from_secs(60),
        || async {
            let holder = lease_holder(&tools).unwrap_or_default();
            Ok(rolled_names.contains(&holder).then_some(holder))
        },
    )
    .await?;
    let after = tools.get(&["inferencepolicy", "-n", APPS, "chat"])?["status"].clone();
    assert_eq!(after["injectedPods"], before["injectedPods"], "{after}");
    // The new leader has heard little or nothing yet: it keeps what was observed instead of
    // reporting "no reports" (or 0 W) until it has measured the pods itself.
    assert!(after["observed"]["joules"].as_f64() > Some(0.0), "{after}");
    assert!(
        after["observed"]["reportingPods"].as_u64() >= Some(1),
        "{after}"
    );
    println!("after the upgrade: lease held by {holder}; status kept");
    let config = tools.get(&["configmap", "-n", SYSTEM, "ttc-ttc-operator"])?;
    assert_eq!(config["data"]["RUST_LOG"], "debug");

    // Rollback restores the values (and rolls again).
    tools.helm(&["rollback", RELEASE, "1"])?;
    let config = tools.get(&["configmap", "-n", SYSTEM, "ttc-ttc-operator"])?;
    assert_ne!(config["data"]["RUST_LOG"], "debug");
    operator_pods_ready(&tools, 2).await?;

    // Pod Security `restricted` admits injected pods.
    tools.kubectl(&[
        "label",
        "namespace",
        RESTRICTED,
        "energy.ttc.dev/injection=enabled",
        "pod-security.kubernetes.io/enforce=restricted",
    ])?;
    tools.kubectl(&[
        "create",
        "rolebinding",
        "ttc-sidecar",
        "-n",
        RESTRICTED,
        "--clusterrole=ttc-ttc-operator-sidecar",
        &format!("--serviceaccount={RESTRICTED}:default"),
    ])?;
    tools.apply(&policy(RESTRICTED, &model_file))?;
    tools.apply(&inference_deployment(RESTRICTED))?;
    let restricted = serving_pod(&tools, RESTRICTED).await?;
    assert!(
        restricted["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"] == "ttc-sidecar"),
        "{restricted}"
    );

    // Uninstall: nothing of the release is left but the CRD (kept by Helm by design) and the
    // policies (objects of that CRD, owned by their namespaces). The inference workloads go
    // first: their pods hold the chart's model claims, which are deleted only once unused.
    for namespace in [APPS, RESTRICTED] {
        tools.kubectl(&[
            "delete",
            "deployment",
            "chat",
            "-n",
            namespace,
            "--cascade=foreground",
            "--timeout=120s",
        ])?;
    }
    tools.helm(&["uninstall", RELEASE])?;
    let namespaced = "deployments,replicasets,pods,services,endpoints,configmaps,secrets,\
                      serviceaccounts,roles,rolebindings,poddisruptionbudgets,\
                      persistentvolumeclaims,networkpolicies";
    let left = eventually("nothing of the release is left", Duration::from_secs(120), || async {
        let mut left = Vec::new();
        for scope in [
            vec!["-A", namespaced],
            vec!["clusterroles,clusterrolebindings,mutatingwebhookconfigurations,persistentvolumes"],
        ] {
            let mut args = vec!["-l", INSTANCE];
            args.extend(scope);
            left.extend(names(&items(&tools.get(&args)?)));
        }
        Ok(left.is_empty().then_some(()))
    })
    .await;
    left?;
    tools.get(&["crd", "inferencepolicies.energy.ttc.dev"])?;
    cluster.stop(Duration::from_secs(10))?;
    Ok(())
}
