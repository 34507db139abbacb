//! A real OTLP/HTTP receiver (protobuf decoding from opentelemetry-proto) takes the sidecar's
//! export; names, units, attributes and resource are asserted. Also: the endpoint being down
//! neither slows nor fails recording, and the Prometheus text parses.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use ttc_energy::{
    DeviceReading, EnergyError, EnergyMeter, EnergySensor, EnergySource, EstimateModel, HwType,
    SensorReading,
};
use ttc_telemetry::{AdmissionFigures, OtlpExport, RequestRecord, SidecarMetrics, TelemetryConfig};

/// A GPU whose counter the test moves by hand.
struct HandGpu(Arc<Mutex<u64>>);

impl EnergySensor for HandGpu {
    fn source(&self) -> EnergySource {
        EnergySource::Nvml
    }
    fn read(&mut self) -> Result<SensorReading, EnergyError> {
        let uj = *self.0.lock().unwrap();
        Ok(SensorReading {
            total_uj: uj,
            devices: vec![DeviceReading {
                id: "GPU-1234".into(),
                hw_type: HwType::Gpu,
                energy_uj: uj,
                power_w: Some(312.5),
            }],
        })
    }
}

fn config(otlp: OtlpExport) -> TelemetryConfig {
    TelemetryConfig {
        service_name: "ttc-sidecar".into(),
        pod_name: Some("infer-0".into()),
        namespace: Some("llm".into()),
        policy: Some("gold".into()),
        model: "smollm2-135m".into(),
        otlp,
        // Long: the test flushes by hand, so nothing races it.
        export_interval: Some(Duration::from_secs(3600)),
        export_timeout: Some(Duration::from_millis(500)),
        bearer_token_file: None,
        ca_pem: None,
    }
}

fn record_some(metrics: &SidecarMetrics, meter: &EnergyMeter, counter: &Mutex<u64>) {
    let batch = meter.begin_batch();
    *counter.lock().unwrap() += 2_500_000;
    let batch = batch.finish(&[("r1", 30), ("r2", 10)]);
    for r in &batch.requests {
        metrics.record_request(&RequestRecord {
            operation: "chat",
            input_tokens: 12,
            output_tokens: r.tokens,
            duration: Duration::from_millis(420),
            time_per_output_token: Some(Duration::from_millis(14)),
            energy: Some((r.joules(), r.source)),
            strategy: "vote",
            depth: 4,
            error_type: None,
        });
    }
    metrics.set_budget(5000.0, 1234.5);
    metrics.observe_admission(|| AdmissionFigures {
        waiting: 3,
        rows_in_flight: 12,
        used_bytes: 1 << 20,
        budget_bytes: 64 << 20,
    });
    metrics.record_refusal("no_room");
    metrics.record_refusal("no_room");
    metrics.record_refusal("deadline");
    metrics.record_depth_shed(6);
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

/// (unit, attribute sets, values) per metric name; values are sums, gauge values or counts.
type Seen = BTreeMap<String, (String, Vec<(BTreeMap<String, String>, f64)>)>;

fn flatten(req: &ExportMetricsServiceRequest) -> (BTreeMap<String, String>, Seen) {
    let mut seen = Seen::new();
    let mut resource = BTreeMap::new();
    for rm in &req.resource_metrics {
        if let Some(r) = &rm.resource {
            resource.extend(attrs(&r.attributes));
        }
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let entry = seen
                    .entry(m.name.clone())
                    .or_insert_with(|| (m.unit.clone(), Vec::new()));
                let value = |v: &Option<_>| match v {
                    Some(
                        opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(
                            d,
                        ),
                    ) => *d,
                    Some(
                        opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i),
                    ) => *i as f64,
                    None => f64::NAN,
                };
                match &m.data {
                    Some(Data::Histogram(h)) => {
                        for p in &h.data_points {
                            entry.1.push((attrs(&p.attributes), p.count as f64));
                        }
                    }
                    Some(Data::Sum(s)) => {
                        assert!(s.is_monotonic, "{} is a counter", m.name);
                        for p in &s.data_points {
                            entry.1.push((attrs(&p.attributes), value(&p.value)));
                        }
                    }
                    Some(Data::Gauge(g)) => {
                        for p in &g.data_points {
                            entry.1.push((attrs(&p.attributes), value(&p.value)));
                        }
                    }
                    other => panic!("unexpected data for {}: {other:?}", m.name),
                }
            }
        }
    }
    (resource, seen)
}

