//! Which pods a policy governs: label selection and overlap between policies.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A label selector that cannot be evaluated (unknown operator, missing values).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid selector: {0}")]
pub struct InvalidSelector(pub String);

/// Checks every expression of a selector, whatever labels it will meet.
pub fn validate(selector: &LabelSelector) -> Result<(), InvalidSelector> {
    for expr in selector.match_expressions.iter().flatten() {
        let has_values = expr.values.as_ref().is_some_and(|v| !v.is_empty());
        match (expr.operator.as_str(), has_values) {
            ("In" | "NotIn", true) | ("Exists" | "DoesNotExist", false) => {}
            ("In" | "NotIn", false) => {
                return Err(InvalidSelector(format!(
                    "matchExpressions key {} with operator {} needs values",
                    expr.key, expr.operator
                )));
            }
            ("Exists" | "DoesNotExist", true) => {
                return Err(InvalidSelector(format!(
                    "matchExpressions key {} with operator {} takes no values",
                    expr.key, expr.operator
                )));
            }
            (other, _) => {
                return Err(InvalidSelector(format!(
                    "matchExpressions key {} has unknown operator {other} (use In, NotIn, Exists, DoesNotExist)",
                    expr.key
                )));
            }
        }
    }
    Ok(())
}

/// Whether `selector` selects an object with `labels`. An empty selector selects everything.
pub fn selects(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, InvalidSelector> {
    if let Some(match_labels) = &selector.match_labels {
        for (key, value) in match_labels {
            if labels.get(key) != Some(value) {
                return Ok(false);
            }
        }
    }
    for expr in selector.match_expressions.iter().flatten() {
        let values = expr.values.as_deref().unwrap_or_default();
        let present = labels.get(&expr.key);
        let ok = match expr.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(InvalidSelector(format!(
                    "matchExpressions key {} with operator {} needs values",
                    expr.key, expr.operator
                )));
            }
            "In" => present.is_some_and(|v| values.contains(v)),
            "NotIn" => present.is_none_or(|v| !values.contains(v)),
            "Exists" => present.is_some(),
            "DoesNotExist" => present.is_none(),
            other => {
                return Err(InvalidSelector(format!(
                    "matchExpressions key {} has unknown operator {other} (use In, NotIn, Exists, DoesNotExist)",
                    expr.key
                )));
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What the operator knows of a pod (from its metadata only).
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    /// Pod name.
    pub name: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// The policy whose sidecar the webhook injected, from the pod's annotation.
    pub injected_policy: Option<String>,
    /// Whether the pod is being deleted.
    pub terminating: bool,
}

/// Another policy of the same namespace, for overlap detection.
#[derive(Debug, Clone)]
pub struct PeerPolicy<'a> {
    /// Name of the other policy.
    pub name: &'a str,
    /// Its selector.
    pub selector: &'a LabelSelector,
}

/// The pods a policy selects, split into those it governs and those it shares with others.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodSelection {
    /// Pods selected by this policy only, sorted by name.
    pub governed: Vec<PodView>,
    /// Pods also selected by other policies, with those policies' names; governed by none.
    pub overlapping: Vec<(String, Vec<String>)>,
}

impl PodSelection {
    /// Governed pods that do not carry this policy's sidecar.
    pub fn without_sidecar(&self, policy: &str) -> Vec<&str> {
        self.governed
            .iter()
            .filter(|p| p.injected_policy.as_deref() != Some(policy))
            .map(|p| p.name.as_str())
            .collect()
    }
}

/// Selects the pods of a namespace for one policy. Peer selectors that are invalid are ignored
/// here (their own reconcile reports them); this policy's invalid selector is an error.
pub fn select_pods(
    selector: &LabelSelector,
    peers: &[PeerPolicy<'_>],
    pods: &[PodView],
) -> Result<PodSelection, InvalidSelector> {
    validate(selector)?;
    let mut selection = PodSelection::default();
    for pod in pods.iter().filter(|p| !p.terminating) {
        if !selects(selector, &pod.labels)? {
            continue;
        }
        let mut others: Vec<String> = peers
            .iter()
            .filter(|peer| selects(peer.selector, &pod.labels).unwrap_or(false))
            .map(|peer| peer.name.to_string())
            .collect();
        if others.is_empty() {
            selection.governed.push(pod.clone());
        } else {
            others.sort();
            selection.overlapping.push((pod.name.clone(), others));
        }
    }
    selection.governed.sort_by(|a, b| a.name.cmp(&b.name));
    selection.overlapping.sort();
    Ok(selection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn match_labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(labels(pairs)),
            ..Default::default()
        }
    }

    fn pod(name: &str, pairs: &[(&str, &str)]) -> PodView {
        PodView {
            name: name.into(),
            labels: labels(pairs),
            injected_policy: None,
            terminating: false,
        }
    }

    #[test]
    fn empty_selector_selects_everything() {
        assert_eq!(selects(&LabelSelector::default(), &labels(&[])), Ok(true));
    }

    #[test]
    fn match_labels_and_expressions_combine() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("app", "chat")])),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["gpu".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert_eq!(
            selects(&selector, &labels(&[("app", "chat"), ("tier", "gpu")])),
            Ok(true)
        );
        assert_eq!(
            selects(&selector, &labels(&[("app", "chat"), ("tier", "cpu")])),
            Ok(false)
        );
        assert_eq!(
            selects(
                &selector,
                &labels(&[("app", "chat"), ("tier", "gpu"), ("canary", "1")])
            ),
            Ok(false)
        );
        assert_eq!(selects(&selector, &labels(&[("tier", "gpu")])), Ok(false));
    }

    #[test]
    fn unknown_operator_is_invalid() {
        let selector = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "a".into(),
                operator: "Like".into(),
                values: None,
            }]),
            ..Default::default()
        };
        assert!(selects(&selector, &labels(&[])).is_err());
        // Invalid even when no pod is there to evaluate it against.
        assert!(select_pods(&selector, &[], &[]).is_err());
        let no_values = LabelSelector {
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "a".into(),
                    operator: "Exists".into(),
                    values: None,
                },
                LabelSelectorRequirement {
                    key: "b".into(),
                    operator: "In".into(),
                    values: Some(vec![]),
                },
            ]),
            ..Default::default()
        };
        assert!(validate(&no_values).is_err());
    }

    #[test]
    fn overlapping_pods_are_governed_by_no_policy() {
        let mine = match_labels(&[("app", "chat")]);
        let other = match_labels(&[("team", "a")]);
        let peers = [PeerPolicy {
            name: "team-a",
            selector: &other,
        }];
        let pods = [
            pod("chat-2", &[("app", "chat")]),
            pod("chat-1", &[("app", "chat"), ("team", "a")]),
            pod("search", &[("app", "search"), ("team", "a")]),
        ];
        let selection = select_pods(&mine, &peers, &pods).expect("valid");
        assert_eq!(
            selection
                .governed
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["chat-2"]
        );
        assert_eq!(
            selection.overlapping,
            vec![("chat-1".to_string(), vec!["team-a".to_string()])]
        );
    }

    #[test]
    fn terminating_pods_and_missing_sidecars() {
        let mine = match_labels(&[("app", "chat")]);
        let mut injected = pod("a", &[("app", "chat")]);
        injected.injected_policy = Some("p".into());
        let mut gone = pod("b", &[("app", "chat")]);
        gone.terminating = true;
        let selection = select_pods(&mine, &[], &[injected, gone, pod("c", &[("app", "chat")])])
            .expect("valid");
        assert_eq!(selection.governed.len(), 2);
        assert_eq!(selection.without_sidecar("p"), ["c"]);
    }
}
