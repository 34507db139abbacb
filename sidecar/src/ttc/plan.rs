//! The API the HTTP layer drives: a [`TtcController`] per pod turns policy bounds, the pod's
//! allocation and a request's features into a [`TtcPlan`]; a [`TtcSession`] takes the samples
//! window by window and says when to stop; its [`TtcOutcome`] (chosen answer, depth used,
//! joules) goes back to the controller, which learns from it.
//!
//! ```text
//! let mut session = controller.plan(&features);          // short lock on the controller
//! let mut n = session.first_window();
//! loop {
//!     for c in engine.generate(n samples, plan.max_tokens) {
//!         let i = session.add_sample(&c.text, c.logprob, c.token_ids.len(), Some(c.sample_logprob));
//!         if session.needs_verdicts() { session.add_verdict(i, verifier.verify(prompt, &c.text).await) }
//!     }
//!     match session.decide() { Continue { samples } => n = samples, Stop { .. } => break }
//! }
//! let outcome = session.finish(measured_energy);
//! controller.record(&outcome);                            // short lock again
//! ```
//!
//! For [`PlannedStrategy::ReasoningBudget`] the one sample generates up to
//! `plan.reasoning_tokens`; if it stopped on length with its reasoning still open,
//! [`super::reasoning::BudgetForcing::forced_suffix`] is appended and the sample continues for
//! the answer (`plan.max_tokens` covers both; `crate::ttc_service` does this). A request that is planned but never runs is
//! handed back with [`TtcController::abandon`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::answer::{AnswerType, extract_answer};
use super::budget::{
    BudgetConfig, BudgetController, BudgetReport, BudgetState, DepthBounds, DepthRequest,
    DepthUnit, FinishedRequest, WindowShape,
};
use super::cost::CostObservation;
use super::difficulty::{
    DepthClass, DepthValueConfig, DepthValueLearner, DepthValueReport, DifficultySignal,
    PromptFeatures,
};
use super::feedback::{Feedback, FeedbackError, FeedbackTicket, SeenTickets};
use super::opening::GreedyOpening;
use super::stopping::{StopReason, StoppingRule, WindowDecision};
use super::verifier::{Verdict, Verifier, VerifierError};
use super::vote::{Candidate, VoteWeighting, majority_vote};
use super::windows::{WindowConfig, WindowLearner, WindowReport};

/// The policy's test-time-compute limits and strategy: the InferencePolicy's `ttc` field, so the
/// CRD is the one source of their names and defaults.
pub use ttc_api::{TtcSpec as TtcPolicy, TtcStrategy};

/// Sidecar-side settings of test-time compute (not part of the policy).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TtcOptions {
    /// Samples per window (early stopping looks at the votes after each window).
    pub window: usize,
    /// How votes are weighted.
    pub weighting: VoteWeighting,
    /// The budget controller's settings.
    pub budget: BudgetConfig,
    /// The depth-value learner's settings.
    pub depth_value: DepthValueConfig,
    /// When to draw a request's samples as one batch instead of in windows.
    #[serde(default)]
    pub windows: WindowConfig,
}

impl Default for TtcOptions {
    fn default() -> Self {
        Self {
            window: 2,
            weighting: VoteWeighting::Uniform,
            budget: BudgetConfig::default(),
            depth_value: DepthValueConfig::default(),
            windows: WindowConfig::default(),
        }
    }
}

/// Why a policy cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum TtcError {
    /// The verifier spec is invalid.
    #[error(transparent)]
    Verifier(#[from] VerifierError),
    /// BestOfN without a verifier.
    #[error("ttc.strategy BestOfN needs ttc.verifier (a jsonSchema, regex or http verifier)")]
    BestOfNWithoutVerifier,
    /// min above max.
    #[error("ttc.{field}: minimum {min} is above maximum {max}")]
    Bounds {
        /// Which pair of fields.
        field: &'static str,
        /// The minimum.
        min: u32,
        /// The maximum.
        max: u32,
    },
    /// Sample bounds must be at least one.
    #[error("ttc.maxSamples must be at least 1")]
    NoSamples,
}

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
    /// window); see [`super::opening`].
    #[serde(default)]
    pub greedy_alone: bool,
}

/// Where a joules figure comes from; an estimate is never shown as a measurement.
pub use ttc_energy::EnergySource;

/// The measured cost of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeasuredEnergy {
    /// Joules of the whole request.
    pub joules: f64,
    /// Where the figure comes from.
    pub source: EnergySource,
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
    /// Where the joules figure comes from.
    pub energy_source: EnergySource,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over all samples.
    pub completion_tokens: usize,
    /// The opaque ticket a client posts back with its verdict on the answer
    /// (`POST /v1/ttc/feedback`, [`super::feedback`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_ticket: Option<String>,
    /// Whether the greedy candidate alone settled the request, or would have had it opened
    /// alone: best-of-N's verifier accepted it, or a vote's confident stop would have stopped on
    /// it ([`StoppingRule::confidence`]). `None` where the request had no greedy candidate or
    /// could draw only it. What [`super::opening`] learns from.
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

/// One request in progress: collects samples and verdicts, decides after each window.
#[derive(Debug, Clone)]
pub struct TtcSession {
    plan: TtcPlan,
    rule: StoppingRule,
    candidates: Vec<Candidate>,
    verdicts: Vec<Option<Verdict>>,
    signal: DifficultySignal,
    windows: usize,
    window_start: usize,
    /// Decode passes of the windows closed so far (each window's longest sample).
    decode_passes: usize,
    stop: Option<StopReason>,
}