fn hand_meter() -> (Arc<Mutex<u64>>, EnergyMeter) {
    let counter = Arc::new(Mutex::new(0));
    let meter =
        EnergyMeter::with_sensor(Box::new(HandGpu(counter.clone())), EstimateModel::default())
            .unwrap();
    (counter, meter)
}

#[test]
fn otlp_receiver_gets_semconv_metrics() {
    let (url, rx) = common::otlp_receiver();
    let (counter, meter) = hand_meter();
    let metrics =
        SidecarMetrics::new(&config(OtlpExport::Endpoint(url)), Some(meter.clone())).unwrap();
    record_some(&metrics, &meter, &counter);
    *counter.lock().unwrap() += 500_000; // idle after the batch
    metrics.force_flush().unwrap();
    let req = rx.recv_timeout(Duration::from_secs(10)).expect("an export");
    let (resource, seen) = flatten(&req);
    // The energy counter says when it started: the operator tells a restarted sidecar by it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let starts = energy_starts(&req);
    assert!(
        !starts.is_empty() && starts.iter().all(|&t| t > 0 && t <= now),
        "{starts:?}"
    );

    assert_eq!(resource["service.name"], "ttc-sidecar");
    assert_eq!(resource["k8s.pod.name"], "infer-0");
    assert_eq!(resource["k8s.namespace.name"], "llm");
    assert_eq!(resource["ttc.policy.name"], "gold");

    let units: BTreeMap<_, _> = seen
        .iter()
        .map(|(k, v)| (k.as_str(), v.0.as_str()))
        .collect();
    let expected = [
        ("gen_ai.client.token.usage", "{token}"),
        ("gen_ai.server.request.duration", "s"),
        ("gen_ai.server.time_per_output_token", "s"),
        ("hw.energy", "J"),
        ("hw.power", "W"),
        ("ttc.admission.rows_in_flight", "{row}"),
        ("ttc.admission.waiting", "{request}"),
        ("ttc.budget.allocation", "J"),
        ("ttc.budget.remaining", "J"),
        ("ttc.depth", "{sample}"),
        ("ttc.depth.shed", "{sample}"),
        ("ttc.energy.joules", "J"),
        ("ttc.energy.usage", "J"),
        ("ttc.memory_budget.limit", "By"),
        ("ttc.memory_budget.used", "By"),
        ("ttc.power.watts", "W"),
        ("ttc.refusals", "{request}"),
        ("ttc.request.energy", "J"),
        ("ttc.requests", "{request}"),
        ("ttc.samples", "{sample}"),
        ("ttc.telemetry.dropped_exports", "{export}"),
    ];
    assert_eq!(units, BTreeMap::from(expected));

    let tokens = &seen["gen_ai.client.token.usage"].1;
    assert_eq!(tokens.len(), 2, "input and output");
    for (a, count) in tokens {
        assert_eq!(a["gen_ai.operation.name"], "chat");
        assert_eq!(a["gen_ai.provider.name"], "ttc");
        assert_eq!(a["gen_ai.request.model"], "smollm2-135m");
        assert!(["input", "output"].contains(&a["gen_ai.token.type"].as_str()));
        assert_eq!(*count, 2.0, "two requests");
    }

    let (a, joules) = &seen["hw.energy"].1[0];
    assert_eq!(a["hw.type"], "gpu");
    assert_eq!(a["hw.id"], "GPU-1234");
    assert_eq!(a["ttc.energy.source"], "nvml");
    assert!((joules - 3.0).abs() < 1e-9, "{joules}");
    let (a, watts) = &seen["hw.power"].1[0];
    assert_eq!((a["hw.id"].as_str(), *watts), ("GPU-1234", 312.5));

    let energy = &seen["ttc.request.energy"].1;
    assert_eq!(energy[0].0["ttc.energy.source"], "nvml");
    assert_eq!(energy[0].1, 2.0);

    let by_use: BTreeMap<_, _> = seen["ttc.energy.usage"]
        .1
        .iter()
        .map(|(a, v)| {
            (
                (a["ttc.energy.source"].clone(), a["ttc.energy.use"].clone()),
                *v,
            )
        })
        .collect();
    assert!((by_use[&("nvml".into(), "request".into())] - 2.5).abs() < 1e-9);
    assert!((by_use[&("nvml".into(), "idle".into())] - 0.5).abs() < 1e-9);
    assert_eq!(by_use[&("estimate".into(), "request".into())], 0.0);

    // The operator's receiver sums each metric's points per pod: it must get the meter's total,
    // labelled as measured (an `estimate` point, even at zero, would mark the pod estimated).
    let joules = &seen["ttc.energy.joules"].1;
    assert_eq!(joules.len(), 1, "{joules:?}");
    assert_eq!(joules[0].0["ttc.energy.source"], "nvml");
    let total = meter.totals();
    assert!((joules[0].1 - (total.metered_uj as f64 / 1e6)).abs() < 1e-9);
    assert_eq!(seen["ttc.requests"].1[0].1, 2.0);
    assert_eq!(seen["ttc.samples"].1[0].1, 8.0, "two requests of depth 4");
    assert_eq!(seen["ttc.power.watts"].1[0].1, 312.5);

    assert_eq!(seen["ttc.depth"].1[0].0["ttc.strategy"], "vote");
    assert_eq!(seen["ttc.budget.remaining"].1[0].1, 1234.5);
    assert_eq!(seen["ttc.telemetry.dropped_exports"].1[0].1, 0.0);

    // Admission: gauges read from the probe at export, refusals by reason, samples shed.
    assert_eq!(seen["ttc.admission.waiting"].1[0].1, 3.0);
    assert_eq!(seen["ttc.admission.rows_in_flight"].1[0].1, 12.0);
    assert_eq!(seen["ttc.memory_budget.used"].1[0].1, f64::from(1 << 20));
    assert_eq!(seen["ttc.memory_budget.limit"].1[0].1, f64::from(64 << 20));
    let refusals: BTreeMap<_, _> = seen["ttc.refusals"]
        .1
        .iter()
        .map(|(a, v)| (a["ttc.refusal.reason"].clone(), *v))
        .collect();
    assert_eq!(
        refusals,
        BTreeMap::from([("deadline".to_string(), 1.0), ("no_room".to_string(), 2.0)])
    );
    assert_eq!(seen["ttc.depth.shed"].1[0].1, 6.0);
    assert_eq!(metrics.dropped_exports(), 0);

    // The next export of the same process keeps the start time (a new one would read as a
    // restart, and the operator would count the counters again).
    metrics.force_flush().unwrap();
    let next = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a second export");
    assert_eq!(energy_starts(&next), starts);
    metrics.shutdown().unwrap();
}

