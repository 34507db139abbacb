//! Correctness feedback: the signal that tells the depth-value learner whether extra depth made
//! answers *right*, not only whether it changed them.
//!
//! Without labels the learner sees disagreement: where later samples repeat the first, depth
//! cannot change an answer and is worthless. Where answers scatter without the vote being more
//! often right (yes/no facts on SmolLM2: greedy 50%, vote of 8 49%), disagreement keeps saying
//! "depth may pay". Only knowing which answer was right tells the two apart, and only the client
//! knows that (a user's thumbs-up, a test suite that ran the code, a labelled replay).
//!
//! Every answer chosen by test-time compute carries a [`FeedbackTicket`] (its class, the samples'
//! answers, the chosen one), encoded as an opaque string in the response. The client posts it
//! back with [`Feedback`]: whether the answer was right, or the expected answer. The ticket is
//! self-contained, so any replica of the policy can take it behind a load-balancing Service.
//!
//! The learner records the *gain* of the depth the request drew over minimum depth
//! ([`FeedbackTicket::gain`]): +1 where depth turned a wrong answer right, -1 where it turned a
//! right one wrong, 0 where it changed nothing. Minimum depth's answer is known exactly: it is the
//! vote of the first `min_samples` samples, which is what minimum depth would have drawn.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::answer::{AnswerType, extract_answer};
use crate::difficulty::DepthClass;
use crate::vote::{Candidate, VoteWeighting, majority_vote};

/// The version prefix of encoded tickets; a ticket from another version is refused by name.
const TICKET_PREFIX: &str = "ttc1.";

/// Longest encoded ticket accepted (a ticket of 64 samples with 64-byte answers fits).
pub const MAX_TICKET_BYTES: usize = 16 * 1024;

/// What a client says about a chosen answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feedback {
    /// Whether the chosen answer was right.
    Correct(bool),
    /// The expected answer, as text; it is normalised like the samples' answers.
    Expected(String),
}

/// Why feedback could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    /// The ticket is not one this sidecar wrote.
    #[error(
        "the ticket is not a ttc feedback ticket ({0}); post back `ttc.feedbackTicket` of the response unchanged"
    )]
    BadTicket(String),
    /// The expected answer has no answer of the request's type in it.
    #[error("the expected answer {expected:?} contains no {answer_type} answer")]
    Unextractable {
        /// What the client sent.
        expected: String,
        /// The request's answer type label.
        answer_type: &'static str,
    },
    /// This ticket's feedback was already taken.
    #[error("feedback for this request was already recorded")]
    Duplicate,
}

/// What feedback needs to know about a finished request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackTicket {
    /// The response's id, so the same feedback is not counted twice.
    pub id: String,
    /// How answers were extracted.
    pub answer_type: AnswerType,
    /// Difficulty bin of the prompt.
    pub bin: usize,
    /// Samples minimum depth draws (the policy's minimum when the request was planned).
    pub min_samples: usize,
    /// The samples' answers, in the order drawn.
    pub answers: Vec<Option<String>>,
    /// The chosen answer.
    pub answer: Option<String>,
}

impl FeedbackTicket {
    /// The request's class for the depth-value learner.
    pub fn class(&self) -> DepthClass {
        DepthClass {
            answer_type: self.answer_type,
            bin: self.bin,
        }
    }

