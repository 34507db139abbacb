//! The InferencePolicy's validation rules, evaluated where no API server is: the CRD's own
//! schema (OpenAPI bounds and enums) and its CEL rules (`x-kubernetes-validations`), run with
//! kube's CEL interpreter. One definition serves both: the API server checks policies in a
//! cluster, this module checks the standalone sidecar's policy file and the tests' manifests,
//! from the same generated CRD.

use kube::CustomResourceExt;
use serde_json::Value;

use crate::policy::{InferencePolicy, TtcSpec};

/// The CRD's structural schema of an InferencePolicy.
fn policy_schema() -> Value {
    let crd = InferencePolicy::crd();
    crd.spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null)
}

/// Checks a whole policy as the API server would after defaulting: each broken rule as
/// `field: message`.
pub fn validate_policy(policy: &InferencePolicy) -> Result<(), Vec<String>> {
    let value = serde_json::to_value(policy).map_err(|e| vec![e.to_string()])?;
    check(&policy_schema(), &value, "")
}

/// Checks an InferencePolicy's `spec.ttc` alone, by the rules that apply to it there.
pub fn validate_ttc(spec: &TtcSpec) -> Result<(), Vec<String>> {
    let schema = policy_schema();
    let ttc = &schema["properties"]["spec"]["properties"]["ttc"];
    let value = serde_json::to_value(spec).map_err(|e| vec![e.to_string()])?;
    check(ttc, &value, "spec.ttc")
}

fn check(schema: &Value, value: &Value, path: &str) -> Result<(), Vec<String>> {
    if schema.is_null() {
        return Err(vec!["the CRD has no schema here".to_string()]);
    }
    let mut errors = Vec::new();
    bounds(schema, value, path, &mut errors);
    if let Err(cel) = kube::core::cel::Validator::new().validate(schema, value, None) {
        for e in cel.into_vec() {
            let field = join(path, e.field_path.trim_start_matches('.'));
            errors.push(format!("{field}: {}", e.message));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn join(path: &str, field: &str) -> String {
    match (path.is_empty(), field.is_empty()) {
        (true, _) => field.to_string(),
        (false, true) => path.to_string(),
        (false, false) => format!("{path}.{field}"),
    }
}

/// The OpenAPI keywords the CRD uses on values: `minimum`, `maximum`, `enum`, and `required`
/// on objects; nested through `properties` and `items`.
fn bounds(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if let (Some(min), Some(v)) = (schema["minimum"].as_f64(), value.as_f64())
        && v < min
    {
        errors.push(format!(
            "{path}: should be greater than or equal to {min}, got {v}"
        ));
    }
    if let (Some(max), Some(v)) = (schema["maximum"].as_f64(), value.as_f64())
        && v > max
    {
        errors.push(format!(
            "{path}: should be less than or equal to {max}, got {v}"
        ));
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !value.is_null()
        && !allowed.contains(value)
    {
        errors.push(format!(
            "{path}: unsupported value {value}, allowed: {}",
            Value::from(allowed.clone())
        ));
    }
    if let Some(object) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            if let Some(name) = required.as_str()
                && !object.contains_key(name)
            {
                errors.push(format!("{}: Required value", join(path, name)));
            }
        }
        if let Some(properties) = schema["properties"].as_object() {
            for (name, sub) in properties {
                if let Some(v) = object.get(name) {
                    bounds(sub, v, &join(path, name), errors);
                }
            }
        }
    }
    if let (Some(items), Some(list)) = (schema.get("items"), value.as_array()) {
        for (i, v) in list.iter().enumerate() {
            bounds(items, v, &format!("{path}[{i}]"), errors);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_ttc_section_is_valid_and_broken_rules_are_named() {
        assert_eq!(validate_ttc(&TtcSpec::default()), Ok(()));
        let crossed = TtcSpec {
            min_samples: 5,
            max_samples: 2,
            ..TtcSpec::default()
        };
        let errors = validate_ttc(&crossed).expect_err("min above max");
        assert!(
            errors.iter().any(|e| e.starts_with("spec.ttc.minSamples:")),
            "{errors:?}"
        );
        let too_many = TtcSpec {
            max_samples: 65,
            ..TtcSpec::default()
        };
        let errors = validate_ttc(&too_many).expect_err("above the schema's maximum");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.ttc.maxSamples: should be less than or equal to 64")),
            "{errors:?}"
        );
    }

    /// The walker knows every keyword the CRD puts on values; a new one must be taught to it.
    /// (`format` names number widths, which the Rust types enforce while parsing.)
    #[test]
    fn the_schema_uses_no_value_keyword_the_walker_ignores() {
        fn walk(schema: &Value, found: &mut Vec<String>) {
            if let Some(object) = schema.as_object() {
                for (k, v) in object {
                    if matches!(
                        k.as_str(),
                        "minLength"
                            | "maxLength"
                            | "pattern"
                            | "minItems"
                            | "maxItems"
                            | "exclusiveMinimum"
                            | "exclusiveMaximum"
                            | "multipleOf"
                    ) {
                        found.push(k.clone());
                    }
                    walk(v, found);
                }
            }
        }
        let mut found = Vec::new();
        walk(&policy_schema(), &mut found);
        assert!(found.is_empty(), "keywords not checked: {found:?}");
    }
}
