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
//! self-contained, so any replica of the policy can take it behind a load-balancing Service,
//! and signed (HMAC-SHA256 with [`TicketKeys`] the replicas share), so that whoever can call the
//! API cannot make up or alter a ticket to steer what the pod learns.
//!
//! The learner records the *gain* of the depth the request drew over minimum depth
//! ([`FeedbackTicket::gain`]): +1 where depth turned a wrong answer right, -1 where it turned a
//! right one wrong, 0 where it changed nothing. Minimum depth's answer is known exactly: it is the
//! vote of the first `min_samples` samples, which is what minimum depth would have drawn.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::answer::{AnswerType, extract_answer};
use crate::difficulty::DepthClass;
use crate::vote::{Candidate, VoteWeighting, majority_vote};

/// The version prefix of encoded tickets; a ticket from another version is refused by name.
const TICKET_PREFIX: &str = "ttc2.";

/// The shortest key accepted, bytes.
pub const MIN_KEY_BYTES: usize = 16;

/// The keys that sign and check tickets: the first signs, every one is accepted, so a key can be
/// rotated in (listed first) while tickets signed by the one before still come back.
#[derive(Clone)]
pub struct TicketKeys {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TicketKeys({} keys)", self.keys.len())
    }
}

/// Why keys were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no feedback key given")]
    None,
    #[error("feedback key {index} has {len} bytes; at least {MIN_KEY_BYTES} are needed")]
    TooShort { index: usize, len: usize },
}

