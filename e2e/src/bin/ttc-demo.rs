//! `ttc-demo`: the whole loop on a local cluster, in one command (see `ttc_e2e::demo`).
//!
//! `e2e/demo.sh` builds what it needs and runs it; the README's first command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use ttc_e2e::demo::{self, DemoConfig};
use ttc_sidecar::model_store::ModelStore;

/// Runs a local cluster with the operator, an InferencePolicy and sidecar-injected inference
/// pods serving the real model; drives questions, changes the budget, and reports.
#[derive(Parser)]
#[command(about)]
struct Cli {
    /// The directory printed by e2e/controlplane/build.sh (control plane, kubectl, helm).
    #[arg(long, env = "TTC_CONTROL_PLANE_BIN")]
    control_plane_bin: PathBuf,
    /// The ttc-operator binary.
    #[arg(long)]
    operator_bin: PathBuf,
    /// The ttc-sidecar binary.
    #[arg(long)]
    sidecar_bin: PathBuf,
    /// The repository root (the chart and e2e/demo/ manifests).
    #[arg(long, default_value = ".")]
    repo_root: PathBuf,
    /// Where the records, the summary and the plot go.
    #[arg(long, default_value = "demo-output")]
    out: PathBuf,
    /// Model cache of this machine (default: $TTC_CACHE_DIR/models or ~/.cache/ttc-operator/models).
    #[arg(long, env = "TTC_MODEL_CACHE")]
    model_cache: Option<PathBuf>,
    /// Inference pods.
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// Questions per budget phase.
    #[arg(long, default_value_t = 30)]
    questions: usize,
    /// Joules-per-request budget of each phase, comma-separated: the policy starts with the
    /// first and is patched to each next one.
    #[arg(long, value_delimiter = ',', default_values_t = [6.0, 2.0])]
    budgets: Vec<f64>,
    /// Requests in flight at once (default: two per pod).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Seed of the questions.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = DemoConfig {
        control_plane_bin: cli.control_plane_bin,
        operator_bin: cli.operator_bin,
        sidecar_bin: cli.sidecar_bin,
        repo_root: cli.repo_root,
        out_dir: cli.out,
        model_cache: cli
            .model_cache
            .unwrap_or_else(|| ModelStore::default_location().dir().to_path_buf()),
        replicas: cli.replicas,
        questions_per_phase: cli.questions,
        budgets: cli.budgets,
        concurrency: cli.concurrency.unwrap_or(2 * cli.replicas as usize),
        seed: cli.seed,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ttc-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        // Dropping the demo's future stops every process it started and removes its state.
        tokio::select! {
            result = demo::run(config) => result.map(|_| true),
            _ = interrupt.recv() => Ok(false),
            _ = terminate.recv() => Ok(false),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("\nttc-demo: interrupted; everything it started has been stopped");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("\nttc-demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
