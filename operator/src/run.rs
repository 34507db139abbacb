//! Wiring: caches (reflectors), leader election, the controller and the three HTTP servers.
//!
//! Every replica keeps the caches and serves the webhook; only the replica holding the Lease
//! writes status and events, and takes the sidecars' reports: the others refuse them with 503
//! and close the connection, so a sidecar's retry reaches another replica through the Service.
//! Reports are kept in memory by the leader, so after a failover the new leader rebuilds its
//! view within one staleness period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, ResourceRequirements};
use kube::api::PartialObjectMeta;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::{error, info, warn};
use ttc_api::InferencePolicy;
use ttc_api::report::DEFAULT_RECEIVER_PORT;

use crate::admin::Admin;
use crate::controller::{Context, ReconcileSettings, error_policy, policies_selecting, reconcile};
use crate::domain::injection::SidecarDefaults;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::receiver::ReportReceiver;
use crate::report_auth::{ReportAuthMode, TokenReviewer};
use crate::reports::ReportBook;
use crate::serving::{self, TlsMaterial};
use crate::watches::{Deleted, metadata_watch, policy_events, triggers};
use crate::webhook::{Injector, WebhookTarget};

/// Everything the operator is configured with.
#[derive(Debug, Clone, clap::Args)]
pub struct OperatorConfig {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "TTC_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Address of the admission webhook (TLS).
    #[arg(long, env = "TTC_WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    pub webhook_addr: SocketAddr,
    /// Address of the energy report receiver (OTLP/HTTP and JSON).
    #[arg(long, env = "TTC_RECEIVER_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_RECEIVER_PORT)))]
    pub receiver_addr: SocketAddr,
    /// How the receiver authenticates reports: `token-review` (sidecars get a projected
    /// service-account token for audience `ttc-operator`; each reports only for its own pod;
    /// the operator needs `create` on `tokenreviews`) or `none`.
    #[arg(long, env = "TTC_REPORT_AUTH", value_enum, default_value_t = ReportAuthMode::None)]
    pub report_auth: ReportAuthMode,
    /// Serve the report receiver over TLS with the webhook's certificate, and give injected
    /// sidecars that report to it its CA (`TTC_REPORT_CA_PEM`), so that their reports and tokens
    /// never cross the network in the clear. Needs the certificate from files
    /// (`--tls-cert-file`: every replica must present the same one) and an `https://`
    /// `--otlp-endpoint` its names cover; an `http://` one is taken for a collector of your own.
    #[arg(
        long,
        env = "TTC_RECEIVER_TLS",
        requires = "tls_cert_file",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub receiver_tls: bool,
    /// Sidecar image injected when a policy names none.
    #[arg(
        long,
        env = "TTC_SIDECAR_IMAGE",
        default_value = "ghcr.io/ttc-operator/ttc-sidecar:0.1.0"
    )]
    pub sidecar_image: String,
    /// Model served when a policy names none.
    #[arg(
        long,
        env = "TTC_DEFAULT_MODEL",
        default_value = "smollm2-135m-instruct"
    )]
    pub default_model: String,
    /// OTLP endpoint given to sidecars when a policy names none (this operator's receiver).
    #[arg(
        long,
        env = "TTC_OTLP_ENDPOINT",
        default_value_t = format!("http://ttc-operator.ttc-system.svc:{DEFAULT_RECEIVER_PORT}")
    )]
    pub otlp_endpoint: String,
    /// Sidecar resources (JSON ResourceRequirements) when a policy sets none.
    #[arg(long, env = "TTC_SIDECAR_RESOURCES")]
    pub sidecar_resources: Option<String>,
    /// Cluster-wide power cap split among policies by priority, in watts.
    #[arg(long, env = "TTC_CLUSTER_POWER_CAP_WATTS", value_parser = positive_watts)]
    pub cluster_power_cap_watts: Option<f64>,
    /// Seconds between status recomputations of a policy.
    #[arg(long, env = "TTC_RESYNC_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub resync_seconds: u64,
    /// Seconds without a report after which a sidecar is stale.
    #[arg(long, env = "TTC_STALE_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub stale_seconds: u64,
    /// Name of the leader-election Lease.
    #[arg(long, env = "TTC_LEASE_NAME", default_value = "ttc-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (the operator's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Identity of this replica in the Lease and in events.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// PEM certificate of the webhook; self-signed when absent.
    #[arg(long, env = "TTC_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM key of the webhook.
    #[arg(long, env = "TTC_TLS_KEY_FILE")]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// PEM CA for the webhook configuration's caBundle (default: the certificate).
    #[arg(long, env = "TTC_TLS_CA_FILE")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Seconds between checks of the certificate and CA files for a change (a renewal is
    /// served, a new CA passed on to sidecars, without a restart).
    #[arg(long, env = "TTC_CERTIFICATE_CHECK_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub certificate_check_seconds: u64,
    /// Names in the self-signed certificate.
    #[arg(
        long,
        env = "TTC_TLS_NAMES",
        value_delimiter = ',',
        default_value = "ttc-operator.ttc-system.svc,localhost,127.0.0.1"
    )]
    pub tls_names: Vec<String>,
    /// Apply a MutatingWebhookConfiguration of this name pointing at this webhook on start.
    #[arg(long, env = "TTC_WEBHOOK_CONFIG_NAME")]
    pub webhook_config_name: Option<String>,
    /// The webhook's URL for that configuration (control plane outside the cluster network).
    #[arg(long, env = "TTC_WEBHOOK_URL", conflicts_with = "webhook_service")]
    pub webhook_url: Option<String>,
    /// The webhook's Service for that configuration, as namespace/name:port.
    #[arg(long, env = "TTC_WEBHOOK_SERVICE")]
    pub webhook_service: Option<String>,
}