/// The start times of the `ttc.energy.joules` points of an export.
fn energy_starts(req: &ExportMetricsServiceRequest) -> Vec<u64> {
    req.resource_metrics
        .iter()
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .filter(|m| m.name == "ttc.energy.joules")
        .flat_map(|m| match &m.data {
            Some(Data::Sum(s)) => s
                .data_points
                .iter()
                .map(|p| p.start_time_unix_nano)
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn endpoint_down_never_slows_recording_and_drops_are_counted() {
    // Accepts connections and never answers: the worst case for an exporter.
    let blackhole = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/metrics", blackhole.local_addr().unwrap());
    let (counter, meter) = hand_meter();
    let mut cfg = config(OtlpExport::Endpoint(url));
    // Long enough that a record waiting on the export would be unmistakable.
    let timeout = Duration::from_secs(3);
    cfg.export_timeout = Some(timeout);
    let metrics = Arc::new(SidecarMetrics::new(&cfg, Some(meter.clone())).unwrap());

    // One export hangs on the black hole while the engine keeps recording.
    let flusher = {
        let metrics = metrics.clone();
        std::thread::spawn(move || metrics.force_flush())
    };
    std::thread::sleep(Duration::from_millis(50));
    let mut slowest = Duration::ZERO;
    for _ in 0..1_000 {
        let t = Instant::now();
        record_some(&metrics, &meter, &counter);
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        !flusher.is_finished(),
        "all records were done while the export still hung"
    );
    // A shared CI machine may deschedule us for a while; never for the export's timeout.
    assert!(slowest < timeout / 3, "one record took {slowest:?}");

    assert!(
        flusher.join().unwrap().is_err(),
        "the export cannot succeed"
    );
    assert!(metrics.dropped_exports() >= 1);
    let text = metrics.encode_prometheus().unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("ttc_telemetry_dropped_exports_total ") && !l.ends_with(" 0")),
        "{text}"
    );
    drop(blackhole);
}

#[test]
fn prometheus_text_parses_and_carries_the_same_metrics() {
    let (counter, meter) = hand_meter();
    let metrics = SidecarMetrics::new(&config(OtlpExport::Disabled), Some(meter.clone())).unwrap();
    record_some(&metrics, &meter, &counter);
    metrics.record_request_duration("chat", Duration::from_secs(3), Some("timeout"));
    let text = metrics.encode_prometheus().unwrap();
    let samples = parse_openmetrics(&text);

    let find = |name: &str, label: (&str, &str)| {
        samples
            .iter()
            .find(|(n, l, _)| n == name && l.get(label.0).map(String::as_str) == Some(label.1))
            .unwrap_or_else(|| panic!("no {name} with {label:?} in\n{text}"))
            .2
    };
    assert_eq!(find("hw_energy_joules_total", ("hw_type", "gpu")), 2.5);
    assert_eq!(find("hw_power_watts", ("hw_id", "GPU-1234")), 312.5);
    assert_eq!(
        find(
            "ttc_energy_usage_joules_total",
            ("ttc_energy_use", "request")
        ),
        2.5
    );
    assert_eq!(
        find("ttc_energy_joules_total", ("ttc_energy_source", "nvml")),
        2.5
    );
    assert_eq!(find("ttc_power_watts", ("", "")), 312.5);
    assert_eq!(
        find("ttc_requests_total", ("", "")),
        3.0,
        "two records and one failure"
    );
    assert_eq!(find("ttc_samples_total", ("", "")), 8.0);
    assert_eq!(
        find(
            "ttc_request_energy_joules_count",
            ("ttc_energy_source", "nvml")
        ),
        2.0
    );
    assert_eq!(
        find(
            "gen_ai_client_token_usage_count",
            ("gen_ai_token_type", "output")
        ),
        2.0
    );
    assert_eq!(
        find(
            "gen_ai_server_request_duration_seconds_count",
            ("error_type", "timeout")
        ),
        1.0
    );
    assert_eq!(
        find(
            "gen_ai_server_time_per_output_token_seconds_count",
            ("gen_ai_request_model", "smollm2-135m")
        ),
        2.0
    );
    assert_eq!(find("ttc_depth_count", ("ttc_strategy", "vote")), 2.0);
    assert_eq!(find("ttc_budget_allocation_joules", ("", "")), 5000.0);
    assert_eq!(find("ttc_admission_waiting", ("", "")), 3.0);
    assert_eq!(find("ttc_admission_rows_in_flight", ("", "")), 12.0);
    assert_eq!(
        find("ttc_memory_budget_used_bytes", ("", "")),
        f64::from(1 << 20)
    );
    assert_eq!(
        find("ttc_memory_budget_limit_bytes", ("", "")),
        f64::from(64 << 20)
    );
    assert_eq!(
        find("ttc_refusals_total", ("ttc_refusal_reason", "no_room")),
        2.0
    );
    assert_eq!(find("ttc_depth_shed_total", ("", "")), 6.0);
    assert_eq!(find("target_info", ("k8s_pod_name", "infer-0")), 1.0);
    assert_eq!(find("target_info", ("ttc_policy_name", "gold")), 1.0);
    assert!(text.ends_with("# EOF\n"));
    assert_eq!(metrics.dropped_exports(), 0);
}

/// A strict reader of the OpenMetrics text format: every line is a descriptor, a sample of a
/// declared family, or the final `# EOF`. Returns (name, labels, value) per sample. Samples
/// without labels get the label ("", "") so lookups stay uniform.
fn parse_openmetrics(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" {
            assert!(lines.peek().is_none(), "text after # EOF");
            return samples;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(
                ["TYPE", "HELP", "UNIT"].contains(&kind),
                "bad descriptor {line}"
            );
            assert!(valid_name(name), "bad name in {line}");
            if kind == "TYPE" {
                let t = parts.next().unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "info"].contains(&t),
                    "{line}"
                );
                families.insert(name.to_string(), t.to_string());
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("no value in {line}"),
        };
        let mut labels = BTreeMap::new();
        let value_part = if let Some(body) = rest.strip_prefix('{') {
            let end = body
                .find("} ")
                .unwrap_or_else(|| panic!("unterminated labels in {line}"));
            for pair in split_labels(&body[..end]) {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label in {line}"));
                assert!(valid_name(k), "bad label name in {line}");
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or_else(|| panic!("unquoted value in {line}"));
                labels.insert(k.to_string(), v.to_string());
            }
            &body[end + 2..]
        } else {
            &rest[1..]
        };
        let value: f64 = value_part
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let family = ["_total", "_bucket", "_count", "_sum", "_info", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| families.contains_key(*f)))
            .unwrap_or(name);
        assert!(
            families.contains_key(family),
            "sample {name} of undeclared family"
        );
        if labels.is_empty() {
            labels.insert(String::new(), String::new());
        }
        samples.push((name.to_string(), labels, value));
    }
    panic!("no # EOF at the end");
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && !n.starts_with(|c: char| c.is_ascii_digit())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn split_labels(s: &str) -> Vec<&str> {
    // Values here hold no commas or quotes, which the assertions on them would reveal.
    s.split(',').filter(|p| !p.is_empty()).collect()
}

