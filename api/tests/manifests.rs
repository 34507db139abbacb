//! The valid and invalid manifests under `tests/manifests/` and the examples under `examples/`
//! against the CRD schema, client-side.
//!
//! CEL rules are evaluated with kube's CEL interpreter on the object after defaulting (the API
//! server defaults before it validates); OpenAPI bounds are checked against the schema's
//! `minimum`/`maximum`/`enum`/`required`. The same files run against a real API server in the
//! operator's integration tests.

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use serde_json::Value;
use ttc_api::InferencePolicy;

fn manifests(kind: &str) -> Vec<PathBuf> {
    yaml_files(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/manifests")
            .join(kind),
    )
}

/// The YAML files of a directory, sorted; fails when there are none.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("manifest dir exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

fn schema() -> Value {
    let crd = InferencePolicy::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("CRD has a schema");
    serde_json::to_value(schema).expect("schema serializes")
}

/// The object as the API server would store it: defaults filled in by the types' serde defaults.
fn defaulted(text: &str) -> Result<Value, serde_yaml::Error> {
    let policy: InferencePolicy = serde_yaml::from_str(text)?;
    Ok(serde_json::to_value(&policy).expect("policy serializes"))
}

fn header(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
        .unwrap_or_else(|| panic!("manifest lacks a `# {key}:` header"))
        .trim()
        .to_string()
}

fn cel_errors(schema: &Value, object: &Value) -> Option<String> {
    kube::core::cel::Validator::new()
        .validate(schema, object, None)
        .err()
        .map(|e| format!("{e:?}"))
}

/// Whether the OpenAPI schema rejects the value at `field` (dotted path from the object root).
fn openapi_rejects(schema: &Value, raw: &Value, field: &str) -> bool {
    let segments: Vec<&str> = field.split('.').collect();
    let mut node = schema;
    let mut value = raw;
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let required = node["required"]
            .as_array()
            .is_some_and(|r| r.iter().any(|v| v == seg));
        node = &node["properties"][*seg];
        assert!(!node.is_null(), "schema has no field {field}");
        match value.get(*seg) {
            None if required => return true,
            None => return false,
            Some(v) => value = v,
        }
        if last {
            if let (Some(min), Some(v)) = (node["minimum"].as_f64(), value.as_f64())
                && v < min
            {
                return true;
            }
            if let (Some(max), Some(v)) = (node["maximum"].as_f64(), value.as_f64())
                && v > max
            {
                return true;
            }
            if let Some(allowed) = node["enum"].as_array() {
                return !allowed.contains(value);
            }
        }
    }
    false
}

#[test]
fn valid_manifests_and_examples_pass_schema_and_cel() {
    let schema = schema();
    let examples = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"));
    for path in manifests("valid").into_iter().chain(examples) {
        let text = std::fs::read_to_string(&path).expect("readable");
        let object = defaulted(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Some(err) = cel_errors(&schema, &object) {
            panic!("{} rejected: {err}", path.display());
        }
    }
}

#[test]
fn invalid_manifests_are_rejected_naming_the_field() {
    let schema = schema();
    for path in manifests("invalid") {
        let text = std::fs::read_to_string(&path).expect("readable");
        let field = header(&text, "field");
        let leaf = field.rsplit('.').next().expect("field has a name");
        match header(&text, "by").as_str() {
            "cel" => {
                let object = defaulted(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let err = cel_errors(&schema, &object)
                    .unwrap_or_else(|| panic!("{} passed CEL validation", path.display()));
                assert!(
                    err.contains(leaf),
                    "{}: error does not name {leaf}: {err}",
                    path.display()
                );
            }
            "openapi" => {
                let raw: Value = serde_yaml::from_str(&text).expect("YAML");
                assert!(
                    openapi_rejects(&schema, &raw, &field),
                    "{}: schema does not reject {field}",
                    path.display()
                );
            }
            other => panic!("{}: unknown `# by: {other}`", path.display()),
        }
    }
}

#[test]
fn defaults_fill_an_omitted_ttc_section() {
    let policy: InferencePolicy = serde_yaml::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests/valid/minimal.yaml"),
        )
        .expect("readable"),
    )
    .expect("parses");
    assert_eq!(policy.spec.ttc, ttc_api::TtcSpec::default());
    assert_eq!(
        policy.spec.budget.window_seconds,
        ttc_api::policy::DEFAULT_WINDOW_SECONDS
    );
    assert_eq!(policy.spec.priority, ttc_api::policy::DEFAULT_PRIORITY);
    assert_eq!(
        policy.spec.sidecar.port_or_default(),
        ttc_api::policy::DEFAULT_SIDECAR_PORT
    );
}
