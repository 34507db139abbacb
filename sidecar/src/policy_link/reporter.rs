//! The loop that reports this sidecar's cumulative usage to the operator's receiver as JSON
//! [`EnergyReport`]s (`POST {endpoint}/v1/reports`).

use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use ttc_crds::report::{JSON_REPORTS_PATH, sidecar_env};
use ttc_crds::{EnergyReport, EnergySource};

use super::error::LinkError;
use super::identity::PodIdentity;
use super::usage::UsageCounters;

/// A sensible report interval: well inside the operator's staleness limit and the shortest
/// budget window (10 s).
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Time allowed for one report, connection included: a slow receiver delays the next report,
/// never a request.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest interval the reporter accepts; shorter ones are raised to it.
const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// How many reports were delivered and how many failed, over the reporter's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    /// Reports the receiver accepted (2xx).
    pub sent: u64,
    /// Reports that failed: unreachable receiver, timeout, or a non-2xx answer.
    pub failed: u64,
}

/// The URL JSON reports go to for the receiver endpoint `endpoint` (the OTLP/HTTP base URL, as
/// in `OTEL_EXPORTER_OTLP_ENDPOINT`): `{endpoint}/v1/reports`, keeping any base path.
pub fn report_url(endpoint: &str) -> Result<Url, LinkError> {
    let invalid = |reason: String| LinkError::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    let base = Url::parse(endpoint.trim()).map_err(|e| invalid(e.to_string()))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "scheme {} is not http or https",
            base.scheme()
        )));
    }
    if base.query().is_some() || base.fragment().is_some() {
        return Err(invalid("an endpoint takes no query or fragment".into()));
    }
    let mut url = base.clone();
    url.set_path(&format!(
        "{}{JSON_REPORTS_PATH}",
        base.path().trim_end_matches('/')
    ));
    Ok(url)
}

/// The report URL for the endpoint the operator injects in `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub fn report_endpoint_from_env() -> Result<Url, LinkError> {
    let endpoint = std::env::var(sidecar_env::OTLP_ENDPOINT)
        .ok()
        .filter(|value| !value.trim().is_empty())
        .ok_or(LinkError::MissingEnv {
            variable: sidecar_env::OTLP_ENDPOINT,
        })?;
    report_url(&endpoint)
}

/// The report's name for the source of the energy meter's figures.
pub fn report_source(source: ttc_energy::EnergySource) -> EnergySource {
    match source {
        ttc_energy::EnergySource::Nvml => EnergySource::Nvml,
        ttc_energy::EnergySource::Rapl => EnergySource::Rapl,
        ttc_energy::EnergySource::Estimate => EnergySource::Estimate,
    }
}

/// Posts an [`EnergyReport`] of `counters` for `identity` to `reports_url` (see [`report_url`])
/// every `interval` (at least 100 ms), the first one at once, until `shutdown` is cancelled; then
/// sends one last report and returns the delivery counts.
///
/// Each report has [`REPORT_TIMEOUT`]. Failures are counted and logged (a warning when reports
/// start failing, then at debug level until they recover) and never retried: the counters are
/// cumulative, so the next report carries everything a lost one would have. The request path
/// only touches the atomic counters and never waits on this loop.
pub async fn run_reporter(
    reports_url: Url,
    identity: PodIdentity,
    counters: Arc<UsageCounters>,
    source: EnergySource,
    interval: Duration,
    shutdown: CancellationToken,
) -> Result<DeliveryCounts, LinkError> {
    let http = reqwest::Client::builder()
        .timeout(REPORT_TIMEOUT)
        .connect_timeout(REPORT_TIMEOUT)
        .build()
        .map_err(LinkError::HttpClient)?;
    let reporter = Reporter {
        http,
        reports_url,
        identity,
        counters,
        source,
    };
    let mut delivery = DeliveryCounts::default();
    let mut failing = false;
    let mut ticks = tokio::time::interval(interval.max(MIN_REPORT_INTERVAL));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        reporter.send(&mut delivery, &mut failing).await;
    }
    reporter.send(&mut delivery, &mut failing).await;
    info!(
        sent = delivery.sent,
        failed = delivery.failed,
        "energy reporter stopped after its last report"
    );
    Ok(delivery)
}