/// A power cap: a finite number of watts above zero.
fn positive_watts(text: &str) -> std::result::Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(watts) if watts.is_finite() && watts > 0.0 => Ok(watts),
        Ok(_) => Err(format!("{text} W is no power cap (want watts above 0)")),
        Err(_) => Err(format!("{text:?} is not a number of watts")),
    }
}

impl OperatorConfig {
    fn sidecar_defaults(&self, tls: &TlsMaterial) -> Result<SidecarDefaults> {
        let reports_over_tls = self.otlp_endpoint.starts_with("https://");
        if self.receiver_tls && !reports_over_tls {
            warn!(
                endpoint = %self.otlp_endpoint,
                "the receiver serves TLS (--receiver-tls) but sidecars are told to report to a plain http:// endpoint: unless a collector there forwards to the receiver, their reports will not arrive; set --otlp-endpoint to the receiver's https:// URL"
            );
        }
        let resources = match &self.sidecar_resources {
            Some(json) => Some(serde_json::from_str::<ResourceRequirements>(json).map_err(
                |e| {
                    Error::Config(format!(
                        "--sidecar-resources is not a JSON ResourceRequirements: {e}"
                    ))
                },
            )?),
            None => None,
        };
        Ok(SidecarDefaults {
            image: self.sidecar_image.clone(),
            model_name: self.default_model.clone(),
            otlp_endpoint: self.otlp_endpoint.clone(),
            resources,
            report_token: self.report_auth == ReportAuthMode::TokenReview,
            report_ca_pem: (self.receiver_tls && reports_over_tls).then(|| tls.ca_pem.clone()),
        })
    }

    fn webhook_target(&self) -> Result<Option<WebhookTarget>> {
        if let Some(url) = &self.webhook_url {
            return Ok(Some(WebhookTarget::Url(url.clone())));
        }
        let Some(service) = &self.webhook_service else {
            return Ok(None);
        };
        let invalid = || {
            Error::Config(format!(
                "--webhook-service {service}: expected namespace/name:port"
            ))
        };
        let (namespace, rest) = service.split_once('/').ok_or_else(invalid)?;
        let (name, port) = rest.split_once(':').ok_or_else(invalid)?;
        let port = port.parse().map_err(|_| invalid())?;
        Ok(Some(WebhookTarget::Service {
            namespace: namespace.into(),
            name: name.into(),
            port,
        }))
    }

