//! Budget forcing for reasoning models (R1-distill style): cap the reasoning at a token budget,
//! then make the model answer.
//!
//! The engine generates up to the plan's reasoning budget; if the reasoning has not closed by
//! then, `crate::ttc_service` appends [`BudgetForcing::forced_suffix`] to what was generated and
//! lets the model continue for the answer's own `max_tokens` (Muennighoff et al., "s1: Simple
//! test-time scaling", 2025).

use serde::{Deserialize, Serialize};

/// How a model marks its reasoning and how it is told to answer now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetForcing {
    /// Text that closes the reasoning (`</think>` for DeepSeek-R1 distills).
    pub think_close: String,
    /// Text appended after the closed reasoning to elicit the answer at once.
    pub answer_cue: String,
}

impl Default for BudgetForcing {
    /// The DeepSeek-R1-distill convention.
    fn default() -> Self {
        Self {
            think_close: "</think>".into(),
            answer_cue: "\n\nFinal answer: ".into(),
        }
    }
}

impl BudgetForcing {
    /// What to append to `generated` (the text of a sample that hit its reasoning budget) so
    /// that the model answers now; `None` when the reasoning already closed on its own.
    pub fn forced_suffix(&self, generated: &str) -> Option<String> {
        if generated.contains(&self.think_close) {
            None
        } else {
            Some(format!("{}{}", self.think_close, self.answer_cue))
        }
    }
}

/// The answer part of a completion: what follows the last `</think>`, or the whole text when it
/// has no reasoning block. Answers are extracted and verified from this part only, so numbers
/// and yes/no words in the reasoning cannot be mistaken for the answer.
pub fn answer_part(text: &str) -> &str {
    match text.rfind("</think>") {
        Some(at) => &text[at + "</think>".len()..],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AnswerType, extract_answer};

    #[test]
    fn forcing_closes_open_reasoning_only() {
        let forcing = BudgetForcing::default();
        assert_eq!(
            forcing.forced_suffix("<think>3 plus 4 is").as_deref(),
            Some("</think>\n\nFinal answer: ")
        );
        assert_eq!(forcing.forced_suffix("<think>7</think> 7"), None);
    }

    #[test]
    fn answers_come_from_after_the_reasoning() {
        let text = "<think>Is it no? 12 + 30 = 40, no wait</think>\nYes. It is 42.";
        assert_eq!(answer_part(text), "\nYes. It is 42.");
        assert_eq!(
            extract_answer(text, AnswerType::YesNo).as_deref(),
            Some("yes")
        );
        assert_eq!(
            extract_answer("<think>maybe 40</think>", AnswerType::Number),
            None,
            "a forced answer that never came is no answer"
        );
        assert_eq!(answer_part("plain 5"), "plain 5");
    }
}
