//! The HTTP receiver of sidecar energy reports: OTLP/HTTP metrics (protobuf) and JSON.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use kube::runtime::reflector::ObjectRef;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};
use ttc_api::report::{
    JSON_REPORTS_PATH, NOT_LEADER_HEADER, OTLP_METRICS_PATH, REPORT_TOKEN_AUDIENCE,
};
use ttc_api::{EnergyReport, InferencePolicy};

use crate::metrics::Metrics;
use crate::report_auth::{AuthError, ReportAuthenticator, bearer};
use crate::reports::{ReportBook, reports_from_otlp};

/// The receiver's state.
pub struct ReportReceiver {
    /// Where reports go.
    pub book: Arc<ReportBook>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Asks the controller to reconcile a policy whose pod started reporting; full or absent,
    /// the periodic resync catches up.
    pub wake: Option<mpsc::Sender<ObjectRef<InferencePolicy>>>,
    /// Who may report for which pod; `None` takes every report (`--report-auth none`).
    pub auth: Option<Arc<dyn ReportAuthenticator>>,
    /// Paces the warnings about refused reports.
    pub refusals: RefusalLog,
    /// Whether this replica holds the lease; `None` takes reports regardless (one process
    /// without leader election). Replicas without the lease refuse reports with 503 and
    /// `Connection: close`, so that the sender's retry may reach the leader.
    pub leader: Option<watch::Receiver<bool>>,
}

/// Paces the warnings about refused reports: at most one a minute, each saying how many
/// refusals it stands for. A forged report deserves a warning; a fleet of pods injected before
/// `--report-auth` was switched on, each refused at every export, does not deserve a flood. (Every
/// refusal is counted in `ttc_operator_energy_reports_total{outcome="unauthorized"}` and logged
/// at debug level.)
#[derive(Debug, Default)]
pub struct RefusalLog {
    state: Mutex<RefusalState>,
}

#[derive(Debug, Default)]
struct RefusalState {
    last_warning: Option<Instant>,
    unwarned: u64,
}

impl RefusalLog {
    /// Least time between two warnings.
    const EVERY: Duration = Duration::from_secs(60);

    /// Counts a refusal at `now`; returns how many refusals a warning now stands for (this one
    /// included), or `None` while the last warning is less than a minute old.
    fn refused(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.unwarned += 1;
        if state
            .last_warning
            .is_some_and(|last| now.duration_since(last) < Self::EVERY)
        {
            return None;
        }
        state.last_warning = Some(now);
        Some(std::mem::take(&mut state.unwarned))
    }
}

impl ReportReceiver {
    /// The refusal of a replica that does not hold the lease, or `None` on the leader. Reports
    /// reach any replica through the Service, but only the leader writes the statuses, and a
    /// sidecar's connection stays with the replica it first reached: so the others answer 503
    /// with `Connection: close`, and the sidecar's next attempt opens a new connection, which the
    /// Service may send elsewhere (the sidecar retries at once: `ttc-telemetry` report client).
    fn not_leader(&self, encoding: &'static str) -> Option<Response> {
        let leader = self.leader.as_ref()?;
        if *leader.borrow() {
            return None;
        }
        self.metrics.report(encoding, "not_leader");
        Some(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [
                    (header::CONNECTION, "close"),
                    (header::RETRY_AFTER, "1"),
                    (HeaderName::from_static(NOT_LEADER_HEADER), "true"),
                ],
                "this operator replica does not hold the lease; send the report again (a new connection may reach the leader)",
            )
                .into_response(),
        )
    }

    /// Checks that the request may report for every pod in `reports`.
    async fn authorize(
        &self,
        headers: &HeaderMap,
        reports: &[EnergyReport],
    ) -> Result<(), AuthError> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        let token = bearer(headers).ok_or(AuthError::Missing(REPORT_TOKEN_AUDIENCE))?;
        let identity = auth.authenticate(token).await?;
        match reports
            .iter()
            .find(|r| r.namespace != identity.namespace || r.pod != identity.pod)
        {
            Some(other) => Err(AuthError::WrongPod {
                token: format!("{}/{}", identity.namespace, identity.pod),
                report: format!("{}/{}", other.namespace, other.pod),
            }),
            None => Ok(()),
        }
    }

    /// Records `reports` if the request may send them; the refusal otherwise.
    async fn accept(
        &self,
        encoding: &'static str,
        headers: &HeaderMap,
        reports: &[EnergyReport],
    ) -> Result<(), Response> {
        if let Err(e) = self.authorize(headers, reports).await {
            self.metrics.report(encoding, "unauthorized");
            match self.refusals.refused(Instant::now()) {
                Some(refused) => warn!(
                    error = %e,
                    refused,
                    "energy report refused (refused counts this one and those since the last warning, at most one a minute)"
                ),
                None => debug!(error = %e, "energy report refused"),
            }
            return Err((e.status(), e.to_string()).into_response());
        }
        let now = Instant::now();
        for report in reports {
            self.record(report, now);
            self.metrics.report(encoding, "accepted");
        }
        Ok(())
    }

    fn record(&self, report: &EnergyReport, now: Instant) {
        if self.book.record(report, now)
            && let Some(wake) = &self.wake
        {
            let _ = wake.try_send(ObjectRef::new(&report.policy).within(&report.namespace));
        }
    }
}

