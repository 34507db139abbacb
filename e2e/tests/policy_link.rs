//! The sidecar's link to the operator, against the real thing: the policy watch against the local
//! API server (e2e/), the OTLP metrics export against the operator's own report receiver.
//!
//! The watch tests need `KUBECONFIG_FOR_TESTS` or `TTC_CONTROL_PLANE_BIN` (see `e2e/test.sh`);
//! without either they fail.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::watch;
use ttc_api::{EnergySource, InferencePolicy};
use ttc_cluster::testing::{TestNamespace, install_crd};
use ttc_energy::{EnergyMeter, MeterConfig, SourceChoice};
use ttc_operator::domain::status::PodEnergy;
use ttc_operator::metrics::Metrics;
use ttc_operator::receiver::{ReportReceiver, router};
use ttc_operator::report_auth::{AuthError, ReportAuthenticator, ReportingPod};
use ttc_operator::reports::{PodReports, ReportBook};
use ttc_operator::serving::{self, TlsMaterial};
use ttc_sidecar::policy_link::{PodIdentity, PolicyView, watch_policy};
use ttc_telemetry::{OtlpExport, RequestRecord, SidecarMetrics, TelemetryConfig};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// How long the API server and the watch get to deliver a change.
const DELIVERY_LIMIT: Duration = Duration::from_secs(30);

fn policy(name: &str, max_samples: u32) -> Result<InferencePolicy, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": "energy.ttc.dev/v1alpha1",
        "kind": "InferencePolicy",
        "metadata": {"name": name},
        "spec": {
            "selector": {},
            "budget": {"joulesPerRequest": 3.0},
            "ttc": {"strategy": "MajorityVote", "maxSamples": max_samples}
        }
    }))
}

async fn set_allocations(
    api: &Api<InferencePolicy>,
    name: &str,
    allocations: serde_json::Value,
) -> TestResult {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"allocations": allocations}})),
    )
    .await?;
    Ok(())
}

/// Waits until the published view satisfies `accept`, failing with the last view seen.
async fn view_where(
    views: &mut watch::Receiver<Option<PolicyView>>,
    what: &str,
    accept: impl FnMut(&Option<PolicyView>) -> bool,
) -> Result<Option<PolicyView>, String> {
    let delivered = match tokio::time::timeout(DELIVERY_LIMIT, views.wait_for(accept)).await {
        Ok(Ok(view)) => Some(view.clone()),
        Ok(Err(_)) => return Err(format!("{what}: the policy watch stopped")),
        Err(_) => None,
    };
    delivered.ok_or_else(|| {
        format!(
            "{what}: not delivered within {DELIVERY_LIMIT:?} (last view: {:?})",
            *views.borrow()
        )
    })
}

#[tokio::test]
async fn the_watch_delivers_this_pods_allocation_as_the_operator_changes_it() -> TestResult {
    let ns = TestNamespace::create("link").await?;
    install_crd(ns.client()).await?;
    let api: Api<InferencePolicy> = ns.api();
    let identity = PodIdentity {
        namespace: ns.name().to_string(),
        pod: "p1".into(),
        policy: "chat".into(),
    };
    // Another policy of the namespace: the field selector keeps it out of this pod's view.
    api.create(&PostParams::default(), &policy("other", 2)?)
        .await?;
    set_allocations(
        &api,
        "other",
        json!([{"pod": "p1", "share": 1.0, "joulesPerRequest": 99.0}]),
    )
    .await?;

    let mut views = watch_policy(ns.client().clone(), identity);
    assert_eq!(
        *views.borrow(),
        None,
        "nothing is known before the first list"
    );

    api.create(&PostParams::default(), &policy("chat", 5)?)
        .await?;
    let view = view_where(&mut views, "the new policy", |v| v.is_some()).await?;
    let view = view.ok_or("a view")?;
    assert_eq!(view.joules_per_request, None, "no allocation yet: {view:?}");
    assert_eq!(view.ttc.max_samples, 5);
    let first_generation = view.generation;

    set_allocations(
        &api,
        "chat",
        json!([
            {"pod": "p0", "share": 0.5, "joulesPerRequest": 7.0, "watts": 70.0},
            {"pod": "p1", "share": 0.5, "joulesPerRequest": 2.5, "watts": 40.0}
        ]),
    )
    .await?;
    let view = view_where(&mut views, "the first allocation", |v| {
        v.as_ref().is_some_and(|v| v.joules_per_request.is_some())
    })
    .await?
    .ok_or("a view")?;
    assert_eq!(view.joules_per_request, Some(2.5), "{view:?}");
    assert_eq!(view.watts, Some(40.0), "{view:?}");

    set_allocations(
        &api,
        "chat",
        json!([{"pod": "p1", "share": 1.0, "joulesPerRequest": 1.25}]),
    )
    .await?;
    let view = view_where(&mut views, "the re-split allocation", |v| {
        v.as_ref()
            .is_some_and(|v| v.joules_per_request == Some(1.25))
    })
    .await?
    .ok_or("a view")?;
    assert_eq!(view.watts, None, "the new entry has no power cap: {view:?}");
    assert_eq!(
        view.generation, first_generation,
        "status writes keep the generation"
    );

    api.patch(
        "chat",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ttc": {"maxSamples": 3}}})),
    )
    .await?;
    let view = view_where(&mut views, "the spec change", |v| {
        v.as_ref().is_some_and(|v| v.ttc.max_samples == 3)
    })
    .await?
    .ok_or("a view")?;
    assert_ne!(view.generation, first_generation, "{view:?}");
    assert_eq!(view.joules_per_request, Some(1.25), "{view:?}");

    api.delete("chat", &DeleteParams::default()).await?;
    view_where(&mut views, "the deletion", |v| v.is_none()).await?;
    Ok(())
}

