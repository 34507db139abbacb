//! How best-of-N opens: its greedy candidate alone, or as the first row of a batch.
//!
//! The greedy answer is the one a verifier accepts most often, so it is always the first
//! candidate. Alone it costs one short decode and settles the request whenever it is accepted.
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

use std::collections::HashMap;

use super::difficulty::DepthClass;

/// Weight of the newest request in a class's acceptance rate.
const ALPHA: f64 = 0.1;
/// The acceptance rate from which the greedy candidate opens alone.
const ALONE_FROM: f64 = 0.5;

/// Learns, per class of request, how often best-of-N's greedy candidate is accepted.
#[derive(Debug, Clone, Default)]
pub struct GreedyOpening {
    rates: HashMap<DepthClass, f64>,
}

impl GreedyOpening {
    /// Whether a best-of-N request of `class` opens with its greedy candidate alone.
    pub fn alone(&self, class: DepthClass) -> bool {
        self.rates
            .get(&class)
            .is_none_or(|rate| *rate >= ALONE_FROM)
    }

    /// Learns from a finished best-of-N request whether its greedy candidate was accepted.
    pub fn record(&mut self, class: DepthClass, greedy_accepted: bool) {
        let hit = if greedy_accepted { 1.0 } else { 0.0 };
        self.rates
            .entry(class)
            .and_modify(|rate| *rate += ALPHA * (hit - *rate))
            .or_insert(hit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ttc::AnswerType;

    #[test]
    fn opens_alone_until_greedy_is_mostly_rejected_and_again_once_it_is_accepted() {
        let class = DepthClass {
            answer_type: AnswerType::Number,
            bin: 1,
        };
        let other = DepthClass { bin: 2, ..class };
        let mut opening = GreedyOpening::default();
        assert!(opening.alone(class), "nothing known: alone");
        for _ in 0..10 {
            opening.record(class, false);
        }
        assert!(!opening.alone(class), "greedy always rejected: batched");
        assert!(opening.alone(other), "classes are learned apart");
        for _ in 0..10 {
            opening.record(class, true);
        }
        assert!(opening.alone(class), "accepted again: alone");
    }
}
