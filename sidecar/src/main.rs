//! `ttc-sidecar`: serves a GGUF model over an OpenAI-compatible API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ttc_api::TtcSpec;
use ttc_api::report::sidecar_env;
use ttc_core::{TicketKeys, TtcPolicy};
use ttc_energy::{EnergyMeter, EstimateModel, MeterConfig, NvmlConfig, SourceChoice};
use ttc_sidecar::admission::{Admission, AdmissionConfig, default_memory_budget};
use ttc_sidecar::api::{self, AppState, Limits};
use ttc_sidecar::engine::llama::{Kernels, WeightFormat};
use ttc_sidecar::engine::worker::EngineHandle;
use ttc_sidecar::engine::{Engine, EngineOptions};
use ttc_sidecar::model_store::{DEFAULT_MODEL, KNOWN_MODELS, ModelStore, ModelStoreError};
use ttc_sidecar::policy_link::{PodIdentity, watch_policy};
use ttc_sidecar::ttc_policy::{read_policy_file, ttc_policy};
use ttc_sidecar::ttc_service::TtcService;
use ttc_telemetry::{SidecarMetrics, TelemetryConfig};

#[derive(Parser)]
#[command(
    name = "ttc-sidecar",
    version,
    about = "Energy-budgeted test-time compute inference server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over the OpenAI API (standalone, or as the sidecar the operator injects).
    Serve(Box<ServeArgs>),
    /// Check and measure the engine on this machine's device (a GPU node's acceptance run):
    /// logits against a reference, prefill and decode throughput, joules per token from the
    /// meter beside integrated power, the meter's overhead, power-limit permission.
    DeviceCheck(Box<ttc_sidecar::device_check::DeviceCheckArgs>),
    /// Fetch a known model into the cache and print its path.
    FetchModel {
        /// Which known model.
        #[arg(long, default_value = DEFAULT_MODEL.name)]
        model: String,
        /// Fetch again even if the cache has it.
        #[arg(long)]
        force: bool,
        /// Cache directory (default: $TTC_CACHE_DIR/models or ~/.cache/ttc-operator/models).
        #[arg(long, env = sidecar_env::MODEL_CACHE)]
        cache: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A known model name (fetched on first use) or the path of a GGUF file.
    #[arg(long, env = sidecar_env::MODEL, default_value = DEFAULT_MODEL.name)]
    model: String,
    /// Name the API serves the model under (default: the known name, or the file stem).
    #[arg(long, env = "TTC_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, env = sidecar_env::LISTEN, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// In-memory weight format.
    #[arg(long, env = "TTC_WEIGHTS", value_enum, default_value_t = WeightFormat::Q8_0)]
    weights: WeightFormat,
    /// Compute threads (default: all cores).
    #[arg(long, env = "TTC_THREADS")]
    threads: Option<usize>,
    /// MiB of prefilled prompts kept for reuse by later requests with the same prompt (the
    /// windows of a test-time-compute request); 0 disables it.
    #[arg(long, env = "TTC_PREFIX_CACHE_MIB", default_value_t = ttc_sidecar::engine::DEFAULT_PREFIX_CACHE_BYTES >> 20)]
    prefix_cache_mib: usize,
    /// Run on the first CUDA GPU (needs a build with the `cuda` feature).
    #[arg(long, env = sidecar_env::CUDA)]
    cuda: bool,
    /// Most samples one request may ask for.
    #[arg(long, env = "TTC_MAX_N", default_value_t = 64)]
    max_n: usize,
    /// MiB the rows' KV caches may hold together (default: the container's memory limit, or
    /// three quarters of the memory available, less the model, the prefix cache and 256 MiB).
    #[arg(long, env = "TTC_MEMORY_BUDGET_MIB")]
    memory_budget_mib: Option<u64>,
    /// Rows (samples of every request together) decoding at once.
    #[arg(long, env = "TTC_MAX_ROWS", default_value_t = 256)]
    max_rows: usize,
    /// Requests that may wait for room; one more is refused with 429.
    #[arg(long, env = "TTC_MAX_WAITING", default_value_t = 64)]
    max_waiting: usize,
    /// Seconds a request waits for room before it is refused with 429.
    #[arg(long, env = "TTC_MAX_WAIT_SECS", default_value_t = 30)]
    max_wait_secs: u64,
    /// The longest a request may take, in seconds (a client may ask for less with the
    /// X-Request-Timeout header); past it the request is cancelled with 504.
    #[arg(long, env = "TTC_REQUEST_TIMEOUT_SECS", default_value_t = 600)]
    request_timeout_secs: u64,
    /// Model cache directory (default: $TTC_CACHE_DIR/models or ~/.cache/ttc-operator/models).
    #[arg(long, env = sidecar_env::MODEL_CACHE)]
    cache: Option<PathBuf>,
    /// Energy source: auto (nvml, then rapl, then estimate), nvml, rapl or estimate.
    #[arg(long, env = "TTC_ENERGY_SOURCE", default_value = "auto")]
    energy_source: SourceChoice,
    /// For the estimate: watts one fully busy CPU core draws.
    #[arg(long, env = "TTC_ESTIMATE_WATTS_PER_CORE", default_value_t = EstimateModel::default().watts_per_core)]
    estimate_watts_per_core: f64,
    /// For the estimate: watts drawn regardless of load.
    #[arg(long, env = "TTC_ESTIMATE_IDLE_WATTS", default_value_t = EstimateModel::default().idle_watts)]
    estimate_idle_watts: f64,
    /// Path of libnvidia-ml (default: found by the loader).
    #[arg(long, env = "TTC_NVML_LIBRARY")]
    nvml_library: Option<PathBuf>,
    /// Enable test-time compute with this policy (YAML or JSON with the fields of an
    /// InferencePolicy's `spec.ttc`: strategy, minSamples, maxSamples, earlyStopAgreement, ...).
    #[arg(long, env = "TTC_POLICY_FILE")]
    ttc_policy: Option<PathBuf>,
    /// A file of keys that sign feedback tickets (one per line, at least 16 bytes each; the first
    /// signs, every one is accepted, for rotation). Replicas of one policy share it, so a ticket
    /// comes back to any of them; without it each process signs with a key of its own.
    #[arg(long, env = sidecar_env::FEEDBACK_KEY_FILE)]
    feedback_key_file: Option<PathBuf>,
    /// Enable test-time compute with the default policy (adaptive, 1-8 samples).
    #[arg(long, env = sidecar_env::ENABLE_TTC)]
    ttc: bool,
    /// Energy allocation of this pod in joules per request (standalone mode; in a cluster the
    /// operator sets it).
    #[arg(long, env = "TTC_JOULES_PER_REQUEST")]
    joules_per_request: Option<f64>,
    /// Power cap of this pod in watts (standalone mode; in a cluster the operator sets it): the
    /// depth is held to the joules per request it allows at the measured request rate.
    #[arg(long, env = "TTC_POWER_CAP_WATTS")]
    power_cap_watts: Option<f64>,
}