async fn otlp(
    State(receiver): State<Arc<ReportReceiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = receiver.not_leader("otlp") {
        return refused;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("application/x-protobuf") {
        receiver.metrics.report("otlp", "rejected");
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send OTLP/HTTP metrics as application/x-protobuf",
        )
            .into_response();
    }
    let request = match ExportMetricsServiceRequest::decode(body) {
        Ok(request) => request,
        Err(e) => {
            receiver.metrics.report("otlp", "rejected");
            return (
                StatusCode::BAD_REQUEST,
                format!("not an ExportMetricsServiceRequest: {e}"),
            )
                .into_response();
        }
    };
    match reports_from_otlp(&request) {
        Ok(reports) => {
            if let Err(refused) = receiver.accept("otlp", &headers, &reports).await {
                return refused;
            }
            debug!(count = reports.len(), "OTLP energy reports recorded");
            let body = ExportMetricsServiceResponse::default().encode_to_vec();
            ([(header::CONTENT_TYPE, "application/x-protobuf")], body).into_response()
        }
        Err(e) => {
            receiver.metrics.report("otlp", "rejected");
            (StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
    }
}

async fn json(
    State(receiver): State<Arc<ReportReceiver>>,
    headers: HeaderMap,
    Json(report): Json<EnergyReport>,
) -> Response {
    if let Some(refused) = receiver.not_leader("json") {
        return refused;
    }
    if !report.joules_total.is_finite() || report.joules_total < 0.0 {
        receiver.metrics.report("json", "rejected");
        return StatusCode::UNPROCESSABLE_ENTITY.into_response();
    }
    match receiver
        .accept("json", &headers, std::slice::from_ref(&report))
        .await
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(refused) => refused,
    }
}

/// The receiver's routes: `POST /v1/metrics` (OTLP protobuf) and `POST /v1/reports` (JSON).
pub fn router(receiver: Arc<ReportReceiver>) -> Router {
    Router::new()
        .route(OTLP_METRICS_PATH, post(otlp))
        .route(JSON_REPORTS_PATH, post(json))
        .with_state(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use std::time::Duration;
    use tower::ServiceExt;
    use ttc_api::EnergySource;

    fn receiver() -> Arc<ReportReceiver> {
        Arc::new(ReportReceiver {
            book: Arc::new(ReportBook::new(Duration::from_secs(60))),
            metrics: Arc::new(Metrics::default()),
            wake: None,
            auth: None,
            refusals: Default::default(),
            leader: None,
        })
    }

    #[tokio::test]
    async fn a_pods_first_report_wakes_its_policy() {
        let (wake, mut woken) = mpsc::channel(8);
        let receiver = Arc::new(ReportReceiver {
            book: Arc::new(ReportBook::new(Duration::from_secs(60))),
            metrics: Arc::new(Metrics::default()),
            wake: Some(wake),
            auth: None,
            refusals: Default::default(),
            leader: None,
        });
        let report = |joules: f64| EnergyReport {
            namespace: "ns".into(),
            pod: "p".into(),
            policy: "pol".into(),
            source: EnergySource::Nvml,
            joules_total: joules,
            requests_total: 1,
            samples_total: 1,
            watts: None,
            started_unix_nanos: None,
        };
        for joules in [1.0, 2.0] {
            let request = Request::post(JSON_REPORTS_PATH)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    serde_json::to_vec(&report(joules)).expect("json"),
                ))
                .expect("request");
            router(receiver.clone())
                .oneshot(request)
                .await
                .expect("response");
        }
        assert_eq!(
            woken.try_recv().ok(),
            Some(ObjectRef::new("pol").within("ns"))
        );
        assert!(
            woken.try_recv().is_err(),
            "only the first report wakes the policy"
        );
    }

    #[tokio::test]
    async fn only_the_leader_keeps_reports_and_the_others_send_the_sidecar_elsewhere() {
        let (leading, leader) = watch::channel(false);
        let receiver = Arc::new(ReportReceiver {
            book: Arc::new(ReportBook::new(Duration::from_secs(60))),
            metrics: Arc::new(Metrics::default()),
            wake: None,
            auth: None,
            refusals: Default::default(),
            leader: Some(leader),
        });
        let report = EnergyReport {
            namespace: "ns".into(),
            pod: "p".into(),
            policy: "pol".into(),
            source: EnergySource::Estimate,
            joules_total: 5.0,
            requests_total: 1,
            samples_total: 1,
            watts: None,
            started_unix_nanos: None,
        };
        let send = || {
            let request = Request::post(JSON_REPORTS_PATH)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&report).expect("json")))
                .expect("request");
            router(receiver.clone()).oneshot(request)
        };
        let refused = send().await.expect("response");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers()[header::CONNECTION], "close");
        assert_eq!(refused.headers()[NOT_LEADER_HEADER], "true");
        assert_eq!(
            receiver.book.len(),
            0,
            "a replica without the lease keeps nothing"
        );
        assert!(
            receiver
                .metrics
                .render()
                .contains("format=\"json\",outcome=\"not_leader\"} 1")
        );
        leading.send(true).expect("the receiver listens");
        assert_eq!(
            send().await.expect("response").status(),
            StatusCode::NO_CONTENT
        );
        assert_eq!(receiver.book.len(), 1);
    }

    #[tokio::test]
    async fn json_report_is_recorded() {
        let receiver = receiver();
        let report = EnergyReport {
            namespace: "ns".into(),
            pod: "p".into(),
            policy: "pol".into(),
            source: EnergySource::Rapl,
            joules_total: 5.0,
            requests_total: 1,
            samples_total: 1,
            watts: Some(3.0),
            started_unix_nanos: None,
        };
        let request = Request::post(JSON_REPORTS_PATH)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(&report).expect("json")))
            .expect("request");
        let response = router(receiver.clone())
            .oneshot(request)
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(receiver.book.len(), 1);
    }

    /// Knows one token, for pod `ns/p`.
    struct OneToken;

    impl ReportAuthenticator for OneToken {
        fn authenticate<'a>(
            &'a self,
            token: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<crate::report_auth::ReportingPod, AuthError>>
        {
            Box::pin(async move {
                match token {
                    "token-of-p" => Ok(crate::report_auth::ReportingPod {
                        namespace: "ns".into(),
                        pod: "p".into(),
                    }),
                    "unbound" => Err(AuthError::NotBound("system:serviceaccount:ns:x".into())),
                    _ => Err(AuthError::Rejected("unknown token".into())),
                }
            })
        }
    }

    #[tokio::test]
    async fn with_authentication_a_token_reports_for_its_own_pod_only() {
        let receiver = Arc::new(ReportReceiver {
            auth: Some(Arc::new(OneToken)),
            refusals: Default::default(),
            ..Arc::into_inner(receiver()).expect("one owner")
        });
        let report = |pod: &str| EnergyReport {
            namespace: "ns".into(),
            pod: pod.into(),
            policy: "pol".into(),
            source: EnergySource::Rapl,
            joules_total: 5.0,
            requests_total: 1,
            samples_total: 1,
            watts: None,
            started_unix_nanos: None,
        };
        let send = |pod: &str, token: Option<&str>| {
            let mut request =
                Request::post(JSON_REPORTS_PATH).header(header::CONTENT_TYPE, "application/json");
            if let Some(token) = token {
                request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let request = request
                .body(Body::from(serde_json::to_vec(&report(pod)).expect("json")))
                .expect("request");
            let app = router(receiver.clone());
            async move { app.oneshot(request).await.expect("response").status() }
        };
        assert_eq!(send("p", None).await, StatusCode::UNAUTHORIZED);
        assert_eq!(send("p", Some("forged")).await, StatusCode::UNAUTHORIZED);
        assert_eq!(send("p", Some("unbound")).await, StatusCode::FORBIDDEN);
        assert_eq!(send("q", Some("token-of-p")).await, StatusCode::FORBIDDEN);
        assert!(receiver.book.is_empty(), "nothing refused is recorded");
        assert_eq!(send("p", Some("token-of-p")).await, StatusCode::NO_CONTENT);
        assert_eq!(receiver.book.len(), 1);
    }

    #[tokio::test]
    async fn otlp_protobuf_export_is_recorded() {
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
        use opentelemetry_proto::tonic::metrics::v1::{
            Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
        };
        use opentelemetry_proto::tonic::resource::v1::Resource;
        use ttc_api::report::{
            ATTR_ENERGY_SOURCE, ATTR_NAMESPACE, ATTR_POD_NAME, ATTR_POLICY, METRIC_ENERGY_JOULES,
        };
        let kv = |key: &str, value: &str| KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        };
        let export = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![
                        kv(ATTR_NAMESPACE, "ns"),
                        kv(ATTR_POD_NAME, "p"),
                        kv(ATTR_POLICY, "pol"),
                    ],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: METRIC_ENERGY_JOULES.into(),
                        data: Some(metric::Data::Sum(Sum {
                            data_points: vec![NumberDataPoint {
                                attributes: vec![kv(ATTR_ENERGY_SOURCE, "rapl")],
                                value: Some(number_data_point::Value::AsDouble(7.0)),
                                ..Default::default()
                            }],
                            aggregation_temporality: 2,
                            is_monotonic: true,
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let receiver = receiver();
        let request = Request::post(OTLP_METRICS_PATH)
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .body(Body::from(export.encode_to_vec()))
            .expect("request");
        let response = router(receiver.clone())
            .oneshot(request)
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(receiver.book.len(), 1);
        let text = receiver.metrics.render();
        assert!(
            text.contains("format=\"otlp\",outcome=\"accepted\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn otlp_needs_protobuf() {
        let request = Request::post(OTLP_METRICS_PATH)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .expect("request");
        let response = router(receiver()).oneshot(request).await.expect("response");
        assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let empty = Request::post(OTLP_METRICS_PATH)
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .body(Body::from(
                ExportMetricsServiceRequest::default().encode_to_vec(),
            ))
            .expect("request");
        let response = router(receiver()).oneshot(empty).await.expect("response");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }

    /// Random and damaged bodies, protobuf and JSON: a 4xx (or, where the damage leaves a valid
    /// report, 200), never a 5xx or a panic.
    #[tokio::test]
    async fn hostile_bodies_get_4xx_never_a_crash() {
        // xorshift64*: a fixed, dependency-free stream of bytes.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let json = serde_json::to_vec(&EnergyReport {
            namespace: "ns".into(),
            pod: "p".into(),
            policy: "pol".into(),
            source: EnergySource::Estimate,
            joules_total: 1.0,
            requests_total: 1,
            samples_total: 1,
            watts: Some(2.0),
            started_unix_nanos: None,
        })
        .expect("JSON");
        let receiver = receiver();
        let mut cases = 0;
        for i in 0..2000u64 {
            let (path, content_type, mut body) = if i % 2 == 0 {
                (OTLP_METRICS_PATH, "application/x-protobuf", Vec::new())
            } else {
                (JSON_REPORTS_PATH, "application/json", json.clone())
            };
            if body.is_empty() || i % 4 == 0 {
                body = (0..next() % 512).map(|_| next() as u8).collect();
            } else {
                for _ in 0..1 + next() % 4 {
                    let at = (next() % body.len() as u64) as usize;
                    body[at] = next() as u8;
                }
            }
            let request = Request::post(path)
                .header(header::CONTENT_TYPE, content_type)
                .body(Body::from(body))
                .expect("request");
            let status = router(receiver.clone())
                .oneshot(request)
                .await
                .expect("response")
                .status();
            assert!(
                status.is_success() || status.is_client_error(),
                "{path}: {status}"
            );
            cases += 1;
        }
        println!("receiver: {cases} hostile bodies, none got a 5xx");
    }

    #[test]
    fn refusals_are_warned_about_at_most_once_a_minute_with_their_count() {
        let log = RefusalLog::default();
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        assert_eq!(
            log.refused(at(0)),
            Some(1),
            "the first refusal is warned about"
        );
        assert_eq!(log.refused(at(1)), None);
        assert_eq!(log.refused(at(59)), None);
        assert_eq!(
            log.refused(at(61)),
            Some(3),
            "the next warning counts those in between"
        );
        assert_eq!(log.refused(at(62)), None);
    }
}
