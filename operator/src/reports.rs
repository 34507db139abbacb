//! Sidecar energy reports: decoding (OTLP or JSON) and a per-pod history with staleness.
//!
//! Reports carry cumulative counters; the history keeps a bounded, thinned series of them per pod
//! so that the energy over any budget window (10 s to 24 h) is a difference of two samples.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{NumberDataPoint, metric, number_data_point};
use ttc_api::report::{
    ATTR_ENERGY_SOURCE, ATTR_NAMESPACE, ATTR_POD_NAME, ATTR_POLICY, METRIC_ENERGY_JOULES,
    METRIC_POWER_WATTS, METRIC_REQUESTS, METRIC_SAMPLES,
};
use ttc_api::{EnergyReport, EnergySource};

use crate::domain::status::PodEnergy;
use crate::error::{Error, Result};

/// Most samples kept per pod; older ones are thinned to keep the whole span.
const MAX_SAMPLES: usize = 48;
/// Samples older than the longest budget window are dropped.
const RETENTION: Duration = Duration::from_secs(24 * 3600 + 600);

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    joules: f64,
    requests: u64,
    samples: u64,
}

#[derive(Debug)]
struct PodHistory {
    policy: String,
    source: EnergySource,
    watts: Option<f64>,
    /// The current sidecar process's last report, as it reported it.
    reported: Option<Reported>,
    /// What earlier processes of the pod's sidecar had reported when they ended (it restarted):
    /// added to the current one's counters, so the series only grows. Its time is not used.
    carried: Sample,
    /// The series: counters of every process, carried over restarts.
    series: VecDeque<Sample>,
}

/// A sidecar process's own counters and when they started, as its last report said.
#[derive(Debug, Clone, Copy)]
struct Reported {
    counters: Sample,
    started_unix_nanos: Option<u64>,
}

impl Reported {
    /// Whether `next` comes from another process: a counter went down, or the start time changed.
    fn restarted_by(&self, next: &Reported) -> bool {
        let (a, b) = (&self.counters, &next.counters);
        let went_down = b.joules < a.joules || b.requests < a.requests || b.samples < a.samples;
        let new_start = matches!(
            (self.started_unix_nanos, next.started_unix_nanos),
            (Some(a), Some(b)) if a != b
        );
        went_down || new_start
    }
}

impl Sample {
    /// The counters of `self` and `other` added (the time is `other`'s).
    fn plus(&self, other: &Sample) -> Sample {
        Sample {
            at: other.at,
            joules: self.joules + other.joules,
            requests: self.requests.saturating_add(other.requests),
            samples: self.samples.saturating_add(other.samples),
        }
    }
}

/// Identifies a pod: `(namespace, name)`.
pub type PodKey = (String, String);

/// Energy reports per pod, shared by the receiver (writes) and the controller (reads).
#[derive(Debug)]
pub struct ReportBook {
    stale_after: Duration,
    pods: Mutex<HashMap<PodKey, PodHistory>>,
}

/// What the book knows of one pod for one window.
#[derive(Debug, Clone, PartialEq)]
pub enum PodReports {
    /// Never reported (or reports expired).
    None,
    /// The last report is older than the staleness limit.
    Stale,
    /// Fresh reports; the energy over the window.
    Fresh(PodEnergy),
}