    /// The file the CA is read from (the certificate itself when no CA file is named); `None`
    /// for a generated certificate.
    fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.tls_cert_file.as_ref()?;
        self.tls_ca_file
            .clone()
            .or_else(|| self.tls_cert_file.clone())
    }

    fn tls(&self) -> Result<TlsMaterial> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                TlsMaterial::from_files(cert, key, self.tls_ca_file.as_deref())
            }
            _ => TlsMaterial::self_signed(self.tls_names.clone()),
        }
    }
}

/// A signal that resolves once shutdown has begun.
// Spelled out: `Controller::graceful_shutdown_on` needs the future to be `Sync` too.
#[allow(clippy::manual_async_fn)]
pub fn shutdown_signal(
    mut rx: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
    async move {
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

async fn leadership(
    client: Client,
    config: &OperatorConfig,
    identity: &str,
) -> Result<(watch::Receiver<bool>, tokio::task::JoinHandle<()>)> {
    let manager = LeaseManagerBuilder::new(client, &config.lease_name)
        .with_namespace(&config.lease_namespace)
        .with_identity(identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .map_err(|e| Error::LeaderElection(e.to_string()))?;
    let (rx, handle) = manager.watch().await;
    let handle = tokio::spawn(async move {
        match handle.await {
            Ok(Ok(_)) => info!("leader lease released"),
            Ok(Err(e)) => warn!(error = %e, "leader election ended with an error"),
            Err(e) => warn!(error = %e, "leader election task failed"),
        }
    });
    Ok((rx, handle))
}

/// Runs the operator until `shutdown` turns true: the caches, the HTTP servers (admin, report
/// receiver, webhook), the lease, background upkeep, then the controller; on shutdown, the servers
/// drain and the lease is released.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let book = Arc::new(ReportBook::new(Duration::from_secs(config.stale_seconds)));
    let identity = config
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "ttc-operator".into());

    // Caches shared by the controller and the webhook.
    let (policies, policy_writer) = reflector::store::<InferencePolicy>();
    let (pods, pod_writer) = reflector::store::<PartialObjectMeta<Pod>>();
    let (namespaces, namespace_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
    let policy_stream = triggers(
        "policies",
        Deleted::Ignored,
        reflector::reflector(
            policy_writer,
            policy_events(client.clone(), metrics.clone()),
        ),
    );
    let pod_stream = triggers(
        "pods",
        Deleted::Triggers,
        reflector::reflector(
            pod_writer,
            metadata_watch::<Pod>(&client, watcher::Config::default().any_semantic()),
        ),
    )
    // Pods change often (status, IPs); only label, injection or deletion changes matter.
    .predicate_filter(crate::controller::pod_fingerprint, Default::default());
    let namespace_stream = triggers(
        "namespaces",
        Deleted::Triggers,
        reflector::reflector(
            namespace_writer,
            metadata_watch::<Namespace>(&client, watcher::Config::default()),
        ),
    );

    let (leader, lease_task) = leadership(client.clone(), &config, &identity).await?;
    let (wake, woken) = tokio::sync::mpsc::channel(1024);
    let servers = Servers::start(
        &client,
        &config,
        ServerParts {
            metrics: metrics.clone(),
            book: book.clone(),
            policies: policies.clone(),
            leader: leader.clone(),
            wake,
        },
        &shutdown,
    )
    .await?;
    spawn_readiness(&servers.admin, &policies, &pods, &namespaces);
    spawn_upkeep(
        book.clone(),
        metrics.clone(),
        policies.clone(),
        leader.clone(),
        shutdown.clone(),
    );

    // Reconcile everything whenever this replica becomes the leader.
    let became_leader = futures::stream::unfold(leader.clone(), |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            if *rx.borrow_and_update() {
                return Some(((), rx));
            }
        }
    });
    // A changed receiver CA goes into every policy's status at once (not at the next resync).
    let ca_changed = futures::stream::unfold(servers.report_ca.clone(), |followed| async move {
        let mut followed = followed?;
        followed.changed().await.ok()?;
        Some(((), Some(followed)))
    });
    let settings = ReconcileSettings {
        cluster_power_cap_watts: config.cluster_power_cap_watts,
        requeue_after: Duration::from_secs(config.resync_seconds),
        stale_after: Duration::from_secs(config.stale_seconds),
        report_ca: servers.report_ca.clone(),
    };
    let reporter = Reporter {
        controller: "ttc-operator".into(),
        instance: Some(identity.clone()),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        policies.clone(),
        pods.clone(),
        namespaces.clone(),
        book,
        settings,
        leader,
        reporter,
        metrics.clone(),
    ));
    let for_pods = policies.clone();
    let for_namespaces = policies.clone();
    info!(%identity, "starting controller");
    Controller::for_stream(policy_stream, policies)
        .watches_stream(pod_stream, move |pod| policies_selecting(&for_pods, &pod))
        .watches_stream(namespace_stream, move |ns: PartialObjectMeta<Namespace>| {
            let name = ns.name_any();
            for_namespaces
                .state_filter(|p| p.metadata.namespace.as_deref() == Some(name.as_str()))
                .iter()
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .reconcile_all_on(futures::stream::select(became_leader, ca_changed))
        .reconcile_on(futures::stream::unfold(woken, |mut rx| async move {
            rx.recv().await.map(|policy| (policy, rx))
        }))
        .with_config(
            controller::Config::default()
                .concurrency(8)
                .debounce(Duration::from_millis(200)),
        )
        .graceful_shutdown_on(shutdown_signal(shutdown.clone()))
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                match e {
                    controller::Error::ReconcilerFailed(err, obj) => {
                        tracing::debug!(policy = %obj, error = %err, "reconcile failed")
                    }
                    other => warn!(error = %other, "controller error"),
                }
            }
        })
        .await;
    info!("controller stopped; stopping servers and releasing the lease");
    servers.stop().await;
    // The context (holding a leader receiver) is dropped with the controller; the lease task
    // then releases the lease.
    let _ = tokio::time::timeout(Duration::from_secs(5), lease_task).await;
    Ok(())
}

