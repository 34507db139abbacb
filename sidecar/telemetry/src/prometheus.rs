use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use ttc_energy::{EnergyMeter, EnergySource, uj_to_j};

use crate::otlp::{
    DEPTH_BUCKETS, DURATION_BUCKETS, ENERGY_BUCKETS, PER_TOKEN_BUCKETS, TOKEN_BUCKETS,
};
use crate::{AdmissionProbe, DepthClassLabels, PROVIDER_NAME, TelemetryConfig, TelemetryError};

/// Label sets: OTel attribute names with dots turned into underscores, as the OTel-to-Prometheus
/// mapping does.
type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn token_histogram() -> Histogram {
    Histogram::new(TOKEN_BUCKETS)
}
fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}
fn per_token_histogram() -> Histogram {
    Histogram::new(PER_TOKEN_BUCKETS)
}
fn energy_histogram() -> Histogram {
    Histogram::new(ENERGY_BUCKETS)
}
fn depth_histogram() -> Histogram {
    Histogram::new(DEPTH_BUCKETS)
}

pub(crate) struct PromMetrics {
    registry: Registry,
    token_usage: HistogramFamily,
    request_duration: HistogramFamily,
    time_per_output_token: HistogramFamily,
    request_energy: HistogramFamily,
    depth: HistogramFamily,
    budget_allocation: Gauge<f64, AtomicU64>,
    budget_remaining: Gauge<f64, AtomicU64>,
    requests: Counter,
    samples: Counter,
    feedback: Family<Labels, Counter>,
    stops: Family<Labels, Counter>,
    depth_pays: Family<Labels, Gauge<f64, AtomicU64>>,
    depth_gain: Family<Labels, Gauge<f64, AtomicU64>>,
    admission: AdmissionGauges,
    admission_probe: AdmissionProbe,
    refusals: Family<Labels, Counter>,
    depth_shed: Counter,
}

/// Where the sidecar's admission control stands.
#[derive(Default)]
struct AdmissionGauges {
    waiting: Gauge,
    rows_in_flight: Gauge,
    memory_used: Gauge,
    memory_budget: Gauge,
}

