//! The InferencePolicy field reference (`docs/inferencepolicy-reference.md`), generated from the
//! CRD's OpenAPI schema so that it says exactly what the API server enforces: every field of
//! `spec` and `status` with its type, default, bounds and description, and the CEL rules with
//! their messages.
//!
//! [`render`] is a pure function of the CRD and the hand-written [`GUIDE`]; `crdgen` writes its
//! output next to the manifest and a test fails when the committed file differs.

use std::fmt::Write;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::Value;

/// The hand-written part of the reference (an example policy, validation, status and conditions,
/// where the types live), placed between the introduction and the field tables. Its relative links
/// are relative to `docs/`, where the reference is written.
pub const GUIDE: &str = include_str!("reference_guide.md");

/// Fields whose type is a Kubernetes type: documented by name and link, not field by field.
pub const KUBERNETES_TYPES: &[(&str, &str, &str)] = &[
    (
        "spec.selector",
        "LabelSelector",
        "https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/label-selector/",
    ),
    (
        "spec.sidecar.resources",
        "ResourceRequirements",
        "https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#resources",
    ),
    (
        "status.conditions",
        "[]Condition",
        "https://pkg.go.dev/k8s.io/apimachinery/pkg/apis/meta/v1#Condition",
    ),
];

/// One documented field.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// Dotted path from the object root, `[]` marking list items (`status.allocations[].pod`).
    pub path: String,
    /// The type as a reader writes it: `integer (uint32)`, `[]object`, `map[string]string`, or a
    /// linked Kubernetes type.
    pub type_: String,
    /// Whether the enclosing object requires the field.
    pub required: bool,
    /// What the API server fills in when the field is omitted.
    pub default: Option<String>,
    /// Bounds, lengths, patterns and allowed values, and the numbers of the CEL rules on the field.
    pub constraints: Vec<String>,
    /// The field's description, on one line.
    pub description: String,
}

/// One CEL rule (`x-kubernetes-validations`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Path of the field the rule is declared on (`self` in the rule).
    pub path: String,
    /// The field the API server names in the error, when that is a child of `path`.
    pub reported_on: Option<String>,
    /// The CEL expression.
    pub rule: String,
    /// The message of the error.
    pub message: String,
}

/// The fields and rules of a schema, in document order (fields sorted by path within an object).
pub fn collect(root: &JSONSchemaProps) -> (Vec<Field>, Vec<Rule>) {
    let mut fields = Vec::new();
    let mut rules = Vec::new();
    for (name, schema) in root.properties.iter().flatten() {
        let required = is_required(root, name);
        walk(name, schema, required, &mut fields, &mut rules);
    }
    (fields, rules)
}

fn is_required(parent: &JSONSchemaProps, name: &str) -> bool {
    parent.required.iter().flatten().any(|r| r == name)
}

fn walk(
    path: &str,
    schema: &JSONSchemaProps,
    required: bool,
    fields: &mut Vec<Field>,
    rules: &mut Vec<Rule>,
) {
    let kubernetes = KUBERNETES_TYPES.iter().find(|(p, _, _)| *p == path);
    let mut constraints = constraints(schema);
    let mut numbers = Vec::new();
    for rule in schema.x_kubernetes_validations.iter().flatten() {
        rules.push(Rule {
            path: path.to_string(),
            reported_on: rule.field_path.as_ref().map(|f| format!("{path}{f}")),
            rule: rule.rule.clone(),
            message: rule.message.clone().unwrap_or_default(),
        });
        numbers.push(rules.len().to_string());
    }
    match numbers.len() {
        0 => {}
        1 => constraints.push(format!("rule {}", numbers[0])),
        _ => constraints.push(format!("rules {}", numbers.join(", "))),
    }
    fields.push(Field {
        path: path.to_string(),
        type_: match kubernetes {
            Some((_, name, url)) => format!("[`{name}`]({url})"),
            None => type_name(schema),
        },
        required,
        default: schema.default.as_ref().map(|d| default_text(&d.0, schema)),
        constraints,
        description: one_line(schema.description.as_deref().unwrap_or_default()),
    });
    if kubernetes.is_some() {
        return;
    }
    let (object, prefix) = match &schema.items {
        Some(JSONSchemaPropsOrArray::Schema(items)) => (items.as_ref(), format!("{path}[]")),
        _ => (schema, path.to_string()),
    };
    for (name, child) in object.properties.iter().flatten() {
        let required = is_required(object, name);
        walk(&format!("{prefix}.{name}"), child, required, fields, rules);
    }
}

