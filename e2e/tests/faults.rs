//! The operator under faults. One control plane of this test's own (its API server and etcd are
//! killed and started again here, so it cannot be the shared one), two operator replicas as
//! processes of the `ttc-operator` binary, and five faults in turn, each measured:
//!
//! 1. the leader is killed (`SIGKILL`) while it reconciles 1,000 new policies: the other replica
//!    takes the lease within its duration and converges every policy; events lost and doubled;
//! 2. kube-apiserver is killed and started again (etcd kept): the watches resume (spec changes
//!    made after the restart are reconciled), errors stay bounded, statuses converge;
//! 3. etcd is killed and started again (its data kept): the same;
//! 4. the webhook is configured but nothing answers at its address: pods are created without the
//!    sidecar, at once (`failurePolicy: Ignore`), and the policy reports them;
//! 5. the report receiver is unreachable from a pod for a minute: the policy reports stale
//!    energy, then fresh again, and no joule or request is counted twice.
//!
//! Prints a table of figures at the end. Needs `TTC_CONTROL_PLANE_BIN` (see `e2e/test.sh`) and
//! the `ttc-operator` binary of this build (`cargo build -p ttc-operator`; `cargo test
//! --workspace` builds it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use ttc_api::{EnergyReport, EnergySource, InferencePolicy, InferencePolicyStatus};
use ttc_cluster::process::Component;
use ttc_cluster::testing::{eventually, free_port, install_crd, wait_for_default_service_account};
use ttc_cluster::{ClusterConfig, LocalCluster};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The operator's namespace: its Lease lives here.
const SYSTEM: &str = "ttc-system";
/// The Lease both replicas compete for.
const LEASE: &str = "ttc-operator";
/// The operator's lease duration and grace (`operator/src/run.rs`): a replica that stops renewing
/// loses the lease after at most this long.
const LEASE_SECONDS: u64 = 15 + 5;
/// Policies reconciled when the leader is killed.
const POLICIES: usize = 1000;
/// How long the API server and etcd stay down.
const OUTAGE: Duration = Duration::from_secs(10);
/// How long policies changed after an API server or etcd restart may take to be reconciled. After
/// an API server restart the operator's watches find their resource versions expired and list
/// again: 7.9-8.9 s measured (docs/reliability.md), two 5-second back-offs and the list. It
/// was 80-150 s with kube-runtime's default back-off, and 27-40 s while a listed policy could be
/// reconciled before the store held the new list (then not again until its resync, every 15 s).
const RESTART_CONVERGENCE: Duration = Duration::from_secs(20);
/// How long the receiver stays unreachable.
const RECEIVER_OUTAGE: Duration = Duration::from_secs(60);
/// How long the status may take to show what the reports say (fresh, stale, fresh again).
const REPORT_LIMIT: Duration = Duration::from_secs(90);
/// Staleness of reports, and the window of the reporting policy (seconds).
const STALE_SECONDS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_rides_out_faults() -> TestResult {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bin = PathBuf::from(
        std::env::var_os("TTC_CONTROL_PLANE_BIN")
            .ok_or("TTC_CONTROL_PLANE_BIN is not set (e2e/test.sh sets it)")?,
    );
    let operator_bin = operator_binary()?;
    let keep = std::env::var_os(ttc_cluster::testing::KEEP_ENV).is_some();
    let dir = tempfile::Builder::new()
        .prefix("ttc-faults")
        .disable_cleanup(keep)
        .tempdir()?;
    if keep {
        println!("state and logs kept in {}", dir.path().display());
    }
    let state = dir.path().join("cluster");
    std::fs::create_dir_all(&state)?;
    let mut config = ClusterConfig::new(&bin, &state);
    config.gpu_nodes = 0;
    let mut cluster = LocalCluster::start(config).await?;
    let client = cluster.client().await?;
    install_crd(&client).await?;
    create_namespace(&client, SYSTEM, false).await?;

    let dead_webhook = free_port()?;
    let logs = dir.path().join("operator-logs");
    std::fs::create_dir_all(&logs)?;
    let replica = |identity: &str| {
        Replica::start(
            &operator_bin,
            cluster.kubeconfig(),
            identity,
            &logs,
            dead_webhook,
        )
    };
    let mut figures = Vec::new();

    // 1. The leader killed amid 1,000 new policies.
    let mut first = replica("replica-a")?;
    holder_becomes(&client, &first.identity, Duration::from_secs(60)).await?;
    let mut second = replica("replica-b")?;
    second.ready(Duration::from_secs(60)).await?;
    figures.extend(leader_killed(&client, &mut first, &second).await?);

    // 2 and 3. The API server, then etcd, killed and started again.
    for (component, batch) in [("kube-apiserver", 0..20), ("etcd", 20..40)] {
        let errors_before = second.metric("ttc_operator_reconcile_errors_total").await?;
        cluster.kill(component)?;
        tokio::time::sleep(OUTAGE).await;
        let restarting = Instant::now();
        cluster.restart(component, Duration::from_secs(120)).await?;
        let ready = restarting.elapsed();
        let client = cluster.client().await?;
        let policies: Api<InferencePolicy> = Api::namespaced(client.clone(), "faults-failover");
        let changed = Instant::now();
        for i in batch.clone() {
            policies
                .patch(
                    &policy_name(i),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"budget": {"joulesPerRequest": 7.0}}})),
                )
                .await?;
        }
        let names: Vec<String> = batch.map(policy_name).collect();
        let reconciled = eventually(
            &format!("the changed policies reconciled after the {component} restart"),
            RESTART_CONVERGENCE,
            || {
                let policies = policies.clone();
                let names = names.clone();
                async move {
                    for name in &names {
                        let p = policies.get(name).await.map_err(|e| e.to_string())?;
                        if p.status.as_ref().and_then(|s| s.observed_generation)
                            != p.metadata.generation
                        {
                            return Ok(None);
                        }
                    }
                    Ok(Some(()))
                }
            },
        )
        .await;
        if let Err(e) = reconciled {
            let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", second.admin))
                .await?
                .text()
                .await?;
            let p = policies.get(&policy_name(0)).await?;
            return Err(format!(
                "{e}\nlease holder {:?}; {} generation {:?} observed {:?}\n{}\n{}",
                lease_holder(&client).await?,
                policy_name(0),
                p.metadata.generation,
                p.status.and_then(|s| s.observed_generation),
                metrics
                    .lines()
                    .filter(|l| l.starts_with("ttc_operator_") && !l.contains("bucket"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                second.process.tail()
            )
            .into());
        }
        let converged = changed.elapsed();
        let errors = second.metric("ttc_operator_reconcile_errors_total").await? - errors_before;
        second.check_running()?;
        let holder = lease_holder(&client).await?;
        println!(
            "{component} down {OUTAGE:?}, ready {ready:.1?} after its start; 20 changed policies \
             reconciled {converged:.1?} after the change; {errors} reconcile errors; lease held by \
             {holder:?}"
        );
        // One failed attempt per policy per resync while the API is gone, each followed by its
        // back-off, is the most the outage may cost; an error storm would be many times that.
        let bound = (POLICIES as f64 + 1.0) * (OUTAGE.as_secs_f64() / 15.0 + 2.0);
        assert!(
            errors <= bound,
            "{errors} reconcile errors over a {OUTAGE:?} {component} outage (bound {bound})"
        );
        figures.push(Figure {
            fault: format!(
                "{component} killed, down {}s, started again",
                OUTAGE.as_secs()
            ),
            converged: format!("{converged:.1?} after a spec change made once it was back"),
            lost: "0 (every changed policy reconciled)".into(),
            duplicates: format!("{errors} reconcile errors"),
        });
    }

    // 4. The webhook unreachable.
    figures.push(webhook_unreachable(&client, dead_webhook).await?);

    // 5. The receiver unreachable from a sidecar for a minute.
    figures.push(receiver_unreachable(&client, &second).await?);

    println!("\nfault | time to converge | lost | duplicates / errors");
    for f in &figures {
        println!(
            "{} | {} | {} | {}",
            f.fault, f.converged, f.lost, f.duplicates
        );
    }
    second.check_running()?;
    drop(second);
    cluster.stop(Duration::from_secs(5))?;
    Ok(())
}