impl ReportBook {
    /// A book where reports older than `stale_after` are stale.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            stale_after,
            pods: Mutex::new(HashMap::new()),
        }
    }

    /// Records one report received at `now`. Returns whether the pod was silent before (no
    /// history, or stale): then its policy's status changes and deserves a reconcile now.
    pub fn record(&self, report: &EnergyReport, now: Instant) -> bool {
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        let key = (report.namespace.clone(), report.pod.clone());
        let history = pods.entry(key).or_insert_with(|| PodHistory {
            policy: report.policy.clone(),
            source: report.source,
            watts: None,
            reported: None,
            carried: Sample {
                at: now,
                joules: 0.0,
                requests: 0,
                samples: 0,
            },
            series: VecDeque::new(),
        });
        let reported = Reported {
            counters: Sample {
                at: now,
                joules: report.joules_total,
                requests: report.requests_total,
                samples: report.samples_total,
            },
            started_unix_nanos: report.started_unix_nanos,
        };
        let was_silent = history
            .series
            .back()
            .is_none_or(|last| now.saturating_duration_since(last.at) > self.stale_after);
        if let Some(last) = history.reported
            && last.restarted_by(&reported)
        {
            // The sidecar restarted and counts from zero again: what its last process reported
            // is carried over, so only what it did after that report is lost.
            history.carried = history.carried.plus(&last.counters);
        }
        history.reported = Some(reported);
        let sample = history.carried.plus(&reported.counters);
        history.policy = report.policy.clone();
        history.source = report.source;
        history.watts = report.watts;
        history.series.push_back(sample);
        while history
            .series
            .front()
            .is_some_and(|s| now.duration_since(s.at) > RETENTION)
            && history.series.len() > 2
        {
            history.series.pop_front();
        }
        if history.series.len() > MAX_SAMPLES {
            thin(&mut history.series);
        }
        was_silent
    }

    /// The energy of a pod over the last `window` as of `now`.
    pub fn pod_energy(
        &self,
        namespace: &str,
        pod: &str,
        window: Duration,
        now: Instant,
    ) -> PodReports {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        let Some(history) = pods.get(&(namespace.to_string(), pod.to_string())) else {
            return PodReports::None;
        };
        let Some(last) = history.series.back() else {
            return PodReports::None;
        };
        if now.saturating_duration_since(last.at) > self.stale_after {
            return PodReports::Stale;
        }
        let start = now.checked_sub(window);
        // The latest sample at or before the window start, else the oldest one.
        let base = history
            .series
            .iter()
            .rev()
            .find(|s| start.is_some_and(|start| s.at <= start))
            .or(history.series.front())
            .copied()
            .unwrap_or(*last);
        let span = last.at.saturating_duration_since(base.at).as_secs_f64();
        let joules = (last.joules - base.joules).max(0.0);
        let watts = history
            .watts
            .unwrap_or(if span > 0.0 { joules / span } else { 0.0 });
        PodReports::Fresh(PodEnergy {
            pod: pod.to_string(),
            joules,
            requests: last.requests.saturating_sub(base.requests),
            samples: last.samples.saturating_sub(base.samples),
            span_seconds: span,
            watts,
            source: history.source,
        })
    }

    /// Drops pods whose last report is older than the retention.
    pub fn prune(&self, now: Instant) {
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        pods.retain(|_, h| {
            h.series
                .back()
                .is_some_and(|s| now.saturating_duration_since(s.at) <= RETENTION)
        });
    }

    /// Number of pods with a history.
    pub fn len(&self) -> usize {
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the book is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Halves the inner samples, keeping the first and the last, so the series spans the same time.
fn thin(series: &mut VecDeque<Sample>) {
    let last = series.len() - 1;
    let mut i = 0;
    series.retain(|_| {
        let keep = i == 0 || i == last || i % 2 == 0;
        i += 1;
        keep
    });
}

fn string_value(value: &Option<AnyValue>) -> Option<&str> {
    match value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.as_str()),
        _ => None,
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| string_value(&kv.value))
}

fn number(point: &NumberDataPoint) -> f64 {
    match point.value {
        Some(number_data_point::Value::AsDouble(v)) => v,
        Some(number_data_point::Value::AsInt(v)) => v as f64,
        None => 0.0,
    }
}

fn points(data: &Option<metric::Data>) -> &[NumberDataPoint] {
    match data {
        Some(metric::Data::Sum(sum)) => &sum.data_points,
        Some(metric::Data::Gauge(gauge)) => &gauge.data_points,
        _ => &[],
    }
}

