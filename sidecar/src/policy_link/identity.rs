//! Who this pod is: the names the operator injects into the sidecar's environment.

use ttc_api::report::sidecar_env;

use super::error::LinkError;

/// This pod and the policy governing it, as the operator's injected environment names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    /// Namespace of the pod and of its policy.
    pub namespace: String,
    /// Name of the pod; the key of its entry in the policy's allocations.
    pub pod: String,
    /// Name of the governing InferencePolicy.
    pub policy: String,
}

impl PodIdentity {
    /// Reads the identity from the process environment ([`sidecar_env`] names the variables).
    pub fn from_env() -> Result<Self, LinkError> {
        Self::from_lookup(|variable| std::env::var(variable).ok())
    }

    /// Reads the identity through `lookup` (variable name to value); an empty value counts as
    /// missing, since the downward API yields an empty string for an unknown field.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, LinkError> {
        let required = |variable: &'static str| {
            lookup(variable)
                .map(|value| value.trim().to_string())
                .filter(|value| !value.is_empty())
                .ok_or(LinkError::MissingEnv { variable })
        };
        Ok(Self {
            namespace: required(sidecar_env::POD_NAMESPACE)?,
            pod: required(sidecar_env::POD_NAME)?,
            policy: required(sidecar_env::POLICY_NAME)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn identity_comes_from_the_injected_variables() {
        let identity = PodIdentity::from_lookup(lookup(&[
            (sidecar_env::POD_NAMESPACE, "team-a"),
            (sidecar_env::POD_NAME, "chat-7f9c"),
            (sidecar_env::POLICY_NAME, "chat"),
        ]))
        .expect("all variables set");
        assert_eq!(
            identity,
            PodIdentity {
                namespace: "team-a".into(),
                pod: "chat-7f9c".into(),
                policy: "chat".into(),
            }
        );
    }

    #[test]
    fn a_missing_or_empty_variable_is_named() {
        let missing = PodIdentity::from_lookup(lookup(&[
            (sidecar_env::POD_NAMESPACE, "team-a"),
            (sidecar_env::POD_NAME, "chat-7f9c"),
        ]))
        .expect_err("policy name missing");
        assert!(
            matches!(missing, LinkError::MissingEnv { variable } if variable == sidecar_env::POLICY_NAME)
        );
        assert!(missing.to_string().contains("TTC_POLICY_NAME"), "{missing}");

        let empty = PodIdentity::from_lookup(lookup(&[
            (sidecar_env::POD_NAMESPACE, "team-a"),
            (sidecar_env::POD_NAME, " "),
            (sidecar_env::POLICY_NAME, "chat"),
        ]))
        .expect_err("pod name empty");
        assert!(
            matches!(empty, LinkError::MissingEnv { variable } if variable == sidecar_env::POD_NAME)
        );
    }
}