/// Accepts one token at a time, for pod team-a/p1: the current one of a rotating file.
struct CurrentToken(std::sync::Mutex<String>);

impl ReportAuthenticator for CurrentToken {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<ReportingPod, AuthError>> {
        let current = self.0.lock().map(|t| t.clone()).unwrap_or_default();
        Box::pin(async move {
            if token == current {
                Ok(ReportingPod {
                    namespace: "team-a".into(),
                    pod: "p1".into(),
                })
            } else {
                Err(AuthError::Rejected(format!(
                    "{token} is not the current token"
                )))
            }
        })
    }
}

/// The sidecar's OTLP metrics export, decoded by the operator's own receiver: the operator books
/// the meter's joules (labelled with their source) and the requests and samples the sidecar
/// recorded. The receiver serves TLS as `--receiver-tls` does, and the sidecar trusts its CA
/// alone; it authenticates the export by the bearer token the sidecar reads from its token file
/// at every export, so a token the kubelet rotates is picked up.
/// The operator's report receiver serving TLS on a loopback port, as `--receiver-tls` does: its
/// report book, its OTLP endpoint, its certificate and the server task.
struct TlsReceiver {
    book: Arc<ReportBook>,
    endpoint: String,
    tls: TlsMaterial,
    server: tokio::task::JoinHandle<ttc_operator::error::Result<()>>,
}

fn tls_receiver(
    auth: Option<Arc<dyn ReportAuthenticator>>,
) -> Result<TlsReceiver, Box<dyn std::error::Error + Send + Sync>> {
    let book = Arc::new(ReportBook::new(Duration::from_secs(60)));
    let receiver = Arc::new(ReportReceiver {
        book: book.clone(),
        metrics: Arc::new(Metrics::default()),
        // No controller here to wake.
        wake: None,
        auth,
        refusals: Default::default(),
        leader: None,
    });
    // The operator's process-wide TLS provider, as its main installs it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = TlsMaterial::self_signed(vec!["127.0.0.1".into()])?;
    let listener = serving::bind("127.0.0.1:0".parse()?)?;
    let endpoint = format!("https://{}/v1/metrics", listener.local_addr()?);
    let server = {
        let tls = tls.clone();
        tokio::spawn(async move {
            let pending = std::future::pending();
            serving::serve_tls(
                listener,
                &tls,
                router(receiver),
                pending,
                Duration::from_secs(60),
            )
            .await
        })
    };
    Ok(TlsReceiver {
        book,
        endpoint,
        tls,
        server,
    })
}

/// The telemetry of sidecar team-a/p1 exporting to `endpoint`, trusting `ca_pem` for it.
fn sidecar_telemetry(endpoint: &str, ca_pem: &str, token_file: Option<&Path>) -> TelemetryConfig {
    TelemetryConfig {
        service_name: "ttc-sidecar".into(),
        pod_name: Some("p1".into()),
        namespace: Some("team-a".into()),
        policy: Some("chat".into()),
        model: "smollm2-135m-instruct".into(),
        otlp: OtlpExport::Endpoint(endpoint.to_owned()),
        // The test flushes by hand.
        export_interval: Some(Duration::from_secs(3600)),
        export_timeout: Some(Duration::from_secs(5)),
        bearer_token_file: token_file.map(Path::to_path_buf),
        ca_pem: Some(ca_pem.to_owned()),
    }
}