struct Reporter {
    http: reqwest::Client,
    reports_url: Url,
    identity: PodIdentity,
    counters: Arc<UsageCounters>,
    source: EnergySource,
}

impl Reporter {
    fn report(&self) -> EnergyReport {
        let totals = self.counters.snapshot();
        EnergyReport {
            namespace: self.identity.namespace.clone(),
            pod: self.identity.pod.clone(),
            policy: self.identity.policy.clone(),
            source: self.source,
            joules_total: totals.joules_total,
            requests_total: totals.requests_total,
            samples_total: totals.samples_total,
            watts: self.counters.watts(),
        }
    }

    async fn send(&self, delivery: &mut DeliveryCounts, failing: &mut bool) {
        match self.post(&self.report()).await {
            Ok(()) => {
                delivery.sent += 1;
                if *failing {
                    info!(url = %self.reports_url, failed = delivery.failed, "energy reports delivered again");
                    *failing = false;
                }
            }
            Err(reason) => {
                delivery.failed += 1;
                if *failing {
                    debug!(url = %self.reports_url, %reason, failed = delivery.failed, "energy report failed");
                } else {
                    warn!(
                        url = %self.reports_url,
                        %reason,
                        "energy report failed; the operator sees this pod as stale until a \
                         report gets through (retrying every interval)"
                    );
                    *failing = true;
                }
            }
        }
    }

    async fn post(&self, report: &EnergyReport) -> Result<(), String> {
        let response = self
            .http
            .post(self.reports_url.clone())
            .json(report)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        let body: String = body.chars().take(200).collect();
        Err(format!("receiver answered {status}: {body}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_url_appends_the_json_path_to_the_endpoint() {
        let cases = [
            (
                "http://ttc-operator.ttc-system.svc:4318",
                "http://ttc-operator.ttc-system.svc:4318/v1/reports",
            ),
            ("http://op:4318/", "http://op:4318/v1/reports"),
            (
                "https://collector.example/otlp/",
                "https://collector.example/otlp/v1/reports",
            ),
        ];
        for (endpoint, expected) in cases {
            assert_eq!(report_url(endpoint).expect(endpoint).as_str(), expected);
        }
    }

    #[test]
    fn unusable_endpoints_are_refused_with_the_reason() {
        for endpoint in ["op:4318", "ftp://op/", "not a url", "http://op:4318/?x=1"] {
            let error = report_url(endpoint).expect_err(endpoint);
            assert!(
                matches!(error, LinkError::InvalidEndpoint { .. }),
                "{endpoint}: {error}"
            );
            assert!(error.to_string().contains(endpoint), "{error}");
        }
    }

    #[test]
    fn meter_sources_keep_their_names_in_reports() {
        for source in [
            ttc_energy::EnergySource::Nvml,
            ttc_energy::EnergySource::Rapl,
            ttc_energy::EnergySource::Estimate,
        ] {
            assert_eq!(report_source(source).as_str(), source.as_str());
        }
    }

    #[tokio::test]
    async fn an_unreachable_receiver_counts_failures_and_shutdown_still_returns() {
        // A port nobody listens on: bind one, then free it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        drop(listener);
        let url = report_url(&format!("http://127.0.0.1:{port}")).expect("url");
        let identity = PodIdentity {
            namespace: "ns".into(),
            pod: "p1".into(),
            policy: "chat".into(),
        };
        let shutdown = CancellationToken::new();
        let reporter = tokio::spawn(run_reporter(
            url,
            identity,
            Arc::new(UsageCounters::new()),
            EnergySource::Estimate,
            Duration::from_millis(100),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(350)).await;
        shutdown.cancel();
        let delivery = tokio::time::timeout(Duration::from_secs(10), reporter)
            .await
            .expect("the reporter returns promptly after shutdown")
            .expect("the reporter task does not panic")
            .expect("the HTTP client builds");
        assert_eq!(delivery.sent, 0);
        // At least the first report, one per interval after it, and the last one.
        assert!(delivery.failed >= 3, "{delivery:?}");
    }
}