/// In a pod the operator injected (`TTC_POLICY_NAME` set), the sidecar follows its policy: the
/// TTC limits of the spec and this pod's allocation from the status.
fn cluster_identity() -> anyhow::Result<Option<PodIdentity>> {
    if std::env::var_os(sidecar_env::POLICY_NAME).is_none() {
        return Ok(None);
    }
    Ok(Some(
        PodIdentity::from_env().context("the injected pod identity is incomplete")?,
    ))
}

/// Applies each new view of the policy to the TTC service, and the receiver CA it publishes to
/// the reports, until the watch ends.
async fn follow_policy(
    identity: PodIdentity,
    service: Arc<TtcService>,
    metrics: SidecarMetrics,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API to watch the InferencePolicy")?;
    let mut views = watch_policy(client, identity.clone());
    tokio::spawn(async move {
        let mut trusted_ca: Option<String> = None;
        // The watch starts empty: no policy yet is not a policy gone.
        let mut seen = false;
        loop {
            let view = views.borrow_and_update().clone();
            match view {
                Some(view) => {
                    seen = true;
                    if let Some(ca) = view
                        .report_ca_bundle
                        .clone()
                        .filter(|ca| trusted_ca.as_ref() != Some(ca))
                    {
                        trusted_ca = Some(ca.clone());
                        let metrics = metrics.clone();
                        match tokio::task::spawn_blocking(move || metrics.trust_report_ca(&ca))
                            .await
                        {
                            Ok(Ok(true)) => {
                                tracing::info!(policy = %identity.policy, "the receiver's CA changed; reports trust the published one")
                            }
                            Ok(Ok(false)) => {}
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, "the receiver CA published in the policy's status is not usable; reports trust the CA they had")
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "trusting the published receiver CA failed")
                            }
                        }
                    }
                    if let Err(e) = service.set_policy(ttc_policy(&view.ttc)) {
                        tracing::warn!(error = %e, "the policy's TTC settings cannot be applied; keeping the previous ones");
                    }
                    service.set_allocation(view.joules_per_request);
                    service.set_power_limits(
                        view.watts,
                        view.joules_per_window,
                        Some(std::time::Duration::from_secs(u64::from(
                            view.window_seconds,
                        ))),
                    );
                    tracing::info!(policy = %identity.policy, joules_per_request = ?view.joules_per_request, watts = ?view.watts, joules_per_window = ?view.joules_per_window, "policy applied");
                }
                None if !seen => {
                    tracing::debug!(policy = %identity.policy, "waiting for the first view of the policy");
                }
                None => {
                    tracing::warn!(policy = %identity.policy, "the policy is gone; serving without a budget");
                    service.set_allocation(None);
                    service.set_power_limits(None, None, None);
                }
            }
            if views.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

fn ttc_service(args: &ServeArgs) -> anyhow::Result<Option<Arc<TtcService>>> {
    let policy: TtcPolicy = match &args.ttc_policy {
        Some(path) => read_policy_file(path)?,
        None if args.ttc
            || args.joules_per_request.is_some()
            || args.power_cap_watts.is_some()
            || std::env::var_os(sidecar_env::POLICY_NAME).is_some() =>
        {
            ttc_policy(&TtcSpec::default())
        }
        None => return Ok(None),
    };
    let mut service = TtcService::new(policy).context("the TTC policy is inconsistent")?;
    match &args.feedback_key_file {
        // The operator mounts the namespace's key Secret as optional: absent, the file is too.
        Some(path) if !path.exists() => tracing::warn!(
            path = %path.display(),
            "no feedback keys there (is the namespace's ttc-feedback-keys Secret missing?); tickets are signed with a key of this process only"
        ),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the feedback keys {}", path.display()))?;
            let keys = TicketKeys::from_lines(&text)
                .with_context(|| format!("the feedback keys in {}", path.display()))?;
            service = service.with_ticket_keys(keys);
        }
        None => tracing::info!(
            "feedback tickets are signed with a key of this process only; replicas behind one Service need --feedback-key-file"
        ),
    }
    if let Some(j) = args.joules_per_request {
        anyhow::ensure!(j > 0.0, "--joules-per-request must be positive, got {j}");
        service.set_allocation(Some(j));
    }
    if let Some(w) = args.power_cap_watts {
        anyhow::ensure!(w > 0.0, "--power-cap-watts must be positive, got {w}");
        service.set_power_limits(Some(w), None, None);
    }
    Ok(Some(Arc::new(service)))
}