/// What the HTTP servers share with the controller.
struct ServerParts {
    metrics: Arc<Metrics>,
    book: Arc<ReportBook>,
    policies: reflector::Store<InferencePolicy>,
    leader: watch::Receiver<bool>,
    wake: tokio::sync::mpsc::Sender<ObjectRef<InferencePolicy>>,
}

/// The admin server, the report receiver and the webhook (on a thread of its own), running.
struct Servers {
    admin: Arc<Admin>,
    /// The receiver CA sidecars trust, followed from its file where there is one.
    report_ca: Option<watch::Receiver<String>>,
    tasks: tokio::task::JoinSet<Result<()>>,
    webhook_thread: std::thread::JoinHandle<Result<()>>,
}

impl Servers {
    async fn start(
        client: &Client,
        config: &OperatorConfig,
        parts: ServerParts,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Self> {
        let admin = Arc::new(Admin {
            ready: Default::default(),
            metrics: parts.metrics.clone(),
        });
        let receiver = Arc::new(ReportReceiver {
            book: parts.book,
            metrics: parts.metrics.clone(),
            wake: Some(parts.wake),
            auth: match config.report_auth {
                ReportAuthMode::None => None,
                ReportAuthMode::TokenReview => Some(Arc::new(TokenReviewer::new(client.clone()))),
            },
            refusals: Default::default(),
            leader: Some(parts.leader),
        });
        let tls = config.tls()?;
        let check_every = Duration::from_secs(config.certificate_check_seconds);
        let defaults = config.sidecar_defaults(&tls)?;
        // Where sidecars trust the receiver's CA, they follow its file: new pods are injected
        // with the current CA, running ones read it from their policy's status.
        let report_ca = defaults
            .report_ca_pem
            .clone()
            .map(|loaded| match config.ca_file() {
                Some(file) => serving::follow_ca_file(file, loaded, check_every),
                None => tokio::sync::watch::channel(loaded).1,
            });
        let injector = Arc::new(Injector {
            policies: parts.policies,
            defaults,
            report_ca: report_ca.clone(),
            metrics: parts.metrics,
        });
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(serving::serve_plain(
            serving::bind(config.admin_addr)?,
            crate::admin::router(admin.clone()),
            shutdown_signal(shutdown.clone()),
        ));
        let receiver_listener = serving::bind(config.receiver_addr)?;
        let receiver_router = crate::receiver::router(receiver);
        let signal = shutdown_signal(shutdown.clone());
        if config.receiver_tls {
            let tls = tls.clone();
            tasks.spawn(async move {
                serving::serve_tls(
                    receiver_listener,
                    &tls,
                    receiver_router,
                    signal,
                    check_every,
                )
                .await
            });
        } else {
            tasks.spawn(serving::serve_plain(
                receiver_listener,
                receiver_router,
                signal,
            ));
        }
        let webhook_thread = spawn_webhook(
            serving::bind(config.webhook_addr)?,
            tls.clone(),
            crate::webhook::router(injector),
            shutdown_signal(shutdown.clone()),
            check_every,
        )?;
        if let (Some(name), Some(target)) = (&config.webhook_config_name, config.webhook_target()?)
        {
            let configuration = crate::webhook::webhook_configuration(name, &target, &tls.ca_pem);
            crate::webhook::apply_webhook_configuration(client.clone(), &configuration).await?;
            info!(%name, "webhook configuration applied");
        }
        Ok(Self {
            admin,
            report_ca,
            tasks,
            webhook_thread,
        })
    }

    /// Waits for every server to drain (they stop on the shutdown signal).
    async fn stop(mut self) {
        while let Some(result) = self.tasks.join_next().await {
            match result {
                Ok(Err(e)) => error!(error = %e, "server failed"),
                Err(e) => error!(error = %e, "server task failed"),
                Ok(Ok(())) => {}
            }
        }
        let thread = self.webhook_thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(Err(e))) => error!(error = %e, "webhook server failed"),
            Ok(Err(_)) | Err(_) => error!("webhook thread panicked"),
            Ok(Ok(Ok(()))) => {}
        }
    }
}

