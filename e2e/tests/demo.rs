//! The one-command demo, run small: its own cluster with a real node, the chart with the
//! operator from its image, two policies (a vote over mixed questions, and best-of-N with the
//! checking tool over questions it can check) with one injected pod each, whose sidecar (from
//! its image) serves the real model, two budget phases with a `kubectl patch` between them, and
//! the files it leaves.
//!
//! Needs root, `TTC_CONTROL_PLANE_BIN`, `TTC_IMAGES_DIR` and `TTC_DEFAULT_MODEL_FILE`
//! (`e2e/test.sh` provides all three).

use std::path::PathBuf;

use ttc_cluster::images::Images;
use ttc_e2e::demo::{self, DemoConfig};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn env(name: &str) -> Result<PathBuf, String> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| format!("set {name} (e2e/test.sh does)"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_the_whole_loop_on_a_small_scale() -> TestResult {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let out = tempfile::tempdir()?;
    let repo_root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no repository root")?
        .to_path_buf();
    let config = DemoConfig {
        control_plane_bin: env("TTC_CONTROL_PLANE_BIN")?,
        images: Images::from_env()?,
        model_file: env("TTC_DEFAULT_MODEL_FILE")?,
        repo_root,
        out_dir: out.path().to_path_buf(),
        replicas: 1,
        questions_per_phase: 4,
        budgets: vec![20.0, 1.0],
        concurrency: 1,
        seed: 5,
    };
    let outcome = demo::run(config).await?;

    let summaries = &outcome.summaries;
    let keys: Vec<(&str, usize)> = summaries
        .iter()
        .map(|s| (s.policy.as_str(), s.phase))
        .collect();
    assert_eq!(
        keys,
        [("chat", 0), ("chat", 1), ("checked", 0), ("checked", 1)],
        "{summaries:?}"
    );
    for summary in summaries {
        assert_eq!(summary.requests, 4, "{summary:?}");
        assert_eq!(
            summary.budget_joules_per_request,
            [20.0, 1.0][summary.phase]
        );
        assert!(summary.mean_joules_per_request > 0.0, "{summary:?}");
        assert!(summary.mean_depth >= 1.0, "{summary:?}");
        // No GPU or RAPL here: every figure must say it is an estimate.
        assert_eq!(summary.energy, "estimate (estimated)", "{summary:?}");
    }
    // The point of the demo: the tighter budget bought less depth and fewer joules. A budget
    // below one answer's cost holds every request of both policies to a single sample.
    let (loose, tight) = (&summaries[0], &summaries[1]);
    assert!(
        tight.mean_depth < loose.mean_depth,
        "depth did not follow the budget: {loose:?} -> {tight:?}"
    );
    assert!(
        tight.mean_joules_per_request < loose.mean_joules_per_request,
        "joules did not follow the budget: {loose:?} -> {tight:?}"
    );
    assert!(
        outcome
            .records
            .iter()
            .filter(|r| r.phase == 1)
            .all(|r| r.samples == 1),
        "{:?}",
        outcome.records
    );
    for record in &outcome.records {
        assert!(
            record.pod.starts_with(&format!("{}-", record.policy)),
            "{record:?}"
        );
    }
    // The sidecars' energy reports reached the status: the receiver took them, authenticated
    // by pod-bound tokens (the chart's default operator.reportAuth=token-review).
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
        "nodes.txt",
        "pods.txt",
    ] {
        let path = out.path().join(name);
        assert!(
            path.metadata().map(|m| m.len() > 0).unwrap_or(false),
            "{} missing or empty",
            path.display()
        );
    }
    let nodes = std::fs::read_to_string(out.path().join("nodes.txt"))?;
    assert!(
        nodes.contains("ttc-node") && nodes.contains(" Ready "),
        "{nodes}"
    );
    let pods = std::fs::read_to_string(out.path().join("pods.txt"))?;
    assert!(
        pods.lines().filter(|l| l.contains("Running")).count() >= 4,
        "two operator pods and the two inference pods run:\n{pods}"
    );
    Ok(())
}
