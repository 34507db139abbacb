//! Stopping rules: sample in small windows and stop as soon as more samples are unlikely to
//! change the answer (Early-Stopping Self-Consistency and Adaptive-Consistency style).

use serde::{Deserialize, Serialize};

use crate::vote::Vote;

/// Default early-stop agreement (the InferencePolicy default).
pub const DEFAULT_EARLY_STOP_AGREEMENT: f64 = 0.75;

/// Default confidence of the confident stop ([`StoppingRule::confidence`]).
pub const DEFAULT_STOP_CONFIDENCE: f64 = 0.95;

/// When to stop drawing samples for one request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoppingRule {
    /// Never stop before this many samples.
    pub min_samples: usize,
    /// Never draw more than this many samples.
    pub max_samples: usize,
    /// Samples drawn per window (the batch the engine generates at once).
    pub window: usize,
    /// Stop once the leading answer holds at least this share of the samples (0.5-1.0);
    /// 1.0 means only a unanimous window stops early (ESC).
    pub agreement: f64,
    /// Stop once the model's own probabilities make it at least this likely that the vote of all
    /// `max_samples` would give the leading answer too (1.0: never). Each further sample gives
    /// the leader at least [`Vote::winner_floor`] of the time (the chance it retraces one of the
    /// leader's samples token for token), so the full vote is the leader's at least as often as
    /// that many draws give it a strict majority. This is what lets a confident greedy answer
    /// settle a vote alone: where each sample retraces the greedy answer with 80%, at least 4
    /// of the 7 more samples of a vote of 8 do so 97% of the time. Only valid for votes of one
    /// sample one vote.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
}

fn default_confidence() -> f64 {
    DEFAULT_STOP_CONFIDENCE
}

/// Why sampling stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StopReason {
    /// The leading answer reached the agreement threshold.
    Agreement,
    /// The leading answer cannot be overtaken by the samples still allowed.
    Decided,
    /// The samples still allowed would almost surely keep the leading answer, by the model's own
    /// probabilities ([`StoppingRule::confidence`]).
    Confident,
    /// A verifier accepted a candidate (best-of-N).
    Accepted,
    /// The plan's sample limit was reached.
    MaxSamples,
}

impl StopReason {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Agreement => "agreement",
            Self::Decided => "decided",
            Self::Confident => "confident",
            Self::Accepted => "accepted",
            Self::MaxSamples => "max_samples",
        }
    }
}

/// What to do after a window of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum WindowDecision {
    /// Draw `samples` more.
    Continue {
        /// How many samples the next window draws.
        samples: usize,
    },
    /// Stop sampling.
    Stop {
        /// Why.
        reason: StopReason,
    },
}

impl StoppingRule {
    /// A rule with its fields made consistent: at least one sample, `min <= max`, a window of at
    /// least one, agreement within 0.5-1.0.
    pub fn new(min_samples: usize, max_samples: usize, window: usize, agreement: f64) -> Self {
        let max_samples = max_samples.max(1);
        let agreement = if agreement.is_finite() {
            agreement.clamp(0.5, 1.0)
        } else {
            DEFAULT_EARLY_STOP_AGREEMENT
        };
        Self {
            min_samples: min_samples.clamp(1, max_samples),
            max_samples,
            window: window.clamp(1, max_samples),
            agreement,
            confidence: DEFAULT_STOP_CONFIDENCE,
        }
    }

    /// The rule with the confident stop at `confidence` (clamped to 0.5-1.0; 1.0 turns it off).
    pub fn with_confidence(self, confidence: f64) -> Self {
        Self {
            confidence: if confidence.is_finite() {
                confidence.clamp(0.5, 1.0)
            } else {
                DEFAULT_STOP_CONFIDENCE
            },
            ..self
        }
    }

    /// The chance, at least, that the vote of all `max_samples` gives the leader of `vote` (after
    /// `drawn` samples): that the samples still allowed, each giving it with chance
    /// [`Vote::winner_floor`] at least, bring it to a strict majority.
    pub fn chance_to_hold(&self, drawn: usize, vote: &Vote) -> f64 {
        let needed = (self.max_samples / 2 + 1).saturating_sub(vote.votes);
        let remaining = self.max_samples.saturating_sub(drawn);
        binomial_tail(remaining, vote.winner_floor.clamp(0.0, 1.0), needed)
    }