/// The webhook on a thread and runtime of its own, so that admissions never queue behind a burst
/// of reconciles (pod creation latency is on the webhook's path, not the controller's).
fn spawn_webhook(
    listener: std::net::TcpListener,
    tls: TlsMaterial,
    router: axum::Router,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
    check_every: Duration,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    std::thread::Builder::new()
        .name("ttc-webhook".into())
        .spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Serve(format!("webhook runtime: {e}")))?;
            runtime.block_on(serving::serve_tls(
                listener,
                &tls,
                router,
                signal,
                check_every,
            ))
        })
        .map_err(|e| Error::Serve(format!("webhook thread: {e}")))
}

/// Marks the operator ready once every cache has synced.
fn spawn_readiness(
    admin: &Arc<Admin>,
    policies: &reflector::Store<InferencePolicy>,
    pods: &reflector::Store<PartialObjectMeta<Pod>>,
    namespaces: &reflector::Store<PartialObjectMeta<Namespace>>,
) {
    let (policies, pods, namespaces, admin) = (
        policies.clone(),
        pods.clone(),
        namespaces.clone(),
        admin.clone(),
    );
    tokio::spawn(async move {
        if synced(&policies).await && synced(&pods).await && synced(&namespaces).await {
            admin.ready.store(true, Ordering::Relaxed);
            info!("caches synced; ready");
        }
    });
}

