//! The `ttc` object of a response: what test-time compute did for one request, as clients read
//! it. A stable, documented API type (docs/sidecar-api.md): it names what a client can use and
//! nothing of the core's internals, so the TTC core can change without changing the API.

use serde::{Deserialize, Serialize};
use ttc_api::EnergySource;
use ttc_core::{BudgetState, PlannedStrategy, StopReason, TtcOutcome};

/// What test-time compute did for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TtcObject {
    /// The strategy run: `MajorityVote`, `BestOfN` or `ReasoningBudget`.
    pub strategy: String,
    /// The chosen answer as the vote compared it (normalised); absent when no sample had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Samples drawn: the depth used.
    pub samples: usize,
    /// Most samples the plan allowed: the depth the budget gave.
    pub max_samples: usize,
    /// Samples per window (the whole limit when drawn as one batch).
    pub window: usize,
    /// Samples the budget allowed that the pod had no room for: depth shed under load.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shed_samples: usize,
    /// Reasoning tokens allowed (`ReasoningBudget` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<usize>,
    /// Share of the samples behind the chosen answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    /// Whether the verifier accepted the chosen sample (`BestOfN` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Why sampling stopped: `agreement`, `decided`, `confident`, `accepted` or `maxSamples`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Joules of every sample together (as `usage.energy.joules`).
    pub joules: f64,
    /// Where the joules come from: `nvml`, `rapl` or `estimate`.
    pub energy_source: EnergySource,
    /// Joules the plan expected at its depth (early stopping may spend less).
    pub predicted_joules: f64,
    /// Where the pod's budget stood: `unbounded`, `tracking`, `depthWorthless` or `degraded`.
    pub budget_state: String,
    /// The ticket to post back with a verdict on the answer (`POST /v1/ttc/feedback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_ticket: Option<String>,
}

impl TtcObject {
    /// The object for a finished request whose joules came from `source`.
    pub fn new(outcome: &TtcOutcome, source: EnergySource) -> Self {
        Self {
            strategy: strategy(outcome.strategy).to_owned(),
            answer: outcome.answer.clone(),
            samples: outcome.samples,
            max_samples: outcome.max_samples,
            window: outcome.window,
            shed_samples: outcome.shed_samples,
            reasoning_tokens: outcome.reasoning_tokens,
            agreement: outcome.agreement,
            verified: outcome.verified,
            stop_reason: outcome.stop_reason.map(|r| stop_reason(r).to_owned()),
            joules: outcome.joules,
            energy_source: source,
            predicted_joules: outcome.predicted_joules,
            budget_state: budget_state(outcome.budget_state).to_owned(),
            feedback_ticket: outcome.feedback_ticket.clone(),
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

// The API's names, spelled here so that renaming a core type cannot rename them.

fn strategy(s: PlannedStrategy) -> &'static str {
    match s {
        PlannedStrategy::MajorityVote => "MajorityVote",
        PlannedStrategy::BestOfN => "BestOfN",
        PlannedStrategy::ReasoningBudget => "ReasoningBudget",
    }
}

fn stop_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Agreement => "agreement",
        StopReason::Decided => "decided",
        StopReason::Confident => "confident",
        StopReason::Accepted => "accepted",
        StopReason::MaxSamples => "maxSamples",
    }
}

fn budget_state(s: BudgetState) -> &'static str {
    match s {
        BudgetState::Unbounded => "unbounded",
        BudgetState::Tracking => "tracking",
        BudgetState::DepthWorthless => "depthWorthless",
        BudgetState::Degraded => "degraded",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ttc_core::{
        AnswerType, MeasuredEnergy, PromptFeatures, RequestFeatures, TtcController, TtcOptions,
        TtcPolicy,
    };

    #[test]
    fn the_object_has_exactly_the_documented_fields() {
        let mut controller =
            TtcController::new(TtcPolicy::default(), TtcOptions::default()).expect("a controller");
        let mut session = controller.plan(&RequestFeatures {
            prompt: PromptFeatures::from_text("Is water wet?", 8),
            answer_type: AnswerType::YesNo,
            max_tokens: 8,
            reasoning_model: false,
            row_limit: None,
            effort: None,
            reasoning_budget: None,
        });
        session.add_sample("Yes", -0.1, 1, None);
        session.add_sample("yes.", -0.2, 2, None);
        session.decide();
        let mut outcome = session.finish(MeasuredEnergy {
            joules: 3.5,
            prompt_tokens: 8,
            completion_tokens: 3,
        });
        let keys = ttc_core::TicketKeys::new(vec![b"a test key, 16+ bytes".to_vec()]).unwrap();
        outcome.feedback_ticket = Some(outcome.ticket("chatcmpl-1").encode(&keys));
        let json = serde_json::to_value(TtcObject::new(&outcome, EnergySource::Estimate))
            .expect("serialises");
        let mut keys: Vec<&str> = json
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "agreement",
                "answer",
                "budgetState",
                "energySource",
                "feedbackTicket",
                "joules",
                "maxSamples",
                "predictedJoules",
                "samples",
                "stopReason",
                "strategy",
                "window",
            ]
        );
        assert_eq!(json["strategy"], "MajorityVote");
        assert_eq!(json["answer"], "yes");
        assert_eq!(json["energySource"], "estimate");
        assert_eq!(json["budgetState"], "unbounded");
        let back: TtcObject = serde_json::from_value(json).expect("parses back");
        assert_eq!(back.samples, outcome.samples);
    }

    /// Every core value has its API name: the mapping covers each variant, and the names are the
    /// ones the core's own serialisation used when the object was the core's outcome.
    #[test]
    fn api_names_match_the_names_clients_have_seen() {
        for s in [
            PlannedStrategy::MajorityVote,
            PlannedStrategy::BestOfN,
            PlannedStrategy::ReasoningBudget,
        ] {
            assert_eq!(serde_json::to_value(s).expect("json"), strategy(s));
        }
        for r in [
            StopReason::Agreement,
            StopReason::Decided,
            StopReason::Confident,
            StopReason::Accepted,
            StopReason::MaxSamples,
        ] {
            assert_eq!(serde_json::to_value(r).expect("json"), stop_reason(r));
        }
        for b in [
            BudgetState::Unbounded,
            BudgetState::Tracking,
            BudgetState::DepthWorthless,
            BudgetState::Degraded,
        ] {
            assert_eq!(serde_json::to_value(b).expect("json"), budget_state(b));
        }
    }
}