impl TtcSession {
    /// The plan.
    pub fn plan(&self) -> &TtcPlan {
        &self.plan
    }

    /// Samples to draw in the first window: the greedy candidate alone where best-of-N opens
    /// that way ([`TtcPlan::greedy_alone`]).
    pub fn first_window(&self) -> usize {
        if self.greedy_first() && self.plan.greedy_alone {
            1
        } else {
            self.rule.first_window()
        }
    }

    /// Whether the first window's first row is decoded greedily: always where samples are
    /// drawn, so the first sample is the answer minimum depth gives (a plan of one sample
    /// decodes greedily), which depth then adds to and correctness feedback compares with
    /// ([`super::feedback`]). It is also the model's most likely answer: right more often than
    /// a sample (yes/no facts on the default model: 50% against 37% at temperature 0.7; 60% of
    /// single-digit additions against 38%). Best-of-N opens with it alone, or next to sampled
    /// rows where greedy is usually rejected ([`super::opening`]); a vote counts it as one of
    /// its samples, the one that wins ties.
    pub fn greedy_first(&self) -> bool {
        matches!(
            self.plan.strategy,
            PlannedStrategy::BestOfN | PlannedStrategy::MajorityVote
        )
    }

    /// Samples drawn so far.
    pub fn samples(&self) -> usize {
        self.candidates.len()
    }

    /// Whether each sample needs a verifier verdict ([`TtcSession::add_verdict`]).
    pub fn needs_verdicts(&self) -> bool {
        self.plan.strategy == PlannedStrategy::BestOfN
    }

    /// Adds a sample: its text, the sum of its token log-probabilities, its token count and,
    /// where known, the log-probability that another sample retraces it
    /// ([`Candidate::retrace_logprob`]). Returns its index.
    pub fn add_sample(
        &mut self,
        text: &str,
        logprob: f64,
        tokens: usize,
        retrace_logprob: Option<f64>,
    ) -> usize {
        self.candidates.push(Candidate {
            answer: extract_answer(text, self.plan.answer_type),
            logprob,
            tokens,
            retrace_logprob,
        });
        self.verdicts.push(None);
        self.candidates.len() - 1
    }

    /// Records the verifier's verdict on sample `index` (ignored for an unknown index).
    pub fn add_verdict(&mut self, index: usize, verdict: Verdict) {
        if let Some(slot) = self.verdicts.get_mut(index) {
            *slot = Some(verdict);
        }
    }

