//! Sidecar metrics, following the OpenTelemetry semantic conventions where they exist, exported
//! over OTLP (endpoint and settings from the standard `OTEL_*` variables) and as Prometheus text
//! on `/metrics`.
//!
//! The engine holds one [`SidecarMetrics`] and calls its `record_*` methods; they only update
//! in-memory aggregates. Export happens on the OpenTelemetry SDK's own thread, so an OTLP
//! endpoint that is slow or down never slows or fails a request; failed exports are counted
//! (`ttc.telemetry.dropped_exports`).
//!
//! ```no_run
//! use std::time::Duration;
//! use ttc_telemetry::{RequestRecord, SidecarMetrics, TelemetryConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let meter = ttc_energy::EnergyMeter::from_config(&Default::default())?;
//! // At start-up (outside the async runtime, or in spawn_blocking):
//! let metrics = SidecarMetrics::new(&TelemetryConfig::from_env("smollm2-135m"), Some(meter))?;
//!
//! // When a request finishes:
//! metrics.record_request(&RequestRecord {
//!     operation: "chat",
//!     input_tokens: 42,
//!     output_tokens: 300,
//!     duration: Duration::from_millis(2_400),
//!     time_per_output_token: Some(Duration::from_millis(8)),
//!     energy: Some((12.5, ttc_energy::EnergySource::Nvml)),
//!     strategy: "vote",
//!     depth: 4,
//!     error_type: None,
//! });
//! // After each request under a budget: the target and the headroom, in joules per request:
//! metrics.set_budget(4.0, 0.35);
//! // GET /metrics:
//! let body = metrics.encode_prometheus()?; // Content-Type: SidecarMetrics::PROMETHEUS_CONTENT_TYPE
//! # let _ = body;
//! # Ok(())
//! # }
//! ```
//!
//! | metric | kind | unit | attributes |
//! |---|---|---|---|
//! | `hw.energy` | counter | `J` | `hw.id`, `hw.type`, `ttc.energy.source` (measured sources only) |
//! | `hw.power` | gauge | `W` | `hw.id`, `hw.type` (measured sources only) |
//! | `gen_ai.client.token.usage` | histogram | `{token}` | `gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.token.type` |
//! | `gen_ai.server.request.duration` | histogram | `s` | as above less `gen_ai.token.type`, plus `error.type` on failures |
//! | `gen_ai.server.time_per_output_token` | histogram | `s` | `gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model` |
//! | `ttc.request.energy` | histogram | `J` | `ttc.energy.source`, `gen_ai.request.model` |
//! | `ttc.energy.joules` | counter | `J` | `ttc.energy.source` |
//! | `ttc.energy.usage` | counter | `J` | `ttc.energy.source`, `ttc.energy.use` (`request`, `idle`, `unattributed`) |
//! | `ttc.power.watts` | gauge | `W` | — |
//! | `ttc.requests` | counter | `{request}` | — |
//! | `ttc.samples` | counter | `{sample}` | — |
//! | `ttc.depth` | histogram | `{sample}` | `ttc.strategy` |
//! | `ttc.budget.allocation` | gauge | `J` | — |
//! | `ttc.budget.remaining` | gauge | `J` | — |
//! | `ttc.depth.pays` | gauge | `1` | `ttc.answer.type`, `ttc.difficulty.bin` |
//! | `ttc.depth.gain` | gauge | `1` | `ttc.answer.type`, `ttc.difficulty.bin` (with client feedback only) |
//! | `ttc.feedback` | counter | `{feedback}` | `ttc.feedback.informative` |
//! | `ttc.stops` | counter | `{request}` | `ttc.stop.reason` (`agreement`, `decided`, `confident`, `accepted`, `max_samples`) |
//! | `ttc.admission.waiting` | gauge | `{request}` | — |
//! | `ttc.admission.rows_in_flight` | gauge | `{row}` | — |
//! | `ttc.memory_budget.used` | gauge | `By` | — |
//! | `ttc.memory_budget.limit` | gauge | `By` | — |
//! | `ttc.refusals` | counter | `{request}` | `ttc.refusal.reason` (`no_room`, `queue_full`, `too_large`, `deadline`) |
//! | `ttc.depth.shed` | counter | `{sample}` | — |
//! | `ttc.telemetry.dropped_exports` | counter | `{export}` | — |
//!
//! The admission gauges are read from the probe given to [`SidecarMetrics::observe_admission`]
//! at each export and scrape.
//!
//! Resource attributes: `service.name`, `k8s.pod.name`, `k8s.namespace.name`, `ttc.policy.name`
//! (on Prometheus: the `target_info` series).
//!
//! `ttc.energy.joules`, `ttc.requests`, `ttc.samples` and `ttc.power.watts` with those resource
//! attributes are the report the operator's receiver reads (`ttc_api::report`): it sums each
//! metric's data points per pod, so the energy there is exactly the meter's total, split by
//! source.

