//! Test-time compute: strategies, answer extraction, verifiers, stopping rules, the budget
//! controller.
//!
//! Pure code: no Kubernetes, no model. The HTTP layer drives it through [`plan`]:
//! [`TtcController::plan`] → [`TtcSession`] (samples in, [`WindowDecision`] out) →
//! [`TtcSession::finish`] → [`TtcOutcome`] → [`TtcController::record`].
//!
//! - [`answer`]: answer extraction per task type.
//! - [`vote`]: majority vote, optionally log-probability weighted; agreement; tie rules.
//! - [`verifier`]: JSON schema, regex and HTTP verifiers for best-of-N.
//! - [`stopping`]: early stopping in windows (ESC / Adaptive-Consistency), min/max samples.
//! - [`difficulty`]: the difficulty signal and the learner of whether depth changes answers.
//! - [`feedback`]: clients' verdicts on answers, which tell that learner whether depth made
//!   them right.
//! - [`opening`]: whether best-of-N opens with its greedy candidate alone or in a batch.
//! - [`reasoning`]: budget forcing for reasoning models.
//! - [`cost`]: what depth costs, learned from measured joules.
//! - [`budget`]: the budget controller that holds the pod's joules-per-request allocation.
//! - [`tasks`]: seeded task families for the evaluation; [`stats`]: intervals and pass@k.

pub mod answer;
pub mod budget;
pub mod cost;
pub mod difficulty;
pub mod feedback;
pub mod opening;
pub mod plan;
pub mod power;
pub mod reasoning;
pub mod stats;
pub mod stopping;
pub mod tasks;
pub mod verifier;
pub mod vote;
pub mod windows;

#[cfg(test)]
mod simulation;

pub use answer::{AnswerType, extract_answer};
pub use budget::{BudgetConfig, BudgetController, BudgetReport, BudgetState, DepthChoice};
pub use difficulty::{DepthValueReport, PromptFeatures};
pub use feedback::{Feedback, FeedbackError, FeedbackTicket};
pub use plan::{
    EnergySource, FeedbackReceipt, MeasuredEnergy, PlannedStrategy, RequestFeatures, TtcController,
    TtcError, TtcOptions, TtcOutcome, TtcPlan, TtcPolicy, TtcReport, TtcSession, TtcStrategy,
};
pub use stopping::{StopReason, StoppingRule, WindowDecision};
pub use verifier::{Verdict, Verifier, VerifierError, VerifierSpec};
pub use vote::{Candidate, Vote, VoteWeighting, majority_vote};