/// Every minute, and whenever leadership changes: the leader and policy gauges, and stale
/// reports pruned.
fn spawn_upkeep(
    book: Arc<ReportBook>,
    metrics: Arc<Metrics>,
    policies: reflector::Store<InferencePolicy>,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            metrics.leader.set(i64::from(*leader.borrow_and_update()));
            metrics.policies.set(policies.state().len() as i64);
            tokio::select! {
                _ = tick.tick() => book.prune(std::time::Instant::now()),
                _ = leader.changed() => {}
                _ = shutdown.changed() => return,
            }
        }
    });
}

/// Whether `store` has synced (false: its writer is gone).
///
/// `Store::wait_until_ready` wakes only the last task that polled it (one waker per store), and
/// the controller polls the policy store too; so poll again every half second instead of
/// waiting for a wake-up that may go to the other task.
async fn synced<K>(store: &reflector::Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(result) =
            tokio::time::timeout(Duration::from_millis(500), store.wait_until_ready()).await
        {
            return result.is_ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        config: OperatorConfig,
    }

    fn parse(args: &[&str]) -> std::result::Result<OperatorConfig, clap::Error> {
        use clap::Parser as _;
        Cli::try_parse_from(std::iter::once("ttc-operator").chain(args.iter().copied()))
            .map(|cli| cli.config)
    }

    #[test]
    fn receiver_tls_needs_certificate_files_and_gives_sidecars_the_ca_for_https_reports()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let err = parse(&["--receiver-tls"])
            .err()
            .ok_or("accepted without certificate files")?;
        assert!(err.to_string().contains("--tls-cert-file"), "{err}");
        let files = [
            "--receiver-tls",
            "--tls-cert-file",
            "/etc/tls/tls.crt",
            "--tls-key-file",
            "/etc/tls/tls.key",
        ];
        let tls = TlsMaterial::self_signed(vec!["ttc-operator.ttc-system.svc".into()])?;
        let mut https = files.to_vec();
        https.extend([
            "--otlp-endpoint",
            "https://ttc-operator.ttc-system.svc:4318",
        ]);
        let config = parse(&https)?;
        assert!(config.receiver_tls);
        assert_eq!(
            config.sidecar_defaults(&tls)?.report_ca_pem,
            Some(tls.ca_pem.clone())
        );
        // A plain http:// endpoint is a collector of the user's: no CA for it (and a warning).
        let config = parse(&files)?;
        assert_eq!(config.sidecar_defaults(&tls)?.report_ca_pem, None);
        // Off by default.
        assert!(!parse(&[])?.receiver_tls);
        assert_eq!(parse(&[])?.sidecar_defaults(&tls)?.report_ca_pem, None);
        Ok(())
    }

    #[test]
    fn intervals_and_the_power_cap_must_be_positive() -> std::result::Result<(), clap::Error> {
        for (args, named) in [
            (&["--resync-seconds", "0"][..], "--resync-seconds"),
            (&["--stale-seconds", "0"][..], "--stale-seconds"),
            (&["--cluster-power-cap-watts", "0"][..], "above 0"),
            (&["--cluster-power-cap-watts=-5"][..], "above 0"),
            (
                &["--cluster-power-cap-watts", "lots"][..],
                "not a number of watts",
            ),
        ] {
            let Err(err) = parse(args) else {
                panic!("{args:?} was accepted");
            };
            assert!(err.to_string().contains(named), "{args:?}: {err}");
        }
        let config = parse(&[
            "--cluster-power-cap-watts",
            "1500.5",
            "--resync-seconds",
            "1",
        ])?;
        assert_eq!(config.cluster_power_cap_watts, Some(1500.5));
        assert_eq!(config.resync_seconds, 1);
        Ok(())
    }
}
