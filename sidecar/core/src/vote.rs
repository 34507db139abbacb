//! Voting over sampled answers: majority vote, optionally weighted by each sample's
//! log-probability, with the agreement ratio the stopping rules read.

use serde::{Deserialize, Serialize};

/// One sampled answer as a vote sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The normalised answer, `None` when none could be extracted.
    pub answer: Option<String>,
    /// Sum of the sampled tokens' log-probabilities.
    pub logprob: f64,
    /// Number of generated tokens.
    pub tokens: usize,
    /// Log-probability that one more sample of the request retraces this one token for token
    /// (its tokens priced under the sampling distribution); `None` when not known.
    #[serde(default)]
    pub retrace_logprob: Option<f64>,
}

impl Candidate {
    /// The sample's length-normalised probability: the geometric mean of its token
    /// probabilities, in (0, 1]. Normalised by length so that short answers do not win merely for
    /// having fewer tokens to be unlikely over.
    pub fn mean_token_probability(&self) -> f64 {
        let tokens = self.tokens.max(1) as f64;
        let mean = self.logprob / tokens;
        if mean.is_finite() {
            mean.min(0.0).exp()
        } else {
            0.0
        }
    }
}

/// How votes are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VoteWeighting {
    /// One vote per sample.
    #[default]
    Uniform,
    /// Each sample votes with its length-normalised sequence probability
    /// ([`Candidate::mean_token_probability`]).
    SequenceLogprob,
}

/// The result of a vote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vote {
    /// The winning answer.
    pub answer: String,
    /// Samples that gave the winning answer.
    pub votes: usize,
    /// Votes of the strongest other answer (0 when all valid samples agree).
    pub runner_up_votes: usize,
    /// Total weight of the winning answer (equals `votes` under uniform weighting).
    pub weight: f64,
    /// Share of all samples (including those without an answer) that back the winner, by
    /// weight: 1.0 when every sample gave the winning answer.
    pub agreement: f64,
    /// Samples with an extractable answer.
    pub valid: usize,
    /// All samples counted.
    pub total: usize,
    /// Distinct answers among valid samples.
    pub distinct: usize,
    /// Whether the winner was decided by a tie rule rather than by weight.
    pub tie_broken: bool,
    /// A lower bound on the chance that one more sample gives the winning answer: the summed
    /// retrace probabilities ([`Candidate::retrace_logprob`]) of the distinct samples behind it
    /// (0 when none is known).
    #[serde(default)]
    pub winner_floor: f64,
}

/// Majority vote over `candidates`; `None` when no candidate has an answer.
///
/// Tie rules, in order: larger total weight; then more raw votes; then the higher best
/// single-sample probability; then the answer that appeared first. The result is therefore the
/// same whatever order equal-weight answers are tallied in, except for the final rule, which
/// favours the earliest sample (the one greedy-like decoding would have returned).
pub fn majority_vote(candidates: &[Candidate], weighting: VoteWeighting) -> Option<Vote> {
    struct Tally<'a> {
        answer: &'a str,
        votes: usize,
        weight: f64,
        best_probability: f64,
        first_index: usize,
    }
    let mut tallies: Vec<Tally> = Vec::new();
    let mut total_weight = 0.0;
    for (index, candidate) in candidates.iter().enumerate() {
        let weight = match weighting {
            VoteWeighting::Uniform => 1.0,
            VoteWeighting::SequenceLogprob => candidate.mean_token_probability(),
        };
        total_weight += weight;
        let Some(answer) = candidate.answer.as_deref() else {
            continue;
        };
        let probability = candidate.mean_token_probability();
        match tallies.iter_mut().find(|t| t.answer == answer) {
            Some(t) => {
                t.votes += 1;
                t.weight += weight;
                t.best_probability = t.best_probability.max(probability);
            }
            None => tallies.push(Tally {
                answer,
                votes: 1,
                weight,
                best_probability: probability,
                first_index: index,
            }),
        }
    }
    if tallies.is_empty() {
        return None;
    }
    const EPS: f64 = 1e-12;
    let better = |a: &Tally, b: &Tally| -> (bool, bool) {
        // (a beats b, decided by a tie rule)
        if (a.weight - b.weight).abs() > EPS {
            return (a.weight > b.weight, false);
        }
        if a.votes != b.votes {
            return (a.votes > b.votes, true);
        }
        if (a.best_probability - b.best_probability).abs() > EPS {
            return (a.best_probability > b.best_probability, true);
        }
        (a.first_index < b.first_index, true)
    };
    let mut best = 0;
    let mut tie_broken = false;
    for i in 1..tallies.len() {
        let (wins, tie) = better(&tallies[i], &tallies[best]);
        if wins {
            best = i;
        }
        if tie {
            tie_broken = true;
        }
    }
    // A tie rule only matters if it involved the winner.
    let winner = &tallies[best];
    tie_broken = tie_broken
        && tallies
            .iter()
            .enumerate()
            .any(|(i, t)| i != best && (t.weight - winner.weight).abs() <= EPS);
    let runner_up_votes = tallies
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != best)
        .map(|(_, t)| t.votes)
        .max()
        .unwrap_or(0);
    let agreement = if total_weight > 0.0 {
        winner.weight / total_weight
    } else {
        0.0
    };
    Some(Vote {
        winner_floor: retrace_floor(candidates, winner.answer),
        answer: winner.answer.to_string(),
        votes: winner.votes,
        runner_up_votes,
        weight: winner.weight,
        agreement,
        valid: tallies.iter().map(|t| t.votes).sum(),
        total: candidates.len(),
        distinct: tallies.len(),
        tie_broken,
    })
}

