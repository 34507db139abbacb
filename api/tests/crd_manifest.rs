//! The committed CRD manifest and field reference must be what the Rust types generate.

/// Fails unless the file at `path` (relative to this crate) is `generated`, byte for byte.
fn assert_committed(path: &str, generated: &str, source: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} differs from {source}; regenerate it with `cargo run -p ttc-api --bin crdgen`",
        path.display()
    );
}

#[test]
fn committed_crd_manifest_matches_the_types() {
    let generated = ttc_api::crd_manifest_yaml().expect("CRD serializes to YAML");
    assert_committed(ttc_api::CRD_MANIFEST_PATH, &generated, "the types");
}

#[test]
fn committed_reference_matches_the_crd() {
    let generated = ttc_api::reference_markdown();
    assert_committed(ttc_api::REFERENCE_DOC_PATH, &generated, "the CRD schema");
}

#[test]
fn crd_names_and_printer_columns() {
    use kube::CustomResourceExt;
    let crd = ttc_api::InferencePolicy::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("inferencepolicies.energy.ttc.dev")
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["ipol".to_string()]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["Budget", "Observed", "Depth", "Pods", "Ready", "Age"]
    );
    assert!(
        version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    );
}
