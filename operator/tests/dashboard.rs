//! The Grafana dashboard of the chart (`charts/ttc-operator/dashboards/ttc-operator.json`) queries
//! only metrics that exist: the operator's, read from what it renders, and the sidecar's, listed
//! here and checked against the sidecar's telemetry source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use ttc_operator::metrics::Metrics;

/// The sidecar's Prometheus families (`sidecar/telemetry/src/prometheus.rs`): the name it
/// registers, the family name on `/metrics` (with the unit suffix the client library adds) and
/// the type.
const SIDECAR_FAMILIES: &[(&str, &str, &str)] = &[
    ("target", "target", "info"),
    (
        "gen_ai_client_token_usage",
        "gen_ai_client_token_usage",
        "histogram",
    ),
    (
        "gen_ai_server_request_duration",
        "gen_ai_server_request_duration_seconds",
        "histogram",
    ),
    (
        "gen_ai_server_time_per_output_token",
        "gen_ai_server_time_per_output_token_seconds",
        "histogram",
    ),
    (
        "ttc_request_energy",
        "ttc_request_energy_joules",
        "histogram",
    ),
    ("ttc_depth", "ttc_depth", "histogram"),
    (
        "ttc_budget_allocation",
        "ttc_budget_allocation_joules",
        "gauge",
    ),
    (
        "ttc_budget_remaining",
        "ttc_budget_remaining_joules",
        "gauge",
    ),
    ("ttc_requests", "ttc_requests", "counter"),
    ("ttc_samples", "ttc_samples", "counter"),
    ("ttc_stops", "ttc_stops", "counter"),
    (
        "ttc_telemetry_dropped_exports",
        "ttc_telemetry_dropped_exports",
        "counter",
    ),
    ("hw_energy", "hw_energy_joules", "counter"),
    ("hw_power", "hw_power_watts", "gauge"),
    ("ttc_energy", "ttc_energy_joules", "counter"),
    ("ttc_energy_usage", "ttc_energy_usage_joules", "counter"),
    ("ttc_power", "ttc_power_watts", "gauge"),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dashboard() -> Value {
    let path = repo().join("charts/ttc-operator/dashboards/ttc-operator.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard exists");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Family name -> type, of the sidecar (listed above) and of the operator (rendered).
fn exported_families() -> BTreeMap<String, String> {
    let mut families: BTreeMap<String, String> = SIDECAR_FAMILIES
        .iter()
        .map(|(_, family, kind)| (family.to_string(), kind.to_string()))
        .collect();
    // A labelled family is rendered once it has a series.
    let metrics = Metrics::default();
    metrics.reconciled("ok");
    metrics.reconcile_failed("kube");
    metrics.admitted("injected");
    metrics.report("otlp", "accepted");
    let rendered = metrics.render();
    for line in rendered.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            families.insert(name.to_string(), kind.to_string());
        }
    }
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
fn the_listed_sidecar_families_are_the_sidecars() {
    let source = std::fs::read_to_string(repo().join("sidecar/telemetry/src/prometheus.rs"))
        .expect("the sidecar's Prometheus source");
    for (registered, _, _) in SIDECAR_FAMILIES {
        assert!(
            source.contains(&format!("\"{registered}\"")),
            "the sidecar registers no {registered}; update SIDECAR_FAMILIES and the dashboard"
        );
    }
    // The report metrics (ttc_api::report) reach Prometheus with dots turned into underscores.
    let families = exported_families();
    for otel in [
        ttc_api::report::METRIC_ENERGY_JOULES,
        ttc_api::report::METRIC_REQUESTS,
        ttc_api::report::METRIC_SAMPLES,
        ttc_api::report::METRIC_POWER_WATTS,
    ] {
        let family = otel.replace('.', "_");
        assert!(families.contains_key(&family), "no family {family}");
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