    /// The candidates so far.
    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }

    /// Call after each window: continue with how many samples, or stop.
    pub fn decide(&mut self) -> WindowDecision {
        if let Some(reason) = self.stop {
            return WindowDecision::Stop { reason };
        }
        let drawn = self.candidates.len();
        if drawn > self.window_start {
            self.windows += 1;
            self.decode_passes += self.candidates[self.window_start..]
                .iter()
                .map(|c| c.tokens)
                .max()
                .unwrap_or(0);
            if self.windows == 1 {
                let vote = majority_vote(&self.candidates, self.plan.weighting);
                self.signal = self
                    .signal
                    .with_first_window(vote.as_ref(), &self.candidates);
            }
            self.window_start = drawn;
        }
        let decision = match self.plan.strategy {
            PlannedStrategy::BestOfN => {
                if self.first_accepted().is_some() {
                    WindowDecision::Stop {
                        reason: StopReason::Accepted,
                    }
                } else if drawn >= self.rule.max_samples {
                    WindowDecision::Stop {
                        reason: StopReason::MaxSamples,
                    }
                } else {
                    WindowDecision::Continue {
                        samples: self.rule.window.min(self.rule.max_samples - drawn),
                    }
                }
            }
            PlannedStrategy::MajorityVote | PlannedStrategy::ReasoningBudget => {
                let vote = majority_vote(&self.candidates, self.plan.weighting);
                self.rule.decide(drawn, vote.as_ref())
            }
        };
        if let WindowDecision::Stop { reason } = decision {
            self.stop = Some(reason);
        }
        decision
    }

    /// Whether a vote would stop now, early, were the samples drawn so far joined by the rows
    /// of the current window that have `finished` (their texts): the leader already holds the
    /// agreement threshold, or the rows still to come cannot overtake it. Lets a window's rows
    /// still running be cancelled once the vote is settled. Always false for best-of-N.
    pub fn settled_with(&self, finished: &[String]) -> bool {
        if self.plan.strategy == PlannedStrategy::BestOfN {
            return false;
        }
        let mut candidates = self.candidates.clone();
        candidates.extend(finished.iter().map(|text| Candidate {
            answer: extract_answer(text, self.plan.answer_type),
            ..Candidate::default()
        }));
        let vote = majority_vote(&candidates, self.plan.weighting);
        matches!(
            self.rule.decide(candidates.len(), vote.as_ref()),
            WindowDecision::Stop {
                reason: StopReason::Agreement | StopReason::Decided
            }
        )
    }

    /// See [`TtcOutcome::greedy_settles`].
    fn greedy_settles(&self, chosen_index: Option<usize>, verified: Option<bool>) -> Option<bool> {
        if !self.greedy_first() || self.rule.max_samples < 2 {
            return None;
        }
        let greedy = self.candidates.first()?;
        Some(match self.plan.strategy {
            PlannedStrategy::BestOfN => verified == Some(true) && chosen_index == Some(0),
            _ => {
                self.rule.confidence < 1.0
                    && majority_vote(std::slice::from_ref(greedy), self.plan.weighting).is_some_and(
                        |vote| self.rule.chance_to_hold(1, &vote) >= self.rule.confidence,
                    )
            }
        })
    }

    fn first_accepted(&self) -> Option<usize> {
        self.verdicts
            .iter()
            .position(|v| v.as_ref().is_some_and(|v| v.accepted))
    }

    /// The sample with `answer` that is most probable (earliest on a tie).
    fn best_sample_with(&self, answer: &str) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, c) in self.candidates.iter().enumerate() {
            if c.answer.as_deref() == Some(answer) {
                let p = c.mean_token_probability();
                if best.is_none_or(|(_, bp)| p > bp) {
                    best = Some((i, p));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// Ends the request with its measured energy.
    pub fn finish(self, energy: MeasuredEnergy) -> TtcOutcome {
        let vote = majority_vote(&self.candidates, self.plan.weighting);
        let (answer, chosen_index, agreement, verified) = match self.plan.strategy {
            PlannedStrategy::BestOfN => {
                if let Some(i) = self.first_accepted() {
                    let answer = self.candidates[i].answer.clone();
                    (
                        answer,
                        Some(i),
                        vote.as_ref().map(|v| v.agreement),
                        Some(true),
                    )
                } else {
                    // Nothing accepted: the best-scored candidate, else the vote, flagged
                    // unverified.
                    let scored = self
                        .verdicts
                        .iter()
                        .enumerate()
                        .filter_map(|(i, v)| v.as_ref().and_then(|v| v.score).map(|s| (i, s)))
                        .fold(None::<(usize, f64)>, |best, (i, s)| match best {
                            Some((_, bs)) if bs >= s => best,
                            _ => Some((i, s)),
                        });
                    match scored {
                        Some((i, _)) => (
                            self.candidates[i].answer.clone(),
                            Some(i),
                            None,
                            Some(false),
                        ),
                        None => {
                            let answer = vote.as_ref().map(|v| v.answer.clone());
                            let index = answer
                                .as_deref()
                                .and_then(|a| self.best_sample_with(a))
                                .or((!self.candidates.is_empty()).then_some(0));
                            (
                                answer,
                                index,
                                vote.as_ref().map(|v| v.agreement),
                                Some(false),
                            )
                        }
                    }
                }
            }
            PlannedStrategy::MajorityVote | PlannedStrategy::ReasoningBudget => {
                let answer = vote.as_ref().map(|v| v.answer.clone());
                let index = answer
                    .as_deref()
                    .and_then(|a| self.best_sample_with(a))
                    .or((!self.candidates.is_empty()).then_some(0));
                (answer, index, vote.as_ref().map(|v| v.agreement), None)
            }
        };
        let greedy_settles = self.greedy_settles(chosen_index, verified);
        TtcOutcome {
            strategy: self.plan.strategy,
            answer_type: self.plan.answer_type,
            answer,
            chosen_index,
            samples: self.candidates.len(),
            windows: self.windows,
            decode_passes: self.decode_passes,
            window: self.plan.window,
            min_samples: self.plan.min_samples,
            max_samples: self.plan.max_samples,
            reasoning_tokens: self.plan.reasoning_tokens,
            stop_reason: self.stop,
            agreement,
            verified,
            answers: self.candidates.iter().map(|c| c.answer.clone()).collect(),
            difficulty: self.signal.score(),
            difficulty_bin: self.plan.difficulty_bin,
            probe: self.plan.probe,
            budget_state: self.plan.budget_state,
            predicted_joules: self.plan.predicted_joules,
            joules: energy.joules,
            energy_source: energy.source,
            prompt_tokens: energy.prompt_tokens,
            completion_tokens: energy.completion_tokens,
            feedback_ticket: None,
            greedy_settles,
        }
    }
}

/// Test-time compute of one pod: the policy, the budget controller and the depth-value learner.
#[derive(Debug)]
pub struct TtcController {
    policy: TtcPolicy,
    options: TtcOptions,
    verifier: Option<Arc<Verifier>>,
    budget: BudgetController,
    learner: DepthValueLearner,
    windows: WindowLearner,
    opening: GreedyOpening,
    seen_tickets: SeenTickets,
    requests: u64,
}

/// Everything the controller knows, ready for metrics and responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TtcReport {
    /// Requests planned.
    pub requests: u64,
    /// The budget controller.
    pub budget: BudgetReport,
    /// Whether extra depth changes answers.
    pub depth_value: DepthValueReport,
    /// Whether early stopping pays for its windows.
    pub windows: WindowReport,
}

fn validate(policy: &TtcPolicy) -> Result<Option<Arc<Verifier>>, TtcError> {
    if policy.max_samples == 0 {
        return Err(TtcError::NoSamples);
    }
    if policy.min_samples > policy.max_samples {
        return Err(TtcError::Bounds {
            field: "minSamples",
            min: policy.min_samples,
            max: policy.max_samples,
        });
    }
    if policy.min_reasoning_tokens > policy.max_reasoning_tokens {
        return Err(TtcError::Bounds {
            field: "minReasoningTokens",
            min: policy.min_reasoning_tokens,
            max: policy.max_reasoning_tokens,
        });
    }
    if policy.strategy == TtcStrategy::BestOfN && policy.verifier.is_none() {
        return Err(TtcError::BestOfNWithoutVerifier);
    }
    Ok(match &policy.verifier {
        Some(spec) => Some(Arc::new(Verifier::from_spec(spec)?)),
        None => None,
    })
}

impl TtcController {
    /// A controller for `policy`; fails when the policy is inconsistent or its verifier invalid.
    pub fn new(policy: TtcPolicy, options: TtcOptions) -> Result<Self, TtcError> {
        let verifier = validate(&policy)?;
        let mut learner = DepthValueLearner::new(options.depth_value);
        learner.set_min_gain(policy.min_depth_gain);
        Ok(Self {
            budget: BudgetController::new(options.budget),
            learner,
            windows: WindowLearner::new(options.windows),
            opening: GreedyOpening::default(),
            seen_tickets: SeenTickets::default(),
            policy,
            options,
            verifier,
            requests: 0,
        })
    }

    /// Replaces the policy, keeping what was learned; on error the old policy stays.
    pub fn set_policy(&mut self, policy: TtcPolicy) -> Result<(), TtcError> {
        self.verifier = validate(&policy)?;
        if policy.min_depth_gain != self.policy.min_depth_gain {
            self.learner.set_min_gain(policy.min_depth_gain);
        }
        self.policy = policy;
        Ok(())
    }

    /// Accepts the pod's allocation in joules per request (`None`: no budget).
    pub fn set_allocation(&mut self, joules_per_request: Option<f64>) {
        self.budget.set_allocation(joules_per_request);
    }

    /// Sets the power cap's bound in joules per request (see [`BudgetController::set_cap`]).
    pub fn set_cap(&mut self, joules_per_request: Option<f64>) {
        self.budget.set_cap(joules_per_request);
    }

    /// The policy in force.
    pub fn policy(&self) -> &TtcPolicy {
        &self.policy
    }

    /// Learns the engine's batch cost curve from a decode pass of `rows` rows (see
    /// [`WindowLearner::observe_pass`]).
    pub fn observe_pass(&mut self, rows: usize, seconds: f64) {
        self.windows.observe_pass(rows, seconds);
    }

    /// The policy's verifier, for the HTTP layer to check BestOfN candidates with.
    pub fn verifier(&self) -> Option<Arc<Verifier>> {
        self.verifier.clone()
    }

    /// The confident stop's confidence (the policy's `stopConfidence`): off (1.0) for weighted
    /// votes, where a majority of samples need not carry the weight.
    fn stop_confidence(&self) -> f64 {
        match self.options.weighting {
            VoteWeighting::Uniform => self.policy.stop_confidence,
            VoteWeighting::SequenceLogprob => 1.0,
        }
    }

    fn strategy_for(&self, features: &RequestFeatures) -> PlannedStrategy {
        match self.policy.strategy {
            TtcStrategy::MajorityVote => PlannedStrategy::MajorityVote,
            TtcStrategy::BestOfN => PlannedStrategy::BestOfN,
            TtcStrategy::ReasoningBudget => PlannedStrategy::ReasoningBudget,
            TtcStrategy::Adaptive => {
                if self.verifier.is_some() {
                    PlannedStrategy::BestOfN
                } else if features.reasoning_model && self.policy.max_reasoning_tokens > 0 {
                    PlannedStrategy::ReasoningBudget
                } else {
                    PlannedStrategy::MajorityVote
                }
            }
        }
    }

    /// Plans one request.
    pub fn plan(&mut self, features: &RequestFeatures) -> TtcSession {
        self.requests += 1;
        let strategy = self.strategy_for(features);
        let bin = features.prompt.bin();
        let aware = self.policy.difficulty_aware;
        let class = DepthClass {
            answer_type: features.answer_type,
            bin,
        };
        let probe = aware && self.learner.next_request_is_probe(class);
        let depth_worthless = aware && !probe && !self.learner.depth_pays_for(class);
        let value = if aware {
            self.learner.disagreement(class)
        } else {
            1.0
        };
        let unit = match strategy {
            PlannedStrategy::ReasoningBudget => DepthUnit::ReasoningTokens,
            PlannedStrategy::MajorityVote | PlannedStrategy::BestOfN => DepthUnit::Samples,
        };
        let max_tokens = features.max_tokens.max(1);
        let greedy_alone = self.opening.alone(strategy, class)
            && match strategy {
                PlannedStrategy::BestOfN => true,
                // A vote's greedy candidate can settle it only by the confident stop.
                PlannedStrategy::MajorityVote => {
                    self.policy.min_samples <= 1 && self.stop_confidence() < 1.0
                }
                PlannedStrategy::ReasoningBudget => false,
            };
        let choice = self.budget.choose(&DepthRequest {
            prompt_tokens: features.prompt.prompt_tokens,
            unit,
            bounds: DepthBounds {
                min_samples: self.policy.min_samples as usize,
                max_samples: self.policy.max_samples as usize,
                min_reasoning_tokens: self.policy.min_reasoning_tokens as usize,
                max_reasoning_tokens: self.policy.max_reasoning_tokens as usize,
                max_tokens,
            },
            value,
            depth_worthless,
            windows: WindowShape {
                opening: usize::from(greedy_alone),
                window: self.options.window.max(1),
                batch_from: self
                    .windows
                    .batch_from(self.options.window, self.policy.max_samples as usize),
            },
        });
        let (min_samples, max_samples, reasoning_tokens) = match strategy {
            // Budget forcing spends the depth on one sample's reasoning.
            PlannedStrategy::ReasoningBudget => (1, 1, Some(choice.reasoning_tokens)),
            _ => (
                (self.policy.min_samples as usize)
                    .min(choice.samples)
                    .max(1),
                choice.samples.max(1),
                None,
            ),
        };
        // Windows let a request stop early; where that rarely happens one batch is cheaper.
        let window = match strategy {
            PlannedStrategy::ReasoningBudget => self.options.window,
            _ => self.windows.window(self.options.window, max_samples),
        };
        let rule = StoppingRule::new(
            min_samples,
            max_samples,
            window,
            self.policy.early_stop_agreement,
        )
        .with_confidence(self.stop_confidence());
        let plan = TtcPlan {
            strategy,
            answer_type: features.answer_type,
            window: rule.window,
            min_samples: rule.min_samples,
            max_samples: rule.max_samples,
            max_tokens: max_tokens + reasoning_tokens.unwrap_or(0),
            reasoning_tokens,
            early_stop_agreement: rule.agreement,
            weighting: self.options.weighting,
            predicted_joules: choice.predicted_joules,
            budget_joules: choice.budget_joules,
            budget_state: choice.state,
            difficulty_bin: bin,
            prior_difficulty: features.prompt.prior_difficulty(),
            probe,
            greedy_alone,
        };
        TtcSession {
            plan,
            rule,
            candidates: Vec::new(),
            verdicts: Vec::new(),
            signal: DifficultySignal::from_prompt(&features.prompt),
            windows: 0,
            window_start: 0,
            decode_passes: 0,
            stop: None,
        }
    }

    /// Forgets a planned request that never ran (no [`TtcSession::finish`] will come): it stops
    /// counting as in flight. A request that ran, even cut short, is recorded instead.
    pub fn abandon(&mut self, plan: &TtcPlan) {
        self.budget.release(plan.predicted_joules);
    }

    /// Learns from a finished request: its measured joules (cost model, budget window) and,
    /// when it drew more than one sample, whether the later samples disagreed with the first.
    pub fn record(&mut self, outcome: &TtcOutcome) {
        self.budget.record(&FinishedRequest {
            observation: CostObservation {
                joules: outcome.joules,
                prompt_tokens: outcome.prompt_tokens,
                completion_tokens: outcome.completion_tokens,
                samples: outcome.samples,
                windows: outcome.windows,
                decode_passes: outcome.decode_passes,
            },
            sample_limit: (outcome.strategy != PlannedStrategy::ReasoningBudget)
                .then_some(outcome.max_samples),
            predicted_joules: outcome.predicted_joules,
            degraded: outcome.budget_state == BudgetState::Degraded,
        });
        if outcome.strategy != PlannedStrategy::ReasoningBudget {
            self.windows
                .record(outcome.window, outcome.samples, outcome.max_samples);
        }
        let class = DepthClass {
            answer_type: outcome.answer_type,
            bin: outcome.difficulty_bin,
        };
        if let Some(settles) = outcome.greedy_settles {
            self.opening.record(outcome.strategy, class, settles);
        }
        let answers: Vec<Option<&str>> = outcome.answers.iter().map(Option::as_deref).collect();
        self.learner
            .record(class, &answers, outcome.answer.as_deref());
    }

    /// Learns from a client's verdict on an answer: how much the request's depth gained over
    /// minimum depth. Each ticket counts once; a refused one changes nothing.
    pub fn feedback(
        &mut self,
        ticket: &FeedbackTicket,
        feedback: &Feedback,
    ) -> Result<FeedbackReceipt, FeedbackError> {
        let gain = ticket.gain(feedback)?;
        self.seen_tickets.insert(&ticket.id)?;
        let class = ticket.class();
        if let Some(gain) = gain {
            self.learner.record_gain(class, gain);
        }
        Ok(FeedbackReceipt {
            gain,
            class,
            depth_pays: self.learner.depth_pays_for(class),
        })
    }

    /// The controller's state for metrics.
    pub fn report(&self) -> TtcReport {
        TtcReport {
            requests: self.requests,
            budget: self.budget.report(),
            depth_value: self.learner.report(),
            windows: self.windows.report(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ttc::verifier::VerifierSpec;

    fn features(answer_type: AnswerType) -> RequestFeatures {
        RequestFeatures {
            prompt: PromptFeatures::from_text("What is 2 + 3?", 12),
            answer_type,
            max_tokens: 32,
            reasoning_model: false,
        }
    }

    fn energy(joules: f64) -> MeasuredEnergy {
        MeasuredEnergy {
            joules,
            source: EnergySource::Nvml,
            prompt_tokens: 12,
            completion_tokens: 40,
        }
    }

    fn regex_policy(strategy: TtcStrategy) -> TtcPolicy {
        TtcPolicy {
            strategy,
            verifier: Some(VerifierSpec {
                regex: Some(r"^\d+$".into()),
                ..VerifierSpec::default()
            }),
            ..TtcPolicy::default()
        }
    }

    #[test]
    fn a_vote_is_settled_by_the_rows_that_finished_when_the_rest_cannot_change_it()
    -> Result<(), TtcError> {
        let policy = TtcPolicy {
            strategy: TtcStrategy::MajorityVote,
            max_samples: 4,
            early_stop_agreement: 0.75,
            ..TtcPolicy::default()
        };
        let mut controller = TtcController::new(policy, TtcOptions::default())?;
        let session = controller.plan(&features(AnswerType::Number));
        let texts = |answers: &[&str]| answers.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        // Two rows agree: the agreement threshold holds with two votes behind the leader.
        assert!(session.settled_with(&texts(&["5", "5"])));
        // Split, or one vote alone: the running rows could still change the answer.
        assert!(!session.settled_with(&texts(&["5", "7"])));
        assert!(!session.settled_with(&texts(&["5"])));
        // 2 of 3 against 1, with one row left: 2 > 1 + 1 does not hold, agreement 0.67 < 0.75.
        assert!(!session.settled_with(&texts(&["5", "7", "5"])));
        // Best-of-N is settled by its verifier, never by a vote.
        let mut best =
            TtcController::new(regex_policy(TtcStrategy::BestOfN), TtcOptions::default())?;
        let session = best.plan(&features(AnswerType::Number));
        assert!(!session.settled_with(&texts(&["5", "5", "5"])));
        Ok(())
    }

    #[test]
    fn policy_deserialises_from_the_crd_shape_with_its_defaults() -> Result<(), serde_json::Error> {
        let policy: TtcPolicy = serde_json::from_str(
            r#"{"strategy":"BestOfN","maxSamples":4,"verifier":{"regex":"^\\d+$"}}"#,
        )?;
        assert_eq!(policy.strategy, TtcStrategy::BestOfN);
        assert_eq!((policy.min_samples, policy.max_samples), (1, 4));
        assert_eq!(policy.max_reasoning_tokens, 1024);
        assert_eq!(policy.early_stop_agreement, 0.75);
        assert!(policy.difficulty_aware);
        let empty: TtcPolicy = serde_json::from_str("{}")?;
        assert_eq!(empty, TtcPolicy::default());
        assert_eq!(empty.strategy, TtcStrategy::Adaptive);
        Ok(())
    }

    #[test]
    fn inconsistent_policies_are_refused_with_the_field_named() {
        let err = |policy: TtcPolicy| match TtcController::new(policy, TtcOptions::default()) {
            Ok(_) => String::from("accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err(TtcPolicy {
                strategy: TtcStrategy::BestOfN,
                ..TtcPolicy::default()
            })
            .contains("needs ttc.verifier")
        );
        assert!(
            err(TtcPolicy {
                min_samples: 5,
                max_samples: 2,
                ..TtcPolicy::default()
            })
            .contains("minSamples")
        );
        assert!(
            err(TtcPolicy {
                max_samples: 0,
                min_samples: 0,
                ..TtcPolicy::default()
            })
            .contains("maxSamples")
        );
        let mut bad_regex = regex_policy(TtcStrategy::BestOfN);
        bad_regex.verifier = Some(VerifierSpec {
            regex: Some("(".into()),
            ..VerifierSpec::default()
        });
        assert!(err(bad_regex).contains("regex does not compile"));
    }

    /// A vote whose greedy answer the samples would retrace learns to open with it alone, and
    /// then stops on it; a weighted vote never does.
    #[test]
    fn a_vote_opens_with_a_confident_greedy_answer_alone_and_stops_on_it() -> Result<(), TtcError> {
        let policy = TtcPolicy {
            strategy: TtcStrategy::MajorityVote,
            difficulty_aware: false,
            ..TtcPolicy::default()
        };
        let mut controller = TtcController::new(policy.clone(), TtcOptions::default())?;
        let sure = Some(0.95f64.ln());
        // Nothing known yet: greedy is the first row of a window of two.
        let mut first = controller.plan(&features(AnswerType::Number));
        assert_eq!(first.first_window(), 2);
        first.add_sample("5", -0.1, 1, sure);
        first.add_sample("6", -2.0, 1, Some(0.01f64.ln()));
        assert!(matches!(first.decide(), WindowDecision::Stop { .. }));
        let outcome = first.finish(energy(2.0));
        assert_eq!(outcome.greedy_settles, Some(true));
        assert_eq!(outcome.answer.as_deref(), Some("5"));
        controller.record(&outcome);
        // Now greedy opens alone and settles the vote by itself.
        let mut second = controller.plan(&features(AnswerType::Number));
        assert!(second.plan().greedy_alone);
        assert_eq!(second.first_window(), 1);
        second.add_sample("5", -0.1, 1, sure);
        assert_eq!(
            second.decide(),
            WindowDecision::Stop {
                reason: StopReason::Confident
            }
        );
        assert_eq!(second.finish(energy(1.0)).samples, 1);
        // Weighted votes keep sampling: a majority of samples need not carry the weight.
        let mut weighted = TtcController::new(
            policy.clone(),
            TtcOptions {
                weighting: VoteWeighting::SequenceLogprob,
                ..TtcOptions::default()
            },
        )?;
        let mut session = weighted.plan(&features(AnswerType::Number));
        assert!(!session.plan().greedy_alone);
        session.add_sample("5", -0.1, 1, sure);
        assert!(matches!(session.decide(), WindowDecision::Continue { .. }));
        // Nor does a policy that turns it off (stopConfidence 1).
        let mut off = TtcController::new(
            TtcPolicy {
                stop_confidence: 1.0,
                ..policy
            },
            TtcOptions::default(),
        )?;
        let mut session = off.plan(&features(AnswerType::Number));
        session.add_sample("5", -0.1, 1, sure);
        assert!(matches!(session.decide(), WindowDecision::Continue { .. }));
        assert_eq!(session.finish(energy(1.0)).greedy_settles, Some(false));
        Ok(())
    }

    /// Requests whose windows never agree early teach the controller to draw one batch.
    #[test]
    fn a_pod_whose_windows_never_stop_early_draws_one_batch() -> Result<(), TtcError> {
        let mut controller = TtcController::new(
            TtcPolicy {
                strategy: TtcStrategy::MajorityVote,
                difficulty_aware: false,
                ..TtcPolicy::default()
            },
            TtcOptions::default(),
        )?;
        for i in 0..8 {
            let mut session = controller.plan(&features(AnswerType::Number));
            assert_eq!(session.first_window(), 2, "request {i}");
            let mut answer = 0;
            loop {
                // Every sample a different answer: the vote never agrees.
                for _ in 0..session.first_window().min(2) {
                    answer += 1;
                    session.add_sample(&answer.to_string(), -1.0, 2, None);
                }
                if matches!(session.decide(), WindowDecision::Stop { .. }) {
                    break;
                }
            }
            let outcome = session.finish(energy(5.0));
            assert_eq!((outcome.samples, outcome.window), (8, 2));
            controller.record(&outcome);
        }
        assert!(controller.report().windows.batching);
        let session = controller.plan(&features(AnswerType::Number));
        assert_eq!(session.first_window(), 8, "one batch of the whole limit");
        assert_eq!(session.plan().window, 8);
        Ok(())
    }

    #[test]
    fn majority_vote_session_stops_on_agreement_and_returns_the_best_winning_sample()
    -> Result<(), TtcError> {
        let mut controller = TtcController::new(
            TtcPolicy {
                strategy: TtcStrategy::MajorityVote,
                ..TtcPolicy::default()
            },
            TtcOptions::default(),
        )?;
        let mut session = controller.plan(&features(AnswerType::Number));
        assert_eq!(session.plan().strategy, PlannedStrategy::MajorityVote);
        assert_eq!(
            session.plan().max_samples,
            8,
            "no allocation: the policy maximum"
        );
        assert_eq!(session.plan().budget_state, BudgetState::Unbounded);
        assert_eq!(session.first_window(), 2);
        session.add_sample("2 + 3 = 6", -3.0, 6, None);
        session.add_sample("5", -0.5, 1, None);
        assert_eq!(session.decide(), WindowDecision::Continue { samples: 2 });
        session.add_sample("The answer is 5.", -2.0, 4, None);
        session.add_sample("5", -0.2, 1, None);
        assert_eq!(
            session.decide(),
            WindowDecision::Stop {
                reason: StopReason::Agreement
            }
        );
        // Deciding again does not draw more.
        assert!(matches!(session.decide(), WindowDecision::Stop { .. }));
        let outcome = session.finish(energy(7.5));
        assert_eq!(outcome.answer.as_deref(), Some("5"));
        assert_eq!(
            outcome.chosen_index,
            Some(3),
            "the most probable sample saying 5"
        );
        assert_eq!((outcome.samples, outcome.windows), (4, 2));
        assert_eq!(outcome.stop_reason, Some(StopReason::Agreement));
        assert_eq!(outcome.agreement, Some(0.75));
        assert_eq!(outcome.verified, None);
        assert_eq!(outcome.answers[0].as_deref(), Some("6"));
        assert!(
            outcome.difficulty > 0.2,
            "split first window: {}",
            outcome.difficulty
        );
        controller.record(&outcome);
        let report = controller.report();
        assert_eq!(report.requests, 1);
        assert_eq!(report.depth_value.observed, 1);
        assert_eq!(report.depth_value.answer_changes, 1);
        Ok(())
    }

    #[tokio::test]
    async fn best_of_n_opens_batched_where_greedy_is_usually_rejected() -> Result<(), TtcError> {
        let mut controller =
            TtcController::new(regex_policy(TtcStrategy::BestOfN), TtcOptions::default())?;
        let verifier = controller
            .verifier()
            .ok_or(TtcError::BestOfNWithoutVerifier)?;
        for _ in 0..5 {
            let mut session = controller.plan(&features(AnswerType::Number));
            // Greedy says "five" (rejected), the next sample "5" (accepted).
            for text in ["five", "5"].iter().take(session.first_window()) {
                let i = session.add_sample(text, -1.0, 2, None);
                session.add_verdict(i, verifier.verify("What is 2 + 3?", text).await);
            }
            if let WindowDecision::Continue { .. } = session.decide() {
                let i = session.add_sample("5", -1.0, 2, None);
                session.add_verdict(i, verifier.verify("What is 2 + 3?", "5").await);
                session.decide();
            }
            let outcome = session.finish(energy(2.0));
            assert_eq!(outcome.chosen_index, Some(1));
            controller.record(&outcome);
        }
        let session = controller.plan(&features(AnswerType::Number));
        assert!(session.greedy_first() && !session.plan().greedy_alone);
        assert_eq!(
            session.first_window(),
            2,
            "greedy as the first row of a window"
        );
        Ok(())
    }

    #[tokio::test]
    async fn best_of_n_stops_at_the_first_accepted_candidate() -> Result<(), TtcError> {
        let mut controller =
            TtcController::new(regex_policy(TtcStrategy::BestOfN), TtcOptions::default())?;
        let verifier = controller
            .verifier()
            .ok_or(TtcError::BestOfNWithoutVerifier)?;
        let mut session = controller.plan(&features(AnswerType::Number));
        assert!(session.needs_verdicts());
        // It opens with its greedy candidate alone (nothing is known yet), then samples in
        // windows.
        assert!(session.greedy_first() && session.plan().greedy_alone);
        assert_eq!(session.first_window(), 1);
        let mut drawn = Vec::new();
        let mut n = session.first_window();
        let script = ["five", "it is 5", "5", "6"];
        loop {
            for _ in 0..n {
                let text = script[drawn.len()];
                let i = session.add_sample(text, -1.0, 2, None);
                session.add_verdict(i, verifier.verify("What is 2 + 3?", text).await);
                drawn.push(text);
            }
            match session.decide() {
                WindowDecision::Continue { samples } => n = samples,
                WindowDecision::Stop { reason } => {
                    assert_eq!(reason, StopReason::Accepted);
                    break;
                }
            }
        }
        assert_eq!(
            drawn.len(),
            3,
            "one greedy candidate, then a window of two: the accepted third sample ends it"
        );
        let outcome = session.finish(energy(3.0));
        assert_eq!(outcome.chosen_index, Some(2));
        assert_eq!(outcome.answer.as_deref(), Some("5"));
        assert_eq!(outcome.verified, Some(true));
        Ok(())
    }

    #[test]
    fn best_of_n_without_an_acceptance_falls_back_and_says_unverified() -> Result<(), TtcError> {
        let mut controller = TtcController::new(
            TtcPolicy {
                max_samples: 3,
                ..regex_policy(TtcStrategy::BestOfN)
            },
            TtcOptions::default(),
        )?;
        // Scored rejections (an HTTP verifier below its threshold): the best score wins.
        let mut session = controller.plan(&features(AnswerType::Number));
        for (i, score) in [0.1, 0.4, 0.2].into_iter().enumerate() {
            let index = session.add_sample(&format!("{i}0"), -1.0, 2, None);
            session.add_verdict(index, Verdict::reject("low", Some(score)));
        }
        assert_eq!(
            session.decide(),
            WindowDecision::Stop {
                reason: StopReason::MaxSamples
            }
        );
        let outcome = session.finish(energy(3.0));
        assert_eq!(
            (outcome.chosen_index, outcome.answer.as_deref()),
            (Some(1), Some("10"))
        );
        assert_eq!(outcome.verified, Some(false));
        // Unscored rejections: the vote decides.
        let mut session = controller.plan(&features(AnswerType::Number));
        for text in ["7", "8", "8"] {
            let index = session.add_sample(text, -1.0, 2, None);
            session.add_verdict(index, Verdict::reject("no", None));
        }
        session.decide();
        let outcome = session.finish(energy(3.0));
        assert_eq!(outcome.answer.as_deref(), Some("8"));
        assert_eq!(outcome.chosen_index, Some(1));
        assert_eq!(outcome.verified, Some(false));
        Ok(())
    }

    #[test]
    fn adaptive_resolves_by_verifier_and_model_and_reasoning_is_budgeted() -> Result<(), TtcError> {
        let mut with_verifier =
            TtcController::new(regex_policy(TtcStrategy::Adaptive), TtcOptions::default())?;
        assert_eq!(
            with_verifier
                .plan(&features(AnswerType::Number))
                .plan()
                .strategy,
            PlannedStrategy::BestOfN
        );
        let mut plain = TtcController::new(TtcPolicy::default(), TtcOptions::default())?;
        assert_eq!(
            plain.plan(&features(AnswerType::Number)).plan().strategy,
            PlannedStrategy::MajorityVote
        );
        let mut reasoning = features(AnswerType::Number);
        reasoning.reasoning_model = true;
        plain.set_allocation(Some(50.0));
        let mut session = plain.plan(&reasoning);
        let plan = session.plan().clone();
        assert_eq!(plan.strategy, PlannedStrategy::ReasoningBudget);
        let tokens = plan.reasoning_tokens.unwrap_or(0);
        assert!((1..=1024).contains(&tokens), "{plan:?}");
        assert_eq!(plan.max_tokens, 32 + tokens);
        assert_eq!((plan.max_samples, session.first_window()), (1, 1));
        assert_eq!(plan.budget_state, BudgetState::Tracking);
        session.add_sample("<think>2 and 3</think> 5", -4.0, 40, None);
        assert_eq!(
            session.decide(),
            WindowDecision::Stop {
                reason: StopReason::MaxSamples
            }
        );
        let outcome = session.finish(energy(20.0));
        assert_eq!(outcome.answer.as_deref(), Some("5"));
        assert_eq!(outcome.reasoning_tokens, Some(tokens));
        Ok(())
    }

    #[test]
    fn plans_and_outcomes_serialise_for_responses_and_metrics()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut controller = TtcController::new(TtcPolicy::default(), TtcOptions::default())?;
        controller.set_allocation(Some(5.0));
        let mut session = controller.plan(&features(AnswerType::YesNo));
        let plan_json = serde_json::to_value(session.plan())?;
        assert_eq!(plan_json["strategy"], "MajorityVote");
        assert_eq!(plan_json["answerType"]["type"], "yesNo");
        assert!(plan_json["maxSamples"].is_u64());
        session.add_sample("Yes", -0.1, 1, None);
        session.add_sample("yes.", -0.1, 2, None);
        session.decide();
        let outcome = session.finish(energy(4.0));
        let json = serde_json::to_string(&outcome)?;
        let back: TtcOutcome = serde_json::from_str(&json)?;
        assert_eq!(back, outcome);
        assert!(json.contains(r#""energySource":"nvml""#), "{json}");
        controller.record(&outcome);
        let report = serde_json::to_value(controller.report())?;
        assert_eq!(report["budget"]["allocationJoulesPerRequest"], 5.0);
        assert_eq!(report["depthValue"]["observed"], 1);
        Ok(())
    }
}