/// `string`, `integer (uint32)`, `number`, `[]object`, `map[string]string`, ...
fn type_name(schema: &JSONSchemaProps) -> String {
    if schema.x_kubernetes_int_or_string == Some(true) {
        return "integer or string".to_string();
    }
    let base = schema.type_.as_deref().unwrap_or("any");
    match base {
        "array" => match &schema.items {
            Some(JSONSchemaPropsOrArray::Schema(items)) => format!("[]{}", type_name(items)),
            _ => "array".to_string(),
        },
        "object" => match &schema.additional_properties {
            Some(JSONSchemaPropsOrBool::Schema(values)) if schema.properties.is_none() => {
                format!("map[string]{}", type_name(values))
            }
            _ => "object".to_string(),
        },
        _ => match schema.format.as_deref() {
            // Every number here is a double; saying so adds nothing.
            None | Some("double") => base.to_string(),
            Some(format) => format!("{base} ({format})"),
        },
    }
}

fn constraints(schema: &JSONSchemaProps) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(values) = &schema.enum_ {
        let values: Vec<String> = values.iter().map(|v| code(&scalar(&v.0))).collect();
        out.push(format!("one of {}", values.join(", ")));
    }
    let bound = |b: f64, exclusive: Option<bool>, inclusive: &str, strict: &str| {
        let word = if exclusive == Some(true) {
            strict
        } else {
            inclusive
        };
        format!("{word} {b}")
    };
    match (schema.minimum, schema.maximum) {
        (Some(min), Some(max))
            if schema.exclusive_minimum != Some(true) && schema.exclusive_maximum != Some(true) =>
        {
            out.push(format!("{min} to {max}"));
        }
        (min, max) => {
            if let Some(min) = min {
                out.push(bound(
                    min,
                    schema.exclusive_minimum,
                    "at least",
                    "greater than",
                ));
            }
            if let Some(max) = max {
                out.push(bound(max, schema.exclusive_maximum, "at most", "less than"));
            }
        }
    }
    let range = |what: &str, min: Option<i64>, max: Option<i64>| match (min, max) {
        (Some(min), Some(max)) => Some(format!("{min} to {max} {what}")),
        (Some(min), None) => Some(format!("at least {min} {what}")),
        (None, Some(max)) => Some(format!("at most {max} {what}")),
        (None, None) => None,
    };
    out.extend(range("characters", schema.min_length, schema.max_length));
    out.extend(range("items", schema.min_items, schema.max_items));
    if let Some(pattern) = &schema.pattern {
        out.push(format!("matches {}", code(pattern)));
    }
    out
}