/// Summed retrace probabilities of the distinct samples that gave `answer`: a sample retraces
/// one of these paths with exactly that chance, so it gives `answer` at least that often.
/// Samples count as one path when they have as many tokens and retrace log-probabilities within
/// 0.01 of each other (the same tokens priced in batches of other sizes differ in the last
/// digits); merging two truly distinct paths only lowers the bound.
fn retrace_floor(candidates: &[Candidate], answer: &str) -> f64 {
    let mut paths: Vec<(usize, f64)> = candidates
        .iter()
        .filter(|c| c.answer.as_deref() == Some(answer))
        .filter_map(|c| Some((c.tokens, c.retrace_logprob.filter(|lp| lp.is_finite())?)))
        .collect();
    paths.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    paths.dedup_by(|later, kept| later.0 == kept.0 && (later.1 - kept.1).abs() < 0.01);
    paths
        .iter()
        .map(|(_, lp)| lp.min(0.0).exp())
        .sum::<f64>()
        .min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(answer: Option<&str>, logprob: f64, tokens: usize) -> Candidate {
        Candidate {
            answer: answer.map(str::to_string),
            logprob,
            tokens,
            retrace_logprob: None,
        }
    }
    fn plain(answers: &[Option<&str>]) -> Vec<Candidate> {
        answers.iter().map(|a| c(*a, -1.0, 2)).collect()
    }

    #[test]
    fn majority_wins_and_agreement_counts_unparsed_samples() -> Result<(), String> {
        let cands = plain(&[Some("4"), Some("5"), Some("4"), None]);
        let vote = majority_vote(&cands, VoteWeighting::Uniform).ok_or("no vote")?;
        assert_eq!(vote.answer, "4");
        assert_eq!(vote.votes, 2);
        assert_eq!(vote.runner_up_votes, 1);
        assert_eq!(vote.valid, 3);
        assert_eq!(vote.total, 4);
        assert_eq!(vote.distinct, 2);
        assert!((vote.agreement - 0.5).abs() < 1e-9);
        assert!(!vote.tie_broken);
        Ok(())
    }

    #[test]
    fn no_answers_no_vote() {
        assert!(majority_vote(&plain(&[None, None]), VoteWeighting::Uniform).is_none());
        assert!(majority_vote(&[], VoteWeighting::Uniform).is_none());
    }

    #[test]
    fn ties_go_to_higher_probability_then_first_seen() -> Result<(), String> {
        // Equal votes; "b" has the more probable best sample.
        let cands = vec![c(Some("a"), -4.0, 2), c(Some("b"), -0.2, 2)];
        let vote = majority_vote(&cands, VoteWeighting::Uniform).ok_or("no vote")?;
        assert_eq!(vote.answer, "b");
        assert!(vote.tie_broken);
        // Everything equal: first seen wins, in either order.
        let vote = majority_vote(&plain(&[Some("x"), Some("y")]), VoteWeighting::Uniform)
            .ok_or("no vote")?;
        assert_eq!(vote.answer, "x");
        let vote = majority_vote(&plain(&[Some("y"), Some("x")]), VoteWeighting::Uniform)
            .ok_or("no vote")?;
        assert_eq!(vote.answer, "y");
        assert!(vote.tie_broken);
        Ok(())
    }

    #[test]
    fn logprob_weighting_can_overturn_a_count() -> Result<(), String> {
        // Two unlikely samples say "7", one near-certain sample says "8".
        let cands = vec![
            c(Some("7"), -6.0, 2),
            c(Some("7"), -6.0, 2),
            c(Some("8"), -0.02, 2),
        ];
        let uniform = majority_vote(&cands, VoteWeighting::Uniform).ok_or("no vote")?;
        assert_eq!(uniform.answer, "7");
        let weighted = majority_vote(&cands, VoteWeighting::SequenceLogprob).ok_or("no vote")?;
        assert_eq!(weighted.answer, "8");
        assert!(weighted.agreement > 0.8, "agreement {}", weighted.agreement);
        assert_eq!(weighted.votes, 1);
        Ok(())
    }

    #[test]
    fn mean_token_probability_is_length_normalised() {
        let short = c(Some("a"), -1.0, 1);
        let long = c(Some("a"), -4.0, 4);
        assert!((short.mean_token_probability() - long.mean_token_probability()).abs() < 1e-12);
        assert_eq!(c(None, f64::NEG_INFINITY, 3).mean_token_probability(), 0.0);
        assert!((c(None, 0.0, 0).mean_token_probability() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn the_winner_floor_sums_distinct_retraceable_paths_once() -> Result<(), String> {
        let priced = |answer: &str, retrace: f64, tokens: usize| Candidate {
            retrace_logprob: Some(retrace.ln()),
            ..c(Some(answer), -1.0, tokens)
        };
        let cands = vec![
            priced("4", 0.5, 3),
            // The same path again, priced in a batch of another size.
            priced("4", 0.5005, 3),
            priced("4", 0.25, 5),
            priced("5", 0.2, 3),
            c(Some("4"), -1.0, 4),
        ];
        let vote = majority_vote(&cands, VoteWeighting::Uniform).ok_or("no vote")?;
        assert_eq!(vote.answer, "4");
        assert!(
            (vote.winner_floor - 0.75).abs() < 1e-3,
            "{}",
            vote.winner_floor
        );
        let unpriced =
            majority_vote(&plain(&[Some("4")]), VoteWeighting::Uniform).ok_or("no vote")?;
        assert_eq!(unpriced.winner_floor, 0.0);
        Ok(())
    }
}
