//! How a request opens: its greedy candidate alone, or as the first row of a batch.
//!
//! Best-of-N: the greedy answer is the one a verifier accepts most often, so it is always the
//! first candidate. Alone it costs one short decode and settles the request whenever it is accepted.
//! But a window runs as many decode passes as its longest row, and sampled rows run longer than
//! greedy ones, so where greedy is usually rejected, a greedy decode alone and then a window
//! costs two rounds of passes where one batch would do. Measured on SmolLM2 under the same
//! allocation (40 items each, estimated joules, before a batch stopped at its first accepted
//! row): single-digit addition, greedy accepted 62% of the time, reached 88% alone at 3.0 J and
//! 88% batched at 3.8 J; larger-of-two, greedy accepted 38%, reached 68% alone and 85% batched.
//! So each class of request opens alone while its learned greedy acceptance rate is at least
//! one half (and before anything is known), batched below it. (A batch now ends as soon as a
//! row is accepted, see `ttc_service::verified_window`, which narrows the gap on the first
//! family.)
//!
//! A vote opens the same way, learned apart: its greedy candidate settles it alone when the
//! model is confident enough that further samples would retrace it (the confident stop,
//! [`crate::stopping::StoppingRule::confidence`]). Where that is common, one short greedy decode
//! does what a window of greedy and sampled rows would, at the length of the greedy row; where it
//! is rare, opening alone costs one extra round of decode passes.

use std::collections::HashMap;

use crate::difficulty::DepthClass;
use crate::plan::PlannedStrategy;

/// Weight of the newest request in a class's acceptance rate.
const ALPHA: f64 = 0.1;
/// The acceptance rate from which the greedy candidate opens alone.
const ALONE_FROM: f64 = 0.5;

/// Learns, per strategy and class of request, how often the greedy candidate settles a request
/// alone (best-of-N: accepted; a vote: confident).
#[derive(Debug, Clone, Default)]
pub struct GreedyOpening {
    rates: HashMap<(PlannedStrategy, DepthClass), f64>,
}

impl GreedyOpening {
    /// Whether a request of `class` under `strategy` opens with its greedy candidate alone.
    /// Before anything is known best-of-N does (the measurements above), a vote does not: its
    /// greedy candidate's confidence is measured in either opening, so it loses nothing by
    /// waiting for it.
    pub fn alone(&self, strategy: PlannedStrategy, class: DepthClass) -> bool {
        match self.rates.get(&(strategy, class)) {
            Some(rate) => *rate >= ALONE_FROM,
            None => strategy == PlannedStrategy::BestOfN,
        }
    }

    /// Learns from a finished request whether its greedy candidate settled it (or would have).
    pub fn record(&mut self, strategy: PlannedStrategy, class: DepthClass, greedy_settles: bool) {
        let hit = if greedy_settles { 1.0 } else { 0.0 };
        self.rates
            .entry((strategy, class))
            .and_modify(|rate| *rate += ALPHA * (hit - *rate))
            .or_insert(hit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AnswerType;

    #[test]
    fn opens_alone_until_greedy_mostly_fails_to_settle_and_again_once_it_does() {
        let class = DepthClass {
            answer_type: AnswerType::Number,
            bin: 1,
        };
        let other = DepthClass { bin: 2, ..class };
        let (best, vote) = (PlannedStrategy::BestOfN, PlannedStrategy::MajorityVote);
        let mut opening = GreedyOpening::default();
        assert!(opening.alone(best, class), "nothing known: alone");
        for _ in 0..10 {
            opening.record(best, class, false);
        }
        assert!(
            !opening.alone(best, class),
            "greedy always rejected: batched"
        );
        assert!(opening.alone(best, other), "classes are learned apart");
        assert!(
            !opening.alone(vote, class),
            "a vote opens batched until it knows better"
        );
        opening.record(vote, class, true);
        assert!(opening.alone(vote, class), "strategies are learned apart");
        for _ in 0..10 {
            opening.record(best, class, true);
        }
        assert!(opening.alone(best, class), "accepted again: alone");
    }
}
