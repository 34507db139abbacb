//! `ttc-cluster`: runs the local control plane in the foreground.
//!
//! `ttc-cluster up` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
//! kwok (and with `--real-node`, a node that runs the project's images: see `ttc_cluster::node`),
//! writes `<state-dir>/kubeconfig`, then `<state-dir>/ready` once the cluster can run
//! pods, and keeps running until SIGINT or SIGTERM. `ttc-cluster down` stops the cluster
//! running in a state directory.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use ttc_cluster::images::Images;
use ttc_cluster::node::NodeConfig;
use ttc_cluster::{ClusterConfig, GpuNodeSpec, LocalCluster};

/// A marker that says a state directory belongs to ttc-cluster and may be wiped.
const OWNER_MARKER: &str = ".ttc-cluster";

#[derive(Parser)]
#[command(about = "A local Kubernetes control plane with simulated GPU nodes")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster and keep it running until SIGINT or SIGTERM.
    Up(UpArgs),
    /// Stop the cluster running in a state directory.
    Down {
        /// The state directory given to `up`.
        #[arg(long, env = "TTC_CLUSTER_STATE_DIR", default_value_os_t = default_state_dir())]
        state_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct UpArgs {
    /// Where etcd data, certificates, logs, the kubeconfig and the ready marker go. Wiped at
    /// start if a previous ttc-cluster used it.
    #[arg(long, env = "TTC_CLUSTER_STATE_DIR", default_value_os_t = default_state_dir())]
    state_dir: PathBuf,
    /// The directory printed by e2e/controlplane/build.sh.
    #[arg(long, env = "TTC_CONTROL_PLANE_BIN")]
    bin_dir: PathBuf,
    /// Number of simulated GPU nodes.
    #[arg(long, default_value_t = 3)]
    gpu_nodes: u8,
    /// GPUs per node.
    #[arg(long, default_value_t = GpuNodeSpec::default().gpus)]
    gpus_per_node: u32,
    /// GPU model label (nvidia.com/gpu.product).
    #[arg(long, default_value_t = GpuNodeSpec::default().product)]
    gpu_product: String,
    /// Add a real node (kubelet, containerd, kube-proxy) that runs the images of this directory
    /// (printed by e2e/images/build.sh). Needs root.
    #[arg(long, env = "TTC_IMAGES_DIR")]
    images_dir: Option<PathBuf>,
    /// Start the real node (see --images-dir).
    #[arg(long, requires = "images_dir")]
    real_node: bool,
    /// Seconds each component may take to become ready.
    #[arg(long, default_value_t = 120)]
    ready_timeout: u64,
    /// Stop the cluster when the process that started ttc-cluster exits (for scripts).
    #[arg(long)]
    exit_with_parent: bool,
}

fn default_state_dir() -> PathBuf {
    std::env::temp_dir().join("ttc-cluster")
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    // The client logs every failed readiness poll as an error.
                    "info,kube_client::client::builder=off",
                )
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    match cli.command {
        Cmd::Up(args) => runtime.block_on(up(args)),
        Cmd::Down { state_dir } => down(&state_dir),
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    if args.exit_with_parent {
        // SAFETY: prctl(PR_SET_PDEATHSIG) has no memory-safety preconditions. This runs on the
        // main thread before any other thread exists, so the signal is tied to our parent.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) } != 0 {
            bail!(
                "prctl(PR_SET_PDEATHSIG): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let state = &args.state_dir;
    let _lock = prepare_state_dir(state)?;
    let pid_file = state.join("pid");
    std::fs::write(&pid_file, std::process::id().to_string())
        .with_context(|| format!("writing {}", pid_file.display()))?;

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut config = ClusterConfig::new(&args.bin_dir, state);
    config.gpu_nodes = args.gpu_nodes;
    config.node_spec.gpus = args.gpus_per_node;
    config.node_spec.product = args.gpu_product;
    config.ready_timeout = Duration::from_secs(args.ready_timeout);
    if let Some(dir) = args.images_dir.as_deref().filter(|_| args.real_node) {
        config.node = Some(NodeConfig {
            images: Images::load(dir)?,
        });
    }

    let started = std::time::Instant::now();
    let mut cluster = tokio::select! {
        cluster = LocalCluster::start(config) => cluster?,
        _ = sigterm.recv() => bail!("interrupted by SIGTERM during start-up"),
        _ = sigint.recv() => bail!("interrupted by SIGINT during start-up"),
    };
    let ready = state.join("ready");
    let tmp = state.join("ready.tmp");
    std::fs::write(&tmp, format!("{}\n", cluster.kubeconfig().display()))
        .and_then(|()| std::fs::rename(&tmp, &ready))
        .with_context(|| format!("writing {}", ready.display()))?;
    tracing::info!(
        "cluster ready in {:.1}s: {}; logs in {}",
        started.elapsed().as_secs_f64(),
        cluster.server_url(),
        state.join("logs").display()
    );
    println!("export KUBECONFIG={}", cluster.kubeconfig().display());

    let mut watchdog = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            _ = sigterm.recv() => break Ok(()),
            _ = sigint.recv() => break Ok(()),
            _ = watchdog.tick() => {
                if let Err(e) = cluster.check_running() {
                    break Err(anyhow::Error::new(e).context("the cluster failed"));
                }
            }
        }
    };
    let _ = std::fs::remove_file(&ready);
    tracing::info!("stopping the cluster");
    let stopped = cluster
        .stop(Duration::from_secs(10))
        .context("stopping the cluster");
    let _ = std::fs::remove_file(&pid_file);
    outcome.and(stopped)
}

/// Creates the state directory, or empties one a previous ttc-cluster left, and locks it for
/// the life of this process. Refuses a directory with other contents, or one whose cluster
/// still runs. The returned file holds the lock.
fn prepare_state_dir(state: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    let lock =
        std::fs::File::open(state).with_context(|| format!("opening {}", state.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = running_pid(state).unwrap_or(-1);
        return Err(ttc_cluster::Error::AlreadyRunning {
            state_dir: state.into(),
            pid,
        }
        .into());
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(state)
        .with_context(|| format!("reading {}", state.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", state.display()))?;
    if !entries.is_empty() && !state.join(OWNER_MARKER).is_file() {
        return Err(ttc_cluster::Error::ForeignStateDir(state.into()).into());
    }
    for path in entries {
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("removing {} from a previous run", path.display()))?;
    }
    std::fs::write(state.join(OWNER_MARKER), "")
        .with_context(|| format!("writing {}", state.join(OWNER_MARKER).display()))?;
    Ok(lock)
}

/// The pid of a live ttc-cluster that owns `state`, if any.
fn running_pid(state: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(state.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive.then_some(pid)
}

fn down(state: &Path) -> anyhow::Result<()> {
    let Some(pid) = running_pid(state) else {
        println!("no cluster is running in {}", state.display());
        return Ok(());
    };
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        bail!(
            "sending SIGTERM to ttc-cluster (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while running_pid(state).is_some() {
        if std::time::Instant::now() >= deadline {
            bail!(
                "ttc-cluster (pid {pid}) still runs 60s after SIGTERM; its components' logs are in {}",
                state.join("logs").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("stopped the cluster in {}", state.display());
    Ok(())
}