mod config;
mod otlp;
mod prometheus;
mod report_client;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use ttc_energy::{EnergyMeter, EnergySource};

pub use config::{OtlpExport, TelemetryConfig};

/// Everything that can go wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (bad endpoint, protocol or headers in `OTEL_*`).
    #[error("cannot set up OTLP metrics export: {0}; check the OTEL_EXPORTER_OTLP_* variables")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
    /// Flushing or shutting down the OTLP pipeline failed.
    #[error("OTLP metrics pipeline: {0}")]
    Pipeline(#[from] opentelemetry_sdk::error::OTelSdkError),
    /// The HTTP client of the OTLP export could not be built.
    #[error("cannot set up the OTLP HTTP client: {0}")]
    HttpClient(String),
    /// The Prometheus text could not be written.
    #[error("cannot encode Prometheus metrics")]
    Encode(#[from] std::fmt::Error),
}

/// Attribute keys, as the semantic conventions spell them.
pub mod keys {
    /// `hw.id`
    pub const HW_ID: &str = "hw.id";
    /// `hw.type`
    pub const HW_TYPE: &str = "hw.type";
    /// `gen_ai.operation.name`
    pub const OPERATION: &str = "gen_ai.operation.name";
    /// `gen_ai.provider.name`
    pub const PROVIDER: &str = "gen_ai.provider.name";
    /// `gen_ai.request.model`
    pub const MODEL: &str = "gen_ai.request.model";
    /// `gen_ai.token.type`
    pub const TOKEN_TYPE: &str = "gen_ai.token.type";
    /// `error.type`
    pub const ERROR_TYPE: &str = "error.type";
    /// `ttc.energy.source`, as the report contract names it.
    pub const ENERGY_SOURCE: &str = ttc_api::report::ATTR_ENERGY_SOURCE;
    /// `ttc.energy.use`
    pub const ENERGY_USE: &str = "ttc.energy.use";
    /// `ttc.strategy`
    pub const STRATEGY: &str = "ttc.strategy";
    /// `ttc.policy.name` (resource), as the report contract names it.
    pub const POLICY: &str = ttc_api::report::ATTR_POLICY;
    /// `ttc.answer.type`: how a class of request's answers are extracted.
    pub const ANSWER_TYPE: &str = "ttc.answer.type";
    /// `ttc.difficulty.bin`: a class of request's difficulty bin (0 = easy).
    pub const DIFFICULTY_BIN: &str = "ttc.difficulty.bin";
    /// `ttc.feedback.informative`: whether feedback said something about depth.
    pub const FEEDBACK_INFORMATIVE: &str = "ttc.feedback.informative";
    /// `ttc.stop.reason`: why a TTC request stopped drawing samples.
    pub const STOP_REASON: &str = "ttc.stop.reason";
    /// `ttc.refusal.reason`: why a request was refused under load.
    pub const REFUSAL_REASON: &str = "ttc.refusal.reason";
}

/// Where the sidecar's admission control stands: the admission gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionFigures {
    /// Requests waiting for room.
    pub waiting: u64,
    /// Rows (samples of every request together) admitted and not yet finished.
    pub rows_in_flight: u64,
    /// Bytes of the memory budget held by admitted requests.
    pub used_bytes: u64,
    /// The memory budget.
    pub budget_bytes: u64,
}

/// Reads [`AdmissionFigures`] when metrics are exported or scraped; empty until the sidecar
/// gives it a probe.
#[derive(Clone, Default)]
pub(crate) struct AdmissionProbe(Arc<RwLock<Option<AdmissionFn>>>);

type AdmissionFn = Arc<dyn Fn() -> AdmissionFigures + Send + Sync>;