#[tokio::test]
async fn the_operators_receiver_books_the_sidecars_otlp_export() -> TestResult {
    let authenticator = Arc::new(CurrentToken(std::sync::Mutex::new("token-1".into())));
    let TlsReceiver {
        book,
        endpoint,
        tls,
        server,
    } = tls_receiver(Some(authenticator.clone()))?;
    let token_dir = tempfile::tempdir()?;
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, "token-1\n")?;

    let meter = EnergyMeter::from_config(&MeterConfig {
        source: SourceChoice::Estimate,
        ..MeterConfig::default()
    })?;
    let config = sidecar_telemetry(&endpoint, &tls.ca_pem, Some(&token_file));
    let impostor_config = TelemetryConfig {
        ca_pem: Some(TlsMaterial::self_signed(vec!["127.0.0.1".into()])?.ca_pem),
        ..config.clone()
    };
    let exporter_meter = meter.clone();
    let metrics =
        tokio::task::spawn_blocking(move || SidecarMetrics::new(&config, Some(exporter_meter)))
            .await??;
    // The operator takes differences between reports, so a first export sets the baseline (the
    // sidecar exports one at start-up for the same reason).
    let flushing = metrics.clone();
    tokio::task::spawn_blocking(move || flushing.force_flush()).await??;
    // The kubelet rotates the token: the old one is refused from now on.
    std::fs::write(&token_file, "token-2\n")?;
    *authenticator.0.lock().map_err(|e| e.to_string())? = "token-2".into();
    for depth in [4u64, 2, 1] {
        let batch = meter.begin_batch();
        // Burn a little CPU so the estimate has something to price.
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {
            std::hint::black_box(spin.elapsed());
        }
        let share = batch.finish(&[((), 10)]);
        metrics.record_request(&RequestRecord {
            operation: "chat",
            input_tokens: 10,
            output_tokens: 5,
            duration: Duration::from_millis(20),
            time_per_output_token: None,
            energy: Some((share.joules(), share.source)),
            strategy: "vote",
            depth,
            error_type: None,
        });
    }
    let flushing = metrics.clone();
    tokio::task::spawn_blocking(move || flushing.force_flush()).await??;
    // A sidecar that trusts another CA does not talk to this receiver: its export fails.
    let impostor = tokio::task::spawn_blocking(move || {
        let metrics = SidecarMetrics::new(&impostor_config, None)?;
        Ok::<_, ttc_telemetry::TelemetryError>(metrics.force_flush())
    })
    .await??;
    assert!(
        impostor.is_err(),
        "an export to a receiver whose CA it does not trust went through"
    );
    server.abort();

    let PodReports::Fresh(energy) =
        book.pod_energy("team-a", "p1", Duration::from_secs(3600), Instant::now())
    else {
        return Err("the receiver holds no fresh reports of team-a/p1".into());
    };
    let PodEnergy {
        joules,
        requests,
        samples,
        source,
        ..
    } = energy;
    assert_eq!((requests, samples), (3, 7));
    assert_eq!(
        source,
        EnergySource::Estimate,
        "an estimate must reach the operator as one"
    );
    let metered = meter.totals().metered_uj as f64 / 1e6;
    assert!(
        joules > 0.0 && joules <= metered + 1e-9,
        "booked {joules} J, meter {metered} J"
    );
    Ok(())
}

/// A sidecar created with a CA the receiver no longer serves (the operator's CA changed) cannot
/// report; once it trusts the CA the operator publishes in the policy's status, its export
/// reaches the receiver again, without a restart.
#[tokio::test]
async fn a_sidecar_trusting_the_published_ca_reports_again_after_a_ca_change() -> TestResult {
    let receiver = tls_receiver(None)?;
    let old_ca = TlsMaterial::self_signed(vec!["127.0.0.1".into()])?.ca_pem;
    let config = sidecar_telemetry(&receiver.endpoint, &old_ca, None);
    let meter = EnergyMeter::from_config(&MeterConfig {
        source: SourceChoice::Estimate,
        ..MeterConfig::default()
    })?;
    let metrics =
        tokio::task::spawn_blocking(move || SidecarMetrics::new(&config, Some(meter))).await??;
    let flushing = metrics.clone();
    let before = tokio::task::spawn_blocking(move || flushing.force_flush()).await?;
    assert!(
        before.is_err(),
        "an export trusting the old CA went through"
    );

    let published = receiver.tls.ca_pem.clone();
    let trusting = metrics.clone();
    assert!(tokio::task::spawn_blocking(move || trusting.trust_report_ca(&published)).await??);
    let flushing = metrics.clone();
    tokio::task::spawn_blocking(move || flushing.force_flush()).await??;
    receiver.server.abort();
    assert!(
        matches!(
            receiver
                .book
                .pod_energy("team-a", "p1", Duration::from_secs(3600), Instant::now()),
            PodReports::Fresh(_)
        ),
        "the receiver holds no report of team-a/p1"
    );
    Ok(())
}
