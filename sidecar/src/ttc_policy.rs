//! The one seam between the InferencePolicy API and the TTC core: a policy's `spec.ttc` as the
//! core's [`TtcPolicy`], and the standalone sidecar's policy file read the same way.

use std::path::Path;
use std::time::Duration;

use ttc_api::policy::{TtcSpec, TtcStrategy as SpecStrategy, Verifier as SpecVerifier};
use ttc_core::{HttpEndpoint, TtcPolicy, TtcStrategy, VerifierSpec};

/// The core's policy for an InferencePolicy's `spec.ttc`. The spec is valid by the CRD's rules
/// (the API server checked it, or [`read_policy_file`] did).
pub fn ttc_policy(spec: &TtcSpec) -> TtcPolicy {
    TtcPolicy {
        strategy: match spec.strategy {
            SpecStrategy::MajorityVote => TtcStrategy::MajorityVote,
            SpecStrategy::BestOfN => TtcStrategy::BestOfN,
            SpecStrategy::ReasoningBudget => TtcStrategy::ReasoningBudget,
            SpecStrategy::Adaptive => TtcStrategy::Adaptive,
        },
        min_samples: spec.min_samples,
        max_samples: spec.max_samples,
        min_reasoning_tokens: spec.min_reasoning_tokens,
        max_reasoning_tokens: spec.max_reasoning_tokens,
        early_stop_agreement: spec.early_stop_agreement,
        stop_confidence: spec.stop_confidence,
        difficulty_aware: spec.difficulty_aware,
        min_depth_gain: spec.min_depth_gain,
        verifier: spec.verifier.as_ref().and_then(verifier_spec),
    }
}

/// The verifier's one kind (the CRD allows exactly one).
fn verifier_spec(spec: &SpecVerifier) -> Option<VerifierSpec> {
    if let Some(schema) = &spec.json_schema {
        return Some(VerifierSpec::JsonSchema(schema.clone()));
    }
    if let Some(expression) = &spec.regex {
        return Some(VerifierSpec::Regex(expression.clone()));
    }
    spec.http.as_ref().map(|http| {
        VerifierSpec::Http(HttpEndpoint {
            url: http.url.clone(),
            timeout: Duration::from_millis(u64::from(http.timeout_ms)),
            accept_score: http.accept_score,
        })
    })
}

/// Why a standalone policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    /// The file cannot be read.
    #[error("cannot read the TTC policy {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not YAML or JSON of `spec.ttc`'s shape.
    #[error("the TTC policy {path} is not an InferencePolicy's spec.ttc: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: serde_yaml::Error,
    },
    /// The CRD's rules refuse it, as the API server would.
    #[error("the TTC policy {path} is invalid: {}", .errors.join("; "))]
    Invalid {
        /// The file.
        path: String,
        /// Each rule it breaks, with the field.
        errors: Vec<String>,
    },
}

/// Reads a standalone policy file (YAML or JSON with the fields of `spec.ttc`), checked by the
/// InferencePolicy's own validation rules.
pub fn read_policy_file(path: &Path) -> Result<TtcPolicy, PolicyFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_policy(&text, &shown)
}

fn parse_policy(text: &str, path: &str) -> Result<TtcPolicy, PolicyFileError> {
    let spec: TtcSpec = serde_yaml::from_str(text).map_err(|source| PolicyFileError::Parse {
        path: path.to_owned(),
        source,
    })?;
    ttc_api::validation::validate_ttc(&spec).map_err(|errors| PolicyFileError::Invalid {
        path: path.to_owned(),
        errors,
    })?;
    Ok(ttc_policy(&spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_defaults_are_the_core_defaults() {
        assert_eq!(ttc_policy(&TtcSpec::default()), TtcPolicy::default());
    }

    #[test]
    fn every_field_and_verifier_kind_crosses_the_seam() {
        let spec: TtcSpec = serde_yaml::from_str(
            "strategy: BestOfN\nminSamples: 2\nmaxSamples: 6\nminReasoningTokens: 8\n\
             maxReasoningTokens: 64\nearlyStopAgreement: 0.8\nstopConfidence: 0.9\n\
             difficultyAware: false\nminDepthGain: 0.1\n\
             verifier: {http: {url: 'http://scorer/score', timeoutMs: 250, acceptScore: 0.7}}\n",
        )
        .expect("a spec");
        let policy = ttc_policy(&spec);
        assert_eq!(policy.strategy, TtcStrategy::BestOfN);
        assert_eq!((policy.min_samples, policy.max_samples), (2, 6));
        assert_eq!(
            (policy.min_reasoning_tokens, policy.max_reasoning_tokens),
            (8, 64)
        );
        assert_eq!(
            (policy.early_stop_agreement, policy.stop_confidence),
            (0.8, 0.9)
        );
        assert!(!policy.difficulty_aware);
        assert_eq!(policy.min_depth_gain, 0.1);
        assert_eq!(
            policy.verifier,
            Some(VerifierSpec::Http(HttpEndpoint {
                url: "http://scorer/score".into(),
                timeout: Duration::from_millis(250),
                accept_score: 0.7,
            }))
        );
        let regex: TtcSpec = serde_yaml::from_str("verifier: {regex: '^\\d+$'}").expect("a spec");
        assert_eq!(
            ttc_policy(&regex).verifier,
            Some(VerifierSpec::Regex("^\\d+$".into()))
        );
    }

    /// The InferencePolicy manifests the API server and the CRD's rules are tested with: their
    /// `spec.ttc` as a standalone policy file gets the same verdict here.
    #[test]
    fn policy_files_get_the_api_servers_verdicts_on_the_shared_manifests() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/tests/manifests");
        let mut checked = 0;
        for verdict in ["valid", "invalid"] {
            let mut paths: Vec<_> = std::fs::read_dir(root.join(verdict))
                .expect("the manifests")
                .map(|e| e.expect("an entry").path())
                .collect();
            paths.sort();
            for path in paths {
                let text = std::fs::read_to_string(&path).expect("readable");
                let field = text
                    .lines()
                    .find_map(|l| l.strip_prefix("# field: "))
                    .unwrap_or("");
                let manifest: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
                let ttc = serde_yaml::to_string(&manifest["spec"]["ttc"]).expect("YAML");
                let ttc = if manifest["spec"]["ttc"].is_null() {
                    "{}".to_string()
                } else {
                    ttc
                };
                let refused = verdict == "invalid" && field.starts_with("spec.ttc.");
                let result = parse_policy(&ttc, "spec.ttc");
                assert_eq!(
                    result.is_err(),
                    refused,
                    "{}: the policy file reader disagrees with the API server",
                    path.display()
                );
                if let Err(PolicyFileError::Invalid { errors, .. }) = result {
                    assert!(
                        errors.iter().any(|e| e.starts_with(field)),
                        "{}: {errors:?}",
                        path.display()
                    );
                }
                checked += 1;
            }
        }
        assert!(checked >= 20, "only {checked} manifests");
    }
}
