//! The Grafana dashboard of the chart (`charts/ttc-operator/dashboards/ttc-operator.json`) queries
//! only metrics that exist: the families the operator's and the sidecar's registries render.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use std::time::Duration;

use ttc_energy::{EnergyMeter, EnergySource, MeterConfig, SourceChoice};
use ttc_operator::metrics::Metrics;
use ttc_telemetry::{DepthClassLabels, OtlpExport, RequestRecord, SidecarMetrics, TelemetryConfig};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dashboard() -> Value {
    let path = repo().join("charts/ttc-operator/dashboards/ttc-operator.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard exists");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Family name -> type, from a `# TYPE` exposition.
fn families_of(text: &str, families: &mut BTreeMap<String, String>) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            families.insert(name.to_string(), kind.to_string());
        }
    }
}

/// The sidecar's registry as it renders on `/metrics`, every labelled family given a series.
fn sidecar_exposition() -> String {
    let meter = EnergyMeter::from_config(&MeterConfig {
        source: SourceChoice::Estimate,
        ..MeterConfig::default()
    })
    .expect("an estimate meter");
    let mut config = TelemetryConfig::from_env("smollm2-135m-instruct");
    config.otlp = OtlpExport::Disabled;
    let metrics = SidecarMetrics::new(&config, Some(meter)).expect("the sidecar's metrics");
    metrics.record_request(&RequestRecord {
        operation: "chat",
        input_tokens: 12,
        output_tokens: 20,
        duration: Duration::from_millis(800),
        time_per_output_token: Some(Duration::from_millis(30)),
        energy: Some((2.5, EnergySource::Estimate)),
        strategy: "majority_vote",
        depth: 4,
        error_type: None,
    });
    metrics.set_budget(3.0, 0.5);
    metrics.record_feedback(true);
    metrics.record_stop("agreement");
    metrics.record_refusal("no_room");
    let class = DepthClassLabels {
        answer_type: "number",
        difficulty_bin: 1,
    };
    metrics.set_depth_value(&class, true, Some(0.1));
    metrics.encode_prometheus().expect("renders")
}

/// Family name -> type, of the sidecar and of the operator, both rendered.
fn exported_families() -> BTreeMap<String, String> {
    let mut families = BTreeMap::new();
    families_of(&sidecar_exposition(), &mut families);
    // A labelled family is rendered once it has a series.
    let metrics = Metrics::default();
    metrics.reconciled("ok");
    metrics.reconcile_failed("kube");
    metrics.admitted("injected");
    metrics.report("otlp", "accepted");
    families_of(&metrics.render(), &mut families);
    families
}

/// Whether `name` is a series name of one of `families` (`_total` of a counter, `_bucket`,
/// `_count`, `_sum` of a histogram, `_info` of an info).
fn is_exported(name: &str, families: &BTreeMap<String, String>) -> bool {
    families.iter().any(|(family, kind)| {
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_count", "_sum"],
            "info" => &["_info"],
            _ => &[""],
        };
        name.strip_prefix(family.as_str())
            .is_some_and(|rest| suffixes.contains(&rest))
    })
}

/// The metric names a PromQL expression reads: identifiers that are not functions, aggregations,
/// keywords or label names (inside `{}` or after `by`, `on`, ...), skipping strings, ranges,
/// numbers and Grafana variables.
fn metric_names(expr: &str) -> Vec<String> {
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const NOT_METRICS: &[&str] = &[
        "and", "or", "unless", "bool", "offset", "sum", "avg", "min", "max", "count", "group",
        "stddev", "stdvar", "topk", "bottomk", "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let past = |from: usize, close: char| {
        chars[from..]
            .iter()
            .position(|&c| c == close)
            .map_or(chars.len(), |p| from + p + 1)
    };
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '{' => i = past(i, '}'),
            '[' => i = past(i, ']'),
            q @ ('"' | '\'') => i = past(i + 1, q),
            c if c == '$' || c.is_ascii_digit() || c == '.' => {
                i += 1;
                while i < chars.len() && (word_char(chars[i]) || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && word_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().copied().find(|c| !c.is_whitespace());
                if LABEL_LISTS.contains(&word.as_str()) {
                    if let Some(p) = chars[i..].iter().position(|&c| c == '(') {
                        i = past(i + p, ')');
                    }
                } else if next != Some('(') && !NOT_METRICS.contains(&word.as_str()) {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Every PromQL expression of the dashboard: panel targets (rows included) and variable queries
/// (`label_values(expr, label)` gives `expr`).
fn expressions(dashboard: &Value) -> Vec<String> {
    fn panels(list: &Value, out: &mut Vec<String>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(target["expr"].as_str().expect("a target with expr").into());
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] == "query" {
            let query = var["query"]["query"].as_str().expect("a query variable");
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(expr, _label)| expr)
                .expect("label_values(expr, label)");
            out.push(inner.to_string());
        }
    }
    out
}

#[test]
fn the_name_scanner_skips_functions_labels_and_variables() {
    let expr = r#"histogram_quantile(0.9, sum by (le, ttc_strategy) (rate(ttc_depth_bucket{a="b"}[$__rate_interval]) * on (job, instance) group_left (ttc_policy_name) target_info{ttc_policy_name=~"$policy"})) / sum(up) or vector(1e3)"#;
    assert_eq!(
        metric_names(expr),
        ["ttc_depth_bucket", "target_info", "up"]
    );
}

#[test]
fn the_sidecar_renders_the_report_metrics_and_its_energy_families() {
    let families = exported_families();
    // The report metrics (ttc_api::report) reach Prometheus with dots turned into underscores.
    for otel in [
        ttc_api::report::METRIC_ENERGY_JOULES,
        ttc_api::report::METRIC_REQUESTS,
        ttc_api::report::METRIC_SAMPLES,
        ttc_api::report::METRIC_POWER_WATTS,
    ] {
        let family = otel.replace('.', "_");
        assert!(
            families.contains_key(&family),
            "no family {family}: {families:?}"
        );
    }
    for family in [
        "ttc_request_energy_joules",
        "ttc_depth",
        "gen_ai_client_token_usage",
        "target",
    ] {
        assert!(
            families.contains_key(family),
            "no family {family}: {families:?}"
        );
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard = dashboard();
    let families = exported_families();
    assert!(
        families.contains_key("ttc_operator_reconciliations"),
        "{families:?}"
    );
    assert!(families.contains_key("ttc_stops"), "{families:?}");
    let mut unknown = Vec::new();
    let expressions = expressions(&dashboard);
    assert!(expressions.len() > 20, "only {} queries", expressions.len());
    for expr in &expressions {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            if !is_exported(&name, &families) {
                unknown.push(format!("{name} (in {expr})"));
            }
        }
    }
    assert!(unknown.is_empty(), "not exported:\n{}", unknown.join("\n"));
}

#[test]
fn the_dashboard_takes_its_prometheus_from_a_variable() {
    let dashboard = dashboard();
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(vars.iter().any(|v| v["name"] == "datasource"
        && v["type"] == "datasource"
        && v["query"] == "prometheus"));
    let mut ids = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        ids.push(panel["id"].as_u64().expect("panel id"));
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
        }
    }
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "panel ids repeat");
    // Estimated energy is told apart from measured energy.
    let text = dashboard.to_string();
    assert!(text.contains("ttc_energy_source") && text.contains("NOT measured"));
}
