//! The sidecar's link to the operator, against the real thing: the policy watch against the local
//! API server (e2e/), the reporter against the operator's own report receiver.
//!
//! The watch tests need `KUBECONFIG_FOR_TESTS` or `TTC_CONTROL_PLANE_BIN` (see `e2e/test.sh`);
//! without either they fail.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use ttc_crds::{EnergySource, InferencePolicy};
use ttc_e2e::testing::TestNamespace;
use ttc_operator::domain::status::PodEnergy;
use ttc_operator::metrics::Metrics;
use ttc_operator::receiver::{ReportReceiver, router};
use ttc_operator::reports::{PodReports, ReportBook};
use ttc_sidecar::policy_link::{
    PodIdentity, PolicyView, UsageCounters, report_url, run_reporter, watch_policy,
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// How long the API server and the watch get to deliver a change.
const DELIVERY_LIMIT: Duration = Duration::from_secs(30);

/// Applies the committed CRD manifest and waits until it is established.
async fn install_crd(client: &Client) -> TestResult {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crds")
        .join(ttc_crds::CRD_MANIFEST_PATH);
    let crd: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(path)?)?;
    let name = crd.metadata.name.clone().ok_or("CRD without a name")?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply("ttc-sidecar-tests").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    let deadline = Instant::now() + DELIVERY_LIMIT;
    loop {
        let established = api
            .get(&name)
            .await?
            .status
            .and_then(|s| s.conditions)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if established {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("CRD {name} not established after {DELIVERY_LIMIT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

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

#[tokio::test]
async fn the_operators_receiver_gets_the_cumulative_counters() -> TestResult {
    let book = Arc::new(ReportBook::new(Duration::from_secs(60)));
    let receiver = Arc::new(ReportReceiver {
        book: book.clone(),
        metrics: Arc::new(Metrics::default()),
        // No controller here to wake.
        wake: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, router(receiver)).await });

    let identity = PodIdentity {
        namespace: "team-a".into(),
        pod: "p1".into(),
        policy: "chat".into(),
    };
    let counters = Arc::new(UsageCounters::new());
    counters.set_watts(Some(42.0));
    let shutdown = CancellationToken::new();
    let reporter = tokio::spawn(run_reporter(
        report_url(&endpoint)?,
        identity,
        counters.clone(),
        EnergySource::Rapl,
        Duration::from_millis(200),
        shutdown.clone(),
    ));

    // The first report goes out at once, with the counters still at zero.
    let deadline = Instant::now() + Duration::from_secs(10);
    while book.is_empty() {
        if Instant::now() >= deadline {
            return Err("no report reached the receiver within 10s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    counters.record_request(3.5, 4);
    counters.record_request(1.5, 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    counters.record_request(2.0, 1);
    shutdown.cancel();
    let delivery = tokio::time::timeout(Duration::from_secs(10), reporter).await???;
    server.abort();

    assert_eq!(delivery.failed, 0, "{delivery:?}");
    assert!(
        delivery.sent >= 3,
        "first, periodic and last reports: {delivery:?}"
    );
    // The window reaches back to the first (all-zero) report, so the differences the operator
    // takes are the sidecar's totals; the last request arrived with the shutdown report only.
    let PodReports::Fresh(energy) =
        book.pod_energy("team-a", "p1", Duration::from_secs(3600), Instant::now())
    else {
        return Err("the receiver holds no fresh reports of team-a/p1".into());
    };
    let PodEnergy {
        joules,
        requests,
        samples,
        watts,
        source,
        ..
    } = energy;
    assert!((joules - 7.0).abs() < 1e-9, "joules {joules}");
    assert_eq!((requests, samples), (3, 7));
    assert_eq!(watts, 42.0);
    assert_eq!(source, EnergySource::Rapl);
    Ok(())
}