/// One row of the figures table.
struct Figure {
    fault: String,
    converged: String,
    lost: String,
    duplicates: String,
}

/// The `ttc-operator` binary next to this test's (`target/<profile>/`).
fn operator_binary() -> TestResult<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("the test binary has no target directory")?;
    let binary = profile_dir.join("ttc-operator");
    if !binary.is_file() {
        return Err(format!(
            "{} is missing: build it with `cargo build -p ttc-operator` (`cargo test --workspace` \
             and e2e/test.sh do)",
            binary.display()
        )
        .into());
    }
    Ok(binary)
}

/// An operator replica as a process of its own.
struct Replica {
    identity: String,
    admin: u16,
    receiver: u16,
    process: Component,
}

impl Replica {
    fn start(
        binary: &Path,
        kubeconfig: &Path,
        identity: &str,
        logs: &Path,
        webhook_port: u16,
    ) -> TestResult<Self> {
        let (admin, receiver, webhook) = (free_port()?, free_port()?, free_port()?);
        let address = |port: u16| format!("127.0.0.1:{port}");
        let args: Vec<String> = [
            "--admin-addr",
            &address(admin),
            "--receiver-addr",
            &address(receiver),
            "--webhook-addr",
            &address(webhook),
            "--lease-namespace",
            SYSTEM,
            "--identity",
            identity,
            "--stale-seconds",
            &STALE_SECONDS.to_string(),
            // The webhook configuration names an address where nothing listens: as when no
            // replica is reachable from the API server.
            "--webhook-config-name",
            "ttc-faults",
            "--webhook-url",
            &format!("https://127.0.0.1:{webhook_port}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let env = [
            ("KUBECONFIG".to_string(), kubeconfig.display().to_string()),
            (
                "RUST_LOG".to_string(),
                std::env::var("TTC_FAULTS_OPERATOR_LOG")
                    .unwrap_or_else(|_| "info,kube=warn".into()),
            ),
        ];
        let process = Component::start_with_env(
            identity,
            binary,
            &args,
            &env,
            &logs.join(format!("{identity}.log")),
        )?;
        Ok(Replica {
            identity: identity.into(),
            admin,
            receiver,
            process,
        })
    }

    async fn ready(&self, limit: Duration) -> TestResult {
        let url = format!("http://127.0.0.1:{}/readyz", self.admin);
        ttc_cluster::testing::wait_until_up(&reqwest::Client::new(), &url, limit)
            .await
            .map_err(|e| format!("{} not ready: {e}\n{}", self.identity, self.process.tail()))?;
        Ok(())
    }

    fn check_running(&mut self) -> TestResult {
        Ok(self.process.check_running()?)
    }

    /// The sum of a metric's series on the replica's `/metrics`.
    async fn metric(&self, name: &str) -> TestResult<f64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin))
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

