//! How one request will run: what the plan needs to know about it, the strategy it runs and
//! the depth the budget allows.

use serde::{Deserialize, Serialize};

use crate::answer::AnswerType;
use crate::budget::BudgetState;
use crate::difficulty::PromptFeatures;
use crate::vote::VoteWeighting;

/// What the plan needs to know about a request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestFeatures {
    /// Features of the prompt ([`PromptFeatures::from_text`]).
    pub prompt: PromptFeatures,
    /// How answers are extracted and compared.
    pub answer_type: AnswerType,
    /// Token limit of one answer (the request's `max_tokens`).
    pub max_tokens: usize,
    /// Whether the model reasons before answering (R1-distill style), so a reasoning budget
    /// applies.
    pub reasoning_model: bool,
    /// Samples the pod has room for now (its memory budget and row cap), when it is loaded:
    /// depth is shed down to it, never below minimum depth, before any request is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_limit: Option<usize>,
    /// The depth the client asks for (OpenAI's `reasoning_effort`), within the policy's range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effort: Option<Effort>,
    /// The most reasoning tokens the client allows (vLLM's `thinking_token_budget`, llama.cpp's
    /// `reasoning_budget`), never below the policy's minimum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_budget: Option<usize>,
}

/// How much depth a client asks for; never beyond the policy's range or the pod's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effort {
    /// Minimum depth: the policy's fewest samples and reasoning tokens.
    Low,
    /// The depth the budget and the request's difficulty give (as without a request).
    Medium,
    /// The most the budget allows now, even where depth is judged not to pay.
    High,
}

/// The strategy a request actually runs (Adaptive resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PlannedStrategy {
    /// Vote over samples, stopping early on agreement.
    MajorityVote,
    /// Sample until a verifier accepts.
    BestOfN,
    /// One sample with a reasoning-token budget.
    ReasoningBudget,
}

impl PlannedStrategy {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::MajorityVote => "majority_vote",
            Self::BestOfN => "best_of_n",
            Self::ReasoningBudget => "reasoning_budget",
        }
    }
}

/// How one request will be run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TtcPlan {
    /// The strategy.
    pub strategy: PlannedStrategy,
    /// How answers are extracted.
    pub answer_type: AnswerType,
    /// Samples per window.
    pub window: usize,
    /// Fewest samples.
    pub min_samples: usize,
    /// Most samples (the depth the budget allows).
    pub max_samples: usize,
    /// Token limit per sample, reasoning included.
    pub max_tokens: usize,
    /// Reasoning tokens before the answer is forced (ReasoningBudget only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<usize>,
    /// Early-stop agreement threshold.
    pub early_stop_agreement: f64,
    /// How votes are weighted.
    pub weighting: VoteWeighting,
    /// Predicted joules at the planned depth (early stopping may spend less).
    pub predicted_joules: f64,
    /// This request's share of the budget, when the pod has an allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_joules: Option<f64>,
    /// Where the budget stands.
    pub budget_state: BudgetState,
    /// Difficulty bin of the prompt (0 = easy).
    pub difficulty_bin: usize,
    /// Difficulty from the prompt alone, in [0, 1].
    pub prior_difficulty: f64,
    /// Extra depth given only to keep learning whether depth pays.
    pub probe: bool,
    /// Whether the greedy candidate opens alone (else it is the first row of the first
    /// window); see [`crate::opening`].
    #[serde(default)]
    pub greedy_alone: bool,
    /// Samples the budget allowed that the pod had no room for ([`RequestFeatures::row_limit`]).
    #[serde(default)]
    pub shed_samples: usize,
}
