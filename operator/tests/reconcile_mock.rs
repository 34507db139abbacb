//! Reconcile against a scripted mock API server (tower-test): which requests it makes, with what
//! body, and what it returns.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::PartialObjectMeta;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::store;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::sync::watch;
use ttc_api::InferencePolicy;
use ttc_operator::controller::{Context, ReconcileSettings, error_policy, reconcile};
use ttc_operator::metrics::Metrics;
use ttc_operator::reports::ReportBook;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn policy(name: &str, selector: Value) -> InferencePolicy {
    serde_json::from_value(json!({
        "apiVersion": "energy.ttc.dev/v1alpha1", "kind": "InferencePolicy",
        "metadata": {"name": name, "namespace": "ml", "generation": 1, "uid": format!("uid-{name}")},
        "spec": {"selector": selector, "budget": {"joulesPerRequest": 2.0, "powerCapWatts": 100.0}}
    }))
    .expect("policy")
}

fn pod(name: &str, labels: Value, injected: Option<&str>) -> PartialObjectMeta<Pod> {
    let annotations = injected.map_or(json!({}), |p| json!({"energy.ttc.dev/policy": p}));
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml", "labels": labels, "annotations": annotations}
    }))
    .expect("pod metadata")
}

fn opted_in_namespace() -> PartialObjectMeta<Namespace> {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "ml", "labels": {"energy.ttc.dev/injection": "enabled"}}
    }))
    .expect("namespace metadata")
}

struct Fixture {
    ctx: Arc<Context>,
    handle: Handle,
    _leader: watch::Sender<bool>,
}

fn fixture(
    policies: &[InferencePolicy],
    pods: Vec<PartialObjectMeta<Pod>>,
    leader: bool,
) -> Fixture {
    fixture_with(policies, pods, leader, ReconcileSettings::default())
}

fn fixture_with(
    policies: &[InferencePolicy],
    pods: Vec<PartialObjectMeta<Pod>>,
    leader: bool,
    settings: ReconcileSettings,
) -> Fixture {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (policy_reader, mut policy_writer) = store::<InferencePolicy>();
    for p in policies {
        policy_writer.apply_watcher_event(&watcher::Event::Apply(p.clone()));
    }
    let (pod_reader, mut pod_writer) = store::<PartialObjectMeta<Pod>>();
    for p in pods {
        pod_writer.apply_watcher_event(&watcher::Event::Apply(p));
    }
    let (ns_reader, mut ns_writer) = store::<PartialObjectMeta<Namespace>>();
    ns_writer.apply_watcher_event(&watcher::Event::Apply(opted_in_namespace()));
    let (leader_tx, leader_rx) = watch::channel(leader);
    let ctx = Arc::new(Context::new(
        client,
        policy_reader,
        pod_reader,
        ns_reader,
        Arc::new(ReportBook::new(Duration::from_secs(60))),
        settings,
        leader_rx,
        Reporter {
            controller: "ttc-operator".into(),
            instance: Some("test".into()),
        },
        Arc::new(Metrics::default()),
    ));
    // The stores must outlive the test; leaking the writers is the simplest way in a test.
    std::mem::forget(policy_writer);
    std::mem::forget(pod_writer);
    std::mem::forget(ns_writer);
    Fixture {
        ctx,
        handle,
        _leader: leader_tx,
    }
}

/// Answers the next request, asserting its method and path; returns the request body as JSON.
async fn expect(
    handle: &mut Handle,
    method: &str,
    path: &str,
    status: StatusCode,
    reply: Value,
) -> Value {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request within 5 s")
        .expect("service not dropped");
    assert_eq!(request.method().as_str(), method);
    assert_eq!(request.uri().path(), path);
    let body = request.into_body().collect_bytes().await.expect("body");
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).expect("json")))
            .expect("response"),
    );
    serde_json::from_slice(&body).expect("request body is JSON")
}

async fn no_more_requests(handle: &mut Handle) {
    let next = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
    assert!(next.is_err(), "unexpected request");
}

const STATUS_PATH: &str =
    "/apis/energy.ttc.dev/v1alpha1/namespaces/ml/inferencepolicies/chat/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/ml/events";

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .expect(type_)
}

