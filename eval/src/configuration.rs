//! The configurations every family's items run under.

use serde::{Deserialize, Serialize};

/// One way of answering a request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Configuration {
    /// One sample at temperature 0.
    Greedy,
    /// Majority vote over exactly `k` samples, generated as one batch.
    Vote {
        /// Samples.
        k: usize,
    },
    /// The sidecar's own majority vote at a fixed depth `k`, without early stopping: the greedy
    /// answer and `k - 1` samples, one batch (what policy MajorityVote with minSamples =
    /// maxSamples = k draws). Against [`Configuration::Vote`] it measures what the greedy row
    /// does to the vote; against [`Configuration::EarlyStop`], what stopping early costs.
    PolicyVote {
        /// Rows, the greedy one included.
        k: usize,
    },
    /// Policy MajorityVote: windows of `window` samples until the agreement threshold or the
    /// maximum.
    EarlyStop {
        /// Most samples.
        max_samples: usize,
        /// Agreement threshold.
        agreement: f64,
    },
    /// Policy Adaptive (difficulty-aware) under an allocation: voting, or best-of-N where it has
    /// a verifier.
    Adaptive {
        /// Joules per request allocated to the pod.
        allocation_joules: f64,
        /// The vote depth whose measured mean joules set the allocation.
        reference_depth: usize,
        /// The verifier the policy names, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        verifier: Option<EvalVerifier>,
        /// Whether each answer's correctness is fed back to the pod (`POST /v1/ttc/feedback`
        /// with the expected answer), as a client with labels would.
        #[serde(default)]
        feedback: bool,
    },
    /// Greedy on another model than the report's: a model-size point (the result's `model`
    /// names it).
    OtherModel,
    /// Policy BestOfN: sample until the verifier accepts one.
    BestOfN {
        /// Most samples.
        max_samples: usize,
        /// Which verifier checks the candidates.
        #[serde(default)]
        verifier: EvalVerifier,
    },
}

/// The verifier of a best-of-N configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EvalVerifier {
    /// The family's JSON schema: checks structure, not values.
    #[default]
    Schema,
    /// The checking tool ([`crate::checker`]) behind the HTTP verifier: recomputes what the question
    /// asks.
    Tool,
}

impl Configuration {
    /// A short label for tables and plots.
    pub fn label(&self) -> String {
        match self {
            Self::Greedy => "greedy".into(),
            Self::OtherModel => "greedy (other model)".into(),
            Self::Vote { k } => format!("vote@{k}"),
            Self::PolicyVote { k } => format!("policy-vote@{k}"),
            Self::EarlyStop { max_samples, .. } => format!("early-stop@{max_samples}"),
            Self::Adaptive {
                reference_depth,
                verifier,
                feedback,
                ..
            } => {
                let checked = match verifier {
                    None => "",
                    Some(EvalVerifier::Schema) => "+schema",
                    Some(EvalVerifier::Tool) => "+tool",
                };
                let told = if *feedback { "+feedback" } else { "" };
                format!("adaptive{checked}{told}(=vote@{reference_depth} J)")
            }
            Self::BestOfN {
                max_samples,
                verifier: EvalVerifier::Schema,
            } => format!("best-of-{max_samples}+schema"),
            Self::BestOfN {
                max_samples,
                verifier: EvalVerifier::Tool,
            } => format!("best-of-{max_samples}+tool"),
        }
    }

    /// Whether the configuration spends test-time compute (more than one greedy sample).
    pub fn is_ttc(&self) -> bool {
        !matches!(self, Self::Greedy | Self::OtherModel | Self::Vote { k: 1 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct() {
        let labels = [
            Configuration::Greedy.label(),
            Configuration::Vote { k: 4 }.label(),
            Configuration::PolicyVote { k: 4 }.label(),
            Configuration::EarlyStop {
                max_samples: 8,
                agreement: 0.75,
            }
            .label(),
            Configuration::Adaptive {
                allocation_joules: 1.0,
                reference_depth: 4,
                verifier: None,
                feedback: false,
            }
            .label(),
            Configuration::Adaptive {
                allocation_joules: 1.0,
                reference_depth: 4,
                verifier: None,
                feedback: true,
            }
            .label(),
            Configuration::Adaptive {
                allocation_joules: 1.0,
                reference_depth: 4,
                verifier: Some(EvalVerifier::Tool),
                feedback: false,
            }
            .label(),
            Configuration::BestOfN {
                max_samples: 8,
                verifier: EvalVerifier::Schema,
            }
            .label(),
            Configuration::BestOfN {
                max_samples: 8,
                verifier: EvalVerifier::Tool,
            }
            .label(),
        ];
        let set: std::collections::HashSet<_> = labels.iter().collect();
        assert_eq!(set.len(), labels.len());
    }
}