impl AdmissionProbe {
    pub(crate) fn read(&self) -> Option<AdmissionFigures> {
        let probe = self.0.read().ok()?.clone()?;
        Some(probe())
    }

    fn set(&self, probe: AdmissionFn) {
        if let Ok(mut slot) = self.0.write() {
            *slot = Some(probe);
        }
    }
}

/// A class of request whose value of depth is learned apart (the attributes of
/// `ttc.depth.pays` and `ttc.depth.gain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthClassLabels<'a> {
    /// `ttc.answer.type`: `number`, `choice`, `yes_no`, `short` or `json`.
    pub answer_type: &'a str,
    /// `ttc.difficulty.bin`.
    pub difficulty_bin: usize,
}

/// The `gen_ai.provider.name` this sidecar reports for itself.
pub const PROVIDER_NAME: &str = "ttc";

/// What the engine knows about one finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord<'a> {
    /// `chat` or `text_completion` (`gen_ai.operation.name`).
    pub operation: &'a str,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens, all TTC samples included.
    pub output_tokens: u64,
    /// From receiving the request to the last token.
    pub duration: Duration,
    /// Decode time per generated token, where the engine measured it.
    pub time_per_output_token: Option<Duration>,
    /// The request's joules and their source, from [`ttc_energy::RequestEnergy`].
    pub energy: Option<(f64, EnergySource)>,
    /// The TTC strategy (`vote`, `reasoning_budget`, `single`).
    pub strategy: &'a str,
    /// The TTC depth chosen (samples voted, or thinking-budget steps).
    pub depth: u64,
    /// Set when the request failed: a short error class (`timeout`, `budget_exhausted`, ...).
    pub error_type: Option<&'a str>,
}

/// The sidecar's metrics handle. Cheap to clone.
#[derive(Clone)]
pub struct SidecarMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    model: String,
    otlp: Option<otlp::OtlpPipeline>,
    prom: prometheus::PromMetrics,
    dropped_exports: Arc<AtomicU64>,
    admission: AdmissionProbe,
}

impl std::fmt::Debug for SidecarMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarMetrics")
            .field("model", &self.inner.model)
            .field("otlp", &self.inner.otlp.is_some())
            .finish_non_exhaustive()
    }
}

