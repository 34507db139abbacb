//! The cluster-wide power cap against the real local control plane: an operator configured with
//! `--cluster-power-cap-watts` splits it among policies by priority, writes each policy's share to
//! its status, and tightens each policy's pods to it.
//!
//! A test binary of its own: an operator reconciles every policy of the cluster, so two operators
//! with different caps in one binary (tests run in parallel) would fight over the same statuses.
//! Needs `KUBECONFIG_FOR_TESTS` or `TTC_CONTROL_PLANE_BIN` (see `e2e/test.sh`).

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::json;
use tokio::sync::watch;
use ttc_api::InferencePolicy;
use ttc_cluster::testing::{TestNamespace, eventually};

use common::{TestResult, install_crd, local_operator, policy_api};

#[tokio::test]
async fn the_cluster_cap_is_split_by_priority_into_status_and_pod_allocations() -> TestResult {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ns = TestNamespace::create("ipol-cluster-split").await?;
    let client = ns.client().clone();
    install_crd(&client).await?;
    let (mut config, _) = local_operator(ns.name(), None)?;
    config.cluster_power_cap_watts = Some(500.0);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let operator = tokio::spawn(ttc_operator::run::run(client.clone(), config, shutdown_rx));

    // Two policies without caps of their own (unbounded demand): water filling gives them shares
    // in proportion to their priorities, whatever other policies the cluster holds.
    for (name, app, priority) in [("gold", "a", 800), ("bronze", "b", 200)] {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "energy.ttc.dev/v1alpha1", "kind": "InferencePolicy",
            "metadata": {"name": name, "namespace": ns.name()},
            "spec": {
                "selector": {"matchLabels": {"app": app}},
                "budget": {"joulesPerRequest": 5.0},
                "priority": priority
            }
        }))?;
        policy_api(&client, ns.name())
            .create(&PostParams::default(), &object)
            .await?;
    }
    // A pod of the gold policy (created directly: no webhook here) gets the share as its cap.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "gold-0", "labels": {"app": "a"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;

    let policies: Api<InferencePolicy> = ns.api();
    let shares = eventually("both shares in status", Duration::from_secs(60), || {
        let policies = policies.clone();
        async move {
            let mut shares = Vec::new();
            for name in ["gold", "bronze"] {
                let policy = policies.get(name).await.map_err(|e| e.to_string())?;
                let status = policy.status.ok_or("no status yet")?;
                let share = status.cluster_share.ok_or("no cluster share yet")?;
                shares.push((share, status.allocations));
            }
            Ok(Some(shares))
        }
    })
    .await?;
    let (gold, bronze) = (&shares[0].0, &shares[1].0);
    assert!(
        gold.watts > 0.0 && bronze.watts > 0.0,
        "{gold:?} {bronze:?}"
    );
    assert!(
        (gold.watts / bronze.watts - 4.0).abs() < 0.01,
        "shares must follow priorities 800:200: {gold:?} {bronze:?}"
    );
    assert!(gold.watts + bronze.watts <= 500.0 + 1e-6);
    assert!(
        (gold.fraction - gold.watts / 500.0).abs() < 1e-3,
        "{gold:?}"
    );
    // The pod's allocation carries the policy's share as its power cap.
    let gold_pod = eventually("the pod's allocation", Duration::from_secs(60), || {
        let policies = policies.clone();
        async move {
            let policy = policies.get("gold").await.map_err(|e| e.to_string())?;
            Ok(policy
                .status
                .and_then(|s| s.allocations.into_iter().find(|a| a.pod == "gold-0")))
        }
    })
    .await?;
    let watts = gold_pod.watts.ok_or("the pod got no power cap")?;
    assert!(
        (watts - gold.watts).abs() < 0.01 * gold.watts,
        "{gold_pod:?} vs {gold:?}"
    );

    let _ = shutdown_tx.send(true);
    tokio::time::timeout(Duration::from_secs(30), operator).await???;
    ns.delete().await?;
    Ok(())
}
