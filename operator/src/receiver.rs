//! The HTTP receiver of sidecar energy reports: OTLP/HTTP metrics (protobuf) and JSON.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use kube::runtime::reflector::ObjectRef;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;
use tokio::sync::mpsc;
use tracing::debug;
use ttc_crds::report::{JSON_REPORTS_PATH, OTLP_METRICS_PATH};
use ttc_crds::{EnergyReport, InferencePolicy};

use crate::metrics::Metrics;
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
}

impl ReportReceiver {
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
            let now = Instant::now();
            for report in &reports {
                receiver.record(report, now);
                receiver.metrics.report("otlp", "accepted");
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
    Json(report): Json<EnergyReport>,
) -> StatusCode {
    if !report.joules_total.is_finite() || report.joules_total < 0.0 {
        receiver.metrics.report("json", "rejected");
        return StatusCode::UNPROCESSABLE_ENTITY;
    }
    receiver.record(&report, Instant::now());
    receiver.metrics.report("json", "accepted");
    StatusCode::NO_CONTENT
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
    use ttc_crds::EnergySource;

    fn receiver() -> Arc<ReportReceiver> {
        Arc::new(ReportReceiver {
            book: Arc::new(ReportBook::new(Duration::from_secs(60))),
            metrics: Arc::new(Metrics::default()),
            wake: None,
        })
    }

    #[tokio::test]
    async fn a_pods_first_report_wakes_its_policy() {
        let (wake, mut woken) = mpsc::channel(8);
        let receiver = Arc::new(ReportReceiver {
            book: Arc::new(ReportBook::new(Duration::from_secs(60))),
            metrics: Arc::new(Metrics::default()),
            wake: Some(wake),
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

    #[tokio::test]
    async fn otlp_protobuf_export_is_recorded() {
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
        use opentelemetry_proto::tonic::metrics::v1::{
            Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
        };
        use opentelemetry_proto::tonic::resource::v1::Resource;
        use ttc_crds::report::{
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
}