impl SidecarMetrics {
    /// Sets up the Prometheus registry and, when configured, the OTLP pipeline. With a meter,
    /// `hw.energy`, `hw.power` and `ttc.energy` are read from it at each export and scrape.
    ///
    /// Call from a plain thread or `spawn_blocking` (the OTLP HTTP client is a blocking one).
    pub fn new(
        config: &TelemetryConfig,
        meter: Option<EnergyMeter>,
    ) -> Result<Self, TelemetryError> {
        let dropped_exports = Arc::new(AtomicU64::new(0));
        let admission = AdmissionProbe::default();
        let otlp = match &config.otlp {
            OtlpExport::Disabled => None,
            export => Some(otlp::OtlpPipeline::start(
                config,
                export,
                meter.clone(),
                dropped_exports.clone(),
                admission.clone(),
            )?),
        };
        let prom =
            prometheus::PromMetrics::new(config, meter, dropped_exports.clone(), admission.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                model: config.model.clone(),
                otlp,
                prom,
                dropped_exports,
                admission,
            }),
        })
    }

    /// Trusts `ca_pem` for the energy reports besides the CA this sidecar was created with: the
    /// operator's receiver CA as published in the policy's status (`status.reportCABundle`), so
    /// that reports keep arriving after the operator's CA changes. `Ok(true)` when the trust
    /// changed; `Ok(false)` when it was trusted already or the reports do not go to the
    /// receiver over TLS. A CA that does not parse is an error and changes nothing.
    pub fn trust_report_ca(&self, ca_pem: &str) -> Result<bool, TelemetryError> {
        match self
            .inner
            .otlp
            .as_ref()
            .and_then(|otlp| otlp.report_client.as_ref())
        {
            Some(client) => client
                .trust_published(ca_pem)
                .map_err(TelemetryError::HttpClient),
            None => Ok(false),
        }
    }

    fn gen_ai_attrs(&self, operation: &str) -> [KeyValue; 3] {
        [
            KeyValue::new(keys::OPERATION, operation.to_string()),
            KeyValue::new(keys::PROVIDER, PROVIDER_NAME),
            KeyValue::new(keys::MODEL, self.inner.model.clone()),
        ]
    }

    /// Records `gen_ai.client.token.usage` for input and output tokens.
    pub fn record_token_usage(&self, operation: &str, input_tokens: u64, output_tokens: u64) {
        if let Some(otlp) = &self.inner.otlp {
            let attrs = self.gen_ai_attrs(operation);
            for (kind, n) in [("input", input_tokens), ("output", output_tokens)] {
                let mut a = attrs.to_vec();
                a.push(KeyValue::new(keys::TOKEN_TYPE, kind));
                otlp.token_usage.record(n, &a);
            }
        }
        self.inner
            .prom
            .token_usage(&self.inner.model, operation, input_tokens, output_tokens);
    }

    /// Records `gen_ai.server.request.duration` and counts the request in `ttc.requests`.
    pub fn record_request_duration(
        &self,
        operation: &str,
        duration: Duration,
        error_type: Option<&str>,
    ) {
        let secs = duration.as_secs_f64();
        if let Some(otlp) = &self.inner.otlp {
            otlp.requests.add(1, &[]);
            let mut a = self.gen_ai_attrs(operation).to_vec();
            if let Some(e) = error_type {
                a.push(KeyValue::new(keys::ERROR_TYPE, e.to_string()));
            }
            otlp.request_duration.record(secs, &a);
        }
        self.inner
            .prom
            .request_duration(&self.inner.model, operation, secs, error_type);
    }

    /// Records `gen_ai.server.time_per_output_token`.
    pub fn record_time_per_output_token(&self, operation: &str, per_token: Duration) {
        let secs = per_token.as_secs_f64();
        if let Some(otlp) = &self.inner.otlp {
            otlp.time_per_output_token
                .record(secs, &self.gen_ai_attrs(operation));
        }
        self.inner
            .prom
            .time_per_output_token(&self.inner.model, operation, secs);
    }

    /// Records `ttc.request.energy`: one request's joules, labelled with their source.
    pub fn record_request_energy(&self, joules: f64, source: EnergySource) {
        if let Some(otlp) = &self.inner.otlp {
            otlp.request_energy.record(
                joules,
                &[
                    KeyValue::new(keys::ENERGY_SOURCE, source.as_str()),
                    KeyValue::new(keys::MODEL, self.inner.model.clone()),
                ],
            );
        }
        self.inner
            .prom
            .request_energy(&self.inner.model, joules, source);
    }

    /// Records `ttc.depth`, the TTC depth chosen for a request, and adds it to `ttc.samples`.
    pub fn record_ttc_depth(&self, strategy: &str, depth: u64) {
        if let Some(otlp) = &self.inner.otlp {
            otlp.samples.add(depth, &[]);
            otlp.depth.record(
                depth,
                &[KeyValue::new(keys::STRATEGY, strategy.to_string())],
            );
        }
        self.inner.prom.depth(strategy, depth);
    }

    /// Sets `ttc.budget.allocation` (this pod's target average joules per request) and
    /// `ttc.budget.remaining` (how far the window's mean is below it, in joules per request;
    /// negative when over).
    pub fn set_budget(&self, allocation_j: f64, remaining_j: f64) {
        if let Some(otlp) = &self.inner.otlp {
            otlp.budget_allocation.record(allocation_j, &[]);
            otlp.budget_remaining.record(remaining_j, &[]);
        }
        self.inner.prom.budget(allocation_j, remaining_j);
    }

    /// Counts a client's verdict in `ttc.feedback`; `informative` when the request drew more
    /// than minimum depth, so the verdict said something about depth.
    pub fn record_feedback(&self, informative: bool) {
        if let Some(otlp) = &self.inner.otlp {
            otlp.feedback
                .add(1, &[KeyValue::new(keys::FEEDBACK_INFORMATIVE, informative)]);
        }
        self.inner.prom.feedback(informative);
    }

    /// Counts a TTC request in `ttc.stops` by why it stopped drawing samples (`reason`: the
    /// label of the sidecar's stop reason), which shows where early stopping saves samples.
    pub fn record_stop(&self, reason: &str) {
        if let Some(otlp) = &self.inner.otlp {
            otlp.stops
                .add(1, &[KeyValue::new(keys::STOP_REASON, reason.to_string())]);
        }
        self.inner.prom.stop(reason);
    }

    /// Reads the admission gauges (`ttc.admission.*`, `ttc.memory_budget.*`) from `probe`
    /// whenever metrics are exported or scraped; replaces an earlier probe.
    pub fn observe_admission(&self, probe: impl Fn() -> AdmissionFigures + Send + Sync + 'static) {
        self.inner.admission.set(Arc::new(probe));
    }

    /// Counts a request refused under load in `ttc.refusals`: `reason` is `no_room`,
    /// `queue_full`, `too_large` or `deadline`.
    pub fn record_refusal(&self, reason: &str) {
        if let Some(otlp) = &self.inner.otlp {
            otlp.refusals.add(
                1,
                &[KeyValue::new(keys::REFUSAL_REASON, reason.to_string())],
            );
        }
        self.inner.prom.refusal(reason);
    }

    /// Counts in `ttc.depth.shed` samples test-time compute planned without for lack of room.
    pub fn record_depth_shed(&self, samples: u64) {
        if let Some(otlp) = &self.inner.otlp {
            otlp.depth_shed.add(samples, &[]);
        }
        self.inner.prom.depth_shed(samples);
    }

    /// Sets `ttc.depth.pays` (1 or 0) and, where feedback measured it, `ttc.depth.gain` for one
    /// class of request: whether the pod still pays for extra depth there, and what it gained.
    pub fn set_depth_value(&self, class: &DepthClassLabels<'_>, pays: bool, gain: Option<f64>) {
        if let Some(otlp) = &self.inner.otlp {
            let attrs = [
                KeyValue::new(keys::ANSWER_TYPE, class.answer_type.to_string()),
                KeyValue::new(keys::DIFFICULTY_BIN, class.difficulty_bin as i64),
            ];
            otlp.depth_pays.record(f64::from(u8::from(pays)), &attrs);
            if let Some(gain) = gain {
                otlp.depth_gain.record(gain, &attrs);
            }
        }
        self.inner.prom.depth_value(class, pays, gain);
    }

    /// Records everything known about one finished request.
    pub fn record_request(&self, r: &RequestRecord<'_>) {
        self.record_token_usage(r.operation, r.input_tokens, r.output_tokens);
        self.record_request_duration(r.operation, r.duration, r.error_type);
        if let Some(t) = r.time_per_output_token {
            self.record_time_per_output_token(r.operation, t);
        }
        if let Some((joules, source)) = r.energy {
            self.record_request_energy(joules, source);
        }
        self.record_ttc_depth(r.strategy, r.depth);
    }

    /// The Prometheus text exposition (OpenMetrics) for `/metrics`.
    pub fn encode_prometheus(&self) -> Result<String, TelemetryError> {
        self.inner.prom.encode()
    }

    /// The `Content-Type` to serve [`encode_prometheus`](Self::encode_prometheus) with.
    pub const PROMETHEUS_CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// OTLP exports that failed (endpoint down, timed out, refused) so far.
    pub fn dropped_exports(&self) -> u64 {
        self.inner.dropped_exports.load(Ordering::Relaxed)
    }

    /// Exports now; blocks until the OTLP endpoint answers or the export times out.
    /// Call from a plain thread or `spawn_blocking`.
    pub fn force_flush(&self) -> Result<(), TelemetryError> {
        match &self.inner.otlp {
            Some(otlp) => Ok(otlp.provider.force_flush()?),
            None => Ok(()),
        }
    }

    /// Flushes and stops the OTLP pipeline (at sidecar exit). Call from a plain thread or
    /// `spawn_blocking`.
    pub fn shutdown(&self) -> Result<(), TelemetryError> {
        match &self.inner.otlp {
            Some(otlp) => Ok(otlp.provider.shutdown()?),
            None => Ok(()),
        }
    }
}

/// `ttc.energy` rows (source, use, microjoules): estimated request joules are reported under
/// `estimate`, never as measured.
pub(crate) fn energy_rows(t: &ttc_energy::MeterTotals) -> Vec<(&'static str, &'static str, u64)> {
    let source = t.source.as_str();
    let mut rows = vec![
        (source, "request", t.requests_uj - t.estimated_uj),
        (source, "idle", t.idle_uj),
        (source, "unattributed", t.unattributed_uj),
    ];
    if t.source == EnergySource::Estimate {
        rows[0].2 = t.requests_uj;
    } else {
        rows.push(("estimate", "request", t.estimated_uj));
    }
    rows
}