#[tokio::test]
async fn writes_status_for_a_healthy_policy() {
    let chat = policy("chat", json!({"matchLabels": {"app": "chat"}}));
    let mut f = fixture(
        std::slice::from_ref(&chat),
        vec![
            pod("chat-1", json!({"app": "chat"}), Some("chat")),
            pod("other", json!({"app": "x"}), None),
        ],
        true,
    );
    let ctx = f.ctx.clone();
    let task = tokio::spawn(reconcile(Arc::new(chat.clone()), ctx));
    let body = expect(
        &mut f.handle,
        "PATCH",
        STATUS_PATH,
        StatusCode::OK,
        serde_json::to_value(&chat).expect("json"),
    )
    .await;
    let action = task.await.expect("join").expect("reconciled");
    // No reports yet: only staleness can change the status, so the next look is a staleness
    // period away (a pod's first report wakes the policy earlier).
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let status = &body["status"];
    assert_eq!(body["kind"], "InferencePolicy");
    assert_eq!(status["matchedPods"], 1);
    assert_eq!(status["injectedPods"], 1);
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["allocations"][0]["pod"], "chat-1");
    assert_eq!(status["allocations"][0]["watts"], 100.0);
    assert_eq!(condition(status, "Ready")["status"], "True");
    assert_eq!(condition(status, "Degraded")["status"], "False");
    assert_eq!(condition(status, "BudgetMet")["status"], "Unknown");
    no_more_requests(&mut f.handle).await;

    // Reconciling again with that status stored writes nothing.
    let mut stored = chat.clone();
    stored.status = Some(serde_json::from_value(status.clone()).expect("status"));
    let action = reconcile(Arc::new(stored), f.ctx.clone())
        .await
        .expect("reconciled");
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    no_more_requests(&mut f.handle).await;
}

#[tokio::test]
async fn overlap_is_a_condition_and_an_event() {
    let chat = policy("chat", json!({"matchLabels": {"app": "chat"}}));
    let everything = policy("everything", json!({}));
    let mut f = fixture(
        &[chat.clone(), everything],
        vec![pod("chat-1", json!({"app": "chat"}), None)],
        true,
    );
    let task = tokio::spawn(reconcile(Arc::new(chat.clone()), f.ctx.clone()));
    let body = expect(
        &mut f.handle,
        "PATCH",
        STATUS_PATH,
        StatusCode::OK,
        serde_json::to_value(&chat).expect("json"),
    )
    .await;
    let degraded = condition(&body["status"], "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "OverlappingPolicies");
    assert!(
        degraded["message"]
            .as_str()
            .is_some_and(|m| m.contains("everything") && m.contains("chat-1"))
    );
    assert_eq!(body["status"]["matchedPods"], 0);
    let event = expect(
        &mut f.handle,
        "POST",
        EVENTS_PATH,
        StatusCode::CREATED,
        json!({}),
    )
    .await;
    assert_eq!(event["reason"], "OverlappingPolicies");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["name"], "chat");
    task.await.expect("join").expect("reconciled");
}

#[tokio::test]
async fn followers_write_nothing() {
    let chat = policy("chat", json!({"matchLabels": {"app": "chat"}}));
    let mut f = fixture(std::slice::from_ref(&chat), vec![], false);
    let action = reconcile(Arc::new(chat), f.ctx.clone())
        .await
        .expect("reconciled");
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
    no_more_requests(&mut f.handle).await;
}

#[tokio::test]
async fn invalid_selector_is_reported_and_waits_for_a_change() {
    let chat = policy(
        "chat",
        json!({"matchExpressions": [{"key": "app", "operator": "Like"}]}),
    );
    let mut f = fixture(std::slice::from_ref(&chat), vec![], true);
    let task = tokio::spawn(reconcile(Arc::new(chat.clone()), f.ctx.clone()));
    let body = expect(
        &mut f.handle,
        "PATCH",
        STATUS_PATH,
        StatusCode::OK,
        serde_json::to_value(&chat).expect("json"),
    )
    .await;
    let ready = condition(&body["status"], "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.selector") && m.contains("Like"))
    );
    let event = expect(
        &mut f.handle,
        "POST",
        EVENTS_PATH,
        StatusCode::CREATED,
        json!({}),
    )
    .await;
    assert_eq!(event["reason"], "InvalidSpec");
    let error = task.await.expect("join").expect_err("invalid");
    assert!(!error.is_transient());
    assert_eq!(
        error_policy(Arc::new(chat), &error, f.ctx.clone()),
        Action::await_change()
    );
}

