//! One request in progress: samples and verdicts in, a decision after each window, the outcome
//! at the end.

use crate::answer::extract_answer;
use crate::difficulty::DifficultySignal;
use crate::outcome::{MeasuredEnergy, TtcOutcome};
use crate::plan::{PlannedStrategy, TtcPlan};
use crate::stopping::{StopReason, StoppingRule, WindowDecision};
use crate::verifier::Verdict;
use crate::vote::{Candidate, majority_vote};

/// One request in progress: collects samples and verdicts, decides after each window.
#[derive(Debug, Clone)]
pub struct TtcSession {
    pub(crate) plan: TtcPlan,
    pub(crate) rule: StoppingRule,
    pub(crate) candidates: Vec<Candidate>,
    pub(crate) verdicts: Vec<Option<Verdict>>,
    pub(crate) signal: DifficultySignal,
    pub(crate) windows: usize,
    pub(crate) window_start: usize,
    /// Decode passes of the windows closed so far (each window's longest sample).
    pub(crate) decode_passes: usize,
    pub(crate) stop: Option<StopReason>,
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
    /// ([`crate::feedback`]). It is also the model's most likely answer: right more often than
    /// a sample (yes/no facts on the default model: 50% against 37% at temperature 0.7; 60% of
    /// single-digit additions against 38%). Best-of-N opens with it alone, or next to sampled
    /// rows where greedy is usually rejected ([`crate::opening`]); a vote counts it as one of
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
            shed_samples: self.plan.shed_samples,
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
            prompt_tokens: energy.prompt_tokens,
            completion_tokens: energy.completion_tokens,
            feedback_ticket: None,
            greedy_settles,
        }
    }
}