#[test]
fn estimates_stay_out_of_hardware_metrics() {
    let meter = EnergyMeter::from_config(&ttc_energy::MeterConfig {
        source: ttc_energy::SourceChoice::Estimate,
        ..ttc_energy::MeterConfig::default()
    })
    .unwrap();
    let metrics = SidecarMetrics::new(&config(OtlpExport::Disabled), Some(meter.clone())).unwrap();
    let batch = meter.begin_batch().finish(&[("r", 3)]);
    metrics.record_request_energy(batch.joules(), batch.source);
    let text = metrics.encode_prometheus().unwrap();
    let samples = parse_openmetrics(&text);
    assert!(
        samples.iter().all(|(name, _, _)| !name.starts_with("hw_")),
        "{text}"
    );
    assert!(samples.iter().any(
        |(name, labels, _)| name == "ttc_request_energy_joules_count"
            && labels.get("ttc_energy_source").map(String::as_str) == Some("estimate")
    ));
    assert!(
        samples
            .iter()
            .any(|(name, labels, _)| name == "ttc_energy_joules_total"
                && labels.get("ttc_energy_source").map(String::as_str) == Some("estimate"))
    );
    assert!(
        samples
            .iter()
            .filter(|(name, _, _)| name.starts_with("ttc_energy_"))
            .all(|(_, labels, _)| labels["ttc_energy_source"] == "estimate"),
        "an estimating meter reports nothing as measured"
    );
}