async fn create_namespace(client: &kube::Client, name: &str, injection: bool) -> TestResult {
    let mut namespace = json!({"metadata": {"name": name}});
    if injection {
        namespace["metadata"]["labels"] = json!({"energy.ttc.dev/injection": "enabled"});
    }
    let namespace: Namespace = serde_json::from_value(namespace)?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    // Pods are refused until the namespace has its default ServiceAccount.
    wait_for_default_service_account(client, name).await?;
    Ok(())
}

fn policy_name(i: usize) -> String {
    format!("policy-{i:04}")
}

fn policy(name: &str, app: &str, window_seconds: u64) -> TestResult<InferencePolicy> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "energy.ttc.dev/v1alpha1", "kind": "InferencePolicy",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "budget": {"joulesPerRequest": 5.0, "windowSeconds": window_seconds}
        }
    }))?)
}

fn pod(name: &str, app: &str) -> TestResult<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))?)
}

async fn lease_holder(client: &kube::Client) -> TestResult<Option<String>> {
    let lease = Api::<Lease>::namespaced(client.clone(), SYSTEM)
        .get_opt(LEASE)
        .await?;
    Ok(lease.and_then(|l| l.spec?.holder_identity))
}

async fn holder_becomes(client: &kube::Client, identity: &str, limit: Duration) -> TestResult {
    eventually(
        &format!("{identity} holds the lease"),
        limit,
        || async move {
            let holder = lease_holder(client).await.map_err(|e| e.to_string())?;
            Ok((holder.as_deref() == Some(identity)).then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// Whether a policy's status says its pods run without the sidecar, for its current spec.
fn reports_pods_without_sidecar(policy: &InferencePolicy) -> bool {
    let Some(status) = &policy.status else {
        return false;
    };
    status.observed_generation == policy.metadata.generation
        && status.conditions.iter().any(|c| {
            c.type_ == "Degraded" && c.status == "True" && c.reason == "PodsWithoutSidecar"
        })
}

/// How many events of `reason` each object of the namespace has had (a series counts its
/// repetitions).
async fn events_by_object(
    client: &kube::Client,
    namespace: &str,
    reason: &str,
) -> TestResult<BTreeMap<String, u64>> {
    let events = Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?;
    let mut counts = BTreeMap::new();
    for event in events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
    {
        let Some(name) = event.regarding.as_ref().and_then(|r| r.name.clone()) else {
            continue;
        };
        let times = event
            .series
            .as_ref()
            .map_or(1, |s| u64::try_from(s.count).unwrap_or(1));
        *counts.entry(name).or_default() += times;
    }
    Ok(counts)
}

/// 1,000 policies, each selecting one pod without the sidecar (so each earns one
/// `PodsWithoutSidecar` event); the leader is killed once a quarter are reconciled.
async fn leader_killed(
    client: &kube::Client,
    leader: &mut Replica,
    follower: &Replica,
) -> TestResult<Vec<Figure>> {
    const NAMESPACE: &str = "faults-failover";
    create_namespace(client, NAMESPACE, false).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let policies: Api<InferencePolicy> = Api::namespaced(client.clone(), NAMESPACE);
    let creating = Instant::now();
    futures::stream::iter(0..POLICIES)
        .map(|i| {
            let pods = pods.clone();
            async move {
                pods.create(
                    &PostParams::default(),
                    &pod(&format!("pod-{i:04}"), &policy_name(i))?,
                )
                .await?;
                TestResult::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    println!("{POLICIES} pods created in {:.1?}", creating.elapsed());

    // The policies arrive while the leader reconciles them.
    let creator = {
        let policies = policies.clone();
        tokio::spawn(async move {
            futures::stream::iter(0..POLICIES)
                .map(|i| {
                    let policies = policies.clone();
                    async move {
                        let name = policy_name(i);
                        policies
                            .create(&PostParams::default(), &policy(&name, &name, 60)?)
                            .await?;
                        TestResult::Ok(())
                    }
                })
                .buffer_unordered(8)
                .try_collect::<Vec<_>>()
                .await
        })
    };
    let converged_count = || {
        let policies = policies.clone();
        async move {
            let list = policies.list(&ListParams::default()).await?;
            TestResult::Ok(
                list.items
                    .iter()
                    .filter(|p| reports_pods_without_sidecar(p))
                    .count(),
            )
        }
    };
    let started = Instant::now();
    let at_kill = loop {
        let done = converged_count().await?;
        if done >= POLICIES / 4 {
            break done;
        }
        if started.elapsed() > Duration::from_secs(180) {
            return Err(format!("only {done} policies reconciled after 3 minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    leader.process.kill()?;
    let killed = Instant::now();
    println!(
        "leader {} killed with {at_kill} of {POLICIES} policies reconciled, {:.1?} after they began",
        leader.identity,
        started.elapsed()
    );
    holder_becomes(
        client,
        &follower.identity,
        Duration::from_secs(LEASE_SECONDS + 10),
    )
    .await?;
    let takeover = killed.elapsed();
    assert!(
        takeover <= Duration::from_secs(LEASE_SECONDS + 2),
        "the lease moved {takeover:?} after the kill (duration and grace {LEASE_SECONDS}s)"
    );
    creator.await??;
    loop {
        let done = converged_count().await?;
        if done == POLICIES {
            break;
        }
        if killed.elapsed() > Duration::from_secs(300) {
            return Err(format!(
                "{done} of {POLICIES} policies reconciled 5 minutes after the kill"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged = killed.elapsed();
    // Events are published just after the status they follow; give the last ones a moment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = events_by_object(client, NAMESPACE, "PodsWithoutSidecar").await?;
    let lost = (0..POLICIES)
        .filter(|i| !events.contains_key(&policy_name(*i)))
        .count();
    let doubled: u64 = events.values().map(|n| n.saturating_sub(1)).sum();
    println!(
        "the lease moved to {} {takeover:.1?} after the kill; all {POLICIES} policies reconciled \
         {converged:.1?} after it; events lost {lost}, doubled {doubled}",
        follower.identity
    );
    // A status written by the killed leader whose event it had no time to publish loses that
    // event (the new leader sees no transition): at most the reconciles it had in flight, which
    // the controller's concurrency (8, operator/src/run.rs) bounds.
    assert!(
        lost <= 8,
        "{lost} policies have no PodsWithoutSidecar event"
    );
    assert_eq!(doubled, 0, "events published twice: {doubled}");
    Ok(vec![Figure {
        fault: format!(
            "leader killed (SIGKILL) with {at_kill} of {POLICIES} new policies reconciled"
        ),
        converged: format!(
            "lease moved in {takeover:.1?}; all policies reconciled {converged:.1?} after the kill"
        ),
        lost: format!("{lost} events"),
        duplicates: format!("{doubled} events"),
    }])
}

/// A policy whose pods are created while the webhook answers nothing.
async fn webhook_unreachable(client: &kube::Client, dead_port: u16) -> TestResult<Figure> {
    const NAMESPACE: &str = "faults-webhook";
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let hook = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get("ttc-faults")
        .await?;
    let url = hook
        .webhooks
        .as_ref()
        .and_then(|w| w.first()?.client_config.url.clone())
        .ok_or("the operator's webhook configuration has no URL")?;
    assert!(
        url.contains(&format!(":{dead_port}/")),
        "the webhook points at {url}"
    );
    create_namespace(client, NAMESPACE, true).await?;
    let policies: Api<InferencePolicy> = Api::namespaced(client.clone(), NAMESPACE);
    policies
        .create(&PostParams::default(), &policy("chat", "chat", 60)?)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut slowest = Duration::ZERO;
    let mut names = Vec::new();
    for i in 0..3 {
        let name = format!("chat-{i}");
        let creating = Instant::now();
        let created = pods
            .create(&PostParams::default(), &pod(&name, "chat")?)
            .await?;
        slowest = slowest.max(creating.elapsed());
        let containers: Vec<String> = created
            .spec
            .map(|s| s.containers.into_iter().map(|c| c.name).collect())
            .unwrap_or_default();
        assert_eq!(containers, ["app"], "pod {name} was changed");
        names.push(name);
    }
    let created = Instant::now();
    status_becomes(
        &policies,
        "the policy reports its pods without the sidecar",
        Duration::from_secs(60),
        |status| {
            let listed = status.conditions.iter().any(|c| {
                c.reason == "PodsWithoutSidecar" && names.iter().all(|n| c.message.contains(n))
            });
            listed && status.matched_pods == 3 && status.injected_pods == 0
        },
    )
    .await?;
    let reported = created.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = events_by_object(client, NAMESPACE, "PodsWithoutSidecar").await?;
    let count = events.get("chat").copied().unwrap_or(0);
    println!(
        "webhook unreachable: 3 pods created without the sidecar, slowest create {slowest:.1?}; \
         reported {reported:.1?} after; {count} PodsWithoutSidecar event"
    );
    assert_eq!(count, 1, "PodsWithoutSidecar events: {count}");
    Ok(Figure {
        fault: "webhook configured, nothing answers at its address".into(),
        converged: format!(
            "pods created in <= {slowest:.1?} without the sidecar; reported in the status {reported:.1?} after"
        ),
        lost: "0 pods".into(),
        duplicates: format!("{} events", count - 1),
    })
}

/// The reason of a policy's `Degraded` condition when it is true.
fn degraded_reason(status: &InferencePolicyStatus) -> Option<String> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| c.reason.clone())
}

/// Waits up to `limit` until the status of policy `chat` satisfies `check`.
async fn status_becomes(
    policies: &Api<InferencePolicy>,
    what: &str,
    limit: Duration,
    check: impl Fn(&InferencePolicyStatus) -> bool,
) -> TestResult {
    let check = &check;
    eventually(what, limit, || async move {
        let policy = policies.get("chat").await.map_err(|e| e.to_string())?;
        Ok(policy.status.filter(|s| check(s)).map(|_| ()))
    })
    .await?;
    Ok(())
}

/// A TCP proxy that can be cut: while cut, it closes every connection, open or new.
struct Proxy {
    port: u16,
    cut: watch::Sender<bool>,
}

impl Proxy {
    async fn start(target: u16) -> TestResult<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, cut_rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = cut_rx.clone();
                if *cut.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Ok(Proxy { port, cut })
    }

    fn set_cut(&self, cut: bool) {
        let _ = self.cut.send(cut);
    }
}

/// A pod's reports go through a proxy that is cut for a minute.
async fn receiver_unreachable(client: &kube::Client, leader: &Replica) -> TestResult<Figure> {
    const NAMESPACE: &str = "faults-reports";
    const JOULES: f64 = 2.0;
    const WATTS: f64 = 20.0;
    create_namespace(client, NAMESPACE, false).await?;
    let policies: Api<InferencePolicy> = Api::namespaced(client.clone(), NAMESPACE);
    policies
        .create(
            &PostParams::default(),
            &policy("chat", "chat", STALE_SECONDS)?,
        )
        .await?;
    // A pod as the webhook leaves it: annotated with its policy (its sidecar is the telemetry
    // below).
    let mut p1 = pod("p1", "chat")?;
    p1.metadata.annotations = Some(
        [(
            ttc_api::labels::INJECTED_POLICY_ANNOTATION.to_string(),
            "chat".to_string(),
        )]
        .into(),
    );
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &p1)
        .await?;
    let proxy = Proxy::start(leader.receiver).await?;
    // The sidecar's exporter: every 2 s the cumulative counters of a pod serving one request of
    // 2 J every 100 ms (20 W); an export that fails is dropped, as the sidecar's is, and the next
    // one carries the counters on (`sidecar/telemetry/src/report_client.rs`).
    let serving = Arc::new(AtomicBool::new(true));
    let dropped = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let exporter = {
        let (serving, dropped) = (serving.clone(), dropped.clone());
        let url = format!(
            "http://127.0.0.1:{}{}",
            proxy.port,
            ttc_api::report::JSON_REPORTS_PATH
        );
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("an HTTP client");
            let mut served = 0;
            while serving.load(Ordering::Relaxed) {
                served = (started.elapsed().as_millis() / 100) as u64;
                let report = EnergyReport {
                    namespace: NAMESPACE.into(),
                    pod: "p1".into(),
                    policy: "chat".into(),
                    source: EnergySource::Estimate,
                    joules_total: served as f64 * JOULES,
                    requests_total: served,
                    samples_total: served,
                    watts: None,
                    started_unix_nanos: None,
                };
                let sent = http.post(&url).json(&report).send().await;
                if !sent.is_ok_and(|r| r.status().is_success()) {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            served
        })
    };
    let fresh = |s: &InferencePolicyStatus| s.observed.is_some() && degraded_reason(s).is_none();
    status_becomes(&policies, "fresh energy in the status", REPORT_LIMIT, fresh).await?;

    proxy.set_cut(true);
    let cut = Instant::now();
    status_becomes(
        &policies,
        "the status says the reports are stale",
        REPORT_LIMIT,
        |s| degraded_reason(s).as_deref() == Some("StaleReports"),
    )
    .await?;
    let stale_after = cut.elapsed();
    tokio::time::sleep(RECEIVER_OUTAGE.saturating_sub(cut.elapsed())).await;
    proxy.set_cut(false);
    let restored = Instant::now();
    let dropped = dropped.load(Ordering::Relaxed);
    status_becomes(&policies, "the status fresh again", REPORT_LIMIT, fresh).await?;
    let fresh_after = restored.elapsed();
    // What the policy observes over the next window: never more than was served.
    let mut most_watts: f64 = 0.0;
    let mut per_request = Vec::new();
    let watching = Instant::now();
    while watching.elapsed() < Duration::from_secs(STALE_SECONDS + 10) {
        if let Some(o) = policies.get("chat").await?.status.and_then(|s| s.observed) {
            most_watts = most_watts.max(o.watts);
            per_request.extend(o.joules_per_request);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    serving.store(false, Ordering::Relaxed);
    let served = exporter.await?;
    let events = events_by_object(client, NAMESPACE, "StaleReports").await?;
    let stale_events = events.get("chat").copied().unwrap_or(0);
    println!(
        "receiver cut for {RECEIVER_OUTAGE:?} ({dropped} exports failed): stale in the status \
         {stale_after:.1?} after the cut, fresh again {fresh_after:.1?} after it ended; most \
         watts observed since {most_watts:.1} (served {WATTS} W), joules per request {:?}; \
         {stale_events} StaleReports event; {} requests served",
        per_request
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v))),
        served
    );
    assert!(dropped > 0, "no export failed while the receiver was cut");
    // Counted twice, the minute's joules would land in one window: 3x the power and more.
    assert!(
        most_watts <= WATTS * 1.3,
        "observed {most_watts:.1} W after the outage, served {WATTS} W"
    );
    assert!(
        per_request.iter().all(|j| (j - JOULES).abs() < 0.05),
        "joules per request observed {per_request:?}, served {JOULES}"
    );
    assert_eq!(stale_events, 1, "StaleReports events: {stale_events}");
    Ok(Figure {
        fault: format!(
            "receiver unreachable from a pod for {}s",
            RECEIVER_OUTAGE.as_secs()
        ),
        converged: format!(
            "stale in the status {stale_after:.1?} after the cut; fresh again {fresh_after:.1?} after it ended"
        ),
        lost: format!("0 (the cumulative counters carry the minute; {dropped} exports failed)"),
        duplicates: format!("0 (at most {most_watts:.1} W observed of {WATTS} W served)"),
    })
}