    /// The opaque string a response carries.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{TICKET_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Reads a ticket written by [`FeedbackTicket::encode`].
    pub fn decode(ticket: &str) -> Result<Self, FeedbackError> {
        if ticket.len() > MAX_TICKET_BYTES {
            return Err(FeedbackError::BadTicket(format!(
                "{} bytes, more than {MAX_TICKET_BYTES}",
                ticket.len()
            )));
        }
        let body = ticket
            .strip_prefix(TICKET_PREFIX)
            .ok_or_else(|| FeedbackError::BadTicket(format!("no `{TICKET_PREFIX}` prefix")))?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| FeedbackError::BadTicket(format!("not base64url: {e}")))?;
        let ticket: Self = serde_json::from_slice(&json)
            .map_err(|e| FeedbackError::BadTicket(format!("unreadable: {e}")))?;
        if ticket.min_samples == 0 {
            return Err(FeedbackError::BadTicket("minSamples is 0".into()));
        }
        Ok(ticket)
    }

    /// The answer minimum depth would have given: the vote of the first `min_samples` samples.
    pub fn minimum_depth_answer(&self) -> Option<String> {
        let first: Vec<Candidate> = self
            .answers
            .iter()
            .take(self.min_samples.max(1))
            .map(|answer| Candidate {
                answer: answer.clone(),
                tokens: 1,
                ..Candidate::default()
            })
            .collect();
        majority_vote(&first, VoteWeighting::Uniform).map(|v| v.answer)
    }

    /// The accuracy the depth drawn gained over minimum depth: +1, 0 or -1; `None` when the
    /// request drew no more than minimum depth (it says nothing about depth).
    ///
    /// The first sample of every request is decoded greedily, as a plan of one sample is
    /// ([`crate::session::TtcSession::greedy_first`]), so minimum depth's answer is known exactly.
    /// With the expected answer the gain is exact. With right/wrong alone it is exact where
    /// depth kept minimum depth's answer (0) or made the answer right (+1); where depth changed
    /// the answer and it was wrong, minimum depth's answer was the right one only if there are
    /// two possible answers (yes/no, two options: -1), else it is unknown and counts 0, so that
    /// right/wrong feedback alone never judges depth worse than it is.
    pub fn gain(&self, feedback: &Feedback) -> Result<Option<f64>, FeedbackError> {
        // The expected answer is checked first, so a bad one is refused whatever the ticket.
        let verdict = match feedback {
            Feedback::Expected(text) => {
                Feedback::Expected(extract_answer(text, self.answer_type).ok_or_else(|| {
                    FeedbackError::Unextractable {
                        expected: text.chars().take(200).collect(),
                        answer_type: self.answer_type.label(),
                    }
                })?)
            }
            Feedback::Correct(correct) => Feedback::Correct(*correct),
        };
        if self.answers.len() <= self.min_samples.max(1) {
            return Ok(None);
        }
        let shallow = self.minimum_depth_answer();
        let deep = self.answer.as_ref();
        let gain = match verdict {
            Feedback::Expected(expected) => {
                let right = |a: Option<&String>| f64::from(u8::from(a == Some(&expected)));
                right(deep) - right(shallow.as_ref())
            }
            Feedback::Correct(_) if deep == shallow.as_ref() => 0.0,
            Feedback::Correct(true) => 1.0,
            Feedback::Correct(false) => {
                let two_answers = matches!(
                    self.answer_type,
                    AnswerType::YesNo | AnswerType::Choice { options: 2 }
                );
                if two_answers && shallow.is_some() && deep.is_some() {
                    -1.0
                } else {
                    0.0
                }
            }
        };
        Ok(Some(gain))
    }
}

/// Recently seen ticket ids, so a retried feedback post is not counted twice.
#[derive(Debug, Clone, Default)]
pub struct SeenTickets {
    order: std::collections::VecDeque<String>,
    set: std::collections::HashSet<String>,
}

impl SeenTickets {
    /// Ids remembered; the oldest is forgotten beyond this.
    pub const CAPACITY: usize = 65_536;

