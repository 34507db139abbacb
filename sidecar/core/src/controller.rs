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
//! [`crate::reasoning::BudgetForcing::forced_suffix`] is appended and the sample continues for
//! the answer (`plan.max_tokens` covers both; the sidecar does this). A request that is planned but never runs is
//! handed back with [`TtcController::abandon`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::budget::{
    BudgetController, BudgetReport, BudgetState, DepthBounds, DepthRequest, DepthUnit,
    FinishedRequest, WindowShape,
};
use crate::cost::CostObservation;
use crate::difficulty::{DepthClass, DepthValueLearner, DepthValueReport, DifficultySignal};
use crate::feedback::{Feedback, FeedbackError, FeedbackTicket, SeenTickets};
use crate::opening::GreedyOpening;
use crate::outcome::{FeedbackReceipt, TtcOutcome};
use crate::plan::{Effort, PlannedStrategy, RequestFeatures, TtcPlan};
use crate::policy::{TtcError, TtcOptions, TtcPolicy, TtcStrategy};
use crate::session::TtcSession;
use crate::stopping::StoppingRule;
use crate::verifier::{ScoreTransport, Verifier};
use crate::vote::VoteWeighting;
use crate::windows::{WindowLearner, WindowReport};

/// Test-time compute of one pod: the policy, the budget controller and the depth-value learner.
#[derive(Debug)]
pub struct TtcController {
    policy: TtcPolicy,
    options: TtcOptions,
    /// Carries HTTP verifiers' calls (the sidecar's HTTP client); `None`: no HTTP verifier.
    transport: Option<Arc<dyn ScoreTransport>>,
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

/// Builds the policy's verifier, if it has one.
fn build_verifier(
    policy: &TtcPolicy,
    transport: &Option<Arc<dyn ScoreTransport>>,
) -> Result<Option<Arc<Verifier>>, TtcError> {
    Ok(match &policy.verifier {
        Some(spec) => Some(Arc::new(Verifier::from_spec(spec, transport.clone())?)),
        None => None,
    })
}

impl TtcController {
    /// A controller for `policy`, without HTTP verifiers; fails when the verifier is invalid.
    pub fn new(policy: TtcPolicy, options: TtcOptions) -> Result<Self, TtcError> {
        Self::with_transport(policy, options, None)
    }