impl TicketKeys {
    /// Keys in order of preference; each at least [`MIN_KEY_BYTES`] long.
    pub fn new(keys: Vec<Vec<u8>>) -> Result<Self, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::None);
        }
        if let Some((index, key)) = keys
            .iter()
            .enumerate()
            .find(|(_, k)| k.len() < MIN_KEY_BYTES)
        {
            return Err(KeyError::TooShort {
                index,
                len: key.len(),
            });
        }
        Ok(Self { keys })
    }

    /// Keys from a file's lines (blank lines and `#` comments skipped), each line's bytes one
    /// key: the first signs.
    pub fn from_lines(text: &str) -> Result<Self, KeyError> {
        Self::new(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| l.as_bytes().to_vec())
                .collect(),
        )
    }

    fn sign(&self, payload: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.keys[0], payload)
    }

    fn verify(&self, payload: &[u8], mac: &[u8]) -> bool {
        self.keys
            .iter()
            .any(|key| constant_time_eq(&hmac_sha256(key, payload), mac))
    }
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

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

    /// The opaque string a response carries: `ttc2.<payload>.<signature>`, both base64url.
    pub fn encode(&self, keys: &TicketKeys) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default());
        let mac = URL_SAFE_NO_PAD.encode(keys.sign(payload.as_bytes()));
        format!("{TICKET_PREFIX}{payload}.{mac}")
    }

    /// Reads a ticket written by [`FeedbackTicket::encode`] with one of `keys`; a ticket whose
    /// signature does not match is refused before anything in it is read.
    pub fn decode(ticket: &str, keys: &TicketKeys) -> Result<Self, FeedbackError> {
        if ticket.len() > MAX_TICKET_BYTES {
            return Err(FeedbackError::BadTicket(format!(
                "{} bytes, more than {MAX_TICKET_BYTES}",
                ticket.len()
            )));
        }
        let body = ticket
            .strip_prefix(TICKET_PREFIX)
            .ok_or_else(|| FeedbackError::BadTicket(format!("no `{TICKET_PREFIX}` prefix")))?;
        let (payload, mac) = body
            .split_once('.')
            .ok_or_else(|| FeedbackError::BadTicket("no signature".into()))?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|e| FeedbackError::BadTicket(format!("signature not base64url: {e}")))?;
        if !keys.verify(payload.as_bytes(), &mac) {
            return Err(FeedbackError::BadTicket(
                "its signature does not match: altered, made up, or signed with a key this pod does not hold".into(),
            ));
        }
        let json = URL_SAFE_NO_PAD
            .decode(payload)
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

    fn keys(key: &str) -> TicketKeys {
        TicketKeys::from_lines(key).unwrap()
    }

    #[test]
    fn tickets_round_trip_and_foreign_strings_are_refused_by_reason() {
        let k = keys("a key of thirty-two bytes, 0123");
        let t = ticket(AnswerType::Number, &["4", "5", "5"], "5");
        let encoded = t.encode(&k);
        assert!(encoded.starts_with("ttc2."), "{encoded}");
        assert_eq!(FeedbackTicket::decode(&encoded, &k), Ok(t.clone()));
        let signed = |payload: &str| {
            format!(
                "ttc2.{payload}.{}",
                URL_SAFE_NO_PAD.encode(k.sign(payload.as_bytes()))
            )
        };
        for (bad, reason) in [
            ("hello".to_string(), "prefix"),
            ("ttc2.e30".to_string(), "no signature"),
            ("ttc2.e30.@@@".to_string(), "signature not base64url"),
            (signed("@@@"), "base64url"),
            (signed("e30"), "unreadable"),
        ] {
            match FeedbackTicket::decode(&bad, &k) {
                Err(FeedbackError::BadTicket(why)) => assert!(why.contains(reason), "{why}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let zero = FeedbackTicket {
            min_samples: 0,
            ..t.clone()
        };
        assert!(FeedbackTicket::decode(&zero.encode(&k), &k).is_err());
        let long = format!("ttc2.{}", "A".repeat(MAX_TICKET_BYTES));
        assert!(matches!(
            FeedbackTicket::decode(&long, &k),
            Err(FeedbackError::BadTicket(_))
        ));
    }

    /// Whoever can call the API cannot make up a ticket, change one (say its answers, to steer
    /// what depth is worth), or bring one signed by another policy's key.
    #[test]
    fn forged_altered_or_foreign_tickets_are_refused() {
        let k = keys("the policy's key, long enough ok");
        let t = ticket(AnswerType::Number, &["4", "5", "5"], "5");
        let encoded = t.encode(&k);
        let (payload, mac) = encoded["ttc2.".len()..].split_once('.').unwrap();
        let forged = FeedbackTicket {
            answers: vec![Some("5".into()), Some("4".into()), Some("4".into())],
            ..t.clone()
        };
        let swapped = format!(
            "ttc2.{}.{mac}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap())
        );
        let mut flipped = payload.to_string().into_bytes();
        flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
        let flipped = format!("ttc2.{}.{mac}", String::from_utf8(flipped).unwrap());
        let unsigned = format!("ttc2.{payload}.");
        let other_key = t.encode(&keys("another policy's key, long enough"));
        for bad in [swapped, flipped, unsigned, other_key] {
            match FeedbackTicket::decode(&bad, &k) {
                Err(FeedbackError::BadTicket(why)) => {
                    assert!(why.contains("signature does not match"), "{why}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    /// A new key listed first signs; the previous one, listed after it, still checks the
    /// tickets it signed.
    #[test]
    fn rotated_keys_accept_tickets_of_the_previous_key() {
        let old = keys("the old key, sixteen+ bytes long");
        let rotated = keys(
            "# rotated\nthe new key, sixteen+ bytes long\n\nthe old key, sixteen+ bytes long\n",
        );
        let t = ticket(AnswerType::Number, &["4", "5"], "5");
        assert_eq!(
            FeedbackTicket::decode(&t.encode(&old), &rotated),
            Ok(t.clone())
        );
        let new_ticket = t.encode(&rotated);
        assert!(FeedbackTicket::decode(&new_ticket, &old).is_err());
        assert_eq!(
            TicketKeys::from_lines("# only a comment\n").err(),
            Some(KeyError::None)
        );
        assert_eq!(
            TicketKeys::from_lines("short").err(),
            Some(KeyError::TooShort { index: 0, len: 5 })
        );
    }

    /// RFC 4231, test case 2.
    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
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