#[tokio::test]
async fn api_errors_back_off_exponentially() {
    let chat = policy("chat", json!({"matchLabels": {"app": "chat"}}));
    let mut f = fixture(std::slice::from_ref(&chat), vec![], true);
    let shared = Arc::new(chat.clone());
    let mut delays = Vec::new();
    for _ in 0..3 {
        let task = tokio::spawn(reconcile(shared.clone(), f.ctx.clone()));
        let failure = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd unavailable", "reason": "InternalError", "code": 500});
        expect(
            &mut f.handle,
            "PATCH",
            STATUS_PATH,
            StatusCode::INTERNAL_SERVER_ERROR,
            failure,
        )
        .await;
        let error = task.await.expect("join").expect_err("API error");
        assert!(error.is_transient());
        assert_eq!(error.metric_label(), "kube");
        delays.push(error_policy(shared.clone(), &error, f.ctx.clone()));
    }
    assert_eq!(
        delays,
        [1, 2, 4].map(|s| Action::requeue(Duration::from_secs(s)))
    );
    assert!(
        f.ctx
            .metrics
            .render()
            .contains("ttc_operator_reconcile_errors_total{error=\"kube\"} 3")
    );
}

#[tokio::test]
async fn cluster_power_cap_is_split_by_priority() {
    let chat = policy("chat", json!({"matchLabels": {"app": "chat"}}));
    let mut batch = policy("batch", json!({"matchLabels": {"app": "batch"}}));
    batch.spec.priority = 300;
    batch.spec.budget.power_cap_watts = None;
    let settings = ReconcileSettings {
        cluster_power_cap_watts: Some(80.0),
        ..ReconcileSettings::default()
    };
    let mut f = fixture_with(
        &[chat.clone(), batch],
        vec![pod("chat-1", json!({"app": "chat"}), Some("chat"))],
        true,
        settings,
    );
    let task = tokio::spawn(reconcile(Arc::new(chat.clone()), f.ctx.clone()));
    let body = expect(
        &mut f.handle,
        "PATCH",
        STATUS_PATH,
        StatusCode::OK,
        serde_json::to_value(&chat).expect("json"),
    )
    .await;
    task.await.expect("join").expect("reconciled");
    // Priorities 100 and 300 of 80 W: chat is offered 20 W, less than its own 100 W cap.
    assert_eq!(body["status"]["clusterShare"]["watts"], 20.0);
    assert_eq!(body["status"]["clusterShare"]["fraction"], 0.25);
    assert_eq!(body["status"]["allocations"][0]["watts"], 20.0);
}

#[tokio::test]
async fn reporting_policies_resync_at_the_resync_interval() {
    let chat = policy("chat", json!({"matchLabels": {"app": "chat"}}));
    let mut f = fixture(
        std::slice::from_ref(&chat),
        vec![pod("chat-1", json!({"app": "chat"}), Some("chat"))],
        true,
    );
    let now = std::time::Instant::now();
    let report = |joules: f64, requests: u64| ttc_api::EnergyReport {
        namespace: "ml".into(),
        pod: "chat-1".into(),
        policy: "chat".into(),
        source: ttc_api::EnergySource::Nvml,
        joules_total: joules,
        requests_total: requests,
        samples_total: requests,
        watts: Some(5.0),
        started_unix_nanos: None,
    };
    f.ctx.reports.record(
        &report(0.0, 0),
        now.checked_sub(Duration::from_secs(10)).expect("clock"),
    );
    f.ctx.reports.record(&report(30.0, 10), now);
    let task = tokio::spawn(reconcile(Arc::new(chat.clone()), f.ctx.clone()));
    let body = expect(
        &mut f.handle,
        "PATCH",
        STATUS_PATH,
        StatusCode::OK,
        serde_json::to_value(&chat).expect("json"),
    )
    .await;
    assert_eq!(body["status"]["observed"]["joulesPerRequest"], 3.0);
    assert_eq!(body["status"]["observed"]["source"], "nvml");
    assert_eq!(condition(&body["status"], "BudgetMet")["status"], "False");
    let event = expect(
        &mut f.handle,
        "POST",
        EVENTS_PATH,
        StatusCode::CREATED,
        json!({}),
    )
    .await;
    assert_eq!(event["reason"], "OverBudget");
    let action = task.await.expect("join").expect("reconciled");
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
}
