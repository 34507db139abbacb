//! Test-time compute decisions: how much compute each request gets and how its samples become
//! one answer. Pure code: no model, no Kubernetes, no HTTP client.
//!
//! The sidecar drives it through a [`TtcController`] per pod: [`TtcController::plan`] →
//! [`TtcSession`] (samples in, [`WindowDecision`] out) → [`TtcSession::finish`] →
//! [`TtcOutcome`] → [`TtcController::record`].
//!
//! - [`policy`]: the pod's policy (bounds and strategy) and the sidecar's TTC settings.
//! - [`plan`]: what a request is and how it will run; [`session`]: a request in progress;
//!   [`outcome`]: what it was; [`controller`]: the pod's controller that plans and learns.
//! - [`answer`]: answer extraction per task type.
//! - [`vote`]: majority vote, optionally log-probability weighted; agreement; tie rules.
//! - [`verifier`]: JSON schema, regex and HTTP verifiers for best-of-N (the HTTP call goes
//!   through a [`ScoreTransport`] the caller provides).
//! - [`stopping`]: early stopping in windows (ESC / Adaptive-Consistency), min/max samples.
//! - [`windows`]: whether a request's samples are drawn in windows or as one batch.
//! - [`difficulty`]: the difficulty signal and the learner of whether depth changes answers.
//! - [`feedback`]: clients' verdicts on answers, which tell that learner whether depth made
//!   them right.
//! - [`opening`]: whether best-of-N opens with its greedy candidate alone or in a batch.
//! - [`reasoning`]: budget forcing for reasoning models.
//! - [`cost`]: what depth costs, learned from measured joules.
//! - [`budget`]: the budget controller that holds the pod's joules-per-request allocation;
//!   [`power`]: the power cap's bound on it.
//! - [`rng`]: a reproducible generator for seeded simulations and task sets.

pub mod answer;
pub mod budget;
pub mod controller;
pub mod cost;
pub mod difficulty;
pub mod feedback;
pub mod opening;
pub mod outcome;
pub mod plan;
pub mod policy;
pub mod power;
pub mod reasoning;
pub mod rng;
pub mod session;
pub mod stopping;
pub mod verifier;
pub mod vote;
pub mod windows;

#[cfg(test)]
mod simulation;

pub use answer::{AnswerType, extract_answer};
pub use budget::{BudgetConfig, BudgetController, BudgetReport, BudgetState, DepthChoice};
pub use controller::{TtcController, TtcReport};
pub use difficulty::{DepthValueReport, PromptFeatures};
pub use feedback::{Feedback, FeedbackError, FeedbackTicket, KeyError, TicketKeys};
pub use outcome::{FeedbackReceipt, MeasuredEnergy, TtcOutcome};
pub use plan::{Effort, PlannedStrategy, RequestFeatures, TtcPlan};
pub use policy::{TtcError, TtcOptions, TtcPolicy, TtcStrategy};
pub use session::TtcSession;
pub use stopping::{StopReason, StoppingRule, WindowDecision};
pub use verifier::{
    HttpEndpoint, ScoreFuture, ScoreTransport, Verdict, Verifier, VerifierError, VerifierSpec,
};
pub use vote::{Candidate, Vote, VoteWeighting, majority_vote};
