//! The valid and invalid manifests under `tests/manifests/` and the examples under `examples/`
//! against the CRD schema, client-side.
//!
//! Through `ttc_api::validation`, the CRD's own rules on the object after defaulting (the API
//! server defaults before it validates). The same files run against a real API server in the
//! operator's integration tests, and their `spec.ttc` through the standalone sidecar's policy
//! file reader in the sidecar's tests: all three must agree.

use std::path::{Path, PathBuf};

use ttc_api::InferencePolicy;
use ttc_api::validation::validate_policy;

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

/// The object as the API server would store it: defaults filled in by the types' serde defaults.
fn defaulted(text: &str) -> Result<InferencePolicy, serde_yaml::Error> {
    serde_yaml::from_str(text)
}

fn header(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
        .unwrap_or_else(|| panic!("manifest lacks a `# {key}:` header"))
        .trim()
        .to_string()
}

#[test]
fn valid_manifests_and_examples_pass_schema_and_cel() {
    let examples = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"));
    for path in manifests("valid").into_iter().chain(examples) {
        let text = std::fs::read_to_string(&path).expect("readable");
        let policy = defaulted(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(errors) = validate_policy(&policy) {
            panic!("{} rejected: {errors:?}", path.display());
        }
    }
}

/// Each invalid manifest breaks one rule (`# field:`), of the schema's bounds or its CEL rules
/// (`# by:`); the validation names that field. A value serde itself refuses (an unknown enum
/// variant) is refused while parsing, as the API server refuses it by the schema's enum.
#[test]
fn invalid_manifests_are_rejected_naming_the_field() {
    for path in manifests("invalid") {
        let text = std::fs::read_to_string(&path).expect("readable");
        let field = header(&text, "field");
        let by = header(&text, "by");
        assert!(
            matches!(by.as_str(), "cel" | "openapi"),
            "{}: unknown `# by: {by}`",
            path.display()
        );
        let errors = match defaulted(&text) {
            Err(e) => vec![format!("{field}: {e}")],
            Ok(policy) => validate_policy(&policy)
                .err()
                .unwrap_or_else(|| panic!("{} passed validation", path.display())),
        };
        let leaf = field.rsplit('.').next().expect("field has a name");
        assert!(
            errors.iter().any(|e| e.contains(leaf)),
            "{}: no error names {field}: {errors:?}",
            path.display()
        );
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
