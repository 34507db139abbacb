//! The receiver's CA in policy status against the real local control plane: an operator that
//! serves its report receiver over TLS (`--receiver-tls`) publishes the CA sidecars trust in
//! every policy's `status.reportCABundle`, and publishes a changed CA file there without a
//! restart, so that running sidecars follow a CA change.
//!
//! A test binary of its own: an operator reconciles every policy of the cluster, so operators
//! with other settings in one binary would fight over the same statuses.
//! Needs `KUBECONFIG_FOR_TESTS` or `TTC_CONTROL_PLANE_BIN` (see `e2e/test.sh`).

mod common;

use std::path::Path;
use std::time::Duration;

use kube::api::{Api, DynamicObject, PostParams};
use serde_json::json;
use tokio::sync::watch;
use ttc_api::InferencePolicy;
use ttc_cluster::testing::{TestNamespace, eventually};
use ttc_operator::serving::TlsMaterial;

use common::{TestResult, install_crd, local_operator, policy_api};

/// Writes `tls` as the operator's certificate, key and CA files in `dir` (a self-signed
/// certificate is its own CA), the way a mounted Secret holds them.
fn write_secret(dir: &Path, tls: &TlsMaterial) -> std::io::Result<()> {
    std::fs::write(dir.join("tls.crt"), &tls.cert_pem)?;
    std::fs::write(dir.join("tls.key"), &tls.key_pem)?;
    std::fs::write(dir.join("ca.crt"), &tls.ca_pem)
}

/// The policy's published CA once it equals `ca`.
async fn published(policies: &Api<InferencePolicy>, ca: &str, what: &str) -> TestResult {
    eventually(what, Duration::from_secs(60), || {
        let policies = policies.clone();
        let ca = ca.to_owned();
        async move {
            let policy = policies.get("chat").await.map_err(|e| e.to_string())?;
            let bundle = policy.status.and_then(|s| s.report_ca_bundle);
            Ok((bundle.as_deref() == Some(ca.as_str())).then_some(()))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_receivers_ca_is_published_in_status_and_follows_its_file() -> TestResult {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ns = TestNamespace::create("ipol-report-ca").await?;
    let client = ns.client().clone();
    install_crd(&client).await?;

    let secret = tempfile::tempdir()?;
    let names = || vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let (first, renewed) = (
        TlsMaterial::self_signed(names())?,
        TlsMaterial::self_signed(names())?,
    );
    write_secret(secret.path(), &first)?;
    let (mut config, ports) = local_operator(ns.name(), None)?;
    config.receiver_tls = true;
    config.otlp_endpoint = format!("https://127.0.0.1:{}", ports.receiver);
    config.tls_cert_file = Some(secret.path().join("tls.crt"));
    config.tls_key_file = Some(secret.path().join("tls.key"));
    config.tls_ca_file = Some(secret.path().join("ca.crt"));
    config.certificate_check_seconds = 1;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let operator = tokio::spawn(ttc_operator::run::run(client.clone(), config, shutdown_rx));

    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "energy.ttc.dev/v1alpha1", "kind": "InferencePolicy",
        "metadata": {"name": "chat", "namespace": ns.name()},
        "spec": {"selector": {"matchLabels": {"app": "chat"}}, "budget": {"joulesPerRequest": 2.0}}
    }))?;
    policy_api(&client, ns.name())
        .create(&PostParams::default(), &object)
        .await?;
    let policies: Api<InferencePolicy> = ns.api();
    published(&policies, &first.ca_pem, "the CA in status").await?;

    // A Secret with a new CA (a reinstall, an issuer's CA rotated): published without a restart.
    write_secret(secret.path(), &renewed)?;
    published(&policies, &renewed.ca_pem, "the changed CA in status").await?;

    let _ = shutdown_tx.send(true);
    tokio::time::timeout(Duration::from_secs(30), operator).await???;
    ns.delete().await?;
    Ok(())
}
