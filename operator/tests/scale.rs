//! Benchmark (not a timed test; run on purpose): many policies and pods on the local control
//! plane, the operator as its own process. Reports its RSS, the time statuses take to converge
//! after a budget change, and admission latency p50/p99.
//!
//! ```text
//! TTC_SCALE_POLICIES=1000 TTC_SCALE_PODS_PER_POLICY=5 \
//!   cargo test -p ttc-operator --release --test scale -- --ignored --nocapture
//! ```
//! Goals: RSS <= 150 MiB, convergence <= 30 s, webhook p99 <= 10 ms; the last lines print each
//! goal as met or missed, with the figure.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ttc_api::InferencePolicy;
use ttc_cluster::testing::{TestNamespace, free_port};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn http_get(port: u16, path: &str) -> Result<String, std::io::Error> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// The quantile of a cumulative histogram `(upper bound, count)`, interpolated within its bucket.
fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if !le.is_finite() {
                return lower.0;
            }
            let within = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                0.0
            };
            return lower.0 + (le - lower.0) * within;
        }
        lower = (le, count);
    }
    lower.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test]
#[ignore = "benchmark: run on purpose with --ignored --nocapture"]
async fn policies_and_pods_at_scale() -> TestResult {
    let policies_n = env_or("TTC_SCALE_POLICIES", 1000);
    let per_policy = env_or("TTC_SCALE_PODS_PER_POLICY", 5);
    let ns = TestNamespace::create("ipol-scale").await?;
    let client = ns.client().clone();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../api/inferencepolicy.crd.yaml"
    ))?)?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .patch(
            "inferencepolicies.energy.ttc.dev",
            &PatchParams::apply("ttc-operator-tests").force(),
            &Patch::Apply(&crd),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let label = json!({"metadata": {"labels": {"energy.ttc.dev/injection": "enabled"}}});
    Api::<Namespace>::all(client.clone())
        .patch(ns.name(), &PatchParams::default(), &Patch::Merge(&label))
        .await?;

    let (admin, receiver, webhook) = (free_port()?, free_port()?, free_port()?);
    let config_name = format!("ttc-scale-{}", ns.name());
    let mut operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_ttc-operator"))
        .env("KUBECONFIG", ns.cluster().kubeconfig())
        .env("RUST_LOG", "warn")
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--receiver-addr", &format!("127.0.0.1:{receiver}")])
        .args(["--webhook-addr", &format!("127.0.0.1:{webhook}")])
        .args(["--webhook-url", &format!("https://127.0.0.1:{webhook}")])
        .args(["--webhook-config-name", &config_name])
        .args(["--lease-namespace", ns.name(), "--identity", "scale"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = operator.id().ok_or("operator exited")?;

    let policies: Api<InferencePolicy> = ns.api();
    let started = Instant::now();
    futures::stream::iter(0..policies_n)
        .map(|i| {
            let policies = policies.clone();
            async move {
                let policy: InferencePolicy = serde_json::from_value(json!({
                    "apiVersion": "energy.ttc.dev/v1alpha1", "kind": "InferencePolicy",
                    "metadata": {"name": format!("p{i}")},
                    "spec": {"selector": {"matchLabels": {"app": format!("p{i}")}}, "budget": {"joulesPerRequest": 2.0}}
                }))?;
                policies.create(&PostParams::default(), &policy).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    println!("created {policies_n} policies in {:?}", started.elapsed());
    // Let the webhook's cache catch up before timing admissions.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let pods: Api<Pod> = ns.api();
    let started = Instant::now();
    let mut latencies: Vec<Duration> = futures::stream::iter(0..policies_n * per_policy)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let pod = Pod {
                    metadata: ObjectMeta {
                        name: Some(format!("pod-{i}")),
                        labels: Some(BTreeMap::from([(
                            "app".to_string(),
                            format!("p{}", i % policies_n),
                        )])),
                        ..Default::default()
                    },
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "app".into(),
                            image: Some("app".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let t = Instant::now();
                pods.create(&PostParams::default(), &pod).await?;
                Ok::<_, kube::Error>(t.elapsed())
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    latencies.sort();
    println!(
        "created {} pods in {:?}; pod create latency (API server + webhook) p50 {:?} p99 {:?}",
        latencies.len(),
        started.elapsed(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );

    let converged = |target: &'static str| {
        let policies = policies.clone();
        async move {
            let started = Instant::now();
            loop {
                let list = policies.list(&ListParams::default()).await?;
                let done = list
                    .items
                    .iter()
                    .filter(|p| {
                        p.status.as_ref().is_some_and(|s| {
                            s.matched_pods as usize == per_policy
                                && s.budget_summary
                                    .as_deref()
                                    .is_some_and(|b| b.starts_with(target))
                        })
                    })
                    .count();
                if done == policies_n {
                    return Ok::<_, kube::Error>(started.elapsed());
                }
                if started.elapsed() > Duration::from_secs(600) {
                    println!("only {done}/{policies_n} statuses converged after 600 s");
                    return Ok(started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let initial = converged("2J/req").await?;
    println!("initial statuses converged {initial:?} after the last pod");

    let started = Instant::now();
    futures::stream::iter(0..policies_n)
        .map(|i| {
            let policies = policies.clone();
            async move {
                let patch = json!({"spec": {"budget": {"joulesPerRequest": 3.0}}});
                policies
                    .patch(
                        &format!("p{i}"),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let patched = started.elapsed();
    let convergence = converged("3J/req").await?;
    println!(
        "budget change on {policies_n} policies: patched in {patched:?}, all statuses converged {convergence:?} after the last patch"
    );

    let metrics = http_get(admin, "/metrics").await?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("ttc_operator_admissions_total"))
    {
        println!("{line}");
    }
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("ttc_operator_admission_duration_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            Some((
                le.parse().unwrap_or(f64::INFINITY),
                count.trim().parse().ok()?,
            ))
        })
        .collect();
    let admission_p99_ms = histogram_quantile(&buckets, 0.99) * 1e3;
    println!(
        "webhook admission latency (in the operator) p50 {:.2} ms p99 {admission_p99_ms:.2} ms",
        histogram_quantile(&buckets, 0.5) * 1e3,
    );
    let rss = rss_kib(pid, "VmRSS:").unwrap_or_default();
    let peak = rss_kib(pid, "VmHWM:").unwrap_or_default();
    println!("operator RSS {rss} KiB (peak {peak} KiB)");
    let goals = [
        Goal::at_most("operator RSS (peak)", peak as f64 / 1024.0, 150.0, "MiB"),
        Goal::at_most(
            "convergence after the budget change",
            convergence.as_secs_f64(),
            30.0,
            "s",
        ),
        Goal::at_most("webhook admission p99", admission_p99_ms, 10.0, "ms"),
    ];
    for goal in &goals {
        println!("{goal}");
    }

    operator.start_kill()?;
    let _ = operator.wait().await;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(&config_name, &DeleteParams::default())
        .await?;
    ns.delete().await?;
    Ok(())
}

/// A goal of the benchmark and the figure measured against it.
struct Goal {
    what: &'static str,
    measured: f64,
    limit: f64,
    unit: &'static str,
}

impl Goal {
    fn at_most(what: &'static str, measured: f64, limit: f64, unit: &'static str) -> Self {
        Self {
            what,
            measured,
            limit,
            unit,
        }
    }
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.measured <= self.limit {
            "met"
        } else {
            "MISSED"
        };
        write!(
            f,
            "goal {verdict}: {} {:.1} {} (goal <= {} {})",
            self.what, self.measured, self.unit, self.limit, self.unit
        )
    }
}