    /// A controller whose HTTP verifiers call their endpoints through `transport`.
    pub fn with_transport(
        policy: TtcPolicy,
        options: TtcOptions,
        transport: Option<Arc<dyn ScoreTransport>>,
    ) -> Result<Self, TtcError> {
        let verifier = build_verifier(&policy, &transport)?;
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
            transport,
            verifier,
            requests: 0,
        })
    }

    /// Replaces the policy, keeping what was learned; on error the old policy stays.
    pub fn set_policy(&mut self, policy: TtcPolicy) -> Result<(), TtcError> {
        self.verifier = build_verifier(&policy, &self.transport)?;
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
            // Without a verifier (a policy the InferencePolicy's rules would refuse) best-of-N
            // could accept nothing: it votes.
            TtcStrategy::BestOfN if self.verifier.is_none() => PlannedStrategy::MajorityVote,
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
        let high = features.effort == Some(Effort::High);
        let depth_worthless = aware && !probe && !high && !self.learner.depth_pays_for(class);
        let value = if aware && !high {
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
                    self.policy.sample_floor() <= 1 && self.stop_confidence() < 1.0
                }
                PlannedStrategy::ReasoningBudget => false,
            };
        let choice = self.budget.choose(&DepthRequest {
            prompt_tokens: features.prompt.prompt_tokens,
            unit,
            bounds: DepthBounds {
                min_samples: self.policy.sample_floor(),
                max_samples: self.policy.sample_limit(),
                min_reasoning_tokens: self.policy.reasoning_floor(),
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
                    .batch_from(self.options.window, self.policy.sample_limit()),
            },
        });
        let (min_samples, max_samples, reasoning_tokens) = match strategy {
            // Budget forcing spends the depth on one sample's reasoning.
            PlannedStrategy::ReasoningBudget => (1, 1, Some(choice.reasoning_tokens)),
            _ => (
                self.policy.sample_floor().min(choice.samples).max(1),
                choice.samples.max(1),
                None,
            ),
        };
        // The client's effort and reasoning budget, within the policy's range.
        let (max_samples, reasoning_tokens) = match features.effort {
            Some(Effort::Low) => (
                min_samples,
                reasoning_tokens.map(|_| self.policy.reasoning_floor()),
            ),
            _ => (max_samples, reasoning_tokens),
        };
        let reasoning_tokens = reasoning_tokens.map(|t| match features.reasoning_budget {
            Some(budget) => t.min(budget).max(self.policy.reasoning_floor()),
            None => t,
        });
        let mut max_samples = max_samples;
        // Under load, depth goes first: down to what the pod has room for, never below minimum.
        let allowed = max_samples;
        if let Some(limit) = features.row_limit {
            max_samples = max_samples.min(limit).max(min_samples);
        }
        let shed_samples = allowed - max_samples;
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
            shed_samples,
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
    use crate::*;

    fn features(answer_type: AnswerType) -> RequestFeatures {
        RequestFeatures {
            prompt: PromptFeatures::from_text("What is 2 + 3?", 12),
            answer_type,
            max_tokens: 32,
            reasoning_model: false,
            row_limit: None,
            effort: None,
            reasoning_budget: None,
        }
    }

    fn energy(joules: f64) -> MeasuredEnergy {
        MeasuredEnergy {
            joules,
            prompt_tokens: 12,
            completion_tokens: 40,
        }
    }

    fn regex_policy(strategy: TtcStrategy) -> TtcPolicy {
        TtcPolicy {
            strategy,
            verifier: Some(VerifierSpec::Regex(r"^\d+$".into())),
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

    /// A client's effort and reasoning budget move depth within the policy's range, never out
    /// of it.
    #[test]
    fn effort_and_reasoning_budget_stay_within_the_policy() -> Result<(), TtcError> {
        let vote = TtcPolicy {
            strategy: TtcStrategy::MajorityVote,
            min_samples: 2,
            max_samples: 6,
            difficulty_aware: false,
            ..TtcPolicy::default()
        };
        let mut controller = TtcController::new(vote, TtcOptions::default())?;
        let plan = |c: &mut TtcController, effort| {
            c.plan(&RequestFeatures {
                effort,
                ..features(AnswerType::Number)
            })
            .plan()
            .clone()
        };
        let low = plan(&mut controller, Some(Effort::Low));
        assert_eq!((low.min_samples, low.max_samples), (2, 2));
        let high = plan(&mut controller, Some(Effort::High));
        assert_eq!(high.max_samples, 6, "no budget: the policy's most");
        let reasoning = TtcPolicy {
            strategy: TtcStrategy::ReasoningBudget,
            min_reasoning_tokens: 16,
            max_reasoning_tokens: 512,
            difficulty_aware: false,
            ..TtcPolicy::default()
        };
        let mut controller = TtcController::new(reasoning, TtcOptions::default())?;
        for (budget, expected) in [(Some(64), 64), (Some(4), 16), (None, 512)] {
            let session = controller.plan(&RequestFeatures {
                reasoning_budget: budget,
                ..features(AnswerType::Number)
            });
            assert_eq!(
                session.plan().reasoning_tokens,
                Some(expected),
                "{budget:?}"
            );
        }
        let low = controller.plan(&RequestFeatures {
            effort: Some(Effort::Low),
            ..features(AnswerType::Number)
        });
        assert_eq!(low.plan().reasoning_tokens, Some(16));
        Ok(())
    }

    #[test]
    fn unchecked_policies_are_clamped_and_only_unbuildable_verifiers_refused()
    -> Result<(), TtcError> {
        let plan = |policy: TtcPolicy| -> Result<TtcPlan, TtcError> {
            let mut controller = TtcController::new(policy, TtcOptions::default())?;
            Ok(controller
                .plan(&features(AnswerType::Number))
                .plan()
                .clone())
        };
        let best = plan(TtcPolicy {
            strategy: TtcStrategy::BestOfN,
            ..TtcPolicy::default()
        })?;
        assert_eq!(best.strategy, PlannedStrategy::MajorityVote);
        let crossed = plan(TtcPolicy {
            min_samples: 5,
            max_samples: 2,
            ..TtcPolicy::default()
        })?;
        assert!(crossed.min_samples <= crossed.max_samples && crossed.max_samples <= 2);
        let none = plan(TtcPolicy {
            max_samples: 0,
            min_samples: 0,
            ..TtcPolicy::default()
        })?;
        assert_eq!((none.min_samples, none.max_samples), (1, 1));
        let mut bad_regex = regex_policy(TtcStrategy::BestOfN);
        bad_regex.verifier = Some(VerifierSpec::Regex("(".into()));
        match TtcController::new(bad_regex, TtcOptions::default()) {
            Ok(_) => panic!("a regex that does not compile was accepted"),
            Err(e) => assert!(e.to_string().contains("regex does not compile"), "{e}"),
        }
        Ok(())
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
        let Some(verifier) = controller.verifier() else {
            panic!("the policy has a verifier")
        };
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
        let Some(verifier) = controller.verifier() else {
            panic!("the policy has a verifier")
        };
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
        controller.record(&outcome);
        let report = serde_json::to_value(controller.report())?;
        assert_eq!(report["budget"]["allocationJoulesPerRequest"], 5.0);
        assert_eq!(report["depthValue"]["observed"], 1);
        Ok(())
    }
}