impl PromMetrics {
    pub(crate) fn new(
        config: &TelemetryConfig,
        meter: Option<EnergyMeter>,
        dropped: Arc<AtomicU64>,
        admission_probe: AdmissionProbe,
    ) -> Self {
        let mut registry = Registry::default();
        let target: Labels = config
            .resource_attributes()
            .into_iter()
            .map(|(k, v)| (prom_key(k), v))
            .collect();
        registry.register(
            "target",
            "Resource attributes of this sidecar",
            Info::new(target),
        );

        let token_usage = HistogramFamily::new_with_constructor(token_histogram);
        registry.register(
            "gen_ai_client_token_usage",
            "Number of input and output tokens used",
            token_usage.clone(),
        );
        let request_duration = HistogramFamily::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "gen_ai_server_request_duration",
            "Generative AI server request duration",
            Unit::Seconds,
            request_duration.clone(),
        );
        let time_per_output_token = HistogramFamily::new_with_constructor(per_token_histogram);
        registry.register_with_unit(
            "gen_ai_server_time_per_output_token",
            "Time per output token generated after the first token",
            Unit::Seconds,
            time_per_output_token.clone(),
        );
        let request_energy = HistogramFamily::new_with_constructor(energy_histogram);
        registry.register_with_unit(
            "ttc_request_energy",
            "Energy of one request, labelled with where the figure came from",
            Unit::Joules,
            request_energy.clone(),
        );
        let depth = HistogramFamily::new_with_constructor(depth_histogram);
        registry.register(
            "ttc_depth",
            "Test-time compute depth chosen per request",
            depth.clone(),
        );
        let budget_allocation = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "ttc_budget_allocation",
            "This pod's target average joules per request (its share of the policy's budget)",
            Unit::Joules,
            budget_allocation.clone(),
        );
        let budget_remaining = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "ttc_budget_remaining",
            "Headroom of this pod's window mean below its target, in joules per request (negative when over)",
            Unit::Joules,
            budget_remaining.clone(),
        );
        let requests = Counter::default();
        registry.register(
            "ttc_requests",
            "Requests completed since the sidecar started",
            requests.clone(),
        );
        let samples = Counter::default();
        registry.register(
            "ttc_samples",
            "Test-time compute samples generated since the sidecar started",
            samples.clone(),
        );
        let feedback = Family::<Labels, Counter>::default();
        registry.register(
            "ttc_feedback",
            "Client verdicts on answers taken; ttc_feedback_informative says whether the request drew more than minimum depth",
            feedback.clone(),
        );
        let stops = Family::<Labels, Counter>::default();
        registry.register(
            "ttc_stops",
            "Test-time compute requests by why they stopped drawing samples (ttc_stop_reason)",
            stops.clone(),
        );
        let depth_pays = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "ttc_depth_pays",
            "1 while extra depth is judged to pay for this class of request, 0 once the pod gave up on it (minimum depth, probes only)",
            depth_pays.clone(),
        );
        let depth_gain = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "ttc_depth_gain",
            "Accuracy extra depth gained over minimum depth for this class, from client feedback",
            depth_gain.clone(),
        );
        let admission = AdmissionGauges::default();
        registry.register(
            "ttc_admission_waiting",
            "Requests waiting for room in the sidecar's memory budget and row cap",
            admission.waiting.clone(),
        );
        registry.register(
            "ttc_admission_rows_in_flight",
            "Rows (samples of every request together) admitted and not yet finished",
            admission.rows_in_flight.clone(),
        );
        registry.register_with_unit(
            "ttc_memory_budget_used",
            "Bytes of the memory budget held by admitted requests (their estimated KV caches)",
            Unit::Bytes,
            admission.memory_used.clone(),
        );
        registry.register_with_unit(
            "ttc_memory_budget_limit",
            "The sidecar's memory budget for rows and their KV caches",
            Unit::Bytes,
            admission.memory_budget.clone(),
        );
        let refusals = Family::<Labels, Counter>::default();
        registry.register(
            "ttc_refusals",
            "Requests refused under load, by ttc_refusal_reason: no_room (429 after the wait), queue_full (429: the line is full), too_large (400: more than the whole budget), deadline (504)",
            refusals.clone(),
        );
        let depth_shed = Counter::default();
        registry.register(
            "ttc_depth_shed",
            "Samples test-time compute planned without because the pod had no room for them",
            depth_shed.clone(),
        );
        registry.register_collector(Box::new(MeterCollector { meter, dropped }));
        Self {
            registry,
            token_usage,
            request_duration,
            time_per_output_token,
            request_energy,
            depth,
            budget_allocation,
            budget_remaining,
            requests,
            samples,
            feedback,
            stops,
            depth_pays,
            depth_gain,
            admission,
            admission_probe,
            refusals,
            depth_shed,
        }
    }

    pub(crate) fn refusal(&self, reason: &str) {
        self.refusals
            .get_or_create(&vec![("ttc_refusal_reason", reason.to_string())])
            .inc();
    }

    pub(crate) fn depth_shed(&self, samples: u64) {
        self.depth_shed.inc_by(samples);
    }

    fn gen_ai(model: &str, operation: &str) -> Labels {
        vec![
            ("gen_ai_operation_name", operation.to_string()),
            ("gen_ai_provider_name", PROVIDER_NAME.to_string()),
            ("gen_ai_request_model", model.to_string()),
        ]
    }

    pub(crate) fn token_usage(&self, model: &str, operation: &str, input: u64, output: u64) {
        for (kind, n) in [("input", input), ("output", output)] {
            let mut labels = Self::gen_ai(model, operation);
            labels.push(("gen_ai_token_type", kind.to_string()));
            self.token_usage.get_or_create(&labels).observe(n as f64);
        }
    }

    pub(crate) fn request_duration(
        &self,
        model: &str,
        operation: &str,
        secs: f64,
        error: Option<&str>,
    ) {
        let mut labels = Self::gen_ai(model, operation);
        if let Some(e) = error {
            labels.push(("error_type", e.to_string()));
        }
        self.request_duration.get_or_create(&labels).observe(secs);
        self.requests.inc();
    }

    pub(crate) fn time_per_output_token(&self, model: &str, operation: &str, secs: f64) {
        self.time_per_output_token
            .get_or_create(&Self::gen_ai(model, operation))
            .observe(secs);
    }

    pub(crate) fn request_energy(&self, model: &str, joules: f64, source: EnergySource) {
        let labels = vec![
            ("ttc_energy_source", source.as_str().to_string()),
            ("gen_ai_request_model", model.to_string()),
        ];
        self.request_energy.get_or_create(&labels).observe(joules);
    }

    pub(crate) fn depth(&self, strategy: &str, depth: u64) {
        self.depth
            .get_or_create(&vec![("ttc_strategy", strategy.to_string())])
            .observe(depth as f64);
        self.samples.inc_by(depth);
    }

    pub(crate) fn budget(&self, allocation_j: f64, remaining_j: f64) {
        self.budget_allocation.set(allocation_j);
        self.budget_remaining.set(remaining_j);
    }

    pub(crate) fn feedback(&self, informative: bool) {
        self.feedback
            .get_or_create(&vec![("ttc_feedback_informative", informative.to_string())])
            .inc();
    }

    pub(crate) fn stop(&self, reason: &str) {
        self.stops
            .get_or_create(&vec![("ttc_stop_reason", reason.to_string())])
            .inc();
    }

    pub(crate) fn depth_value(&self, class: &DepthClassLabels<'_>, pays: bool, gain: Option<f64>) {
        let labels = vec![
            ("ttc_answer_type", class.answer_type.to_string()),
            ("ttc_difficulty_bin", class.difficulty_bin.to_string()),
        ];
        self.depth_pays
            .get_or_create(&labels)
            .set(f64::from(u8::from(pays)));
        if let Some(gain) = gain {
            self.depth_gain.get_or_create(&labels).set(gain);
        }
    }

    pub(crate) fn encode(&self) -> Result<String, TelemetryError> {
        if let Some(f) = self.admission_probe.read() {
            let g = &self.admission;
            g.waiting.set(f.waiting as i64);
            g.rows_in_flight.set(f.rows_in_flight as i64);
            g.memory_used.set(f.used_bytes as i64);
            g.memory_budget.set(f.budget_bytes as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn prom_key(otel_key: &'static str) -> &'static str {
    match otel_key {
        "service.name" => "service_name",
        "k8s.pod.name" => "k8s_pod_name",
        "k8s.namespace.name" => "k8s_namespace_name",
        "ttc.policy.name" => "ttc_policy_name",
        other => other,
    }
}

/// Reads the energy meter at scrape time, so `/metrics` shows the same cumulative figures the
/// OTLP export does.
#[derive(Debug)]
struct MeterCollector {
    meter: Option<EnergyMeter>,
    dropped: Arc<AtomicU64>,
}

impl prometheus_client::collector::Collector for MeterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let dropped = ConstCounter::new(self.dropped.load(Ordering::Relaxed));
        dropped.encode(encoder.encode_descriptor(
            "ttc_telemetry_dropped_exports",
            "OTLP metric exports that failed and were dropped",
            None,
            MetricType::Counter,
        )?)?;
        let Some(meter) = &self.meter else {
            return Ok(());
        };
        let totals = meter.totals();
        let source = totals.source.as_str().to_string();
        // hw.* is hardware telemetry: an estimate belongs under ttc_energy only.
        let devices = if totals.source.is_measured() {
            totals.devices.as_slice()
        } else {
            &[]
        };

        let mut family = encoder.encode_descriptor(
            "hw_energy",
            "Energy consumed by the component",
            Some(&Unit::Joules),
            MetricType::Counter,
        )?;
        for d in devices {
            let labels = [
                ("hw_id", d.id.clone()),
                ("hw_type", d.hw_type.as_str().to_string()),
                ("ttc_energy_source", source.clone()),
            ];
            ConstCounter::new(uj_to_j(d.energy_uj)).encode(family.encode_family(&labels)?)?;
        }

        let watts = Unit::Other("watts".to_string());
        let mut family = encoder.encode_descriptor(
            "hw_power",
            "Instantaneous power consumed by the component",
            Some(&watts),
            MetricType::Gauge,
        )?;
        for d in devices {
            if let Some(w) = d.power_w {
                let labels = [
                    ("hw_id", d.id.clone()),
                    ("hw_type", d.hw_type.as_str().to_string()),
                ];
                ConstGauge::new(w).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "ttc_energy",
            "Energy spent since the sidecar started, by the source of the figure",
            Some(&Unit::Joules),
            MetricType::Counter,
        )?;
        for (source, uj) in totals.by_source() {
            let labels = [("ttc_energy_source", source.as_str())];
            ConstCounter::new(uj_to_j(uj)).encode(family.encode_family(&labels)?)?;
        }

        let mut family = encoder.encode_descriptor(
            "ttc_energy_usage",
            "Energy metered by the sidecar, by what it was spent on",
            Some(&Unit::Joules),
            MetricType::Counter,
        )?;
        for (source, usage, uj) in crate::energy_rows(&totals) {
            let labels = [("ttc_energy_source", source), ("ttc_energy_use", usage)];
            ConstCounter::new(uj_to_j(uj)).encode(family.encode_family(&labels)?)?;
        }

        // The family is always there (dashboards and alerts can name it); its sample only once
        // the meter knows the power.
        let family = encoder.encode_descriptor(
            "ttc_power",
            "Current power draw of the pod's inference devices",
            Some(&watts),
            MetricType::Gauge,
        )?;
        if let Some(w) = totals.power_w() {
            ConstGauge::new(w).encode(family)?;
        }
        Ok(())
    }
}