    /// How many samples the first window draws.
    pub fn first_window(&self) -> usize {
        self.window.max(self.min_samples).min(self.max_samples)
    }

    /// Decides after `drawn` samples whose vote is `vote` (`None`: no sample had an answer).
    ///
    /// Agreement needs at least two samples behind the leader: one sample agreeing with itself
    /// says nothing about the next one (unless the plan allows only one).
    pub fn decide(&self, drawn: usize, vote: Option<&Vote>) -> WindowDecision {
        if drawn >= self.max_samples {
            return WindowDecision::Stop {
                reason: StopReason::MaxSamples,
            };
        }
        if drawn >= self.min_samples
            && let Some(vote) = vote
        {
            let remaining = self.max_samples - drawn;
            if vote.votes >= 2 && vote.agreement + 1e-9 >= self.agreement {
                return WindowDecision::Stop {
                    reason: StopReason::Agreement,
                };
            }
            if vote.votes > vote.runner_up_votes + remaining {
                return WindowDecision::Stop {
                    reason: StopReason::Decided,
                };
            }
            if self.confidence < 1.0 && self.chance_to_hold(drawn, vote) >= self.confidence {
                return WindowDecision::Stop {
                    reason: StopReason::Confident,
                };
            }
        }
        let needed_for_min = self.min_samples.saturating_sub(drawn);
        let samples = self
            .window
            .max(needed_for_min)
            .min(self.max_samples - drawn);
        WindowDecision::Continue { samples }
    }
}