fn store(cache: Option<PathBuf>) -> ModelStore {
    cache
        .map(ModelStore::new)
        .unwrap_or_else(ModelStore::default_location)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::FetchModel {
            model,
            force,
            cache,
        } => {
            let known = KNOWN_MODELS
                .iter()
                .find(|m| m.name == model)
                .ok_or_else(|| ModelStoreError::Unknown(model.clone()))?;
            let path = store(cache).ensure(known, force)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Serve(args) => {
            // SAFETY: before any other thread exists (the runtime starts in `serve`).
            unsafe { ttc_sidecar::engine::set_compute_threads(args.threads) };
            serve(*args)
        }
        Command::DeviceCheck(args) => {
            if ttc_sidecar::device_check::run(&args)? {
                Ok(())
            } else {
                std::process::exit(3)
            }
        }
    }
}

/// What the engine takes on at once: the memory budget (given, or derived from the container's
/// limit) and the row and queue caps.
fn admission(args: &ServeArgs, model: &std::path::Path, engine: &Engine) -> Admission {
    let memory_budget_bytes = args.memory_budget_mib.map_or_else(
        || default_memory_budget(model, (args.prefix_cache_mib as u64) << 20),
        |mib| mib << 20,
    );
    let config = AdmissionConfig {
        memory_budget_bytes,
        max_rows: args.max_rows.max(1),
        max_waiting: args.max_waiting,
        max_wait: std::time::Duration::from_secs(args.max_wait_secs),
    };
    tracing::info!(
        memory_budget_mib = memory_budget_bytes >> 20,
        max_rows = config.max_rows,
        max_waiting = config.max_waiting,
        max_wait_secs = args.max_wait_secs,
        "admission"
    );
    Admission::new(config, engine.kv_bytes_per_position())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let path = store(args.cache.clone()).resolve(&args.model)?;
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        if KNOWN_MODELS.iter().any(|m| m.name == args.model) {
            args.model.clone()
        } else {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| args.model.clone())
        }
    });
    let started = std::time::Instant::now();
    let engine = Engine::load(
        &path,
        &name,
        &EngineOptions {
            weights: args.weights,
            cuda: args.cuda,
            kernels: Kernels::default(),
            prefix_cache_bytes: args.prefix_cache_mib << 20,
        },
    )?;
    tracing::info!(model = %name, path = %path.display(), load_ms = started.elapsed().as_millis() as u64, "model loaded");
    let meter = EnergyMeter::from_config(&MeterConfig {
        source: args.energy_source,
        nvml: NvmlConfig {
            lib_path: args.nvml_library.clone(),
            ..NvmlConfig::default()
        },
        estimate: EstimateModel {
            watts_per_core: args.estimate_watts_per_core,
            idle_watts: args.estimate_idle_watts,
        },
        ..MeterConfig::default()
    })
    .context("opening the energy meter")?;
    tracing::info!(
        source = meter.source().as_str(),
        measured = meter.source().is_measured(),
        "energy meter ready"
    );
    let meter_for_metrics = meter.clone();
    let admission = Arc::new(admission(&args, &path, &engine));
    let handle = EngineHandle::spawn(engine, meter)
        .context("starting the engine thread")?
        .with_admission(admission);
    let ttc = ttc_service(&args)?;
    let mut telemetry = TelemetryConfig::from_env(&name);
    if std::env::var_os("OTEL_METRIC_EXPORT_INTERVAL").is_none() {
        // The operator counts a pod silent after 60 s without a report; OTel's default interval
        // is 60 s, so export well within that.
        telemetry.export_interval = Some(std::time::Duration::from_secs(10));
    }
    let metrics = SidecarMetrics::new(&telemetry, Some(meter_for_metrics))
        .context("setting up metrics export")?;
    // The operator works with differences between reports: a first one at start-up is the
    // baseline, so the first interval's requests count too. A failure only means no baseline.
    // Off the start-up path: an unreachable endpoint must not delay serving.
    let first_export = metrics.clone();
    std::thread::spawn(move || {
        if let Err(e) = first_export.force_flush() {
            tracing::warn!(error = %e, "first metrics export failed");
        }
    });
    let state = AppState {
        engine: handle,
        limits: Limits {
            max_n: args.max_n,
            request_timeout: std::time::Duration::from_secs(args.request_timeout_secs.max(1)),
            ..Limits::default()
        },
        ttc,
        metrics: Some(metrics.clone()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let identity = cluster_identity()?;
    let policy_metrics = metrics.clone();
    let served = runtime.block_on(async move {
        if let (Some(identity), Some(service)) = (identity, state.ttc.clone()) {
            follow_policy(identity, service, policy_metrics).await?;
        }
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(address = %args.listen, "serving the OpenAI API");
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("HTTP server failed")
    });
    // Flush the last metrics before exiting; a failed export is logged, not fatal.
    if let Err(e) = metrics.shutdown() {
        tracing::warn!(error = %e, "final metrics export failed");
    }
    served
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
