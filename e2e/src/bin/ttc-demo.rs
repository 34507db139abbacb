//! `ttc-demo`: the whole loop on a local cluster, in one command (see `ttc_e2e::demo`).
//!
//! `e2e/demo.sh` builds what it needs and runs it; the README's first command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use ttc_cluster::images::Images;
use ttc_e2e::demo::{self, DemoConfig};

/// Runs a local cluster with a real node, the chart (the operator from its image), an
/// InferencePolicy and sidecar-injected inference pods serving the real model; drives questions,
/// changes the budget, and reports.
#[derive(Parser)]
#[command(about)]
struct Cli {
    /// The directory printed by e2e/controlplane/build.sh (control plane, kubectl, helm).
    #[arg(long, env = "TTC_CONTROL_PLANE_BIN")]
    control_plane_bin: PathBuf,
    /// The directory printed by e2e/images/build.sh (the images and podman's settings).
    #[arg(long, env = "TTC_IMAGES_DIR")]
    images_dir: PathBuf,
    /// The GGUF file the sidecars serve (`ttc-sidecar fetch-model` prints the default's path).
    #[arg(long, env = "TTC_DEFAULT_MODEL_FILE")]
    model_file: PathBuf,
    /// The repository root (the chart and e2e/demo/ manifests).
    #[arg(long, default_value = ".")]
    repo_root: PathBuf,
    /// Where the records, the summary and the plot go.
    #[arg(long, default_value = "demo-output")]
    out: PathBuf,
    /// Inference pods per policy (each takes 0.9 CPU: two policies of one pod fit 2 cores).
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Questions per budget phase and policy.
    #[arg(long, default_value_t = 30)]
    questions: usize,
    /// Joules-per-request budget of each phase, comma-separated: both policies start with the
    /// first and are patched to each next one.
    #[arg(long, value_delimiter = ',', default_values_t = [20.0, 3.0])]
    budgets: Vec<f64>,
    /// Requests in flight at once per policy (default: two per pod).
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
    let images = match Images::load(&cli.images_dir) {
        Ok(images) => images,
        Err(e) => {
            eprintln!("ttc-demo: {e}; run e2e/images/build.sh (e2e/demo.sh does)");
            return ExitCode::FAILURE;
        }
    };
    let config = DemoConfig {
        control_plane_bin: cli.control_plane_bin,
        images,
        model_file: cli.model_file,
        repo_root: cli.repo_root,
        out_dir: cli.out,
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
