//! What a finished request was: the chosen answer, the depth it used and what it cost.

use serde::{Deserialize, Serialize};

use crate::answer::AnswerType;
use crate::budget::BudgetState;
use crate::difficulty::DepthClass;
use crate::feedback::FeedbackTicket;
use crate::plan::PlannedStrategy;
use crate::stopping::StopReason;

/// The measured cost of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeasuredEnergy {
    /// Joules of the whole request.
    pub joules: f64,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over all samples.
    pub completion_tokens: usize,
}

/// The result of a request: the chosen answer, the depth used and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TtcOutcome {
    /// The strategy run.
    pub strategy: PlannedStrategy,
    /// How answers were extracted.
    pub answer_type: AnswerType,
    /// The chosen (normalised) answer, `None` when no sample had one.
    pub answer: Option<String>,
    /// Which sample to return to the client.
    pub chosen_index: Option<usize>,
    /// Samples drawn (the depth used).
    pub samples: usize,
    /// Windows drawn.
    pub windows: usize,
    /// Decode passes the windows ran (each window's longest sample, summed).
    #[serde(default)]
    pub decode_passes: usize,
    /// Samples per window of the plan (the whole limit when drawn as one batch).
    pub window: usize,
    /// Fewest samples the plan drew: minimum depth, which correctness feedback compares with.
    #[serde(default = "one")]
    pub min_samples: usize,
    /// Most samples the plan allowed.
    pub max_samples: usize,
    /// Samples the budget allowed that the pod had no room for (shed under load).
    #[serde(default)]
    pub shed_samples: usize,
    /// Reasoning tokens allowed (ReasoningBudget only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<usize>,
    /// Why sampling stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
    /// Share of the samples behind the chosen answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    /// Whether a verifier accepted the chosen sample (BestOfN only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// The samples' extracted answers, in the order drawn (`None`: no answer found).
    pub answers: Vec<Option<String>>,
    /// Difficulty after the first window, in [0, 1].
    pub difficulty: f64,
    /// Difficulty bin of the prompt.
    pub difficulty_bin: usize,
    /// Whether this was a learning probe.
    pub probe: bool,
    /// Where the budget stood when the request was planned.
    pub budget_state: BudgetState,
    /// Joules the plan predicted.
    pub predicted_joules: f64,
    /// Measured joules.
    pub joules: f64,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over all samples.
    pub completion_tokens: usize,
    /// The opaque ticket a client posts back with its verdict on the answer
    /// (`POST /v1/ttc/feedback`, [`crate::feedback`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_ticket: Option<String>,
    /// Whether the greedy candidate alone settled the request, or would have had it opened
    /// alone: best-of-N's verifier accepted it, or a vote's confident stop would have stopped on
    /// it ([`crate::stopping::StoppingRule::confidence`]). `None` where the request had no greedy candidate or
    /// could draw only it. What [`crate::opening`] learns from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greedy_settles: Option<bool>,
}

fn one() -> usize {
    1
}

impl TtcOutcome {
    /// What correctness feedback on this outcome needs, under the response id `id`.
    pub fn ticket(&self, id: &str) -> FeedbackTicket {
        FeedbackTicket {
            id: id.to_owned(),
            answer_type: self.answer_type,
            bin: self.difficulty_bin,
            min_samples: self.min_samples.max(1),
            answers: self.answers.clone(),
            answer: self.answer.clone(),
        }
    }
}

/// What the controller made of a client's feedback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackReceipt {
    /// Accuracy the request's depth gained over minimum depth (+1, 0, -1); `None` when it drew
    /// no more than minimum depth, so the feedback says nothing about depth.
    pub gain: Option<f64>,
    /// The request's class.
    pub class: DepthClass,
    /// Whether extra depth is judged to pay for that class now.
    pub depth_pays: bool,
}
