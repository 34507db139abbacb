use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter, Gauge, Histogram, MeterProvider as _, ObservableCounter, ObservableGauge,
};
use opentelemetry_otlp::{MetricExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use ttc_api::report;
use ttc_energy::{EnergyMeter, uj_to_j};

use crate::report_client::ReportClient;
use crate::{AdmissionFigures, AdmissionProbe, OtlpExport, TelemetryConfig, TelemetryError, keys};

/// `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), 10 s by default as in the specification.
fn export_timeout_from_env() -> Duration {
    [
        "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse::<u64>().ok())
    .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// Bucket boundaries the semantic conventions advise for these histograms.
pub(crate) const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
pub(crate) const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
pub(crate) const PER_TOKEN_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// Joules per request: from a short CPU completion to a long multi-sample GPU answer.
pub(crate) const ENERGY_BUCKETS: [f64; 12] = [
    0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0,
];
pub(crate) const DEPTH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Wraps the OTLP exporter to count exports that failed: the SDK only logs them.
#[derive(Debug)]
struct CountingExporter {
    inner: MetricExporter,
    dropped: Arc<AtomicU64>,
}

impl PushMetricExporter for CountingExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        if let Err(e) = &result {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "OTLP metrics export failed");
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// The OTLP side: provider (with its export thread) and instruments.
pub(crate) struct OtlpPipeline {
    pub(crate) provider: SdkMeterProvider,
    /// The exporter's client where it is ours (a CA or a token to present), for trust changes.
    pub(crate) report_client: Option<ReportClient>,
    pub(crate) token_usage: Histogram<u64>,
    pub(crate) request_duration: Histogram<f64>,
    pub(crate) time_per_output_token: Histogram<f64>,
    pub(crate) request_energy: Histogram<f64>,
    pub(crate) depth: Histogram<u64>,
    pub(crate) budget_allocation: Gauge<f64>,
    pub(crate) budget_remaining: Gauge<f64>,
    pub(crate) requests: Counter<u64>,
    pub(crate) samples: Counter<u64>,
    pub(crate) feedback: Counter<u64>,
    pub(crate) stops: Counter<u64>,
    pub(crate) depth_pays: Gauge<f64>,
    pub(crate) depth_gain: Gauge<f64>,
    pub(crate) refusals: Counter<u64>,
    pub(crate) depth_shed: Counter<u64>,
    /// Observable instruments live as long as these handles.
    _observed: Vec<Observed>,
}

#[allow(dead_code)] // held only to keep callbacks registered
enum Observed {
    Counter(ObservableCounter<f64>),
    CounterU64(ObservableCounter<u64>),
    Gauge(ObservableGauge<f64>),
    GaugeU64(ObservableGauge<u64>),
}

impl OtlpPipeline {
    pub(crate) fn start(
        config: &TelemetryConfig,
        export: &OtlpExport,
        meter: Option<EnergyMeter>,
        dropped: Arc<AtomicU64>,
        admission: AdmissionProbe,
    ) -> Result<Self, TelemetryError> {
        // The exporter's HTTP client speaks TLS through rustls, which needs a process-wide
        // crypto provider (the operator's receiver and a collector of the user's alike); ring,
        // unless the process chose one already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = MetricExporter::builder().with_http();
        if let OtlpExport::Endpoint(url) = export {
            builder = builder.with_endpoint(url.clone());
        }
        if let Some(timeout) = config.export_timeout {
            builder = builder.with_timeout(timeout);
        }
        let mut report_client = None;
        if config.bearer_token_file.is_some() || config.ca_pem.is_some() {
            let timeout = config
                .export_timeout
                .unwrap_or_else(export_timeout_from_env);
            let client = ReportClient::new(
                config.bearer_token_file.clone(),
                config.ca_pem.as_deref(),
                timeout,
            )
            .map_err(TelemetryError::HttpClient)?;
            builder = builder.with_http_client(client.clone());
            report_client = Some(client);
        }
        let exporter = CountingExporter {
            inner: builder.build()?,
            dropped: dropped.clone(),
        };
        let mut reader = PeriodicReader::builder(exporter);
        if let Some(interval) = config.export_interval {
            reader = reader.with_interval(interval);
        }
        let resource = Resource::builder()
            .with_attributes(
                config
                    .resource_attributes()
                    .into_iter()
                    .map(|(k, v)| KeyValue::new(k, v)),
            )
            .build();
        let provider = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(reader.build())
            .build();
        let m = provider.meter("ttc-sidecar");

        let mut observed = vec![Observed::CounterU64(
            m.u64_observable_counter("ttc.telemetry.dropped_exports")
                .with_unit("{export}")
                .with_description("OTLP metric exports that failed and were dropped")
                .with_callback(move |o| o.observe(dropped.load(Ordering::Relaxed), &[]))
                .build(),
        )];
        if let Some(meter) = meter {
            observed.extend(energy_instruments(&m, meter));
        }
        observed.extend(admission_instruments(&m, &admission));

        Ok(Self {
            report_client,
            token_usage: m
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Number of input and output tokens used")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            request_duration: m
                .f64_histogram("gen_ai.server.request.duration")
                .with_unit("s")
                .with_description("Generative AI server request duration")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            time_per_output_token: m
                .f64_histogram("gen_ai.server.time_per_output_token")
                .with_unit("s")
                .with_description("Time per output token generated after the first token")
                .with_boundaries(PER_TOKEN_BUCKETS.to_vec())
                .build(),
            request_energy: m
                .f64_histogram("ttc.request.energy")
                .with_unit("J")
                .with_description("Energy of one request, labelled with where the figure came from")
                .with_boundaries(ENERGY_BUCKETS.to_vec())
                .build(),
            depth: m
                .u64_histogram("ttc.depth")
                .with_unit("{sample}")
                .with_description("Test-time compute depth chosen per request")
                .with_boundaries(DEPTH_BUCKETS.to_vec())
                .build(),
            budget_allocation: m
                .f64_gauge("ttc.budget.allocation")
                .with_unit("J")
                .with_description("This pod's target average joules per request (its share of the policy's budget)")
                .build(),
            budget_remaining: m
                .f64_gauge("ttc.budget.remaining")
                .with_unit("J")
                .with_description("Headroom of this pod's window mean below its target, in joules per request (negative when over)")
                .build(),
            requests: m
                .u64_counter(report::METRIC_REQUESTS)
                .with_unit("{request}")
                .with_description("Requests completed since the sidecar started")
                .build(),
            samples: m
                .u64_counter(report::METRIC_SAMPLES)
                .with_unit("{sample}")
                .with_description("Test-time compute samples generated since the sidecar started")
                .build(),
            feedback: m
                .u64_counter("ttc.feedback")
                .with_unit("{feedback}")
                .with_description("Client verdicts on answers taken; ttc.feedback.informative says whether the request drew more than minimum depth")
                .build(),
            stops: m
                .u64_counter("ttc.stops")
                .with_unit("{request}")
                .with_description("Test-time compute requests by why they stopped drawing samples (ttc.stop.reason)")
                .build(),
            depth_pays: m
                .f64_gauge("ttc.depth.pays")
                .with_unit("1")
                .with_description("1 while extra depth is judged to pay for this class of request, 0 once the pod gave up on it (minimum depth, probes only)")
                .build(),
            depth_gain: m
                .f64_gauge("ttc.depth.gain")
                .with_unit("1")
                .with_description("Accuracy extra depth gained over minimum depth for this class, from client feedback")
                .build(),
            refusals: m
                .u64_counter("ttc.refusals")
                .with_unit("{request}")
                .with_description("Requests refused under load, by ttc.refusal.reason: no_room (429 after the wait), queue_full (429: the line is full), too_large (400: more than the whole budget), deadline (504)")
                .build(),
            depth_shed: m
                .u64_counter("ttc.depth.shed")
                .with_unit("{sample}")
                .with_description("Samples test-time compute planned without because the pod had no room for them")
                .build(),
            provider,
            _observed: observed,
        })
    }
}

/// An admission gauge: name, unit, description and the figure it shows.
type AdmissionGauge = (
    &'static str,
    &'static str,
    &'static str,
    fn(&AdmissionFigures) -> u64,
);

/// The admission gauges, read from the probe at each collection (nothing until it has one).
fn admission_instruments(
    m: &opentelemetry::metrics::Meter,
    probe: &AdmissionProbe,
) -> Vec<Observed> {
    let gauges: [AdmissionGauge; 4] = [
        (
            "ttc.admission.waiting",
            "{request}",
            "Requests waiting for room in the sidecar's memory budget and row cap",
            |f| f.waiting,
        ),
        (
            "ttc.admission.rows_in_flight",
            "{row}",
            "Rows (samples of every request together) admitted and not yet finished",
            |f| f.rows_in_flight,
        ),
        (
            "ttc.memory_budget.used",
            "By",
            "Bytes of the memory budget held by admitted requests (their estimated KV caches)",
            |f| f.used_bytes,
        ),
        (
            "ttc.memory_budget.limit",
            "By",
            "The sidecar's memory budget for rows and their KV caches",
            |f| f.budget_bytes,
        ),
    ];
    gauges
        .into_iter()
        .map(|(name, unit, description, figure)| {
            let probe = probe.clone();
            Observed::GaugeU64(
                m.u64_observable_gauge(name)
                    .with_unit(unit)
                    .with_description(description)
                    .with_callback(move |o| {
                        if let Some(figures) = probe.read() {
                            o.observe(figure(&figures), &[]);
                        }
                    })
                    .build(),
            )
        })
        .collect()
}

/// `hw.energy`, `hw.power` and `ttc.energy`, read from the meter at each collection.
fn energy_instruments(m: &opentelemetry::metrics::Meter, meter: EnergyMeter) -> Vec<Observed> {
    let energy_meter = meter.clone();
    let hw_energy = m
        .f64_observable_counter("hw.energy")
        .with_unit("J")
        .with_description("Energy consumed by the component")
        .with_callback(move |o| {
            let totals = energy_meter.totals();
            // hw.* is hardware telemetry: an estimate belongs under ttc.energy only.
            if !totals.source.is_measured() {
                return;
            }
            for d in &totals.devices {
                o.observe(
                    uj_to_j(d.energy_uj),
                    &[
                        KeyValue::new(keys::HW_ID, d.id.clone()),
                        KeyValue::new(keys::HW_TYPE, d.hw_type.as_str()),
                        KeyValue::new(keys::ENERGY_SOURCE, totals.source.as_str()),
                    ],
                );
            }
        })
        .build();
    let power_meter = meter.clone();
    let hw_power = m
        .f64_observable_gauge("hw.power")
        .with_unit("W")
        .with_description("Instantaneous power consumed by the component")
        .with_callback(move |o| {
            let totals = power_meter.totals();
            if !totals.source.is_measured() {
                return;
            }
            for d in totals.devices {
                if let Some(w) = d.power_w {
                    o.observe(
                        w,
                        &[
                            KeyValue::new(keys::HW_ID, d.id.clone()),
                            KeyValue::new(keys::HW_TYPE, d.hw_type.as_str()),
                        ],
                    );
                }
            }
        })
        .build();
    let joules_meter = meter.clone();
    let ttc_joules = m
        .f64_observable_counter(report::METRIC_ENERGY_JOULES)
        .with_unit("J")
        .with_description("Energy spent since the sidecar started, by the source of the figure")
        .with_callback(move |o| {
            for (source, uj) in joules_meter.totals().by_source() {
                o.observe(
                    uj_to_j(uj),
                    &[KeyValue::new(keys::ENERGY_SOURCE, source.as_str())],
                );
            }
        })
        .build();
    let watts_meter = meter.clone();
    let ttc_watts = m
        .f64_observable_gauge(report::METRIC_POWER_WATTS)
        .with_unit("W")
        .with_description("Current power draw of the pod's inference devices")
        .with_callback(move |o| {
            if let Some(w) = watts_meter.totals().power_w() {
                o.observe(w, &[]);
            }
        })
        .build();
    let ttc_energy = m
        .f64_observable_counter("ttc.energy.usage")
        .with_unit("J")
        .with_description("Energy metered by the sidecar, by what it was spent on")
        .with_callback(move |o| {
            for (source, usage, uj) in crate::energy_rows(&meter.totals()) {
                o.observe(
                    uj_to_j(uj),
                    &[
                        KeyValue::new(keys::ENERGY_SOURCE, source),
                        KeyValue::new(keys::ENERGY_USE, usage),
                    ],
                );
            }
        })
        .build();
    vec![
        Observed::Counter(hw_energy),
        Observed::Gauge(hw_power),
        Observed::Counter(ttc_energy),
        Observed::Counter(ttc_joules),
        Observed::Gauge(ttc_watts),
    ]
}
