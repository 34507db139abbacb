//! The one-command demo, run small: its own local cluster, the chart, the operator with the
//! chart's ServiceAccount, one injected pod whose sidecar serves the real model, two budget
//! phases with a `kubectl patch` between them, and the files it leaves.
//!
//! Needs `TTC_CONTROL_PLANE_BIN` and the operator and sidecar binaries in the target directory
//! (`e2e/test.sh` provides both).

use std::path::PathBuf;

use ttc_e2e::demo::{self, DemoConfig};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A binary of another workspace package, built next to this test's executable.
fn workspace_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(name))
        .ok_or("unexpected test executable location")?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is not built; run the tests through e2e/test.sh, or `cargo build -p {name}` first",
            path.display()
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_the_whole_loop_on_a_small_scale() -> TestResult {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(control_plane_bin) = std::env::var_os("TTC_CONTROL_PLANE_BIN") else {
        if std::env::var_os("KUBECONFIG_FOR_TESTS").is_some() {
            eprintln!("skipped: the demo starts its own cluster and needs TTC_CONTROL_PLANE_BIN");
            return Ok(());
        }
        return Err("set TTC_CONTROL_PLANE_BIN (e2e/test.sh does)".into());
    };
    let out = tempfile::tempdir()?;
    let repo_root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no repository root")?
        .to_path_buf();
    let model_cache = std::env::var_os("TTC_CACHE_DIR")
        .map(|d| PathBuf::from(d).join("models"))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/ttc-operator/models")
        });
    let config = DemoConfig {
        control_plane_bin: control_plane_bin.into(),
        operator_bin: workspace_binary("ttc-operator")?,
        sidecar_bin: workspace_binary("ttc-sidecar")?,
        repo_root,
        out_dir: out.path().to_path_buf(),
        model_cache,
        replicas: 1,
        questions_per_phase: 3,
        budgets: vec![20.0, 2.0],
        concurrency: 1,
        seed: 5,
    };
    let outcome = demo::run(config).await?;

    assert_eq!(outcome.summaries.len(), 2, "{:?}", outcome.summaries);
    for (summary, budget) in outcome.summaries.iter().zip([20.0, 2.0]) {
        assert_eq!(summary.requests, 3);
        assert_eq!(summary.budget_joules_per_request, budget);
        assert!(summary.mean_joules_per_request > 0.0, "{summary:?}");
        assert!(summary.mean_depth >= 1.0, "{summary:?}");
        // No GPU or RAPL here: the joules must say they are an estimate.
        assert!(
            summary.energy.contains("measured") || summary.energy.contains("estimated"),
            "{summary:?}"
        );
    }
    assert!(outcome.records.iter().all(|r| r.pod.starts_with("chat-")));
    assert!(
        outcome.kubectl_get.contains("chat"),
        "kubectl get ipol printed:\n{}",
        outcome.kubectl_get
    );
    // The sidecars' energy reports reached the status: the receiver took them, authenticated
    // by pod-bound tokens (the demo installs the chart with operator.reportAuth=token-review).
    assert!(
        outcome.kubectl_get.contains("J/req") && !outcome.kubectl_get.contains("no reports"),
        "kubectl get ipol printed:\n{}",
        outcome.kubectl_get
    );
    for name in [
        "records.csv",
        "summary.json",
        "demo.png",
        "kubectl-get-ipol.txt",
    ] {
        let path = out.path().join(name);
        assert!(
            path.metadata().map(|m| m.len() > 0).unwrap_or(false),
            "{} missing or empty",
            path.display()
        );
    }
    Ok(())
}