    /// Marks `id` as seen; fails when it already was.
    pub fn insert(&mut self, id: &str) -> Result<(), FeedbackError> {
        if !self.set.insert(id.to_owned()) {
            return Err(FeedbackError::Duplicate);
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > Self::CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(answer_type: AnswerType, answers: &[&str], answer: &str) -> FeedbackTicket {
        FeedbackTicket {
            id: "chatcmpl-1".into(),
            answer_type,
            bin: 1,
            min_samples: 1,
            answers: answers.iter().map(|a| Some(a.to_string())).collect(),
            answer: Some(answer.into()),
        }
    }

    #[test]
    fn tickets_round_trip_and_foreign_strings_are_refused_by_reason() {
        let t = ticket(AnswerType::Number, &["4", "5", "5"], "5");
        let encoded = t.encode();
        assert!(encoded.starts_with("ttc1."), "{encoded}");
        assert_eq!(FeedbackTicket::decode(&encoded), Ok(t.clone()));
        for (bad, reason) in [
            ("hello", "prefix"),
            ("ttc1.@@@", "base64url"),
            ("ttc1.e30", "unreadable"),
        ] {
            match FeedbackTicket::decode(bad) {
                Err(FeedbackError::BadTicket(why)) => assert!(why.contains(reason), "{why}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let zero = FeedbackTicket {
            min_samples: 0,
            ..t.clone()
        };
        assert!(FeedbackTicket::decode(&zero.encode()).is_err());
        let long = format!("ttc1.{}", "A".repeat(MAX_TICKET_BYTES));
        assert!(matches!(
            FeedbackTicket::decode(&long),
            Err(FeedbackError::BadTicket(_))
        ));
    }

    #[test]
    fn the_expected_answer_gives_the_exact_gain_over_minimum_depth() {
        let expected = |text: &str| Feedback::Expected(text.into());
        // Depth turned the first (greedy) sample's wrong 4 into the right 5.
        let fixed = ticket(AnswerType::Number, &["4", "5", "5"], "5");
        assert_eq!(fixed.gain(&expected("The answer is 5.")), Ok(Some(1.0)));
        // ... or its right 4 into a wrong 5.
        assert_eq!(fixed.gain(&expected("4")), Ok(Some(-1.0)));
        // Both wrong: nothing gained.
        assert_eq!(fixed.gain(&expected("6")), Ok(Some(0.0)));
        // Minimum depth of 3: its vote (5) is what depth is compared with.
        let three = FeedbackTicket {
            min_samples: 3,
            ..ticket(AnswerType::Number, &["4", "5", "5", "4", "4"], "4")
        };
        assert_eq!(three.minimum_depth_answer().as_deref(), Some("5"));
        assert_eq!(three.gain(&expected("4")), Ok(Some(1.0)));
        // No more than minimum depth: no evidence about depth.
        let single = ticket(AnswerType::Number, &["4"], "4");
        assert_eq!(single.gain(&expected("4")), Ok(None));
        assert_eq!(three.gain(&Feedback::Correct(true)), Ok(Some(1.0)));
        match fixed.gain(&expected("no number here")) {
            Err(e @ FeedbackError::Unextractable { .. }) => {
                assert!(e.to_string().contains("number"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn right_or_wrong_alone_never_judges_depth_worse_than_it_is() {
        let changed = ticket(AnswerType::Number, &["4", "5", "5"], "5");
        assert_eq!(changed.gain(&Feedback::Correct(true)), Ok(Some(1.0)));
        // Wrong after a change: the first answer may or may not have been right.
        assert_eq!(changed.gain(&Feedback::Correct(false)), Ok(Some(0.0)));
        // With two possible answers it was.
        let yes_no = ticket(AnswerType::YesNo, &["yes", "no", "no"], "no");
        assert_eq!(yes_no.gain(&Feedback::Correct(false)), Ok(Some(-1.0)));
        let pair = ticket(AnswerType::Choice { options: 2 }, &["a", "b", "b"], "b");
        assert_eq!(pair.gain(&Feedback::Correct(false)), Ok(Some(-1.0)));
        // Unchanged: nothing gained whatever the verdict.
        let kept = ticket(AnswerType::YesNo, &["no", "yes", "no"], "no");
        assert_eq!(kept.gain(&Feedback::Correct(true)), Ok(Some(0.0)));
        assert_eq!(kept.gain(&Feedback::Correct(false)), Ok(Some(0.0)));
    }

    #[test]
    fn a_ticket_is_taken_once() {
        let mut seen = SeenTickets::default();
        assert_eq!(seen.insert("a"), Ok(()));
        assert_eq!(seen.insert("a"), Err(FeedbackError::Duplicate));
        assert_eq!(seen.insert("b"), Ok(()));
    }
}