/// Decodes an OTLP metrics export into one report per resource (pod). Resources without the pod
/// attributes or without the energy metric are skipped; an export with none is an error.
pub fn reports_from_otlp(request: &ExportMetricsServiceRequest) -> Result<Vec<EnergyReport>> {
    let mut reports = Vec::new();
    for resource_metrics in &request.resource_metrics {
        let attributes = resource_metrics
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or_default();
        let (Some(namespace), Some(pod), Some(policy)) = (
            attribute(attributes, ATTR_NAMESPACE),
            attribute(attributes, ATTR_POD_NAME),
            attribute(attributes, ATTR_POLICY),
        ) else {
            continue;
        };
        let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
        let mut source = None;
        let mut started: Option<u64> = None;
        for metric in resource_metrics
            .scope_metrics
            .iter()
            .flat_map(|s| &s.metrics)
        {
            for point in points(&metric.data) {
                *totals.entry(metric.name.as_str()).or_default() += number(point);
                if metric.name != METRIC_ENERGY_JOULES {
                    continue;
                }
                if let Some(s) =
                    attribute(&point.attributes, ATTR_ENERGY_SOURCE).and_then(EnergySource::parse)
                {
                    source = Some(source.map_or(s, |prev: EnergySource| prev.combine(s)));
                }
                // The earliest start of the energy series: the process's, as a source that
                // appears later starts later.
                if point.start_time_unix_nano > 0 {
                    started = Some(started.map_or(point.start_time_unix_nano, |earliest| {
                        earliest.min(point.start_time_unix_nano)
                    }));
                }
            }
        }
        let Some(joules) = totals.get(METRIC_ENERGY_JOULES) else {
            continue;
        };
        reports.push(EnergyReport {
            namespace: namespace.to_string(),
            pod: pod.to_string(),
            policy: policy.to_string(),
            // A figure that does not say where it comes from is not a measurement.
            source: source.unwrap_or(EnergySource::Estimate),
            joules_total: *joules,
            requests_total: totals.get(METRIC_REQUESTS).copied().unwrap_or(0.0) as u64,
            samples_total: totals.get(METRIC_SAMPLES).copied().unwrap_or(0.0) as u64,
            watts: totals.get(METRIC_POWER_WATTS).copied(),
            started_unix_nanos: started,
        });
    }
    if reports.is_empty() {
        return Err(Error::MalformedReport(format!(
            "no resource carries {ATTR_NAMESPACE}, {ATTR_POD_NAME}, {ATTR_POLICY} and the metric {METRIC_ENERGY_JOULES}"
        )));
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Metric, ResourceMetrics, ScopeMetrics, Sum,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;

    fn report(joules: f64, requests: u64) -> EnergyReport {
        EnergyReport {
            namespace: "ns".into(),
            pod: "p".into(),
            policy: "pol".into(),
            source: EnergySource::Nvml,
            joules_total: joules,
            requests_total: requests,
            samples_total: requests * 2,
            watts: None,
            started_unix_nanos: None,
        }
    }

    fn fresh(book: &ReportBook, window: u64, now: Instant) -> PodEnergy {
        match book.pod_energy("ns", "p", Duration::from_secs(window), now) {
            PodReports::Fresh(e) => e,
            other => panic!("expected fresh reports, got {other:?}"),
        }
    }

    #[test]
    fn window_energy_is_a_difference_of_counters() {
        let book = ReportBook::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..=10u64 {
            book.record(
                &report(100.0 * i as f64, 10 * i),
                t0 + Duration::from_secs(10 * i),
            );
        }
        let now = t0 + Duration::from_secs(100);
        let e = fresh(&book, 30, now);
        assert_eq!(e.joules, 300.0);
        assert_eq!(e.requests, 30);
        assert_eq!(e.samples, 60);
        assert_eq!(e.span_seconds, 30.0);
        assert_eq!(e.watts, 10.0);
        assert_eq!(e.requests_per_second(), Some(1.0));
        // A window longer than the history uses all of it.
        assert_eq!(fresh(&book, 3600, now).joules, 1000.0);
    }

    #[test]
    fn record_says_when_a_silent_pod_speaks() {
        let book = ReportBook::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(book.record(&report(1.0, 1), t0));
        assert!(!book.record(&report(2.0, 2), t0 + Duration::from_secs(5)));
        assert!(book.record(&report(3.0, 3), t0 + Duration::from_secs(120)));
    }

    #[test]
    fn silence_makes_reports_stale_and_unknown_pods_have_none() {
        let book = ReportBook::new(Duration::from_secs(60));
        let t0 = Instant::now();
        book.record(&report(1.0, 1), t0);
        assert_eq!(
            book.pod_energy(
                "ns",
                "p",
                Duration::from_secs(60),
                t0 + Duration::from_secs(61)
            ),
            PodReports::Stale
        );
        assert_eq!(
            book.pod_energy("ns", "q", Duration::from_secs(60), t0),
            PodReports::None
        );
        book.prune(t0 + RETENTION + Duration::from_secs(1));
        assert!(book.is_empty());
    }

    #[test]
    fn a_restart_carries_what_was_reported_over() {
        let book = ReportBook::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        book.record(&report(400.0, 40), at(0));
        book.record(&report(500.0, 50), at(10));
        // Restarted: counting from zero again.
        book.record(&report(10.0, 1), at(20));
        book.record(&report(30.0, 3), at(30));
        // Over the whole history: 100 J and 10 requests of the first process after its first
        // report, and all 30 J and 3 requests of the second.
        let e = fresh(&book, 60, at(30));
        assert_eq!(e.joules, 130.0);
        assert_eq!(e.requests, 13);
        assert_eq!(e.samples, 26);
        // A window after the restart counts the second process alone.
        let e = fresh(&book, 10, at(30));
        assert_eq!(e.joules, 20.0);
        assert_eq!(e.requests, 2);
        // A second restart carries both over.
        book.record(&report(5.0, 1), at(40));
        assert_eq!(fresh(&book, 60, at(40)).joules, 135.0);
    }

    #[test]
    fn a_new_start_time_is_a_restart_even_when_counters_grew() {
        let book = ReportBook::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let started = |joules: f64, requests: u64, start: u64| EnergyReport {
            started_unix_nanos: Some(start),
            ..report(joules, requests)
        };
        book.record(&started(10.0, 1, 1_000), at(0));
        book.record(&started(20.0, 2, 1_000), at(10));
        // A new process whose counters passed the old ones before its first report.
        book.record(&started(25.0, 3, 2_000), at(20));
        let e = fresh(&book, 60, at(20));
        assert_eq!(e.joules, 35.0);
        assert_eq!(e.requests, 4);
        // The same process again: no restart.
        book.record(&started(26.0, 4, 2_000), at(30));
        assert_eq!(fresh(&book, 60, at(30)).joules, 36.0);
    }

    #[test]
    fn history_stays_bounded_and_keeps_its_span() {
        let book = ReportBook::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..1000u64 {
            book.record(&report(i as f64, i), t0 + Duration::from_secs(i));
        }
        let pods = book.pods.lock().expect("lock");
        let series = &pods[&("ns".to_string(), "p".to_string())].series;
        assert!(series.len() <= MAX_SAMPLES);
        assert_eq!(series.front().map(|s| s.joules), Some(0.0));
        assert_eq!(series.back().map(|s| s.joules), Some(999.0));
    }

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    fn point(value: f64, attributes: Vec<KeyValue>) -> NumberDataPoint {
        NumberDataPoint {
            attributes,
            value: Some(number_data_point::Value::AsDouble(value)),
            ..Default::default()
        }
    }

    fn sum(name: &str, points: Vec<NumberDataPoint>) -> Metric {
        Metric {
            name: name.into(),
            data: Some(metric::Data::Sum(Sum {
                data_points: points,
                aggregation_temporality: 2,
                is_monotonic: true,
            })),
            ..Default::default()
        }
    }

    #[test]
    fn otlp_export_becomes_a_report() {
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![
                ResourceMetrics {
                    resource: Some(Resource {
                        attributes: vec![
                            kv(ATTR_NAMESPACE, "ns"),
                            kv(ATTR_POD_NAME, "p"),
                            kv(ATTR_POLICY, "pol"),
                        ],
                        ..Default::default()
                    }),
                    scope_metrics: vec![ScopeMetrics {
                        metrics: vec![
                            sum(
                                METRIC_ENERGY_JOULES,
                                vec![
                                    NumberDataPoint {
                                        start_time_unix_nano: 1_700_000_000_000_000_000,
                                        ..point(12.0, vec![kv(ATTR_ENERGY_SOURCE, "nvml")])
                                    },
                                    // A source that appeared later: its series starts later.
                                    NumberDataPoint {
                                        start_time_unix_nano: 1_700_000_090_000_000_000,
                                        ..point(0.5, vec![kv(ATTR_ENERGY_SOURCE, "nvml")])
                                    },
                                ],
                            ),
                            sum(METRIC_REQUESTS, vec![point(5.0, vec![])]),
                            sum(METRIC_SAMPLES, vec![point(20.0, vec![])]),
                            Metric {
                                name: METRIC_POWER_WATTS.into(),
                                data: Some(metric::Data::Gauge(Gauge {
                                    data_points: vec![point(70.0, vec![])],
                                })),
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                ResourceMetrics::default(),
            ],
        };
        let reports = reports_from_otlp(&request).expect("decodes");
        assert_eq!(
            reports,
            vec![EnergyReport {
                namespace: "ns".into(),
                pod: "p".into(),
                policy: "pol".into(),
                source: EnergySource::Nvml,
                joules_total: 12.5,
                requests_total: 5,
                samples_total: 20,
                watts: Some(70.0),
                started_unix_nanos: Some(1_700_000_000_000_000_000),
            }]
        );
        assert!(reports_from_otlp(&ExportMetricsServiceRequest::default()).is_err());
    }
}