/// A default as it would be written in YAML; an object whose entries are its fields' own
/// defaults is described as such.
fn default_text(value: &Value, schema: &JSONSchemaProps) -> String {
    if let Value::Object(map) = value
        && !map.is_empty()
        && map.iter().all(|(k, v)| {
            schema
                .properties
                .as_ref()
                .and_then(|p| p.get(k))
                .and_then(|p| p.default.as_ref())
                .is_some_and(|d| &d.0 == v)
        })
    {
        return "each field's default".to_string();
    }
    code(&scalar(value))
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A code span (backticks doubled when the text has one).
fn code(text: &str) -> String {
    if text.contains('`') {
        format!("`` {text} ``")
    } else {
        format!("`{text}`")
    }
}

/// Collapses line breaks and paragraphs into one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Escapes a table cell (pipes, also inside code spans, as GitHub's tables require).
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The Markdown reference of the CRD's first version.
pub fn render(crd: &CustomResourceDefinition) -> String {
    let names = &crd.spec.names;
    let version = &crd.spec.versions[0];
    let root = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .cloned()
        .unwrap_or_default();
    let (fields, rules) = collect(&root);

    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "<!-- Generated from the CRD schema and api/src/reference_guide.md by `cargo run -p ttc-api --bin crdgen`; do not edit. -->"
    );
    let _ = writeln!(w, "# {} reference\n", names.kind);
    let _ = writeln!(
        w,
        "`{}` is a {} resource of API group `{}`, version `{}` (plural `{}`{}).",
        names.kind,
        crd.spec.scope.to_lowercase(),
        crd.spec.group,
        version.name,
        names.plural,
        names
            .short_names
            .iter()
            .flatten()
            .map(|s| format!(", short name `{s}`"))
            .collect::<String>()
    );
    if let Some(spec) = root.properties.as_ref().and_then(|p| p.get("spec")) {
        let _ = writeln!(
            w,
            "\n{}\n",
            one_line(spec.description.as_deref().unwrap_or_default())
        );
    }
    let _ = writeln!(
        w,
        "The API server enforces everything below: it fills in the defaults, checks the bounds and \
         the allowed values, and evaluates the [validation rules](#validation-rules), so \
         `kubectl apply` rejects an invalid policy with a message naming the field. A rule number \
         in the constraints column refers to that table. Fields of the Kubernetes types \
         (label selector, resource requirements, conditions) are described where linked.\n"
    );
    w.push_str(GUIDE);
    w.push('\n');

    for section in ["spec", "status"] {
        let Some(schema) = root.properties.as_ref().and_then(|p| p.get(section)) else {
            continue;
        };
        let _ = writeln!(w, "## {section}\n");
        if section == "status" {
            let _ = writeln!(
                w,
                "{}\n",
                one_line(schema.description.as_deref().unwrap_or_default())
            );
        }
        let _ = writeln!(
            w,
            "| field | type | required | default | constraints | description |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|---|");
        let prefix = format!("{section}.");
        for f in fields.iter().filter(|f| f.path.starts_with(&prefix)) {
            let _ = writeln!(
                w,
                "| `{}` | {} | {} | {} | {} | {} |",
                f.path,
                f.type_,
                if f.required { "yes" } else { "" },
                cell(f.default.as_deref().unwrap_or_default()),
                cell(&f.constraints.join("; ")),
                cell(&f.description),
            );
        }
        let _ = writeln!(w);
    }

    let _ = writeln!(w, "## Validation rules\n");
    let _ = writeln!(
        w,
        "CEL rules (`x-kubernetes-validations`); `self` is the field the rule is declared on. The \
         API server reports a failed rule on the field in the last column, with the message.\n"
    );
    let _ = writeln!(w, "| # | declared on | rule | message | reported on |");
    let _ = writeln!(w, "|---|---|---|---|---|");
    for (i, r) in rules.iter().enumerate() {
        let _ = writeln!(
            w,
            "| {} | `{}` | {} | {} | `{}` |",
            i + 1,
            r.path,
            cell(&code(&r.rule)),
            cell(&r.message),
            r.reported_on.as_deref().unwrap_or(&r.path),
        );
    }

    if let Some(columns) = &version.additional_printer_columns {
        let _ = writeln!(w, "\n## `kubectl get` columns\n");
        let _ = writeln!(w, "| column | type | value | description |");
        let _ = writeln!(w, "|---|---|---|---|");
        for c in columns {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} |",
                c.name,
                c.type_,
                cell(&code(&c.json_path)),
                cell(c.description.as_deref().unwrap_or_default()),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        JSON, ValidationRule,
    };
    use kube::CustomResourceExt;

    fn props(
        fields: Vec<(&str, JSONSchemaProps)>,
    ) -> Option<std::collections::BTreeMap<String, JSONSchemaProps>> {
        Some(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    #[test]
    fn a_field_row_carries_type_default_bounds_and_rules() {
        let window = JSONSchemaProps {
            type_: Some("integer".into()),
            format: Some("uint32".into()),
            default: Some(JSON(300.into())),
            minimum: Some(10.0),
            maximum: Some(86400.0),
            description: Some("Length of the window,\nin seconds.".into()),
            ..Default::default()
        };
        let cap = JSONSchemaProps {
            type_: Some("number".into()),
            format: Some("double".into()),
            x_kubernetes_validations: Some(vec![ValidationRule {
                rule: "self > 0.0".into(),
                message: Some("cap must be positive".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let mode = JSONSchemaProps {
            type_: Some("string".into()),
            enum_: Some(vec![JSON("A".into()), JSON("B".into())]),
            ..Default::default()
        };
        let budget = JSONSchemaProps {
            type_: Some("object".into()),
            properties: props(vec![("cap", cap), ("mode", mode), ("window", window)]),
            required: Some(vec!["window".into()]),
            x_kubernetes_validations: Some(vec![ValidationRule {
                rule: "has(self.cap) || self.mode == 'A'".into(),
                message: Some("cap or A".into()),
                field_path: Some(".cap".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let root = JSONSchemaProps {
            properties: props(vec![("budget", budget)]),
            required: Some(vec!["budget".into()]),
            ..Default::default()
        };

        let (fields, rules) = collect(&root);
        let paths: Vec<&str> = fields.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            ["budget", "budget.cap", "budget.mode", "budget.window"]
        );
        assert!(fields[0].required);
        assert_eq!(fields[0].constraints, ["rule 1"]);
        assert_eq!(fields[1].type_, "number");
        assert_eq!(fields[1].constraints, ["rule 2"]);
        assert_eq!(fields[2].constraints, ["one of `A`, `B`"]);
        assert_eq!(
            fields[3],
            Field {
                path: "budget.window".into(),
                type_: "integer (uint32)".into(),
                required: true,
                default: Some("`300`".into()),
                constraints: vec!["10 to 86400".into()],
                description: "Length of the window, in seconds.".into(),
            }
        );
        assert_eq!(rules[0].reported_on.as_deref(), Some("budget.cap"));
        assert_eq!(rules[0].message, "cap or A");
        assert_eq!(rules[1].path, "budget.cap");
        assert_eq!(rules[1].reported_on, None);
    }

    /// (rule, message) of every `x-kubernetes-validations` entry under `v`.
    fn cel_rules(v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(map) => {
                let rules = map
                    .get("x-kubernetes-validations")
                    .and_then(Value::as_array);
                for rule in rules.into_iter().flatten() {
                    let text = |k: &str| rule[k].as_str().unwrap_or_default().to_string();
                    out.push((text("rule"), text("message")));
                }
                map.values().for_each(|v| cel_rules(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| cel_rules(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_policy_reference_covers_every_field_and_rule() {
        let crd = crate::InferencePolicy::crd();
        let doc = render(&crd);
        for path in [
            "spec.budget.joulesPerRequest",
            "spec.budget.windowSeconds",
            "spec.ttc.strategy",
            "spec.ttc.verifier.http.url",
            "spec.model.volumeClaim",
            "spec.sidecar.otlpEndpoint",
            "spec.priority",
            "status.observed.source",
            "status.allocations[].pod",
            "status.clusterShare.fraction",
        ] {
            assert!(doc.contains(&format!("| `{path}` |")), "no row for {path}");
        }
        // Kubernetes types are linked, not expanded.
        for (path, _, url) in KUBERNETES_TYPES {
            assert!(doc.contains(&format!("| `{path}` |")), "no row for {path}");
            assert!(doc.contains(url));
        }
        assert!(!doc.contains("| `spec.selector.matchLabels"));
        assert!(!doc.contains("lastTransitionTime"));
        // Every CEL rule of the schema, with its message (pipes escaped for the table).
        let mut all = Vec::new();
        cel_rules(&serde_json::to_value(&crd).unwrap(), &mut all);
        for (rule, message) in &all {
            assert!(doc.contains(&cell(&code(rule))), "rule missing: {rule}");
            assert!(doc.contains(message.as_str()), "message missing: {message}");
        }
        assert!(all.len() >= 10, "only {} rules found", all.len());
        assert!(doc.contains(
            "`has(self.joulesPerRequest) \\|\\| has(self.powerCapWatts) \\|\\| has(self.joulesPerWindow)`"
        ));
        assert!(doc.contains(
            "| `spec.ttc.strategy` | string |  | `Adaptive` | one of `MajorityVote`, `BestOfN`, `ReasoningBudget`, `Adaptive` |"
        ));
        assert!(doc.contains("| `spec.ttc` | object |  | each field's default |"));
    }
}