/// P(X >= k) for X ~ Binomial(n, p).
fn binomial_tail(n: usize, p: f64, k: usize) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    // P(X = i) by the recurrence P(i + 1) = P(i) (n - i) p / ((i + 1) (1 - p)), from P(0).
    if p >= 1.0 {
        return 1.0;
    }
    let mut term = (1.0 - p).powi(n as i32);
    let mut below = 0.0;
    for i in 0..k {
        below += term;
        term *= (n - i) as f64 * p / ((i + 1) as f64 * (1.0 - p));
    }
    (1.0 - below).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vote::{Candidate, VoteWeighting, majority_vote};

    fn vote_of(answers: &[&str]) -> Option<Vote> {
        let cands: Vec<Candidate> = answers
            .iter()
            .map(|a| Candidate {
                answer: (!a.is_empty()).then(|| a.to_string()),
                logprob: -1.0,
                tokens: 1,
                retrace_logprob: None,
            })
            .collect();
        majority_vote(&cands, VoteWeighting::Uniform)
    }

    #[test]
    fn unanimous_window_stops() {
        let rule = StoppingRule::new(1, 8, 2, 0.75);
        assert_eq!(rule.first_window(), 2);
        let v = vote_of(&["4", "4"]);
        assert_eq!(
            rule.decide(2, v.as_ref()),
            WindowDecision::Stop {
                reason: StopReason::Agreement
            }
        );
    }

    #[test]
    fn split_window_continues_by_a_window() {
        let rule = StoppingRule::new(1, 8, 2, 0.75);
        let v = vote_of(&["4", "5"]);
        assert_eq!(
            rule.decide(2, v.as_ref()),
            WindowDecision::Continue { samples: 2 }
        );
        // 3 of 4 agree: 0.75 meets the threshold.
        let v = vote_of(&["4", "5", "4", "4"]);
        assert_eq!(
            rule.decide(4, v.as_ref()),
            WindowDecision::Stop {
                reason: StopReason::Agreement
            }
        );
        // A stricter threshold keeps going.
        let strict = StoppingRule::new(1, 8, 2, 0.9);
        assert_eq!(
            strict.decide(4, v.as_ref()),
            WindowDecision::Continue { samples: 2 }
        );
    }

    #[test]
    fn unparsed_samples_count_against_agreement() {
        let rule = StoppingRule::new(1, 8, 2, 0.75);
        let v = vote_of(&["4", "4", "", ""]);
        assert!(matches!(
            rule.decide(4, v.as_ref()),
            WindowDecision::Continue { .. }
        ));
        assert_eq!(
            rule.decide(4, None),
            WindowDecision::Continue { samples: 2 }
        );
    }

    #[test]
    fn min_and_max_are_obeyed() {
        let rule = StoppingRule::new(4, 6, 2, 0.5);
        assert_eq!(rule.first_window(), 4);
        // Unanimous but below the minimum: continue to the minimum.
        let v = vote_of(&["1", "1"]);
        assert_eq!(
            rule.decide(2, v.as_ref()),
            WindowDecision::Continue { samples: 2 }
        );
        // The last window is cut to the maximum.
        let v = vote_of(&["1", "2", "3", "4", "5"]);
        assert_eq!(
            rule.decide(5, v.as_ref()),
            WindowDecision::Continue { samples: 1 }
        );
        assert_eq!(
            rule.decide(6, v.as_ref()),
            WindowDecision::Stop {
                reason: StopReason::MaxSamples
            }
        );
    }

    #[test]
    fn a_lead_that_cannot_be_overtaken_stops() {
        // 2 of 3 at threshold 1.0 is not agreement, but one sample left cannot overturn 2 vs 0.
        let rule = StoppingRule::new(1, 4, 1, 1.0);
        let v = vote_of(&["7", "7", ""]);
        assert_eq!(
            rule.decide(3, v.as_ref()),
            WindowDecision::Stop {
                reason: StopReason::Decided
            }
        );
        let v = vote_of(&["7", "7", "8"]);
        assert_eq!(
            rule.decide(3, v.as_ref()),
            WindowDecision::Continue { samples: 1 }
        );
    }

    #[test]
    fn binomial_tails_match_hand_computed_ones() {
        assert_eq!(binomial_tail(7, 0.3, 0), 1.0);
        assert_eq!(binomial_tail(3, 0.9, 4), 0.0);
        assert!((binomial_tail(1, 0.3, 1) - 0.3).abs() < 1e-12);
        // P(Bin(3, 0.5) >= 2) = 4 / 8.
        assert!((binomial_tail(3, 0.5, 2) - 0.5).abs() < 1e-12);
        // P(Bin(7, 0.9) >= 4) = 0.99727.
        assert!((binomial_tail(7, 0.9, 4) - 0.997_272).abs() < 1e-5);
        assert_eq!(binomial_tail(7, 1.0, 7), 1.0);
        assert_eq!(binomial_tail(7, 0.0, 1), 0.0);
    }

    fn greedy_vote(retrace: f64) -> Option<Vote> {
        let greedy = Candidate {
            answer: Some("4".into()),
            logprob: -0.1,
            tokens: 3,
            retrace_logprob: Some(retrace.ln()),
        };
        majority_vote(&[greedy], VoteWeighting::Uniform)
    }

    #[test]
    fn a_greedy_answer_samples_would_retrace_settles_the_vote_alone() {
        let rule = StoppingRule::new(1, 8, 2, 0.75);
        // 7 more samples, each retracing greedy with 0.9: 4 or more do with 99.7%.
        assert_eq!(
            rule.decide(1, greedy_vote(0.9).as_ref()),
            WindowDecision::Stop {
                reason: StopReason::Confident
            }
        );
        // With 0.6 they do only 71% of the time: sample on.
        let unsure = greedy_vote(0.6);
        assert!(
            unsure
                .as_ref()
                .is_some_and(|v| (rule.chance_to_hold(1, v) - 0.710).abs() < 1e-3)
        );
        assert_eq!(
            rule.decide(1, unsure.as_ref()),
            WindowDecision::Continue { samples: 2 }
        );
        // Off at 1.0, and never below the minimum.
        let off = rule.with_confidence(1.0);
        assert_eq!(
            off.decide(1, greedy_vote(0.99).as_ref()),
            WindowDecision::Continue { samples: 2 }
        );
        let at_least_two = StoppingRule::new(2, 8, 2, 0.75);
        assert_eq!(
            at_least_two.decide(1, greedy_vote(0.99).as_ref()),
            WindowDecision::Continue { samples: 2 }
        );
        assert_eq!(
            rule.with_confidence(f64::NAN).confidence,
            DEFAULT_STOP_CONFIDENCE
        );
        assert_eq!(rule.with_confidence(0.1).confidence, 0.5);
    }

    #[test]
    fn constructor_repairs_inconsistent_bounds() {
        let rule = StoppingRule::new(9, 0, 0, 3.0);
        assert_eq!(rule.max_samples, 1);
        assert_eq!(rule.min_samples, 1);
        assert_eq!(rule.window, 1);
        assert_eq!(rule.agreement, 1.0);
        assert_eq!(StoppingRule::new(1, 4, 2, f64::NAN).agreement, 0.75);
    }
}
